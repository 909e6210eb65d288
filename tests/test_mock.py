"""The mock observatory: truth is recoverable from the files it writes (issue 3, item 4)."""

from __future__ import annotations

import dataclasses
import json
import tomllib

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from klever_nb import constants, cosmology, mock
from klever_nb.config import load_galaxy, load_sample
from klever_nb.errors import ConfigError
from klever_nb.io import mockfiles
from klever_nb.lensmodels import ParametricLens


@pytest.fixture(scope="module")
def lensed():
    return mock.make_mock(mock.demo_specs()[0])


@pytest.fixture(scope="module")
def unlensed():
    return mock.make_mock(mock.demo_specs()[1])


@pytest.fixture(scope="module")
def written(tmp_path_factory, lensed, unlensed):
    root = tmp_path_factory.mktemp("mocks")
    return {"lensed": mockfiles.write_mock(lensed, root / "lensed"),
            "unlensed": mockfiles.write_mock(unlensed, root / "unlensed")}


def _small(**kwargs) -> mock.MockSpec:
    base = {"name": "tiny", "redshift": 1.4, "shape": (12, 12), "bands": ("H",)}
    base.update(kwargs)
    return mock.MockSpec(**base)


# ---------------------------------------------------------------------------
# Determinism and noise
# ---------------------------------------------------------------------------


def test_same_seed_gives_identical_cubes_and_other_seed_other_noise():
    spec = _small(seed=3)
    a, b = mock.make_mock(spec), mock.make_mock(spec)
    c = mock.make_mock(dataclasses.replace(spec, seed=4))
    np.testing.assert_array_equal(a.cubes["H"]["flux"].values, b.cubes["H"]["flux"].values)
    assert a.truth == b.truth
    assert not np.array_equal(a.cubes["H"]["flux"].values, c.cubes["H"]["flux"].values)
    np.testing.assert_array_equal(a.noiseless["H"]["flux"].values,
                                  c.noiseless["H"]["flux"].values)


def test_noise_is_gaussian_with_the_stated_sigma(lensed):
    for band in ("YJ", "H", "K"):
        pull = ((lensed.cubes[band]["flux"] - lensed.noiseless[band]["flux"])
                / lensed.cubes[band]["noise"]).values
        assert abs(pull.mean()) < 0.01
        assert pull.std() == pytest.approx(1.0, abs=0.01)


def test_noise_follows_the_sky_lines(lensed):
    noise = lensed.cubes["H"]["noise"].values[:, 0, 0]
    assert noise.max() / np.median(noise) > 3  # bright OH lines
    assert lensed.cubes["H"]["noise"].attrs["units"] == mock.FLUX_UNITS


# ---------------------------------------------------------------------------
# Line fluxes and magnification against the truth
# ---------------------------------------------------------------------------


def _line_groups(galaxy, band):
    """Lines of a band grouped so that windows of +-6 sigma do not overlap between groups."""
    ds = galaxy.noiseless[band]
    maps = galaxy.image_maps
    z = galaxy.spec.redshift
    r = ds.attrs["resolving_power"]
    windows = []
    for name in galaxy.truth["bands"][band]:
        centre = constants.LINES[name].wave_vac * (1 + z) / 1e4
        v = maps["velocity"].sel(line=name).values
        sig_kms = float(maps["sigma"].sel(line=name).max())
        sigma = np.hypot(centre * sig_kms / constants.C_KMS, centre / (r * 2.3548))
        lo = centre * (1 + v.min() / constants.C_KMS) - 6 * sigma
        hi = centre * (1 + v.max() / constants.C_KMS) + 6 * sigma
        windows.append([lo, hi, [name]])
    windows.sort()
    merged = [windows[0]]
    for lo, hi, names in windows[1:]:
        if lo <= merged[-1][1]:
            merged[-1][1] = max(hi, merged[-1][1])
            merged[-1][2] += names
        else:
            merged.append([lo, hi, names])
    return merged


@pytest.mark.parametrize("which", ["lensed", "unlensed"])
def test_noiseless_cube_line_fluxes_integrate_back_to_truth(which, lensed, unlensed):
    galaxy = lensed if which == "lensed" else unlensed
    n_checked = 0
    for band in galaxy.spec.bands:
        ds = galaxy.noiseless[band]
        wave = ds["wave"].values
        step_angstrom = (wave[1] - wave[0]) * 1e4
        line_only = (ds["flux"] - ds["continuum"]).values
        for lo, hi, names in _line_groups(galaxy, band):
            inside = (wave >= lo) & (wave <= hi)
            measured = line_only[inside].sum() * step_angstrom * mock.FLUX_UNIT_CGS
            expected = sum(galaxy.truth["line_fluxes_observed"][n] for n in names)
            assert measured == pytest.approx(expected, rel=5e-3), (band, names)
            n_checked += len(names)
    assert n_checked >= 9


def test_truth_fluxes_are_dust_and_lensing_consistent(lensed):
    t = lensed.truth
    for name in mock.MOCK_LINES:
        dust = mock.dust_transmission(name, lensed.spec.ebv)
        assert t["line_fluxes_source_attenuated"][name] == pytest.approx(
            t["line_fluxes_intrinsic"][name] * dust, rel=1e-12)
    assert t["line_fluxes_intrinsic"]["Halpha"] == pytest.approx(lensed.spec.halpha_flux)
    assert t["line_fluxes_observed"]["Halpha"] == pytest.approx(
        t["mu"] * t["line_fluxes_source_attenuated"]["Halpha"], rel=1e-12)
    # CCM89 Balmer decrement of the screen (FACTS.md §5: k(Hb) - k(Ha) = 1.0733).
    decrement = t["line_fluxes_observed"]["Halpha"] / t["line_fluxes_observed"]["Hbeta"]
    expected = constants.BALMER_INTRINSIC * 10 ** (0.4 * 1.0733 * lensed.spec.ebv)
    assert decrement == pytest.approx(expected, rel=2e-3)
    assert t["mu"] > 3


def test_unlensed_mock_has_unit_magnification_and_keeps_its_flux(unlensed):
    t = unlensed.truth
    assert t["mu"] == 1.0
    assert not t["lensed"] and unlensed.lens_maps is None
    ha = t["line_fluxes_observed"]["Halpha"]
    assert ha == pytest.approx(t["line_fluxes_source_attenuated"]["Halpha"], rel=2e-3)


def _sis_extended_mu(spec, theta_e):
    """Exact total SIS magnification of an extended source: <mu_tot(beta)> weighted by SB.

    mu_tot = 2 theta_e / beta inside the cut (beta < theta_e), 1 + theta_e / beta outside,
    integrated on a 0.004" source grid that avoids beta = 0.
    """
    offsets = (np.arange(-400, 400) + 0.5) * 0.004
    bx, by = np.meshgrid(offsets + spec.centre_offset_arcsec[0], offsets)
    beta = np.hypot(bx, by)
    mu_tot = np.where(beta < theta_e, 2 * theta_e / beta, 1 + theta_e / beta)
    weight = mock.disc_model(spec, bx, by)["sb"]
    return float(np.sum(weight * mu_tot) / np.sum(weight))


@pytest.mark.parametrize("beta", [0.35, 0.6])
def test_sis_mock_magnification_matches_analytic(beta):
    theta_e = 1.0
    spec = _small(name="sis", shape=(24, 24), scale_length_kpc=0.25, inclination_deg=0.0,
                  centre_offset_arcsec=(beta, 0.0), subsample=10,
                  lens=ParametricLens(({"type": "SIS", "theta_e": theta_e},)), z_lens=0.5)
    galaxy = mock.make_mock(spec)
    point = 2 * theta_e / beta
    extended = _sis_extended_mu(spec, theta_e)
    assert galaxy.truth["mu_fine_grid"] == pytest.approx(extended, rel=0.01)
    assert galaxy.truth["mu"] == pytest.approx(extended, rel=0.015)
    assert galaxy.truth["mu"] == pytest.approx(point, rel=0.04)


# ---------------------------------------------------------------------------
# Source plane
# ---------------------------------------------------------------------------


def test_source_maps_follow_the_input_gradient_and_flux(unlensed):
    src = unlensed.source
    spec = unlensed.spec
    area = src.attrs["pixel_scale_arcsec"] ** 2
    total = float(src["sb_intrinsic"].sel(line="Halpha").sum()) * area
    assert total == pytest.approx(spec.halpha_flux, rel=5e-3)
    r = src["radius_kpc"].values.ravel()
    oh = src["oh"].values.ravel()
    lo, hi = mock.oh_range()
    ok = (oh > lo) & (oh < hi)
    slope, intercept = np.polyfit(r[ok], oh[ok], 1)
    assert slope == pytest.approx(spec.gradient_dex_per_kpc, abs=1e-9)
    assert intercept == pytest.approx(spec.central_oh, abs=1e-9)
    assert src["xs"].attrs["units"] == "kpc"
    assert lo <= unlensed.truth["global_oh"] <= spec.central_oh


def test_line_ratios_follow_c20_calibrations():
    from klever_nb.calibrations import get_calibration

    oh = np.array([8.0, 8.3, 8.6])
    r = mock.line_ratios_to_halpha(oh)
    hbeta = r["Hbeta"]
    np.testing.assert_allclose(np.log10(r["OIII_5007"] / hbeta),
                               get_calibration("R3").log_ratio(oh), atol=1e-12)
    np.testing.assert_allclose(np.log10(r["NII_6584"]), get_calibration("N2").log_ratio(oh),
                               atol=1e-12)
    np.testing.assert_allclose(np.log10(r["SII_6717"] + r["SII_6731"]),
                               get_calibration("S2").log_ratio(oh), atol=1e-12)
    np.testing.assert_allclose(np.log10(r["OIII_5007"] / (r["OII_3727"] + r["OII_3729"])),
                               get_calibration("O3O2").log_ratio(oh), atol=1e-12)
    np.testing.assert_allclose(r["OIII_5007"] / r["OIII_4959"], constants.OIII_RATIO)
    np.testing.assert_allclose(r["NII_6584"] / r["NII_6548"], constants.NII_RATIO)
    np.testing.assert_allclose(r["SIII_9531"] / r["SIII_9069"], constants.SIII_RATIO)
    np.testing.assert_allclose(1 / hbeta, constants.BALMER_INTRINSIC)


def test_velocity_field_rotates_with_the_expected_amplitude(unlensed):
    spec = unlensed.spec
    v = unlensed.source["velocity"].values
    v_edge = spec.v_max_kms * 2 / np.pi * np.arctan(unlensed.source["radius_kpc"].values.max()
                                                    / spec.v_turnover_kpc)
    assert v.max() == pytest.approx(-v.min(), rel=1e-6)
    assert v.max() <= v_edge * np.sin(np.radians(spec.inclination_deg)) + 1e-9
    assert v.max() > 0.8 * spec.v_max_kms * np.sin(np.radians(spec.inclination_deg))


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def test_cube_fits_has_kmos_layout_wcs_and_bunit(written, lensed):
    path = written["lensed"].parent / "cubes" / f"{lensed.spec.name}_H.fits"
    with fits.open(path) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "DATA", "NOISE"]
        assert hdul[0].data is None
        assert hdul[0].header["OBJECT"] == lensed.spec.name
        assert hdul[0].header["HIERARCH ESO INS GRAT1 ID"] == "H"
        data = hdul["DATA"]
        head = data.header
        assert u.Unit(head["BUNIT"]) == 1e-20 * u.erg / u.s / u.cm**2 / u.AA
        assert head["CTYPE1"] == "RA---TAN" and head["CTYPE2"] == "DEC--TAN"
        assert head["CTYPE3"] == "WAVE" and head["CUNIT3"] == "um"
        assert head["CD1_1"] < 0 < head["CD2_2"]
        wcs = WCS(head)
        scales = wcs.celestial.proj_plane_pixel_scales()
        assert [s.to_value(u.arcsec) for s in scales] == pytest.approx([0.2, 0.2])
        ny, nx = lensed.spec.shape
        ra, dec = wcs.celestial.pixel_to_world_values((nx - 1) / 2, (ny - 1) / 2)
        assert (float(ra), float(dec)) == pytest.approx((lensed.spec.ra_deg,
                                                         lensed.spec.dec_deg))
        wave = wcs.spectral.pixel_to_world_values(np.arange(head["NAXIS3"]))
        np.testing.assert_allclose(wave * 1e6, lensed.cubes["H"]["wave"].values, rtol=1e-9)
        np.testing.assert_allclose(data.data, lensed.cubes["H"]["flux"].values, rtol=1e-6,
                                   atol=1e-6 * np.abs(lensed.cubes["H"]["flux"].values).max())
        assert hdul["NOISE"].header["EXTNAME"] == "NOISE"


def test_lens_maps_are_dls_ds_normalised_with_wcs(written, lensed):
    lens_dir = written["lensed"].parent / "lens"
    factor = cosmology.dls_over_ds(lensed.spec.z_lens, lensed.spec.redshift)
    with fits.open(lens_dir / "dx.fits") as hx, fits.open(lens_dir / "dy.fits") as hy:
        ax, ay = hx[0].data.astype(float), hy[0].data.astype(float)
        head = hx[0].header
        assert head["BUNIT"] == "arcsec"
        wcs = WCS(head)
    n = ax.shape[0]
    step = lensed.spec.lens_fine_pixel_arcsec
    offsets = (np.arange(n) - (n - 1) / 2) * step
    xx, yy = np.meshgrid(offsets, offsets)
    tx, ty = lensed.spec.lens.deflection(xx, yy)
    np.testing.assert_allclose(ax * factor, tx, atol=1e-5)
    np.testing.assert_allclose(ay * factor, ty, atol=1e-5)
    # The map centre is the cube centre on the sky.
    ra, dec = wcs.pixel_to_world_values((n - 1) / 2, (n - 1) / 2)
    assert (float(ra), float(dec)) == pytest.approx((lensed.spec.ra_deg, lensed.spec.dec_deg))
    assert abs(wcs.wcs.cd[0, 0] * 3600) == pytest.approx(step)
    kappa, gamma = lensed.spec.lens.convergence_shear(xx, yy)
    far = np.hypot(xx, yy) > 0.2
    for name, expected in (("kappa.fits", kappa), ("gamma.fits", gamma)):
        with fits.open(lens_dir / name) as hdul:
            values = hdul[0].data.astype(float) * factor
        np.testing.assert_allclose(values[far], expected[far], rtol=1e-5)


def test_galaxy_toml_parses_and_validates(written, lensed):
    with open(written["lensed"], "rb") as handle:
        data = tomllib.load(handle)
    assert data["name"] == lensed.spec.name
    assert data["redshift"] == lensed.spec.redshift
    assert set(data["cubes"]) == {"YJ", "H", "K"}
    assert data["lens"]["normalisation"] == "dls_ds"
    config = load_galaxy(written["lensed"])
    assert config.lensed and config.lens.z_lens == lensed.spec.z_lens
    assert config.psf_fwhm_arcsec == lensed.spec.psf_fwhm_arcsec
    plain = load_galaxy(written["unlensed"])
    assert not plain.lensed
    truth = json.loads((written["unlensed"].parent / "truth.json").read_text())
    assert truth["mu"] == 1.0
    assert truth["central_oh"] == 8.40


def test_open_cube_reads_back_the_written_cube(written, lensed):
    io = pytest.importorskip("klever_nb.io")
    if not hasattr(io, "open_cube"):
        pytest.skip("klever_nb.io.open_cube not available yet")
    path = written["lensed"].parent / "cubes" / f"{lensed.spec.name}_YJ.fits"
    cube = io.open_cube(path)
    ref = lensed.cubes["YJ"]
    np.testing.assert_allclose(cube["wave"].values, ref["wave"].values, rtol=1e-9)
    scale = np.abs(ref["flux"].values).max()
    np.testing.assert_allclose(cube["flux"].values, ref["flux"].values, atol=1e-6 * scale)
    np.testing.assert_allclose(cube["noise"].values, ref["noise"].values, rtol=1e-6)
    assert u.Unit(cube["flux"].attrs["units"]) == u.Unit(mock.FLUX_UNITS)
    assert cube.attrs["band"] == "YJ"
    assert cube.attrs["pixel_scale_arcsec"] == pytest.approx(0.2)


def test_demo_sample_writes_every_galaxy_and_a_sample_file(tmp_path):
    specs = mock.demo_specs()
    assert len(specs) >= 2
    assert any(s.lens is not None for s in specs) and any(s.lens is None for s in specs)
    sample = mockfiles.write_demo_sample(tmp_path)
    paths = load_sample(sample)
    assert [p.parent.name for p in paths] == [s.name for s in specs]
    for path in paths:
        assert load_galaxy(path).name == path.parent.name
    assert not list(tmp_path.rglob("*.tmp"))


def test_demo_bands_hold_the_paper_lines():
    lensed, unlensed = mock.demo_specs()[:2]
    z14 = mock.make_mock(dataclasses.replace(lensed, shape=(8, 8), lens=None, z_lens=None))
    assert {"Hbeta", "OIII_5007"} <= set(z14.truth["bands"]["YJ"])
    assert {"Halpha", "NII_6584", "SII_6717", "SII_6731"} <= set(z14.truth["bands"]["H"])
    assert {"SIII_9069", "SIII_9531"} <= set(z14.truth["bands"]["K"])
    bands = mock.make_mock(dataclasses.replace(unlensed, shape=(8, 8))).truth["bands"]
    assert {"OII_3727", "OII_3729"} <= set(bands["YJ"])
    assert {"Hbeta", "OIII_5007"} <= set(bands["H"])
    assert {"Halpha", "NII_6584"} <= set(bands["K"])


@pytest.mark.parametrize("kwargs, key", [
    ({"bands": ("Q",)}, "bands"),
    ({"redshift": -1.0}, "redshift"),
    ({"psf_fwhm_arcsec": 0.0}, "psf_fwhm_arcsec"),
    ({"lens": ParametricLens(({"type": "SIS", "theta_e": 1.0},))}, "z_lens"),
    ({"subsample": 2}, "subsample"),
])
def test_bad_spec_raises_config_error_naming_the_field(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        _small(**kwargs)


def test_demo_galaxy_builds_fast():
    import time

    spec = mock.demo_specs()[0]
    mock.make_mock(spec)  # warm caches (sky model, dust)
    timings = []
    for _ in range(2):  # best of two: robust to a busy shared machine
        start = time.perf_counter()
        mock.make_mock(spec)
        timings.append(time.perf_counter() - start)
    assert min(timings) < 2.0


def test_halpha_peak_snr_is_the_requested_one(lensed):
    """Optimal-extraction SNR of Halpha in its brightest spaxel equals spec.snr_halpha_peak."""
    spec = lensed.spec
    flux = lensed.image_maps["flux"].sel(line="Halpha").values
    iy, ix = np.unravel_index(np.argmax(flux), flux.shape)
    ds = lensed.noiseless["H"]
    wave = ds["wave"].values
    v = float(lensed.image_maps["velocity"].sel(line="Halpha").values[iy, ix])
    centre = constants.LINES["Halpha"].wave_vac * (1 + spec.redshift) / 1e4 * (
        1 + v / constants.C_KMS)
    window = np.abs(wave - centre) < 0.004  # excludes [NII] (0.005 um away at z = 1.4)
    profile = (ds["flux"] - ds["continuum"]).values[window, iy, ix]
    sigma = ds["noise"].values[window, iy, ix]
    snr = np.sqrt(np.sum(profile**2 / sigma**2))
    assert snr == pytest.approx(spec.snr_halpha_peak, rel=0.02)


def test_cube_offset_moves_the_galaxy_by_the_stated_amount():
    spec = _small(shape=(16, 16), scale_length_kpc=1.0, inclination_deg=0.0)
    shifted = dataclasses.replace(spec, cube_offset_arcsec=(0.3, -0.2))

    def centroid(galaxy):
        f = galaxy.image_maps["flux"].sel(line="Halpha").values
        yy, xx = np.indices(f.shape)
        return np.array([np.sum(f * xx), np.sum(f * yy)]) / f.sum()

    moved = centroid(mock.make_mock(shifted)) - centroid(mock.make_mock(spec))
    np.testing.assert_allclose(moved, [-1.5, 1.0], atol=0.02)  # pixels of 0.2"


def test_hst_image_is_the_lensed_continuum_with_wcs(written, lensed):
    path = written["lensed"].parent / "lens" / "f160w.fits"
    with fits.open(path) as hdul:
        image = hdul[0].data.astype(float)
        assert WCS(hdul[0].header).has_celestial
    # Its light sits where the lensed Halpha is: the ring around the lens, not the centre.
    n = image.shape[0]
    yy, xx = np.indices(image.shape)
    r = np.hypot(xx - (n - 1) / 2, yy - (n - 1) / 2) * lensed.spec.lens_fine_pixel_arcsec
    ring = (r > 0.6) & (r < 1.6)
    assert image[ring].sum() > 0.8 * image.sum()
    assert load_galaxy(written["lensed"]).lens.hst_image == path.resolve()


def test_truth_has_sfr_and_properties_are_written(written, lensed):
    from klever_nb.cosmology import luminosity_distance_cm

    lum = 4 * np.pi * luminosity_distance_cm(lensed.spec.redshift) ** 2 * lensed.spec.halpha_flux
    expected = lum / 10**constants.KE12_LOG_C_HALPHA / constants.KROUPA_TO_CHABRIER
    assert lensed.truth["sfr"] == pytest.approx(expected, rel=1e-12)
    config = load_galaxy(written["lensed"])
    assert config.properties["log_mstar"] == lensed.spec.log_mstar


def _add_lines_slow(cube, wave, flux, centre, sigma):
    """Reference twin of mock._add_lines: one spaxel at a time, every channel."""
    from scipy.special import ndtr

    step = wave[1] - wave[0]
    edges = np.concatenate([wave - 0.5 * step, [wave[-1] + 0.5 * step]])
    for iy in range(flux.shape[0]):
        for ix in range(flux.shape[1]):
            cdf = ndtr((edges - centre[iy, ix]) / sigma[iy, ix])
            cube[:, iy, ix] += np.diff(cdf) * flux[iy, ix] / (step * 1e4 * mock.FLUX_UNIT_CGS)


def test_vectorised_line_synthesis_equals_the_per_spaxel_loop():
    rng = np.random.default_rng(1)
    wave = mock.band_wavelengths("KMOS", "H")
    flux = rng.uniform(0, 1e-18, (5, 6))
    centre = 1.6 + rng.normal(0, 2e-4, (5, 6))
    sigma = rng.uniform(1.5e-4, 3e-4, (5, 6))
    fast = np.zeros((wave.size, 5, 6))
    slow = np.zeros_like(fast)
    mock._add_lines(fast, wave, flux, centre, sigma)
    _add_lines_slow(slow, wave, flux, centre, sigma)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12 * slow.max())
    step_angstrom = (wave[1] - wave[0]) * 1e4
    np.testing.assert_allclose(fast.sum(axis=0) * step_angstrom * 1e-20, flux, rtol=1e-12)


def test_forward_model_options_agree_with_the_full_run(lensed):
    spec = lensed.spec
    full = lensed.image_maps
    subset, _ = mock.image_plane_maps(spec, lines=("Halpha", "NII_6584"), kinematics=False,
                                      deflection=spec.lens.deflection)
    np.testing.assert_allclose(subset["flux"].values,
                               full["flux"].sel(line=["Halpha", "NII_6584"]).values,
                               rtol=1e-10, atol=1e-30)
    assert float(subset["sigma"].min()) == spec.sigma_kms
    with pytest.raises(ConfigError, match="lines"):
        mock.image_plane_maps(spec, lines=("Lyalpha",))


def test_beam_smearing_raises_dispersion_only_where_velocity_changes(unlensed):
    sigma = unlensed.image_maps["sigma"].sel(line="Halpha").values
    assert sigma.min() >= unlensed.spec.sigma_kms - 1e-9
    flux = unlensed.image_maps["flux"].sel(line="Halpha").values
    iy, ix = np.unravel_index(np.argmax(flux), flux.shape)
    # The centre, where the rotation curve is steepest, has the largest smearing.
    assert sigma[iy, ix] > unlensed.spec.sigma_kms + 5


def test_dead_spaxels_are_nan_in_flux_and_noise_of_every_band(tmp_path):
    spec = _small(bands=("YJ", "H"), nan_spaxels=5)
    galaxy = mock.make_mock(spec)
    masks = [np.isnan(galaxy.cubes[b]["flux"].values).all(axis=0) for b in spec.bands]
    assert masks[0].sum() == 5
    np.testing.assert_array_equal(masks[0], masks[1])
    assert np.isnan(galaxy.cubes["H"]["noise"].values[:, masks[0]]).all()
    assert not np.isnan(galaxy.noiseless["H"]["flux"].values).any()
    assert not np.isnan(galaxy.noiseless["H"]["noise"].values).any()
    path = mockfiles.write_mock(galaxy, tmp_path)
    with fits.open(path.parent / "cubes" / "tiny_H.fits") as hdul:
        assert np.isnan(hdul["DATA"].data).all(axis=0).sum() == 5


def test_sinfoni_mock_is_written_in_the_sinfoni_layout(tmp_path):
    spec = mock.MockSpec(name="sinf", redshift=1.4, instrument="SINFONI", bands=("H",),
                         shape=(10, 10), pixel_scale_arcsec=0.25)
    galaxy = mock.make_mock(spec)
    assert galaxy.cubes["H"].attrs["resolving_power"] == constants.INSTRUMENTS[
        "SINFONI"].bands["H"].resolving_power
    path = mockfiles.write_mock(galaxy, tmp_path)
    with fits.open(path.parent / "cubes" / "sinf_H.fits") as hdul:
        assert len(hdul) == 1 and hdul[0].data.shape == (2048, 10, 10)
        assert hdul[0].header["INSTRUME"] == "SINFONI"
        assert hdul[0].header["CD2_2"] * 3600 == pytest.approx(0.25)
    assert load_galaxy(path).instrument == "SINFONI"


# ---------------------------------------------------------------------------
# Noiseless option and the strong-lensing grid (issue 21)
# ---------------------------------------------------------------------------


def test_noiseless_spec_writes_the_noiseless_cubes_with_the_noisy_noise_extension():
    spec = _small(seed=5)
    noisy = mock.make_mock(spec)
    clean = mock.make_mock(dataclasses.replace(spec, noiseless=True))
    np.testing.assert_array_equal(clean.cubes["H"]["flux"].values,
                                  noisy.noiseless["H"]["flux"].values)
    np.testing.assert_array_equal(clean.cubes["H"]["noise"].values,
                                  noisy.cubes["H"]["noise"].values)
    assert clean.truth["noiseless"] and not noisy.truth["noiseless"]
    assert clean.truth["mu"] == noisy.truth["mu"]
    assert not any(s.noiseless for s in mock.demo_specs())


def test_lensed_images_of_an_sis_and_an_sie_quad():
    sis = ParametricLens(({"type": "SIS", "theta_e": 1.0, "center_x": 0.1},))
    images = mock.lensed_images(sis, (0.6, 0.0), half_size=3.0)
    assert [round(im["mu"], 6) for im in images] == [3.0, -1.0]  # 1 +- theta_e / beta
    assert images[0]["theta_x"] == pytest.approx(1.6) and images[1]["theta_x"] == pytest.approx(
        -0.4)
    assert mock.lensed_images(sis, (1.6, 0.0), half_size=3.0)[0]["mu"] == pytest.approx(1 + 1 / 1.5)
    assert len(mock.lensed_images(sis, (1.6, 0.0), half_size=3.0)) == 1
    sie = ParametricLens(({"type": "SIE", "theta_e": 1.0, "q": 0.7, "pa_deg": 20.0},))
    quad = mock.lensed_images(sie, (0.02, 0.01), half_size=3.0)
    assert len(quad) == 4
    for im in quad:
        bx, by = sie.ray_shoot(im["theta_x"], im["theta_y"])
        assert (float(bx), float(by)) == pytest.approx((0.02, 0.01), abs=1e-7)
        assert im["mu"] == pytest.approx(float(sie.magnification(im["theta_x"], im["theta_y"])))


@pytest.fixture(scope="module")
def strong_grid():
    return mock.strong_lensing_specs(6)


def test_strong_lensing_grid_is_deterministic_and_prefix_stable(strong_grid):
    assert mock.strong_lensing_specs(3) == strong_grid[:3]
    assert mock.strong_lensing_specs(2, seed=1) != strong_grid[:2]
    assert [s.lens.components[0]["type"] for s in strong_grid] == ["SIS", "SIE"] * 3
    assert [s.lens.components[-1]["type"] for s in strong_grid[1::2]] == ["SHEAR"] * 3
    assert len({s.name for s in strong_grid}) == 6


def test_strong_lensing_grid_meets_the_issue_21_ranges(strong_grid):
    mus = []
    for spec in strong_grid:
        assert any(lo <= spec.redshift <= hi for lo, hi in mock.STRONG_LENSING_Z_WINDOWS)
        assert spec.bands == ("YJ", "H", "K")
        assert 0.45 <= spec.psf_fwhm_arcsec <= 0.70 and 8 <= spec.snr_halpha_peak <= 40
        assert not spec.noiseless
        half = 0.5 * spec.shape[0] * spec.pixel_scale_arcsec
        assert mock.STRONG_LENSING_MIN_SIDE <= spec.shape[0] == spec.shape[1] <= 30
        assert spec.lens_map_size_arcsec > spec.shape[0] * spec.pixel_scale_arcsec + 1
        images = mock.lensed_images(spec.lens, spec.centre_offset_arcsec, half_size=half + 1)
        assert 2 <= len(images) <= 4
        for im in images:  # every image (the counter-image too) inside the cube
            assert max(abs(im["theta_x"]), abs(im["theta_y"])) \
                <= half - mock.STRONG_LENSING_CUBE_MARGIN_ARCSEC + 1e-9
        mus.append(mock.halpha_magnification(spec))
    assert mus[0] == pytest.approx(mock.make_mock(strong_grid[0]).truth["mu"], rel=1e-9)
    assert 1.8 < min(mus) and max(mus) < 40 and max(mus) > 15
    assert any(len(mock.lensed_images(s.lens, s.centre_offset_arcsec, half_size=4.0)) == 4
               for s in strong_grid)

"""One fit path (issue 15), Monte-Carlo refits, WCS band placement and the sky mask (issue 21).

Each test compares with a closed form, the truth of a mock, or the other code path
that must give the same numbers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
from astropy.io import fits
from scipy import ndimage

from klever_nb import align, cli, constants, fitting, mock, pipeline, sky
from klever_nb.config import load_galaxy
from klever_nb.errors import ConfigError
from klever_nb.fitting import FitSettings
from klever_nb.io import mockfiles

C = constants.C_KMS
K_WAVE = np.linspace(1.92, 2.46, 2048)
R_K = 4227.0
Z = 2.2


# ---------------------------------------------------------------------------
# Task 1: klever-nb fit and klever-nb run share one fit path
# ---------------------------------------------------------------------------
def test_fit_command_and_run_give_identical_maps_for_the_same_cube(tmp_path):
    spec = mock.demo_specs()[1]  # z = 2.2, YJ/H/K
    toml = mockfiles.write_mock(mock.make_mock(spec), tmp_path / "in")
    cfg = load_galaxy(toml)
    run_maps = pipeline._fit_stage(pipeline.read_galaxy_cubes(cfg), cfg).data  # line_maps.nc
    z_run = run_maps.attrs["redshift"]
    lines = [str(n) for n in run_maps["line"].values
             if run_maps["band"].sel(line=n).item() == "H"]
    assert len(lines) >= 2
    cube_path = next((toml.parent / "cubes").glob("*_H.fits"))
    status = cli.main(["fit", str(cube_path), "--redshift", repr(z_run), "--out",
                       str(tmp_path / "fit"), "--lines", ",".join(lines),
                       "--smooth-fwhm", repr(cfg.analysis.smooth_fwhm_arcsec)])
    assert status == 0
    fit_maps = xr.open_dataset(tmp_path / "fit" / cube_path.stem / "line_maps.nc").load()
    # run moved H by its registration shift; move the fit's maps the same way
    shift = json.loads(run_maps.attrs["alignment_shifts"])["H"]
    fit_maps = align.apply_offsets(fit_maps, tuple(shift))
    for name in ("flux", "flux_err", "velocity"):
        a = run_maps[name].sel(line=lines).values
        b = fit_maps[name].sel(line=lines).values
        np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b))
        ok = np.isfinite(a)
        assert ok.sum() > 100
        scale = np.nanmax(np.abs(a)) if name == "velocity" else np.abs(a[ok])
        assert np.max(np.abs(a[ok] - b[ok]) / scale) < 1e-6, name


def test_fit_settings_are_one_frozen_object_and_validated():
    s = FitSettings()
    with pytest.raises(AttributeError):
        s.mask_sky = False  # type: ignore[misc]
    with pytest.raises(ConfigError, match="velocity_range"):
        FitSettings(velocity_range_kms=(100.0, -100.0))
    cube = xr.Dataset({"flux": (("wave", "y", "x"), np.ones((2048, 1, 1))),
                       "noise": (("wave", "y", "x"), np.ones((2048, 1, 1)))},
                      coords={"wave": K_WAVE})
    with pytest.raises(TypeError):
        fitting.fit_cube(cube, redshift=Z, mask_sky=False)  # options live in FitSettings only


# ---------------------------------------------------------------------------
# Task 2: Monte-Carlo refits use the main fit's settings and fallback kinematics
# ---------------------------------------------------------------------------
def _pixel_gauss(wave_um, flux, lam0, sig_aa):
    from scipy.stats import norm

    wave = wave_um * 1e4
    mid = 0.5 * (wave[1:] + wave[:-1])
    edges = np.concatenate([[2 * wave[0] - mid[0]], mid, [2 * wave[-1] - mid[-1]]])
    cdf = norm.cdf((edges[None, :] - lam0[:, None]) / sig_aa[:, None])
    return flux[:, None] * np.diff(cdf, axis=1) / np.diff(edges)[None, :]


def test_monte_carlo_errors_of_weak_lines_use_the_fallback_kinematics():
    """A weak Halpha (SNR ~ 2, below kinematics_snr = 5) gets fixed kinematics in the main
    fit; its MC refits must fix them the same way, so that flux_err_mc matches flux_err
    (the linear least-squares error at fixed kinematics). Before, the refits dropped
    the fallback and every forced flux: flux_err_mc was NaN there."""
    rng = np.random.default_rng(3)
    n = 60
    lam0 = np.full(n, constants.LINES["Halpha"].wave_vac * (1 + Z))
    sig_aa = np.hypot(lam0 * 80.0 / C, lam0 / (R_K * constants.FWHM_PER_SIGMA))
    flux = _pixel_gauss(K_WAVE, np.full(n, 12.0), lam0, sig_aa) + 1.0
    flux += rng.standard_normal(flux.shape)
    cube = xr.Dataset({"flux": (("wave", "y", "x"), flux.T.reshape(-1, 1, n)),
                       "noise": (("wave", "y", "x"), np.ones((2048, 1, n)))},
                      coords={"wave": K_WAVE},
                      attrs={"band": "K", "instrument": "KMOS", "resolving_power": R_K})
    settings = FitSettings(mask_sky=False, monte_carlo=60, seed=2)
    ds = fitting.fit_cube(cube, redshift=Z, settings=settings, lines=("Halpha",),
                          fallback_kinematics={"halpha": (0.0, 80.0)})
    forced = ds.kinematics_forced.sel(line="Halpha").values.ravel()
    assert forced.mean() > 0.8
    ratio = (ds.flux_err_mc / ds.flux_err).sel(line="Halpha").values.ravel()[forced]
    assert np.all(np.isfinite(ratio))
    # 60 draws: each ratio scatters by ~9 %; the median of ~50 spaxels by ~2 %
    assert 0.9 < np.median(ratio) < 1.1


# ---------------------------------------------------------------------------
# Task 3: bands placed through their WCS, then refined by cross-correlation
# ---------------------------------------------------------------------------
def _header(crval1, crval2, scale_deg=0.2 / 3600, crpix=(12.5, 12.5)):
    h = fits.Header()
    h.update(WCSAXES=2, CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CUNIT1="deg", CUNIT2="deg",
             CRPIX1=crpix[0], CRPIX2=crpix[1], CRVAL1=crval1, CRVAL2=crval2,
             CD1_1=-scale_deg, CD1_2=0.0, CD2_1=0.0, CD2_2=scale_deg)
    return h.tostring()


def _maps_with_blob(cy, cx, shape=(30, 30)):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    img = 100 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 2.0**2))
    img2 = img + 5 * np.exp(-((yy - cy - 4) ** 2 + (xx - cx + 3) ** 2) / 2.0)
    return xr.Dataset({"continuum_image": (("y", "x"), img2),
                       "flux": (("line", "y", "x"), img2[None]),
                       "fit_ok": (("line", "y", "x"), np.ones((1, *shape), bool))},
                      coords={"line": ["Halpha"]})


def test_wcs_places_a_band_offset_by_seven_spaxels_then_refines():
    ra0, dec0 = 150.0, 2.0
    scale = 0.2 / 3600
    ref = _maps_with_blob(14.3, 15.2)
    # the same source on the other band's pixel grid: its pointing was 1.4" (7 spaxels)
    # north and a fraction east, so the source sits 7.0 + 0.35 lower in y, 0.3 in x
    true_shift = (7.35, -0.3)  # (dy, dx) that moves the band onto the reference grid
    band = _maps_with_blob(14.3 - true_shift[0], 15.2 - true_shift[1])
    # the band's WCS says so, but only to the nearest half spaxel (pointing error)
    wcs_dy, wcs_dx = 7.0, -0.5
    cos_dec = np.cos(np.radians(dec0))
    hdr_ref = _header(ra0, dec0)
    hdr_band = _header(ra0 + wcs_dx * scale / cos_dec, dec0 + wcs_dy * scale)
    # RA increases to -x (CD1_1 < 0): crval shifted by +dx*scale moves the grid by -dx...
    out = align.register_bands({"K": ref, "H": band}, wcs_by_band={"K": hdr_ref, "H": hdr_band},
                               reference_band="K")
    wcs = out["wcs"]["H"]
    assert wcs[0] == pytest.approx(wcs_dy, abs=0.01)
    assert abs(abs(wcs[1]) - 0.5) < 0.01
    total = out["total"]["H"]
    assert total[0] == pytest.approx(true_shift[0], abs=0.1)
    assert total[1] == pytest.approx(true_shift[1], abs=0.1)
    # without the WCS the +-3 pixel cross-correlation cannot reach it
    blind = align.band_offsets({"K": ref, "H": band}, reference_band="K")["H"]
    assert abs(blind[0] - true_shift[0]) > 3


def test_fit_galaxy_recovers_a_band_pointed_1p4_arcsec_away():
    spec = mock.demo_specs()[1]
    galaxy = mock.make_mock(spec)
    tree = galaxy.cubes.copy()
    h = tree["H"].to_dataset()
    true = (-7.0, 0.4)  # the H data really sit 7 spaxels (1.4") lower and 0.4 right
    moved = h.copy()
    for var in ("flux", "noise"):
        vals = ndimage.shift(h[var].values, (0, *true), order=1, mode="nearest")
        moved[var] = (h[var].dims, vals, h[var].attrs)
    hdr = fits.Header.fromstring(h.attrs["wcs"])
    # the sky at pixel p of the old grid is now at p + true: CRPIX moves with the data
    hdr["CRPIX1"] += true[1]
    hdr["CRPIX2"] += true[0]
    moved.attrs["wcs"] = hdr.tostring()
    tree["H"] = moved
    maps, _ = fitting.fit_galaxy(tree, redshift=spec.redshift,
                                 lines=("OII_3727", "Halpha", "OIII_5007", "Hbeta", "NII_6584"))
    shifts = json.loads(maps.attrs["alignment_shifts"])
    wcs = json.loads(maps.attrs["alignment_wcs_offsets"])
    refine = json.loads(maps.attrs["alignment_refinement"])
    ref = maps.attrs["alignment_reference"]
    assert ref != "H"  # the reference is the most significant feature (YJ on this mock)
    # H must move by -true onto the reference grid: the WCS gets it exactly, the
    # cross-correlation only refines (measured 0.03 pixel)
    assert np.subtract(shifts["H"], shifts[ref]) == pytest.approx([-true[0], -true[1]],
                                                                  abs=0.1)
    for other in ("YJ", "K"):
        assert np.subtract(wcs["H"], wcs[other]) == pytest.approx([-true[0], -true[1]],
                                                                  abs=1e-6)
    assert np.all(np.abs(refine["H"]) < 0.1)
    table = maps["band_shift"]
    np.testing.assert_allclose(table.sel(bands="H", step="total").values, shifts["H"])
    np.testing.assert_allclose(table.sel(bands="H", step="total").values,
                               table.sel(bands="H", step="wcs").values
                               + table.sel(bands="H", step="refinement").values)


# ---------------------------------------------------------------------------
# Task 4: sky mask on one amplitude scale; the widget shows the fit's mask
# ---------------------------------------------------------------------------
def test_oh_lists_are_put_on_one_scale_where_they_overlap():
    wave, amp, source = sky._oh_table()
    factors = sky.list_scale_factors()
    assert factors["MOSFIRE_H"] == 1.0
    for blue, red in (("MOSFIRE_Y", "MOSFIRE_J"), ("MOSFIRE_J", "MOSFIRE_H"),
                      ("MOSFIRE_H", "MOSFIRE_K")):
        wb, ab = wave[source == blue], amp[source == blue] * factors[blue]
        wr, ar = wave[source == red], amp[source == red] * factors[red]
        d = np.abs(wb[:, None] - wr[None, :])
        i, j = np.nonzero((d <= 1.0) & (d == d.min(axis=1, keepdims=True)))
        assert i.size >= 2
        # the same OH line has the same amplitude from both lists (within 0.01 dex median)
        assert abs(np.median(np.log10(ar[j] / ab[i]))) < 0.01


def test_masked_fraction_per_kmos_band_means_one_sky_brightness():
    threshold = sky.MASK_MIN_RELATIVE_AMPLITUDE * sky.reference_amplitude()
    w_all, a_all = sky.load_oh_lines()
    fractions = {}
    for name in ("YJ", "H", "K"):
        band = constants.INSTRUMENTS["KMOS"].bands[name]
        wave = np.linspace(band.wave_min, band.wave_max, 2048)
        mask = sky.sky_mask(wave, resolving_power=band.resolving_power)
        fractions[name] = mask.mean()
        inside = (w_all >= band.wave_min) & (w_all <= band.wave_max)
        masked_lines = sky.bright_oh_lines(band.wave_min, band.wave_max)
        # exactly the lines above one absolute threshold, in every band
        np.testing.assert_array_equal(masked_lines, w_all[inside & (a_all >= threshold)])
        # the channel of every such line is masked, a line-free channel is not
        idx = np.clip(np.searchsorted(wave, masked_lines), 0, wave.size - 1)
        assert mask[idx].all()
    # measured: YJ 4.3 %, H 16 %, K 6.4 %; H (the brightest OH forest) masks the most
    assert all(0.02 < f < 0.25 for f in fractions.values()), fractions
    assert fractions["H"] > fractions["K"] > fractions["YJ"]


def test_mask_by_common_scale_still_covers_the_observed_k_sky():
    wave, flux = sky.observed_sky_k()
    mask = sky.sky_mask(wave, resolving_power=4227.0)
    # masked channels are where the observed sky is bright (the unmasked median is the
    # thermal K continuum): measured 0.26 against 0.10
    assert np.median(flux[mask]) > 2 * np.median(flux[~mask])


def test_line_fit_widget_shows_the_mask_the_fit_used():
    from klever_nb.widgets.linefit import LineFitExplorer

    galaxy = mock.make_mock(mock.demo_specs()[0])
    cube = galaxy.cubes["H"].to_dataset()
    # an unknown R: the fit falls back to the band's R; the widget used to show no mask
    cube.attrs.pop("resolving_power", None)
    settings = {"sky_min_relative_amplitude": 0.01}
    ex = LineFitExplorer(cube, redshift=galaxy.spec.redshift, smooth_fwhm=0.0,
                         line="Halpha", fit_kwargs=settings)
    shown = ex._fit_entry(ex.band)["sky_mask"]
    used = fitting.fit_sky_mask(cube, FitSettings(**settings))
    np.testing.assert_array_equal(shown, used)
    assert used.any()
    spec = ex.spectrum
    sel = np.isin(cube["wave"].values, spec["wave"].values)
    np.testing.assert_array_equal(spec["sky_mask"].values, used[sel])
    assert ex.maps.attrs["sky_channels_masked"] == int(used.sum())

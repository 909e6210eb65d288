"""IFU cube readers: every layout, a convention matrix, air/vacuum, masks, units and bad input.

Each file is a hand-built astropy HDU list of one physical cube (a Gaussian emission
line on a sloped continuum, known analytically as a function of *vacuum* wavelength),
so every reader result is compared with the closed-form truth at the wavelengths it
returns. References: issues 3 and 12; FACTS.md §6 (air/vacuum), §8 (KMOS format).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits

from klever_nb.constants import C_KMS, INSTRUMENTS, LINES
from klever_nb.errors import ConfigError, InputError
from klever_nb.io import open_cube
from klever_nb.io.cubes import (
    WavelengthMediumWarning,
    air_to_vacuum,
    estimate_noise,
    vacuum_to_air,
)

DATA_DIR = Path(__file__).parent / "data"

# --- the physical cube -------------------------------------------------------
NY, NX, NWAVE = 5, 6, 300
PIX_ARCSEC = 0.2
REDSHIFT = 2.3
LINE_UM = LINES["Halpha"].wave_vac * (1 + REDSHIFT) / 1e4  # ≈ 2.1663 µm (vacuum)
WAVE0_UM, DWAVE_UM = 2.10, 2.5e-4  # a KMOS-K-like linear vacuum grid, 2.100–2.175 µm
SCALE = 1e-20  # erg/s/cm2/Å per spaxel, the "1e-20" of BUNIT


def noisy_ones(shape, dtype=np.float32) -> np.ndarray:
    """Ones with 5 % Gaussian noise: a cube without NOISE needs data whose noise can be
    estimated (a constant cube has none and is rejected as unusable)."""
    return (1.0 + 0.05 * np.random.default_rng(0).standard_normal(shape)).astype(dtype)


def vacuum_grid() -> np.ndarray:
    return WAVE0_UM + DWAVE_UM * np.arange(NWAVE)


def model_flux(wave_um: np.ndarray) -> np.ndarray:
    """Truth in units of 1e-20 erg/s/cm2/Å per spaxel at vacuum wavelengths ``wave_um``."""
    yy, xx = np.mgrid[0:NY, 0:NX]
    continuum = 2.0 + 0.3 * xx + 0.1 * yy
    amplitude = 10.0 * np.exp(-((xx - 2.5) ** 2 + (yy - 2.0) ** 2) / 4.0)
    w = wave_um[:, None, None]
    sigma_um = LINE_UM * 80.0 / C_KMS
    return (continuum * (1.0 + 0.5 * (w - WAVE0_UM))
            + amplitude * np.exp(-0.5 * ((w - LINE_UM) / sigma_um) ** 2))


def model_sigma(wave_um: np.ndarray) -> np.ndarray:
    yy, xx = np.mgrid[0:NY, 0:NX]
    return (0.2 + 0.01 * xx + 0.02 * yy) * (1.0 + 0.1 * np.sin(wave_um[:, None, None] * 40))


def rotated_cd(theta_deg: float, scale_arcsec: float = PIX_ARCSEC) -> dict:
    t = np.deg2rad(theta_deg)
    s = scale_arcsec / 3600.0
    return {"CD1_1": -s * np.cos(t), "CD1_2": s * np.sin(t),
            "CD2_1": s * np.sin(t), "CD2_2": s * np.cos(t)}


def celestial(header: fits.Header, theta_deg: float = 0.0) -> None:
    header.update(CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CRVAL1=177.4, CRVAL2=22.4,
                  CRPIX1=3.0, CRPIX2=3.0, CUNIT1="deg", CUNIT2="deg", **rotated_cd(theta_deg))


def linear_spectral(header, *, ctype="WAVE", unit="um", cd=False, wave0=WAVE0_UM,
                    dwave=DWAVE_UM):
    factor = {"um": 1.0, "Angstrom": 1e4, "nm": 1e3, None: 1e4}[unit]
    header["CTYPE3"] = ctype
    if unit is not None:
        header["CUNIT3"] = unit
    header["CRVAL3"], header["CRPIX3"] = wave0 * factor, 1.0
    header["CD3_3" if cd else "CDELT3"] = dwave * factor


def image(data, name=None, **keys) -> fits.ImageHDU:
    hdu = fits.ImageHDU(np.asarray(data, dtype=np.float32 if data.ndim == 3 else data.dtype),
                        name=name)
    hdu.header.update(keys)
    return hdu


def write(tmp_path, name, hdus) -> Path:
    path = tmp_path / f"{name}.fits"
    fits.HDUList(hdus).writeto(path)
    return path


# --- writers: one per convention ---------------------------------------------
def kmos_combined_um(tmp_path):
    wave = vacuum_grid()
    primary = fits.PrimaryHDU()
    primary.header.update({"INSTRUME": "KMOS", "HIERARCH ESO INS GRAT1 ID": "K"})
    data = image(model_flux(wave), "DATA", BUNIT="1e-20 erg/s/cm2/Angstrom")
    celestial(data.header)
    linear_spectral(data.header)
    noise = image(model_sigma(wave), "NOISE", BUNIT="1e-20 erg/s/cm2/Angstrom")
    return write(tmp_path, "kmos_um", [primary, data, noise]), {}


def kmos_combined_angstrom_suffix(tmp_path):
    """``*.DATA``/``*.NOISE`` names, Å axis with CD3_3, BUNIT without scale (values × 1e-20)."""
    wave = vacuum_grid()
    data = image(model_flux(wave) * SCALE, "GAL_K.DATA", BUNIT="erg/s/cm2/Angstrom")
    celestial(data.header, 30.0)
    linear_spectral(data.header, unit="Angstrom", cd=True)
    noise = image(model_sigma(wave) * SCALE, "GAL_K.NOISE")
    return write(tmp_path, "kmos_aa", [fits.PrimaryHDU(), data, noise]), {}


def kmos_per_ifu(tmp_path):
    """IFU.1..3; only IFU.2 holds data (1 and 3 disabled, empty)."""
    wave = vacuum_grid()
    hdus = [fits.PrimaryHDU()]
    hdus[0].header["INSTRUME"] = "KMOS"
    for n in (1, 2, 3):
        if n == 2:
            data = image(model_flux(wave), f"IFU.{n}.DATA", BUNIT="1e-20 erg/s/cm2/Angstrom")
            celestial(data.header)
            linear_spectral(data.header)
            noise = image(model_sigma(wave), f"IFU.{n}.NOISE")
        else:
            data, noise = fits.ImageHDU(name=f"IFU.{n}.DATA"), fits.ImageHDU(name=f"IFU.{n}.NOISE")
        hdus += [data, noise]
    return write(tmp_path, "kmos_ifu", hdus), {}


def sinfoni_with_noise(tmp_path):
    wave = vacuum_grid()
    primary = fits.PrimaryHDU(model_flux(wave).astype(np.float32))
    primary.header.update({"INSTRUME": "SINFONI", "HIERARCH ESO INS GRAT1 NAME": "K",
                           "BUNIT": "10**(-20)*erg/s/cm**2/Angstrom"})
    celestial(primary.header)
    linear_spectral(primary.header, unit="Angstrom")
    return write(tmp_path, "sinfoni", [primary, image(model_sigma(wave), "NOISE")]), {}


def muse_air(tmp_path):
    """MUSE: DATA + STAT (variance), AWAV in Å with CD3_3, rotated CD, 10**-20 BUNIT."""
    air0 = float(vacuum_to_air(WAVE0_UM))
    air = air0 + DWAVE_UM * np.arange(NWAVE)
    wave = air_to_vacuum(air)
    primary = fits.PrimaryHDU()
    primary.header["INSTRUME"] = "MUSE"
    data = image(model_flux(wave), "DATA", BUNIT="10**-20 Angstrom-1 cm-2 erg s-1")
    celestial(data.header, 42.0)
    linear_spectral(data.header, ctype="AWAV", unit="Angstrom", cd=True, wave0=air0)
    stat = image(model_sigma(wave) ** 2, "STAT", BUNIT="10**-40 Angstrom-2 cm-4 erg2 s-2")
    return write(tmp_path, "muse", [primary, data, stat]), {}


def jwst_mjy_sr(tmp_path):
    """NIRSpec s3d: SCI/ERR in MJy/sr, DQ (all zero here), µm WAVE axis."""
    wave = vacuum_grid()
    per_arcsec2 = u.Unit("1e-20 erg / (s cm2 Angstrom arcsec2)") / PIX_ARCSEC**2
    to_mjy_sr = (1.0 * per_arcsec2).to(
        u.MJy / u.sr, equivalencies=u.spectral_density(wave * u.um)).value[:, None, None]
    primary = fits.PrimaryHDU()
    primary.header.update(TELESCOP="JWST", INSTRUME="NIRSPEC", GRATING="G235H", FILTER="F170LP")
    sci = image(model_flux(wave) * to_mjy_sr, "SCI", BUNIT="MJy/sr")
    celestial(sci.header, 10.0)
    linear_spectral(sci.header)
    err = image(model_sigma(wave) * to_mjy_sr, "ERR", BUNIT="MJy/sr")
    dq = image(np.zeros((NWAVE, NY, NX), dtype=np.uint32), "DQ")
    return write(tmp_path, "jwst", [primary, sci, err, dq]), {}


def gmos_lambda_linear(tmp_path):
    """IRAF-style: SCI/ERR/MASK, LAMBDA without CUNIT3 (Å), CD3_3, LINEAR spatial, per arcsec²."""
    wave = vacuum_grid()
    primary = fits.PrimaryHDU()
    primary.header["INSTRUME"] = "GMOS-N"
    sci = image(model_flux(wave) / PIX_ARCSEC**2, "SCI",
                BUNIT="1e-20 erg/cm2/s/Angstrom/arcsec2", CTYPE1="LINEAR", CTYPE2="LINEAR",
                CD1_1=PIX_ARCSEC, CD2_2=PIX_ARCSEC, CRPIX1=1.0, CRPIX2=1.0)
    linear_spectral(sci.header, ctype="LAMBDA", unit=None, cd=True)
    err = image(model_sigma(wave) / PIX_ARCSEC**2, "ERR")
    mask = image(np.zeros((NWAVE, NY, NX), dtype=np.int16), "MASK")
    return write(tmp_path, "gmos", [primary, sci, err, mask]), {"wavelength_medium": "vacuum"}


def err_holding_variance(tmp_path):
    """A reduction that stores variance in ERR: noise_kind='variance' says so."""
    wave = vacuum_grid()
    sci = image(model_flux(wave), "SCI", BUNIT="1e-20 erg/s/cm2/Angstrom")
    celestial(sci.header)
    linear_spectral(sci.header)
    err = image(model_sigma(wave) ** 2, "ERR")
    return write(tmp_path, "err_var", [fits.PrimaryHDU(), sci, err]), {"noise_kind": "variance"}


def manga_wave_log(tmp_path):
    """MaNGA-like: FLUX/IVAR/MASK with CTYPE3 = WAVE-LOG (vacuum, Å)."""
    n = np.arange(NWAVE)
    ln_step = DWAVE_UM / WAVE0_UM
    wave = WAVE0_UM * np.exp(ln_step * n)  # WAVE-LOG: λ = λr exp(w/λr), w = (p - crpix) cdelt
    flux = image(model_flux(wave), "FLUX", BUNIT="1E-20 erg/s/cm^2/Ang/spaxel",
                 CTYPE3="WAVE-LOG", CUNIT3="Angstrom", CRVAL3=WAVE0_UM * 1e4, CRPIX3=1.0,
                 CDELT3=ln_step * WAVE0_UM * 1e4)
    celestial(flux.header)
    ivar = image(model_sigma(wave) ** -2, "IVAR")
    mask = image(np.zeros((NWAVE, NY, NX), dtype=np.int32), "MASK")
    return write(tmp_path, "manga_log", [fits.PrimaryHDU(), flux, ivar, mask]), {}


def manga_wave_table(tmp_path):
    """MaNGA-like with the wavelengths in a WAVE HDU (a 1-D image in Å, as MaNGA LOGCUBEs)."""
    wave = WAVE0_UM * 10 ** (1e-4 * np.arange(NWAVE) / 2.3)
    flux = image(model_flux(wave), "FLUX", BUNIT="1E-20 erg/s/cm^2/Ang/spaxel")
    celestial(flux.header)
    ivar = image(model_sigma(wave) ** -2, "IVAR")
    wave_hdu = fits.ImageHDU(wave * 1e4, name="WAVE")
    return write(tmp_path, "manga_tab", [fits.PrimaryHDU(), flux, ivar, wave_hdu]), {}


def manga_wave_bintable(tmp_path):
    """Same, the wavelengths in a binary-table column WAVE with TUNIT 'um'."""
    wave = WAVE0_UM + DWAVE_UM * np.arange(NWAVE) ** 1.01
    flux = image(model_flux(wave), "FLUX", BUNIT="1E-20 erg/s/cm^2/Ang/spaxel")
    ivar = image(model_sigma(wave) ** -2, "IVAR")
    table = fits.BinTableHDU.from_columns(
        [fits.Column(name="WAVE", format="D", unit="um", array=wave)], name="WAVE")
    return write(tmp_path, "manga_bintab", [fits.PrimaryHDU(), flux, ivar, table]), {}


CONVENTIONS = [kmos_combined_um, kmos_combined_angstrom_suffix, kmos_per_ifu,
               sinfoni_with_noise, muse_air, jwst_mjy_sr, gmos_lambda_linear,
               err_holding_variance, manga_wave_log, manga_wave_table, manga_wave_bintable]
LINEAR_VACUUM = {"kmos_combined_um", "kmos_combined_angstrom_suffix", "kmos_per_ifu",
                 "sinfoni_with_noise", "jwst_mjy_sr", "gmos_lambda_linear",
                 "err_holding_variance"}


def per_spaxel_factor(units: str, target: str) -> float:
    """Factor from ``units`` (per spaxel, per pixel or per arcsec²) to ``target`` per spaxel."""
    unit, target = u.Unit(units), u.Unit(target)
    if unit.is_equivalent(target / u.arcsec**2):
        return (unit * u.arcsec**2).to(target) * PIX_ARCSEC**2
    if unit.is_equivalent(target / u.pix):
        return (unit * u.pix).to(target)
    return unit.to(target)


def per_spaxel_1e20(cube) -> tuple[np.ndarray, np.ndarray]:
    """Flux and noise converted to the truth's unit (1e-20 erg/s/cm2/Å per spaxel)."""
    factor = per_spaxel_factor(cube.flux.attrs["units"], "1e-20 erg / (s cm2 Angstrom)")
    return cube.flux.values * factor, cube.noise.values * factor


# --- convention matrix -------------------------------------------------------
@pytest.mark.parametrize("writer", CONVENTIONS, ids=lambda w: w.__name__)
def test_every_convention_reads_back_the_same_physical_cube(tmp_path, writer):
    path, kwargs = writer(tmp_path)
    cube = open_cube(path, **kwargs)
    wave = cube.wave.values
    assert cube.flux.dims == ("wave", "y", "x") and cube.noise.dims == ("wave", "y", "x")
    assert cube.flux.dtype == np.float64 and cube.noise.dtype == np.float64
    assert np.all(np.diff(wave) > 0)
    if writer.__name__ in LINEAR_VACUUM:
        np.testing.assert_allclose(wave, vacuum_grid(), rtol=1e-12)
    flux, noise = per_spaxel_1e20(cube)
    # float32 storage: 1e-6 relative is the float32 round-off bound (6e-8) with margin.
    np.testing.assert_allclose(flux, model_flux(wave), rtol=1e-6)
    np.testing.assert_allclose(noise, model_sigma(wave), rtol=1e-6)
    assert cube.attrs["noise_estimated"] is False


def test_air_cube_lands_on_the_vacuum_line_and_misreading_it_is_80_kms_off(tmp_path):
    path, _ = muse_air(tmp_path)
    right = open_cube(path)
    with pytest.warns(WavelengthMediumWarning, match="AWAV"):
        wrong = open_cube(path, wavelength_medium="vacuum")  # deliberately misread as vacuum

    def centroid(cube):
        spec = cube.flux.isel(y=2, x=2) - cube.flux.isel(y=2, x=2).min()
        window = np.abs(cube.wave - LINE_UM) < 0.002
        return float((spec * cube.wave)[window].sum() / spec[window].sum())

    assert right.attrs["wavelength_medium_in_file"] == "air"
    assert abs(centroid(right) - LINE_UM) / LINE_UM * C_KMS < 1.0
    offset_kms = (LINE_UM - centroid(wrong)) / LINE_UM * C_KMS
    assert 75.0 < offset_kms < 90.0  # FACTS.md §6: ≈ 82 km/s in the near-IR


def test_air_to_vacuum_matches_the_facts_table():
    air = np.array([6562.80, 6583.45, 5006.84, 4861.33, 6716.44, 3726.03]) / 1e4
    vac = np.array([6564.61, 6585.27, 5008.24, 4862.69, 6718.29, 3727.09]) / 1e4
    np.testing.assert_allclose(air_to_vacuum(air) * 1e4, vac * 1e4, atol=0.02)
    assert (air_to_vacuum(2.2) - 2.2) * 1e4 == pytest.approx(6.0, abs=0.05)
    grid = np.linspace(0.35, 5.0, 1000)
    np.testing.assert_allclose(vacuum_to_air(air_to_vacuum(grid)), grid, rtol=1e-14)


# --- layouts and attributes --------------------------------------------------
def test_kmos_combined_attrs_band_resolving_power_and_wcs(tmp_path):
    cube = open_cube(kmos_combined_um(tmp_path)[0])
    assert cube.attrs["instrument"] == "KMOS" and cube.attrs["band"] == "K"
    assert cube.attrs["resolving_power"] == INSTRUMENTS["KMOS"].bands["K"].resolving_power
    assert cube.attrs["pixel_scale_arcsec"] == pytest.approx(PIX_ARCSEC, rel=1e-12)
    assert "RA---TAN" in cube.attrs["wcs"] and cube.attrs["source_hdu"] == "DATA"
    assert cube.attrs["wavelength_medium_in_file"] == "vacuum"
    assert cube.attrs["wavelength_medium_assumed"] is False
    assert cube.flux.attrs["units"] == "1e-20 erg / (Angstrom s cm2)"
    assert cube.flux.attrs["units_original"] == "1e-20 erg/s/cm2/Angstrom"
    assert cube.attrs["noise_kind_in_file"] == "sigma"


def test_band_is_inferred_from_the_wavelength_range(tmp_path):
    wave = np.linspace(1.456, 1.846, 50)
    primary = fits.PrimaryHDU(noisy_ones((50, 3, 3), dtype=np.float32))
    primary.header["INSTRUME"] = "KMOS"
    linear_spectral(primary.header, wave0=wave[0], dwave=wave[1] - wave[0])
    cube = open_cube(write(tmp_path, "h", [primary]))
    assert cube.attrs["band"] == "H"
    assert cube.attrs["resolving_power"] == INSTRUMENTS["KMOS"].bands["H"].resolving_power
    override = open_cube(tmp_path / "h.fits", band="HK", instrument="sinfoni")
    assert override.attrs["instrument"] == "SINFONI" and override.attrs["band"] == "HK"


def test_bare_unknown_cube_has_unknown_instrument_nan_r_no_wcs(tmp_path):
    primary = fits.PrimaryHDU(noisy_ones((40, 3, 4), dtype=np.float32))
    linear_spectral(primary.header)
    cube = open_cube(write(tmp_path, "bare", [primary]))
    assert cube.attrs["instrument"] == "unknown" and cube.attrs["band"] == ""
    assert np.isnan(cube.attrs["resolving_power"])
    assert cube.attrs["wcs"] == "" and "pixel_scale_arcsec" not in cube.attrs
    assert cube.flux.attrs["units"] == "" and cube.attrs["noise_estimated"] is True


def test_per_ifu_auto_picks_the_only_ifu_with_data_and_reports_it(tmp_path):
    path, _ = kmos_per_ifu(tmp_path)
    cube = open_cube(path)
    assert cube.attrs["ifu"] == 2 and cube.attrs["source_hdu"] == "IFU.2.DATA"
    assert cube.attrs["instrument"] == "KMOS" and cube.attrs["band"] == "K"
    assert open_cube(path, ifu=2).attrs["ifu"] == 2


def test_gmos_linear_axes_have_no_pixel_scale_and_keep_surface_brightness(tmp_path):
    path, kwargs = gmos_lambda_linear(tmp_path)
    cube = open_cube(path, **kwargs)
    assert "pixel_scale_arcsec" not in cube.attrs and cube.attrs["wcs"] == ""
    assert u.Unit(cube.flux.attrs["units"]).is_equivalent(u.erg / u.s / u.cm**2 / u.AA / u.sr)
    assert cube.attrs["instrument"] == "GMOS"


def test_jwst_mjy_sr_becomes_flambda_per_arcsec2(tmp_path):
    cube = open_cube(jwst_mjy_sr(tmp_path)[0])
    assert u.Unit(cube.flux.attrs["units"]) == u.erg / u.s / u.cm**2 / u.AA / u.arcsec**2
    assert cube.flux.attrs["units_original"] == "MJy/sr"
    assert cube.attrs["instrument"] == "NIRSpec" and cube.attrs["band"] == "G235H/F170LP"
    # closed form: F_λ = F_ν c / λ²; 1 MJy/sr at 2 µm = 7.0494e-15 erg/s/cm²/Å/arcsec²
    one = (1 * u.MJy / u.sr * u.arcsec**2).to(
        u.erg / u.s / u.cm**2 / u.AA, u.spectral_density(2 * u.um)).value
    assert one == pytest.approx(1e-23 * 1e6 / 4.25451703e10 * 2.99792458e18 / 2e4**2, rel=1e-6)


def test_lambda_axis_medium_assumed_from_wavelength_with_warning(tmp_path):
    optical = fits.PrimaryHDU(noisy_ones((30, 2, 2), dtype=np.float32))
    linear_spectral(optical.header, ctype="LAMBDA", unit=None, wave0=0.65, dwave=1e-4)
    path = write(tmp_path, "optical", [optical])
    with pytest.warns(WavelengthMediumWarning, match="assuming air"):
        cube = open_cube(path)
    assert cube.attrs["wavelength_medium_in_file"] == "air"
    assert cube.attrs["wavelength_medium_assumed"] is True
    np.testing.assert_allclose(cube.wave, air_to_vacuum(0.65 + 1e-4 * np.arange(30)), rtol=1e-13)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        told = open_cube(path, wavelength_medium="vacuum")
    np.testing.assert_allclose(told.wave, 0.65 + 1e-4 * np.arange(30), rtol=1e-13)
    assert told.attrs["wavelength_medium_assumed"] is False
    nir = fits.PrimaryHDU(noisy_ones((30, 2, 2), dtype=np.float32))
    linear_spectral(nir.header, ctype="LAMBDA", unit=None)
    with pytest.warns(WavelengthMediumWarning, match="assuming vacuum"):
        assert open_cube(write(tmp_path, "nir", [nir])).attrs["wavelength_medium_in_file"] == \
            "vacuum"


def test_decreasing_wavelengths_are_flipped(tmp_path):
    wave = vacuum_grid()[::-1]
    primary = fits.PrimaryHDU(model_flux(wave).astype(np.float32))
    linear_spectral(primary.header, wave0=wave[0], dwave=-DWAVE_UM)
    cube = open_cube(write(tmp_path, "flip", [primary, image(model_sigma(wave), "NOISE")]))
    np.testing.assert_allclose(cube.wave, vacuum_grid(), rtol=1e-12)
    np.testing.assert_allclose(cube.flux, model_flux(cube.wave.values), rtol=1e-6)


@pytest.mark.parametrize("theta", [0.0, 17.0, 42.0, 133.0])
def test_pixel_scale_of_a_rotated_cd_matrix_equals_the_unrotated_one(tmp_path, theta):
    primary = fits.PrimaryHDU(noisy_ones((10, 3, 3), dtype=np.float32))
    celestial(primary.header, theta)
    linear_spectral(primary.header)
    cube = open_cube(write(tmp_path, f"rot{theta}", [primary]))
    assert cube.attrs["pixel_scale_arcsec"] == pytest.approx(PIX_ARCSEC, rel=1e-12)


def test_pixel_scale_from_pc_and_cdelt(tmp_path):
    primary = fits.PrimaryHDU(noisy_ones((10, 3, 3), dtype=np.float32))
    t = np.deg2rad(25.0)
    primary.header.update(CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CRVAL1=10.0, CRVAL2=-5.0,
                          CDELT1=-0.25 / 3600, CDELT2=0.25 / 3600, PC1_1=np.cos(t),
                          PC1_2=-np.sin(t), PC2_1=np.sin(t), PC2_2=np.cos(t))
    linear_spectral(primary.header)
    cube = open_cube(write(tmp_path, "pc", [primary]))
    assert cube.attrs["pixel_scale_arcsec"] == pytest.approx(0.25, rel=1e-12)


# --- masks -------------------------------------------------------------------
def test_masks_nan_and_nonpositive_noise_become_nan_in_flux_and_noise(tmp_path):
    wave = vacuum_grid()
    flux, sigma = model_flux(wave), model_sigma(wave)
    flux[10, 0, 0] = np.nan
    sigma[11, 1, 1] = 0.0
    sigma[12, 1, 2] = -1.0
    sigma[13, 2, 2] = np.inf
    dq = np.zeros(flux.shape, dtype=np.uint32)
    dq[14, 3, 3] = 513
    sci = image(flux, "SCI", BUNIT="1e-20 erg/s/cm2/Angstrom")
    linear_spectral(sci.header)
    path = write(tmp_path, "masked", [fits.PrimaryHDU(), sci, image(sigma, "ERR"),
                                      image(dq, "DQ")])
    cube = open_cube(path)
    bad = [(10, 0, 0), (11, 1, 1), (12, 1, 2), (13, 2, 2), (14, 3, 3)]
    for index in bad:
        assert np.isnan(cube.flux.values[index]) and np.isnan(cube.noise.values[index])
    assert int(np.isnan(cube.flux.values).sum()) == len(bad)
    assert cube.attrs["mask_hdu"] == "DQ"


def test_fieldmap_zero_masks_spaxels_and_manga_mask_nonzero(tmp_path):
    wave = vacuum_grid()
    data = image(model_flux(wave), "DATA", BUNIT="1e-20 erg/s/cm2/Angstrom")
    linear_spectral(data.header, ctype="AWAV")
    fieldmap = np.full((NY, NX), 4, dtype=np.int16)
    fieldmap[0, 1] = 0
    path = write(tmp_path, "fieldmap", [fits.PrimaryHDU(), data,
                                        image(model_sigma(wave) ** 2, "STAT"),
                                        image(fieldmap, "FIELDMAP")])
    cube = open_cube(path)
    assert np.isnan(cube.flux.values[:, 0, 1]).all() and np.isnan(cube.noise.values[:, 0, 1]).all()
    assert int(np.isnan(cube.flux.values).sum()) == NWAVE

    manga_path, _ = manga_wave_log(tmp_path)
    with fits.open(manga_path, mode="update") as hdul:
        hdul["MASK"].data[:, 4, 5] = 1024  # DONOTUSE
        hdul["IVAR"].data[7, 0, 0] = 0.0  # no data
    cube = open_cube(manga_path)
    assert np.isnan(cube.flux.values[:, 4, 5]).all() and np.isnan(cube.flux.values[7, 0, 0])
    assert int(np.isnan(cube.noise.values).sum()) == NWAVE + 1


# --- SINFONI without noise: estimated per wavelength ------------------------
def test_sinfoni_without_noise_gets_a_per_channel_estimate_within_10_percent(tmp_path):
    rng = np.random.default_rng(3)
    n_wave, ny, nx = 400, 32, 32
    wave = 2.0 + 2.5e-4 * np.arange(n_wave)
    sigma_true = 0.5 * (1.0 + 0.6 * np.sin(np.arange(n_wave) / 40.0) ** 2)
    yy, xx = np.mgrid[0:ny, 0:nx]
    signal = (5.0 + 0.2 * xx)[None] * (1 + 0.3 * (wave[:, None, None] - 2.0))
    line = 40.0 * np.exp(-((xx - 16) ** 2 + (yy - 16) ** 2) / 6.0)[None] \
        * np.exp(-0.5 * ((wave[:, None, None] - 2.05) / 4e-4) ** 2)
    flux = signal + line + rng.normal(size=(n_wave, ny, nx)) * sigma_true[:, None, None]
    primary = fits.PrimaryHDU(flux.astype(np.float32))
    primary.header.update({"INSTRUME": "SINFONI", "HIERARCH ESO INS GRAT1 NAME": "H+K"})
    linear_spectral(primary.header, wave0=2.0, dwave=2.5e-4)
    cube = open_cube(write(tmp_path, "sinfoni_bare", [primary]))
    assert cube.attrs["noise_estimated"] is True and "MAD" in cube.attrs["noise_method"]
    assert cube.attrs["noise_kind_in_file"] == "none" and cube.attrs["band"] == "HK"
    ratio = cube.noise.values[:, 0, 0] / sigma_true
    assert np.median(np.abs(ratio - 1)) < 0.05 and np.max(np.abs(ratio - 1)) < 0.2
    assert np.allclose(cube.noise.values, cube.noise.values[:, :1, :1])  # per channel only
    assert estimate_noise(flux[:, :4, :4]).shape == (n_wave,)


# --- a real cube shipped in a wheel: MPDAF's MUSE UDF test cube -----------------
def test_real_muse_cutout_from_mpdaf_reads_sensibly():
    path = DATA_DIR / "mpdaf_udf_muse_cutout.fits"
    cube = open_cube(path)
    assert cube.flux.shape == (100, 10, 10)
    assert cube.attrs["instrument"] == "MUSE" and cube.attrs["noise_kind_in_file"] == "variance"
    assert cube.attrs["wavelength_medium_in_file"] == "air"
    first_air_um = (4750.0 + 150 * 1.25) / 1e4  # CRVAL3 + (151 - CRPIX3) CD3_3 of the original
    assert cube.wave.values[0] == pytest.approx(float(air_to_vacuum(first_air_um)), rel=1e-12)
    assert (cube.wave.values[0] - first_air_um) * 1e4 == pytest.approx(1.38, abs=0.02)
    assert cube.attrs["pixel_scale_arcsec"] == pytest.approx(0.2, rel=1e-6)  # MUSE WFM
    assert cube.flux.attrs["units"] == "1e-20 erg / (Angstrom s cm2)"
    with fits.open(path) as hdul:
        np.testing.assert_allclose(cube.noise.values, np.sqrt(hdul["STAT"].data), rtol=1e-6)
    assert np.isfinite(cube.flux.values).all()
    pulls = cube.flux.values / cube.noise.values  # faint continuum: pulls of order unity
    assert 0.5 < np.std(pulls) < 2.0


# --- bad input: one line, naming the file ------------------------------------
def one_line_naming(err, path) -> None:
    message = str(err.value)
    assert "\n" not in message
    assert Path(path).name in message


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found") as err:
        open_cube(tmp_path / "nope.fits")
    one_line_naming(err, "nope.fits")


def test_not_fits_and_truncated_fits(tmp_path):
    text = tmp_path / "notes.fits"
    text.write_text("this is not a FITS file\n" * 200)
    with pytest.raises(InputError, match="not a readable FITS") as err:
        open_cube(text)
    one_line_naming(err, text)
    path, _ = kmos_combined_um(tmp_path)
    blob = path.read_bytes()
    for size in (len(blob) // 2, 5000):  # inside the data; inside the DATA header
        cut = tmp_path / f"cut{size}.fits"
        cut.write_bytes(blob[:size])
        with pytest.raises(InputError, match="truncated") as err:
            open_cube(cut)
        one_line_naming(err, cut)


def test_no_cube_in_file(tmp_path):
    path = write(tmp_path, "image", [fits.PrimaryHDU(np.ones((4, 4)))])
    with pytest.raises(InputError, match="no 3-D") as err:
        open_cube(path)
    one_line_naming(err, path)


@pytest.mark.parametrize("ctype", [None, "FREQ", "VRAD"])
def test_no_spectral_axis(tmp_path, ctype):
    primary = fits.PrimaryHDU(np.ones((5, 2, 2), dtype=np.float32))
    if ctype:
        primary.header.update(CTYPE3=ctype, CRVAL3=1e11, CDELT3=1e6, CRPIX3=1)
    path = write(tmp_path, f"nospec_{ctype}", [primary])
    with pytest.raises(InputError, match="CTYPE3") as err:
        open_cube(path)
    one_line_naming(err, path)
    assert "PRIMARY" in str(err.value)


def test_unparseable_bunit(tmp_path):
    primary = fits.PrimaryHDU(np.ones((5, 2, 2), dtype=np.float32))
    linear_spectral(primary.header)
    primary.header["BUNIT"] = "furlongs per fortnight squared"
    path = write(tmp_path, "bunit", [primary])
    with pytest.raises(InputError, match="BUNIT") as err:
        open_cube(path)
    one_line_naming(err, path)


def test_noise_of_another_shape(tmp_path):
    data = image(np.ones((5, 3, 3)), "DATA")
    linear_spectral(data.header)
    path = write(tmp_path, "shape", [fits.PrimaryHDU(), data, image(np.ones((5, 3, 4)), "NOISE")])
    with pytest.raises(InputError, match="NOISE") as err:
        open_cube(path)
    one_line_naming(err, path)


def test_bad_keyword_values_are_config_errors(tmp_path):
    path, _ = kmos_combined_um(tmp_path)
    with pytest.raises(ConfigError, match="noise_kind") as err:
        open_cube(path, noise_kind="rms")
    one_line_naming(err, path)
    with pytest.raises(ConfigError, match="wavelength_medium") as err:
        open_cube(path, wavelength_medium="water")
    one_line_naming(err, path)


def test_per_ifu_errors_list_the_ifus_with_data(tmp_path):
    path, _ = kmos_per_ifu(tmp_path)
    for ifu, pattern in ((1, "IFU 1 is empty"), (9, "IFU 9 is not in the file")):
        with pytest.raises(InputError, match=pattern) as err:
            open_cube(path, ifu=ifu)
        one_line_naming(err, path)
        assert "IFUs with data: 2" in str(err.value)
    with fits.open(path) as hdul:  # enable IFU 3 as well: now ifu= is required
        hdus = [h.copy() for h in hdul]
    hdus[5] = hdus[3].copy()
    hdus[5].name = "IFU.3.DATA"
    hdus[6] = hdus[4].copy()
    hdus[6].name = "IFU.3.NOISE"
    two = write(tmp_path, "two_ifus", hdus)
    with pytest.raises(InputError, match=r"2 IFUs holding data \(2, 3\).*ifu=") as err:
        open_cube(two)
    one_line_naming(err, two)
    assert open_cube(two, ifu=3).attrs["source_hdu"] == "IFU.3.DATA"


def test_nm_axis_with_pc_cdelt_and_var_extension(tmp_path):
    """Bare primary cube, nm axis as PC3_3 × CDELT3, variance in a VAR HDU."""
    wave = vacuum_grid()
    primary = fits.PrimaryHDU(model_flux(wave).astype(np.float32))
    primary.header.update(CTYPE3="WAVE", CUNIT3="nm", CRVAL3=WAVE0_UM * 1e3, CRPIX3=1.0,
                          CDELT3=2.0, PC3_3=DWAVE_UM * 1e3 / 2.0, BUNIT="1e-20 erg/s/cm2/AA")
    cube = open_cube(write(tmp_path, "nm", [primary, image(model_sigma(wave) ** 2, "VAR")]))
    np.testing.assert_allclose(cube.wave, wave, rtol=1e-12)
    np.testing.assert_allclose(cube.flux, model_flux(wave), rtol=1e-6)
    np.testing.assert_allclose(cube.noise, model_sigma(wave), rtol=1e-6)
    assert cube.attrs["noise_kind_in_file"] == "variance" and cube.attrs["noise_hdu"] == "VAR"


def test_linear_spatial_axes_in_arcsec_still_give_a_pixel_scale(tmp_path):
    primary = fits.PrimaryHDU(noisy_ones((10, 3, 3), dtype=np.float32))
    t = np.deg2rad(30.0)
    primary.header.update(CTYPE1="LINEAR", CTYPE2="LINEAR", CUNIT1="arcsec", CUNIT2="arcsec",
                          CD1_1=0.1 * np.cos(t), CD1_2=-0.1 * np.sin(t),
                          CD2_1=0.1 * np.sin(t), CD2_2=0.1 * np.cos(t))
    linear_spectral(primary.header)
    cube = open_cube(write(tmp_path, "lin_arcsec", [primary]))
    assert cube.attrs["pixel_scale_arcsec"] == pytest.approx(0.1, rel=1e-12)
    assert cube.attrs["wcs"] == ""


def test_jwst_wave_tab_axis_reads_the_wcs_table(tmp_path):
    """NIRSpec/MIRI cubes on non-linear grids: CTYPE3 = 'WAVE-TAB' + a WCS-TABLE extension."""
    wave = WAVE0_UM + DWAVE_UM * np.arange(NWAVE) ** 1.02
    sci = image(model_flux(wave), "SCI", BUNIT="1e-20 erg/s/cm2/Angstrom", CTYPE3="WAVE-TAB",
                CUNIT3="um", PS3_0="WCS-TABLE", PS3_1="wavelength", CRPIX3=1.0, CDELT3=1.0)
    table = fits.BinTableHDU.from_columns(
        [fits.Column(name="wavelength", format=f"{NWAVE}D", dim=f"(1,{NWAVE})",
                     array=wave.reshape(1, NWAVE, 1))], name="WCS-TABLE")
    path = write(tmp_path, "tab", [fits.PrimaryHDU(), sci, image(model_sigma(wave), "ERR"), table])
    cube = open_cube(path)
    np.testing.assert_allclose(cube.wave, wave, rtol=1e-14)
    np.testing.assert_allclose(cube.flux, model_flux(wave), rtol=1e-6)
    assert cube.attrs["wavelength_medium_in_file"] == "vacuum"


def test_cube_survives_a_netcdf_round_trip_exactly(tmp_path):
    from klever_nb.io import read_netcdf, write_netcdf

    cube = open_cube(muse_air(tmp_path)[0])
    back = read_netcdf(write_netcdf(cube, tmp_path / "cube.nc"))
    xr = pytest.importorskip("xarray")
    xr.testing.assert_identical(cube, back)
    assert back.attrs["wavelength_medium_assumed"] is False


def test_ifu_given_for_a_combined_cube_is_an_error(tmp_path):
    path, _ = kmos_combined_um(tmp_path)
    with pytest.raises(InputError, match="ifu=3") as err:
        open_cube(path, ifu=3)
    one_line_naming(err, path)


def test_data_hdu_that_is_not_a_cube(tmp_path):
    path = write(tmp_path, "img", [fits.PrimaryHDU(), image(np.ones((4, 4)), "SCI")])
    with pytest.raises(InputError, match="NAXIS = 2") as err:
        open_cube(path)
    one_line_naming(err, path)
    assert "'SCI'" in str(err.value)


@pytest.mark.parametrize(("crval", "cdelt"), [(2.1, 2.5e-4), (21000.0, 2.5), (2.1e-6, 2.5e-10)])
def test_wave_axis_without_cunit3_takes_the_unit_from_the_values(tmp_path, crval, cdelt):
    primary = fits.PrimaryHDU(noisy_ones((10, 2, 2), dtype=np.float32))
    primary.header.update(CTYPE3="WAVE", CRVAL3=crval, CDELT3=cdelt, CRPIX3=1.0)
    cube = open_cube(write(tmp_path, f"nocunit{crval}", [primary]))
    np.testing.assert_allclose(cube.wave, 2.1 + 2.5e-4 * np.arange(10), rtol=1e-12)
    assert "assumed" in cube.attrs["wave_unit_in_file"]


def test_a_cube_with_a_broken_celestial_wcs_is_read_with_a_warning_naming_the_keys(tmp_path):
    """The spectra stay usable, but the reader says the sky position is lost (issue 15)."""
    import warnings

    from astropy.io import fits

    from klever_nb.io import open_cube

    data = noisy_ones((40, 5, 5), dtype=np.float32)
    header = fits.Header()
    header.update(CTYPE3="WAVE", CUNIT3="um", CRVAL3=2.0, CDELT3=0.0002, CRPIX3=1.0,
                  CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CRVAL1=10.0, CRVAL2=-95.0,
                  CDELT1=-5.5e-5, CDELT2=5.5e-5, CRPIX1=3.0, CRPIX2=3.0, BUNIT="erg/s/cm2/um",
                  PC1_1=0.0, PC1_2=0.0, PC2_1=0.0, PC2_2=0.0)  # singular: no celestial WCS
    path = tmp_path / "broken.fits"
    fits.HDUList([fits.PrimaryHDU(data, header=header)]).writeto(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cube = open_cube(path, noise_kind=None)
    assert cube.sizes["wave"] == 40
    messages = [str(w.message) for w in caught]
    assert any("celestial WCS" in m and "CRVAL1/2" in m for m in messages), messages


# --- lazy (memory-mapped, section) reading: issue 20 -------------------------------
@pytest.mark.parametrize("writer", CONVENTIONS,
                         ids=lambda f: f.__name__)
def test_lazy_read_gives_the_eager_numbers_for_every_layout(tmp_path, writer):
    """``open_cube(lazy=True)`` reads sections through a memory map and converts them exactly
    as the eager read does (masks, noise kind/units, f_nu factors, air->vacuum order)."""
    path, _ = writer(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = open_cube(path)
        lazy = open_cube(path, lazy=True)
    assert lazy.attrs["lazy"] and "lazy" not in eager.attrs
    np.testing.assert_array_equal(lazy.wave.values, eager.wave.values)
    ny, nx = eager.sizes["y"], eager.sizes["x"]
    picks = [dict(), dict(wave=[7, 2, 30], y=slice(1, ny), x=[0, nx - 1]),
             dict(wave=slice(3, 40, 3), y=ny // 2), dict(x=slice(1, None, 2))]
    for sel in picks:
        for name in ("flux", "noise"):
            np.testing.assert_array_equal(lazy[name].isel(**sel).values,
                                          eager[name].isel(**sel).values)


def test_lazy_noise_estimate_equals_the_eager_one(tmp_path):
    wave = vacuum_grid()
    rng = np.random.default_rng(4)
    flux = model_flux(wave) + rng.normal(0, 0.3, (wave.size, 5, 6))
    primary = fits.PrimaryHDU(flux.astype(np.float32))
    primary.header["BUNIT"] = "1e-20 erg/s/cm2/Angstrom"
    celestial(primary.header)
    linear_spectral(primary.header)
    path = write(tmp_path, "bare_noise", [primary])
    eager, lazy = open_cube(path), open_cube(path, lazy=True)
    assert eager.attrs["noise_estimated"] and lazy.attrs["noise_estimated"]
    np.testing.assert_allclose(lazy.noise.values, eager.noise.values, rtol=1e-12)


def test_gzip_cube_over_the_memory_budget_is_one_clear_error(tmp_path, monkeypatch):
    import gzip

    path, _ = kmos_combined_um(tmp_path)
    gz = tmp_path / "cube.fits.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert open_cube(gz, lazy=True).flux.shape == open_cube(path).flux.shape  # fits: read whole
    monkeypatch.setenv("KLEVER_NB_MEMORY_BUDGET_MB", "0.01")
    with pytest.raises(InputError, match="gzip-compressed FITS cannot be memory-mapped") as err:
        open_cube(gz, lazy=True)
    assert "\n" not in str(err.value)

"""Smoothing noise propagation (Monte Carlo), pseudo-fibre apertures, emission peaks."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from klever_nb import constants, spectra
from klever_nb.errors import ConfigError, InputError


def noise_cube(n_wave=4000, shape=(15, 15), seed=0, sigma=None):
    """Pure-noise cube: every channel is an independent realisation of the same noise map."""
    rng = np.random.default_rng(seed)
    if sigma is None:
        sigma = rng.uniform(0.5, 2.0, shape)
    noise = np.broadcast_to(sigma, (n_wave, *shape)).copy()
    flux = rng.standard_normal((n_wave, *shape)) * noise
    return xr.Dataset({"flux": (("wave", "y", "x"), flux), "noise": (("wave", "y", "x"), noise)},
                      coords={"wave": np.linspace(1.9, 2.4, n_wave)},
                      attrs={"pixel_scale_arcsec": 0.2, "band": "K", "resolving_power": 4227.0})


def test_smoothing_noise_propagation_matches_monte_carlo():
    cube = noise_cube()
    smooth = spectra.smooth_cube(cube, fwhm_arcsec=0.4)
    empirical = smooth.flux.std(dim="wave").values
    propagated = smooth.noise.isel(wave=0).values
    # 4000 realisations: the std of a std estimate is 1/sqrt(2*4000) = 1.1 %
    np.testing.assert_allclose(empirical, propagated, rtol=0.05)
    assert abs(np.median(empirical / propagated) - 1) < 0.01


def test_noise_correlation_scaling_is_the_large_aperture_factor():
    cube = noise_cube(sigma=np.ones((31, 31)), shape=(31, 31), n_wave=3000)
    smooth = spectra.smooth_cube(cube, fwhm_arcsec=0.4)
    kernel = spectra.gaussian_kernel(0.4 / (2 * np.sqrt(2 * np.log(2))) / 0.2)
    assert smooth.attrs["noise_correlation_scaling"] == pytest.approx(
        1 / np.sqrt(np.sum(kernel ** 2)), rel=1e-12)
    # a 13x13 box far from the edges: true scatter of the sum / naive quadrature sum
    box = (slice(None), slice(9, 22), slice(9, 22))
    total = smooth.flux.values[box].sum(axis=(1, 2))
    naive = np.sqrt((smooth.noise.values[box][0] ** 2).sum())
    ratio = total.std() / naive
    expected = smooth.attrs["noise_correlation_scaling"]
    assert ratio == pytest.approx(expected, rel=0.12)  # edge of the box leaks a little
    assert ratio > 0.8 * expected


def test_smoothing_is_nan_aware_and_keeps_constants():
    cube = noise_cube(n_wave=5, shape=(9, 9))
    cube["flux"].values[:] = 3.0
    cube["flux"].values[:, 4, 4] = np.nan
    smooth = spectra.smooth_cube(cube, fwhm_arcsec=0.4)
    values = smooth.flux.values
    assert np.all(np.isnan(values[:, 4, 4]))          # no data are invented
    finite = np.isfinite(values)
    assert finite.sum() == values.size - 5
    np.testing.assert_allclose(values[finite], 3.0, rtol=1e-12)  # normalised convolution


def test_zero_fwhm_is_a_copy_and_bad_values_raise():
    cube = noise_cube(n_wave=3, shape=(4, 4))
    same = spectra.smooth_cube(cube, fwhm_arcsec=0.0)
    np.testing.assert_array_equal(same.flux.values, cube.flux.values)
    assert same.attrs["noise_correlation_scaling"] == 1.0
    with pytest.raises(ConfigError):
        spectra.smooth_cube(cube, fwhm_arcsec=-1)
    del cube.attrs["pixel_scale_arcsec"]
    with pytest.raises(InputError, match="pixel_scale_arcsec"):
        spectra.smooth_cube(cube, fwhm_arcsec=0.4)


def test_pseudo_fibre_of_ones_sums_to_the_circle_area():
    cube = noise_cube(n_wave=3, shape=(21, 21), sigma=np.ones((21, 21)))
    cube["flux"].values[:] = 1.0
    spec = spectra.pseudo_fibre_spectrum(cube, radius_arcsec=0.6, centre=(10.3, 9.7))
    radius_pix = 0.6 / 0.2
    np.testing.assert_allclose(spec.flux.values, np.pi * radius_pix ** 2, rtol=1e-10)
    assert spec.flux.dims == ("wave",)
    assert spec.attrs["centre_yx"] == [10.3, 9.7]
    assert spec.attrs["radius"] == 0.6
    # noise in quadrature with the exact pixel fractions
    weights = spectra.aperture_weights((21, 21), (10.3, 9.7), radius_pix)
    np.testing.assert_allclose(spec.noise.values, np.sqrt(np.sum(weights ** 2)), rtol=1e-12)


def test_pseudo_fibre_noise_on_a_smoothed_cube_matches_monte_carlo():
    cube = noise_cube(sigma=np.ones((25, 25)), shape=(25, 25), n_wave=3000, seed=3)
    smooth = spectra.smooth_cube(cube, fwhm_arcsec=0.4)
    spec = spectra.pseudo_fibre_spectrum(smooth, radius_arcsec=0.6, centre=(12.0, 12.0))
    assert spec.attrs["noise_scaling_applied"] > 1.5
    ratio = spec.flux.std().item() / np.median(spec.noise.values)
    assert ratio == pytest.approx(1.0, abs=0.05)


def _blob_cube(centre, *, z=2.2, shape=(20, 20), line="Halpha", seed=0):
    rng = np.random.default_rng(seed)
    wave = np.linspace(1.92, 2.46, 2048)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    image = np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * 1.5 ** 2))
    lam = constants.LINES[line].wave_vac * (1 + z) / 1e4
    profile = np.exp(-0.5 * ((wave - lam) / 3e-4) ** 2)
    flux = 50 * profile[:, None, None] * image[None] + 0.05 * rng.standard_normal(
        (wave.size, *shape))
    return xr.Dataset({"flux": (("wave", "y", "x"), flux),
                       "noise": (("wave", "y", "x"), np.full_like(flux, 0.05))},
                      coords={"wave": wave},
                      attrs={"pixel_scale_arcsec": 0.2, "resolving_power": 4227.0})


def test_emission_peak_recovers_a_sub_pixel_centre():
    cube = _blob_cube((8.3, 11.6))
    y, x = spectra.emission_peak(cube, redshift=2.2)
    assert y == pytest.approx(8.3, abs=0.05)
    assert x == pytest.approx(11.6, abs=0.05)
    spec = spectra.pseudo_fibre_spectrum(cube, redshift=2.2)
    assert spec.attrs["centre_yx"] == pytest.approx([8.3, 11.6], abs=0.05)


def test_lazily_read_cube_gives_the_same_smoothing_fibre_and_peak(tmp_path):
    """On ``open_cube(lazy=True)`` smoothing is computed section by section (rows + a halo
    of the kernel's half width), the fibre reads the aperture's box, the peak image reads
    blocks of rows: the same numbers as on the cube in memory (issue 20)."""
    from astropy.io import fits

    from klever_nb.io import open_cube

    rng = np.random.default_rng(5)
    nw, ny, nx = 120, 23, 17
    wave = np.linspace(2.0, 2.2, nw)
    yy, xx = np.mgrid[0:ny, 0:nx]
    line = np.exp(-0.5 * ((wave - 2.1) / 0.002) ** 2)[:, None, None]
    flux = 3 * line * np.exp(-np.hypot(yy - 11.3, xx - 7.6) / 3)[None] + rng.normal(
        0, 0.2, (nw, ny, nx))
    flux[5, 3, 4] = np.nan
    header = {"CTYPE3": "WAVE", "CUNIT3": "um", "CRVAL3": 2.0, "CDELT3": wave[1] - wave[0],
              "CRPIX3": 1.0, "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CUNIT1": "deg",
              "CUNIT2": "deg", "CDELT1": -0.1 / 3600, "CDELT2": 0.1 / 3600,
              "BUNIT": "1e-20 erg/s/cm2/Angstrom"}
    data = fits.ImageHDU(flux.astype(np.float32), name="DATA")
    noise = fits.ImageHDU(np.full(flux.shape, 0.2, np.float32), name="NOISE")
    for hdu in (data, noise):
        hdu.header.update(header)
    path = tmp_path / "cube.fits"
    fits.HDUList([fits.PrimaryHDU(), data, noise]).writeto(path)
    eager, lazy = open_cube(path), open_cube(path, lazy=True)
    a = spectra.smooth_cube(eager, fwhm_arcsec=0.4)
    b = spectra.smooth_cube(lazy, fwhm_arcsec=0.4)
    assert b.attrs["noise_correlation_scaling"] == a.attrs["noise_correlation_scaling"]
    for sel in ({}, {"wave": [60, 3, 90], "y": slice(4, 9), "x": [0, 16]}, {"y": 22}):
        for name in ("flux", "noise"):
            np.testing.assert_allclose(b[name].isel(**sel).values, a[name].isel(**sel).values,
                                       rtol=1e-12, atol=1e-12, equal_nan=True)
    assert spectra.emission_peak(lazy, redshift=0.0, lines=None) == spectra.emission_peak(
        eager, redshift=0.0, lines=None)
    fa = spectra.pseudo_fibre_spectrum(a, radius_arcsec=0.35, centre=(11.0, 7.0))
    fb = spectra.pseudo_fibre_spectrum(b, radius_arcsec=0.35, centre=(11.0, 7.0))
    np.testing.assert_allclose(fb.flux.values, fa.flux.values, rtol=1e-12)
    np.testing.assert_allclose(fb.noise.values, fa.noise.values, rtol=1e-12)

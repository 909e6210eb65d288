"""Injection–recovery of the headline μ(Hα) on strongly lensed mocks, and the correlated-noise
error of sums over smoothed spaxels (issue 21).

Measured when written (32 mocks, 2 grids of 16 like the one below): forward μ median bias
−0.2 % and 0.0 %, bootstrap pulls std 0.29 and 0.81; the paper's μ(Hα) median bias −26 % and
−38 %.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import xarray as xr

from klever_nb import lensing as L
from klever_nb import mock
from klever_nb.lensing.forward import correlated_noise
from klever_nb.lensmodels import ParametricLens
from klever_nb.sfr import correlated_sum_error, total_halpha


def _specs(n: int, seed: int = 2) -> list[mock.MockSpec]:
    """SIS and SIE + shear lenses, random orientations, sources from near the caustic (μ ~ 25,
    four images) to outside (μ ~ 3, two images); every lens's Einstein ring lies in the cube."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        te = float(rng.uniform(0.7, 1.2))
        if i % 2 == 0:
            lens = ParametricLens(({"type": "SIS", "theta_e": te},))
        else:
            lens = ParametricLens((
                {"type": "SIE", "theta_e": te, "q": float(rng.uniform(0.6, 0.9)),
                 "pa_deg": float(rng.uniform(-90, 90))},
                {"type": "SHEAR", "gamma1": float(rng.uniform(-0.06, 0.06)),
                 "gamma2": float(rng.uniform(-0.06, 0.06))}))
        r = float(rng.uniform(0.05, 0.6)) * (0.15 if i % 3 == 0 else 1.0)
        phi = float(rng.uniform(0, 2 * np.pi))
        out.append(mock.MockSpec(
            name=f"m{i}", redshift=float(rng.choice([1.4, 2.25])), lens=lens, z_lens=0.5,
            centre_offset_arcsec=(r * np.cos(phi), r * np.sin(phi)),
            scale_length_kpc=0.7 if i % 3 == 0 else float(rng.uniform(0.8, 2.0)),
            inclination_deg=float(rng.uniform(20, 60)), pa_deg=float(rng.uniform(-90, 90)),
            psf_fwhm_arcsec=float(rng.uniform(0.45, 0.65)), bands=("H",), seed=i))
    return out


def _noisy_maps(galaxy, snr_peak: float, rng) -> xr.Dataset:
    f = galaxy.image_maps["flux"].sel(line=["Halpha"])
    sig = float(f.max()) / snr_peak
    noisy = f + sig * rng.standard_normal(f.shape)
    err = xr.full_like(f, sig)
    return xr.Dataset({"flux": noisy, "flux_err": err, "snr": noisy / err})


@pytest.mark.filterwarnings("ignore::klever_nb.lensing.NearCriticalWarning")
def test_headline_mu_is_unbiased_with_honest_errors_on_lensed_mocks():
    """16 mocks (μ 2.8–27, SNR 20 at the peak): the headline μ's median bias is < 5 % and its
    bootstrap errors cover the truth (pull std < 1.5, no pull beyond 4); the paper's μ(Hα)
    on the same maps is biased low by more than 15 % (reported, not hidden)."""
    rng = np.random.default_rng(7)
    rows = []
    for spec in _specs(16):
        galaxy = mock.make_mock(spec)
        maps = _noisy_maps(galaxy, 20.0, rng)
        _, s = L.reconstruct_source_plane(maps, galaxy.lens_maps, redshift=spec.redshift,
                                          cube_wcs=galaxy.cubes["H"].attrs["wcs"],
                                          psf_fwhm_arcsec=spec.psf_fwhm_arcsec,
                                          mc_realisations=0, forward_iterations=0,
                                          mu_bootstrap=15)
        rows.append((galaxy.truth["mu"], s["mu_halpha"], s["mu_halpha_err"], s["mu_halpha_k20"]))
    truth, mu, err, k20 = np.array(rows).T
    assert truth.max() > 20 and truth.min() < 4
    assert abs(np.median(mu / truth - 1)) < 0.05
    pulls = (mu - truth) / err
    assert np.all(np.abs(pulls) < 4) and np.std(pulls, ddof=1) < 1.5
    assert np.median(k20 / truth - 1) < -0.15


@pytest.mark.filterwarnings("ignore::klever_nb.lensing.NearCriticalWarning")
def test_method_k20_makes_the_paper_estimator_the_headline():
    spec = dataclasses.replace(_specs(2)[1], seed=3)
    galaxy = mock.make_mock(spec)
    maps = _noisy_maps(galaxy, 30.0, np.random.default_rng(0))
    kwargs = dict(redshift=spec.redshift, cube_wcs=galaxy.cubes["H"].attrs["wcs"],
                  psf_fwhm_arcsec=spec.psf_fwhm_arcsec, mc_realisations=0,
                  forward_iterations=0, mu_bootstrap=0)
    _, k20 = L.reconstruct_source_plane(maps, galaxy.lens_maps, method="k20", **kwargs)
    _, default = L.reconstruct_source_plane(maps, galaxy.lens_maps, **kwargs)
    assert k20["mu_halpha"] == k20["mu_halpha_k20"] and k20["mu_halpha_method"] == "k20"
    assert default["mu_halpha"] == default["mu_halpha_forward"]
    assert default["mu_halpha_k20"] == k20["mu_halpha_k20"]
    assert default["mu_maps_k20"] == default["mu_maps"]
    with pytest.raises(Exception, match="method"):
        L.reconstruct_source_plane(maps, galaxy.lens_maps, method="paper", **kwargs)


def _smoothed_noise_maps(n: int = 400, shape=(20, 20), fwhm=0.4, pixel=0.2):
    """n noise realisations of a spatially varying noise map, smoothed as the pipeline smooths
    cubes (spectra.smooth_cube, channels = realisations)."""
    from klever_nb.spectra import smooth_cube

    yy, xx = np.mgrid[:shape[0], :shape[1]]
    sigma = 1.0 + 0.5 * np.exp(-((yy - 10) ** 2 + (xx - 9) ** 2) / 30.0)
    rng = np.random.default_rng(11)
    cube = xr.Dataset({"flux": (("wave", "y", "x"), sigma * rng.standard_normal((n, *shape))),
                       "noise": (("wave", "y", "x"), np.broadcast_to(sigma, (n, *shape)).copy())},
                      coords={"wave": np.linspace(1.5, 1.6, n)},
                      attrs={"pixel_scale_arcsec": pixel})
    smooth = smooth_cube(cube, fwhm_arcsec=fwhm)
    return smooth, smooth.attrs["smooth_sigma_pix"]


def test_correlated_sum_error_matches_monte_carlo_of_smoothed_noise():
    smooth, sig = _smoothed_noise_maps()
    err = smooth["noise"].isel(wave=0).values
    yy, xx = np.mgrid[:20, :20]
    for mask in (np.hypot(yy - 10, xx - 9) < 5, (yy > 3) & (yy < 8) & (xx > 2) & (xx < 16)):
        scatter = smooth["flux"].values[:, mask].sum(axis=1).std(ddof=1)
        assert correlated_sum_error(err, mask, smooth_sigma_pix=sig) == pytest.approx(
            scatter, rel=0.1)
        assert correlated_sum_error(err, mask) < 0.5 * scatter   # quadrature: far too small


def test_total_halpha_error_includes_smoothing_correlations():
    smooth, sig = _smoothed_noise_maps()
    n = smooth.sizes["wave"]
    signal = 20.0
    flux = signal + smooth["flux"].values
    err = np.broadcast_to(smooth["noise"].isel(wave=0).values, flux.shape)
    totals, quoted = [], None
    for k in range(n):
        maps = xr.Dataset({"flux": (("line", "y", "x"), flux[k][None]),
                           "flux_err": (("line", "y", "x"), err[k][None]),
                           "snr": (("line", "y", "x"), np.full((1, 20, 20), 10.0))},
                          coords={"line": ["Halpha"]},
                          attrs={"smooth_fwhm_arcsec": 0.4, "pixel_scale_arcsec": 0.2})
        total, e = total_halpha(maps)
        totals.append(total)
        quoted = e
    assert quoted == pytest.approx(np.std(totals, ddof=1), rel=0.1)


def test_correlated_noise_has_unit_variance_and_the_smoothing_correlation():
    noise = correlated_noise((2000, 16, 16), np.random.default_rng(1), 0.85)
    assert noise.std() == pytest.approx(1.0, rel=0.03)
    rho1 = np.mean(noise[:, :, 1:] * noise[:, :, :-1])
    assert rho1 == pytest.approx(np.exp(-1 / (4 * 0.85**2)), abs=0.03)


def test_correlated_sum_error_without_smoothing_is_the_quadrature_sum():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert correlated_sum_error(np.ones((3, 3)), np.ones((3, 3), bool)) == pytest.approx(3.0)

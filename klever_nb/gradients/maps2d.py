"""2-D analysis of metallicity maps: residuals, planar fit, non-axisymmetry (K20 §4.5).

Part of :mod:`klever_nb.gradients` (import from there).

References
----------
K20 §4.5.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr
from scipy import stats
from threadpoolctl import threadpool_limits

from klever_nb.gradients.annuli import _FWHM_TO_SIGMA, _coords, psf_axes, psf_linear_size_kpc
from klever_nb.gradients.profile import _valid_pixels, pixel_errors


# ---------------------------------------------------------------------------
# 2-D analysis (K20 §4.5)
# ---------------------------------------------------------------------------
def _distance_map(metallicity: xr.Dataset, centre_kpc: Sequence[float]) -> np.ndarray:
    ys, xs = _coords(metallicity)
    yy, xx = np.meshgrid(ys - centre_kpc[1], xs - centre_kpc[0], indexing="ij")
    return np.hypot(xx, yy)


def residual_map(metallicity: xr.Dataset, fit: Mapping[str, Any]) -> xr.DataArray:
    """Metallicity map minus the fitted radial model central + gradient x r (K20 §4.5).

    r is the circular distance from ``fit["centre_kpc"]``, as in the profile's ``radius_kpc``.
    """
    centre = fit.get("centre_kpc", (0.0, 0.0))
    model = fit["central_oh"] + fit["gradient_dex_per_kpc"] * _distance_map(metallicity, centre)
    resid = metallicity["oh"].transpose("ys", "xs") - model
    resid.name = "oh_residual"
    resid.attrs = {"units": "dex", "long_name": "12+log(O/H) minus the radial fit",
                   "references": "K20 §4.5"}
    return resid


def correlation_area_pixels(metallicity: xr.Dataset, psf: Mapping[str, float] | None) -> float:
    """Pixels per independent noise element: 4 pi sigma_maj sigma_min / pixel area (>= 1).

    White noise smoothed by the PSF Gaussian has this effective area; the variance of a mean
    over N pixels is then sigma^2 min(N, A) / N.
    """
    if psf is None:
        return 1.0
    ys, xs = _coords(metallicity)
    fwhm_a, fwhm_b, _ = psf_axes(psf)
    area = 4 * np.pi * (fwhm_a * _FWHM_TO_SIGMA) * (fwhm_b * _FWHM_TO_SIGMA)
    return float(max(area / abs((ys[1] - ys[0]) * (xs[1] - xs[0])), 1.0))


def _map_arrays(metallicity: xr.Dataset, exclude_flags=None):
    valid = _valid_pixels(metallicity, exclude_flags)
    err = pixel_errors(metallicity)
    valid &= err > 0
    return valid, metallicity["oh"].transpose("ys", "xs").values, err


def planar_fit(metallicity: xr.Dataset, *, centre_kpc: Sequence[float] = (0.0, 0.0),
               psf: Mapping[str, float] | None = None,
               noise_kernel: Mapping[str, float] | None = None,
               exclude_flags: Sequence[str] | None = None) -> dict:
    """Weighted plane oh = a + b x + c y: size and direction of the steepest gradient.

    Weights 1/s_i^2 with s_i the pixel errors. The covariance is scaled by
    max(chi^2/ndof, 1) and by the noise correlation area of :func:`correlation_area_pixels`
    for ``noise_kernel`` (or, if None, ``psf``, conservative; 1 when both are None, i.e.
    independent pixels), valid when the map spans many correlation areas.

    Returns
    -------
    dict with ``central_oh`` (a, at ``centre_kpc``), ``gradient_x``, ``gradient_y``
    (dex/kpc), ``gradient_dex_per_kpc`` = sqrt(b^2 + c^2), ``direction_deg`` (towards
    increasing metallicity, from +xs towards +ys, in [0, 360)), and their ``*_err``.

    References
    ----------
    K20 §4.5 (e.g. sp1: a linear gradient from the south-east to the north-west).
    """
    valid, oh, err = _map_arrays(metallicity, exclude_flags)
    ys, xs = _coords(metallicity)
    yy, xx = np.meshgrid(ys - centre_kpc[1], xs - centre_kpc[0], indexing="ij")
    x, y, v, s = xx[valid], yy[valid], oh[valid], err[valid]
    if v.size < 3:
        return {"central_oh": np.nan, "gradient_x": np.nan, "gradient_y": np.nan,
                "gradient_dex_per_kpc": np.nan, "direction_deg": np.nan,
                "gradient_err": np.nan, "direction_err_deg": np.nan,
                "message": f"only {v.size} valid pixels"}
    w = 1.0 / s**2
    design = np.stack([np.ones_like(x), x, y], axis=1)
    cov = np.linalg.inv(design.T @ (design * w[:, None]))
    params = cov @ (design.T @ (w * v))
    chi2 = float(np.sum(w * (v - design @ params) ** 2))
    ndof = v.size - 3
    kernel = noise_kernel if noise_kernel is not None else psf
    cov = cov * max(chi2 / max(ndof, 1), 1.0) * correlation_area_pixels(metallicity, kernel)
    b, c = params[1], params[2]
    size = float(np.hypot(b, c))
    jac_size = np.array([0.0, b, c]) / max(size, 1e-30)
    jac_dir = np.array([0.0, -c, b]) / max(size**2, 1e-30)
    return {"central_oh": float(params[0]), "central_oh_err": float(np.sqrt(cov[0, 0])),
            "gradient_x": float(b), "gradient_x_err": float(np.sqrt(cov[1, 1])),
            "gradient_y": float(c), "gradient_y_err": float(np.sqrt(cov[2, 2])),
            "gradient_dex_per_kpc": size,
            "gradient_err": float(np.sqrt(jac_size @ cov @ jac_size)),
            "direction_deg": float(np.rad2deg(np.arctan2(c, b)) % 360.0),
            "direction_err_deg": float(np.rad2deg(np.sqrt(jac_dir @ cov @ jac_dir))),
            "chi2": chi2, "ndof": int(ndof), "message": ""}


def noise_correlation_kernel(metallicity: xr.Dataset,
                             noise_kernel: Mapping[str, float] | None) -> np.ndarray:
    """Correlation coefficient of the pixel noise vs pixel offset (odd-sized 2-D array).

    White noise smoothed by an elliptical Gaussian (``noise_kernel``, FWHMs in kpc and PA)
    has a Gaussian autocorrelation with sqrt(2) x its sigmas; None gives independent pixels.
    """
    if noise_kernel is None:
        return np.ones((1, 1))
    ys, xs = _coords(metallicity)
    pix = abs(xs[1] - xs[0])
    fwhm_a, fwhm_b, pa = psf_axes(noise_kernel)
    sa, sb = np.sqrt(2) * fwhm_a * _FWHM_TO_SIGMA / pix, np.sqrt(2) * fwhm_b * _FWHM_TO_SIGMA / pix
    half = int(np.ceil(4 * sa))
    dy, dx = np.mgrid[-half:half + 1, -half:half + 1].astype(float)
    dy *= np.sign(ys[1] - ys[0])
    dx *= np.sign(xs[1] - xs[0])
    t = np.deg2rad(pa)
    u = dx * np.cos(t) + dy * np.sin(t)
    v = -dx * np.sin(t) + dy * np.cos(t)
    return np.exp(-0.5 * ((u / sa) ** 2 + (v / sb) ** 2))


def non_axisymmetry(metallicity: xr.Dataset, *, fit: Mapping[str, Any] | None = None,
                    psf: Mapping[str, float] | None = None,
                    noise_kernel: Mapping[str, float] | None = None, n_sectors: int = 6,
                    annulus_width_kpc: float | None = None, min_pixels: int = 3,
                    exclude_flags: Sequence[str] | None = None,
                    centre_kpc: Sequence[float] | None = None) -> dict:
    """Is there more azimuthal structure than the errors explain? A chi^2 test (K20 §4.5).

    The residuals from the radial fit (or the map itself when ``fit`` is None) are split in
    circular annuli of width ``annulus_width_kpc`` (default half the PSF linear size, else
    3 pixels) and ``n_sectors`` azimuthal sectors. Each cell's inverse-variance mean m_s has
    the covariance C_st = sum_{i in s, j in t} w_i w_j s_i s_j rho_ij / (W_s W_t), with rho the
    noise correlation of :func:`noise_correlation_kernel` (independent pixels when
    ``noise_kernel`` is None). The axisymmetric null (one mean per annulus) is fitted by
    generalised least squares, chi^2 = (m - X mu)^T C^-1 (m - X mu) with
    ndof = cells - annuli, and chi^2(ndof) gives the p-value.

    Parameters
    ----------
    psf : dict, optional
        Sets the default annulus width; also used as ``noise_kernel`` when that is None
        (conservative: the PSF correlates the noise over a larger area than the smoothing
        and de-lensing of real maps do).
    noise_kernel : dict, optional
        Elliptical Gaussian (``fwhm_major_kpc``, ``fwhm_minor_kpc``, ``pa_deg``) that smoothed
        independent pixel noise, e.g. the source-plane image of the 0.4" smoothing kernel.

    Returns
    -------
    dict with ``chi2``, ``ndof``, ``p_value``, ``significance_sigma`` (one-sided Gaussian
    equivalent), ``azimuthal_rms_dex`` (rms of m_s minus its annulus mean),
    ``expected_rms_dex`` (the same from the errors alone), ``n_annuli``, ``n_cells``.
    """
    from scipy.signal import fftconvolve

    centre = centre_kpc if centre_kpc is not None else (
        fit.get("centre_kpc", (0.0, 0.0)) if fit is not None else (0.0, 0.0))
    valid, oh, err = _map_arrays(metallicity, exclude_flags)
    values = residual_map(metallicity, fit).values if fit is not None else oh
    valid &= np.isfinite(values)
    ys, xs = _coords(metallicity)
    yy, xx = np.meshgrid(ys - centre[1], xs - centre[0], indexing="ij")
    if annulus_width_kpc is None:
        annulus_width_kpc = (0.5 * psf_linear_size_kpc(psf) if psf is not None
                             else 3 * abs(xs[1] - xs[0]))
    ring = np.floor(np.hypot(xx, yy) / annulus_width_kpc).astype(int)
    sector = (np.floor((np.arctan2(yy, xx) % (2 * np.pi)) / (2 * np.pi / n_sectors))
              .astype(int) % n_sectors)
    cell = np.where(valid, ring * n_sectors + sector, -1)
    w = np.where(valid, 1.0 / np.where(valid, err, 1.0) ** 2, 0.0)
    labels, counts = np.unique(cell[valid], return_counts=True)
    labels = labels[counts >= min_pixels]
    # keep annuli with at least two usable cells
    rings_of = labels // n_sectors
    ring_ids, ring_counts = np.unique(rings_of, return_counts=True)
    labels = labels[np.isin(rings_of, ring_ids[ring_counts >= 2])]
    if labels.size < 2:
        return {"chi2": np.nan, "ndof": 0, "p_value": np.nan, "significance_sigma": np.nan,
                "azimuthal_rms_dex": np.nan, "expected_rms_dex": np.nan, "n_annuli": 0,
                "n_cells": 0, "message": "not enough pixels for any annulus with two sectors"}
    index = np.full(int(cell.max()) + 1, -1)
    index[labels] = np.arange(labels.size)
    cid = np.where(cell >= 0, index[np.maximum(cell, 0)], -1)
    use = cid >= 0
    n = labels.size
    wsum = np.bincount(cid[use], w[use], minlength=n)
    mean = np.bincount(cid[use], (w * values)[use], minlength=n) / wsum
    kernel = noise_correlation_kernel(metallicity, noise_kernel if noise_kernel is not None
                                      else psf)
    ws = np.where(use, w * np.where(valid, err, 0.0), 0.0)  # w_i s_i
    cov = np.zeros((n, n))
    rows, cols = np.nonzero(use)
    for start in range(0, n, 64):  # batches of cells: one FFT convolution each
        ks = np.arange(start, min(start + 64, n))
        stack = np.zeros((ks.size, *ws.shape))
        sel = np.isin(cid[rows, cols], ks)
        stack[cid[rows, cols][sel] - start, rows[sel], cols[sel]] = ws[rows[sel], cols[sel]]
        if kernel.size > 1:
            stack = fftconvolve(stack, kernel[None], mode="same", axes=(1, 2))
        for j, k in enumerate(ks):
            cov[k] = np.bincount(cid[use], (ws * stack[j])[use], minlength=n)
    cov /= np.outer(wsum, wsum)
    cov = 0.5 * (cov + cov.T)
    rings = labels // n_sectors
    ring_index = np.unique(rings, return_inverse=True)[1]
    design = np.zeros((n, ring_index.max() + 1))
    design[np.arange(n), ring_index] = 1.0
    with threadpool_limits(limits=1, user_api="blas"):  # tiny matrices: threads only hurt
        cinv = np.linalg.pinv(cov, hermitian=True)
    mu = np.linalg.solve(design.T @ cinv @ design, design.T @ cinv @ mean)
    resid = mean - design @ mu
    chi2 = float(resid @ cinv @ resid)
    ndof = int(n - design.shape[1])
    p_value = float(stats.chi2.sf(chi2, ndof))
    return {"chi2": chi2, "ndof": ndof, "p_value": p_value,
            "significance_sigma": float(stats.norm.isf(np.clip(p_value, 1e-300, 1 - 1e-16))),
            "azimuthal_rms_dex": float(np.sqrt(np.mean(resid**2))),
            "expected_rms_dex": float(np.sqrt(np.mean(np.diag(cov)) * (1 - design.shape[1] / n))),
            "n_annuli": int(design.shape[1]), "n_cells": int(n),
            "correlation_area_pixels": float(kernel.sum()), "message": ""}

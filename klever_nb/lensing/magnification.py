"""Magnifications (K20 §3.2.3, Fig. 4): μ(Hα), μ_maps and their spread over lens models.

Part of :mod:`klever_nb.lensing` (see the package docstring for the flow).

References: K20 §3.2.3, Fig. 4; FACTS.md §12.
"""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr

from klever_nb.constants import MAGNIFICATION_SNR
from klever_nb.errors import ConfigError, InputError
from klever_nb.lensing.delensing import SourceGrid, _label_images, _trace_rays
from klever_nb.lensing.maps import as_lens_grid, convergence_shear

#: |μ| above which a footprint pixel counts as touching a critical curve (FACTS.md §12).
NEAR_CRITICAL_MU = 50.0


class NearCriticalWarning(UserWarning):
    """The galaxy's footprint touches a critical curve: μ there is unreliable (FACTS.md §12)."""


# ---------------------------------------------------------------------------------------------
# Magnifications (K20 §3.2.3, Fig. 4)
# ---------------------------------------------------------------------------------------------

def magnification_halpha(image_maps: xr.Dataset, source_maps: xr.Dataset, *,
                         snr_min: float = MAGNIFICATION_SNR, line: str = "Halpha",
                         smooth_sigma_pix: float = 0.0) -> tuple[float, float]:
    """μ(Hα): total image-plane over total source-plane Hα flux, over SNR > ``snr_min`` pixels.

    Image plane: Σ flux of the IFU spaxels with ``snr > snr_min``; source plane: Σ SB × source
    pixel area over source pixels with ``snr > snr_min``. For matching footprints, de-lens the
    SNR-selected image map (as :func:`reconstruct_source_plane` does). The error combines the
    two relative errors in quadrature (the paper's propagation; it ignores that both sums
    come from the same data and that neighbouring source pixels are correlated). With
    ``smooth_sigma_pix`` > 0 (maps fitted on a cube smoothed by that Gaussian, in spaxels) the
    image-plane sum's error includes the spaxel correlations
    (:func:`klever_nb.sfr.correlated_sum_error`) and the source-plane sum's relative error is
    taken equal to it (the source pixels are a re-mapping of the same spaxels); 0 reproduces
    the paper's propagation.

    References
    ----------
    K20 §3.2.3 ("co-adding the flux of all the spaxels in the Hα map with SNR > 3 before and
    after the reconstruction procedure").
    """
    img = image_maps.sel(line=line)
    sel = (img["snr"] > snr_min) & np.isfinite(img["flux"])
    f_img = float(img["flux"].where(sel).sum())
    if smooth_sigma_pix > 0:
        from klever_nb.sfr import correlated_sum_error

        e_img = correlated_sum_error(img["flux_err"].transpose("y", "x").values,
                                     sel.transpose("y", "x").values,
                                     smooth_sigma_pix=smooth_sigma_pix)
    else:
        e_img = float(np.sqrt((img["flux_err"].where(sel) ** 2).sum()))
    src = source_maps.sel(line=line)
    area = float(source_maps.attrs["source_pixel_arcsec"]) ** 2
    sel_s = np.isfinite(src["flux"])
    if "snr" in src:
        sel_s &= src["snr"] > snr_min
    f_src = float(src["flux"].where(sel_s).sum()) * area
    e_src = float(np.sqrt((src["flux_err"].where(sel_s) ** 2).sum())) * area \
        if "flux_err" in src else 0.0
    if not (f_img > 0 and f_src > 0):
        return float("nan"), float("nan")
    mu = f_img / f_src
    if smooth_sigma_pix > 0:
        e_src = f_src * e_img / f_img
    return mu, mu * float(np.hypot(e_img / f_img, e_src / f_src))


def magnification_from_maps(lens: xr.Dataset, *, footprint: xr.DataArray,
                            weights: xr.DataArray | None = None, average: str = "total",
                            mu_critical: float = NEAR_CRITICAL_MU, min_image_pixels: int = 4,
                            source_pixel_arcsec: float | None = None,
                            warn: bool = True) -> dict:
    """μ_maps from μ = 1/|(1−κ)² − γ²| over the galaxy's image-plane footprint.

    Parameters
    ----------
    lens : xarray.Dataset
        Lens at the source redshift; κ, γ from its maps or from derivatives of α.
    footprint : xarray.DataArray of bool
        Image-plane pixels of the galaxy on (a subset of) the lens grid ``(ly, lx)``.
    weights : xarray.DataArray, optional
        Per-pixel weights (e.g. the Hα surface brightness); default uniform.
    average : {"total", "harmonic", "mean", "median"}
        ``total`` (default): total flux magnification of a source whose image-plane surface
        brightness is ∝ w, Σ w / Σ (w / (|μ| n)), where n is the number of images covering
        each pixel's source position (counted on a source grid from the footprint's own
        area, see :func:`_total_magnification`): valid for any number of images, merged or
        not (single image: the w-weighted harmonic mean of |μ|).
        The others average within each connected image and sum over images (a source seen
        n times is magnified by the sum of its images' magnifications): ``harmonic``
        Σw / Σ(w/|μ|), ``mean`` Σw|μ|/Σw, ``median`` median |μ|; they double-count sources
        whose images merge into one arc or ring.
    min_image_pixels : int
        Footprint components (images) smaller than this are ignored.
    source_pixel_arcsec : float, optional
        Source pixel used to count overlapping images for ``total`` (default: 2 lens pixels).

    Returns
    -------
    dict
        ``mu``, ``mu_images`` (per-image harmonic/mean/median), ``n_images``, ``average``,
        ``max_abs_mu``, ``n_pixels``, ``det_changes_sign``, ``near_critical``.

    Warns
    -----
    NearCriticalWarning
        When |μ| > ``mu_critical`` somewhere in the footprint or det A changes sign there.

    References
    ----------
    K20 §3.2.3 (μ_model from the mass and shear maps rescaled to the source redshift);
    FACTS.md §12.
    """
    if average not in {"total", "harmonic", "mean", "median"}:
        raise ConfigError("average must be 'total', 'harmonic', 'mean' or 'median', "
                          f"got {average!r}")
    lens = as_lens_grid(lens)
    kappa, gamma = convergence_shear(lens)
    full = xr.Dataset({"kappa": (("ly", "lx"), kappa), "gamma": (("ly", "lx"), gamma)},
                      coords={"ly": lens["ly"], "lx": lens["lx"]})
    fp = footprint.astype(bool)
    sub = full.sel(ly=fp["ly"], lx=fp["lx"])
    det_all = (1 - sub["kappa"].values) ** 2 - sub["gamma"].values ** 2
    mask = fp.transpose("ly", "lx").values & np.isfinite(det_all)
    if not mask.any():
        raise InputError("magnification: the galaxy footprint does not overlap the lens maps")
    w_all = np.ones_like(det_all) if weights is None else np.clip(np.nan_to_num(
        weights.sel(ly=fp["ly"], lx=fp["lx"]).transpose("ly", "lx").values), 0, None)
    labels, n_img = _label_images(mask, min_image_pixels)
    if n_img == 0:
        labels, n_img = mask.astype(int), 1
    det = det_all[mask]
    if average == "total":
        mu_total = _total_magnification(lens, fp, mask, det, w_all[mask], source_pixel_arcsec)
    per_image = []
    for k in range(1, n_img + 1):  # loop over images (a handful), vectorised over pixels
        sel = labels == k
        det, w = det_all[sel], w_all[sel]
        if w.sum() <= 0:
            w = np.ones_like(det)
        if average in {"harmonic", "total"}:
            per_image.append(float(w.sum() / np.sum(w * np.abs(det))))
        elif average == "mean":
            per_image.append(float(np.sum(w / np.abs(det)) / w.sum()))
        else:
            per_image.append(float(np.median(1.0 / np.abs(det))))
    with np.errstate(divide="ignore"):
        max_abs_mu = float(np.max(1.0 / np.abs(det)))
    mu = mu_total if average == "total" else float(np.sum(per_image))
    result = {"mu": mu, "mu_images": per_image, "n_images": n_img,
              "average": average, "max_abs_mu": max_abs_mu, "n_pixels": int(mask.sum()),
              "det_changes_sign": bool(det.min() < 0 < det.max())}
    result["near_critical"] = bool(max_abs_mu > mu_critical or result["det_changes_sign"])
    if warn and result["near_critical"]:
        warnings.warn(f"the galaxy touches a critical curve (max |mu| = {max_abs_mu:.3g}, "
                      f"det A changes sign: {result['det_changes_sign']}); mu_maps is "
                      "unreliable there", NearCriticalWarning, stacklevel=2)
    return result


def _total_magnification(lens: xr.Dataset, fp: xr.DataArray, mask: np.ndarray, det: np.ndarray,
                         w: np.ndarray, source_pixel_arcsec: float | None) -> float:
    """Σ w A / Σ_i w_i A/|μ_i| / n(β_i): flux magnification with multiplicity correction.

    n(β) = max(1, round(c_s)), where c_s = Σ_{i→s} (A/|μ_i|) / A_s is how many times the
    footprint covers source pixel s (1 for singly imaged sources; 2, 3 … where images
    overlap in the source plane; partial coverage at the edges rounds to 1).
    """
    p = float(lens.attrs["pixel_scale_arcsec"])
    ps = float(source_pixel_arcsec or 2 * p)
    ly, lx = fp["ly"].values, fp["lx"].values
    bx, by = _trace_rays(lens, ly, lx, 1)
    bx, by = bx.ravel()[mask.ravel()], by.ravel()[mask.ravel()]
    grid = SourceGrid.around((float(bx.mean()), float(by.mean())), ps, (bx.min(), bx.max()),
                             (by.min(), by.max()))
    idx = grid.index(bx, by)
    area_beta = p * p * np.abs(det)          # source-plane area of each image pixel
    cover = np.bincount(idx, area_beta, minlength=grid.n) / (ps * ps)
    multiplicity = np.maximum(np.rint(cover), 1.0)[idx]
    source_flux = np.sum(w * area_beta / multiplicity)
    return float(np.sum(w) * p * p / source_flux)


def magnification_spread(models: list[xr.Dataset], *, footprint: xr.DataArray,
                         weights: xr.DataArray | None = None,
                         average: str = "total") -> dict:
    """Median, 16th/84th percentiles and 1σ of μ_maps over alternative lens models (K20 Fig. 4).

    ``sigma`` is half the 16–84 percentile range; ``relative`` = sigma / median.
    """
    if not models:
        raise ConfigError("magnification_spread needs at least one lens model (lens.models)")
    values = np.array([magnification_from_maps(m, footprint=footprint, weights=weights,
                                               average=average, warn=False)["mu"]
                       for m in models])
    p16, med, p84 = np.percentile(values, [16, 50, 84])
    sigma = 0.5 * (p84 - p16)
    return {"median": float(med), "p16": float(p16), "p84": float(p84), "sigma": float(sigma),
            "relative": float(sigma / med), "values": values.tolist(), "n_models": len(models)}

"""Source-plane PSF (K20 §3.2.3, Table 4): point images, Gaussian ellipse fit.

Part of :mod:`klever_nb.lensing` (see the package docstring for the flow).

References: K20 §3.2.3, Table 4.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy import ndimage, optimize

from klever_nb.celestial import wcs_from_string
from klever_nb.errors import InputError
from klever_nb.lensing.delensing import delens
from klever_nb.lensing.maps import FWHM_PER_SIGMA, as_lens_grid, convergence_shear

# ---------------------------------------------------------------------------------------------
# Source-plane PSF (K20 §3.2.3, Table 4)
# ---------------------------------------------------------------------------------------------

def point_images(lens: xr.Dataset, beta: tuple[float, float]) -> list[dict]:
    """Images of a point source at ``beta``: positions θ (arcsec) and signed magnifications.

    Every lens-grid cell is split into two triangles; a triangle whose ray-traced vertices
    enclose β holds an image (barycentric position), with μ = area_θ / area_β. Duplicates on
    shared edges (within 1.5 pixels) are merged.
    """
    lens = as_lens_grid(lens)
    p = float(lens.attrs["pixel_scale_arcsec"])
    tx, ty = np.meshgrid(lens["theta_x"].values, lens["theta_y"].values)
    bx = tx - lens["alpha_x"].values
    by = ty - lens["alpha_y"].values
    found = []
    corners = {"00": (slice(None, -1), slice(None, -1)), "01": (slice(None, -1), slice(1, None)),
               "11": (slice(1, None), slice(1, None)), "10": (slice(1, None), slice(None, -1))}
    for tri in (("00", "01", "11"), ("00", "11", "10")):
        P = [(bx[corners[c]], by[corners[c]], tx[corners[c]], ty[corners[c]]) for c in tri]
        v0x, v0y = P[1][0] - P[0][0], P[1][1] - P[0][1]
        v1x, v1y = P[2][0] - P[0][0], P[2][1] - P[0][1]
        v2x, v2y = beta[0] - P[0][0], beta[1] - P[0][1]
        d = v0x * v1y - v1x * v0y
        with np.errstate(invalid="ignore", divide="ignore"):
            l1 = (v2x * v1y - v1x * v2y) / d
            l2 = (v0x * v2y - v2x * v0y) / d
        l0 = 1 - l1 - l2
        eps = -1e-9
        inside = (l0 >= eps) & (l1 >= eps) & (l2 >= eps) & (d != 0)
        for k in np.flatnonzero(inside.ravel()):
            w = (l0.flat[k], l1.flat[k], l2.flat[k])
            theta = (sum(wi * Pi[2].flat[k] for wi, Pi in zip(w, P, strict=True)),
                     sum(wi * Pi[3].flat[k] for wi, Pi in zip(w, P, strict=True)))
            found.append({"theta_x": float(theta[0]), "theta_y": float(theta[1]),
                          "mu": float(p * p / d.flat[k])})
    images: list[dict] = []
    for im in found:
        if all(np.hypot(im["theta_x"] - o["theta_x"], im["theta_y"] - o["theta_y"]) > 1.5 * p
               for o in images):
            images.append(im)
    # refine μ with κ, γ interpolated at the image (the triangle areas are coarse near the core)
    kappa, gamma = convergence_shear(lens)
    det = (1 - kappa) ** 2 - gamma**2
    for im in images:
        fx = (im["theta_x"] - tx[0, 0]) / p
        fy = (im["theta_y"] - ty[0, 0]) / p
        d = float(ndimage.map_coordinates(det, [[fy], [fx]], order=1, mode="nearest")[0])
        if np.isfinite(d) and d != 0 and np.sign(d) == np.sign(im["mu"]):
            im["mu_triangle"] = im["mu"]
            im["mu"] = 1.0 / d
    return images


def fit_gaussian_ellipse(image: xr.DataArray, *, pixel_arcsec: float | None = None) -> dict:
    """Least-squares 2-D Gaussian fit of a source-plane image (NaN pixels ignored).

    ``image`` is on ``(ys, xs)`` with ``xs_arcsec``/``ys_arcsec`` coordinates. Returns
    ``fwhm_major_arcsec``, ``fwhm_minor_arcsec``, ``theta_deg`` (major axis, counter-clockwise
    from +x of the lens frame, in [0, 180)), ``x0_arcsec``, ``y0_arcsec``.
    """
    x = image["xs_arcsec"].values
    y = image["ys_arcsec"].values
    xx, yy = np.meshgrid(x, y)
    z = image.transpose("ys", "xs").values
    ok = np.isfinite(z)
    xx, yy, z = xx[ok], yy[ok], z[ok]
    w = np.clip(z, 0, None)
    x0, y0 = np.sum(w * xx) / w.sum(), np.sum(w * yy) / w.sum()
    cxx = np.sum(w * (xx - x0) ** 2) / w.sum()
    cyy = np.sum(w * (yy - y0) ** 2) / w.sum()
    cxy = np.sum(w * (xx - x0) * (yy - y0)) / w.sum()
    evals, evecs = np.linalg.eigh([[cxx, cxy], [cxy, cyy]])
    theta0 = np.arctan2(evecs[1, 1], evecs[0, 1])
    start = [z.max(), x0, y0, 0.5 * np.log(max(evals[1], 1e-12)),
             0.5 * np.log(max(evals[0], 1e-12)), theta0]

    def model(par):
        amp, mx, my, ls1, ls2, th = par
        c, s = np.cos(th), np.sin(th)
        u = (xx - mx) * c + (yy - my) * s
        v = -(xx - mx) * s + (yy - my) * c
        return amp * np.exp(-0.5 * (u**2 * np.exp(-2 * ls1) + v**2 * np.exp(-2 * ls2)))

    if z.size < 12:  # too few pixels to fit: moments, with the pixel box added back
        pix = pixel_arcsec or (abs(float(x[1] - x[0])) if x.size > 1 else 0.0)
        var = np.clip(evals, 0.0, None) + max(pix**2 / 12.0, 1e-12)
        res = optimize.OptimizeResult(x=[z.max(), x0, y0, 0.5 * np.log(var[1]),
                                         0.5 * np.log(var[0]), theta0], success=False)
    else:
        res = optimize.least_squares(lambda par: model(par) - z, start, method="lm")
    amp, mx, my, ls1, ls2, th = res.x
    s1, s2 = np.exp(ls1), np.exp(ls2)
    if s2 > s1:
        s1, s2, th = s2, s1, th + np.pi / 2
    return {"fwhm_major_arcsec": float(FWHM_PER_SIGMA * s1),
            "fwhm_minor_arcsec": float(FWHM_PER_SIGMA * s2),
            "theta_deg": float(np.degrees(th) % 180.0), "x0_arcsec": float(mx),
            "y0_arcsec": float(my), "amplitude": float(amp), "success": bool(res.success)}


def _position_angle(theta_deg: float, wcs_header: str | None) -> float:
    """Astronomical PA (east of north, degrees in [0, 180)) of a direction in the lens frame."""
    vec = np.array([np.cos(np.radians(theta_deg)), np.sin(np.radians(theta_deg))])
    if wcs_header:
        xi, eta = wcs_from_string(wcs_header).pixel_scale_matrix @ vec
    else:  # north up, east left
        xi, eta = -vec[0], vec[1]
    return float(np.degrees(np.arctan2(xi, eta)) % 180.0)


def source_plane_psf(lens: xr.Dataset, *, position_arcsec: tuple[float, float],
                     psf_fwhm_arcsec: float, source_pixel_arcsec: float,
                     kpc_per_arcsec: float, subsample: int = 2,
                     threshold: float = 1e-3) -> dict:
    """The image-plane PSF as it appears in the reconstructed source plane (K20 Table 4).

    A point source at ``position_arcsec`` (β, lens frame) is lensed (:func:`point_images`),
    each image is convolved with the Gaussian PSF (image plane, flux ∝ |μ|), the image is
    de-lensed with :func:`delens` (pixels above ``threshold`` × peak) and a 2-D Gaussian is
    fitted to the result.

    Returns
    -------
    dict
        ``fwhm_major_kpc``, ``fwhm_minor_kpc``, ``theta_deg`` (major axis in the source-grid
        frame: counter-clockwise from +xs towards +ys, which is the lens frame +x/+y),
        ``pa_deg_east_of_north`` (the same axis on the sky, via the lens WCS; FACTS.md §13),
        the same axes in arcsec, ``n_images``, ``images`` and ``image`` (the de-lensed PSF,
        a DataArray). Annuli (:mod:`klever_nb.gradients`) take ``theta_deg``.

    References
    ----------
    K20 §3.2.3 (point-like synthetic source, convolved with the PSF, de-lensed, ellipse fit).
    """
    lens = as_lens_grid(lens)
    images = point_images(lens, position_arcsec)
    if not images:
        raise InputError(f"source position {position_arcsec} arcsec has no image inside the "
                         "lens maps; the galaxy centre must lie behind the mapped field")
    p = float(lens.attrs["pixel_scale_arcsec"])
    sigma = psf_fwhm_arcsec / FWHM_PER_SIGMA
    tx, ty = lens["theta_x"].values, lens["theta_y"].values
    xs = [im["theta_x"] for im in images]
    ys = [im["theta_y"] for im in images]
    lo_x = np.searchsorted(tx, min(xs) - 4 * psf_fwhm_arcsec)
    hi_x = np.searchsorted(tx, max(xs) + 4 * psf_fwhm_arcsec)
    lo_y = np.searchsorted(ty, min(ys) - 4 * psf_fwhm_arcsec)
    hi_y = np.searchsorted(ty, max(ys) + 4 * psf_fwhm_arcsec)
    ly, lx = np.arange(lo_y, hi_y), np.arange(lo_x, hi_x)
    gx, gy = np.meshgrid(tx[lx], ty[ly])
    sb = np.zeros_like(gx)
    for im in images:
        sb += abs(im["mu"]) * np.exp(-0.5 * ((gx - im["theta_x"]) ** 2
                                             + (gy - im["theta_y"]) ** 2) / sigma**2)
    sb /= 2 * np.pi * sigma**2
    sb[sb < threshold * sb.max()] = np.nan
    maps = xr.Dataset({"flux": (("line", "ly", "lx"), sb[None])},
                      coords={"line": ["psf"], "ly": ly, "lx": lx,
                              "theta_x": ("lx", tx[lx]), "theta_y": ("ly", ty[ly])})
    src = delens(maps, lens, source_pixel_arcsec=source_pixel_arcsec, subsample=subsample,
                 kpc_per_arcsec=kpc_per_arcsec, centre=tuple(position_arcsec), centre_line="psf",
                 errors="independent", min_image_pixels=1)
    image = src["flux"].sel(line="psf")
    fit = fit_gaussian_ellipse(image, pixel_arcsec=source_pixel_arcsec)
    return {
        "fwhm_major_kpc": fit["fwhm_major_arcsec"] * kpc_per_arcsec,
        "fwhm_minor_kpc": fit["fwhm_minor_arcsec"] * kpc_per_arcsec,
        "pa_deg_east_of_north": _position_angle(fit["theta_deg"], lens.attrs.get("wcs")),
        "fwhm_major_arcsec": fit["fwhm_major_arcsec"],
        "fwhm_minor_arcsec": fit["fwhm_minor_arcsec"],
        "theta_deg": fit["theta_deg"],
        "n_images": len(images),
        "images": images,
        "image": image,
        "image_pixel_arcsec": p,
    }


def annulus_psf(summary: dict) -> dict[str, float]:
    """The source-PSF dict the annuli take, from a lensing summary (the one place it is built).

    ``summary`` holds ``source_psf_fwhm_kpc`` ([major, minor]) and ``source_psf_theta_deg``
    (source-grid frame, from +xs towards +ys), as returned by
    :func:`klever_nb.lensing.reconstruct_source_plane` and
    :func:`klever_nb.lensing.unlensed_source_maps`.

    Returns
    -------
    dict
        ``{"fwhm_major_kpc", "fwhm_minor_kpc", "theta_deg"}`` for
        :func:`klever_nb.gradients.measure_gradient` and friends.
    """
    try:
        major, minor = (float(v) for v in summary["source_psf_fwhm_kpc"])
        theta = float(summary["source_psf_theta_deg"])
    except (KeyError, TypeError, ValueError):
        raise InputError("lensing summary: needs 'source_psf_fwhm_kpc' [major, minor] and "
                         "'source_psf_theta_deg' (rerun the source-plane stage)") from None
    return {"fwhm_major_kpc": major, "fwhm_minor_kpc": minor, "theta_deg": theta}


def maps_psf_fwhm_arcsec(seeing_fwhm_arcsec: float, maps: xr.Dataset | None = None, *,
                         smooth_fwhm_arcsec: float | None = None) -> float:
    """FWHM of the PSF that fitted line maps actually have: seeing ⊕ spatial smoothing.

    Both are Gaussian, so the FWHMs add in quadrature. The smoothing is
    ``smooth_fwhm_arcsec`` or else ``maps.attrs["smooth_fwhm_arcsec"]`` (written by
    :func:`klever_nb.fitting.fit_galaxy`; K20 §3.1 smooths by 0.4"). The source-plane PSF
    that shapes the annuli and decides "resolved" (K20 §4.2) must be this one, not the
    seeing alone: with 0.55" seeing and 0.4" smoothing it is 0.68", 24 % larger.
    """
    if smooth_fwhm_arcsec is None:
        smooth_fwhm_arcsec = float(maps.attrs.get("smooth_fwhm_arcsec", 0.0)) \
            if maps is not None else 0.0
    return float(np.hypot(float(seeing_fwhm_arcsec), float(smooth_fwhm_arcsec)))

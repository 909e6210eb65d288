"""Lens reconstruction: source-plane maps, source-plane PSF and magnifications (K20 §3.2).

The flow (:func:`reconstruct_source_plane` runs it):

1. :func:`rescale_lens` puts deflection, κ, γ maps at the source redshift (D_ls/D_s).
2. :func:`rebin_to_lens_grid` rebins the IFU line maps onto the lens pixel grid by exact
   pixel overlap (flux conserving) and turns flux per spaxel into surface brightness.
3. :func:`delens` ray-traces every image pixel (β = θ − α, optionally ``subsample``² rays per
   pixel) onto a regular source grid; each source pixel is the mean of the rays landing in it
   (lensing conserves surface brightness), with ``np.bincount`` on flat indices.
4. :func:`magnification_halpha`, :func:`magnification_from_maps`, :func:`magnification_spread`
   and :func:`source_plane_psf` give the paper's μ(Hα), μ_maps (with the spread over lens
   models) and the source-plane PSF ellipse (Table 4).

:func:`forward_model` is the reverse path (beyond the paper): source → lens → PSF → IFU grid.

Frames: a lens ``Dataset`` lives on dims ``(ly, lx)`` (rows, columns of its FITS grid) with
coordinates ``theta_x``/``theta_y`` in arcsec along the pixel axes; source positions β are in
the same frame. Source-plane maps carry ``beta_x``/``beta_y`` (arcsec, lens frame),
``xs_arcsec``/``ys_arcsec`` (arcsec from the galaxy centre) and the dims ``xs``/``ys`` in kpc
from the galaxy centre.

References: K20 §3.2.1–3.2.3; FACTS.md §10 (cosmology), §12 (measured costs).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr
from scipy import ndimage, optimize

from klever_nb.cosmology import dls_over_ds
from klever_nb.cosmology import kpc_per_arcsec as _kpc_per_arcsec
from klever_nb.errors import ConfigError, InputError
from klever_nb.io.images import pixel_scale_from_wcs, wcs_from_string

__all__ = [
    "NearCriticalWarning", "rescale_lens", "convergence_shear", "lens_from_parametric",
    "lens_from_components", "rebin_to_lens_grid", "align_offset", "delens", "forward_model",
    "source_plane_psf", "fit_gaussian_ellipse", "magnification_halpha",
    "magnification_from_maps", "magnification_spread", "reconstruct_source_plane",
]

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
#: |μ| above which a footprint pixel counts as touching a critical curve (FACTS.md §12).
NEAR_CRITICAL_MU = 50.0


class NearCriticalWarning(UserWarning):
    """The galaxy's footprint touches a critical curve: μ there is unreliable (FACTS.md §12)."""


# ---------------------------------------------------------------------------------------------
# Lens maps: redshift rescaling, parametric models, κ and γ
# ---------------------------------------------------------------------------------------------

def rescale_lens(lens: xr.Dataset, *, z_lens: float, z_source: float,
                 normalisation: str = "dls_ds") -> xr.Dataset:
    """Put deflection, κ and γ maps at the source redshift.

    Parameters
    ----------
    lens : xarray.Dataset
        ``alpha_x``, ``alpha_y`` and optionally ``kappa``, ``gamma``, ``gamma1``, ``gamma2``.
    z_lens, z_source : float
        Lens and source redshifts.
    normalisation : {"dls_ds", "source"}
        ``dls_ds``: maps for D_ls/D_s = 1, multiplied by D_ls/D_s of the paper's cosmology;
        ``source``: already for this source, returned unchanged.

    Returns
    -------
    xarray.Dataset
        Copy with attrs ``normalisation = "source"``, ``z_lens``, ``z_source``, ``dls_ds``.

    Raises
    ------
    ConfigError
        If ``z_source <= z_lens`` or the normalisation is unknown.

    References
    ----------
    K20 §3.2.3 ("once rescaled to the proper source redshift"); FACTS.md §10.
    """
    if normalisation not in {"dls_ds", "source"}:
        raise ConfigError(f"lens.normalisation must be 'dls_ds' or 'source', got {normalisation!r}")
    if not z_source > z_lens:
        raise ConfigError(f"source redshift {z_source} must be larger than the lens redshift "
                          f"{z_lens} (lens.z_lens): the galaxy must lie behind the lens")
    factor = dls_over_ds(z_lens, z_source) if normalisation == "dls_ds" else 1.0
    out = lens.copy()
    for name in ("alpha_x", "alpha_y", "kappa", "gamma", "gamma1", "gamma2"):
        if name in out:
            out[name] = lens[name] * factor
            out[name].attrs = dict(lens[name].attrs)
    out.attrs.update(normalisation="source", z_lens=float(z_lens), z_source=float(z_source),
                     dls_ds=float(factor))
    return out


def convergence_shear(lens: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """κ and γ (modulus) of a lens: from its maps if present, else by differentiating α.

    Finite differences (``np.gradient``, second order inside) agree with analytic Hessians to
    ~1e-6 away from critical curves and degrade near them (FACTS.md §12).
    """
    if "kappa" in lens and "gamma" in lens:
        return lens["kappa"].values, lens["gamma"].values
    p = float(lens.attrs["pixel_scale_arcsec"])
    dax_dy, dax_dx = np.gradient(lens["alpha_x"].values, p)
    day_dy, day_dx = np.gradient(lens["alpha_y"].values, p)
    kappa = 0.5 * (dax_dx + day_dy)
    gamma1 = 0.5 * (dax_dx - day_dy)
    gamma2 = 0.5 * (dax_dy + day_dx)
    return kappa, np.hypot(gamma1, gamma2)


def _default_wcs_header(shape: tuple[int, int], pixel_scale: float) -> str:
    """TAN WCS at (0, 0) deg, north up, east left, reference pixel at the grid centre."""
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [0.0, 0.0]
    w.wcs.crpix = [(shape[1] - 1) / 2 + 1, (shape[0] - 1) / 2 + 1]
    w.wcs.cdelt = [-pixel_scale / 3600.0, pixel_scale / 3600.0]
    return w.to_header_string()


def lens_from_parametric(model: Any, *, grid_like: xr.Dataset | tuple,
                         normalisation: str = "source", z_lens: float | None = None) -> xr.Dataset:
    """Deflection, κ and γ maps of an analytic lens on a pixel grid.

    Parameters
    ----------
    model : object
        Anything with ``deflection(x, y) -> (alpha_x, alpha_y)`` in arcsec and, optionally,
        ``hessian(x, y) -> (f_xx, f_xy, f_yx, f_yy)`` (``klever_nb.lensmodels.ParametricLens``,
        or a thin wrapper around a lenstronomy ``LensModel``).
    grid_like : xarray.Dataset or tuple
        A lens Dataset whose grid (``theta_x``, ``theta_y``, ``wcs``) is reused, or
        ``(shape, pixel_scale_arcsec, wcs_header_or_None)``; without a WCS a north-up TAN grid
        centred on (0, 0) is made. θ = 0 is the WCS reference pixel.
    normalisation : {"source", "dls_ds"}
        What the model parameters describe (galaxy-scale models fitted to the data: "source").

    References
    ----------
    K20 §3.2.1 (galaxy lenses: deflection maps computed from the mass model).
    """
    if isinstance(grid_like, xr.Dataset):
        theta_x = grid_like["theta_x"].values
        theta_y = grid_like["theta_y"].values
        header = grid_like.attrs["wcs"]
        scale = float(grid_like.attrs["pixel_scale_arcsec"])
    else:
        shape, scale, header = grid_like
        scale = float(scale)
        header = header or _default_wcs_header(tuple(shape), scale)
        wcs = wcs_from_string(header)
        theta_x = (np.arange(shape[1]) - (wcs.wcs.crpix[0] - 1)) * scale
        theta_y = (np.arange(shape[0]) - (wcs.wcs.crpix[1] - 1)) * scale
    tx, ty = np.meshgrid(theta_x, theta_y)
    ax, ay = model.deflection(tx, ty)
    data_vars = {"alpha_x": (("ly", "lx"), np.asarray(ax, float), {"units": "arcsec"}),
                 "alpha_y": (("ly", "lx"), np.asarray(ay, float), {"units": "arcsec"})}
    if hasattr(model, "hessian"):
        h = model.hessian(tx, ty)
        fxx, fxy, fyy = (h[0], h[1], h[3]) if len(h) == 4 else h
        g1, g2 = 0.5 * (np.asarray(fxx) - fyy), np.asarray(fxy, float)
        data_vars["kappa"] = (("ly", "lx"), 0.5 * (np.asarray(fxx) + fyy), {"units": ""})
        data_vars["gamma"] = (("ly", "lx"), np.hypot(g1, g2), {"units": ""})
        data_vars["gamma1"] = (("ly", "lx"), g1, {"units": ""})
        data_vars["gamma2"] = (("ly", "lx"), g2, {"units": ""})
    coords = {"ly": np.arange(len(theta_y)), "lx": np.arange(len(theta_x)),
              "theta_x": ("lx", theta_x, {"units": "arcsec"}),
              "theta_y": ("ly", theta_y, {"units": "arcsec"})}
    attrs = {"wcs": header, "pixel_scale_arcsec": scale, "normalisation": normalisation,
             "model": repr(model)}
    if z_lens is not None:
        attrs["z_lens"] = float(z_lens)
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def lens_from_components(components: tuple[dict, ...] | list[dict], *, pixel_scale_arcsec: float,
                         size_arcsec: float, wcs: str | None = None,
                         z_lens: float | None = None) -> xr.Dataset:
    """Lens maps of the ``[[lens.components]]`` of a galaxy TOML (SIE/EPL + shear, K20 §3.2.1).

    Uses ``klever_nb.lensmodels.ParametricLens`` (lenstronomy profiles); the grid is
    ``size_arcsec`` wide at ``pixel_scale_arcsec`` around θ = 0 (or the given WCS).
    """
    from klever_nb.lensmodels import ParametricLens  # written in parallel; imported lazily

    n = int(round(size_arcsec / pixel_scale_arcsec))
    model = ParametricLens(components=tuple(components))
    return lens_from_parametric(model, grid_like=((n, n), pixel_scale_arcsec, wcs),
                                normalisation="source", z_lens=z_lens)


# ---------------------------------------------------------------------------------------------
# Registration: exact-overlap rebinning between the IFU grid and the lens grid
# ---------------------------------------------------------------------------------------------

def _affine_lens_to_cube(lens_wcs, cube_wcs, box: tuple[int, int, int, int]) -> np.ndarray:
    """2×3 affine (lens pixel x, y) → (cube pixel x, y), fitted on a 5×5 net over ``box``."""
    y0, y1, x0, x1 = box
    gx, gy = np.meshgrid(np.linspace(x0, x1, 5), np.linspace(y0, y1, 5))
    sky = lens_wcs.pixel_to_world(gx.ravel(), gy.ravel())
    cx, cy = cube_wcs.world_to_pixel(sky)
    design = np.column_stack([gx.ravel(), gy.ravel(), np.ones(gx.size)])
    coef_x = np.linalg.lstsq(design, cx, rcond=None)[0]
    coef_y = np.linalg.lstsq(design, cy, rcond=None)[0]
    return np.vstack([coef_x, coef_y])


def _overlap_box(lens_wcs, lens_shape, other_wcs, other_shape, margin_pix: int = 0):
    """Bounding box (y0, y1, x0, x1) on the lens grid of another grid's footprint, or None."""
    ny, nx = other_shape
    ex = np.array([-0.5, nx - 0.5, -0.5, nx - 0.5])
    ey = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])
    lx, ly = lens_wcs.world_to_pixel(other_wcs.pixel_to_world(ex, ey))
    x0 = max(int(np.floor(lx.min())) - margin_pix, 0)
    x1 = min(int(np.ceil(lx.max())) + margin_pix, lens_shape[1] - 1)
    y0 = max(int(np.floor(ly.min())) - margin_pix, 0)
    y1 = min(int(np.ceil(ly.max())) + margin_pix, lens_shape[0] - 1)
    if x0 > x1 or y0 > y1:
        return None
    return y0, y1, x0, x1


@dataclass(frozen=True)
class _Overlap:
    """Sparse overlap matrix between fine (lens) pixels and coarse (IFU) pixels.

    ``fine[k]``, ``coarse[k]``, ``weight[k]``: the fraction of fine pixel ``fine[k]`` that lies
    in coarse pixel ``coarse[k]`` (flat indices; fractions of one fine pixel sum to ≤ 1).
    """

    fine: np.ndarray
    coarse: np.ndarray
    weight: np.ndarray
    n_fine: int
    n_coarse: int


def _axis_overlap(centre: np.ndarray, half: float, n: int):
    """Per-axis overlap of intervals [c−h, c+h] with unit cells [j−0.5, j+0.5], j in 0..n−1."""
    k_max = int(np.ceil(2 * half)) + 1
    j0 = np.floor(centre - half + 0.5).astype(np.int64)
    idx, w = [], []
    for k in range(k_max):  # loop over at most a few neighbours, vectorised over pixels
        j = j0 + k
        lo = np.maximum(centre - half, j - 0.5)
        hi = np.minimum(centre + half, j + 0.5)
        wk = np.clip(hi - lo, 0.0, None) / (2 * half)
        wk = np.where((j >= 0) & (j < n), wk, 0.0)
        idx.append(j)
        w.append(wk)
    return np.stack(idx, -1), np.stack(w, -1)


def _overlap(affine: np.ndarray, fine_y: np.ndarray, fine_x: np.ndarray,
             coarse_shape: tuple[int, int], subsample: int = 5) -> _Overlap:
    """Exact overlap fractions for axis-aligned grids, ``subsample``² sub-points otherwise."""
    ny, nx = coarse_shape
    fy, fx = np.meshgrid(fine_y, fine_x, indexing="ij")
    fy, fx = fy.ravel().astype(float), fx.ravel().astype(float)
    n_fine = fy.size
    a = affine
    rotated = abs(a[0, 1]) + abs(a[1, 0]) > 1e-6 * (abs(a[0, 0]) + abs(a[1, 1]))
    if not rotated:
        cx = a[0, 0] * fx + a[0, 2]
        cy = a[1, 1] * fy + a[1, 2]
        jx, wx = _axis_overlap(cx, 0.5 * abs(a[0, 0]), nx)
        jy, wy = _axis_overlap(cy, 0.5 * abs(a[1, 1]), ny)
        coarse = (jy[:, :, None] * nx + jx[:, None, :]).reshape(n_fine, -1)
        weight = (wy[:, :, None] * wx[:, None, :]).reshape(n_fine, -1)
    else:
        off = (np.arange(subsample) + 0.5) / subsample - 0.5
        oy, ox = [o.ravel() for o in np.meshgrid(off, off, indexing="ij")]
        sx = fx[:, None] + ox[None, :]
        sy = fy[:, None] + oy[None, :]
        cx = np.rint(a[0, 0] * sx + a[0, 1] * sy + a[0, 2]).astype(np.int64)
        cy = np.rint(a[1, 0] * sx + a[1, 1] * sy + a[1, 2]).astype(np.int64)
        inside = (cx >= 0) & (cx < nx) & (cy >= 0) & (cy < ny)
        coarse = cy * nx + cx
        weight = inside / float(subsample**2)
    fine = np.broadcast_to(np.arange(n_fine)[:, None], coarse.shape)
    keep = weight > 0
    return _Overlap(fine[keep], coarse[keep], weight[keep], n_fine, ny * nx)


def _map_variables(maps: xr.Dataset) -> list[str]:
    """Variables of a line-map Dataset that carry per-pixel values to be resampled."""
    return [name for name, v in maps.data_vars.items()
            if {"y", "x"} <= set(v.dims) and (v.dtype.kind in "fb")]


def rebin_to_lens_grid(maps: xr.Dataset, lens: xr.Dataset, *, cube_wcs: str,
                       shift_arcsec: tuple[float, float] = (0.0, 0.0),
                       flux_vars: tuple[str, ...] = ("flux", "flux_err")) -> xr.Dataset:
    """Rebin IFU line maps onto the lens pixel grid and convert flux to surface brightness.

    Each lens pixel takes the overlap-weighted mean of the IFU spaxels it covers (exact
    overlap for grids without relative rotation, 5×5 sub-points otherwise), so that
    Σ SB × pixel area is conserved. ``flux_vars`` (flux per spaxel) are divided by the spaxel
    area to give surface brightness per arcsec²; intensive quantities (velocity, σ, SNR) are
    averaged the same way. ``flux_err`` is averaged linearly (errors of one spaxel are fully
    correlated across the lens pixels it feeds; :func:`delens` accounts for that through
    ``spaxel_index``).

    Parameters
    ----------
    maps : xarray.Dataset
        Line maps on ``(line, y, x)`` (variables on ``(y, x)`` are carried too).
    lens : xarray.Dataset
        Lens maps (their grid and ``wcs``).
    cube_wcs : str
        Celestial WCS header string of the IFU cube (``cube.attrs["wcs"]``).
    shift_arcsec : (dy, dx)
        Registration shift along the lens pixel axes added to the IFU positions
        (from :func:`align_offset`).

    Returns
    -------
    xarray.Dataset
        Same variables on ``(line, ly, lx)`` for the lens pixels inside the cube footprint,
        plus ``spaxel_index`` (flat index of the spaxel under each lens pixel centre) and
        ``theta_x``/``theta_y`` coordinates; attrs of the lens grid.

    Raises
    ------
    InputError
        If the deflection maps do not overlap the cube.

    References
    ----------
    K20 §3.2.2 ("we rebin our IFU data to the same pixel scaling as the HST observations").
    """
    lens_wcs = wcs_from_string(lens.attrs["wcs"])
    c_wcs = wcs_from_string(cube_wcs)
    cube_shape = (maps.sizes["y"], maps.sizes["x"])
    lens_shape = (lens.sizes["ly"], lens.sizes["lx"])
    p_lens = float(lens.attrs["pixel_scale_arcsec"])
    p_cube = pixel_scale_from_wcs(c_wcs)
    box = _overlap_box(lens_wcs, lens_shape, c_wcs, cube_shape,
                       margin_pix=int(np.ceil(max(map(abs, shift_arcsec)) / p_lens)) + 1)
    if box is None:
        raise InputError("lens maps: the deflection maps do not overlap the cube (check the "
                         "WCS of the cube and of the deflection maps, or lens.deflection_x/y)")
    affine = _affine_lens_to_cube(lens_wcs, c_wcs, box)
    dy, dx = shift_arcsec
    # a lens pixel at p samples the cube at p − shift (shift moves the IFU content by +shift)
    affine = affine.copy()
    affine[:, 2] -= affine[:, 0] * dx / p_lens + affine[:, 1] * dy / p_lens
    ly = np.arange(box[0], box[1] + 1)
    lx = np.arange(box[2], box[3] + 1)
    ov = _overlap(affine, ly, lx, cube_shape)
    covered = np.bincount(ov.fine, ov.weight, ov.n_fine)
    if not np.any(covered > 0.5):
        raise InputError("lens maps: the deflection maps do not overlap the cube (no lens pixel "
                         "falls inside the IFU field; check both WCS)")
    area_cube = p_cube**2
    out_vars = {}
    for name in _map_variables(maps):
        var = maps[name]
        lead = [d for d in var.dims if d not in ("y", "x")]
        values = var.transpose(*lead, "y", "x").values.astype(float)
        flat = values.reshape(-1, cube_shape[0] * cube_shape[1])
        if name in flux_vars:
            flat = flat / area_cube
        rebinned = _resample_mean(flat, ov, covered)
        out_vars[name] = (tuple(lead) + ("ly", "lx"),
                          rebinned.reshape(values.shape[:-2] + (ly.size, lx.size)),
                          _sb_attrs(var.attrs, name in flux_vars))
    # spaxel under each lens pixel centre (for correlated errors in delens)
    fy, fx = np.meshgrid(ly, lx, indexing="ij")
    cx = np.rint(affine[0, 0] * fx + affine[0, 1] * fy + affine[0, 2]).astype(np.int64)
    cy = np.rint(affine[1, 0] * fx + affine[1, 1] * fy + affine[1, 2]).astype(np.int64)
    inside = (cx >= 0) & (cx < cube_shape[1]) & (cy >= 0) & (cy < cube_shape[0])
    out_vars["spaxel_index"] = (("ly", "lx"), np.where(inside, cy * cube_shape[1] + cx, -1),
                                {"description": "flat index y*nx+x of the IFU spaxel under the "
                                                "lens pixel centre (-1 outside)"})
    coords = {"ly": ly, "lx": lx,
              "theta_x": ("lx", lens["theta_x"].values[lx], {"units": "arcsec"}),
              "theta_y": ("ly", lens["theta_y"].values[ly], {"units": "arcsec"})}
    if "line" in maps.coords:
        coords["line"] = maps["line"].values
    attrs = dict(maps.attrs)
    attrs.update(wcs=lens.attrs["wcs"], pixel_scale_arcsec=p_lens, cube_pixel_scale_arcsec=p_cube,
                 cube_wcs=cube_wcs, shift_arcsec=[float(dy), float(dx)],
                 cube_shape=list(cube_shape), quantity="surface brightness (per arcsec2)")
    return xr.Dataset(out_vars, coords=coords, attrs=attrs)


def _sb_attrs(attrs: dict, is_flux: bool) -> dict:
    new = dict(attrs)
    if is_flux:
        units = attrs.get("units", "")
        new["units"] = f"({units}) / arcsec2" if units else "1 / arcsec2"
    return new


def _resample_mean(flat: np.ndarray, ov: _Overlap, covered: np.ndarray) -> np.ndarray:
    """Overlap-weighted mean of coarse values in each fine pixel (NaN when < half covered)."""
    out = np.full((flat.shape[0], ov.n_fine), np.nan)
    for i, row in enumerate(flat):  # loop over maps (lines), vectorised over pixels
        v = row[ov.coarse]
        ok = np.isfinite(v)
        w = np.bincount(ov.fine[ok], ov.weight[ok], ov.n_fine)
        s = np.bincount(ov.fine[ok], ov.weight[ok] * v[ok], ov.n_fine)
        good = (w > 0.5) & (w >= 0.5 * covered)
        out[i, good] = s[good] / w[good]
    return out


def align_offset(image_map: xr.DataArray, reference_image: xr.DataArray, *,
                 smooth_fwhm_arcsec: float | None = None,
                 box_arcsec: float = 0.6) -> tuple[float, float]:
    """Shift (dy, dx) in arcsec that moves the IFU map's peak onto the reference image's peak.

    Both maps carry a celestial ``attrs["wcs"]`` (e.g. the IFU continuum or H-band line map,
    and the HST H-band image). Each peak is the flux-weighted centroid within ``box_arcsec``
    of the brightest pixel, after smoothing the reference to ``smooth_fwhm_arcsec`` (the IFU
    PSF) if given. The shift is along the reference image's pixel axes (the lens grid in the
    paper), the convention of ``rebin_to_lens_grid(shift_arcsec=...)``.

    References
    ----------
    K20 §3.2.2 (align the continuum, or the H-band emission-line peak, with the HST image).
    """
    w_map = wcs_from_string(image_map.attrs["wcs"])
    w_ref = wcs_from_string(reference_image.attrs["wcs"])
    p_ref = pixel_scale_from_wcs(w_ref)
    p_map = pixel_scale_from_wcs(w_map)
    ref = np.nan_to_num(np.asarray(reference_image.values, float))
    if smooth_fwhm_arcsec:
        ref = ndimage.gaussian_filter(ref, smooth_fwhm_arcsec / FWHM_PER_SIGMA / p_ref)
    ry, rx = _peak_centroid(ref, box_arcsec / p_ref)
    my, mx = _peak_centroid(np.nan_to_num(np.asarray(image_map.values, float)), box_arcsec / p_map)
    sx, sy = w_ref.world_to_pixel(w_map.pixel_to_world(mx, my))
    return float((ry - sy) * p_ref), float((rx - sx) * p_ref)


def _peak_centroid(img: np.ndarray, radius_pix: float) -> tuple[float, float]:
    """Flux-weighted centroid (y, x) within ``radius_pix`` of the brightest pixel."""
    iy, ix = np.unravel_index(np.argmax(img), img.shape)
    yy, xx = np.indices(img.shape)
    sel = ((yy - iy) ** 2 + (xx - ix) ** 2 <= max(radius_pix, 1.0) ** 2) & (img > 0)
    w = img[sel]
    return float(np.sum(w * yy[sel]) / w.sum()), float(np.sum(w * xx[sel]) / w.sum())


# ---------------------------------------------------------------------------------------------
# Ray tracing and de-lensing
# ---------------------------------------------------------------------------------------------

def _subpixel_offsets(subsample: int) -> tuple[np.ndarray, np.ndarray]:
    off = (np.arange(subsample) + 0.5) / subsample - 0.5
    oy, ox = np.meshgrid(off, off, indexing="ij")
    return oy.ravel(), ox.ravel()


def _trace_rays(lens: xr.Dataset, ly: np.ndarray, lx: np.ndarray, subsample: int):
    """β of ``subsample``² rays per lens pixel of the sub-grid (ly × lx): arrays (npix, s²).

    α at sub-pixel rays is bilinear between pixel centres; with ``subsample = 1`` the map
    values are used as they are.
    """
    p = float(lens.attrs["pixel_scale_arcsec"])
    tx = lens["theta_x"].values
    ty = lens["theta_y"].values
    gy, gx = np.meshgrid(ly, lx, indexing="ij")
    gy, gx = gy.ravel(), gx.ravel()
    if subsample == 1:
        ax = lens["alpha_x"].values[gy, gx][:, None]
        ay = lens["alpha_y"].values[gy, gx][:, None]
        theta_x = tx[gx][:, None]
        theta_y = ty[gy][:, None]
    else:
        oy, ox = _subpixel_offsets(subsample)
        py = gy[:, None] + oy[None, :]
        px = gx[:, None] + ox[None, :]
        ax = ndimage.map_coordinates(lens["alpha_x"].values, [py, px], order=1, mode="nearest")
        ay = ndimage.map_coordinates(lens["alpha_y"].values, [py, px], order=1, mode="nearest")
        theta_x = tx[gx][:, None] + ox[None, :] * p
        theta_y = ty[gy][:, None] + oy[None, :] * p
    return theta_x - ax, theta_y - ay


@dataclass(frozen=True)
class SourceGrid:
    """Regular source-plane grid: pixel centres ``x0 + i*pixel`` (arcsec, lens frame)."""

    x0: float
    y0: float
    pixel: float
    nx: int
    ny: int

    @property
    def n(self) -> int:
        return self.nx * self.ny

    @property
    def beta_x(self) -> np.ndarray:
        return self.x0 + self.pixel * np.arange(self.nx)

    @property
    def beta_y(self) -> np.ndarray:
        return self.y0 + self.pixel * np.arange(self.ny)

    def index(self, bx: np.ndarray, by: np.ndarray) -> np.ndarray:
        """Flat source-pixel index of each ray, −1 outside the grid."""
        ix = np.floor((bx - self.x0) / self.pixel + 0.5).astype(np.int64)
        iy = np.floor((by - self.y0) / self.pixel + 0.5).astype(np.int64)
        inside = (ix >= 0) & (ix < self.nx) & (iy >= 0) & (iy < self.ny)
        return np.where(inside, iy * self.nx + ix, -1)

    @classmethod
    def around(cls, centre: tuple[float, float], pixel: float, x_range: tuple[float, float],
               y_range: tuple[float, float]) -> SourceGrid:
        """Grid with a pixel centred on ``centre`` covering ``x_range``/``y_range`` (arcsec)."""
        cx, cy = centre
        nxl = int(np.ceil((cx - x_range[0]) / pixel - 0.5 + 1e-9))
        nxh = int(np.ceil((x_range[1] - cx) / pixel - 0.5 + 1e-9))
        nyl = int(np.ceil((cy - y_range[0]) / pixel - 0.5 + 1e-9))
        nyh = int(np.ceil((y_range[1] - cy) / pixel - 0.5 + 1e-9))
        nxl, nxh, nyl, nyh = (max(v, 0) for v in (nxl, nxh, nyl, nyh))
        return cls(cx - nxl * pixel, cy - nyl * pixel, pixel, nxl + nxh + 1, nyl + nyh + 1)


def _bin_mean(src: np.ndarray, values: np.ndarray, n_src: int):
    """Mean of ``values`` per source pixel (finite values at ``src >= 0``): (mean, count)."""
    ok = (src >= 0) & np.isfinite(values)
    counts = np.bincount(src[ok], minlength=n_src)
    sums = np.bincount(src[ok], values[ok], minlength=n_src)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan), counts


def _bin_mean_reference(src: np.ndarray, values: np.ndarray, n_src: int):
    """Slow twin of :func:`_bin_mean`: a plain loop over rays, summing in the same order."""
    sums = [0.0] * n_src
    counts = [0] * n_src
    for k in range(src.size):
        if src[k] >= 0 and np.isfinite(values[k]):
            sums[src[k]] += float(values[k])
            counts[src[k]] += 1
    mean = np.array([s / c if c else np.nan for s, c in zip(sums, counts, strict=True)])
    return mean, np.array(counts)


def _bin_error(src: np.ndarray, err: np.ndarray, group: np.ndarray | None, n_src: int,
               counts: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """σ of the per-source-pixel mean.

    ``group is None``: independent rays, σ = sqrt(Σσ²)/N. Otherwise rays of one group (one
    IFU spaxel) share one noise draw: σ = sqrt(Σ_g (Σ_{r∈g} σ_r)²)/N.
    """
    ok = valid & (src >= 0) & np.isfinite(err)
    s, e = src[ok], err[ok]
    if group is None:
        var = np.bincount(s, e * e, minlength=n_src)
    else:
        key = s * (int(group.max()) + 2) + (group[ok] + 1)
        uniq, inv = np.unique(key, return_inverse=True)
        lin = np.bincount(inv, e, minlength=uniq.size)
        var = np.bincount(uniq // (int(group.max()) + 2), lin * lin, minlength=n_src)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, np.sqrt(var) / counts, np.nan)


def _label_images(footprint: np.ndarray, min_pixels: int) -> tuple[np.ndarray, int]:
    """Connected components (8-connected) of the image-plane footprint; small ones → 0."""
    labels, n = ndimage.label(footprint, structure=np.ones((3, 3), bool))
    if n == 0:
        return labels, 0
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    big = np.flatnonzero(sizes >= min_pixels)
    big = big[big > 0]
    relabel = np.zeros(n + 1, np.int64)
    relabel[big] = np.arange(1, big.size + 1)
    return relabel[labels], int(big.size)


def delens(maps_sb: xr.Dataset, lens: xr.Dataset, *, source_pixel_arcsec: float | None = None,
           subsample: int = 1, source_extent: float | tuple[float, float] | None = None,
           kpc_per_arcsec: float | None = None, centre: tuple[float, float] | None = None,
           centre_line: str = "Halpha", errors: str = "spaxel",
           footprint: xr.DataArray | None = None, min_image_pixels: int = 4) -> xr.Dataset:
    """Source-plane maps: each source pixel is the mean of the image rays landing in it.

    Parameters
    ----------
    maps_sb : xarray.Dataset
        Surface-brightness maps on ``(line, ly, lx)`` (output of :func:`rebin_to_lens_grid`).
    lens : xarray.Dataset
        Lens maps at the source redshift (``normalisation == "source"``), covering ``maps_sb``.
    source_pixel_arcsec : float, optional
        Source pixel; default the lens pixel (K20 §3.2.3 for KMOS).
    subsample : int
        Rays per image pixel along each axis (FACTS.md §12: one ray per pixel leaves holes
        when the source pixel is smaller than the de-magnified image pixel).
    source_extent : float or (float, float), optional
        Half-widths (x, y) in arcsec of the grid around the centre; default: all rays.
    kpc_per_arcsec : float, optional
        Physical scale; default from ``lens.attrs["z_source"]``.
    centre : (beta_x, beta_y), optional
        Galaxy centre in the source plane (arcsec, lens frame); default the SB-weighted
        centroid of ``centre_line`` (or of the first line).
    errors : {"spaxel", "independent"}
        ``independent``: σ = sqrt(Σσ²)/N over the rays; ``spaxel``: rays from one IFU spaxel
        (``spaxel_index``; else one image pixel) have correlated noise (see :func:`_bin_error`).
    footprint : xarray.DataArray of bool, optional
        Image-plane pixels that belong to the galaxy, labelled as images; default pixels with a
        finite value of ``centre_line``.
    min_image_pixels : int
        Components of the footprint smaller than this are not counted as images.

    Returns
    -------
    xarray.Dataset
        Every input variable on ``(line, ys, xs)`` (``snr`` recomputed as flux/flux_err),
        ``n_image_pixels`` (line, ys, xs; rays / subsample²), ``n_images``, ``image_id``
        (dominant image label, 0 for none) and ``image_bits`` (bit k−1 set if image k fed the
        pixel) on ``(ys, xs)``. Coordinates ``xs``/``ys`` (kpc from the centre),
        ``xs_arcsec``/``ys_arcsec`` and ``beta_x``/``beta_y``. Empty source pixels are NaN.

    References
    ----------
    K20 §3.2.3; FACTS.md §12 (coverage and cost of bincount de-lensing).
    """
    if errors not in {"spaxel", "independent"}:
        raise ConfigError(f"errors must be 'spaxel' or 'independent', got {errors!r}")
    if lens.attrs.get("normalisation", "source") != "source":
        raise ConfigError("lens maps are in the 'dls_ds' normalisation: call rescale_lens(lens, "
                          "z_lens=..., z_source=...) before delens")
    ly, lx = maps_sb["ly"].values, maps_sb["lx"].values
    pixel = float(source_pixel_arcsec or lens.attrs["pixel_scale_arcsec"])
    scale = kpc_per_arcsec
    if scale is None:
        if "z_source" not in lens.attrs:
            raise ConfigError("delens needs kpc_per_arcsec= or a lens with attrs['z_source']")
        scale = _kpc_per_arcsec(float(lens.attrs["z_source"]))
    bx, by = _trace_rays(lens, ly, lx, subsample)
    s2 = subsample * subsample
    lines = list(maps_sb["line"].values) if "line" in maps_sb.dims else [None]
    names = _map_variables_lens(maps_sb)
    ref_line = centre_line if centre_line in lines else lines[0]
    ref_flux = _line_values(maps_sb, "flux" if "flux" in names else names[0], ref_line)
    if footprint is None:
        fp = np.isfinite(ref_flux)
    else:
        fp = footprint.sel(ly=ly, lx=lx).values.astype(bool).ravel()
    any_finite = np.zeros(ly.size * lx.size, bool)
    for name in names:
        v = maps_sb[name]
        any_finite |= np.isfinite(v.values.reshape(-1, ly.size * lx.size)).any(axis=0)
    if not any_finite.any():
        raise InputError("line maps: no finite pixel to de-lens (all NaN on the lens grid)")
    use = any_finite[:, None] & np.ones((1, s2), bool)
    # provisional grid over all rays, then centre on the galaxy and crop
    bxf, byf = bx[use], by[use]
    rng_x, rng_y = (bxf.min(), bxf.max()), (byf.min(), byf.max())
    if centre is None:
        grid0 = SourceGrid.around(((rng_x[0] + rng_x[1]) / 2, (rng_y[0] + rng_y[1]) / 2), pixel,
                                  rng_x, rng_y)
        idx0 = grid0.index(bx, by).ravel()
        m0, _ = _bin_mean(idx0, np.repeat(ref_flux, s2), grid0.n)
        w = np.nan_to_num(m0).reshape(grid0.ny, grid0.nx).clip(min=0)
        if w.sum() <= 0:
            w = np.isfinite(m0).reshape(grid0.ny, grid0.nx).astype(float)
        centre = (float(np.sum(w.sum(0) * grid0.beta_x) / w.sum()),
                  float(np.sum(w.sum(1) * grid0.beta_y) / w.sum()))
    if source_extent is not None:
        hx, hy = np.broadcast_to(np.asarray(source_extent, float), (2,))
        rng_x, rng_y = (centre[0] - hx, centre[0] + hx), (centre[1] - hy, centre[1] + hy)
    grid = SourceGrid.around(centre, pixel, rng_x, rng_y)
    src = grid.index(bx, by)  # (npix, s2)
    src_flat = src.ravel()
    group = None
    if errors == "spaxel":
        if "spaxel_index" in maps_sb:
            group = np.repeat(maps_sb["spaxel_index"].values.ravel(), s2)
        else:
            group = np.repeat(np.arange(ly.size * lx.size), s2)

    out_vars: dict[str, Any] = {}
    n_pix = np.full((len(lines), grid.ny, grid.nx), 0.0)
    flux_counts = {}
    for name in names:
        stack = []
        for i, line in enumerate(lines):
            values = np.repeat(_line_values(maps_sb, name, line), s2)
            if name == "flux_err":
                valid = np.isfinite(np.repeat(_line_values(maps_sb, "flux", line), s2)) \
                    if "flux" in names else np.ones_like(values, bool)
                counts = flux_counts.get(i)
                if counts is None:
                    counts = np.bincount(src_flat[valid & (src_flat >= 0)], minlength=grid.n)
                mean = _bin_error(src_flat, values, group, grid.n, counts, valid)
            else:
                mean, counts = _bin_mean(src_flat, values, grid.n)
                if name == "flux":
                    flux_counts[i] = counts
                    n_pix[i] = counts.reshape(grid.ny, grid.nx) / s2
            stack.append(mean.reshape(grid.ny, grid.nx))
        dims = ("line", "ys", "xs") if lines[0] is not None else ("ys", "xs")
        arr = np.stack(stack) if lines[0] is not None else stack[0]
        out_vars[name] = (dims, arr, dict(maps_sb[name].attrs))
    if "flux" in out_vars and "flux_err" in out_vars:
        with np.errstate(invalid="ignore", divide="ignore"):
            out_vars["snr"] = (out_vars["flux"][0], out_vars["flux"][1] / out_vars["flux_err"][1],
                               {"units": "", "description": "flux / flux_err in the source plane"})
    if lines[0] is not None:
        out_vars["n_image_pixels"] = (("line", "ys", "xs"), n_pix,
                                      {"description": "image pixels (rays / subsample^2) in the "
                                                      "mean of each source pixel"})
    out_vars.update(_image_bookkeeping(fp.reshape(ly.size, lx.size), src, grid, min_image_pixels))
    xs_arcsec = grid.beta_x - centre[0]
    ys_arcsec = grid.beta_y - centre[1]
    coords = {
        "xs": ("xs", xs_arcsec * scale, {"units": "kpc", "description": "from the galaxy centre"}),
        "ys": ("ys", ys_arcsec * scale, {"units": "kpc", "description": "from the galaxy centre"}),
        "xs_arcsec": ("xs", xs_arcsec, {"units": "arcsec"}),
        "ys_arcsec": ("ys", ys_arcsec, {"units": "arcsec"}),
        "beta_x": ("xs", grid.beta_x, {"units": "arcsec", "description": "source plane, lens frame"}),
        "beta_y": ("ys", grid.beta_y, {"units": "arcsec", "description": "source plane, lens frame"}),
    }
    if lines[0] is not None:
        coords["line"] = np.asarray(lines)
    attrs = {k: v for k, v in maps_sb.attrs.items() if k not in {"cube_wcs"}}
    attrs.update(source_pixel_arcsec=pixel, kpc_per_arcsec=float(scale), subsample=int(subsample),
                 centre_beta_arcsec=[float(centre[0]), float(centre[1])], errors=errors,
                 lens_wcs=lens.attrs["wcs"], plane="source")
    return xr.Dataset(out_vars, coords=coords, attrs=attrs)


def _map_variables_lens(maps: xr.Dataset) -> list[str]:
    return [name for name, v in maps.data_vars.items()
            if {"ly", "lx"} <= set(v.dims) and v.dtype.kind == "f" and name != "snr"]


def _line_values(maps: xr.Dataset, name: str, line) -> np.ndarray:
    var = maps[name]
    if "line" in var.dims:
        var = var.sel(line=line)
    return var.transpose("ly", "lx").values.astype(float).ravel()


def _image_bookkeeping(footprint: np.ndarray, src: np.ndarray, grid: SourceGrid,
                       min_pixels: int) -> dict:
    """Which image (connected footprint component) fed each source pixel."""
    labels, n_img = _label_images(footprint, min_pixels)
    s2 = src.shape[1]
    lab = np.repeat(labels.ravel(), s2)
    s = src.ravel()
    ok = (s >= 0) & (lab > 0)
    per_image = np.zeros((max(n_img, 1), grid.n), np.int64)
    if n_img:
        key = (lab[ok] - 1) * grid.n + s[ok]
        per_image = np.bincount(key, minlength=n_img * grid.n).reshape(n_img, grid.n)
    fed = per_image > 0
    n_images = fed.sum(0)
    image_id = np.where(n_images > 0, per_image.argmax(0) + 1, 0)
    bits = (fed.astype(np.int64) << np.arange(fed.shape[0], dtype=np.int64)[:, None]).sum(0) \
        if n_img <= 62 else np.full(grid.n, -1, np.int64)
    shape = (grid.ny, grid.nx)
    return {
        "n_images": (("ys", "xs"), n_images.reshape(shape),
                     {"description": "number of images (footprint components) feeding the pixel",
                      "n_images_total": n_img}),
        "image_id": (("ys", "xs"), image_id.reshape(shape),
                     {"description": "label of the image giving most rays (0: none)"}),
        "image_bits": (("ys", "xs"), bits.reshape(shape),
                       {"description": "bit k-1 set when image k fed the pixel"}),
    }


def delens_reference(maps_sb: xr.Dataset, lens: xr.Dataset, grid: SourceGrid, *, line,
                     name: str = "flux", subsample: int = 1) -> np.ndarray:
    """Slow twin of :func:`delens` for one map: a Python loop over image pixels and rays."""
    bx, by = _trace_rays(lens, maps_sb["ly"].values, maps_sb["lx"].values, subsample)
    values = _line_values(maps_sb, name, line)
    sums = np.zeros(grid.n)
    counts = np.zeros(grid.n, np.int64)
    for k in range(values.size):
        for r in range(bx.shape[1]):
            ix = int(np.floor((bx[k, r] - grid.x0) / grid.pixel + 0.5))
            iy = int(np.floor((by[k, r] - grid.y0) / grid.pixel + 0.5))
            if 0 <= ix < grid.nx and 0 <= iy < grid.ny and np.isfinite(values[k]):
                sums[iy * grid.nx + ix] += values[k]
                counts[iy * grid.nx + ix] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan).reshape(grid.ny, grid.nx)


def source_grid_of(source_maps: xr.Dataset) -> SourceGrid:
    """The :class:`SourceGrid` of a source-plane Dataset."""
    bx, by = source_maps["beta_x"].values, source_maps["beta_y"].values
    return SourceGrid(float(bx[0]), float(by[0]), float(source_maps.attrs["source_pixel_arcsec"]),
                      bx.size, by.size)

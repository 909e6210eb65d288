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

:func:`forward_model` is the reverse path (beyond the paper): source → lens → PSF → IFU grid,
built on :class:`LensingOperator` (with its exact adjoint); :func:`deconvolve_source` uses it
for a Richardson–Lucy source model whose magnification (``mu_halpha_forward``) is free of the
PSF/spaxel bias that affects the paper's μ(Hα) and μ_maps on strongly magnified arcs.

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
    "NearCriticalWarning", "as_lens_grid", "rescale_lens", "convergence_shear",
    "lens_from_parametric", "lens_from_components", "rebin_to_lens_grid", "align_offset", "delens", "forward_model",
    "LensingOperator", "deconvolve_source",
    "source_plane_psf", "fit_gaussian_ellipse", "magnification_halpha",
    "magnification_from_maps", "magnification_spread", "reconstruct_source_plane",
    "check_overlap", "unlensed_source_maps", "source_grid_of", "SourceGrid", "point_images",
    "delens_reference",
]

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
#: |μ| above which a footprint pixel counts as touching a critical curve (FACTS.md §12).
NEAR_CRITICAL_MU = 50.0


class NearCriticalWarning(UserWarning):
    """The galaxy's footprint touches a critical curve: μ there is unreliable (FACTS.md §12)."""


# ---------------------------------------------------------------------------------------------
# Lens maps: redshift rescaling, parametric models, κ and γ
# ---------------------------------------------------------------------------------------------

def _celestial(header: str | None, what: str):
    """WCS from a header string, or an InputError naming ``what`` when there is none."""
    if not header:
        raise InputError(f"{what}: no celestial WCS (attrs['wcs'] is missing or empty); the "
                         "maps cannot be placed on the sky")
    try:
        wcs = wcs_from_string(header)
    except Exception as exc:  # astropy raises several types for broken headers
        raise InputError(f"{what}: unreadable WCS header ({exc})") from None
    if wcs.naxis != 2 or not wcs.has_celestial:
        raise InputError(f"{what}: the WCS has no celestial (RA/Dec) axes; the maps cannot "
                         "be placed on the sky")
    return wcs


def as_lens_grid(lens: xr.Dataset) -> xr.Dataset:
    """A lens Dataset in this module's layout: dims ``(ly, lx)``, coords ``theta_x``/``theta_y``.

    Also accepts maps on ``(y, x)`` with ``x_arcsec``/``y_arcsec`` coordinates (the layout of
    ``klever_nb.mock.lens_maps``); θ defaults to pixel offsets from the WCS reference pixel.
    """
    if "ly" in lens.dims and "theta_x" in lens.coords:
        return lens
    out = lens
    if "y" in out.dims and "x" in out.dims and "ly" not in out.dims:
        out = out.rename({"y": "ly", "x": "lx"})
    if "theta_x" not in out.coords:
        if "x_arcsec" in out.coords and "y_arcsec" in out.coords:
            out = out.rename({"x_arcsec": "theta_x", "y_arcsec": "theta_y"})
        else:
            p = float(out.attrs["pixel_scale_arcsec"])
            w = wcs_from_string(out.attrs["wcs"])
            out = out.assign_coords(
                theta_x=("lx", (np.arange(out.sizes["lx"]) - (w.wcs.crpix[0] - 1)) * p),
                theta_y=("ly", (np.arange(out.sizes["ly"]) - (w.wcs.crpix[1] - 1)) * p))
    return out.assign_coords(ly=np.arange(out.sizes["ly"]), lx=np.arange(out.sizes["lx"]))


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
    lens = as_lens_grid(lens)
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
    lens = as_lens_grid(lens)
    if "kappa" in lens and "gamma" in lens:
        return lens["kappa"].values, lens["gamma"].values
    p = float(lens.attrs["pixel_scale_arcsec"])
    dax_dy, dax_dx = np.gradient(lens["alpha_x"].values, p)
    day_dy, day_dx = np.gradient(lens["alpha_y"].values, p)
    kappa = 0.5 * (dax_dx + day_dy)
    gamma1 = 0.5 * (dax_dx - day_dy)
    gamma2 = 0.5 * (dax_dy + day_dx)
    return kappa, np.hypot(gamma1, gamma2)


def _default_wcs_header(shape: tuple[int, int], pixel_scale: float,
                        crval: tuple[float, float] = (0.0, 0.0)) -> str:
    """TAN WCS at ``crval`` (deg), north up, east left, reference pixel at the grid centre."""
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [float(crval[0]), float(crval[1])]
    w.wcs.crpix = [(shape[1] - 1) / 2 + 1, (shape[0] - 1) / 2 + 1]
    w.wcs.cdelt = [-pixel_scale / 3600.0, pixel_scale / 3600.0]
    return w.to_header_string()


def lens_from_parametric(model: Any, *, grid_like: xr.Dataset | tuple | None = None,
                         cube_wcs: str | None = None, pixel_scale_arcsec: float | None = None,
                         size_arcsec: float | None = None, normalisation: str = "source",
                         z_lens: float | None = None) -> xr.Dataset:
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
    cube_wcs, pixel_scale_arcsec, size_arcsec : optional
        Instead of ``grid_like``: a north-up square grid ``size_arcsec`` wide at
        ``pixel_scale_arcsec`` whose centre (θ = 0) is the cube's reference position (CRVAL),
        the frame of the model's ``center_x``/``center_y`` (``[lens] grid_pixel_arcsec``,
        ``grid_size_arcsec``).
    normalisation : {"source", "dls_ds"}
        What the model parameters describe (galaxy-scale models fitted to the data: "source").

    References
    ----------
    K20 §3.2.1 (galaxy lenses: deflection maps computed from the mass model).
    """
    if grid_like is None:
        if cube_wcs is None or pixel_scale_arcsec is None or size_arcsec is None:
            raise ConfigError("lens_from_parametric needs grid_like= or cube_wcs=, "
                              "pixel_scale_arcsec= and size_arcsec=")
        n = max(int(round(size_arcsec / pixel_scale_arcsec)), 2)
        crval = _celestial(cube_wcs, "cube").wcs.crval
        header = _default_wcs_header((n, n), float(pixel_scale_arcsec), crval=tuple(crval))
        grid_like = ((n, n), float(pixel_scale_arcsec), header)
    if isinstance(grid_like, xr.Dataset):
        grid_like = as_lens_grid(grid_like)
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

    Each lens pixel takes the overlap-weighted mean of the finite IFU spaxels it covers
    (exact overlap for grids without relative rotation, 5×5 sub-points otherwise) and records
    the covered fraction in ``coverage``, so that Σ SB × coverage × pixel area equals the
    total flux exactly (drizzle-like; :func:`delens` weights pixels by ``coverage``). ``flux_vars`` (flux per spaxel) are divided by the spaxel
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
        plus ``coverage`` (line, ly, lx), ``spaxel_index`` (flat index of the spaxel under
        each lens pixel centre) and ``theta_x``/``theta_y`` coordinates; attrs of the lens
        grid.

    Raises
    ------
    InputError
        If the deflection maps do not overlap the cube.

    References
    ----------
    K20 §3.2.2 ("we rebin our IFU data to the same pixel scaling as the HST observations").
    """
    lens = as_lens_grid(lens)
    lens_wcs = _celestial(lens.attrs.get("wcs"), "lens maps")
    c_wcs = _celestial(cube_wcs, "cube")
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
    if not np.any(covered > 0):
        raise InputError("lens maps: the deflection maps do not overlap the cube (no lens pixel "
                         "falls inside the IFU field; check both WCS)")
    area_cube = p_cube**2
    out_vars = {}
    coverage = None
    for name in _map_variables(maps):
        var = maps[name]
        lead = [d for d in var.dims if d not in ("y", "x")]
        values = var.transpose(*lead, "y", "x").values.astype(float)
        flat = values.reshape(-1, cube_shape[0] * cube_shape[1])
        if name in flux_vars:
            flat = flat / area_cube
        rebinned, weight = _resample_mean(flat, ov)
        shape = values.shape[:-2] + (ly.size, lx.size)
        out_vars[name] = (tuple(lead) + ("ly", "lx"), rebinned.reshape(shape),
                          _sb_attrs(var.attrs, name in flux_vars))
        if name == "flux":
            coverage = (tuple(lead) + ("ly", "lx"), weight.reshape(shape),
                        {"units": "", "description": "fraction of the lens pixel covered by "
                         "spaxels with a finite flux (weight of the pixel in delens)"})
    if coverage is not None:
        out_vars["coverage"] = coverage
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


def _resample_mean(flat: np.ndarray, ov: _Overlap) -> tuple[np.ndarray, np.ndarray]:
    """Overlap-weighted mean of the finite coarse values in each fine pixel, and the covered
    fraction (weight). Σ mean × weight × fine area = Σ coarse value × coarse area exactly."""
    out = np.full((flat.shape[0], ov.n_fine), np.nan)
    weight = np.zeros((flat.shape[0], ov.n_fine))
    for i, row in enumerate(flat):  # loop over maps (lines), vectorised over pixels
        v = row[ov.coarse]
        ok = np.isfinite(v)
        w = np.bincount(ov.fine[ok], ov.weight[ok], ov.n_fine)
        s = np.bincount(ov.fine[ok], ov.weight[ok] * v[ok], ov.n_fine)
        good = w > 1e-12
        out[i, good] = s[good] / w[good]
        weight[i] = np.where(good, w, 0.0)
    return out, weight


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
    tx = lens["theta_x"].values[lx]
    ty = lens["theta_y"].values[ly]
    n = ly.size * lx.size
    if subsample == 1:
        block = np.ix_(ly, lx)
        bx = (tx[None, :] - lens["alpha_x"].values[block]).reshape(n, 1)
        by = (ty[:, None] - lens["alpha_y"].values[block]).reshape(n, 1)
        return bx, by
    oy, ox = _subpixel_offsets(subsample)
    ax = _alpha_subpixel(lens["alpha_x"].values, ly, lx, oy, ox)
    ay = _alpha_subpixel(lens["alpha_y"].values, ly, lx, oy, ox)
    theta_x = np.broadcast_to(tx[None, :], (ly.size, lx.size)).reshape(n, 1) + ox[None, :] * p
    theta_y = np.broadcast_to(ty[:, None], (ly.size, lx.size)).reshape(n, 1) + oy[None, :] * p
    return theta_x - ax, theta_y - ay


def _alpha_subpixel(alpha: np.ndarray, ly: np.ndarray, lx: np.ndarray, oy: np.ndarray,
                    ox: np.ndarray) -> np.ndarray:
    """Bilinear α at fixed sub-pixel offsets of every pixel of a contiguous block: (npix, s²).

    Equivalent to ``ndimage.map_coordinates(order=1, mode="nearest")`` but by shifted slices
    (the offsets are the same for every pixel), several times faster.
    """
    contiguous = (ly.size > 0 and lx.size > 0 and np.all(np.diff(ly) == 1)
                  and np.all(np.diff(lx) == 1))
    if not contiguous:
        gy, gx = np.meshgrid(ly, lx, indexing="ij")
        py = gy.ravel()[:, None] + oy[None, :]
        px = gx.ravel()[:, None] + ox[None, :]
        return ndimage.map_coordinates(alpha, [py, px], order=1, mode="nearest")
    y0, x0, ny, nx = int(ly[0]), int(lx[0]), ly.size, lx.size
    pad = np.pad(alpha[max(y0 - 1, 0):y0 + ny + 1, max(x0 - 1, 0):x0 + nx + 1],
                 ((int(y0 == 0), int(y0 + ny + 1 > alpha.shape[0])),
                  (int(x0 == 0), int(x0 + nx + 1 > alpha.shape[1]))), mode="edge")

    def shifted(dy: int, dx: int) -> np.ndarray:
        return pad[1 + dy:1 + dy + ny, 1 + dx:1 + dx + nx]

    out = np.empty((ny * nx, oy.size))
    for k, (fy, fx) in enumerate(zip(oy, ox, strict=True)):  # s² offsets, vectorised
        sy, sx = (1 if fy >= 0 else -1), (1 if fx >= 0 else -1)
        wy, wx = abs(fy), abs(fx)
        out[:, k] = ((1 - wy) * (1 - wx) * shifted(0, 0) + (1 - wy) * wx * shifted(0, sx)
                     + wy * (1 - wx) * shifted(sy, 0) + wy * wx * shifted(sy, sx)).ravel()
    return out


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
        fx = np.floor((bx - self.x0) / self.pixel + 0.5)
        fy = np.floor((by - self.y0) / self.pixel + 0.5)
        inside = (fx >= 0) & (fx < self.nx) & (fy >= 0) & (fy < self.ny)  # False for NaN β
        ix = np.where(inside, fx, 0).astype(np.int64)
        iy = np.where(inside, fy, 0).astype(np.int64)
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


def _bin_mean(src: np.ndarray, values: np.ndarray, n_src: int, weights: np.ndarray | None = None):
    """Weighted mean of ``values`` per source pixel (finite values, ``src >= 0``, weight > 0).

    Returns (mean, total weight); with ``weights=None`` every ray weighs 1 (a plain mean).
    """
    ok = (src >= 0) & np.isfinite(values)
    if weights is None:
        total = np.bincount(src[ok], minlength=n_src).astype(float)
        sums = np.bincount(src[ok], values[ok], minlength=n_src)
    else:
        ok &= weights > 0
        total = np.bincount(src[ok], weights[ok], minlength=n_src)
        sums = np.bincount(src[ok], weights[ok] * values[ok], minlength=n_src)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, sums / total, np.nan), total


def _bin_error(src: np.ndarray, err: np.ndarray, group: np.ndarray | None, n_src: int,
               total: np.ndarray, valid: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """σ of the per-source-pixel weighted mean (weights w, total weight W).

    ``group is None``: independent rays, σ = sqrt(Σ(wσ)²)/W (= sqrt(Σσ²)/N for w = 1).
    Otherwise rays of one group (one IFU spaxel) share one noise draw:
    σ = sqrt(Σ_g (Σ_{r∈g} w_r σ_r)²)/W.
    """
    ok = valid & (src >= 0) & np.isfinite(err)
    if weights is not None:
        ok &= weights > 0
    s = src[ok]
    e = err[ok] if weights is None else err[ok] * weights[ok]
    if group is None:
        var = np.bincount(s, e * e, minlength=n_src)
    else:
        g = group[ok] + 1
        stride = int(g.max(initial=0)) + 1
        key = s * stride + g
        uniq, inv = np.unique(key, return_inverse=True)
        lin = np.bincount(inv, e, minlength=uniq.size)
        var = np.bincount(uniq // stride, lin * lin, minlength=n_src)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, np.sqrt(var) / total, np.nan)


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
           footprint: xr.DataArray | None = None, footprint_snr: float = 3.0,
           min_image_pixels: int = 4) -> xr.Dataset:
    """Source-plane maps: each source pixel is the mean of the image rays landing in it.

    With a ``coverage`` variable (from :func:`rebin_to_lens_grid`) the mean is weighted by
    it, so partly covered edge pixels count in proportion to their covered area.

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
        Image-plane pixels that belong to the galaxy, labelled as images (connected
        components); default: pixels where ``centre_line`` is finite and, if the maps have
        ``snr``, its SNR exceeds ``footprint_snr``.
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
    lens = as_lens_grid(lens)
    if errors not in {"spaxel", "independent"}:
        raise ConfigError(f"errors must be 'spaxel' or 'independent', got {errors!r}")
    if lens.attrs.get("normalisation", "source") != "source":
        raise ConfigError("lens maps are in the 'dls_ds' normalisation: call rescale_lens(lens, "
                          "z_lens=..., z_source=...) before delens")
    if "wcs" in maps_sb.attrs and "wcs" in lens.attrs and maps_sb.attrs["wcs"] != lens.attrs["wcs"]:
        raise InputError("line maps were rebinned onto another lens grid than these lens maps; "
                         "call rebin_to_lens_grid with the same lens")
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
        if "snr" in maps_sb:
            fp &= _line_values(maps_sb, "snr", ref_line) > footprint_snr
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
            spaxel = np.nan_to_num(maps_sb["spaxel_index"].values.ravel(), nan=-1)
            group = np.repeat(spaxel.astype(np.int64), s2)
        else:
            group = np.repeat(np.arange(ly.size * lx.size), s2)

    out_vars: dict[str, Any] = {}
    n_pix = np.full((len(lines), grid.ny, grid.nx), 0.0)
    flux_totals = {}
    for name in names:
        stack = []
        for i, line in enumerate(lines):
            values = np.repeat(_line_values(maps_sb, name, line), s2)
            weights = np.repeat(np.nan_to_num(_line_values(maps_sb, "coverage", line)), s2) \
                if "coverage" in maps_sb else None
            if name == "flux_err":
                valid = np.isfinite(np.repeat(_line_values(maps_sb, "flux", line), s2)) \
                    if "flux" in names else np.ones_like(values, bool)
                total = flux_totals.get(i)
                if total is None:
                    total = _bin_mean(src_flat, np.where(valid, 0.0, np.nan), grid.n, weights)[1]
                mean = _bin_error(src_flat, values, group, grid.n, total, valid, weights)
            else:
                mean, total = _bin_mean(src_flat, values, grid.n, weights)
                if name == "flux":
                    flux_totals[i] = total
                    n_pix[i] = total.reshape(grid.ny, grid.nx) / s2
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
    attrs = {k: v for k, v in maps_sb.attrs.items() if k not in {"cube_wcs", "wcs"}}
    attrs.update(image_pixel_scale_arcsec=float(lens.attrs["pixel_scale_arcsec"]),
                 pixel_scale_arcsec=pixel, source_pixel_arcsec=pixel,
                 kpc_per_arcsec=float(scale), subsample=int(subsample),
                 centre_beta_arcsec=[float(centre[0]), float(centre[1])], errors=errors,
                 lens_wcs=lens.attrs["wcs"], plane="source")
    return xr.Dataset(out_vars, coords=coords, attrs=attrs)


def _map_variables_lens(maps: xr.Dataset) -> list[str]:
    return [name for name, v in maps.data_vars.items()
            if {"ly", "lx"} <= set(v.dims) and v.dtype.kind == "f"
            and name not in {"snr", "coverage", "spaxel_index"}]


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
    weights = np.nan_to_num(_line_values(maps_sb, "coverage", line)) \
        if "coverage" in maps_sb else np.ones(values.size)
    sums = np.zeros(grid.n)
    counts = np.zeros(grid.n)
    for k in range(values.size):
        for r in range(bx.shape[1]):
            ix = int(np.floor((bx[k, r] - grid.x0) / grid.pixel + 0.5))
            iy = int(np.floor((by[k, r] - grid.y0) / grid.pixel + 0.5))
            if 0 <= ix < grid.nx and 0 <= iy < grid.ny and np.isfinite(values[k]) \
                    and weights[k] > 0:
                sums[iy * grid.nx + ix] += weights[k] * values[k]
                counts[iy * grid.nx + ix] += weights[k]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan).reshape(grid.ny, grid.nx)


def source_grid_of(source_maps: xr.Dataset) -> SourceGrid:
    """The :class:`SourceGrid` of a source-plane Dataset."""
    bx, by = source_maps["beta_x"].values, source_maps["beta_y"].values
    return SourceGrid(float(bx[0]), float(by[0]), float(source_maps.attrs["source_pixel_arcsec"]),
                      bx.size, by.size)


# ---------------------------------------------------------------------------------------------
# Forward model (beyond the paper)
# ---------------------------------------------------------------------------------------------

class LensingOperator:
    """Linear map from source-plane surface brightness to IFU flux per spaxel, and its adjoint.

    forward: bilinear source value at every ray β = θ − α (``subsample``² rays per lens pixel,
    averaged) → Gaussian PSF on the lens grid → exact-overlap rebinning to the IFU grid
    (× lens pixel area). ``adjoint`` is its exact transpose (tested), which makes
    Richardson–Lucy deconvolution (:func:`deconvolve_source`) a few lines.
    """

    def __init__(self, lens: xr.Dataset, grid: SourceGrid, *, psf_fwhm_arcsec: float,
                 ifu_wcs: str, ifu_shape: tuple[int, int], subsample: int = 2,
                 shift_arcsec: tuple[float, float] = (0.0, 0.0)):
        lens = as_lens_grid(lens)
        lens_wcs = _celestial(lens.attrs.get("wcs"), "lens maps")
        i_wcs = _celestial(ifu_wcs, "IFU grid")
        self.p = float(lens.attrs["pixel_scale_arcsec"])
        margin = int(np.ceil((3 * psf_fwhm_arcsec + max(map(abs, shift_arcsec))) / self.p)) + 1
        box = _overlap_box(lens_wcs, (lens.sizes["ly"], lens.sizes["lx"]), i_wcs,
                           tuple(ifu_shape), margin_pix=margin)
        if box is None:
            raise InputError("lens maps: the deflection maps do not overlap the IFU grid")
        self.ly = np.arange(box[0], box[1] + 1)
        self.lx = np.arange(box[2], box[3] + 1)
        self.grid = grid
        self.ifu_shape = tuple(ifu_shape)
        self.s2 = subsample * subsample
        self.sigma_pix = psf_fwhm_arcsec / FWHM_PER_SIGMA / self.p
        bx, by = _trace_rays(lens, self.ly, self.lx, subsample)
        self.base, self.w = _bilinear_weights(grid, bx.ravel(), by.ravel())
        stride = grid.nx + 2
        self.corner = (0, 1, stride, stride + 1)
        affine = _affine_lens_to_cube(lens_wcs, i_wcs, box)
        affine[:, 2] -= (affine[:, 0] * shift_arcsec[1] + affine[:, 1] * shift_arcsec[0]) / self.p
        self.ov = _overlap(affine, self.ly, self.lx, self.ifu_shape)

    def _psf(self, img: np.ndarray) -> np.ndarray:
        if self.sigma_pix <= 0:
            return img
        return ndimage.gaussian_filter(img, self.sigma_pix, mode="constant")

    def lens_plane(self, source: np.ndarray) -> np.ndarray:
        """Image-plane surface brightness on the lens sub-grid (before the PSF)."""
        flat = _pad1(source).ravel()
        rays = sum(wk * flat[self.base + ck] for wk, ck in zip(self.w, self.corner, strict=True))
        return rays.reshape(-1, self.s2).mean(axis=1).reshape(self.ly.size, self.lx.size)

    def forward(self, source: np.ndarray, *, psf: bool = True) -> np.ndarray:
        """Source SB (grid.ny, grid.nx) → IFU flux per spaxel (ifu_shape)."""
        sb = self.lens_plane(source)
        sb = self._psf(sb) if psf else sb
        ov = self.ov
        flux = np.bincount(ov.coarse, ov.weight * sb.ravel()[ov.fine] * self.p**2,
                           minlength=ov.n_coarse)
        return flux.reshape(self.ifu_shape)

    def adjoint(self, flux: np.ndarray) -> np.ndarray:
        """Transpose of :meth:`forward`: IFU-grid values → source grid."""
        ov = self.ov
        sb = np.bincount(ov.fine, ov.weight * np.ravel(flux)[ov.coarse] * self.p**2,
                         minlength=ov.n_fine).reshape(self.ly.size, self.lx.size)
        rays = np.repeat(self._psf(sb).ravel() / self.s2, self.s2)
        return self.scatter(rays)

    def scatter(self, rays: np.ndarray) -> np.ndarray:
        """Transpose of the bilinear sampling: ray values → source grid (sum of weights × value)."""
        g = self.grid
        n = (g.ny + 2) * (g.nx + 2)
        out = np.zeros(n)
        for wk, ck in zip(self.w, self.corner, strict=True):  # the 4 bilinear corners
            out += np.bincount(self.base + ck, wk * rays, minlength=n)
        return out.reshape(g.ny + 2, g.nx + 2)[1:-1, 1:-1]


def _bilinear_weights(grid: SourceGrid, bx: np.ndarray, by: np.ndarray):
    """Bilinear interpolation on ``grid``: base flat index (n,) and 4 corner weights.

    Indices refer to the grid padded by one pixel on each side (``(ny+2) × (nx+2)``, zeros in
    the border), so that rays within one pixel outside the grid fade to 0 like
    ``map_coordinates(mode="constant")``; rays further out get weight 0. The corners are
    ``base + (0, 1, nx+2, nx+3)``.
    """
    fx = (bx - grid.x0) / grid.pixel
    fy = (by - grid.y0) / grid.pixel
    ix, iy = np.floor(fx), np.floor(fy)
    tx, ty = fx - ix, fy - iy
    inside = (ix >= -1) & (ix < grid.nx) & (iy >= -1) & (iy < grid.ny)
    base = np.where(inside, (iy + 1) * (grid.nx + 2) + (ix + 1), 0).astype(np.int64)
    ux = np.where(inside, 1 - tx, 0.0)
    tx = np.where(inside, tx, 0.0)
    uy, ty = 1 - ty, ty
    return base, (ux * uy, tx * uy, ux * ty, tx * ty)


def _pad1(a: np.ndarray) -> np.ndarray:
    return np.pad(np.nan_to_num(a), 1)


def _grid_of_image(source_image: xr.DataArray) -> SourceGrid:
    """Source grid of an image: from ``beta_x``/``beta_y``, or from ``xs_arcsec``/``ys_arcsec``
    (or ``xs``/``ys`` in kpc with ``attrs["kpc_per_arcsec"]``) plus
    ``attrs["centre_beta_arcsec"]``."""
    c = source_image.coords
    if "beta_x" in c and "beta_y" in c:
        bx, by = c["beta_x"].values, c["beta_y"].values
    else:
        centre = source_image.attrs.get("centre_beta_arcsec")
        if "xs_arcsec" in c and "ys_arcsec" in c:
            ox, oy = c["xs_arcsec"].values, c["ys_arcsec"].values
        elif "kpc_per_arcsec" in source_image.attrs and "xs" in c and "ys" in c:
            k = float(source_image.attrs["kpc_per_arcsec"])
            ox, oy = c["xs"].values / k, c["ys"].values / k
        else:
            ox = oy = None
        if ox is None or centre is None:
            raise ConfigError("source image: needs beta_x/beta_y coordinates (as delens output "
                              "has), or xs_arcsec/ys_arcsec with attrs['centre_beta_arcsec']")
        bx, by = ox + float(centre[0]), oy + float(centre[1])
    if bx.size < 2 or by.size < 2:
        raise ConfigError("source image: needs at least 2 x 2 pixels")
    return SourceGrid(float(bx[0]), float(by[0]), float(bx[1] - bx[0]), bx.size, by.size)


def forward_model(source_image: xr.DataArray, lens: xr.DataArray | xr.Dataset, *,
                  psf_fwhm_arcsec: float, ifu_wcs: str, ifu_shape: tuple[int, int],
                  subsample: int = 2,
                  shift_arcsec: tuple[float, float] = (0.0, 0.0)) -> xr.DataArray:
    """Lens a source-plane image, convolve with the PSF and rebin it to the IFU grid.

    Parameters
    ----------
    source_image : xarray.DataArray
        Surface brightness (per arcsec²) on ``(ys, xs)`` with ``beta_x``/``beta_y`` coordinates
        (arcsec, lens frame), e.g. one line of :func:`delens` output or a model.
    lens : xarray.Dataset
        Lens maps at the source redshift.
    psf_fwhm_arcsec : float
        Gaussian PSF of the IFU data (0: no convolution).
    ifu_wcs : str
        Celestial WCS header string of the IFU grid; ``ifu_shape`` its (ny, nx).
    subsample : int
        Rays per lens pixel along each axis (β at sub-pixel rays bilinear in α).
    shift_arcsec : (dy, dx)
        Registration shift of the IFU grid, as in :func:`rebin_to_lens_grid`.

    Returns
    -------
    xarray.DataArray
        Flux per spaxel on ``(y, x)`` (surface brightness × arcsec²): each lens pixel
        contributes to the spaxels it overlaps in proportion to the overlap area.

    Notes
    -----
    Surface brightness is conserved along rays, so the image-plane SB is the source SB
    (bilinear, 0 outside the source grid) at β = θ − α; lens pixels (and their rays) cover
    the IFU field plus 3 PSF FWHM. See :class:`LensingOperator`.

    References
    ----------
    Beyond K20 (§3.2.3 notes that the paper does not forward-model); DESIGN.md "forward".
    """
    op = LensingOperator(lens, _grid_of_image(source_image), psf_fwhm_arcsec=psf_fwhm_arcsec,
                         ifu_wcs=ifu_wcs, ifu_shape=ifu_shape, subsample=subsample,
                         shift_arcsec=shift_arcsec)
    flux = op.forward(source_image.transpose("ys", "xs").values)
    units = source_image.attrs.get("units", "")
    return xr.DataArray(
        flux, dims=("y", "x"),
        coords={"y": np.arange(ifu_shape[0]), "x": np.arange(ifu_shape[1])},
        name=source_image.name,
        attrs={"units": f"({units}) * arcsec2" if units else "arcsec2", "wcs": ifu_wcs,
               "psf_fwhm_arcsec": float(psf_fwhm_arcsec), "quantity": "flux per spaxel"})


def deconvolve_source(image: xr.DataArray, lens: xr.Dataset, *, source_like: xr.DataArray,
                      psf_fwhm_arcsec: float, ifu_wcs: str, mask: xr.DataArray | None = None,
                      n_iter: int = 30, subsample: int = 2,
                      shift_arcsec: tuple[float, float] = (0.0, 0.0)) -> tuple[xr.DataArray,
                                                                                dict]:
    """Source-plane model whose lensed, PSF-convolved image matches the IFU map (Richardson–Lucy).

    Parameters
    ----------
    image : xarray.DataArray
        IFU line map, flux per spaxel on ``(y, x)`` (negative values are clipped to 0).
    lens : xarray.Dataset
        Lens maps at the source redshift.
    source_like : xarray.DataArray
        Starting source (e.g. one line of :func:`delens` output) on ``(ys, xs)`` with
        ``beta_x``/``beta_y``; its grid is the model grid.
    mask : xarray.DataArray of bool, optional
        Spaxels that constrain the model (default: finite values, e.g. SNR > 3).
    n_iter : int
        Richardson–Lucy iterations (early stopping regularises the noise).

    Returns
    -------
    (xarray.DataArray, dict)
        The model source (SB per arcsec², NaN where no constrained ray lands) and ``mu``
        (model image flux in the IFU field / model source flux: the magnification corrected
        for the PSF and spaxel smearing that bias :func:`magnification_halpha`),
        ``chi2_history`` (Σ (data − model)² / Σ data² per iteration), ``n_iter``.

    References
    ----------
    Beyond K20 (§3.2.3: "we do not perform forward modelling"); Richardson (1972), Lucy (1974).
    """
    grid = _grid_of_image(source_like)
    op = LensingOperator(lens, grid, psf_fwhm_arcsec=psf_fwhm_arcsec, ifu_wcs=ifu_wcs,
                         ifu_shape=image.shape, subsample=subsample, shift_arcsec=shift_arcsec)
    data = np.asarray(image.transpose("y", "x").values, float)
    m = np.isfinite(data) if mask is None else (mask.transpose("y", "x").values.astype(bool)
                                                & np.isfinite(data))
    d = np.where(m, np.clip(np.nan_to_num(data), 0, None), 0.0)
    norm = op.adjoint(m.astype(float))
    # model pixels: those reached by rays from lens pixels inside the masked spaxels
    # (not merely through the PSF wings, which leaves them unconstrained)
    inside = np.bincount(op.ov.fine, op.ov.weight * m.ravel()[op.ov.coarse],
                         minlength=op.ov.n_fine) > 0.5
    hit = op.scatter(np.repeat(inside, op.s2).astype(float))
    active = (hit > 0.25) & (norm > 0)
    s = np.clip(np.nan_to_num(source_like.transpose("ys", "xs").values), 0, None) * active
    if s.sum() <= 0:
        s = active.astype(float)
    s *= d.sum() / max(op.forward(s)[m].sum(), 1e-300)
    history = []
    for _ in range(n_iter):  # iterations, each vectorised over all pixels
        model = op.forward(s)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(m & (model > 0), d / model, 0.0)
        s = np.where(active, s * op.adjoint(ratio) / np.where(active, norm, 1.0), 0.0)
        history.append(float(np.sum((d - model)[m] ** 2) / max(np.sum(d[m] ** 2), 1e-300)))
    model = op.forward(s, psf=False)
    mu = float(model.sum() / (s.sum() * grid.pixel**2)) if s.sum() > 0 else float("nan")
    out = xr.DataArray(np.where(active, s, np.nan), dims=("ys", "xs"), coords=source_like.coords,
                       name=image.name, attrs={"units": source_like.attrs.get("units", ""),
                                               "method": f"Richardson-Lucy, {n_iter} iterations"})
    return out, {"mu": mu, "chi2_history": history, "n_iter": n_iter}


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
        ``fwhm_major_kpc``, ``fwhm_minor_kpc``, ``pa_deg`` (east of north via the lens WCS),
        the same axes in arcsec, ``theta_deg`` (lens frame), ``n_images``, ``images`` and
        ``image`` (the de-lensed PSF, a DataArray).

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
        "pa_deg": _position_angle(fit["theta_deg"], lens.attrs.get("wcs")),
        "fwhm_major_arcsec": fit["fwhm_major_arcsec"],
        "fwhm_minor_arcsec": fit["fwhm_minor_arcsec"],
        "theta_deg": fit["theta_deg"],
        "n_images": len(images),
        "images": images,
        "image": image,
        "image_pixel_arcsec": p,
    }


# ---------------------------------------------------------------------------------------------
# Magnifications (K20 §3.2.3, Fig. 4)
# ---------------------------------------------------------------------------------------------

def magnification_halpha(image_maps: xr.Dataset, source_maps: xr.Dataset, *,
                         snr_min: float = 3.0, line: str = "Halpha") -> tuple[float, float]:
    """μ(Hα): total image-plane over total source-plane Hα flux, over SNR > ``snr_min`` pixels.

    Image plane: Σ flux of the IFU spaxels with ``snr > snr_min``; source plane: Σ SB × source
    pixel area over source pixels with ``snr > snr_min``. For matching footprints, de-lens the
    SNR-selected image map (as :func:`reconstruct_source_plane` does). The error combines the
    two relative errors in quadrature (the paper's propagation; it ignores that both sums
    come from the same data and that neighbouring source pixels are correlated).

    References
    ----------
    K20 §3.2.3 ("co-adding the flux of all the spaxels in the Hα map with SNR > 3 before and
    after the reconstruction procedure").
    """
    img = image_maps.sel(line=line)
    sel = (img["snr"] > snr_min) & np.isfinite(img["flux"])
    f_img = float(img["flux"].where(sel).sum())
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


# ---------------------------------------------------------------------------------------------
# Top level
# ---------------------------------------------------------------------------------------------

def _mu_halpha_mc(halpha: xr.Dataset, lens: xr.Dataset, *, snr_min: float, cube_wcs: str,
                  shift_arcsec: tuple[float, float], source_pixel_arcsec: float, subsample: int,
                  kpc_per_arcsec: float, centre: tuple[float, float], n: int,
                  seed: int = 0) -> float:
    """σ of μ(Hα) from ``n`` noise draws of the Hα map, each with its own SNR > ``snr_min``
    selection (one vectorised de-lensing, the draws stacked along ``line``)."""
    rng = np.random.default_rng(seed)
    flux = halpha["flux"].transpose("y", "x").values
    err = halpha["flux_err"].transpose("y", "x").values
    draws = flux[None] + np.nan_to_num(err)[None] * rng.standard_normal((n, *flux.shape))
    with np.errstate(invalid="ignore", divide="ignore"):
        draws = np.where(draws / err[None] > snr_min, draws, np.nan)
    stack = xr.Dataset({"flux": (("line", "y", "x"), draws)},
                       coords={"line": [f"draw{i}" for i in range(n)]})
    sb = rebin_to_lens_grid(stack, lens, cube_wcs=cube_wcs, shift_arcsec=shift_arcsec)
    src = delens(sb, lens, source_pixel_arcsec=source_pixel_arcsec, subsample=subsample,
                 kpc_per_arcsec=kpc_per_arcsec, centre=centre, centre_line="draw0",
                 errors="independent")
    f_img = np.nansum(draws, axis=(1, 2))
    f_src = src["flux"].sum(("ys", "xs")).values * source_pixel_arcsec**2
    return float(np.std(f_img / f_src, ddof=1))


def _at_source(lens: xr.Dataset, redshift: float, z_lens: float | None) -> xr.Dataset:
    lens = as_lens_grid(lens)
    norm = lens.attrs.get("normalisation", "dls_ds")
    zl = z_lens if z_lens is not None else lens.attrs.get("z_lens")
    if norm == "source" and "z_source" in lens.attrs:
        return lens
    if zl is None:
        if norm == "source":
            out = lens.copy()
            out.attrs["z_source"] = float(redshift)
            return out
        raise ConfigError("lens maps in the 'dls_ds' normalisation need the lens redshift "
                          "(lens.z_lens)")
    return rescale_lens(lens, z_lens=float(zl), z_source=redshift, normalisation=norm)


def reconstruct_source_plane(line_maps: xr.Dataset, lens: xr.Dataset, *, redshift: float,
                             cube_wcs: str, psf_fwhm_arcsec: float,
                             source_pixel_arcsec: float | None = None, halpha: str = "Halpha",
                             shift_arcsec: tuple[float, float] = (0.0, 0.0),
                             subsample: int = 2, snr_min: float = 3.0,
                             z_lens: float | None = None,
                             alternative_lenses: tuple[xr.Dataset, ...] = (),
                             alternatives: tuple[xr.Dataset, ...] | list = (),
                             forward_iterations: int = 30,
                             mc_realisations: int = 100) -> tuple[
                                 xr.Dataset, dict]:
    """Image-plane line maps → source-plane maps, μ(Hα), μ_maps (+ spread) and source PSF.

    Parameters
    ----------
    line_maps : xarray.Dataset
        Fitted line maps on ``(line, y, x)``, flux per spaxel.
    lens : xarray.Dataset
        Lens maps (``dls_ds`` maps are rescaled with ``z_lens`` or ``attrs["z_lens"]``).
    redshift : float
        Source redshift.
    cube_wcs : str
        The cube's celestial WCS (``cube.attrs["wcs"]``).
    psf_fwhm_arcsec : float
        Image-plane PSF FWHM.
    source_pixel_arcsec : float, optional
        Source pixel (default: the lens pixel, K20 §3.2.3).
    halpha : str
        Line used for μ(Hα), the footprint and the centre.
    shift_arcsec : (dy, dx)
        Registration shift (:func:`align_offset`).
    subsample : int
        Rays per lens pixel along each axis.
    alternative_lenses, alternatives : tuple of Dataset
        Other lens models (``[lens] models``) for the μ_maps spread (either name).
    forward_iterations : int
        Richardson–Lucy iterations of :func:`deconvolve_source` on the Hα map for
        ``mu_halpha_forward`` (beyond the paper; 0 skips it).
    mc_realisations : int
        Noise realisations of the selected Hα spaxels for ``mu_halpha_err_mc``, the scatter
        of μ(Hα) including the correlation between the two sums that the paper's
        ``mu_halpha_err`` ignores (0 skips it).

    Returns
    -------
    (xarray.Dataset, dict)
        Source-plane maps and the summary fields ``mu_halpha``, ``mu_halpha_err``, ``mu_maps``,
        ``mu_maps_average``, ``mu_maps_spread``, ``mu_maps_models``, ``near_critical``,
        ``source_psf_fwhm_kpc`` [major, minor], ``source_psf_pa_deg``, ``shift_arcsec``,
        ``mu_halpha_err_mc`` and ``mu_halpha_forward`` (PSF-corrected, beyond the paper).

    Notes
    -----
    μ(Hα) and μ_maps (both as in the paper) are biased low when the PSF or the spaxels are
    not small compared with the scale on which μ varies across an arc: blurring moves flux
    from high- to low-magnification pixels. ``mu_halpha_forward`` models the PSF and the
    spaxels (:func:`deconvolve_source`) and removes most of that bias on the mocks.

    References
    ----------
    K20 §3.2.2–3.2.3.

    Examples
    --------
    On a lensed mock (noiseless maps with a 1 % error):

    >>> from klever_nb import mock
    >>> spec = [s for s in mock.demo_specs() if s.lens is not None][0]
    >>> galaxy = mock.make_mock(spec)
    >>> maps = galaxy.image_maps
    >>> err = 0.01 * maps["flux"].max("line").max()
    >>> maps = maps.assign(flux_err=maps["flux"] * 0 + err, snr=maps["flux"] / err)
    >>> cube_wcs = galaxy.cubes["H"].attrs["wcs"]
    >>> source, summary = reconstruct_source_plane(
    ...     maps, galaxy.lens_maps, redshift=spec.redshift, cube_wcs=cube_wcs,
    ...     psf_fwhm_arcsec=spec.psf_fwhm_arcsec)  # doctest: +SKIP
    >>> summary["mu_halpha"], summary["mu_halpha_forward"], galaxy.truth["mu"]  # doctest: +SKIP
    """
    lens_src = _at_source(lens, redshift, z_lens)
    scale = _kpc_per_arcsec(redshift)
    sb = rebin_to_lens_grid(line_maps, lens_src, cube_wcs=cube_wcs, shift_arcsec=shift_arcsec)
    block = lens_src[["alpha_x", "alpha_y"]].sel(ly=sb["ly"], lx=sb["lx"])
    n_bad = int((~np.isfinite(block["alpha_x"]) | ~np.isfinite(block["alpha_y"])).sum())
    if n_bad:
        raise InputError(f"lens maps: {n_bad} NaN deflection pixels where they overlap the cube; "
                         "fill or replace the deflection maps")
    source = delens(sb, lens_src, source_pixel_arcsec=source_pixel_arcsec, subsample=subsample,
                    kpc_per_arcsec=scale, centre_line=halpha)
    summary: dict[str, Any] = {"shift_arcsec": [float(v) for v in shift_arcsec]}
    lines = list(line_maps["line"].values)
    mu, mu_err = float("nan"), float("nan")
    footprint = weights = None
    if halpha in lines and "snr" in line_maps:
        selected = line_maps["snr"].sel(line=halpha) > snr_min
        masked = line_maps.sel(line=[halpha])[["flux", "flux_err", "snr"]].where(selected)
        sb_h = rebin_to_lens_grid(masked, lens_src, cube_wcs=cube_wcs, shift_arcsec=shift_arcsec)
        if np.isfinite(sb_h["flux"].values).any():
            src_h = delens(sb_h, lens_src, source_pixel_arcsec=source.attrs["source_pixel_arcsec"],
                           subsample=subsample, kpc_per_arcsec=scale,
                           centre=tuple(source.attrs["centre_beta_arcsec"]), centre_line=halpha)
            mu, mu_err = magnification_halpha(masked, src_h, snr_min=snr_min, line=halpha)
            if mc_realisations > 0:
                summary["mu_halpha_err_mc"] = _mu_halpha_mc(
                    line_maps.sel(line=halpha), lens_src, snr_min=snr_min, cube_wcs=cube_wcs,
                    shift_arcsec=shift_arcsec, source_pixel_arcsec=source.attrs[
                        "source_pixel_arcsec"], subsample=subsample, kpc_per_arcsec=scale,
                    centre=tuple(source.attrs["centre_beta_arcsec"]), n=mc_realisations)
            if forward_iterations > 0:
                _, rl = deconvolve_source(line_maps["flux"].sel(line=halpha), lens_src,
                                          source_like=src_h["flux"].sel(line=halpha),
                                          psf_fwhm_arcsec=psf_fwhm_arcsec, ifu_wcs=cube_wcs,
                                          mask=selected, n_iter=forward_iterations,
                                          subsample=subsample, shift_arcsec=shift_arcsec)
                summary["mu_halpha_forward"] = rl["mu"]
            flux_h = sb_h["flux"].sel(line=halpha)
            footprint = np.isfinite(flux_h)
            weights = flux_h * sb_h["coverage"].sel(line=halpha)
    summary.update(mu_halpha=mu, mu_halpha_err=mu_err)
    if footprint is None:
        footprint = np.isfinite(sb["flux"]).any("line") if "line" in sb["flux"].dims \
            else np.isfinite(sb["flux"])
    mm = magnification_from_maps(lens_src, footprint=footprint, weights=weights)
    summary.update(mu_maps=mm["mu"], mu_maps_average="total magnification of the Halpha "
                   "SNR>3 footprint, Halpha-weighted (magnification_from_maps average='total')"
                   if weights is not None else "total magnification of the footprint",
                   near_critical=mm["near_critical"],
                   mu_maps_max_abs=mm["max_abs_mu"])
    alternative_lenses = tuple(alternative_lenses) + tuple(alternatives)
    if alternative_lenses:
        alts = [_at_source(m, redshift, z_lens) for m in alternative_lenses]
        spread = magnification_spread([lens_src, *alts], footprint=footprint, weights=weights)
        summary.update(mu_maps_spread=spread["sigma"], mu_maps_models=spread)
    else:
        summary.update(mu_maps_spread=float("nan"))
    psf = source_plane_psf(lens_src, position_arcsec=tuple(source.attrs["centre_beta_arcsec"]),
                           psf_fwhm_arcsec=psf_fwhm_arcsec,
                           source_pixel_arcsec=source.attrs["source_pixel_arcsec"],
                           kpc_per_arcsec=scale, subsample=subsample)
    summary.update(source_psf_fwhm_kpc=[psf["fwhm_major_kpc"], psf["fwhm_minor_kpc"]],
                   source_psf_pa_deg=psf["pa_deg"])
    source.attrs.update(mu_halpha=mu, mu_halpha_err=mu_err, mu_maps=mm["mu"],
                        source_psf_fwhm_kpc=summary["source_psf_fwhm_kpc"],
                        source_psf_pa_deg=psf["pa_deg"], redshift=float(redshift))
    return source, summary


def check_overlap(lens: xr.Dataset, *, cube_wcs: str, cube_shape: tuple[int, int] | None = None,
                  source: str = "lens maps") -> None:
    """Raise :class:`InputError` when the lens maps do not cover the cube.

    With ``cube_shape`` the whole cube footprint is tested (any overlap passes); without it,
    the cube's reference position (CRVAL) must fall on the lens grid.
    """
    lens = as_lens_grid(lens)
    lens_wcs = _celestial(lens.attrs.get("wcs"), source)
    c_wcs = _celestial(cube_wcs, "cube")
    shape = (lens.sizes["ly"], lens.sizes["lx"])
    if cube_shape is not None:
        ok = _overlap_box(lens_wcs, shape, c_wcs, tuple(cube_shape)) is not None
    else:
        from astropy.coordinates import SkyCoord

        ra, dec = c_wcs.wcs.crval
        px, py = lens_wcs.world_to_pixel(SkyCoord(ra, dec, unit="deg",
                                                  frame=c_wcs.wcs.radesys.lower() or "icrs"))
        ok = bool(-0.5 <= px <= shape[1] - 0.5 and -0.5 <= py <= shape[0] - 0.5)
    if not ok:
        raise InputError(f"{source}: the deflection maps do not overlap the cube (check the WCS "
                         "of the cube and of the deflection maps)")


def unlensed_source_maps(line_maps: xr.Dataset, *, redshift: float, psf_fwhm_arcsec: float,
                         centre_line: str = "Halpha",
                         pixel_scale_arcsec: float | None = None) -> tuple[xr.Dataset, dict]:
    """'Source-plane' maps of an unlensed galaxy: the image, in SB, on kpc coordinates.

    Same layout as :func:`reconstruct_source_plane` (``flux`` in SB per arcsec², ``xs``/``ys``
    in kpc from the ``centre_line``-weighted centroid) and the summary with μ = 1 and a
    circular source PSF of ``psf_fwhm_arcsec``.
    """
    pix = float(pixel_scale_arcsec or line_maps.attrs.get("pixel_scale_arcsec", np.nan))
    if not np.isfinite(pix):
        raise ConfigError("unlensed_source_maps needs pixel_scale_arcsec= or "
                          "line_maps.attrs['pixel_scale_arcsec']")
    scale = _kpc_per_arcsec(redshift)
    out = line_maps.rename({"y": "ys", "x": "xs"})
    for name in ("flux", "flux_err"):
        if name in out:
            out[name] = out[name] / pix**2
            out[name].attrs = _sb_attrs(line_maps[name].attrs, True)
    ny, nx = out.sizes["ys"], out.sizes["xs"]
    ref = out["flux"].sel(line=centre_line) if "line" in out["flux"].dims and \
        centre_line in out["line"].values else out["flux"].isel(line=0)
    w = np.clip(np.nan_to_num(ref.transpose("ys", "xs").values), 0, None)
    yy, xx = np.mgrid[0:ny, 0:nx]
    cy, cx = ((float(np.sum(w * yy) / w.sum()), float(np.sum(w * xx) / w.sum())) if w.sum() > 0
              else ((ny - 1) / 2, (nx - 1) / 2))
    xs_arcsec = (np.arange(nx) - cx) * pix
    ys_arcsec = (np.arange(ny) - cy) * pix
    out = out.assign_coords(
        xs=("xs", xs_arcsec * scale, {"units": "kpc", "description": "from the galaxy centre"}),
        ys=("ys", ys_arcsec * scale, {"units": "kpc", "description": "from the galaxy centre"}),
        xs_arcsec=("xs", xs_arcsec, {"units": "arcsec"}),
        ys_arcsec=("ys", ys_arcsec, {"units": "arcsec"}),
        beta_x=("xs", np.arange(nx) * pix, {"units": "arcsec"}),
        beta_y=("ys", np.arange(ny) * pix, {"units": "arcsec"}))
    finite = np.isfinite(out["flux"]).any("line") if "line" in out["flux"].dims \
        else np.isfinite(out["flux"])
    out["n_image_pixels"] = finite.astype(np.int32).transpose("ys", "xs")
    out["n_image_pixels"].attrs = {"description": "image pixels that fed each source pixel "
                                   "(unlensed: the image itself, 1 per observed pixel)"}
    out.attrs.update(pixel_scale_arcsec=pix, source_pixel_arcsec=pix, kpc_per_arcsec=scale,
                     centre_beta_arcsec=[cx * pix, cy * pix], plane="source (unlensed)",
                     redshift=float(redshift))
    fwhm_kpc = float(psf_fwhm_arcsec) * scale
    summary = {"mu_halpha": 1.0, "mu_halpha_err": 0.0, "mu_maps": 1.0, "mu_maps_spread": 0.0,
               "near_critical": False, "source_psf_fwhm_kpc": [fwhm_kpc, fwhm_kpc],
               "source_psf_pa_deg": 0.0, "shift_arcsec": [0.0, 0.0]}
    return out, summary

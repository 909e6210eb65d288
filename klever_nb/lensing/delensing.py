"""Ray tracing and de-lensing: :class:`SourceGrid`, :func:`delens` and its slow twin.

Part of :mod:`klever_nb.lensing` (see the package docstring for the flow).

References: K20 §3.2.3; FACTS.md §12.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr
from scipy import ndimage

from klever_nb.constants import DETECTION_SNR
from klever_nb.cosmology import kpc_per_arcsec as _kpc_per_arcsec
from klever_nb.errors import ConfigError, InputError
from klever_nb.lensing.maps import as_lens_grid

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
           footprint: xr.DataArray | None = None, footprint_snr: float = DETECTION_SNR,
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
    _check_delens_inputs(maps_sb, lens, errors)
    ly, lx = maps_sb["ly"].values, maps_sb["lx"].values
    pixel = float(source_pixel_arcsec or lens.attrs["pixel_scale_arcsec"])
    scale = _physical_scale(lens, kpc_per_arcsec)
    bx, by = _trace_rays(lens, ly, lx, subsample)
    s2 = subsample * subsample
    lines = list(maps_sb["line"].values) if "line" in maps_sb.dims else [None]
    names = _map_variables_lens(maps_sb)
    ref_line = centre_line if centre_line in lines else lines[0]
    ref_flux = _line_values(maps_sb, "flux" if "flux" in names else names[0], ref_line)
    fp = _image_footprint(maps_sb, footprint, ref_flux, ref_line, ly, lx, footprint_snr)
    any_finite = _finite_pixels(maps_sb, names, ly.size * lx.size)
    grid, centre = _centred_grid(bx, by, any_finite, ref_flux, s2=s2, pixel=pixel, centre=centre,
                                 source_extent=source_extent)
    src = grid.index(bx, by)  # (npix, s2)
    group = _noise_groups(maps_sb, errors, ly.size * lx.size, s2)
    out_vars, n_pix = _binned_variables(maps_sb, names, lines, src.ravel(), group, grid, s2)
    if "flux" in out_vars and "flux_err" in out_vars:
        with np.errstate(invalid="ignore", divide="ignore"):
            out_vars["snr"] = (out_vars["flux"][0], out_vars["flux"][1] / out_vars["flux_err"][1],
                               {"units": "", "description": "flux / flux_err in the source plane"})
    if lines[0] is not None:
        out_vars["n_image_pixels"] = (("line", "ys", "xs"), n_pix,
                                      {"description": "image pixels (rays / subsample^2) in the "
                                                      "mean of each source pixel"})
    out_vars.update(_image_bookkeeping(fp.reshape(ly.size, lx.size), src, grid, min_image_pixels))
    coords = _source_coords(grid, centre, scale, lines)
    attrs = {k: v for k, v in maps_sb.attrs.items() if k not in {"cube_wcs", "wcs"}}
    attrs.update(image_pixel_scale_arcsec=float(lens.attrs["pixel_scale_arcsec"]),
                 pixel_scale_arcsec=pixel, source_pixel_arcsec=pixel,
                 kpc_per_arcsec=float(scale), subsample=int(subsample),
                 centre_beta_arcsec=[float(centre[0]), float(centre[1])], errors=errors,
                 lens_wcs=lens.attrs["wcs"], plane="source")
    return xr.Dataset(out_vars, coords=coords, attrs=attrs)


def _check_delens_inputs(maps_sb: xr.Dataset, lens: xr.Dataset, errors: str) -> None:
    """ConfigError/InputError for an unknown error model, unscaled lens maps or another grid."""
    if errors not in {"spaxel", "independent"}:
        raise ConfigError(f"errors must be 'spaxel' or 'independent', got {errors!r}")
    if lens.attrs.get("normalisation", "source") != "source":
        raise ConfigError("lens maps are in the 'dls_ds' normalisation: call rescale_lens(lens, "
                          "z_lens=..., z_source=...) before delens")
    if "wcs" in maps_sb.attrs and "wcs" in lens.attrs and maps_sb.attrs["wcs"] != lens.attrs["wcs"]:
        raise InputError("line maps were rebinned onto another lens grid than these lens maps; "
                         "call rebin_to_lens_grid with the same lens")


def _physical_scale(lens: xr.Dataset, kpc_per_arcsec: float | None) -> float:
    """kpc per arcsec: as given, else at ``lens.attrs["z_source"]``."""
    if kpc_per_arcsec is not None:
        return kpc_per_arcsec
    if "z_source" not in lens.attrs:
        raise ConfigError("delens needs kpc_per_arcsec= or a lens with attrs['z_source']")
    return _kpc_per_arcsec(float(lens.attrs["z_source"]))


def _image_footprint(maps_sb: xr.Dataset, footprint: xr.DataArray | None, ref_flux: np.ndarray,
                     ref_line, ly: np.ndarray, lx: np.ndarray, footprint_snr: float) -> np.ndarray:
    """Flat image-plane footprint: given, else finite ``ref_line`` flux above ``footprint_snr``."""
    if footprint is not None:
        return footprint.sel(ly=ly, lx=lx).values.astype(bool).ravel()
    fp = np.isfinite(ref_flux)
    if "snr" in maps_sb:
        fp &= _line_values(maps_sb, "snr", ref_line) > footprint_snr
    return fp


def _finite_pixels(maps_sb: xr.Dataset, names: list[str], n_pix: int) -> np.ndarray:
    """Lens-grid pixels where any map variable is finite (InputError if there is none)."""
    any_finite = np.zeros(n_pix, bool)
    for name in names:
        v = maps_sb[name]
        any_finite |= np.isfinite(v.values.reshape(-1, n_pix)).any(axis=0)
    if not any_finite.any():
        raise InputError("line maps: no finite pixel to de-lens (all NaN on the lens grid)")
    return any_finite


def _flux_weighted_centre(bx: np.ndarray, by: np.ndarray, ref_flux: np.ndarray, s2: int,
                          pixel: float, rng_x: tuple, rng_y: tuple) -> tuple[float, float]:
    """Source-plane centroid of the de-lensed reference flux on a provisional grid over all rays."""
    grid0 = SourceGrid.around(((rng_x[0] + rng_x[1]) / 2, (rng_y[0] + rng_y[1]) / 2), pixel,
                              rng_x, rng_y)
    idx0 = grid0.index(bx, by).ravel()
    m0, _ = _bin_mean(idx0, np.repeat(ref_flux, s2), grid0.n)
    w = np.nan_to_num(m0).reshape(grid0.ny, grid0.nx).clip(min=0)
    if w.sum() <= 0:
        w = np.isfinite(m0).reshape(grid0.ny, grid0.nx).astype(float)
    return (float(np.sum(w.sum(0) * grid0.beta_x) / w.sum()),
            float(np.sum(w.sum(1) * grid0.beta_y) / w.sum()))


def _centred_grid(bx: np.ndarray, by: np.ndarray, any_finite: np.ndarray, ref_flux: np.ndarray,
                  *, s2: int, pixel: float, centre: tuple[float, float] | None,
                  source_extent) -> tuple[SourceGrid, tuple[float, float]]:
    """Source grid with a pixel on the galaxy centre, over all rays or ``source_extent``."""
    use = any_finite[:, None] & np.ones((1, s2), bool)
    # provisional grid over all rays, then centre on the galaxy and crop
    bxf, byf = bx[use], by[use]
    rng_x, rng_y = (bxf.min(), bxf.max()), (byf.min(), byf.max())
    if centre is None:
        centre = _flux_weighted_centre(bx, by, ref_flux, s2, pixel, rng_x, rng_y)
    if source_extent is not None:
        hx, hy = np.broadcast_to(np.asarray(source_extent, float), (2,))
        rng_x, rng_y = (centre[0] - hx, centre[0] + hx), (centre[1] - hy, centre[1] + hy)
    return SourceGrid.around(centre, pixel, rng_x, rng_y), centre


def _noise_groups(maps_sb: xr.Dataset, errors: str, n_pix: int, s2: int) -> np.ndarray | None:
    """Per ray, the IFU spaxel (else image pixel) sharing its noise draw; None if independent."""
    if errors != "spaxel":
        return None
    if "spaxel_index" in maps_sb:
        spaxel = np.nan_to_num(maps_sb["spaxel_index"].values.ravel(), nan=-1)
        return np.repeat(spaxel.astype(np.int64), s2)
    return np.repeat(np.arange(n_pix), s2)


def _binned_variables(maps_sb: xr.Dataset, names: list[str], lines: list, src_flat: np.ndarray,
                      group: np.ndarray | None, grid: SourceGrid, s2: int
                      ) -> tuple[dict[str, Any], np.ndarray]:
    """Every map variable averaged per source pixel (K20 §3.2.3), and the image pixels per mean.

    Values are coverage-weighted means of the rays (:func:`_bin_mean`); ``flux_err`` is
    the error of that mean (:func:`_bin_error`, rays of one ``group`` correlated).
    """
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
    return out_vars, n_pix


def _source_coords(grid: SourceGrid, centre: tuple[float, float], scale: float,
                   lines: list) -> dict[str, Any]:
    """Coordinates of the source maps: kpc and arcsec from the centre, β in the lens frame."""
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
    return coords


def _map_variables_lens(maps: xr.Dataset) -> list[str]:
    """Float variables on the lens grid that are de-lensed (not snr, coverage, spaxel_index)."""
    return [name for name, v in maps.data_vars.items()
            if {"ly", "lx"} <= set(v.dims) and v.dtype.kind == "f"
            and name not in {"snr", "coverage", "spaxel_index"}]


def _line_values(maps: xr.Dataset, name: str, line) -> np.ndarray:
    """Flat (ly, lx) values of variable ``name`` for one line."""
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

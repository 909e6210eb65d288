"""Registration: overlap checks, exact-overlap rebinning to the lens grid, alignment.

Part of :mod:`klever_nb.lensing` (see the package docstring for the flow).

References: K20 §3.2.2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr
from scipy import ndimage

from klever_nb.celestial import pixel_scale_from_wcs
from klever_nb.errors import InputError
from klever_nb.lensing.maps import FWHM_PER_SIGMA, _celestial, as_lens_grid

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
        (from :func:`hst_registration_shift`).

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


#: A registration offset larger than this is not trusted (KMOS IFUs are placed to ~0.2").
MAX_HST_SHIFT_ARCSEC = 1.0


def hst_registration_shift(line_maps: xr.Dataset, lens: xr.Dataset, hst: xr.DataArray, *,
                           cube_wcs: str, psf_fwhm_arcsec: float,
                           max_shift_arcsec: float = MAX_HST_SHIFT_ARCSEC
                           ) -> tuple[tuple[float, float], dict]:
    """Offset (dy, dx) in arcsec that registers the IFU maps on the HST image (K20 §3.2.2).

    The Halpha (else the brightest) line map is rebinned onto the lens grid and
    cross-correlated with the HST image, smoothed to the IFU PSF, over the part of the grid
    the IFU covers (:func:`klever_nb.align.cross_correlation_shift`: the whole shape, not
    the peak, which is ill-defined on arcs — a peak-centroid version gave false offsets
    between knots of lensed arcs). ``hst`` must be on the lens-map grid
    (:func:`klever_nb.io.images.open_image`; ``attrs["psf_fwhm_arcsec"]`` its own PSF).
    When it is not, or the offset reaches ``max_shift_arcsec``, no shift is applied and the
    returned dict says why. The shift is along the lens grid's pixel axes, the convention
    of ``rebin_to_lens_grid(shift_arcsec=...)``.
    """
    from klever_nb import align

    grid = as_lens_grid(lens)
    name = str(hst.attrs.get("source_file", "the HST image"))
    if hst.shape != grid["alpha_x"].shape:
        return (0.0, 0.0), {"hst_registration": f"{name} is not on the deflection-map grid: "
                            "no shift applied"}
    totals = line_maps["flux"].sum(("y", "x"), skipna=True)
    line = "Halpha" if "Halpha" in line_maps["line"].values else \
        str(line_maps["line"].values[int(np.nanargmax(totals.values))])
    on_grid = rebin_to_lens_grid(line_maps[["flux", "flux_err"]].sel(line=[line]), lens,
                                 cube_wcs=cube_wcs)
    pixel = float(hst.attrs["pixel_scale_arcsec"])
    hst_psf = float(hst.attrs.get("psf_fwhm_arcsec", 0.0))
    blur = np.sqrt(max(psf_fwhm_arcsec**2 - hst_psf**2, 0.0)) / FWHM_PER_SIGMA / pixel
    reference = ndimage.gaussian_filter(np.nan_to_num(hst.values.astype(float)), blur)
    rows, cols = on_grid["ly"].values.astype(int), on_grid["lx"].values.astype(int)
    dy, dx = align.cross_correlation_shift(
        reference[np.ix_(rows, cols)],
        on_grid["flux"].sel(line=line).transpose("ly", "lx").values,
        max_shift_pix=max_shift_arcsec / pixel)
    shift = (dy * pixel, dx * pixel)
    if max(abs(shift[0]), abs(shift[1])) >= max_shift_arcsec - pixel:
        return (0.0, 0.0), {"hst_registration": f"offset {shift} arcsec at the search limit: "
                            "not applied"}
    return shift, {"hst_registration": f"{line} map cross-correlated with {name}",
                   "hst_shift_arcsec": list(shift)}

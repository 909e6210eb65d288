"""Ray tracing on a lens grid: critical curves, caustics and the image ↔ source lookup.

Part of :mod:`klever_nb.lensing` (see the package docstring for the frames). Pure functions
of a lens Dataset at the source redshift (:func:`lens_at_source`); positions are in arcsec in
the lens frame, rays follow β = θ − α (DESIGN.md "Input files").

* :func:`trace_to_source` maps image-plane positions to the source plane (α bilinear between
  the map's pixel centres, so at pixel centres it is the map itself, as in :func:`delens`).
* :func:`critical_curves` are the zero contours of det A = (1 − κ)² − γ² (κ, γ from
  :func:`convergence_shear`, the magnification's own), :func:`caustics` their images.
* :func:`ray_lookup` re-traces the rays of a reconstruction (same rays, same source grid, same
  ``subsample`` as :func:`delens`), :func:`landing_pixel` and :func:`feeding_pixels` answer
  "where does this image pixel land" and "which image pixels feed this source pixel".

References: K20 §3.2.3 (ray tracing, critical curves); FACTS.md §12.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy import ndimage

from klever_nb.errors import InputError
from klever_nb.lensing.delensing import _trace_rays, source_grid_of
from klever_nb.lensing.maps import as_lens_grid, convergence_shear
from klever_nb.lensing.reconstruct import _at_source

__all__ = ["lens_at_source", "magnification_determinant", "trace_to_source", "critical_curves",
           "caustics", "ray_lookup", "landing_pixel", "feeding_pixels", "source_plane_kpc"]


def lens_at_source(lens: xr.Dataset, *, redshift: float, z_lens: float | None = None
                   ) -> xr.Dataset:
    """The lens maps at the source redshift, as :func:`reconstruct_source_plane` uses them.

    ``dls_ds`` maps are rescaled with ``z_lens`` (default ``attrs["z_lens"]``); maps already
    in the ``source`` normalisation are returned on the lens-grid layout.
    """
    return _at_source(lens, float(redshift), z_lens)


def magnification_determinant(lens: xr.Dataset) -> np.ndarray:
    """det A = (1 − κ)² − γ² on the lens grid ``(ly, lx)`` (1/μ; zero on critical curves)."""
    kappa, gamma = convergence_shear(lens)
    return (1.0 - kappa) ** 2 - gamma**2


def _fractional_index(axis: np.ndarray, values: np.ndarray) -> np.ndarray:
    step = axis[1] - axis[0] if axis.size > 1 else 1.0
    return (values - axis[0]) / step


def trace_to_source(lens: xr.Dataset, theta_x, theta_y) -> tuple[np.ndarray, np.ndarray]:
    """β = θ − α(θ) of image-plane positions (arcsec, lens frame), any matching shapes.

    α is bilinear between pixel centres (at a pixel centre: the map value, as in
    :func:`delens`); positions more than half a pixel outside the map give NaN.
    """
    lens = as_lens_grid(lens)
    tx = np.asarray(theta_x, dtype=float)
    ty = np.asarray(theta_y, dtype=float)
    tx, ty = np.broadcast_arrays(tx, ty)
    fx = _fractional_index(lens["theta_x"].values, tx)
    fy = _fractional_index(lens["theta_y"].values, ty)
    ny, nx = lens.sizes["ly"], lens.sizes["lx"]
    inside = (fx >= -0.5) & (fx <= nx - 0.5) & (fy >= -0.5) & (fy <= ny - 0.5)
    coords = [fy.ravel(), fx.ravel()]
    ax = ndimage.map_coordinates(lens["alpha_x"].values, coords, order=1, mode="nearest")
    ay = ndimage.map_coordinates(lens["alpha_y"].values, coords, order=1, mode="nearest")
    bx = np.where(inside, tx - ax.reshape(tx.shape), np.nan)
    by = np.where(inside, ty - ay.reshape(ty.shape), np.nan)
    return bx, by


def critical_curves(lens: xr.Dataset, *, level: float = 0.0,
                    min_size_pixels: float = 1.0) -> list[np.ndarray]:
    """Critical curves: contours of det A = ``level`` on the lens grid.

    Parameters
    ----------
    lens : xarray.Dataset
        Lens at the source redshift.
    level : float
        Contour level of det A (0: the critical curves).
    min_size_pixels : float
        Curves narrower than this many lens pixels along both axes are dropped: a loop
        around a single pixel is the grid sampling a singular centre (an SIS or SIE
        evaluated at r = 0), not a curve the maps resolve.

    Returns
    -------
    list of ndarray
        One ``(n, 2)`` array of (θx, θy) in arcsec (lens frame) per connected curve
        (marching squares, linear between pixel centres; NaN pixels are left out).
    """
    import contourpy

    lens = as_lens_grid(lens)
    det = magnification_determinant(lens)
    gen = contourpy.contour_generator(lens["theta_x"].values, lens["theta_y"].values,
                                      np.ma.masked_invalid(det))
    smallest = float(min_size_pixels) * float(lens.attrs["pixel_scale_arcsec"])
    out = []
    for path in gen.lines(level):
        path = np.asarray(path, dtype=float)
        if len(path) > 1 and np.ptp(path, axis=0).max() >= smallest:
            out.append(path)
    return out


def caustics(lens: xr.Dataset, curves: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Caustics: the critical curves traced to the source plane (:func:`trace_to_source`).

    ``curves`` defaults to :func:`critical_curves` of ``lens``. Returns one ``(n, 2)`` array
    of (βx, βy) in arcsec (lens frame) per curve.
    """
    if curves is None:
        curves = critical_curves(lens)
    return [np.column_stack(trace_to_source(lens, c[:, 0], c[:, 1])) for c in curves]


def ray_lookup(source_maps: xr.Dataset, lens: xr.Dataset, *, ly=None, lx=None) -> xr.Dataset:
    """The rays of a reconstruction: where each ray of each image pixel lands.

    Parameters
    ----------
    source_maps : xarray.Dataset
        Output of :func:`delens` / :func:`reconstruct_source_plane` (its grid and
        ``attrs["subsample"]`` are reused).
    lens : xarray.Dataset
        The lens at the source redshift that made ``source_maps``.
    ly, lx : array of int, optional
        Lens-grid rows and columns of the image pixels (default the whole lens grid).

    Returns
    -------
    xarray.Dataset
        On ``(ly, lx, ray)`` (``subsample``² rays per pixel, as :func:`delens` traces them):
        ``beta_x``, ``beta_y`` (arcsec, lens frame) and ``source_index`` (flat index
        ``row * nx + col`` of the source pixel, −1 outside the grid); ``theta_x``/``theta_y``
        coordinates; ``attrs`` ``nx``, ``ny``, ``subsample``.
    """
    lens = as_lens_grid(lens)
    lens_wcs = source_maps.attrs.get("lens_wcs")
    if lens_wcs is not None and "wcs" in lens.attrs and lens_wcs != lens.attrs["wcs"]:
        raise InputError("ray_lookup: the source maps were reconstructed on another lens grid")
    ly = np.arange(lens.sizes["ly"]) if ly is None else np.asarray(ly, dtype=int)
    lx = np.arange(lens.sizes["lx"]) if lx is None else np.asarray(lx, dtype=int)
    subsample = int(source_maps.attrs.get("subsample", 1))
    grid = source_grid_of(source_maps)
    bx, by = _trace_rays(lens, ly, lx, subsample)
    shape = (ly.size, lx.size, subsample * subsample)
    index = grid.index(bx, by).reshape(shape)
    dims = ("ly", "lx", "ray")
    return xr.Dataset(
        {"beta_x": (dims, bx.reshape(shape), {"units": "arcsec"}),
         "beta_y": (dims, by.reshape(shape), {"units": "arcsec"}),
         "source_index": (dims, index, {"description": "row * nx + col of the source pixel, "
                                                       "-1 outside the grid"})},
        coords={"ly": ly, "lx": lx, "theta_x": ("lx", lens["theta_x"].values[lx]),
                "theta_y": ("ly", lens["theta_y"].values[ly])},
        attrs={"nx": grid.nx, "ny": grid.ny, "subsample": subsample})


def landing_pixel(lookup: xr.Dataset, row: int, col: int) -> tuple[int, int]:
    """Source pixel (row, column) receiving most rays of image pixel (row, col) of the lookup.

    ``row``/``col`` are positions along the lookup's ``ly``/``lx``; (−1, −1) when every ray
    lands outside the source grid. With one ray per pixel: the pixel its centre lands in.
    """
    idx = np.asarray(lookup["source_index"].values[row, col]).ravel()
    idx = idx[idx >= 0]
    if idx.size == 0:
        return (-1, -1)
    flat = int(np.bincount(idx).argmax())
    r, c = divmod(flat, int(lookup.attrs["nx"]))
    return int(r), int(c)


def feeding_pixels(lookup: xr.Dataset, row: int, col: int) -> np.ndarray:
    """``(n, 2)`` positions (row, column along ``ly``, ``lx``) of the image pixels with a ray
    in source pixel (row, col): the pixels whose values enter that source pixel's mean."""
    flat = int(row) * int(lookup.attrs["nx"]) + int(col)
    return np.argwhere((lookup["source_index"].values == flat).any(axis=-1))


def source_plane_kpc(source_maps: xr.Dataset, beta_x, beta_y) -> tuple[np.ndarray, np.ndarray]:
    """Source-plane positions β (arcsec, lens frame) in the maps' ``xs``/``ys`` kpc frame
    (from the galaxy centre ``attrs["centre_beta_arcsec"]``, ``attrs["kpc_per_arcsec"]``)."""
    cx, cy = (float(v) for v in source_maps.attrs["centre_beta_arcsec"])
    scale = float(source_maps.attrs["kpc_per_arcsec"])
    return ((np.asarray(beta_x, dtype=float) - cx) * scale,
            (np.asarray(beta_y, dtype=float) - cy) * scale)

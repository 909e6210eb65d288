"""Linear forward operators of the forward-modelled gradient: source image -> IFU pixels.

Part of :mod:`klever_nb.gradients.forward` (import from there). A source-plane image on a
regular kpc grid is lensed, PSF-convolved and rebinned to the IFU pixels by a sparse matrix
(:class:`LinearForward`): from the lensing stage's ray tracing
(:func:`lens_forward_from_lensing`) or from a constant-Jacobian lens (:class:`AffineLens`,
tests and benchmarks).

References
----------
K20 §3.2 (lens model, PSF); FACTS.md §13 (conventions).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr
from scipy import sparse
from scipy.special import ndtr

from klever_nb.constants import FWHM_PER_SIGMA
from klever_nb.errors import ConfigError


# ---------------------------------------------------------------------------
# Linear operators source plane -> IFU pixels
# ---------------------------------------------------------------------------
class LinearForward:
    """A linear map from a source-plane image to IFU pixels: ``ifu = matrix @ source.ravel()``.

    Calling it with a ``(ny_s, nx_s)`` source image returns the ``ifu_shape`` image, so it can
    be passed wherever a ``lens_forward`` callable is expected.
    """

    def __init__(self, matrix: Any, source_shape: tuple[int, int],
                 ifu_shape: tuple[int, int]) -> None:
        self.matrix = matrix
        self.source_shape = tuple(source_shape)
        self.ifu_shape = tuple(ifu_shape)

    def __call__(self, source_image: np.ndarray) -> np.ndarray:
        out = self.matrix @ np.asarray(source_image, float).reshape(-1)
        return np.asarray(out).reshape(self.ifu_shape)


def linear_operator(lens_forward: Callable[[np.ndarray], np.ndarray],
                    source_shape: tuple[int, int], *, check: bool = True) -> LinearForward:
    """The matrix of a linear ``lens_forward`` callable, by probing it with unit images.

    One call per source pixel (a ``LinearForward`` is returned unchanged). With ``check``
    the operator is verified on a random image (relative error < 1e-6), since the forward
    fit is only valid for a linear lens + PSF + rebin step.

    Raises
    ------
    ConfigError
        If the callable is not linear.
    """
    if isinstance(lens_forward, LinearForward):
        return lens_forward
    n_src = int(np.prod(source_shape))
    probe = np.zeros(n_src)
    columns = []
    for j in range(n_src):
        probe[j] = 1.0
        columns.append(sparse.csc_matrix(np.asarray(lens_forward(probe.reshape(source_shape)),
                                                    float).reshape(-1, 1)))
        probe[j] = 0.0
    ifu = np.asarray(lens_forward(probe.reshape(source_shape)))
    op = LinearForward(sparse.hstack(columns).tocsr(), source_shape, ifu.shape)
    if check:
        rand = np.random.default_rng(0).random(source_shape)
        direct = np.asarray(lens_forward(rand), float)
        scale = max(np.abs(direct).max(), 1e-300)
        if np.abs(op(rand) - direct).max() > 1e-6 * scale:
            raise ConfigError("lens_forward: the callable is not linear in the source image; "
                              "the forward gradient needs lens + PSF + rebin only")
    return op


def lens_forward_from_lensing(lens: xr.Dataset, *, source_maps: xr.Dataset,
                              psf_fwhm_arcsec: float, ifu_wcs: str, ifu_shape: tuple[int, int],
                              subsample: int = 2, shift_arcsec: tuple[float, float] = (0.0, 0.0)
                              ) -> tuple[LinearForward, tuple[np.ndarray, np.ndarray]]:
    """Adapter to :mod:`klever_nb.lensing`: its forward operator on the grid of source maps.

    Builds :class:`klever_nb.lensing.LensingOperator` (the engine of
    :func:`klever_nb.lensing.forward_model`: rays through the deflection maps, Gaussian PSF,
    exact-overlap rebinning to the IFU grid) once on the grid of ``source_maps`` (a
    :func:`klever_nb.lensing.delens` product: ``beta_x``/``beta_y`` in arcsec, ``ys``/``xs``
    in kpc from the galaxy centre) and probes it into a matrix.

    Returns
    -------
    operator : LinearForward
    source_grid_kpc : (ys, xs)
        Pass both to :func:`fit_forward_gradient` (``lens_forward=``, ``source_grid_kpc=``).
    """
    from klever_nb import lensing

    if not hasattr(lensing, "LensingOperator"):
        raise ConfigError("klever_nb.lensing has no LensingOperator in this version; pass your "
                          "own lens_forward callable")
    grid = lensing.source_grid_of(source_maps)
    engine = lensing.LensingOperator(lens, grid, psf_fwhm_arcsec=psf_fwhm_arcsec,
                                     ifu_wcs=ifu_wcs, ifu_shape=tuple(ifu_shape),
                                     subsample=subsample, shift_arcsec=shift_arcsec)
    ys = np.asarray(source_maps["ys"], float)
    xs = np.asarray(source_maps["xs"], float)
    n_ifu = int(np.prod(ifu_shape))
    if hasattr(engine, "adjoint") and n_ifu < ys.size * xs.size:
        # fewer probes through the (exact) adjoint: row i of the matrix = adjoint(e_i)
        unit = np.zeros(n_ifu)
        rows = []
        for i in range(n_ifu):
            unit[i] = 1.0
            rows.append(sparse.csr_matrix(np.asarray(engine.adjoint(unit.reshape(ifu_shape)),
                                                     float).reshape(1, -1)))
            unit[i] = 0.0
        op = LinearForward(sparse.vstack(rows).tocsr(), (ys.size, xs.size), tuple(ifu_shape))
        rand = np.random.default_rng(0).random((ys.size, xs.size))
        direct = np.asarray(engine.forward(rand), float)
        if np.abs(op(rand) - direct).max() > 1e-6 * max(np.abs(direct).max(), 1e-300):
            raise ConfigError("klever_nb.lensing.LensingOperator.adjoint is not the transpose "
                              "of forward; cannot build the forward-gradient operator")
        return op, (ys, xs)
    return linear_operator(engine.forward, (ys.size, xs.size)), (ys, xs)


@dataclass(frozen=True)
class AffineLens:
    """A lens with a constant Jacobian: the local model of a magnified image.

    beta = A theta with A = R diag(1/mu_t, 1/mu_r) R^T, R the rotation by
    ``tangential_angle_deg`` (image-plane direction of the tangential stretch, from +x
    towards +y). The source position ``source_centre_kpc`` is imaged at the IFU centre.
    Used by tests and benchmarks (and to emulate a magnification without a lens model).
    """

    kpc_per_arcsec: float
    mu_tangential: float = 1.0
    mu_radial: float = 1.0
    tangential_angle_deg: float = 0.0
    source_centre_kpc: tuple[float, float] = (0.0, 0.0)

    @property
    def magnification(self) -> float:
        """Total magnification mu_t x mu_r."""
        return self.mu_tangential * self.mu_radial

    def jacobian(self) -> np.ndarray:
        """A = d beta / d theta (2 x 2, acting on (x, y))."""
        phi = np.deg2rad(self.tangential_angle_deg)
        rot = np.array([[np.cos(phi), -np.sin(phi)], [np.sin(phi), np.cos(phi)]])
        return rot @ np.diag([1 / self.mu_tangential, 1 / self.mu_radial]) @ rot.T

    def to_source_kpc(self, theta_x: np.ndarray, theta_y: np.ndarray) -> tuple[np.ndarray, ...]:
        """Source-plane (x, y) in kpc of image-plane offsets (arcsec) from the IFU centre."""
        a = self.jacobian()
        bx = (a[0, 0] * theta_x + a[0, 1] * theta_y) * self.kpc_per_arcsec
        by = (a[1, 0] * theta_x + a[1, 1] * theta_y) * self.kpc_per_arcsec
        return bx + self.source_centre_kpc[0], by + self.source_centre_kpc[1]

    def source_psf(self, psf_fwhm_arcsec: float) -> dict[str, float]:
        """The image-plane Gaussian PSF mapped to the source plane (the paper's SP PSF).

        ``theta_deg`` is the major axis's angle in the source-grid frame (from +xs towards
        +ys, in [0, 180)), not a sky position angle (FACTS.md §13).
        """
        fwhm_t = psf_fwhm_arcsec / self.mu_tangential * self.kpc_per_arcsec
        fwhm_r = psf_fwhm_arcsec / self.mu_radial * self.kpc_per_arcsec
        if fwhm_r >= fwhm_t:
            return {"fwhm_major_kpc": fwhm_r, "fwhm_minor_kpc": fwhm_t,
                    "theta_deg": (self.tangential_angle_deg + 90.0) % 180.0}
        return {"fwhm_major_kpc": fwhm_t, "fwhm_minor_kpc": fwhm_r,
                "theta_deg": self.tangential_angle_deg % 180.0}


def _pixel_response(n_pix: int, n_fine: int, margin: int, oversample: int,
                    sigma_pix: float) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of a point at each fine position (IFU-pixel units) landing in each pixel."""
    fine = (np.arange(n_fine) + 0.5) / oversample - 0.5 - margin
    lo = np.arange(n_pix)[:, None] - 0.5 - fine[None]
    hi = lo + 1.0
    if sigma_pix > 0:
        resp = ndtr(hi / sigma_pix) - ndtr(lo / sigma_pix)
    else:
        resp = ((lo < 0) & (hi >= 0)).astype(float)
    return fine, resp


def _affine_geometry(lens: AffineLens, ifu_shape, pixel_scale_arcsec, psf_fwhm_arcsec,
                     oversample):
    ny, nx = ifu_shape
    sigma_pix = psf_fwhm_arcsec / FWHM_PER_SIGMA / pixel_scale_arcsec
    margin = int(np.ceil(4 * sigma_pix)) + 1
    nfy, nfx = (ny + 2 * margin) * oversample, (nx + 2 * margin) * oversample
    fy, ry = _pixel_response(ny, nfy, margin, oversample, sigma_pix)
    fx, rx = _pixel_response(nx, nfx, margin, oversample, sigma_pix)
    cy, cx = (ny - 1) / 2.0, (nx - 1) / 2.0
    ty, tx = np.meshgrid((fy - cy) * pixel_scale_arcsec, (fx - cx) * pixel_scale_arcsec,
                         indexing="ij")
    bx, by = lens.to_source_kpc(tx, ty)
    area = (pixel_scale_arcsec / oversample) ** 2
    return ry, rx, bx, by, area


def affine_render(lens: AffineLens, source_function: Callable, *, ifu_shape: tuple[int, int],
                  pixel_scale_arcsec: float, psf_fwhm_arcsec: float,
                  oversample: int = 5) -> np.ndarray:
    """IFU image (flux per pixel) of an analytic source surface brightness (per arcsec^2).

    ``source_function(x_kpc, y_kpc)`` is evaluated at ``oversample^2`` points per IFU pixel
    of the lensed image; the Gaussian PSF and the pixel are integrated exactly (erf).
    Stacked outputs work: the function may return ``(..., fine_y, fine_x)`` arrays.
    """
    ry, rx, bx, by, area = _affine_geometry(lens, ifu_shape, pixel_scale_arcsec,
                                            psf_fwhm_arcsec, oversample)
    sb = np.asarray(source_function(bx, by), float)
    return area * np.einsum("if,...fg,jg->...ij", ry, sb, rx, optimize=True)


def _bilinear_matrix(bx, by, ys, xs) -> sparse.csr_matrix:
    """Sparse (n_points, n_src) bilinear interpolation from a regular (ys, xs) grid."""
    fy = (by.ravel() - ys[0]) / (ys[1] - ys[0])
    fx = (bx.ravel() - xs[0]) / (xs[1] - xs[0])
    iy0, ix0 = np.floor(fy).astype(int), np.floor(fx).astype(int)
    ty, tx = fy - iy0, fx - ix0
    rows, cols, vals = [], [], []
    n = fy.size
    for dy, wy in ((0, 1 - ty), (1, ty)):
        for dx, wx in ((0, 1 - tx), (1, tx)):
            iy, ix = iy0 + dy, ix0 + dx
            ok = (iy >= 0) & (iy < ys.size) & (ix >= 0) & (ix < xs.size)
            rows.append(np.arange(n)[ok])
            cols.append((iy * xs.size + ix)[ok])
            vals.append((wy * wx)[ok])
    return sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows),
                                                      np.concatenate(cols))),
                             shape=(n, ys.size * xs.size))


def affine_forward(lens: AffineLens, *, source_ys_kpc: np.ndarray, source_xs_kpc: np.ndarray,
                   ifu_shape: tuple[int, int], pixel_scale_arcsec: float,
                   psf_fwhm_arcsec: float, oversample: int = 3) -> LinearForward:
    """The :class:`LinearForward` of an :class:`AffineLens` for images on a source grid.

    The source image (surface brightness per arcsec^2, bilinearly interpolated) is sampled at
    ``oversample^2`` points per IFU pixel, then PSF and pixel are integrated exactly, as in
    :func:`affine_render` (which it matches for sources smooth on the grid scale).
    """
    ys, xs = np.asarray(source_ys_kpc, float), np.asarray(source_xs_kpc, float)
    ry, rx, bx, by, area = _affine_geometry(lens, ifu_shape, pixel_scale_arcsec,
                                            psf_fwhm_arcsec, oversample)
    interp = _bilinear_matrix(bx, by, ys, xs)  # (nfy*nfx, n_src)
    nfy, nfx = bx.shape
    blocks = []
    for iy in range(ifu_shape[0]):
        kernel = area * (ry[iy][:, None, None] * rx.T[None]).reshape(nfy * nfx, -1)
        block = (interp.T @ kernel).T  # (nx, n_src)
        block[np.abs(block) < 1e-12 * max(np.abs(block).max(), 1e-300)] = 0.0
        blocks.append(sparse.csr_matrix(block))
    return LinearForward(sparse.vstack(blocks).tocsr(), (ys.size, xs.size), ifu_shape)


def affine_delens(image: np.ndarray, lens: AffineLens, *, source_ys_kpc: np.ndarray,
                  source_xs_kpc: np.ndarray, pixel_scale_arcsec: float) -> np.ndarray:
    """Source-plane map of an IFU image (per-pixel values resampled, bilinear).

    Surface brightness is conserved by lensing, so per-pixel fluxes, ratios or errors are
    simply read at theta(beta); outside the IFU the result is NaN.
    """
    from scipy.ndimage import map_coordinates

    ys, xs = np.asarray(source_ys_kpc, float), np.asarray(source_xs_kpc, float)
    yy, xx = np.meshgrid(ys - lens.source_centre_kpc[1], xs - lens.source_centre_kpc[0],
                         indexing="ij")
    inv = np.linalg.inv(lens.jacobian()) / lens.kpc_per_arcsec
    tx = inv[0, 0] * xx + inv[0, 1] * yy
    ty = inv[1, 0] * xx + inv[1, 1] * yy
    ny, nx = np.shape(image)
    py = ty / pixel_scale_arcsec + (ny - 1) / 2.0
    px = tx / pixel_scale_arcsec + (nx - 1) / 2.0
    inside = (py >= 0) & (py <= ny - 1) & (px >= 0) & (px <= nx - 1)
    out = map_coordinates(np.nan_to_num(np.asarray(image, float)), [py, px], order=1,
                          mode="nearest")
    bad = map_coordinates((~np.isfinite(image)).astype(float), [py, px], order=1,
                          mode="nearest") > 0
    return np.where(inside & ~bad, out, np.nan)



"""PSF axes and sizes, source-plane coordinates and the elliptical annuli (K20 §4.2).

Part of :mod:`klever_nb.gradients` (import from there); see its docstring for the
decisions on annulus size and radii.

References
----------
K20 §4.2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr
from photutils.aperture import EllipticalAnnulus, EllipticalAperture

from klever_nb.constants import FWHM_PER_SIGMA
from klever_nb.errors import ConfigError, InputError

_FWHM_TO_SIGMA = 1.0 / FWHM_PER_SIGMA


# ---------------------------------------------------------------------------
# PSF and grid geometry
# ---------------------------------------------------------------------------
def psf_axes(psf: Mapping[str, float]) -> tuple[float, float, float]:
    """(FWHM major, FWHM minor, theta in degrees) of a source-PSF dict, validated.

    ``theta_deg`` is the major axis's angle in the source-grid frame, counter-clockwise from
    +xs towards +ys (FACTS.md §13), *not* a sky position angle: a dict with only ``pa_deg``
    is refused, since that name has meant both.

    Raises
    ------
    ConfigError
        If a key is missing or a FWHM is not positive.
    """
    if "theta_deg" not in psf and "pa_deg" in psf:
        raise ConfigError("psf: 'pa_deg' is ambiguous; give 'theta_deg', the major axis's angle "
                          "in the source-grid frame from +xs towards +ys (a sky position angle "
                          "east of north is a different number: klever_nb.lensing.annulus_psf "
                          "builds the dict from a lensing summary)")
    try:
        fwhm_a = float(psf["fwhm_major_kpc"])
        fwhm_b = float(psf["fwhm_minor_kpc"])
        theta = float(psf.get("theta_deg", 0.0))
    except (KeyError, TypeError, ValueError):
        raise ConfigError("psf: needs keys 'fwhm_major_kpc', 'fwhm_minor_kpc' (kpc, > 0) and "
                          f"'theta_deg'; got {dict(psf)!r}") from None
    if not (np.isfinite(fwhm_a) and np.isfinite(fwhm_b) and fwhm_a > 0 and fwhm_b > 0):
        raise ConfigError(f"psf: FWHMs must be finite and positive, got {fwhm_a}, {fwhm_b}")
    if fwhm_b > fwhm_a:
        fwhm_a, fwhm_b, theta = fwhm_b, fwhm_a, theta + 90.0
    return fwhm_a, fwhm_b, theta % 180.0


def psf_linear_size_kpc(psf: Mapping[str, float]) -> float:
    """sqrt(FWHM_maj x FWHM_min) in kpc: the paper's linear PSF size (K20 §4.2)."""
    fwhm_a, fwhm_b, _ = psf_axes(psf)
    return float(np.sqrt(fwhm_a * fwhm_b))


def psf_hwhm_size_kpc(psf: Mapping[str, float]) -> float:
    """sqrt(HWHM_maj x HWHM_min) in kpc, the unit of the resolution criterion (K20 §4.2)."""
    return 0.5 * psf_linear_size_kpc(psf)


def _coords(obj: Any) -> tuple[np.ndarray, np.ndarray]:
    """(ys, xs) 1-D coordinate arrays in kpc from a Dataset/DataArray or a (ys, xs) pair."""
    if isinstance(obj, xr.Dataset | xr.DataArray):
        if "ys" not in obj.coords or "xs" not in obj.coords:
            raise InputError("source-plane map: needs coordinates 'ys' and 'xs' in kpc "
                             f"(found {list(obj.coords)})")
        ys, xs = np.asarray(obj["ys"], float), np.asarray(obj["xs"], float)
    else:
        try:
            ys, xs = (np.asarray(c, float) for c in obj)
        except (TypeError, ValueError):
            raise ConfigError("shape_or_coords: give a Dataset with 'ys'/'xs' coordinates or a "
                              "(ys_kpc, xs_kpc) pair of 1-D arrays") from None
    if ys.ndim != 1 or xs.ndim != 1 or ys.size < 2 or xs.size < 2:
        raise InputError("source-plane map: 'ys' and 'xs' must be 1-D with at least 2 pixels")
    dy, dx = np.diff(ys), np.diff(xs)
    if not (np.allclose(dy, dy[0], rtol=1e-6) and np.allclose(dx, dx[0], rtol=1e-6)):
        raise InputError("source-plane map: 'ys'/'xs' must be regularly spaced")
    if not np.isclose(abs(dy[0]), abs(dx[0]), rtol=1e-4):
        raise InputError(f"source-plane map: pixels must be square (|dys|={abs(dy[0])}, "
                         f"|dxs|={abs(dx[0])} kpc); resample the map first")
    return ys, xs


def _kpc_to_pixel(ys: np.ndarray, xs: np.ndarray, y_kpc: float, x_kpc: float,
                  pa_deg: float) -> tuple[float, float, float, float]:
    """Pixel (x, y) position, pixel size in kpc and position angle (rad) in pixel axes."""
    dy, dx = ys[1] - ys[0], xs[1] - xs[0]
    pa = np.deg2rad(pa_deg)
    theta = float(np.arctan2(np.sin(pa) * np.sign(dy), np.cos(pa) * np.sign(dx)))
    return float((x_kpc - xs[0]) / dx), float((y_kpc - ys[0]) / dy), float(abs(dx)), theta


def _ellipse_shape(psf: Mapping[str, float], shape: str) -> tuple[float, float]:
    """(axis ratio b/a, PA deg) of the annuli."""
    if shape == "psf":
        fwhm_a, fwhm_b, pa = psf_axes(psf)
        return fwhm_b / fwhm_a, pa
    if shape == "circular":
        return 1.0, 0.0
    raise ConfigError(f"shape: must be 'psf' or 'circular', got {shape!r}")


def _semi_axes(radius: float, q: float, size: str) -> tuple[float, float]:
    if size == "geometric":
        return radius / np.sqrt(q), radius * np.sqrt(q)
    if size == "semi_major":
        return radius, radius * q
    raise ConfigError(f"size: must be 'geometric' or 'semi_major', got {size!r}")


def elliptical_radius_kpc(ys: np.ndarray, xs: np.ndarray, *, centre_kpc: Sequence[float],
                          q: float, pa_deg: float, size: str = "geometric") -> np.ndarray:
    """Radius of each pixel centre in the units that label the annuli (2-D array, kpc).

    ``size="geometric"``: sqrt(a b) of the ellipse through the pixel; ``"semi_major"``: its a.
    """
    yy, xx = np.meshgrid(ys - centre_kpc[1], xs - centre_kpc[0], indexing="ij")
    pa = np.deg2rad(pa_deg)
    u = xx * np.cos(pa) + yy * np.sin(pa)
    v = -xx * np.sin(pa) + yy * np.cos(pa)
    a = np.hypot(u, v / q)
    return a * np.sqrt(q) if size == "geometric" else a


def elliptical_annuli(shape_or_coords: Any, *, centre_kpc: Sequence[float] = (0.0, 0.0),
                      psf: Mapping[str, float], step_fraction: float = 0.5,
                      shape: str = "psf", r_max: float | None = None,
                      size: str = "geometric") -> tuple[list, np.ndarray, np.ndarray]:
    """Elliptical apertures of the radial binning (pixel units, photutils).

    Parameters
    ----------
    shape_or_coords : Dataset, DataArray or (ys_kpc, xs_kpc)
        The source-plane grid (square, regular pixels).
    centre_kpc : (x, y)
        Centre in kpc (``xs``, ``ys`` values).
    psf : dict
        Source PSF ``{"fwhm_major_kpc", "fwhm_minor_kpc", "theta_deg"}`` (angle from +xs
        towards +ys, see :func:`psf_axes`).
    step_fraction : float
        Radial step as a fraction of sqrt(FWHM_maj FWHM_min) (K20 §4.2).
    shape : {"psf", "circular"}
        PSF-shaped ellipses (the paper) or circles (App. A).
    r_max : float, optional
        Outer radius (kpc, same units as the steps); default: the whole grid.
    size : {"geometric", "semi_major"}
        Whether k x step is the geometric-mean radius sqrt(a b) or the semi-major axis.

    Returns
    -------
    apertures : list
        ``EllipticalAperture`` for the central ellipse, then ``EllipticalAnnulus``.
    radii_kpc : ndarray
        Area-weighted mean radius of each annulus, (2/3)(r_out^3 - r_in^3)/(r_out^2 - r_in^2).
    edges_kpc : ndarray
        The n + 1 radii bounding the annuli (0, step, 2 step, ...).

    References
    ----------
    K20 §4.2.
    """
    if not step_fraction > 0:
        raise ConfigError(f"step_fraction: must be > 0, got {step_fraction}")
    ys, xs = _coords(shape_or_coords)
    q, pa = _ellipse_shape(psf, shape)
    step = step_fraction * psf_linear_size_kpc(psf)
    if r_max is None:
        r_max = float(elliptical_radius_kpc(ys, xs, centre_kpc=centre_kpc, q=q, pa_deg=pa,
                                            size=size).max())
    n = max(int(np.ceil(r_max / step - 1e-9)), 1)
    edges = step * np.arange(n + 1)
    xc, yc, pix, theta = _kpc_to_pixel(ys, xs, centre_kpc[1], centre_kpc[0], pa)
    apertures = []
    for r_in, r_out in zip(edges[:-1], edges[1:], strict=True):
        a_out, b_out = (s / pix for s in _semi_axes(r_out, q, size))
        if r_in == 0:
            apertures.append(EllipticalAperture((xc, yc), a_out, b_out, theta=theta))
        else:
            a_in, b_in = (s / pix for s in _semi_axes(r_in, q, size))
            apertures.append(EllipticalAnnulus((xc, yc), a_in, a_out, b_out, b_in=b_in,
                                               theta=theta))
    r_in, r_out = edges[:-1], edges[1:]
    radii = (2.0 / 3.0) * (r_out**3 - r_in**3) / (r_out**2 - r_in**2)
    return apertures, radii, edges


def annulus_weights(apertures: Sequence, shape: tuple[int, int]) -> np.ndarray:
    """Exact fraction of each pixel inside each aperture, shape ``(n_annuli, ny, nx)``.

    Uses photutils ``method="exact"``; the sum over an aperture fully inside the image is its
    area in pixels (pi a b for an ellipse).

    References
    ----------
    K20 §4.2 ("each value is weighted on the fraction of the relative pixel falling into the
    considered aperture").
    """
    out = np.zeros((len(apertures), *shape))
    for k, aperture in enumerate(apertures):
        image = aperture.to_mask(method="exact").to_image(shape)
        if image is not None:
            out[k] = image
    return out

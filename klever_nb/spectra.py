"""Cube-level spectral operations before the line fit: smoothing, pseudo-fibres, emission peak.

K20 §3.1: the cubes are smoothed with a 0.4″ FWHM Gaussian before the per-spaxel
fit, and the integrated spectrum of each galaxy is extracted in a 0.6″-radius
circular pseudo-fibre centred on the emission peak.

Smoothing is a NaN-aware *normalised convolution*: each output pixel is the
kernel-weighted mean of the valid input pixels around it,

    s_i = Σ_j K_ij m_j f_j / Σ_j K_ij m_j,   σ_s,i² = Σ_j (K_ij m_j)² σ_j² / (Σ_j K_ij m_j)²,

(m = 1 for valid pixels), which is exact error propagation for independent input
pixels. Smoothed pixels are correlated: the noise of a *sum* of smoothed pixels
exceeds the quadrature sum of their σ_s. For a region much larger than the
kernel and uniform noise the factor is ``1 / sqrt(Σ K²)`` (``attrs
["noise_correlation_scaling"]``, e.g. ≈ 3.0 for 0.4″ FWHM at 0.2″/pixel);
:func:`pseudo_fibre_spectrum` applies the exact factor of its own aperture.

References
----------
K20 §3.1; FACTS.md §8 (pixel scales).
"""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr
from scipy import ndimage

from klever_nb import constants
from klever_nb.errors import ConfigError, InputError
from klever_nb.lazyarray import SectionArray

FWHM_PER_SIGMA = constants.FWHM_PER_SIGMA
#: Aperture radius used when a cube has no angular pixel scale (K20 §3.1: 0.6" / 0.2").
DEFAULT_FIBRE_RADIUS_PIX = 3.0


def _pixel_scale(cube: xr.Dataset) -> float:
    scale = cube.attrs.get("pixel_scale_arcsec")
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        scale = np.nan
    if not (np.isfinite(scale) and scale > 0):
        raise InputError("cube.attrs['pixel_scale_arcsec'] is missing or not positive; "
                         "set it (arcsec per spaxel) to smooth or extract apertures in arcsec")
    return scale


def gaussian_kernel(sigma_pix: float, *, truncate: float = 4.0) -> np.ndarray:
    """Normalised 2-D Gaussian kernel (odd size, sum 1) of standard deviation ``sigma_pix``."""
    half = max(int(np.ceil(truncate * sigma_pix)), 1)
    grid = np.arange(-half, half + 1)
    g1 = np.exp(-0.5 * (grid / sigma_pix) ** 2)
    kernel = np.outer(g1, g1)
    return kernel / kernel.sum()


def _valid(cube: xr.Dataset) -> np.ndarray:
    f = cube.flux.values
    n = cube.noise.values
    return np.isfinite(f) & np.isfinite(n) & (n > 0)


def smooth_cube(cube: xr.Dataset, *, fwhm_arcsec: float = constants.SMOOTH_FWHM_ARCSEC
                ) -> xr.Dataset:
    """Gaussian spatial smoothing of flux, with the noise propagated exactly.

    Parameters
    ----------
    cube : xarray.Dataset
        ``flux``, ``noise`` on ``(wave, y, x)``; ``attrs["pixel_scale_arcsec"]``.
    fwhm_arcsec : float
        FWHM of the Gaussian kernel (K20 §3.1: 0.4″). 0 returns an unchanged copy.

    Returns
    -------
    xarray.Dataset
        Same layout. Pixels that were invalid stay NaN (no data are invented);
        ``attrs``: ``smooth_fwhm_arcsec``, ``smooth_sigma_pix``,
        ``noise_correlation_scaling`` (see the module docstring).

    References
    ----------
    K20 §3.1.

    Examples
    --------
    >>> from klever_nb.mock import demo_specs, make_mock
    >>> cube = make_mock(demo_specs()[1]).cubes["K"].to_dataset()
    >>> round(smooth_cube(cube, fwhm_arcsec=0.4).attrs["noise_correlation_scaling"], 2)
    3.01
    """
    if not (np.isfinite(fwhm_arcsec) and fwhm_arcsec >= 0):
        raise ConfigError(f"fwhm_arcsec={fwhm_arcsec!r}: must be >= 0")
    if cube.attrs.get("lazy") and fwhm_arcsec > 0 and tuple(cube.flux.dims) == ("wave", "y", "x"):
        return _smooth_lazily(cube, fwhm_arcsec)
    out = cube.copy(deep=True).transpose("wave", "y", "x", ...)
    if fwhm_arcsec == 0:
        out.attrs.update(smooth_fwhm_arcsec=0.0, smooth_sigma_pix=0.0,
                         noise_correlation_scaling=1.0)
        return out
    sigma_pix = fwhm_arcsec / FWHM_PER_SIGMA / _pixel_scale(cube)
    kernel = gaussian_kernel(sigma_pix)
    valid = _valid(out)
    mask = valid.astype(float)
    flux = np.where(valid, out.flux.values, 0.0)
    var = np.where(valid, out.noise.values, 0.0) ** 2
    k3 = kernel[None]
    den = ndimage.convolve(mask, k3, mode="constant", cval=0.0)
    num = ndimage.convolve(flux * mask, k3, mode="constant", cval=0.0)
    var_num = ndimage.convolve(var * mask, k3 ** 2, mode="constant", cval=0.0)
    ok = valid & (den > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["flux"].values = np.where(ok, num / den, np.nan)
        out["noise"].values = np.where(ok, np.sqrt(var_num) / den, np.nan)
    out.attrs.update(
        smooth_fwhm_arcsec=float(fwhm_arcsec), smooth_sigma_pix=float(sigma_pix),
        noise_correlation_scaling=float(1.0 / np.sqrt(np.sum(kernel ** 2))),
    )
    return out


def _smooth_planes(flux: np.ndarray, noise: np.ndarray, kernel: np.ndarray):
    """The smoothing of :func:`smooth_cube` on a block of planes (wave, y, x)."""
    valid = np.isfinite(flux) & np.isfinite(noise) & (noise > 0)
    mask = valid.astype(float)
    k3 = kernel[None]
    den = ndimage.convolve(mask, k3, mode="constant", cval=0.0)
    num = ndimage.convolve(np.where(valid, flux, 0.0) * mask, k3, mode="constant", cval=0.0)
    var_num = ndimage.convolve(np.where(valid, noise, 0.0) ** 2 * mask, k3 ** 2,
                               mode="constant", cval=0.0)
    ok = valid & (den > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, num / den, np.nan), np.where(ok, np.sqrt(var_num) / den, np.nan)


class _SmoothedSection:
    """Smoothed sections of a lazily read cube, computed on demand: the image rows asked
    for plus a halo of the kernel's half width (zero padding only at the image edges), so
    each plane's convolution equals the whole-plane one. Picklable."""

    def __init__(self, cube: xr.Dataset, kernel: np.ndarray):
        self.cube = cube[["flux", "noise"]]
        self.kernel = kernel
        self.half = kernel.shape[0] // 2
        self._last = None

    def read(self, key, which: str) -> np.ndarray:
        n_wave, ny, nx = (self.cube.sizes[d] for d in ("wave", "y", "x"))
        cache_key = repr(key)
        if self._last is None or self._last[0] != cache_key:
            wave_idx = np.atleast_1d(np.arange(n_wave)[key[0]])
            rows = np.atleast_1d(np.arange(ny)[key[1]])
            if rows.size == 0 or wave_idx.size == 0:
                empty = np.zeros((wave_idx.size, rows.size, nx))
                self._last = (cache_key, empty, empty)
            else:
                y0, y1 = int(rows.min()), int(rows.max()) + 1
                a, b = max(0, y0 - self.half), min(ny, y1 + self.half)
                block = self.cube.isel(wave=wave_idx, y=slice(a, b))
                flux, noise = _smooth_planes(np.asarray(block.flux.values, dtype=float),
                                             np.asarray(block.noise.values, dtype=float),
                                             self.kernel)
                self._last = (cache_key, flux[:, rows - a], noise[:, rows - a])
        out = self._last[1] if which == "flux" else self._last[2]
        out = out[:, :, key[2]]
        index = tuple(0 if np.ndim(k) == 0 and not isinstance(k, slice) else slice(None)
                      for k in key)
        return out[index]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_last"] = None
        return state


def _smooth_lazily(cube: xr.Dataset, fwhm_arcsec: float) -> xr.Dataset:
    """:func:`smooth_cube` of a lazily read cube (``open_cube(lazy=True)``): the same
    numbers, computed section by section when read, so the cube never is in memory."""
    from xarray.core import indexing

    sigma_pix = fwhm_arcsec / FWHM_PER_SIGMA / _pixel_scale(cube)
    kernel = gaussian_kernel(sigma_pix)
    source = _SmoothedSection(cube, kernel)
    shape = cube.flux.shape
    out = cube.copy(deep=False)
    for name in ("flux", "noise"):
        out[name] = xr.Variable(("wave", "y", "x"),
                                indexing.LazilyIndexedArray(SectionArray(source, name, shape)),
                                dict(cube[name].attrs))
    out.attrs.update(
        smooth_fwhm_arcsec=float(fwhm_arcsec), smooth_sigma_pix=float(sigma_pix),
        noise_correlation_scaling=float(1.0 / np.sqrt(np.sum(kernel ** 2))),
    )
    return out


def _line_channels(wave_um, redshift, names, resolving_power, half_width_kms=500.0):
    """Boolean (wave,) of channels within +-(500 km/s + 3 sigma_inst) of the lines."""
    sel = np.zeros(wave_um.size, dtype=bool)
    for name in names:
        obs = constants.LINES[name].wave_vac * (1 + redshift) / 1e4
        sig_kms = constants.C_KMS / (resolving_power * FWHM_PER_SIGMA)
        half = obs * (half_width_kms + 3 * sig_kms) / constants.C_KMS
        sel |= np.abs(wave_um - obs) <= half
    return sel


def _centroid(image: np.ndarray) -> tuple[float, float]:
    """Sub-pixel centre of the brightest blob (:func:`klever_nb.align.windowed_centroid`)."""
    from klever_nb.align import windowed_centroid

    return windowed_centroid(image)


def line_image(cube: xr.Dataset, *, redshift: float, lines=None) -> np.ndarray | None:
    """Continuum-subtracted sum of the channels at the band's lines, (y, x); None if none."""
    wave = np.asarray(cube.wave.values, dtype=float)
    names = tuple(lines) if lines is not None else tuple(constants.LINES)
    names = constants.lines_in_range(float(wave.min()), float(wave.max()), float(redshift),
                                     names)
    if not names:
        return None
    r = cube.attrs.get("resolving_power")
    r = float(r) if r is not None and np.isfinite(float(r)) else 3000.0
    on = _line_channels(wave, redshift, names, r)
    off = _line_channels(wave, redshift, names, r, half_width_kms=2500.0) & ~on
    both = np.flatnonzero(on | off)
    on_sel, off_sel = on[both], off[both]
    out = np.zeros((cube.sizes["y"], cube.sizes["x"]))
    # only the line windows are read, in blocks of image rows (lazily read cubes stay on disk)
    for ys in _row_blocks(cube, both.size):
        flux = cube.flux.transpose("wave", "y", "x").isel(wave=both, y=ys).values
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            cont = np.nanmedian(flux[off_sel], axis=0) if off_sel.any() else 0.0
            out[ys] = np.nansum(flux[on_sel] - cont, axis=0)
    return out


def _row_blocks(cube: xr.Dataset, n_channels: int, max_values: int = 2**21) -> list:
    """Slices of image rows such that ``n_channels`` x rows x nx stays below ``max_values``."""
    ny, nx = cube.sizes["y"], cube.sizes["x"]
    rows = max(1, int(max_values // max(n_channels * nx, 1)))
    return [slice(y0, min(y0 + rows, ny)) for y0 in range(0, ny, rows)]


def _white_light(cube: xr.Dataset) -> np.ndarray:
    """NaN-sum over wavelength, in blocks of image rows."""
    out = np.zeros((cube.sizes["y"], cube.sizes["x"]))
    for ys in _row_blocks(cube, cube.sizes["wave"]):
        with np.errstate(invalid="ignore"):
            out[ys] = np.nansum(cube.flux.transpose("wave", "y", "x").isel(y=ys).values, axis=0)
    return out


def emission_peak(cube: xr.Dataset, *, redshift: float, lines=None) -> tuple[float, float]:
    """Sub-pixel (y, x) of the band's emission-line peak (white light if no line in the band).

    The image is the continuum-subtracted flux summed over ±500 km/s around every
    catalogue line in the band; its centre is the Gaussian-windowed centroid
    (σ = 1.5 pixels) started at the peak (:func:`klever_nb.align.windowed_centroid`).

    References
    ----------
    K20 §3.1 (pseudo-fibres centred on the emission peak).
    """
    image = line_image(cube, redshift=redshift, lines=lines)
    if image is None or not np.any(np.nan_to_num(image) > 0):
        image = _white_light(cube)
    return _centroid(image)


def aperture_weights(shape: tuple[int, int], centre_yx, radius_pix: float) -> np.ndarray:
    """Exact pixel fractions of a circle (photutils ``CircularAperture``, method "exact")."""
    from photutils.aperture import CircularAperture

    aperture = CircularAperture((centre_yx[1], centre_yx[0]), r=radius_pix)
    return aperture.to_mask(method="exact").to_image(shape)


def pseudo_fibre_spectrum(cube: xr.Dataset, *,
                          radius_arcsec: float = constants.FIBRE_RADIUS_ARCSEC,
                          centre=None, redshift: float | None = None,
                          lines=None) -> xr.Dataset:
    """Integrated spectrum in a circular aperture (K20 §3.1 pseudo-fibre).

    Parameters
    ----------
    cube : xarray.Dataset
        ``flux``, ``noise`` on ``(wave, y, x)``, ``attrs["pixel_scale_arcsec"]``.
    radius_arcsec : float
        Aperture radius (K20: 0.6″).
    centre : (y, x), optional
        Aperture centre in pixels; default the band's emission peak
        (:func:`emission_peak`, which needs ``redshift``; without it, the white-light peak).
    redshift : float, optional
        Used only to find the emission peak.
    lines : sequence of str, optional
        Lines whose peak is used (default: every catalogue line in the band).

    Returns
    -------
    xarray.Dataset
        ``flux``, ``noise`` on ``(wave,)``: sums over the aperture with exact pixel
        fractions; channels with invalid pixels are scaled up by the aperture
        fraction they miss (NaN when more than half is missing). If the cube was
        smoothed (``attrs["smooth_sigma_pix"]``), the noise includes the exact
        correlation factor of this aperture (``attrs["noise_scaling_applied"]``).
        attrs: ``centre_yx``, ``radius`` (arcsec), ``radius_pix``, plus the cube's.

    References
    ----------
    K20 §3.1.

    Examples
    --------
    >>> from klever_nb.mock import demo_specs, make_mock
    >>> galaxy = make_mock(demo_specs()[1])
    >>> fibre = pseudo_fibre_spectrum(galaxy.cubes["K"].to_dataset(), redshift=2.2)
    >>> fibre.flux.dims, fibre.attrs["radius"]
    (('wave',), 0.6)
    """
    if not (np.isfinite(radius_arcsec) and radius_arcsec > 0):
        raise ConfigError(f"radius_arcsec={radius_arcsec!r}: must be > 0")
    cube = cube.transpose("wave", "y", "x", ...)
    note = ""
    try:
        radius_pix = radius_arcsec / _pixel_scale(cube)
    except InputError:
        radius_pix = DEFAULT_FIBRE_RADIUS_PIX
        note = (f"no pixel_scale_arcsec: aperture radius {radius_pix} pixels "
                "(K20's 0.6 arcsec at KMOS 0.2 arcsec/pixel)")
        warnings.warn(f"pseudo_fibre_spectrum: {note}", stacklevel=2)
    if centre is None:
        if redshift is not None:
            centre = emission_peak(cube, redshift=redshift, lines=lines)
        else:
            centre = _centroid(_white_light(cube))
    centre = (float(centre[0]), float(centre[1]))
    shape = (cube.sizes["y"], cube.sizes["x"])
    weights = aperture_weights(shape, centre, radius_pix)
    # only the aperture's bounding box is read (zero weight elsewhere: the same sums)
    inside_y, inside_x = np.nonzero(weights)
    if inside_y.size:
        ys = slice(int(inside_y.min()), int(inside_y.max()) + 1)
        xs = slice(int(inside_x.min()), int(inside_x.max()) + 1)
        cube, weights = cube.isel(y=ys, x=xs), weights[ys, xs]
    valid = _valid(cube)
    flux = np.where(valid, cube.flux.values, 0.0)
    var = np.where(valid, cube.noise.values, 0.0) ** 2
    w_tot = weights.sum()
    w_valid = np.einsum("wyx,yx->w", valid.astype(float), weights)
    with np.errstate(invalid="ignore", divide="ignore"):
        fill = np.where(w_valid >= 0.5 * w_tot, w_tot / w_valid, np.nan)
        total = np.einsum("wyx,yx->w", flux, weights) * fill
        noise = np.sqrt(np.einsum("wyx,yx->w", var, weights ** 2)) * fill
    scaling = 1.0
    sigma_pix = float(cube.attrs.get("smooth_sigma_pix", 0.0) or 0.0)
    if sigma_pix > 0:
        kernel = gaussian_kernel(sigma_pix)
        spread = ndimage.convolve(weights, kernel[::-1, ::-1], mode="constant")
        scaling = float(np.sqrt(np.sum(spread ** 2) / (np.sum(weights ** 2) * np.sum(kernel ** 2))))
        noise = noise * scaling
    attrs = dict(cube.attrs)
    attrs.update(centre_yx=list(centre), radius=float(radius_arcsec),
                 radius_pix=float(radius_pix), noise_scaling_applied=scaling)
    if note:
        attrs["aperture_note"] = note
    return xr.Dataset(
        {"flux": ("wave", total, dict(cube.flux.attrs)),
         "noise": ("wave", noise, dict(cube.noise.attrs))},
        coords={"wave": cube.wave.values}, attrs=attrs)

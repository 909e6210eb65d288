"""Combine per-exposure KMOS/SINFONI cubes as K20 did (§2.2): reference-star shifts, σ-clipped mean.

K20 §2.2: one IFU per KMOS detector observed a bright star; "we then exploited the
relative position of their centroids in each exposure to compute the shifts to apply to
the scientific sources that were observed on the same detector [...]. This method has
proven to provide more precise alignments than just relying only on the information
stored in the header, since it mitigates potential offsets introduced by the
differential rotation of the instrument's IFUs [...] non-tracked by the World
Coordinate System. The final cubes were then created through a (three) sigma-clipped
average", on 0.1″ × 0.1″ pixels.

Steps of :func:`combine_exposures`:

1. Read the science IFU (and the reference-star IFU) of every exposure with
   :func:`klever_nb.io.open_cube`. Exposures whose IFU is missing or empty, whose band,
   wavelength grid or flux unit differ from the first good exposure, whose science or
   star data are all NaN, or whose star cannot be fitted are reported and skipped.
2. Offsets: a 2-D Gaussian (+ constant) fitted to the wavelength-collapsed star image
   gives the star centroid and its 1σ error (covariance scaled by max(1, χ²_ν)); the
   shift of exposure *i* is ``-(centroid_i - centroid_ref)`` along the pixel axes. Without
   a reference IFU the header WCS gives the shift (with a warning) and no uncertainty.
3. Every exposure is resampled onto one output grid (the first good exposure's frame,
   grown to the union of the shifted footprints, optionally at ``pixel_scale``) by exact
   pixel-area overlap (separable; flux per spaxel conserved, or surface brightness kept
   for per-arcsec² units). Noise is propagated as σ_out² = Σ w² σ_in². An output spaxel
   is valid only when it lies wholly inside the exposure and no NaN input feeds it.
4. Per voxel, σ-clipped mean (:func:`astropy.stats.sigma_clip`) of the residuals from the
   median in units of each exposure's noise, with the clipping width
   ``max(1, mad_std)`` (so the input NOISE sets it; a few exposures cannot estimate a
   width alone). Clipping needs ≥ 3 values; 1-2 values are averaged unclipped. The noise
   of the mean is ``sqrt(Σ_kept σ_i²) / n_kept`` from the input NOISE of the kept values.

Limitations: only shifts (no rotation between exposures: an exposure whose WCS is
rotated by more than 1° relative to the reference is skipped); the star's shift is
applied unchanged to the science IFU (the paper's assumption for IFUs of one detector);
wavelength grids must agree (no spectral resampling); cosmic rays must be ≫ 3σ to be
clipped everywhere they are spread by the resampling.

References
----------
K20 §2.2; FACTS.md §8 (KMOS per-exposure layout ``IFU.<n>.DATA/NOISE``, NOISE is 1σ);
issue 19.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import astropy.units as u
import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.stats import mad_std, sigma_clip
from astropy.utils.exceptions import AstropyUserWarning
from astropy.wcs import WCS, FITSFixedWarning
from scipy.ndimage import median_filter
from scipy.optimize import curve_fit

from klever_nb.celestial import WCS_ERRORS
from klever_nb.constants import FWHM_PER_SIGMA
from klever_nb.errors import ConfigError, InputError
from klever_nb.io.mock_exposures import write_mock_exposures  # re-exported (tests, notebooks)

__all__ = [
    "RESAMPLING_TOLERANCE",
    "ROTATION_TOLERANCE_DEG",
    "combine_exposures",
    "star_centroid",
    "write_combined_cube",
    "write_mock_exposures",
]

#: Largest rotation (degrees) between an exposure's WCS and the reference one.
ROTATION_TOLERANCE_DEG = 1.0
#: Wavelength grids agree when they differ by less than this fraction of a channel.
_WAVE_TOLERANCE = 1e-3
#: Channels resampled at once (memory bound for long KMOS cubes).
_CHUNK = 256
#: Fewest values at a voxel for σ-clipping to be attempted.
_MIN_CLIP = 3
#: Fraction of the signal added in quadrature to the clipping noise: the area-overlap
#: resampling smooths each exposure differently (by up to ~10 % of a PSF-sized peak), so
#: bright voxels of well-aligned exposures differ by more than their noise.
RESAMPLING_TOLERANCE = 0.1


# ---------------------------------------------------------------------------
# Star centroid
# ---------------------------------------------------------------------------
def _gauss2d(coords, amp, x0, y0, sx, sy, bg):
    x, y = coords
    return amp * np.exp(-0.5 * (((x - x0) / sx) ** 2 + ((y - y0) / sy) ** 2)) + bg


def star_centroid(cube: xr.Dataset) -> dict:
    """Centroid (pixels) of the star in a cube: 2-D Gaussian + constant on the collapsed image.

    The image is the mean over the channels of each spaxel (NaN ignored); its noise is
    ``sqrt(Σ σ²) / n``. The fit is weighted by that noise; the 1σ errors are the
    covariance's, scaled by ``sqrt(max(1, χ²_ν))``.

    Parameters
    ----------
    cube : xarray.Dataset
        Cube Dataset with ``flux`` and ``noise`` on ``(wave, y, x)``.

    Returns
    -------
    dict
        ``x``, ``y``, ``x_err``, ``y_err`` (pixels, 0-based), ``fwhm_pix``, ``chi2_nu``.

    Raises
    ------
    InputError
        No finite spaxel, or the fit does not converge to a star inside the IFU.
    """
    flux = cube["flux"].values
    noise = cube["noise"].values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        n = np.sum(np.isfinite(flux), axis=0)
        image = np.nanmean(flux, axis=0)
        sigma = np.sqrt(np.nansum(noise**2, axis=0)) / np.maximum(n, 1)
    good = (n > 0) & np.isfinite(image) & np.isfinite(sigma) & (sigma > 0)
    if good.sum() < 7:
        raise InputError(f"{cube.attrs.get('source_file', 'cube')}: reference-star IFU has "
                         f"{int(good.sum())} valid spaxels; cannot fit a centroid")
    ny, nx = image.shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    bg0 = float(np.nanmedian(image[good]))
    peak = np.nanargmax(np.where(good, image, -np.inf))
    y0, x0 = divmod(int(peak), nx)
    amp0 = float(image[y0, x0] - bg0)
    p0 = [max(amp0, 1e-30), x0, y0, 1.2, 1.2, bg0]
    lower = [0.0, -0.5, -0.5, 0.3, 0.3, -np.inf]
    upper = [np.inf, nx - 0.5, ny - 0.5, max(nx, ny), max(nx, ny), np.inf]
    args = (np.vstack([xx[good], yy[good]]), image[good])
    try:
        popt, pcov = curve_fit(_gauss2d, *args, p0=p0, sigma=sigma[good], absolute_sigma=True,
                               bounds=(lower, upper), maxfev=5000)
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"{cube.attrs.get('source_file', 'cube')}: the 2-D Gaussian fit of "
                         f"the reference star failed ({exc})") from exc
    resid = (_gauss2d(args[0], *popt) - args[1]) / sigma[good]
    dof = max(int(good.sum()) - len(popt), 1)
    chi2_nu = float(np.sum(resid**2) / dof)
    errors = np.sqrt(np.clip(np.diag(pcov), 0, None)) * np.sqrt(max(1.0, chi2_nu))
    if not (np.all(np.isfinite(errors)) and popt[0] > 0):
        raise InputError(f"{cube.attrs.get('source_file', 'cube')}: the reference-star fit "
                         "did not find a star (non-positive amplitude or undefined errors)")
    fwhm = FWHM_PER_SIGMA * float(np.sqrt(popt[3] * popt[4]))
    return {"x": float(popt[1]), "y": float(popt[2]), "x_err": float(errors[1]),
            "y_err": float(errors[2]), "fwhm_pix": fwhm, "chi2_nu": chi2_nu}


# ---------------------------------------------------------------------------
# Reading and checking the exposures
# ---------------------------------------------------------------------------
@dataclass
class _Exposure:
    path: Path
    status: str = "used"
    reason: str = ""
    science: xr.Dataset | None = None
    star: dict | None = None
    offset_pix: tuple[float, float] = (np.nan, np.nan)  # (x, y) of the reference point
    offset_err_pix: tuple[float, float] = (np.nan, np.nan)
    n_clipped: int = 0
    n_cosmics: int = 0
    extra: dict = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.status, self.reason, self.science = "skipped", reason, None


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _celestial_wcs(cube: xr.Dataset) -> WCS | None:
    text = cube.attrs.get("wcs") or ""
    if not text:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(fits.Header.fromstring(text))
    except WCS_ERRORS:
        return None
    return wcs if wcs.naxis == 2 else None


def _angle_deg(wcs: WCS) -> float:
    """Position angle of the pixel +y axis (degrees), from the pixel-scale matrix."""
    m = wcs.pixel_scale_matrix
    return float(np.degrees(np.arctan2(m[0, 1], m[1, 1])))


def _read(exposures: list[_Exposure], ifu, reference_ifu, cosmic_sigma) -> None:
    from klever_nb.io.cubes import open_cube

    seen = set()
    for exp in exposures:
        key = exp.path.resolve()
        if key in seen:
            exp.skip("same file given twice")
            continue
        seen.add(key)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                exp.science = open_cube(exp.path, ifu=ifu)
        except InputError as err:
            exp.skip(_one_line(err))
            continue
        if not np.isfinite(exp.science["flux"].values).any():
            exp.skip(f"science IFU {ifu} holds only NaN")
            continue
        if cosmic_sigma is not None:
            exp.n_cosmics = _flag_cosmics(exp.science, cosmic_sigma)
        if reference_ifu is None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                star_cube = open_cube(exp.path, ifu=reference_ifu)
            if not np.isfinite(star_cube["flux"].values).any():
                raise InputError(f"reference IFU {reference_ifu} holds only NaN")
            exp.star = star_centroid(star_cube)
            exp.extra["star_scale"] = star_cube.attrs.get("pixel_scale_arcsec")
        except InputError as err:
            exp.skip(f"reference star: {_one_line(err)}")


def _flag_cosmics(cube: xr.Dataset, threshold: float) -> int:
    """Mask single-voxel positive spikes of one exposure in place; return how many.

    A voxel is a spike when it exceeds both the median of its 5 spectral neighbours and
    the median of its 3x3 spatial neighbours by ``threshold`` σ plus that median's
    absolute value (so that resolved lines and the PSF core, which are broad in both
    directions, are never flagged). Needed where fewer than 3 exposures overlap (no
    clipping possible) and to stop the resampling spreading spikes below the clip level.
    """
    flux, noise = cube["flux"].values, cube["noise"].values
    finite = np.isfinite(flux) & np.isfinite(noise)
    filled = np.where(finite, flux, 0.0)
    flagged = finite.copy()
    for size in ((5, 1, 1), (1, 3, 3)):
        med = median_filter(filled, size=size, mode="nearest")
        flagged &= (flux - med) > threshold * noise + np.abs(med)
    flux[flagged] = np.nan
    noise[flagged] = np.nan
    return int(flagged.sum())


def _check_consistent(exposures: list[_Exposure]) -> _Exposure:
    good = [e for e in exposures if e.status == "used"]
    if not good:
        reasons = "; ".join(f"{e.path.name}: {e.reason}" for e in exposures)
        raise InputError(_one_line(f"no usable exposure among {len(exposures)}: {reasons}"))
    ref = good[0]
    ref_cube = ref.science
    ref_wave = ref_cube["wave"].values
    step = float(np.median(np.diff(ref_wave))) if ref_wave.size > 1 else 1.0
    ref_wcs = _celestial_wcs(ref_cube)
    for exp in good[1:]:
        cube = exp.science
        if cube.attrs.get("band") != ref_cube.attrs.get("band"):
            exp.skip(f"band {cube.attrs.get('band')!r} differs from the reference exposure's "
                     f"{ref_cube.attrs.get('band')!r}")
            continue
        wave = cube["wave"].values
        if wave.shape != ref_wave.shape or np.max(np.abs(wave - ref_wave)) > _WAVE_TOLERANCE * abs(step):
            exp.skip("wavelength grid differs from the reference exposure's")
            continue
        if cube["flux"].attrs.get("units") != ref_cube["flux"].attrs.get("units"):
            exp.skip(f"flux unit {cube['flux'].attrs.get('units')!r} differs from "
                     f"{ref_cube['flux'].attrs.get('units')!r}")
            continue
        if cube.attrs.get("pixel_scale_arcsec") is None and ref_cube.attrs.get(
                "pixel_scale_arcsec") is not None:
            exp.skip("no pixel scale in the header (celestial WCS missing)")
            continue
        wcs = _celestial_wcs(cube)
        if wcs is not None and ref_wcs is not None:
            rotation = (_angle_deg(wcs) - _angle_deg(ref_wcs) + 180.0) % 360.0 - 180.0
            if abs(rotation) > ROTATION_TOLERANCE_DEG:
                exp.skip(f"WCS rotated by {rotation:.1f} deg relative to the reference "
                         "exposure (only shifts are supported)")
    return ref


def _scale(cube: xr.Dataset) -> float:
    scale = cube.attrs.get("pixel_scale_arcsec")
    return float(scale) if scale else 1.0


def _measure_offsets(exposures, ref: _Exposure, method: str) -> None:
    """Offset (pixels of the exposure) of the reference point relative to the reference exposure."""
    good = [e for e in exposures if e.status == "used"]
    if method == "reference star":
        for exp in good:
            scale_star = exp.extra.get("star_scale") or _scale(exp.science)
            star_to_sci = scale_star / _scale(exp.science)
            dx = (exp.star["x"] - ref.star["x"]) * star_to_sci
            dy = (exp.star["y"] - ref.star["y"]) * star_to_sci
            exp.offset_pix = (dx, dy)
            if exp is ref:
                exp.offset_err_pix = (0.0, 0.0)
            else:
                exp.offset_err_pix = (np.hypot(exp.star["x_err"], ref.star["x_err"]) * star_to_sci,
                                      np.hypot(exp.star["y_err"], ref.star["y_err"]) * star_to_sci)
        return
    ref_wcs = _celestial_wcs(ref.science)
    ny, nx = ref.science.sizes["y"], ref.science.sizes["x"]
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    for exp in good:
        wcs = _celestial_wcs(exp.science)
        if ref_wcs is None or wcs is None:
            if exp is ref:
                exp.offset_pix, exp.offset_err_pix = (0.0, 0.0), (0.0, 0.0)
            else:
                exp.skip("no celestial WCS in the header to align it (give --reference-ifu)")
            continue
        world = ref_wcs.pixel_to_world(cx, cy)
        px, py = wcs.world_to_pixel(world)
        exp.offset_pix = (float(px) - cx * _scale(ref.science) / _scale(exp.science),
                          float(py) - cy * _scale(ref.science) / _scale(exp.science))
        exp.offset_err_pix = (np.nan, np.nan) if exp is not ref else (0.0, 0.0)


# ---------------------------------------------------------------------------
# Resampling (exact pixel-area overlap, separable)
# ---------------------------------------------------------------------------
def _overlap_matrix(out_edges: np.ndarray, in_edges: np.ndarray) -> np.ndarray:
    """Length of overlap of each output interval (rows) with each input interval (columns)."""
    lo = np.maximum(out_edges[:-1, None], in_edges[None, :-1])
    hi = np.minimum(out_edges[1:, None], in_edges[None, 1:])
    return np.clip(hi - lo, 0.0, None)


def _surface_brightness(units: str) -> bool:
    """Whether a flux unit is per solid angle (kept by resampling) rather than per spaxel."""
    try:
        unit = u.Unit(units)
    except (ValueError, TypeError):
        return False
    decomposed = unit.decompose()
    return any(base == u.rad and power < 0
               for base, power in zip(decomposed.bases, decomposed.powers, strict=True))


@dataclass
class _Grid:
    """Output grid in reference-exposure pixel coordinates (0-based, pixel j spans j±0.5)."""

    x_edges: np.ndarray
    y_edges: np.ndarray
    factor: float  # output pixel size / reference pixel size


def _input_edges(n: int, origin: float, g: float) -> np.ndarray:
    """Edges of an exposure's pixels in reference coordinates: ref = origin + g·q."""
    return origin + g * (np.arange(n + 1) - 0.5)


def _placement(exp: _Exposure, ref: _Exposure) -> tuple[float, float, float]:
    """(origin_x, origin_y, g): reference coordinate of exposure pixel q is origin + g·q."""
    g = _scale(exp.science) / _scale(ref.science)
    ox = -g * exp.offset_pix[0]
    oy = -g * exp.offset_pix[1]
    return ox, oy, g


def _output_grid(exposures, ref, factor: float) -> _Grid:
    lo_x = lo_y = np.inf
    hi_x = hi_y = -np.inf
    for exp in exposures:
        if exp.status != "used":
            continue
        ox, oy, g = _placement(exp, ref)
        xe = _input_edges(exp.science.sizes["x"], ox, g)
        ye = _input_edges(exp.science.sizes["y"], oy, g)
        lo_x, hi_x = min(lo_x, xe[0]), max(hi_x, xe[-1])
        lo_y, hi_y = min(lo_y, ye[0]), max(hi_y, ye[-1])
    edges = []
    for lo, hi in ((lo_x, hi_x), (lo_y, hi_y)):
        n_before = int(np.ceil((-0.5 - lo) / factor - 1e-6))
        start = -0.5 - n_before * factor
        n = int(np.ceil((hi - start) / factor - 1e-6))
        edges.append(start + factor * np.arange(n + 1))
    return _Grid(edges[0], edges[1], factor)


def _weights(exp, ref, grid: _Grid, per_area: bool):
    ox, oy, g = _placement(exp, ref)
    mats = []
    for n, origin, out_edges in ((exp.science.sizes["y"], oy, grid.y_edges),
                                 (exp.science.sizes["x"], ox, grid.x_edges)):
        overlap = _overlap_matrix(out_edges, _input_edges(n, origin, g))
        complete = overlap.sum(axis=1) >= grid.factor * (1.0 - 1e-6)
        weight = overlap / (grid.factor if per_area else g)
        mats.append((weight, complete))
    return mats


def _resample(values: np.ndarray, wy: np.ndarray, wx: np.ndarray) -> np.ndarray:
    tmp = np.tensordot(values, wx, axes=([2], [1]))          # (w, ny, X)
    return np.transpose(np.tensordot(wy, tmp, axes=([1], [1])), (1, 0, 2))  # (w, Y, X)


# ---------------------------------------------------------------------------
# Combination
# ---------------------------------------------------------------------------
def _clip_std(data, axis=None):
    """Clipping width in units of the noise: the robust scatter, never below 1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.fmax(mad_std(data, axis=axis, ignore_nan=True), 1.0)


def _combine_chunk(values: np.ndarray, sigmas: np.ndarray, clip: float) -> tuple:
    """σ-clipped mean over axis 0; returns mean, noise, n_used, rejected mask."""
    finite = np.isfinite(values) & np.isfinite(sigmas) & (sigmas > 0)
    n_finite = finite.sum(axis=0)
    keep = finite.copy()
    clippable = n_finite >= _MIN_CLIP
    if clip is not None and clippable.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.simplefilter("ignore", AstropyUserWarning)
            centre = np.nanmedian(np.where(finite, values, np.nan), axis=0)
            width = np.sqrt(sigmas**2 + (RESAMPLING_TOLERANCE * centre) ** 2)
            z = np.where(finite, (values - centre) / width, np.nan)
            clipped = sigma_clip(z, sigma=clip, maxiters=5, cenfunc="median",
                                 stdfunc=_clip_std, axis=0, masked=True)
        rejected = np.ma.getmaskarray(clipped) & finite & clippable[None]
        keep &= ~rejected
    n_used = keep.sum(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.where(n_used > 0, np.sum(np.where(keep, values, 0.0), axis=0) / n_used, np.nan)
        noise = np.where(n_used > 0,
                         np.sqrt(np.sum(np.where(keep, sigmas**2, 0.0), axis=0)) / n_used, np.nan)
    return mean, noise, n_used, finite & ~keep


def _output_wcs_text(ref: _Exposure, grid: _Grid) -> str:
    wcs = _celestial_wcs(ref.science)
    if wcs is None:
        return ""
    wcs = wcs.deepcopy()
    f = grid.factor
    x0, y0 = grid.x_edges[0], grid.y_edges[0]
    crpix = np.array(wcs.wcs.crpix, dtype=np.float64) - 1.0  # 0-based reference coordinates
    wcs.wcs.crpix = [(crpix[0] - x0) / f + 0.5, (crpix[1] - y0) / f + 0.5]
    if wcs.wcs.has_cd():
        wcs.wcs.cd = wcs.wcs.cd * f
    else:
        wcs.wcs.cdelt = np.asarray(wcs.wcs.cdelt) * f
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return wcs.to_header_string()


def _validate(paths, ifu, reference_ifu, clip_sigma, pixel_scale, shifts) -> list[Path]:
    if isinstance(paths, str | Path):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ConfigError("combine_exposures: no exposure given")
    for name, value in (("ifu", ifu), ("reference_ifu", reference_ifu)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | np.integer)
                                  or value < 1):
            raise ConfigError(f"combine_exposures: {name}={value!r} is not a positive integer "
                              "IFU number")
    if reference_ifu is not None and reference_ifu == ifu:
        raise ConfigError(f"combine_exposures: reference_ifu={reference_ifu} is the science IFU; "
                          "give the IFU that observed the star")
    if reference_ifu is not None and ifu is None:
        raise ConfigError("combine_exposures: reference_ifu needs ifu= (KMOS per-exposure files)")
    if clip_sigma is not None and not (np.isfinite(clip_sigma) and clip_sigma > 0):
        raise ConfigError(f"combine_exposures: clip_sigma={clip_sigma!r} must be > 0 (or None)")
    if pixel_scale is not None and not (np.isfinite(pixel_scale) and pixel_scale > 0):
        raise ConfigError(f"combine_exposures: pixel_scale={pixel_scale!r} must be > 0 arcsec")
    if shifts is not None and len(shifts) != len(paths):
        raise ConfigError(f"combine_exposures: {len(shifts)} shifts for {len(paths)} exposures")
    return paths


def combine_exposures(paths, *, ifu: int | None, reference_ifu: int | None = None,
                      clip_sigma: float | None = 3.0, pixel_scale: float | None = None,
                      shifts=None, cosmic_sigma: float | None = 5.0) -> xr.Dataset:
    """Align per-exposure cubes on a reference star and combine them by a σ-clipped mean.

    Parameters
    ----------
    paths : sequence of str or Path
        Per-exposure files: KMOS ``IFU.<n>.DATA/NOISE`` (SCI_RECONSTRUCTED) or SINFONI
        cubes (``ifu=None``). The first usable one defines the output frame and WCS.
    ifu : int or None
        Science IFU number (KMOS); None for SINFONI/single-cube files.
    reference_ifu : int, optional
        IFU that observed the reference star on the same detector. Without it the
        header WCS gives the shifts (a warning says so).
    clip_sigma : float or None, optional
        Clipping threshold in σ (K20: 3). None averages without clipping.
    pixel_scale : float, optional
        Output pixel scale in arcsec (K20: 0.1); default the reference exposure's.
    shifts : sequence of (dx, dy) or None, optional
        Shifts in arcsec along the pixel axes (x, y) to apply to each exposure, overriding
        the measurement (e.g. known from another tool); ``None`` entries are skipped.
    cosmic_sigma : float or None, optional
        Before resampling, mask single-voxel positive spikes of each exposure above this
        many σ (plus the local median; see ``_flag_cosmics``); None disables it.

    Returns
    -------
    xarray.Dataset
        Cube Dataset (``flux``, ``noise`` 1σ on ``(wave, y, x)``, attrs as
        :func:`open_cube`, ``wcs`` of the output grid, ``pixel_scale_arcsec``) plus
        ``coverage`` (y, x): exposures feeding each spaxel (at its best channel),
        ``n_used`` (wave, y, x) after clipping, and per exposure (dim ``exposure``):
        ``file``, ``status`` (used/skipped), ``reason``, ``shift_x``/``shift_y``
        (arcsec applied along +x/+y), ``shift_x_err``/``shift_y_err`` (1σ; NaN for header
        WCS), ``n_clipped`` (voxels rejected). attrs ``alignment`` says how.

    Raises
    ------
    ConfigError
        Invalid arguments.
    InputError
        No usable exposure (the message lists why each was skipped).

    References
    ----------
    K20 §2.2; issue 19.
    """
    paths = _validate(paths, ifu, reference_ifu, clip_sigma, pixel_scale, shifts)
    exposures = [_Exposure(p) for p in paths]
    if cosmic_sigma is not None and not (np.isfinite(cosmic_sigma) and cosmic_sigma > 0):
        raise ConfigError(f"combine_exposures: cosmic_sigma={cosmic_sigma!r} must be > 0 "
                          "(or None)")
    _read(exposures, ifu, reference_ifu if shifts is None else None, cosmic_sigma)
    ref = _check_consistent(exposures)
    if shifts is not None:
        method = "given shifts"
        for exp, shift in zip(exposures, shifts, strict=True):
            if exp.status != "used":
                continue
            if shift is None:
                exp.skip("no shift given")
                continue
            scale = _scale(exp.science)
            exp.offset_pix = (-float(shift[0]) / scale, -float(shift[1]) / scale)
            exp.offset_err_pix = (0.0, 0.0)
        if ref.status != "used":
            ref = _check_consistent(exposures)
    elif reference_ifu is not None:
        method = "reference star"
        _measure_offsets(exposures, ref, method)
    else:
        method = "header WCS"
        warnings.warn("no reference-star IFU given: aligning the exposures on the header WCS, "
                      "which misses untracked IFU offsets (K20 §2.2); give reference_ifu "
                      "(--reference-ifu) when a star was observed", UserWarning, stacklevel=2)
        _measure_offsets(exposures, ref, method)
    for exp in exposures:
        if exp.status == "skipped":
            warnings.warn(f"skipping exposure {exp.path}: {exp.reason}", UserWarning,
                          stacklevel=2)
    used = [e for e in exposures if e.status == "used"]

    ref_scale = _scale(ref.science)
    out_scale = float(pixel_scale) if pixel_scale is not None else ref_scale
    if ref.science.attrs.get("pixel_scale_arcsec") is None and pixel_scale is not None:
        raise InputError(f"{ref.path}: no celestial WCS (pixel scale unknown); cannot "
                         f"resample to pixel_scale={pixel_scale}")
    grid = _output_grid(used, ref, out_scale / ref_scale)
    units = ref.science["flux"].attrs.get("units", "")
    per_area = _surface_brightness(units)
    ny, nx = grid.y_edges.size - 1, grid.x_edges.size - 1
    n_wave = ref.science.sizes["wave"]
    flux = np.full((n_wave, ny, nx), np.nan)
    noise = np.full((n_wave, ny, nx), np.nan)
    n_used = np.zeros((n_wave, ny, nx), dtype=np.int16)
    n_fed = np.zeros((n_wave, ny, nx), dtype=np.int16)
    mats = [_weights(e, ref, grid, per_area) for e in used]
    for start in range(0, n_wave, _CHUNK):
        stop = min(start + _CHUNK, n_wave)
        values = np.full((len(used), stop - start, ny, nx), np.nan)
        sigmas = np.full_like(values, np.nan)
        for k, (exp, ((wy, cy), (wx, cx))) in enumerate(zip(used, mats, strict=True)):
            f_in = exp.science["flux"].values[start:stop]
            s_in = exp.science["noise"].values[start:stop]
            bad = ~(np.isfinite(f_in) & np.isfinite(s_in))
            f_out = _resample(np.where(bad, 0.0, f_in), wy, wx)
            v_out = _resample(np.where(bad, 0.0, s_in**2), wy**2, wx**2)
            bad_out = _resample(bad.astype(np.float64), (wy > 0).astype(float),
                                (wx > 0).astype(float)) > 0
            bad_out |= ~(cy[:, None] & cx[None, :])[None]
            values[k] = np.where(bad_out, np.nan, f_out)
            sigmas[k] = np.where(bad_out, np.nan, np.sqrt(v_out))
        mean, sig, count, rejected = _combine_chunk(values, sigmas, clip_sigma)
        flux[start:stop], noise[start:stop], n_used[start:stop] = mean, sig, count
        n_fed[start:stop] = np.isfinite(values).sum(axis=0)
        for k, exp in enumerate(used):
            exp.n_clipped += int(rejected[k].sum())
    coverage = n_fed.max(axis=0).astype(np.int16)

    attrs = dict(ref.science.attrs)
    for key in ("source_hdu", "noise_hdu", "mask_hdu", "noise_estimated", "noise_method"):
        attrs.pop(key, None)
    attrs.update(
        source_file=", ".join(str(e.path) for e in used), layout="combined exposures",
        wcs=_output_wcs_text(ref, grid), alignment=method, n_exposures=len(used),
        reference_exposure=str(ref.path), clip_sigma=float(clip_sigma) if clip_sigma else 0.0,
        reference_ifu=int(reference_ifu) if reference_ifu is not None else -1,
        grid_origin_in_reference=[float(grid.x_edges[0] + 0.5 * grid.factor),
                                  float(grid.y_edges[0] + 0.5 * grid.factor)],
        resampling="exact pixel-area overlap (" + ("surface brightness kept" if per_area
                                                  else "flux per spaxel conserved") + ")")
    if ref.science.attrs.get("pixel_scale_arcsec") is not None:
        attrs["pixel_scale_arcsec"] = out_scale
    if ifu is not None:
        attrs["ifu"] = int(ifu)
    if any(e.science is not None and e.science.attrs.get("noise_estimated") for e in used):
        attrs["noise_estimated"] = True

    def per_exposure(get, fill=np.nan):
        return np.array([get(e) if e.status == "used" else fill for e in exposures],
                        dtype=np.float64)

    scale_of = [(_scale(e.science) if e.status == "used" else np.nan) for e in exposures]
    shift_x = -per_exposure(lambda e: e.offset_pix[0]) * scale_of
    shift_y = -per_exposure(lambda e: e.offset_pix[1]) * scale_of
    err_x = per_exposure(lambda e: e.offset_err_pix[0]) * scale_of
    err_y = per_exposure(lambda e: e.offset_err_pix[1]) * scale_of
    flux_attrs = dict(ref.science["flux"].attrs)
    noise_attrs = dict(ref.science["noise"].attrs)
    noise_attrs["long_name"] = "1 sigma noise of the clipped mean (input NOISE of kept values)"
    ds = xr.Dataset(
        {"flux": (("wave", "y", "x"), flux, flux_attrs),
         "noise": (("wave", "y", "x"), noise, noise_attrs),
         "n_used": (("wave", "y", "x"), n_used, {"long_name": "exposures kept after clipping"}),
         "coverage": (("y", "x"), coverage,
                      {"long_name": "exposures feeding the spaxel (best channel)"}),
         "file": ("exposure", [str(e.path) for e in exposures]),
         "status": ("exposure", [e.status for e in exposures]),
         "reason": ("exposure", [e.reason for e in exposures]),
         "shift_x": ("exposure", shift_x, {"units": "arcsec", "long_name": "shift applied "
                                           "along +x (pixel axis)"}),
         "shift_y": ("exposure", shift_y, {"units": "arcsec", "long_name": "shift applied "
                                           "along +y (pixel axis)"}),
         "shift_x_err": ("exposure", err_x, {"units": "arcsec"}),
         "shift_y_err": ("exposure", err_y, {"units": "arcsec"}),
         "n_clipped": ("exposure", np.array([e.n_clipped for e in exposures], dtype=np.int64),
                       {"long_name": "voxels rejected by the clipping"}),
         "n_cosmics": ("exposure", np.array([e.n_cosmics for e in exposures], dtype=np.int64),
                       {"long_name": "single-voxel spikes masked before resampling"})},
        coords={"wave": ref.science["wave"].copy(), "y": ("y", np.arange(ny)),
                "x": ("x", np.arange(nx)), "exposure": ("exposure", np.arange(len(exposures)))},
        attrs=attrs)
    return ds


# ---------------------------------------------------------------------------
# Writing the combined cube
# ---------------------------------------------------------------------------
def _bunit(units: str) -> str:
    try:
        return u.Unit(units).to_string("fits")
    except (ValueError, TypeError):
        return units


def write_combined_cube(ds: xr.Dataset, path) -> Path:
    """Write a :func:`combine_exposures` result as a KMOS-style combined cube, atomically.

    HDUs: empty primary (instrument, band, provenance: every input, its status, reason
    and shift), ``DATA`` and ``NOISE`` (celestial + WAVE WCS, BUNIT), ``COVERAGE`` (2-D,
    exposures per spaxel) and ``EXPOSURES`` (table of the same provenance).
    :func:`klever_nb.io.open_cube` reads it back.
    """
    from klever_nb.io.products import atomic_path

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give the output cube's file name")
    wave = ds["wave"].values
    header = fits.Header()
    if ds.attrs.get("wcs"):
        header.update(fits.Header.fromstring(ds.attrs["wcs"]))
    header["WCSAXES"] = 3
    header["CTYPE3"] = "WAVE"
    header["CUNIT3"] = "um"
    extra = []
    step = float(np.median(np.diff(wave))) if wave.size > 1 else 1e-4
    linear = wave.size < 2 or np.max(np.abs(wave - (wave[0] + step * np.arange(wave.size)))) < (
        1e-4 * abs(step))
    header["CRPIX3"] = 1.0
    header["CRVAL3"] = float(wave[0])
    header["CDELT3"] = step
    if "CD1_1" in header:
        header["CD3_3"] = step
    if not linear:
        wave_hdu = fits.ImageHDU(wave.astype(np.float64), name="WAVE")
        wave_hdu.header["CUNIT1"] = "um"
        extra.append(wave_hdu)
    units = ds["flux"].attrs.get("units", "")
    header["BUNIT"] = _bunit(units)
    primary = fits.PrimaryHDU()
    ph = primary.header
    ph["INSTRUME"] = str(ds.attrs.get("instrument", ""))
    if ds.attrs.get("band"):
        ph["HIERARCH ESO INS GRAT1 ID"] = str(ds.attrs["band"])
    ph["ORIGIN"] = "klever_nb.io.combine"
    ph["HIERARCH KLEVER COMBINE ALIGN"] = str(ds.attrs.get("alignment", ""))
    ph["HIERARCH KLEVER COMBINE CLIPSIG"] = float(ds.attrs.get("clip_sigma", 0.0))
    ph["HIERARCH KLEVER COMBINE IFU"] = int(ds.attrs.get("ifu", -1))
    ph["HIERARCH KLEVER COMBINE REFIFU"] = int(ds.attrs.get("reference_ifu", -1))
    ph["HIERARCH KLEVER COMBINE NUSED"] = int(ds.attrs.get("n_exposures", 0))
    ph["HIERARCH KLEVER COMBINE NINPUT"] = int(ds.sizes["exposure"])
    ph["HIERARCH KLEVER COMBINE REFEXP"] = str(ds.attrs.get("reference_exposure", ""))
    for i in range(ds.sizes["exposure"]):
        key = f"HIERARCH KLEVER IN{i + 1}"
        ph[f"{key} FILE"] = str(ds["file"].values[i])
        ph[f"{key} STATUS"] = str(ds["status"].values[i])
        if ds["reason"].values[i]:
            ph[f"{key} REASON"] = str(ds["reason"].values[i])
        for var, name in (("shift_x", "DX"), ("shift_y", "DY"), ("shift_x_err", "DXERR"),
                          ("shift_y_err", "DYERR")):
            value = float(ds[var].values[i])
            ph[f"{key} {name}"] = (round(value, 5) if np.isfinite(value) else "NaN",
                                   "arcsec" if np.isfinite(value) else "not measured")
        ph[f"{key} NCLIP"] = int(ds["n_clipped"].values[i])
        ph[f"{key} NCOSMIC"] = int(ds["n_cosmics"].values[i])
    hdus = [primary]
    for extname, var in (("DATA", "flux"), ("NOISE", "noise")):
        ext = header.copy()
        ext.insert(0, ("EXTNAME", extname))
        if ds.attrs.get("band"):
            ext["HIERARCH ESO INS GRAT1 ID"] = str(ds.attrs["band"])
        hdus.append(fits.ImageHDU(ds[var].values.astype(np.float32), header=ext))
    cov_header = fits.Header.fromstring(ds.attrs["wcs"]) if ds.attrs.get("wcs") else fits.Header()
    hdus.append(fits.ImageHDU(ds["coverage"].values.astype(np.int16), header=cov_header,
                              name="COVERAGE"))
    columns = [
        fits.Column("FILE", "A400", array=[str(f)[:400] for f in ds["file"].values]),
        fits.Column("STATUS", "A8", array=ds["status"].values.astype(str)),
        fits.Column("REASON", "A300", array=[str(r)[:300] for r in ds["reason"].values]),
    ] + [fits.Column(var.upper(), "D", unit="arcsec", array=ds[var].values)
         for var in ("shift_x", "shift_y", "shift_x_err", "shift_y_err")] + [
        fits.Column("N_CLIPPED", "K", array=ds["n_clipped"].values),
        fits.Column("N_COSMICS", "K", array=ds["n_cosmics"].values)]
    hdus.append(fits.BinTableHDU.from_columns(columns, name="EXPOSURES"))
    hdus.extend(extra)
    with atomic_path(path) as tmp:
        fits.HDUList(hdus).writeto(tmp, overwrite=True)
    return path

"""Radial metallicity gradients and 2-D maps the paper's way (K20 §4.2, §4.5, App. A).

The source-plane metallicity map (``oh``, ``oh_lo``, ``oh_hi`` on ``(ys, xs)`` in kpc from
the galaxy centre) is binned in elliptical annuli shaped like the source-plane PSF, the
pixel-fraction-weighted mean metallicity of each annulus is fitted with a straight line
(emcee posterior median, closed-form weighted least squares beside it), and the gradient
is classified as resolved / marginal / unresolved from the radius it reaches in units of the
PSF half width. App. A's systematics repeat the measurement with circular annuli and other
steps. §4.5's 2-D analysis gives residual maps, a planar fit and a non-axisymmetry test.

Decisions where the paper is silent (each one is documented where it is made):

* Annulus size: the *geometric-mean* radius sqrt(a b) of the k-th ellipse is
  k x step, step = ``step_fraction`` x sqrt(FWHM_maj FWHM_min), with the PSF's axis ratio
  and PA (``size="geometric"``; with ``step_fraction=0.5`` the first aperture is the PSF
  half-maximum ellipse). ``size="semi_major"`` makes the semi-major axis k x step instead.
* Radius of a profile point: the weight-averaged circular distance of its pixels from the
  centre, so that an exactly linear map oh = a + b r gives back b whatever the annulus shape.
* Radius reached (for the classification): the outer geometric-mean radius of the outermost
  annulus kept.
* Error of an annulus: sqrt(dispersion^2 + mean individual variance), see :func:`radial_profile`.

References
----------
K20 §4.2 (annuli, errors, MCMC fit, resolution criteria), §4.5 (non-axisymmetric maps),
Appendix A (binning systematics; the appendix is supplementary material, not in the seed text).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr
from photutils.aperture import EllipticalAnnulus, EllipticalAperture
from scipy import stats
from threadpoolctl import threadpool_limits

from klever_nb.errors import ConfigError, InputError

#: Line ratios that are a ratio of sums of lines (numerator, denominator), FACTS.md §1.2.
DIAGNOSTIC_LINES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "N2": (("NII_6584",), ("Halpha",)),
    "R3": (("OIII_5007",), ("Hbeta",)),
    "S2": (("SII_6717", "SII_6731"), ("Halpha",)),
    "R2": (("OII_3727", "OII_3729"), ("Hbeta",)),
    "O3O2": (("OIII_5007",), ("OII_3727", "OII_3729")),
}

_FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


# ---------------------------------------------------------------------------
# PSF and grid geometry
# ---------------------------------------------------------------------------
def psf_axes(psf: Mapping[str, float]) -> tuple[float, float, float]:
    """(FWHM major, FWHM minor, PA in degrees) of a source-PSF dict, validated.

    Raises
    ------
    ConfigError
        If a key is missing or a FWHM is not positive.
    """
    try:
        fwhm_a = float(psf["fwhm_major_kpc"])
        fwhm_b = float(psf["fwhm_minor_kpc"])
        pa = float(psf.get("pa_deg", 0.0))
    except (KeyError, TypeError, ValueError):
        raise ConfigError("psf: needs keys 'fwhm_major_kpc', 'fwhm_minor_kpc' (kpc, > 0) and "
                          f"'pa_deg'; got {dict(psf)!r}") from None
    if not (np.isfinite(fwhm_a) and np.isfinite(fwhm_b) and fwhm_a > 0 and fwhm_b > 0):
        raise ConfigError(f"psf: FWHMs must be finite and positive, got {fwhm_a}, {fwhm_b}")
    if fwhm_b > fwhm_a:
        fwhm_a, fwhm_b, pa = fwhm_b, fwhm_a, pa + 90.0
    return fwhm_a, fwhm_b, pa % 180.0


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
        Source PSF ``{"fwhm_major_kpc", "fwhm_minor_kpc", "pa_deg"}`` (PA from +xs to +ys).
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


# ---------------------------------------------------------------------------
# Radial profile
# ---------------------------------------------------------------------------
def _valid_pixels(metallicity: xr.Dataset, exclude_flags: Sequence[str] | None) -> np.ndarray:
    for name in ("oh", "oh_lo", "oh_hi"):
        if name not in metallicity:
            raise InputError(f"metallicity map: variable {name!r} missing (found "
                             f"{list(metallicity.data_vars)})")
    oh = metallicity["oh"].transpose("ys", "xs").values
    lo = metallicity["oh_lo"].transpose("ys", "xs").values
    hi = metallicity["oh_hi"].transpose("ys", "xs").values
    valid = np.isfinite(oh) & np.isfinite(lo) & np.isfinite(hi)
    for flag in exclude_flags or ():
        if flag not in metallicity:
            raise ConfigError(f"exclude_flags: no variable {flag!r} in the metallicity map")
        valid &= ~metallicity[flag].transpose("ys", "xs").values.astype(bool)
    return valid


def pixel_errors(metallicity: xr.Dataset) -> np.ndarray:
    """Per-pixel 1 sigma of 12+log(O/H): (oh_hi - oh_lo) / 2 (16th/84th percentiles)."""
    return 0.5 * (metallicity["oh_hi"] - metallicity["oh_lo"]).transpose("ys", "xs").values


def _weighted_mean_and_error(values: np.ndarray, errors: np.ndarray,
                             weights: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-annulus weighted mean, dispersion, mean individual error, combined error.

    ``values``/``errors`` are (ny, nx) with NaN outside valid pixels; ``weights`` (n, ny, nx)
    already zero there.
    """
    v = np.nan_to_num(values)[None]
    e = np.nan_to_num(errors)[None]
    wsum = weights.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (weights * v).sum(axis=(1, 2)) / wsum
        disp = np.sqrt((weights * (v - mean[:, None, None]) ** 2).sum(axis=(1, 2)) / wsum)
        meas = np.sqrt((weights * e**2).sum(axis=(1, 2)) / wsum)
    return mean, disp, meas, np.hypot(disp, meas), wsum


def radial_profile(metallicity: xr.Dataset, *, psf: Mapping[str, float],
                   centre_kpc: Sequence[float] = (0.0, 0.0), step_fraction: float = 0.5,
                   shape: str = "psf", size: str = "geometric", min_pixels: float = 3.0,
                   line_maps: xr.Dataset | None = None, method: str = "mean_oh",
                   r_max: float | None = None, exclude_flags: Sequence[str] | None = None,
                   diagnostics: Sequence[str] | None = None,
                   calibration_set: str = "C20") -> xr.Dataset:
    """Metallicity in elliptical annuli: the paper's radial profile.

    Parameters
    ----------
    metallicity : Dataset
        ``oh``, ``oh_lo``, ``oh_hi`` on ``(ys, xs)`` (kpc from the galaxy centre).
    psf, centre_kpc, step_fraction, shape, size
        See :func:`elliptical_annuli`.
    min_pixels : float
        Annuli whose valid pixels add up to fewer pixels (exact fractions) are dropped.
    line_maps : Dataset, optional
        Source-plane line maps on ``(line, ys, xs)`` (``flux``, ``flux_err``), needed by
        ``method="mean_ratio"``.
    method : {"mean_oh", "mean_ratio"}
        Average the pixel metallicities (paper) or average the line ratios in each annulus
        first and convert them to a metallicity (K20 §4.2 says both agree).
    r_max : float, optional
        Outer radius; default the radius of the farthest valid pixel centre.
    exclude_flags : list of str, optional
        Boolean variables of ``metallicity`` marking pixels to leave out.
    diagnostics : list of str, optional
        For ``"mean_ratio"``: ratios to use (default ``metallicity.attrs["diagnostics_used"]``).
    calibration_set : str
        For ``"mean_ratio"``.

    Returns
    -------
    Dataset on ``(annulus,)`` with ``radius_kpc`` (weighted mean circular distance of the
    pixels from the centre), ``r_in_kpc``/``r_out_kpc`` (annulus edges), ``oh``, ``oh_err``,
    ``oh_dispersion``, ``oh_pixel_err``, ``n_pixels`` (sum of the pixel fractions of valid
    pixels) and ``area_pixels`` (aperture area).

    Notes
    -----
    With w_i the fraction of valid pixel i inside the annulus, x_i its 12+log(O/H) and
    s_i = (oh_hi - oh_lo)/2 its error:
    mean = sum w x / sum w, dispersion D^2 = sum w (x - mean)^2 / sum w,
    individual term E^2 = sum w s^2 / sum w, and ``oh_err`` = sqrt(D^2 + E^2). This is the
    uncertainty of a *pixel value* in the annulus, not of the mean: source-plane pixels are
    strongly correlated (many per PSF) so a 1/sqrt(N) would be far too optimistic; K20 §4.2
    combines "the 1 sigma dispersion of values of individual pixels inside the aperture and
    the error on each individual metallicity measurement".

    References
    ----------
    K20 §4.2.
    """
    ys, xs = _coords(metallicity)
    valid = _valid_pixels(metallicity, exclude_flags)
    q, pa = _ellipse_shape(psf, shape)
    rell = elliptical_radius_kpc(ys, xs, centre_kpc=centre_kpc, q=q, pa_deg=pa, size=size)
    if r_max is None:
        r_max = float(rell[valid].max()) if valid.any() else psf_linear_size_kpc(psf)
    apertures, _, edges = elliptical_annuli((ys, xs), centre_kpc=centre_kpc, psf=psf,
                                            step_fraction=step_fraction, shape=shape,
                                            r_max=r_max, size=size)
    weights = annulus_weights(apertures, valid.shape)
    area = weights.sum(axis=(1, 2))
    area_exact = np.array([a.area for a in apertures])
    weights = weights * valid[None]
    yy, xx = np.meshgrid(ys - centre_kpc[1], xs - centre_kpc[0], indexing="ij")
    dist = np.hypot(xx, yy)
    oh = np.where(valid, metallicity["oh"].transpose("ys", "xs").values, np.nan)
    err = np.where(valid, pixel_errors(metallicity), np.nan)
    mean, disp, meas, total, wsum = _weighted_mean_and_error(oh, err, weights)
    with np.errstate(invalid="ignore", divide="ignore"):
        radius = (weights * dist[None]).sum(axis=(1, 2)) / wsum
    if method == "mean_ratio":
        mean, total = _profile_from_mean_ratios(
            metallicity, line_maps, weights, diagnostics=diagnostics,
            calibration_set=calibration_set)
        disp = meas = np.full_like(mean, np.nan)
    elif method != "mean_oh":
        raise ConfigError(f"method: must be 'mean_oh' or 'mean_ratio', got {method!r}")
    keep = (wsum >= min_pixels) & np.isfinite(mean) & np.isfinite(total)
    index = np.flatnonzero(keep)
    profile = xr.Dataset(
        {
            "radius_kpc": ("annulus", radius[keep], {"units": "kpc",
                           "long_name": "weighted mean distance of the annulus pixels"}),
            "r_in_kpc": ("annulus", edges[:-1][keep], {"units": "kpc"}),
            "r_out_kpc": ("annulus", edges[1:][keep], {"units": "kpc"}),
            "oh": ("annulus", mean[keep], {"units": "dex", "long_name": "12+log(O/H)"}),
            "oh_err": ("annulus", total[keep], {"units": "dex"}),
            "oh_dispersion": ("annulus", disp[keep], {"units": "dex"}),
            "oh_pixel_err": ("annulus", meas[keep], {"units": "dex"}),
            "n_pixels": ("annulus", wsum[keep], {"units": "pixel"}),
            "area_pixels": ("annulus", area_exact[keep], {"units": "pixel"}),
            "area_on_grid_pixels": ("annulus", area[keep], {"units": "pixel"}),
        },
        coords={"annulus": index},
        attrs={
            "centre_x_kpc": float(centre_kpc[0]), "centre_y_kpc": float(centre_kpc[1]),
            "step_fraction": float(step_fraction),
            "step_kpc": float(step_fraction * psf_linear_size_kpc(psf)),
            "shape": shape, "size": size, "method": method,
            "axis_ratio": float(q), "pa_deg": float(pa),
            "psf_fwhm_major_kpc": psf_axes(psf)[0], "psf_fwhm_minor_kpc": psf_axes(psf)[1],
            "psf_pa_deg": psf_axes(psf)[2],
            "n_annuli_total": len(apertures),
            "oh_err_formula": "sqrt(weighted dispersion^2 + weighted mean of pixel variances)",
            "references": "K20 §4.2",
        },
    )
    return profile


# ---------------------------------------------------------------------------
# "mean_ratio": average the line ratios, then convert (K20 §4.2)
# ---------------------------------------------------------------------------
def _diagnostics_of(metallicity: xr.Dataset, diagnostics: Sequence[str] | None,
                    line_maps: xr.Dataset) -> list[str]:
    if diagnostics is None:
        used = metallicity.attrs.get("diagnostics_used")
        if isinstance(used, str):
            diagnostics = [d.strip() for d in used.replace(";", ",").split(",") if d.strip()]
        elif used is not None:
            diagnostics = [str(d) for d in np.atleast_1d(used)]
    lines = set(np.asarray(line_maps["line"]).astype(str))
    if diagnostics is None:
        diagnostics = [d for d, (num, den) in DIAGNOSTIC_LINES.items()
                       if set(num) | set(den) <= lines]
    for d in diagnostics:
        if d not in DIAGNOSTIC_LINES:
            raise ConfigError(f"diagnostics: {d!r} is not a simple ratio of lines; known "
                              f"{sorted(DIAGNOSTIC_LINES)}")
        missing = (set(DIAGNOSTIC_LINES[d][0]) | set(DIAGNOSTIC_LINES[d][1])) - lines
        if missing:
            raise InputError(f"line maps: diagnostic {d} needs lines {sorted(missing)}")
    if not diagnostics:
        raise InputError("line maps: no metallicity diagnostic can be formed from lines "
                         f"{sorted(lines)}")
    return list(diagnostics)


def log_ratio_maps(line_maps: xr.Dataset, diagnostics: Sequence[str]) -> dict[str, tuple]:
    """log10 of each diagnostic ratio and its 1 sigma (first-order propagation) per pixel."""
    flux, ferr = line_maps["flux"], line_maps["flux_err"]
    out = {}
    for d in diagnostics:
        num, den = DIAGNOSTIC_LINES[d]
        f_num = sum(flux.sel(line=n) for n in num)
        f_den = sum(flux.sel(line=n) for n in den)
        v_num = sum(ferr.sel(line=n) ** 2 for n in num)
        v_den = sum(ferr.sel(line=n) ** 2 for n in den)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.log10(f_num / f_den)
            err = np.sqrt(v_num / f_num**2 + v_den / f_den**2) / np.log(10.0)
        out[d] = (np.asarray(ratio), np.asarray(err))
    return out


def oh_from_log_ratios(log_ratios: Mapping[str, tuple[np.ndarray, np.ndarray]], *,
                       calibration_set: str = "C20", grid: np.ndarray | None = None,
                       engine: str = "auto") -> tuple[np.ndarray, ...]:
    """12+log(O/H) posterior median, 16th and 84th percentiles from log ratios (K20 eq. 1).

    chi^2(x) = sum_i (log R_i - log R_cal,i(x))^2 / (sigma_obs,i^2 + sigma_cal,i^2), flat prior
    on the calibrations' validity range, evaluated exactly on a grid for all pixels at once
    (FACTS.md §12). ``engine="auto"`` uses :func:`klever_nb.metallicity.grid_summary` when
    that module is importable, else the local implementation below (``"local"``), which is
    kept as its slow twin; used by ``method="mean_ratio"`` and by the benchmarks.
    """
    from klever_nb.calibrations import get_calibration

    if engine not in ("auto", "local", "metallicity"):
        raise ConfigError(f"engine: must be 'auto', 'local' or 'metallicity', got {engine!r}")
    if engine != "local":
        try:
            from klever_nb.metallicity import grid_summary, make_grid
        except ImportError:
            if engine == "metallicity":
                raise
        else:
            diags = list(log_ratios)
            obs = np.stack([np.asarray(log_ratios[d][0], float) for d in diags], axis=-1)
            err = np.stack([np.asarray(log_ratios[d][1], float) for d in diags], axis=-1)
            grid = make_grid(diags, calibration_set=calibration_set) if grid is None else grid
            out = grid_summary(obs, err, diags, calibration_set=calibration_set, grid=grid,
                               n_threads=1)
            return out["oh"], out["oh_lo"], out["oh_hi"]
    cals = {d: get_calibration(d, calibration_set) for d in log_ratios}
    if grid is None:
        lo = max(c.oh_min for c in cals.values())
        hi = min(c.oh_max for c in cals.values())
        grid = np.linspace(lo, hi, 1301)
    models = {d: cals[d].log_ratio(grid) for d in cals}
    shape = np.shape(next(iter(log_ratios.values()))[0])
    flat = {d: (np.ravel(np.asarray(v, float)), np.ravel(np.asarray(e, float)))
            for d, (v, e) in log_ratios.items()}
    n = int(np.prod(shape))
    out = np.full((3, n), np.nan)
    chunk = max(1, 2_000_000 // grid.size)
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        chi2 = np.zeros((sl.stop - sl.start, grid.size))
        any_valid = np.zeros(sl.stop - sl.start, bool)
        for d, (value, err) in flat.items():
            v, e = value[sl], err[sl]
            ok = np.isfinite(v) & np.isfinite(e)
            any_valid |= ok
            var = np.where(ok, e**2 + cals[d].sigma ** 2, 1.0)
            chi2 += np.where(ok[:, None], (np.nan_to_num(v)[:, None] - models[d]) ** 2
                             / var[:, None], 0.0)
        post = np.exp(-0.5 * (chi2 - chi2.min(axis=1, keepdims=True)))
        cdf = np.cumsum(post, axis=1)
        cdf /= cdf[:, -1:]
        for k, p in enumerate((0.5, 0.16, 0.84)):
            idx = np.clip(np.argmax(cdf >= p, axis=1), 1, grid.size - 1)
            rows = np.arange(idx.size)
            c0, c1 = cdf[rows, idx - 1], cdf[rows, idx]
            frac = np.clip((p - c0) / np.where(c1 > c0, c1 - c0, 1.0), 0.0, 1.0)
            value = grid[idx - 1] + frac * (grid[idx] - grid[idx - 1])
            out[k, sl] = np.where(any_valid, value, np.nan)
    return tuple(o.reshape(shape) for o in out)


def _profile_from_mean_ratios(metallicity, line_maps, weights, *, diagnostics,
                              calibration_set):
    if line_maps is None:
        raise ConfigError("method='mean_ratio' needs line_maps (source-plane line maps)")
    ys, xs = _coords(line_maps)
    if ys.size != metallicity.sizes["ys"] or xs.size != metallicity.sizes["xs"]:
        raise InputError("line maps and metallicity map must share the (ys, xs) grid")
    line_maps = line_maps.transpose("line", "ys", "xs")
    diags = _diagnostics_of(metallicity, diagnostics, line_maps)
    ratios = log_ratio_maps(line_maps, diags)
    means = {}
    for d, (value, err) in ratios.items():
        ok = np.isfinite(value) & np.isfinite(err)
        w = weights * ok[None]
        m, _, _, total, _ = _weighted_mean_and_error(np.where(ok, value, np.nan),
                                                     np.where(ok, err, np.nan), w)
        means[d] = (m, total)
    med, lo, hi = oh_from_log_ratios(means, calibration_set=calibration_set)
    return med, 0.5 * (hi - lo)


# ---------------------------------------------------------------------------
# Linear fit of the profile
# ---------------------------------------------------------------------------
def _wls_line(x: np.ndarray, y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form weighted least squares of y = a + b x: (params, covariance)."""
    w = 1.0 / np.maximum(s, 1e-6) ** 2
    design = np.stack([np.ones_like(x), x], axis=1)
    normal = design.T @ (design * w[:, None])
    cov = np.linalg.inv(normal)
    return cov @ (design.T @ (w * y)), cov


def _nan_fit(message: str, n: int, method: str) -> dict:
    return {"central_oh": np.nan, "central_oh_err": np.nan, "gradient_dex_per_kpc": np.nan,
            "gradient_err": np.nan, "central_oh_wls": np.nan, "central_oh_wls_err": np.nan,
            "gradient_wls": np.nan, "gradient_wls_err": np.nan, "method": method,
            "converged": False, "n_points": n, "chi2": np.nan, "ndof": max(n - 2, 0),
            "message": message}


def fit_gradient(profile: xr.Dataset, *, method: str = "emcee", seed: int = 0,
                 nwalkers: int = 16, nsteps: int = 2000, burn: int = 500) -> dict:
    """Straight-line fit 12+log(O/H) = central + gradient x r to a radial profile.

    Parameters
    ----------
    profile : Dataset
        From :func:`radial_profile` (``radius_kpc``, ``oh``, ``oh_err``).
    method : {"emcee", "wls"}
        Posterior median and 1 sigma (half the 16-84 range) from emcee with flat priors
        (central in [5, 11], gradient in [-5, 5] dex/kpc), as in K20 §4.2; or the
        closed-form weighted least squares. The WLS numbers are always returned too
        (``*_wls`` keys).
    seed, nwalkers, nsteps, burn
        emcee settings (``burn`` steps are discarded).

    Returns
    -------
    dict with ``central_oh``, ``central_oh_err``, ``gradient_dex_per_kpc``, ``gradient_err``,
    the WLS equivalents, ``converged`` (emcee: chain longer than 50 autocorrelation times
    and acceptance 0.15-0.85; WLS: True), ``chi2``, ``ndof``, ``n_points``, ``message`` and the
    profile's ``centre_kpc``. Fewer than two points give NaN and a message, never an error.

    References
    ----------
    K20 §4.2.
    """
    if method not in ("emcee", "wls"):
        raise ConfigError(f"method: must be 'emcee' or 'wls', got {method!r}")
    if method == "emcee" and (nwalkers < 4 or nsteps < 10):
        raise ConfigError(f"nwalkers={nwalkers}, nsteps={nsteps}: emcee needs nwalkers >= 4 "
                          "(twice the 2 parameters) and nsteps >= 10")
    x = np.asarray(profile["radius_kpc"], float)
    y = np.asarray(profile["oh"], float)
    s = np.asarray(profile["oh_err"], float)
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(s)
    x, y, s = x[ok], y[ok], s[ok]
    centre = (profile.attrs.get("centre_x_kpc", 0.0), profile.attrs.get("centre_y_kpc", 0.0))
    if x.size < 2 or np.ptp(x) <= 0:
        out = _nan_fit(f"only {x.size} annulus/annuli with metallicities: no gradient",
                       x.size, method)
        out["centre_kpc"] = centre
        return out
    params, cov = _wls_line(x, y, s)
    s_floor = np.maximum(s, 1e-6)
    chi2 = float(np.sum(((y - params[0] - params[1] * x) / s_floor) ** 2))
    out = {"central_oh_wls": float(params[0]), "central_oh_wls_err": float(np.sqrt(cov[0, 0])),
           "gradient_wls": float(params[1]), "gradient_wls_err": float(np.sqrt(cov[1, 1])),
           "method": method, "n_points": int(x.size), "chi2": chi2, "ndof": int(x.size - 2),
           "centre_kpc": centre, "message": ""}
    if method == "wls":
        out.update(central_oh=out["central_oh_wls"], central_oh_err=out["central_oh_wls_err"],
                   gradient_dex_per_kpc=out["gradient_wls"], gradient_err=out["gradient_wls_err"],
                   converged=True)
        return out
    samples, converged = _emcee_line(x, y, s_floor, params, cov, seed=seed, nwalkers=nwalkers,
                                     nsteps=nsteps, burn=burn)
    p16, p50, p84 = np.percentile(samples, [16, 50, 84], axis=0)
    out.update(central_oh=float(p50[0]), central_oh_err=float(0.5 * (p84[0] - p16[0])),
               gradient_dex_per_kpc=float(p50[1]), gradient_err=float(0.5 * (p84[1] - p16[1])),
               converged=converged)
    if not converged:
        out["message"] = "emcee chain shorter than 50 autocorrelation times"
    return out


def _emcee_line(x, y, s, params, cov, *, seed, nwalkers, nsteps, burn):
    import emcee

    def log_prob(theta: np.ndarray) -> np.ndarray:
        theta = np.atleast_2d(theta)
        a, b = theta[:, :1], theta[:, 1:2]
        lp = -0.5 * np.sum(((y[None] - a - b * x[None]) / s[None]) ** 2, axis=1)
        inside = (np.abs(theta[:, 0] - 8.0) < 3.0) & (np.abs(theta[:, 1]) < 5.0)
        return np.where(inside, lp, -np.inf)

    rng = np.random.default_rng(seed)
    start = rng.multivariate_normal(params, cov, size=nwalkers)
    sampler = emcee.EnsembleSampler(nwalkers, 2, log_prob, vectorize=True)
    sampler.random_state = np.random.RandomState(seed).get_state()
    sampler.run_mcmc(start, nsteps, progress=False)
    tau = sampler.get_autocorr_time(tol=0, quiet=True)
    acceptance = float(np.mean(sampler.acceptance_fraction))
    converged = bool(np.all(np.isfinite(tau)) and nsteps > 50 * np.max(tau)
                     and 0.15 < acceptance < 0.85)
    return sampler.get_chain(discard=min(burn, nsteps // 2), flat=True), converged


def resolution_class(r_max_kpc: float, psf: Mapping[str, float]) -> str:
    """"resolved" if r_max >= 2 sqrt(HWHM_maj HWHM_min), "marginal" if 1-2 x, else "unresolved".

    The boundaries belong to the better class (exactly 2 x is resolved, exactly 1 x marginal),
    with a relative tolerance of 1e-9 for rounding.

    References
    ----------
    K20 §4.2 and Table 4.
    """
    if r_max_kpc is None or not np.isfinite(r_max_kpc):
        return "unresolved"
    ratio = float(r_max_kpc) / psf_hwhm_size_kpc(psf)
    if ratio >= 2.0 * (1 - 1e-9):
        return "resolved"
    if ratio >= 1.0 * (1 - 1e-9):
        return "marginal"
    return "unresolved"


# ---------------------------------------------------------------------------
# Appendix A systematics and the top-level measurement
# ---------------------------------------------------------------------------
def gradient_systematics(metallicity: xr.Dataset, *, psf: Mapping[str, float],
                         step_fractions: Sequence[float] = (0.33, 0.5, 0.75, 1.0),
                         shapes: Sequence[str] = ("psf", "circular"),
                         centre_kpc: Sequence[float] = (0.0, 0.0), method: str = "wls",
                         size: str = "geometric", min_pixels: float = 3.0,
                         exclude_flags: Sequence[str] | None = None, seed: int = 0) -> dict:
    """Spread of the gradient over binning choices, used as a systematic error (App. A).

    Returns
    -------
    dict with ``table`` (one row per (shape, step_fraction): gradient, error, n_annuli),
    ``gradient_sys_err`` (standard deviation, ddof=1, of the finite gradients; NaN when fewer
    than two), ``gradient_min``/``gradient_max`` and ``central_oh_sys_err``.

    References
    ----------
    K20 §4.2 and Appendix A (circular vs PSF-shaped annuli, step choices).
    """
    rows = []
    for shape in shapes:
        for step in step_fractions:
            prof = radial_profile(metallicity, psf=psf, centre_kpc=centre_kpc,
                                  step_fraction=step, shape=shape, size=size,
                                  min_pixels=min_pixels, exclude_flags=exclude_flags)
            fit = fit_gradient(prof, method=method, seed=seed)
            rows.append({"shape": shape, "step_fraction": float(step),
                         "gradient_dex_per_kpc": fit["gradient_dex_per_kpc"],
                         "gradient_err": fit["gradient_err"], "central_oh": fit["central_oh"],
                         "n_annuli": int(prof.sizes["annulus"])})
    grads = np.array([r["gradient_dex_per_kpc"] for r in rows], float)
    cents = np.array([r["central_oh"] for r in rows], float)
    finite = np.isfinite(grads)
    spread = float(np.std(grads[finite], ddof=1)) if finite.sum() >= 2 else np.nan
    cspread = float(np.std(cents[finite], ddof=1)) if finite.sum() >= 2 else np.nan
    return {"table": rows, "gradient_sys_err": spread, "central_oh_sys_err": cspread,
            "gradient_min": float(np.min(grads[finite])) if finite.any() else np.nan,
            "gradient_max": float(np.max(grads[finite])) if finite.any() else np.nan}


def measure_gradient(metallicity: xr.Dataset, *, psf: Mapping[str, float],
                     centre_kpc: Sequence[float] | None = None, step_fraction: float = 0.5,
                     shape: str = "psf", size: str = "geometric", min_pixels: float = 3.0,
                     line_maps: xr.Dataset | None = None, method: str = "mean_oh",
                     fit_method: str = "emcee", systematics: bool = True,
                     exclude_flags: Sequence[str] | None = None,
                     seed: int = 0) -> tuple[xr.Dataset, dict]:
    """The paper's gradient of one galaxy: profile, fit, resolution class, systematics.

    Parameters
    ----------
    metallicity : Dataset
        Source-plane metallicity map (``oh``, ``oh_lo``, ``oh_hi`` on ``(ys, xs)`` in kpc).
    psf : dict
        Source PSF ``{"fwhm_major_kpc", "fwhm_minor_kpc", "pa_deg"}``.
    centre_kpc : (x, y), optional
        Default: the coordinate origin, which the lensing stage puts on the galaxy centre
        (continuum or Halpha peak, K20 §4.2; see :func:`peak_centre_kpc`).
    step_fraction, shape, size, min_pixels, line_maps, method, exclude_flags
        See :func:`radial_profile`.
    fit_method : {"emcee", "wls"}
    systematics : bool
        Also run :func:`gradient_systematics` (WLS, fast) for ``gradient_sys_err``.

    Returns
    -------
    profile : Dataset
    summary : dict
        ``gradient_dex_per_kpc``, ``gradient_err``, ``central_oh``, ``central_oh_err``,
        ``resolved`` ("resolved" | "marginal" | "unresolved"), ``r_max_kpc``,
        ``gradient_sys_err``, ``n_annuli``, ``converged``, ``message``, and the full ``fit``.
        A galaxy with fewer than two usable annuli gets NaN numbers, "unresolved" and a
        message; no exception.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> ys = xs = np.arange(-20, 21) * 0.2
    >>> r = np.hypot(*np.meshgrid(ys, xs, indexing="ij"))
    >>> oh = 8.5 - 0.03 * r
    >>> ds = xr.Dataset({"oh": (("ys", "xs"), oh), "oh_lo": (("ys", "xs"), oh - 0.05),
    ...                  "oh_hi": (("ys", "xs"), oh + 0.05)}, coords={"ys": ys, "xs": xs})
    >>> psf = {"fwhm_major_kpc": 1.5, "fwhm_minor_kpc": 0.8, "pa_deg": 30.0}
    >>> profile, summary = measure_gradient(ds, psf=psf, fit_method="wls")
    >>> round(summary["gradient_dex_per_kpc"], 4), summary["resolved"]
    (-0.03, 'resolved')

    References
    ----------
    K20 §4.2, Appendix A.
    """
    centre = (0.0, 0.0) if centre_kpc is None else (float(centre_kpc[0]), float(centre_kpc[1]))
    profile = radial_profile(metallicity, psf=psf, centre_kpc=centre,
                             step_fraction=step_fraction, shape=shape, size=size,
                             min_pixels=min_pixels, line_maps=line_maps, method=method,
                             exclude_flags=exclude_flags)
    n_annuli = int(profile.sizes["annulus"])
    r_max = float(profile["r_out_kpc"].max()) if n_annuli else 0.0
    summary: dict[str, Any] = {"r_max_kpc": r_max, "n_annuli": n_annuli,
                               "psf_hwhm_size_kpc": psf_hwhm_size_kpc(psf),
                               "centre_kpc": list(centre)}
    if n_annuli < 2:
        fit = _nan_fit(f"unresolved: only {n_annuli} annulus/annuli with >= {min_pixels} valid "
                       f"pixels (step {profile.attrs['step_kpc']:.2f} kpc); the metallicity "
                       "map is too small or too faint for a gradient", n_annuli, fit_method)
        summary.update(gradient_dex_per_kpc=np.nan, gradient_err=np.nan, central_oh=np.nan,
                       central_oh_err=np.nan, resolved="unresolved", gradient_sys_err=np.nan,
                       converged=False, message=fit["message"], fit=fit)
        return profile, summary
    fit = fit_gradient(profile, method=fit_method, seed=seed)
    resolved = resolution_class(r_max, psf)
    message = fit["message"]
    if resolved != "resolved":
        ratio = r_max / psf_hwhm_size_kpc(psf)
        message = (f"{resolved}: metallicities reach {r_max:.2f} kpc = {ratio:.2f} x the PSF "
                   "HWHM size (resolved needs >= 2)" + (f"; {message}" if message else ""))
    sys_err = np.nan
    if systematics:
        sys_err = gradient_systematics(metallicity, psf=psf, centre_kpc=centre, size=size,
                                       min_pixels=min_pixels,
                                       exclude_flags=exclude_flags)["gradient_sys_err"]
    summary.update(gradient_dex_per_kpc=fit["gradient_dex_per_kpc"],
                   gradient_err=fit["gradient_err"], central_oh=fit["central_oh"],
                   central_oh_err=fit["central_oh_err"], resolved=resolved,
                   gradient_sys_err=sys_err, converged=fit["converged"], message=message,
                   fit=fit)
    return profile, summary


def peak_centre_kpc(line_maps: xr.Dataset, *, line: str = "Halpha",
                    smooth_pixels: float = 1.0) -> tuple[float, float]:
    """(x, y) in kpc of the peak of a (lightly Gaussian-smoothed) source-plane line map.

    The paper's fallback centre when the H-band continuum is not detected (K20 §4.2).
    """
    from scipy.ndimage import gaussian_filter

    flux = line_maps["flux"].sel(line=line).transpose("ys", "xs").values
    filled = gaussian_filter(np.nan_to_num(flux), smooth_pixels) if smooth_pixels else \
        np.nan_to_num(flux)
    iy, ix = np.unravel_index(np.argmax(filled), filled.shape)
    return float(line_maps["xs"][ix]), float(line_maps["ys"][iy])


# ---------------------------------------------------------------------------
# 2-D analysis (K20 §4.5)
# ---------------------------------------------------------------------------
def _distance_map(metallicity: xr.Dataset, centre_kpc: Sequence[float]) -> np.ndarray:
    ys, xs = _coords(metallicity)
    yy, xx = np.meshgrid(ys - centre_kpc[1], xs - centre_kpc[0], indexing="ij")
    return np.hypot(xx, yy)


def residual_map(metallicity: xr.Dataset, fit: Mapping[str, Any]) -> xr.DataArray:
    """Metallicity map minus the fitted radial model central + gradient x r (K20 §4.5).

    r is the circular distance from ``fit["centre_kpc"]``, as in the profile's ``radius_kpc``.
    """
    centre = fit.get("centre_kpc", (0.0, 0.0))
    model = fit["central_oh"] + fit["gradient_dex_per_kpc"] * _distance_map(metallicity, centre)
    resid = metallicity["oh"].transpose("ys", "xs") - model
    resid.name = "oh_residual"
    resid.attrs = {"units": "dex", "long_name": "12+log(O/H) minus the radial fit",
                   "references": "K20 §4.5"}
    return resid


def correlation_area_pixels(metallicity: xr.Dataset, psf: Mapping[str, float] | None) -> float:
    """Pixels per independent noise element: 4 pi sigma_maj sigma_min / pixel area (>= 1).

    White noise smoothed by the PSF Gaussian has this effective area; the variance of a mean
    over N pixels is then sigma^2 min(N, A) / N.
    """
    if psf is None:
        return 1.0
    ys, xs = _coords(metallicity)
    fwhm_a, fwhm_b, _ = psf_axes(psf)
    area = 4 * np.pi * (fwhm_a * _FWHM_TO_SIGMA) * (fwhm_b * _FWHM_TO_SIGMA)
    return float(max(area / abs((ys[1] - ys[0]) * (xs[1] - xs[0])), 1.0))


def _map_arrays(metallicity: xr.Dataset, exclude_flags=None):
    valid = _valid_pixels(metallicity, exclude_flags)
    err = pixel_errors(metallicity)
    valid &= err > 0
    return valid, metallicity["oh"].transpose("ys", "xs").values, err


def planar_fit(metallicity: xr.Dataset, *, centre_kpc: Sequence[float] = (0.0, 0.0),
               psf: Mapping[str, float] | None = None,
               noise_kernel: Mapping[str, float] | None = None,
               exclude_flags: Sequence[str] | None = None) -> dict:
    """Weighted plane oh = a + b x + c y: size and direction of the steepest gradient.

    Weights 1/s_i^2 with s_i the pixel errors. The covariance is scaled by
    max(chi^2/ndof, 1) and by the noise correlation area of :func:`correlation_area_pixels`
    for ``noise_kernel`` (or, if None, ``psf``, conservative; 1 when both are None, i.e.
    independent pixels), valid when the map spans many correlation areas.

    Returns
    -------
    dict with ``central_oh`` (a, at ``centre_kpc``), ``gradient_x``, ``gradient_y``
    (dex/kpc), ``gradient_dex_per_kpc`` = sqrt(b^2 + c^2), ``direction_deg`` (towards
    increasing metallicity, from +xs towards +ys, in [0, 360)), and their ``*_err``.

    References
    ----------
    K20 §4.5 (e.g. sp1: a linear gradient from the south-east to the north-west).
    """
    valid, oh, err = _map_arrays(metallicity, exclude_flags)
    ys, xs = _coords(metallicity)
    yy, xx = np.meshgrid(ys - centre_kpc[1], xs - centre_kpc[0], indexing="ij")
    x, y, v, s = xx[valid], yy[valid], oh[valid], err[valid]
    if v.size < 3:
        return {"central_oh": np.nan, "gradient_x": np.nan, "gradient_y": np.nan,
                "gradient_dex_per_kpc": np.nan, "direction_deg": np.nan,
                "gradient_err": np.nan, "direction_err_deg": np.nan,
                "message": f"only {v.size} valid pixels"}
    w = 1.0 / s**2
    design = np.stack([np.ones_like(x), x, y], axis=1)
    cov = np.linalg.inv(design.T @ (design * w[:, None]))
    params = cov @ (design.T @ (w * v))
    chi2 = float(np.sum(w * (v - design @ params) ** 2))
    ndof = v.size - 3
    kernel = noise_kernel if noise_kernel is not None else psf
    cov = cov * max(chi2 / max(ndof, 1), 1.0) * correlation_area_pixels(metallicity, kernel)
    b, c = params[1], params[2]
    size = float(np.hypot(b, c))
    jac_size = np.array([0.0, b, c]) / max(size, 1e-30)
    jac_dir = np.array([0.0, -c, b]) / max(size**2, 1e-30)
    return {"central_oh": float(params[0]), "central_oh_err": float(np.sqrt(cov[0, 0])),
            "gradient_x": float(b), "gradient_x_err": float(np.sqrt(cov[1, 1])),
            "gradient_y": float(c), "gradient_y_err": float(np.sqrt(cov[2, 2])),
            "gradient_dex_per_kpc": size,
            "gradient_err": float(np.sqrt(jac_size @ cov @ jac_size)),
            "direction_deg": float(np.rad2deg(np.arctan2(c, b)) % 360.0),
            "direction_err_deg": float(np.rad2deg(np.sqrt(jac_dir @ cov @ jac_dir))),
            "chi2": chi2, "ndof": int(ndof), "message": ""}


def noise_correlation_kernel(metallicity: xr.Dataset,
                             noise_kernel: Mapping[str, float] | None) -> np.ndarray:
    """Correlation coefficient of the pixel noise vs pixel offset (odd-sized 2-D array).

    White noise smoothed by an elliptical Gaussian (``noise_kernel``, FWHMs in kpc and PA)
    has a Gaussian autocorrelation with sqrt(2) x its sigmas; None gives independent pixels.
    """
    if noise_kernel is None:
        return np.ones((1, 1))
    ys, xs = _coords(metallicity)
    pix = abs(xs[1] - xs[0])
    fwhm_a, fwhm_b, pa = psf_axes(noise_kernel)
    sa, sb = np.sqrt(2) * fwhm_a * _FWHM_TO_SIGMA / pix, np.sqrt(2) * fwhm_b * _FWHM_TO_SIGMA / pix
    half = int(np.ceil(4 * sa))
    dy, dx = np.mgrid[-half:half + 1, -half:half + 1].astype(float)
    dy *= np.sign(ys[1] - ys[0])
    dx *= np.sign(xs[1] - xs[0])
    t = np.deg2rad(pa)
    u = dx * np.cos(t) + dy * np.sin(t)
    v = -dx * np.sin(t) + dy * np.cos(t)
    return np.exp(-0.5 * ((u / sa) ** 2 + (v / sb) ** 2))


def non_axisymmetry(metallicity: xr.Dataset, fit: Mapping[str, Any] | None = None, *,
                    psf: Mapping[str, float] | None = None,
                    noise_kernel: Mapping[str, float] | None = None, n_sectors: int = 6,
                    annulus_width_kpc: float | None = None, min_pixels: int = 3,
                    exclude_flags: Sequence[str] | None = None,
                    centre_kpc: Sequence[float] | None = None) -> dict:
    """Is there more azimuthal structure than the errors explain? A chi^2 test (K20 §4.5).

    The residuals from the radial fit (or the map itself when ``fit`` is None) are split in
    circular annuli of width ``annulus_width_kpc`` (default half the PSF linear size, else
    3 pixels) and ``n_sectors`` azimuthal sectors. Each cell's inverse-variance mean m_s has
    the covariance C_st = sum_{i in s, j in t} w_i w_j s_i s_j rho_ij / (W_s W_t), with rho the
    noise correlation of :func:`noise_correlation_kernel` (independent pixels when
    ``noise_kernel`` is None). The axisymmetric null (one mean per annulus) is fitted by
    generalised least squares, chi^2 = (m - X mu)^T C^-1 (m - X mu) with
    ndof = cells - annuli, and chi^2(ndof) gives the p-value.

    Parameters
    ----------
    psf : dict, optional
        Sets the default annulus width; also used as ``noise_kernel`` when that is None
        (conservative: the PSF correlates the noise over a larger area than the smoothing
        and de-lensing of real maps do).
    noise_kernel : dict, optional
        Elliptical Gaussian (``fwhm_major_kpc``, ``fwhm_minor_kpc``, ``pa_deg``) that smoothed
        independent pixel noise, e.g. the source-plane image of the 0.4" smoothing kernel.

    Returns
    -------
    dict with ``chi2``, ``ndof``, ``p_value``, ``significance_sigma`` (one-sided Gaussian
    equivalent), ``azimuthal_rms_dex`` (rms of m_s minus its annulus mean),
    ``expected_rms_dex`` (the same from the errors alone), ``n_annuli``, ``n_cells``.
    """
    from scipy.signal import fftconvolve

    centre = centre_kpc if centre_kpc is not None else (
        fit.get("centre_kpc", (0.0, 0.0)) if fit is not None else (0.0, 0.0))
    valid, oh, err = _map_arrays(metallicity, exclude_flags)
    values = residual_map(metallicity, fit).values if fit is not None else oh
    valid &= np.isfinite(values)
    ys, xs = _coords(metallicity)
    yy, xx = np.meshgrid(ys - centre[1], xs - centre[0], indexing="ij")
    if annulus_width_kpc is None:
        annulus_width_kpc = (0.5 * psf_linear_size_kpc(psf) if psf is not None
                             else 3 * abs(xs[1] - xs[0]))
    ring = np.floor(np.hypot(xx, yy) / annulus_width_kpc).astype(int)
    sector = (np.floor((np.arctan2(yy, xx) % (2 * np.pi)) / (2 * np.pi / n_sectors))
              .astype(int) % n_sectors)
    cell = np.where(valid, ring * n_sectors + sector, -1)
    w = np.where(valid, 1.0 / np.where(valid, err, 1.0) ** 2, 0.0)
    labels, counts = np.unique(cell[valid], return_counts=True)
    labels = labels[counts >= min_pixels]
    # keep annuli with at least two usable cells
    rings_of = labels // n_sectors
    ring_ids, ring_counts = np.unique(rings_of, return_counts=True)
    labels = labels[np.isin(rings_of, ring_ids[ring_counts >= 2])]
    if labels.size < 2:
        return {"chi2": np.nan, "ndof": 0, "p_value": np.nan, "significance_sigma": np.nan,
                "azimuthal_rms_dex": np.nan, "expected_rms_dex": np.nan, "n_annuli": 0,
                "n_cells": 0, "message": "not enough pixels for any annulus with two sectors"}
    index = np.full(int(cell.max()) + 1, -1)
    index[labels] = np.arange(labels.size)
    cid = np.where(cell >= 0, index[np.maximum(cell, 0)], -1)
    use = cid >= 0
    n = labels.size
    wsum = np.bincount(cid[use], w[use], minlength=n)
    mean = np.bincount(cid[use], (w * values)[use], minlength=n) / wsum
    kernel = noise_correlation_kernel(metallicity, noise_kernel if noise_kernel is not None
                                      else psf)
    ws = np.where(use, w * np.where(valid, err, 0.0), 0.0)  # w_i s_i
    cov = np.zeros((n, n))
    rows, cols = np.nonzero(use)
    for start in range(0, n, 64):  # batches of cells: one FFT convolution each
        ks = np.arange(start, min(start + 64, n))
        stack = np.zeros((ks.size, *ws.shape))
        sel = np.isin(cid[rows, cols], ks)
        stack[cid[rows, cols][sel] - start, rows[sel], cols[sel]] = ws[rows[sel], cols[sel]]
        if kernel.size > 1:
            stack = fftconvolve(stack, kernel[None], mode="same", axes=(1, 2))
        for j, k in enumerate(ks):
            cov[k] = np.bincount(cid[use], (ws * stack[j])[use], minlength=n)
    cov /= np.outer(wsum, wsum)
    cov = 0.5 * (cov + cov.T)
    rings = labels // n_sectors
    ring_index = np.unique(rings, return_inverse=True)[1]
    design = np.zeros((n, ring_index.max() + 1))
    design[np.arange(n), ring_index] = 1.0
    with threadpool_limits(limits=1, user_api="blas"):  # tiny matrices: threads only hurt
        cinv = np.linalg.pinv(cov, hermitian=True)
    mu = np.linalg.solve(design.T @ cinv @ design, design.T @ cinv @ mean)
    resid = mean - design @ mu
    chi2 = float(resid @ cinv @ resid)
    ndof = int(n - design.shape[1])
    p_value = float(stats.chi2.sf(chi2, ndof))
    return {"chi2": chi2, "ndof": ndof, "p_value": p_value,
            "significance_sigma": float(stats.norm.isf(np.clip(p_value, 1e-300, 1 - 1e-16))),
            "azimuthal_rms_dex": float(np.sqrt(np.mean(resid**2))),
            "expected_rms_dex": float(np.sqrt(np.mean(np.diag(cov)) * (1 - design.shape[1] / n))),
            "n_annuli": int(design.shape[1]), "n_cells": int(n),
            "correlation_area_pixels": float(kernel.sum()), "message": ""}

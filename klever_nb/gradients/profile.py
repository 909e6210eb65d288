"""Radial metallicity profile in annuli, pixel errors and the "mean_ratio" route (K20 §4.2).

Part of :mod:`klever_nb.gradients` (import from there).

References
----------
K20 §4.2; FACTS.md §1.2 (diagnostic ratios), §12 (grid posterior).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

from klever_nb.errors import ConfigError, InputError
from klever_nb.gradients.annuli import (
    _coords,
    _ellipse_shape,
    annulus_weights,
    elliptical_annuli,
    elliptical_radius_kpc,
    psf_axes,
    psf_linear_size_kpc,
)
from klever_nb.metallicity import grid_summary, make_grid
from klever_nb.ratios import DIAGNOSTICS, log_ratio_from_fluxes


def _ratio_of_sums(name: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(numerator lines, denominator lines) of a diagnostic that is one sum over another.

    None for the others (O3N2, O3S2: ratios of ratios; RS32: a sum of ratios; R23: holds a
    possibly tied [OIII]4959).
    """
    definition = DIAGNOSTICS[name]
    if len(definition.terms) != 1 or "OIII_4959" in definition.lines:
        return None
    (term,) = definition.terms
    if sorted(e for _, e in term) != [-1, 1]:
        return None
    num = next(tuple(line for line, _ in combo) for combo, e in term if e > 0)
    den = next(tuple(line for line, _ in combo) for combo, e in term if e < 0)
    return num, den


#: Diagnostics that are a ratio of sums of lines (numerator, denominator): the lines of their
#: one definition in :data:`klever_nb.ratios.DIAGNOSTICS` (FACTS.md §1.2): R2, R3, O3O2, N2, S2.
DIAGNOSTIC_LINES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    name: lines for name in DIAGNOSTICS if (lines := _ratio_of_sums(name)) is not None
}


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


def gradient_pixels(metallicity: xr.Dataset, *, require_all_diagnostics: bool = True,
                    exclude_flags: Sequence[str] | None = ("bimodal",)
                    ) -> tuple[xr.Dataset, dict]:
    """The metallicity map restricted to the pixels a gradient may use, and their counts.

    K20 §4.2 uses the same diagnostic combination for every pixel of a galaxy: a pixel where
    only a subset passed its SNR cut (faint outer pixels often keep R3 alone, whose posterior
    is double-peaked) is left out when ``require_all_diagnostics`` (needs the map's
    ``all_diagnostics``). Pixels with any of ``exclude_flags`` set are left out too
    (default: ``bimodal`` posteriors; flags the map lacks are skipped).

    Returns
    -------
    (Dataset, dict)
        The map with ``oh``/``oh_lo``/``oh_hi`` NaN outside the selection, and
        ``n_pixels_finite``, ``n_pixels_used``, ``n_pixels_incomplete_diagnostics``,
        ``n_pixels_flagged`` ({flag: count}), ``gradient_pixel_selection`` (a sentence).
    """
    oh = metallicity["oh"].transpose("ys", "xs").values
    finite = np.isfinite(oh)
    keep = finite.copy()
    incomplete = np.zeros_like(finite)
    if require_all_diagnostics and "all_diagnostics" in metallicity:
        incomplete = finite & ~metallicity["all_diagnostics"].transpose("ys", "xs").values
        keep &= ~incomplete
    flagged: dict[str, int] = {}
    for flag in exclude_flags or ():
        if flag in metallicity:
            bad = finite & metallicity[flag].transpose("ys", "xs").values.astype(bool)
            flagged[flag] = int(bad.sum())
            keep &= ~bad
    mask = xr.DataArray(keep, dims=("ys", "xs"))
    out = metallicity.copy()
    for name in ("oh", "oh_lo", "oh_hi"):
        out[name] = metallicity[name].where(mask)
    used = metallicity.attrs.get("diagnostics_used", "")
    rule = (f"pixels with every diagnostic of the set ({used})" if require_all_diagnostics
            else "pixels with any diagnostic")
    if flagged:
        rule += ", excluding " + ", ".join(flagged)
    counts = {"n_pixels_finite": int(finite.sum()), "n_pixels_used": int(keep.sum()),
              "n_pixels_incomplete_diagnostics": int(incomplete.sum()),
              "n_pixels_flagged": flagged, "gradient_pixel_selection": rule}
    return out, counts


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
            "axis_ratio": float(q), "theta_deg": float(pa),
            "psf_fwhm_major_kpc": psf_axes(psf)[0], "psf_fwhm_minor_kpc": psf_axes(psf)[1],
            "psf_theta_deg": psf_axes(psf)[2],
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
    """log10 of each diagnostic ratio and its 1 sigma (first-order propagation) per pixel.

    The ratio and its derivatives come from :func:`klever_nb.ratios.log_ratio_from_fluxes`
    (no SNR cut, no dust correction): sigma^2 = sum_i (d log R/d log F_i)^2 (s_i/(F_i ln 10))^2.
    """
    flux, ferr = line_maps["flux"], line_maps["flux_err"]
    out = {}
    for d in diagnostics:
        num, den = DIAGNOSTIC_LINES[d]
        lines = num + den
        values = {n: np.asarray(flux.sel(line=n), dtype=float) for n in lines}
        log_r, jac = log_ratio_from_fluxes(d, values)
        variance = np.zeros_like(log_r)
        with np.errstate(invalid="ignore", divide="ignore"):
            for n in lines:
                rel = np.asarray(ferr.sel(line=n), dtype=float) / (values[n] * np.log(10.0))
                variance = variance + (jac[n] * rel) ** 2
        out[d] = (log_r, np.where(np.isfinite(log_r), np.sqrt(variance), np.nan))
    return out


def oh_from_log_ratios(log_ratios: Mapping[str, tuple[np.ndarray, np.ndarray]], *,
                       calibration_set: str = "C20", grid: np.ndarray | None = None
                       ) -> tuple[np.ndarray, ...]:
    """12+log(O/H) posterior median, 16th and 84th percentiles from log ratios (K20 eq. 1).

    ``log_ratios`` maps a diagnostic to (log R, its 1 sigma) arrays of one shape. The
    posterior is the package's one eq. (1) grid posterior,
    :func:`klever_nb.metallicity.grid_summary` (default grid
    :func:`klever_nb.metallicity.make_grid`); this only arranges the dict into its arrays.
    Used by ``method="mean_ratio"`` and by the benchmarks.
    """
    diags = list(log_ratios)
    obs = np.stack([np.asarray(log_ratios[d][0], float) for d in diags], axis=-1)
    err = np.stack([np.asarray(log_ratios[d][1], float) for d in diags], axis=-1)
    grid = make_grid(diags, calibration_set=calibration_set) if grid is None else grid
    out = grid_summary(obs, err, diags, calibration_set=calibration_set, grid=grid,
                       n_threads=1)
    return out["oh"], out["oh_lo"], out["oh_hi"]


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

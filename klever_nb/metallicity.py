"""Gas-phase metallicity 12+log(O/H) from strong-line ratios, with exact posteriors.

K20 §3.4 (eq. 1): chi^2(x) = sum_i (log R_obs,i - log R_cal,i(x))^2 / (sigma_obs,i^2 + sigma_cal,i^2)
with a flat prior over the calibrations' validity range. The parameter is
one-dimensional, so the posterior exp(-chi^2/2) is computed exactly on a fine
grid for every pixel at once (:func:`posterior_grid`; the fast fused path used
by :func:`metallicity_map` is :func:`grid_summary`, checked against the former).
The paper's emcee sampling is available as :func:`posterior_emcee`
(``method="emcee"``); the two agree to Monte-Carlo noise. There is one eq. (1):
the calibration polynomials are evaluated by :meth:`Calibration.log_ratio
<klever_nb.calibrations.Calibration.log_ratio>` (:func:`calibrated_log_ratios`) and
chi^2 by :func:`chi2_eq1`, for the grid, the emcee log-probability and the radial
profile's "mean_ratio" route (:func:`klever_nb.gradients.oh_from_log_ratios` calls
:func:`grid_summary`). In ``method="emcee"`` every summary and flag of a pixel comes
from its chains (:func:`chain_summary`), no grid is computed beside them.
That posterior engine lives in :mod:`klever_nb.posterior` (its public names are
re-exported here); this module chooses the diagnostics, assembles the observed
ratios and dust inputs, and writes the maps.

Summaries (per pixel): median and 16th/84th percentiles from the linearly
interpolated CDF of the trapezoid-integrated posterior (no pile-up at grid
nodes); ``bimodal`` when the posterior has two maxima separated by a valley
lower than ``valley_ratio`` x the lower peak, each side holding at least
``min_mode_mass`` of the probability (R3, R23, R2, RS32 turn over, FACTS.md §1.4);
``at_edge`` when the posterior density at either end of the range is at least
``edge_ratio`` x its peak (the prior truncates it); ``no_diagnostic`` when a
pixel has no usable ratio (all outputs NaN there).

Decisions (FACTS.md §11)
------------------------
- sigma_cal in eq. (1) is the calibration's intrinsic dispersion (``sigma`` of the
  TOML files, FACTS.md §1.3), not the fit RMS.
- Prior: flat over the intersection of the validity ranges of the diagnostics used
  (C20: 7.6-8.9); grid step 0.001 dex by default.
- One set of diagnostics per galaxy (:func:`choose_diagnostics`, K20 §4.2); a
  diagnostic missing or below its SNR cut in a pixel is dropped there only.
- Dust: by default only the dust-sensitive diagnostics (R2, O3O2, R23: lines far
  apart) are corrected (K20 §3.4), with the pixel's Balmer E(B-V) where Hbeta has
  SNR >= 3 and the global E(B-V) elsewhere; the E(B-V) error is propagated
  (:func:`klever_nb.ratios.observed_log_ratio`).
- Pixels classified AGN in either BPT diagram are flagged (``agn_like``) and kept by default:
  K20 §3.4 removed one AGN galaxy after checking BPT positions, it cut no pixels
  (``exclude_agn=True`` drops them).
- ``poor_fit`` marks chi2_min with upper-tail probability < 1e-3 (ratios off every
  curve, e.g. R3 above its maximum); the posterior is still reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import xarray as xr
from scipy import stats

from klever_nb.calibrations import get_calibration
from klever_nb.constants import (
    BALMER_SNR,
    DETECTION_SNR,
    METALLICITY_SNR_STRONG,
    METALLICITY_SNR_WEAK,
    R_V,
)
from klever_nb.errors import ConfigError
from klever_nb.posterior import (
    EDGE_RATIO,
    GRID_STEP,
    MIN_MODE_MASS,
    VALLEY_RATIO,
    calibrated_log_ratios,
    chain_summary,
    chi2_eq1,
    grid_summary,
    make_grid,
    posterior_emcee,
    posterior_grid,
    summarize_posterior,
    validity_range,
)
from klever_nb.ratios import DIAGNOSTICS, get_diagnostic, observed_log_ratio

# The eq. (1) posterior engine lives in klever_nb.posterior; its public names are part of
# this module's API too (klever_nb.metallicity.grid_summary, ...).
__all__ = [
    "CHOICE_SNR", "EDGE_RATIO", "GRID_STEP", "MIN_MODE_MASS", "O3O2_MIN_REDSHIFT",
    "POOR_FIT_PVALUE", "VALLEY_RATIO", "calibrated_log_ratios", "chain_summary", "chi2_eq1",
    "choose_diagnostics", "dust_inputs", "global_metallicity", "grid_summary", "make_grid",
    "metallicity_map", "posterior_emcee", "posterior_grid", "predicted_line_fluxes",
    "summarize_posterior", "validity_range",
]

#: chi2_min above this upper-tail probability threshold marks a poor fit (ratios off every curve).
POOR_FIT_PVALUE = 1e-3
#: Default redshift above which O3O2 is used when [OII] is detected (K20 §4.2).
O3O2_MIN_REDSHIFT = 2.0
#: Detection threshold used to choose the diagnostics of a galaxy (K20 §3.1, §3.4: >= 3 sigma).
CHOICE_SNR = DETECTION_SNR


# ---------------------------------------------------------------------------
# Choice of diagnostics (K20 §3.4, §4.2)
# ---------------------------------------------------------------------------
def _integrated_fluxes(maps: xr.Dataset) -> dict[str, tuple[float, float]]:
    """Line -> (flux summed over the finite pixels, error in quadrature)."""
    spatial = [d for d in maps["flux"].dims if d != "line"]
    flux, err = maps["flux"], maps["flux_err"]
    good = np.isfinite(flux) & np.isfinite(err) & (err > 0)
    total = flux.where(good, 0.0).sum(spatial) if spatial else flux.where(good, 0.0)
    noise = np.sqrt((err.where(good, 0.0) ** 2).sum(spatial)) if spatial else err.where(good, 0.0)
    return {str(n): (float(f), float(e)) for n, f, e in zip(
        maps["line"].values, np.atleast_1d(total.values), np.atleast_1d(noise.values),
        strict=True)}


def _diagnostic_detected(name: str, integrated: dict[str, tuple[float, float]],
                         min_snr: float) -> bool:
    """Every species of the diagnostic (doublets summed) has integrated SNR >= ``min_snr``."""
    definition = get_diagnostic(name)
    for species in definition.species:
        members = [line for line, _ in species]
        if any(m not in integrated for m in members):
            return False
        total = sum(integrated[m][0] for m in members)
        noise = math.sqrt(sum(integrated[m][1] ** 2 for m in members))
        if not (noise > 0 and total / noise >= min_snr):
            return False
    return True


def choose_diagnostics(maps_or_integrated: xr.Dataset, *, redshift: float | None,
                       requested: Sequence[str] | None = None, min_snr: float = CHOICE_SNR,
                       o3o2_min_redshift: float = O3O2_MIN_REDSHIFT,
                       use_s2: str = "fallback") -> list[str]:
    """The set of diagnostics for one galaxy (the same for all its pixels; K20 §3.4, §4.2).

    Rule (K20): R3 and N2 when detected (integrated SNR >= 3); S2 instead of N2
    when N2 is not available (``use_s2="fallback"``), or in addition
    (``use_s2="always"``), or never (``"never"``); O3O2 for z > 2 when [OII] is
    detected. ``requested`` (e.g. from the galaxy TOML ``[analysis] diagnostics``)
    overrides the rule.

    Raises
    ------
    ConfigError
        Unknown requested diagnostic, or one whose lines the maps do not contain.

    References
    ----------
    K20 §3.4, §4.2 (Table 4 lists the diagnostics per galaxy).
    """
    names = [str(n) for n in maps_or_integrated["line"].values]
    if requested is not None:
        chosen = list(dict.fromkeys(requested))
        for name in chosen:
            definition = get_diagnostic(name)
            missing = [ln for ln in definition.required_lines if ln not in names]
            if missing:
                raise ConfigError(f"[analysis] diagnostics: {name!r} needs lines {missing} that "
                                  f"the line maps lack; remove {name!r} or fit those lines")
        return chosen
    if use_s2 not in ("fallback", "always", "never"):
        raise ConfigError(f"use_s2={use_s2!r}: use 'fallback', 'always' or 'never'")
    integrated = _integrated_fluxes(maps_or_integrated)
    detected = {d: _diagnostic_detected(d, integrated, min_snr) for d in ("R3", "N2", "S2", "O3O2")}
    chosen = []
    if detected["R3"]:
        chosen.append("R3")
    if detected["N2"]:
        chosen.append("N2")
    if detected["S2"] and (use_s2 == "always" or (use_s2 == "fallback" and not detected["N2"])):
        chosen.append("S2")
    if detected["O3O2"] and redshift is not None and redshift > o3o2_min_redshift:
        chosen.append("O3O2")
    return chosen


# ---------------------------------------------------------------------------
# Metallicity maps
# ---------------------------------------------------------------------------
def _spatial_dims(maps: xr.Dataset) -> list[str]:
    """Dims of the line maps other than ``line``."""
    return [d for d in maps["flux"].dims if d != "line"]


def dust_inputs(maps: xr.Dataset, *, ebv: float | xr.DataArray | None = None,
                ebv_err: float | xr.DataArray | None = None, min_snr_hbeta: float = BALMER_SNR,
                law: str = "CCM89", r_v: float = R_V) -> xr.Dataset:
    """Per-pixel E(B-V) for the metallicity: Balmer decrement where Hbeta is good, else global.

    The global value is ``ebv`` (± ``ebv_err``) when given, else the Balmer
    decrement of the Halpha and Hbeta fluxes summed over the map (K20 §3.4).
    Returns ``ebv``, ``ebv_err``, ``ebv_from_balmer`` (bool) on the spatial dims,
    attrs ``global_ebv``, ``global_ebv_err``. Negative values are kept (not clipped),
    as the ratio is then an unbiased estimate; see :mod:`klever_nb.dust`.
    """
    from klever_nb.dust import balmer_ebv, integrated_balmer_ebv

    has_balmer = all(n in maps["line"].values for n in ("Halpha", "Hbeta"))
    template = maps["flux"].isel(line=0, drop=True)
    if has_balmer:
        local = balmer_ebv(maps, min_snr_hbeta=min_snr_hbeta, law=law, r_v=r_v)
        global_ebv, global_err = integrated_balmer_ebv(maps, min_snr_hbeta=min_snr_hbeta,
                                                       law=law, r_v=r_v)
    else:
        local = None
        global_ebv, global_err = np.nan, np.nan
    if ebv is not None:
        global_ebv = ebv
        global_err = 0.0 if ebv_err is None else ebv_err
    glob = xr.DataArray(global_ebv).broadcast_like(template) if np.isscalar(global_ebv) \
        else global_ebv.broadcast_like(template)
    glob_err = xr.DataArray(global_err).broadcast_like(template) if np.isscalar(global_err) \
        else global_err.broadcast_like(template)
    if local is not None:
        from_balmer = local["balmer_ok"]
        value = xr.where(from_balmer, local["ebv"], glob)
        error = xr.where(from_balmer, local["ebv_err"], glob_err)
    else:
        from_balmer = xr.zeros_like(template, dtype=bool)
        value, error = glob, glob_err
    return xr.Dataset(
        {"ebv": value.assign_attrs(units="mag", law=law, r_v=r_v),
         "ebv_err": error.assign_attrs(units="mag"),
         "ebv_from_balmer": from_balmer.astype(bool)},
        attrs={"global_ebv": float(np.nanmean(np.asarray(global_ebv, dtype=float))),
               "global_ebv_err": float(np.nanmean(np.asarray(global_err, dtype=float)))})


def _agn_like(maps: xr.Dataset, shape: tuple[int, ...]) -> np.ndarray:
    """Pixels on the AGN side of the [NII] or [SII] BPT diagram (False where undecided, K20 §3.4)."""
    from klever_nb.bpt import bpt_classify

    return np.asarray(bpt_classify(maps)["agn"].values, dtype=bool).reshape(shape)


def _chosen_diagnostics(maps: xr.Dataset, diagnostics: Sequence[str] | None, *,
                        redshift: float | None, calibration_set: str, method: str) -> list[str]:
    """Check the inputs; the galaxy's diagnostics (K20 §3.4, §4.2), each in ``calibration_set``."""
    if method not in ("grid", "emcee"):
        raise ConfigError(f"method={method!r}: use 'grid' or 'emcee'")
    if "line" not in maps.dims or "flux" not in maps or "flux_err" not in maps:
        raise ConfigError("metallicity_map needs a Dataset with 'flux', 'flux_err' on a 'line' dim")
    if diagnostics is None:
        chosen = choose_diagnostics(maps, redshift=redshift)
    else:
        chosen = choose_diagnostics(maps, redshift=redshift, requested=list(diagnostics))
    for name in chosen:
        get_calibration(name, set_name=calibration_set)  # ConfigError if the set lacks it
    return chosen


def _dust_for_ratios(maps: xr.Dataset, chosen: Sequence[str], *, dust_correction: bool | None,
                     ebv, ebv_err, min_snr_hbeta: float) -> tuple[xr.Dataset | None, dict]:
    """Per-pixel E(B-V) (:func:`dust_inputs`) and the dust keywords of the ratios (K20 §3.4).

    ``(None, {})`` when no ratio is to be corrected (auto: no dust-sensitive diagnostic;
    or the maps are already dust-corrected).
    """
    needs_dust = any(DIAGNOSTICS[d].dust_sensitive for d in chosen)
    do_dust = needs_dust if dust_correction is None else bool(dust_correction)
    if maps.attrs.get("dust_corrected", False):
        do_dust = False
    if not (do_dust and chosen):
        return None, {}
    dust = dust_inputs(maps, ebv=ebv, ebv_err=ebv_err, min_snr_hbeta=min_snr_hbeta)
    ratio_kwargs = {"ebv": dust["ebv"], "ebv_err": dust["ebv_err"],
                    "ebv_from_balmer": dust["ebv_from_balmer"]}
    return dust, ratio_kwargs


def _observed_ratio_stack(maps: xr.Dataset, chosen: Sequence[str], shape: tuple[int, ...],
                          excluded: np.ndarray, ratio_kwargs: dict, *,
                          dust_correction: bool | None, snr_min_strong: float,
                          snr_min_weak: float) -> tuple[np.ndarray, np.ndarray]:
    """log R_obs and its error, shape (*shape, n_diag), NaN where unusable or excluded (K20 §4.2)."""
    n_diag = len(chosen)
    log_r = np.full((*shape, n_diag), np.nan)
    log_r_err = np.full((*shape, n_diag), np.nan)
    for i, name in enumerate(chosen):
        # auto: only ratios of distant lines are corrected (K20 §3.4: R3, N2, S2 need none);
        # dust_correction=True corrects every ratio
        kwargs = ratio_kwargs if (dust_correction or DIAGNOSTICS[name].dust_sensitive) else {}
        value, error, usable = observed_log_ratio(
            maps, name, snr_min_strong=snr_min_strong, snr_min_weak=snr_min_weak, **kwargs)
        ok = usable.values & ~excluded
        log_r[..., i] = np.where(ok, value.values, np.nan)
        log_r_err[..., i] = np.where(ok, error.values, np.nan)
    return log_r, log_r_err


def _posterior_summary(log_r: np.ndarray, log_r_err: np.ndarray, chosen: Sequence[str],
                       shape: tuple[int, ...], *, method: str, calibration_set: str,
                       grid_step: float, emcee_kwargs: dict | None, chunk_size: int,
                       n_threads: int) -> dict:
    """Per-pixel summaries of the K20 eq. (1) posterior: grid, emcee chains, or NaN (no ratio)."""
    if not chosen:
        nan = np.full(shape, np.nan)
        return {"oh": nan, "oh_lo": nan, "oh_hi": nan, "mode": nan, "chi2_min": nan,
                "bimodal": np.zeros(shape, bool), "at_edge": np.zeros(shape, bool),
                "n_diagnostics": np.zeros(shape, int), "no_diagnostic": np.ones(shape, bool)}
    if method == "emcee":  # every summary and flag from the chains that were run
        return posterior_emcee(log_r, log_r_err, chosen, calibration_set=calibration_set,
                               **dict(emcee_kwargs or {}))
    grid = make_grid(chosen, calibration_set=calibration_set, step=grid_step)
    return grid_summary(log_r, log_r_err, chosen, calibration_set=calibration_set,
                        grid=grid, chunk_size=chunk_size, n_threads=n_threads)


def _poor_fit(summary: dict) -> tuple[np.ndarray, np.ndarray]:
    """Diagnostics used per pixel, and chi2_min upper-tail probability < :data:`POOR_FIT_PVALUE`."""
    n_used = np.asarray(summary["n_diagnostics"])
    with np.errstate(invalid="ignore"):
        dof = np.maximum(n_used - 1, 1)
        poor = (n_used > 0) & (stats.chi2.sf(np.nan_to_num(summary["chi2_min"]), dof)
                               < POOR_FIT_PVALUE)
    return n_used, poor


def _map_variable(template: xr.DataArray, spatial: Sequence[str], values, long_name: str,
                  units: str | None = None) -> xr.DataArray:
    """``values`` as a DataArray on the spatial dims and coordinates of the line maps."""
    attrs = {"long_name": long_name}
    if units:
        attrs["units"] = units
    return xr.DataArray(np.asarray(values).reshape(template.shape), dims=spatial,
                        coords=template.coords, attrs=attrs)


def _summary_variables(summary: dict, n_used: np.ndarray, poor: np.ndarray,
                       agn_like: np.ndarray, agn: np.ndarray, n_diag: int, *, method: str,
                       template: xr.DataArray, spatial: Sequence[str]) -> dict[str, xr.DataArray]:
    """The per-pixel variables of :func:`metallicity_map`: 12+log(O/H) percentiles and flags."""
    def var(values, long_name, units=None):
        return _map_variable(template, spatial, values, long_name, units)

    dex = "dex"
    data = {
        "oh": var(summary["oh"], "12+log(O/H), posterior median", dex),
        "oh_lo": var(summary["oh_lo"], "16th percentile of 12+log(O/H)", dex),
        "oh_hi": var(summary["oh_hi"], "84th percentile of 12+log(O/H)", dex),
        "oh_err_lo": var(summary["oh"] - summary["oh_lo"], "median - 16th percentile", dex),
        "oh_err_hi": var(summary["oh_hi"] - summary["oh"], "84th percentile - median", dex),
        "mode": var(summary["mode"], "posterior mode (grid node or highest-ln p sample)", dex),
        "chi2_min": var(summary["chi2_min"], "minimum chi^2 of K20 eq. (1)"),
        "n_diagnostics": var(n_used.astype(np.int16), "diagnostics used in this pixel"),
        "bimodal": var(summary["bimodal"], "two separated posterior modes"),
        "at_edge": var(summary["at_edge"], "posterior truncated at the validity range"),
        "no_diagnostic": var(summary["no_diagnostic"], "no usable ratio: oh is NaN"),
        "poor_fit": var(poor, f"chi2_min upper-tail probability < {POOR_FIT_PVALUE}"),
        "agn_like": var(agn_like, "AGN side of the [NII] or [SII] BPT diagram"),
        "agn_excluded": var(agn, "AGN-like in a BPT diagram, excluded"),
        "all_diagnostics": var(n_used == n_diag, "every diagnostic of the galaxy's set "
                               "entered this pixel (the pixels a gradient uses, K20 §4.2)"),
    }
    if method == "emcee" and n_diag:
        data["tau"] = var(summary["tau"], "emcee integrated autocorrelation time (steps)")
        data["converged"] = var(summary["converged"], "emcee chain > 50 tau")
    return data


def _add_ratios_and_dust(out: xr.Dataset, log_r: np.ndarray, log_r_err: np.ndarray,
                         chosen: Sequence[str], dust: xr.Dataset | None, *,
                         template: xr.DataArray, spatial: Sequence[str]) -> None:
    """Add the log ratios that entered eq. (1) on ``(diagnostic, ...)`` and the E(B-V) used."""
    if chosen:
        out["log_ratio"] = xr.DataArray(np.moveaxis(log_r, -1, 0), dims=("diagnostic", *spatial),
                                        coords={"diagnostic": chosen, **template.coords},
                                        attrs={"units": "dex", "long_name": "log10 ratio used"})
        out["log_ratio_err"] = xr.DataArray(np.moveaxis(log_r_err, -1, 0),
                                            dims=("diagnostic", *spatial),
                                            coords={"diagnostic": chosen, **template.coords},
                                            attrs={"units": "dex"})
    if dust is not None:
        out["ebv"] = dust["ebv"]
        out["ebv_err"] = dust["ebv_err"]
        out["ebv_from_balmer"] = dust["ebv_from_balmer"]


def metallicity_map(
    maps: xr.Dataset,
    *,
    diagnostics: Sequence[str] | None = None,
    calibration_set: str = "C20",
    redshift: float | None = None,
    ebv: float | xr.DataArray | None = None,
    ebv_err: float | xr.DataArray | None = None,
    method: str = "grid",
    grid_step: float = GRID_STEP,
    snr_min_strong: float = METALLICITY_SNR_STRONG,
    snr_min_weak: float = METALLICITY_SNR_WEAK,
    exclude_agn: bool = False,
    dust_correction: bool | None = None,
    min_snr_hbeta: float = BALMER_SNR,
    emcee_kwargs: dict | None = None,
    chunk_size: int = 2048,
    n_threads: int = 2,
) -> xr.Dataset:
    """12+log(O/H) per pixel (or for integrated fluxes) with posterior summaries and flags.

    Parameters
    ----------
    maps : xarray.Dataset
        Line maps on ``(line, y, x)``, ``(line, ys, xs)`` or ``(line,)``.
    diagnostics : sequence of str, optional
        Diagnostics to combine (default :func:`choose_diagnostics`); the same for every pixel.
    calibration_set : str
        Registered calibration set (K20: C17/C19 = ``"C20"``).
    redshift : float, optional
        Used to choose the diagnostics (O3O2 at z > 2).
    ebv, ebv_err : float or DataArray, optional
        Global E(B-V) for pixels without a good Hbeta (default: Balmer decrement of
        the summed map).
    method : {"grid", "emcee"}
        Exact grid posterior (default) or the paper's emcee sampling (then the
        quantiles, ``mode``, ``chi2_min``, ``bimodal`` and ``at_edge`` come from the
        chains, :func:`chain_summary`; ``grid_step``, ``chunk_size``, ``n_threads`` unused).
    grid_step : float
        Grid step in dex (default 0.001).
    snr_min_strong, snr_min_weak : float
        Per-pixel SNR thresholds (K20 §4.2: 5 on Halpha, [OIII]5007; 2.5 otherwise).
    exclude_agn : bool
        Drop pixels that are AGN in the [NII] or [SII] BPT diagram (:mod:`klever_nb.bpt`).
        Default False, as K20 (§3.4: one AGN galaxy removed, no pixel cut); the pixels are
        flagged ``agn_like`` either way.
    dust_correction : bool, optional
        Default (None): correct the dust-sensitive diagnostics (lines at distant
        wavelengths, e.g. [OII]; K20 §3.4) and leave R3, N2, S2... as observed;
        True corrects every diagnostic, False none. Per-pixel Balmer
        E(B-V) where Hbeta has SNR >= ``min_snr_hbeta``, else the global value;
        its error propagates into the ratios (chain rule through Halpha, Hbeta).
    emcee_kwargs : dict, optional
        Options of :func:`posterior_emcee` (``nwalkers``, ``nsteps``, ``n_processes``...).
    chunk_size, n_threads : int
        Chunking and threads of the grid path.

    Returns
    -------
    xarray.Dataset
        On the spatial dims of ``maps``: ``oh`` (posterior median), ``oh_lo``,
        ``oh_hi`` (16th/84th percentiles), ``oh_err_lo``, ``oh_err_hi``, ``mode``,
        ``chi2_min``, ``n_diagnostics``, flags ``bimodal``, ``at_edge``,
        ``no_diagnostic``, ``poor_fit``, ``agn_like``, ``agn_excluded``,
        ``all_diagnostics`` (every diagnostic of the set entered); ``log_ratio`` and
        ``log_ratio_err`` on ``(diagnostic, ...)``; ``ebv``/``ebv_err`` when dust
        correction was applied; for emcee also ``tau``, ``converged``. Attrs:
        ``diagnostics_used``, ``calibration_set``, ``method``, ``dust_corrected``...

    References
    ----------
    K20 §3.4, §4.2, eq. (1); FACTS.md §1.

    Examples
    --------
    >>> import xarray as xr
    >>> from klever_nb.calibrations import get_calibration
    >>> lines = ["Hbeta", "OIII_5007", "Halpha", "NII_6584"]
    >>> r3, n2 = (10 ** get_calibration(d).log_ratio(8.4) for d in ("R3", "N2"))
    >>> maps = xr.Dataset({"flux": ("line", [1.0, r3, 2.87, 2.87 * n2]),
    ...                    "flux_err": ("line", [0.01, 0.01, 0.01, 0.01])},
    ...                   coords={"line": lines})
    >>> round(float(metallicity_map(maps, diagnostics=["R3", "N2"])["oh"]), 2)
    8.4
    """
    chosen = _chosen_diagnostics(maps, diagnostics, redshift=redshift,
                                 calibration_set=calibration_set, method=method)
    spatial = _spatial_dims(maps)
    template = maps["flux"].isel(line=0, drop=True)
    shape = template.shape
    agn_like = _agn_like(maps, shape)
    agn = agn_like if exclude_agn else np.zeros(shape, dtype=bool)
    dust, ratio_kwargs = _dust_for_ratios(maps, chosen, dust_correction=dust_correction,
                                          ebv=ebv, ebv_err=ebv_err, min_snr_hbeta=min_snr_hbeta)
    log_r, log_r_err = _observed_ratio_stack(
        maps, chosen, shape, agn, ratio_kwargs, dust_correction=dust_correction,
        snr_min_strong=snr_min_strong, snr_min_weak=snr_min_weak)
    summary = _posterior_summary(log_r, log_r_err, chosen, shape, method=method,
                                 calibration_set=calibration_set, grid_step=grid_step,
                                 emcee_kwargs=emcee_kwargs, chunk_size=chunk_size,
                                 n_threads=n_threads)
    n_used, poor = _poor_fit(summary)
    out = xr.Dataset(_summary_variables(summary, n_used, poor, agn_like, agn, len(chosen),
                                        method=method, template=template, spatial=spatial))
    _add_ratios_and_dust(out, log_r, log_r_err, chosen, dust, template=template, spatial=spatial)
    out.attrs.update(
        diagnostics_used=",".join(chosen),
        calibration_set=calibration_set,
        method=method,
        grid_step=grid_step,
        snr_min_strong=snr_min_strong,
        snr_min_weak=snr_min_weak,
        dust_corrected=int(dust is not None),
        global_ebv=float(dust.attrs["global_ebv"]) if dust is not None else np.nan,
        references="K20 §3.4, §4.2, eq. (1); FACTS.md §1",
    )
    for key in ("pixel_scale_arcsec", "redshift", "wcs", "name"):
        if key in maps.attrs:
            out.attrs[key] = maps.attrs[key]
    return out


# ---------------------------------------------------------------------------
# Forward model (tests, notebooks, injection-recovery)
# ---------------------------------------------------------------------------


def predicted_line_fluxes(oh: np.ndarray | float, *, calibration_set: str = "C20",
                          hbeta: np.ndarray | float = 1.0, ebv: np.ndarray | float = 0.0,
                          oii_from: str = "O3O2", law: str = "CCM89", r_v: float = R_V
                          ) -> xr.DataArray:
    """Line fluxes that follow the calibrations exactly at 12+log(O/H) = ``oh``.

    Hbeta = ``hbeta``, Halpha = 2.87 Hbeta, [OIII]5007 from R3, [OIII]4959 =
    5007/OIII_RATIO, [NII]6584 from N2 (6548 = 6584/NII_RATIO), [SII] from S2
    (6717/6731 = :data:`~klever_nb.constants.SII_6717_6731`), [OII] from ``oii_from``
    ("O3O2" or "R2"; 3729/3727 = :data:`~klever_nb.constants.OII_3729_3727`),
    then reddened by ``ebv`` (CCM89). The calibrations are not mutually exact
    (O3O2 != R3 - R2), hence the choice.

    Returns
    -------
    xarray.DataArray
        Dims ``("line", *np.shape(oh))`` named ``dim_0...`` (rename as needed).

    References
    ----------
    FACTS.md §1.3, §5, §7; K20 §3.3.
    """
    from klever_nb.constants import (
        BALMER_INTRINSIC,
        LINES,
        NII_RATIO,
        OII_3729_3727,
        OIII_RATIO,
        SII_6717_6731,
    )
    from klever_nb.dust import k_lambda

    if oii_from not in ("O3O2", "R2"):
        raise ConfigError(f"oii_from={oii_from!r}: use 'O3O2' or 'R2'")
    oh = np.asarray(oh, dtype=float)
    shape = np.broadcast_shapes(oh.shape, np.shape(hbeta), np.shape(ebv))
    oh = np.broadcast_to(oh, shape)

    def ratio(name: str) -> np.ndarray:
        return 10.0 ** get_calibration(name, set_name=calibration_set).log_ratio(oh)

    hb = np.broadcast_to(np.asarray(hbeta, dtype=float), shape)
    ha = BALMER_INTRINSIC * hb
    o3 = ratio("R3") * hb
    oii = o3 / ratio("O3O2") if oii_from == "O3O2" else ratio("R2") * hb
    n2 = ratio("N2") * ha
    s2 = ratio("S2") * ha
    values = {
        "OII_3727": oii / (1 + OII_3729_3727), "OII_3729": oii * OII_3729_3727 / (1 + OII_3729_3727),
        "Hbeta": hb, "OIII_4959": o3 / OIII_RATIO, "OIII_5007": o3,
        "NII_6548": n2 / NII_RATIO, "Halpha": ha, "NII_6584": n2,
        "SII_6717": s2 * SII_6717_6731 / (1 + SII_6717_6731), "SII_6731": s2 / (1 + SII_6717_6731),
    }
    names = list(values)
    k = k_lambda(np.array([LINES[n].wave_vac for n in names]), law=law, r_v=r_v)
    ebv_arr = np.broadcast_to(np.asarray(ebv, dtype=float), shape)
    stacked = np.stack([values[n] * 10.0 ** (-0.4 * kk * ebv_arr) for n, kk in zip(
        names, k, strict=True)])
    dims = ("line", *[f"dim_{i}" for i in range(len(shape))])
    return xr.DataArray(stacked, dims=dims, coords={"line": names})


def global_metallicity(integrated: xr.Dataset, *, redshift: float | None = None,
                       diagnostics: Sequence[str] | None = None, calibration_set: str = "C20",
                       **kwargs) -> dict:
    """Global 12+log(O/H) from integrated (pseudo-fibre) fluxes, with the same machinery.

    ``integrated`` is a ``(line,)`` Dataset (``flux``, ``flux_err``). Keyword
    arguments go to :func:`metallicity_map` (AGN exclusion is off here: the BPT
    class of the integrated spectrum is reported instead). Returns the global
    fields of ``summary.json`` (DESIGN.md): ``global_oh``, ``global_oh_err``
    ([median - p16, p84 - median]), ``diagnostics``, plus ``global_oh_bimodal``,
    ``global_oh_at_edge``, ``bpt_class_n2`` and, when Halpha and Hbeta are present,
    the Balmer ``ebv`` and ``ebv_err`` of the integrated fluxes.

    References
    ----------
    K20 §3.1 (0.6" pseudo-fibre), §3.4, §4.1.
    """
    from klever_nb.bpt import bpt_classify
    from klever_nb.dust import balmer_ebv

    if [d for d in integrated["flux"].dims if d != "line"]:
        raise ConfigError("global_metallicity needs integrated fluxes on the 'line' dim only")
    kwargs.setdefault("exclude_agn", False)
    out = metallicity_map(integrated, diagnostics=diagnostics, calibration_set=calibration_set,
                          redshift=redshift, **kwargs)
    summary = {
        "global_oh": float(out["oh"]),
        "global_oh_err": [float(out["oh_err_lo"]), float(out["oh_err_hi"])],
        "diagnostics": [d for d in out.attrs["diagnostics_used"].split(",") if d],
        "global_oh_bimodal": bool(out["bimodal"]),
        "global_oh_at_edge": bool(out["at_edge"]),
        "bpt_class_n2": int(bpt_classify(integrated)["class_n2"]),
    }
    if all(n in integrated["line"].values for n in ("Halpha", "Hbeta")):
        dust = balmer_ebv(integrated)
        summary["ebv"] = float(dust["ebv"])
        summary["ebv_err"] = float(dust["ebv_err"])
    return summary

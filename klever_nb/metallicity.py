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

import contextlib
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import xarray as xr
from scipy import stats

from klever_nb.calibrations import Calibration, get_calibration
from klever_nb.constants import (
    BALMER_SNR,
    DETECTION_SNR,
    METALLICITY_SNR_STRONG,
    METALLICITY_SNR_WEAK,
    R_V,
)
from klever_nb.errors import ConfigError
from klever_nb.ratios import DIAGNOSTICS, get_diagnostic, observed_log_ratio

#: Default grid step in dex (brief: <= 0.001-0.002).
GRID_STEP = 0.001
#: Bimodality and edge criteria (see module docstring).
VALLEY_RATIO = 0.5
MIN_MODE_MASS = 0.05
EDGE_RATIO = 0.1
#: chi2_min above this upper-tail probability threshold marks a poor fit (ratios off every curve).
POOR_FIT_PVALUE = 1e-3
#: Default redshift above which O3O2 is used when [OII] is detected (K20 §4.2).
O3O2_MIN_REDSHIFT = 2.0
#: Detection threshold used to choose the diagnostics of a galaxy (K20 §3.1, §3.4: >= 3 sigma).
CHOICE_SNR = DETECTION_SNR


# ---------------------------------------------------------------------------
# Calibration helpers
# ---------------------------------------------------------------------------
def validity_range(diagnostics: Sequence[str], calibration_set: str = "C20") -> tuple[float, float]:
    """Intersection of the validity ranges of the calibrations used."""
    cals = [get_calibration(d, set_name=calibration_set) for d in diagnostics]
    lo, hi = max(c.oh_min for c in cals), min(c.oh_max for c in cals)
    if not hi > lo:
        raise ConfigError(f"calibrations {list(diagnostics)} of set {calibration_set!r} have no "
                          "common validity range")
    return lo, hi


def make_grid(diagnostics: Sequence[str], *, calibration_set: str = "C20",
              step: float = GRID_STEP) -> np.ndarray:
    """Uniform 12+log(O/H) grid over the common validity range, end points included."""
    if not 0 < step <= 0.01:
        raise ConfigError(f"grid_step={step}: use a step in (0, 0.01] dex")
    lo, hi = validity_range(diagnostics, calibration_set)
    n = int(round((hi - lo) / step)) + 1
    return np.linspace(lo, hi, n)


def calibrated_log_ratios(calibrations: Sequence[Calibration], oh: np.ndarray) -> np.ndarray:
    """log R_cal,i(x) of each calibration at the points ``oh``, shape (n_diag, n_points).

    The one evaluation of the calibration polynomials for eq. (1) (grid, emcee and the
    "mean_ratio" route alike): :meth:`klever_nb.calibrations.Calibration.log_ratio`.
    """
    x = np.ravel(np.asarray(oh, dtype=float))
    return np.array([c.log_ratio(x) for c in calibrations], dtype=float).reshape(
        len(calibrations), x.size)


def chi2_eq1(obs: np.ndarray, weight: np.ndarray, model: np.ndarray) -> np.ndarray:
    """K20 eq. (1): chi^2(x) = sum_i w_i (log R_obs,i - log R_cal,i(x))^2, w_i = 1/(s_obs^2 + s_cal^2).

    Parameters
    ----------
    obs, weight : ndarray, shape (..., n_diag)
        Observed log ratios and weights from :func:`_weights` (unusable ratios: weight 0).
    model : ndarray, shape (n_diag, n_points)
        :func:`calibrated_log_ratios` at the points where chi^2 is wanted.

    Returns
    -------
    ndarray, shape (..., n_points)
        chi^2 at every point for every pixel. :func:`posterior_grid` and the emcee
        log-probability call this; :func:`grid_summary` expands the same square into one
        matrix product (tested equal).
    """
    obs = np.asarray(obs, dtype=float)
    weight = np.asarray(weight, dtype=float)
    chi2 = np.zeros(obs.shape[:-1] + model.shape[1:])
    for d in range(model.shape[0]):
        chi2 += weight[..., d, None] * (obs[..., d, None] - model[d]) ** 2
    return chi2


def _model_table(diagnostics: Sequence[str], calibration_set: str, grid: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """log R_cal on the grid (n_diag, n_grid) and the intrinsic dispersions (n_diag,)."""
    cals = [get_calibration(d, set_name=calibration_set) for d in diagnostics]
    sigma = np.array([c.sigma for c in cals], dtype=float)
    return calibrated_log_ratios(cals, grid), sigma


def _weights(log_r_obs: np.ndarray, log_r_err: np.ndarray, sigma_cal: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """Observed values with NaN -> 0 and weights 1/(sigma_obs^2 + sigma_cal^2) (0 if unusable)."""
    usable = np.isfinite(log_r_obs) & np.isfinite(log_r_err)
    var = np.where(usable, log_r_err, 0.0) ** 2 + sigma_cal**2
    var = np.maximum(var, 1e-12)
    weight = np.where(usable, 1.0 / var, 0.0)
    return np.where(usable, log_r_obs, 0.0), weight


# ---------------------------------------------------------------------------
# Exact grid posterior
# ---------------------------------------------------------------------------
def _observations(log_r_obs, log_r_err, diagnostics: Sequence[str]
                  ) -> tuple[np.ndarray, np.ndarray, int]:
    """Observed log ratios and errors as float arrays whose last axis is the diagnostics."""
    obs_in = np.asarray(log_r_obs, dtype=float)
    err_in = np.asarray(log_r_err, dtype=float)
    n_diag = len(diagnostics)
    if obs_in.shape[-1] != n_diag or err_in.shape != obs_in.shape:
        raise ConfigError(f"log_r_obs/log_r_err last axis must have {n_diag} diagnostics")
    return obs_in, err_in, n_diag


def posterior_grid(log_r_obs: np.ndarray, log_r_err: np.ndarray, diagnostics: Sequence[str], *,
                   calibration_set: str = "C20", grid: np.ndarray) -> np.ndarray:
    """Normalised posterior density of 12+log(O/H) on ``grid`` for all pixels at once.

    Parameters
    ----------
    log_r_obs, log_r_err : ndarray, shape (..., n_diag)
        Observed log ratios and their 1-sigma errors (dex), NaN where unusable
        (that diagnostic is then dropped for that pixel).
    diagnostics : sequence of str
        Names of the n_diag diagnostics (last axis).
    calibration_set : str
        Registered calibration set (``"C20"``...).
    grid : ndarray, shape (n_grid,)
        Increasing 12+log(O/H) values (flat prior over [grid[0], grid[-1]]).

    Returns
    -------
    ndarray, shape (..., n_grid)
        Posterior density (per dex; trapezoid integral 1). All-NaN for pixels
        without any usable diagnostic. This is the plain reference; for whole
        maps use :func:`grid_summary` (chunked, never holds (n_pix, n_grid)).

    References
    ----------
    K20 §3.4, eq. (1); FACTS.md §1.3-1.4.
    """
    obs_in, err_in, n_diag = _observations(log_r_obs, log_r_err, diagnostics)
    lead = obs_in.shape[:-1]
    grid = np.asarray(grid, dtype=float)
    model, sigma = _model_table(diagnostics, calibration_set, grid)
    obs, weight = _weights(obs_in.reshape(-1, n_diag), err_in.reshape(-1, n_diag), sigma)
    chi2 = chi2_eq1(obs, weight, model)  # plain sum of eq. (1) terms (the reference twin)
    post = np.exp(-0.5 * (chi2 - chi2.min(axis=1, keepdims=True)))
    norm = np.trapezoid(post, grid, axis=1)
    post /= norm[:, None]
    post[~(weight > 0).any(axis=1)] = np.nan
    return post.reshape(*lead, grid.size)


def summarize_posterior(post: np.ndarray, grid: np.ndarray, *,
                        quantiles: Sequence[float] = (0.16, 0.5, 0.84),
                        valley_ratio: float = VALLEY_RATIO, min_mode_mass: float = MIN_MODE_MASS,
                        edge_ratio: float = EDGE_RATIO) -> dict[str, np.ndarray]:
    """Quantiles, bimodality and edge flags of posteriors on a grid, shape (..., n_grid).

    Quantiles interpolate the CDF of the trapezoid-integrated density linearly
    between grid nodes. Returns a dict with ``q16``, ``q50``, ``q84`` (for the
    default quantiles; keys ``f"q{100*q:g}"``), ``bimodal``, ``at_edge``, ``mode``.
    """
    post = np.asarray(post, dtype=float)
    lead = post.shape[:-1]
    flat = post.reshape(-1, post.shape[-1])
    out = _summarise_chunk(flat, np.asarray(grid, dtype=float), quantiles, valley_ratio,
                           min_mode_mass, edge_ratio)
    return {key: value.reshape(lead) for key, value in out.items()}


def _summarise_chunk(post: np.ndarray, grid: np.ndarray, quantiles: Sequence[float],
                     valley_ratio: float, min_mode_mass: float, edge_ratio: float, *,
                     clean: bool = False, mode_step: float = 0.005,
                     peak_index: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Core of the summaries on an (n, G) block of densities (any normalisation).

    ``clean=True`` promises finite densities with row maximum 1 (the fused path),
    skipping the checks. The bimodality test runs on every ``mode_step``-dex
    node (a valley between two significant modes is wider than that).
    """
    n = post.shape[0]
    if clean:
        valid = np.ones(n, dtype=bool)
        dens = post
    else:
        valid = np.isfinite(post).all(axis=1) & (np.nan_to_num(post).max(axis=1) > 0)
        dens = np.where(valid[:, None], post, 0.0)
        peak = dens.max(axis=1, keepdims=True)
        peak[peak == 0] = 1.0
        dens = dens / peak
    dx = np.diff(grid)
    cdf = np.empty_like(dens)
    cdf[:, 0] = 0.0
    mid = dens[:, 1:] + dens[:, :-1]
    uniform = bool(np.allclose(dx, dx[0], rtol=1e-9, atol=0.0)) if dx.size else True
    if not uniform:  # a constant factor cancels in the normalisation
        mid *= dx
    np.cumsum(mid, axis=1, out=cdf[:, 1:])
    del mid
    total = cdf[:, -1].copy()
    total[total == 0] = 1.0
    out: dict[str, np.ndarray] = {}
    rows = np.arange(n)
    step = 32 if grid.size > 64 else 1
    offsets = np.arange(step + 1)
    for q in quantiles:
        level = (q * total)[:, None]
        # first node with cdf >= level: coarse search every `step` nodes, then in the window
        below = np.count_nonzero(cdf[:, ::step] < level, axis=1)
        start = np.clip((below - 1) * step, 0, max(grid.size - 1 - step, 0))
        window = np.take_along_axis(cdf, start[:, None] + offsets[None, :grid.size], axis=1)
        idx = start + np.count_nonzero(window < level, axis=1)
        idx = np.clip(idx, 1, grid.size - 1)
        c0, c1 = cdf[rows, idx - 1] / total, cdf[rows, idx] / total
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(c1 > c0, (q - c0) / (c1 - c0), 0.5)
        value = grid[idx - 1] + np.clip(frac, 0.0, 1.0) * dx[idx - 1]
        out[f"q{100 * q:g}"] = np.where(valid, value, np.nan)
    stride = max(1, int(round(mode_step / float(np.mean(dx))))) if dx.size else 1
    coarse = np.ascontiguousarray(dens[:, ::stride])
    coarse_cdf = cdf[:, ::stride] / total[:, None]
    left = np.maximum.accumulate(coarse, axis=1)
    right = np.maximum.accumulate(coarse[:, ::-1], axis=1)[:, ::-1]
    np.minimum(left, right, out=left)
    left *= valley_ratio
    valley = coarse < left
    valley &= (coarse_cdf >= min_mode_mass) & (coarse_cdf <= 1.0 - min_mode_mass)
    out["bimodal"] = valid & valley.any(axis=1)
    out["at_edge"] = valid & (np.maximum(dens[:, 0], dens[:, -1]) >= edge_ratio)
    peak = np.argmax(dens, axis=1) if peak_index is None else peak_index
    out["mode"] = np.where(valid, grid[peak], np.nan)
    return out


def _single_threaded_blas():
    """Limit BLAS to one thread (threadpoolctl when installed; otherwise a no-op)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def grid_summary(log_r_obs: np.ndarray, log_r_err: np.ndarray, diagnostics: Sequence[str], *,
                 calibration_set: str = "C20", grid: np.ndarray, chunk_size: int = 2048,
                 n_threads: int = 2, valley_ratio: float = VALLEY_RATIO,
                 min_mode_mass: float = MIN_MODE_MASS, edge_ratio: float = EDGE_RATIO
                 ) -> dict[str, np.ndarray]:
    """Posterior summaries for many pixels, fused and chunked (fast path of :func:`posterior_grid`).

    chi^2 on the grid is one matrix product per chunk; chunks run on ``n_threads``
    threads (numpy releases the GIL), so memory stays ~ ``10 * chunk_size * n_grid``
    doubles; the densities are float32 after the float64 chi^2. Same maths as
    ``summarize_posterior(posterior_grid(...))`` (equal to ~1e-6 dex; tested to 1e-5).

    Returns
    -------
    dict
        ``oh`` (median), ``oh_lo``, ``oh_hi`` (16th/84th), ``mode``, ``chi2_min``,
        ``n_diagnostics``, ``bimodal``, ``at_edge``, ``no_diagnostic``; arrays of
        shape ``log_r_obs.shape[:-1]``.
    """
    obs_in, err_in, n_diag = _observations(log_r_obs, log_r_err, diagnostics)
    lead = obs_in.shape[:-1]
    grid = np.asarray(grid, dtype=float)
    model, sigma = _model_table(diagnostics, calibration_set, grid)
    obs, weight = _weights(obs_in.reshape(-1, n_diag), err_in.reshape(-1, n_diag), sigma)
    n_pix = obs.shape[0]
    n_used = (weight > 0).sum(axis=1)
    model_stack = np.ascontiguousarray(np.concatenate([model, model**2], axis=0))
    keys = ("oh", "oh_lo", "oh_hi", "mode", "chi2_min")
    result = {key: np.full(n_pix, np.nan) for key in keys}
    result["bimodal"] = np.zeros(n_pix, dtype=bool)
    result["at_edge"] = np.zeros(n_pix, dtype=bool)
    todo = np.flatnonzero(n_used > 0)

    def work(index: np.ndarray) -> None:
        # -chi2/2 up to a per-pixel constant as one matrix product:
        # sum_d w (o - M)^2 = sum_d w o^2 - 2 sum_d w o M + sum_d w M^2
        w, o = weight[index], obs[index]
        log_like = np.concatenate([w * o, -0.5 * w], axis=1) @ model_stack
        peak = log_like.argmax(axis=1)
        best = log_like[np.arange(peak.size), peak]
        chi2_min = np.sum(w * o**2, axis=1) - 2.0 * best
        log_like -= best[:, None]
        # float32 from here on: 1e-7 relative precision on a density normalised to peak 1
        # changes quantiles by ~1e-7 dex and halves the memory traffic (exp, cumsum)
        dens = log_like.astype(np.float32)
        np.exp(dens, out=dens)
        summary = _summarise_chunk(dens, grid, (0.16, 0.5, 0.84), valley_ratio,
                                   min_mode_mass, edge_ratio, clean=True, peak_index=peak)
        result["oh"][index] = summary["q50"]
        result["oh_lo"][index] = summary["q16"]
        result["oh_hi"][index] = summary["q84"]
        result["mode"][index] = summary["mode"]
        result["chi2_min"][index] = chi2_min
        result["bimodal"][index] = summary["bimodal"]
        result["at_edge"][index] = summary["at_edge"]

    chunks = [todo[i:i + chunk_size] for i in range(0, todo.size, chunk_size)]
    with _single_threaded_blas():  # we parallelise over chunks; BLAS threads would spin
        if n_threads > 1 and len(chunks) > 1:
            with ThreadPoolExecutor(max_workers=n_threads) as pool:
                list(pool.map(work, chunks))
        else:
            for chunk in chunks:
                work(chunk)
    result["n_diagnostics"] = n_used
    result["no_diagnostic"] = n_used == 0
    return {key: value.reshape(lead) for key, value in result.items()}


# ---------------------------------------------------------------------------
# emcee (the paper's method)
# ---------------------------------------------------------------------------
def _log_prob_factory(obs: np.ndarray, weight: np.ndarray, calibrations: Sequence[Calibration],
                      lo: float, hi: float):
    """ln p(x) = -chi^2(x)/2 of eq. (1) (:func:`chi2_eq1`) inside [lo, hi], -inf outside.

    ``obs``/``weight`` are one pixel's (n_diag,) arrays from :func:`_weights`; vectorised
    over walkers (theta of shape (n_walkers, 1)).
    """
    obs = np.asarray(obs, dtype=float)
    weight = np.asarray(weight, dtype=float)

    def log_prob(theta: np.ndarray) -> np.ndarray:
        x = np.asarray(theta, dtype=float)[:, 0]
        chi2 = chi2_eq1(obs, weight, calibrated_log_ratios(calibrations, x))
        inside = (x >= lo) & (x <= hi)
        return np.where(inside, -0.5 * chi2, -np.inf)

    return log_prob


def chain_summary(samples: np.ndarray, log_prob: np.ndarray, *, lo: float, hi: float,
                  valley_ratio: float = VALLEY_RATIO, min_mode_mass: float = MIN_MODE_MASS,
                  edge_ratio: float = EDGE_RATIO) -> dict[str, float | bool]:
    """Summaries and flags of one pixel from its emcee chain (the samples that were run).

    Quantiles are percentiles of the samples; ``mode`` is the sample of highest ln p
    (the chi^2 minimum under the flat prior) and ``chi2_min`` = -2 max ln p; ``bimodal``
    and ``at_edge`` apply the criteria of :func:`summarize_posterior` to a histogram of
    the samples on [lo, hi] (Freedman-Diaconis bin width, 10-400 bins).
    """
    flat = np.asarray(samples, dtype=float).ravel()
    logp = np.asarray(log_prob, dtype=float).ravel()
    q16, q50, q84 = np.percentile(flat, [16, 50, 84])
    best = int(np.argmax(logp))
    iqr = float(np.subtract(*np.percentile(flat, [75, 25])))
    width = 2.0 * iqr * flat.size ** (-1.0 / 3.0)
    n_bins = 10 if not width > 0 else int(np.clip(np.ceil((hi - lo) / width), 10, 400))
    counts, edges = np.histogram(flat, bins=n_bins, range=(lo, hi))
    centres = 0.5 * (edges[1:] + edges[:-1])
    flags = _summarise_chunk(counts[None, :].astype(float), centres, (0.5,), valley_ratio,
                             min_mode_mass, edge_ratio, mode_step=0.0)
    return {"oh": float(q50), "oh_lo": float(q16), "oh_hi": float(q84),
            "mode": float(flat[best]), "chi2_min": float(-2.0 * logp[best]),
            "bimodal": bool(flags["bimodal"][0]), "at_edge": bool(flags["at_edge"][0])}


def _emcee_one_pixel(args: tuple) -> tuple:
    (obs, weight, calibrations, lo, hi, nwalkers, nsteps, burn, seed, keep, criteria) = args
    import emcee

    rng = np.random.default_rng(seed)
    log_prob = _log_prob_factory(obs, weight, calibrations, lo, hi)
    start = rng.uniform(lo, hi, size=(nwalkers, 1))
    start = np.clip(start, lo + 1e-9, hi - 1e-9)
    sampler = emcee.EnsembleSampler(nwalkers, 1, log_prob, vectorize=True)
    sampler.random_state = np.random.RandomState(int(rng.integers(2**31))).get_state()
    sampler.run_mcmc(start, nsteps, progress=False)
    chain = sampler.get_chain(discard=burn)  # (steps, walkers, 1)
    with np.errstate(invalid="ignore", divide="ignore"):  # a chain that has not moved
        tau = float(emcee.autocorr.integrated_time(chain, tol=0, quiet=True)[0])
    converged = bool(np.isfinite(tau) and chain.shape[0] > 50 * tau)
    flat = chain[:, :, 0].ravel()
    summary = chain_summary(flat, sampler.get_log_prob(discard=burn).ravel(), lo=lo, hi=hi,
                            **criteria)
    acceptance = float(np.mean(sampler.acceptance_fraction))
    return summary, tau, converged, acceptance, (flat if keep else None)


def posterior_emcee(log_r_obs: np.ndarray, log_r_err: np.ndarray, diagnostics: Sequence[str], *,
                    calibration_set: str = "C20", nwalkers: int = 32, nsteps: int = 2000,
                    burn: int | None = None, seed: int = 0, n_processes: int = 1,
                    return_samples: bool = False, grid_range: tuple[float, float] | None = None,
                    valley_ratio: float = VALLEY_RATIO, min_mode_mass: float = MIN_MODE_MASS,
                    edge_ratio: float = EDGE_RATIO) -> dict[str, np.ndarray]:
    """Sample the eq. (1) posterior of each pixel with emcee (K20 §3.4), for comparison.

    One ensemble per pixel (``vectorize=True`` over walkers), pixels looped or
    spread over ``n_processes`` worker processes. Walkers start uniformly over
    the validity range (finite ln p by construction); the first ``burn`` steps
    (default nsteps // 5) are discarded; ``tau`` is the integrated
    autocorrelation time of the kept chain, and ``converged`` means kept steps
    > 50 tau (a short chain gives ``converged=False``, never an exception).
    ln p is :func:`chi2_eq1` on :func:`calibrated_log_ratios`, the functions of the
    grid posterior; every summary and flag comes from the chains (:func:`chain_summary`).

    Parameters
    ----------
    log_r_obs, log_r_err : ndarray, shape (..., n_diag)
        As for :func:`posterior_grid`.
    nwalkers : int
        Walkers per pixel (>= 2 ndim = 2; emcee's stretch move needs an even number >= 2).
    grid_range : (float, float), optional
        Prior range (default: the common validity range, as the grid).
    valley_ratio, min_mode_mass, edge_ratio : float
        Bimodality and edge criteria (module docstring), applied to the chains.

    Returns
    -------
    dict
        ``oh``, ``oh_lo``, ``oh_hi``, ``mode``, ``chi2_min``, ``bimodal``, ``at_edge``,
        ``n_diagnostics``, ``no_diagnostic``, ``tau``, ``converged``, ``acceptance``
        (shape ``log_r_obs.shape[:-1]``); ``samples`` (list of flat chains) if requested.

    References
    ----------
    K20 §3.4; emcee (Foreman-Mackey et al. 2013) autocorrelation guidance.
    """
    if nwalkers < 2 or nwalkers % 2:
        raise ConfigError(f"nwalkers={nwalkers}: use an even number >= 2 (2 x ndim)")
    obs_in, err_in, n_diag = _observations(log_r_obs, log_r_err, diagnostics)
    lead = obs_in.shape[:-1]
    cals = [get_calibration(d, set_name=calibration_set) for d in diagnostics]
    sigma = np.array([c.sigma for c in cals])
    lo, hi = grid_range if grid_range is not None else validity_range(diagnostics,
                                                                        calibration_set)
    obs, weight = _weights(obs_in.reshape(-1, n_diag), err_in.reshape(-1, n_diag), sigma)
    burn = nsteps // 5 if burn is None else burn
    criteria = {"valley_ratio": valley_ratio, "min_mode_mass": min_mode_mass,
                "edge_ratio": edge_ratio}
    n_pix = obs.shape[0]
    keys = ("oh", "oh_lo", "oh_hi", "mode", "chi2_min", "tau", "acceptance")
    out = {key: np.full(n_pix, np.nan) for key in keys}
    for key in ("converged", "bimodal", "at_edge"):
        out[key] = np.zeros(n_pix, dtype=bool)
    n_used = (weight > 0).sum(axis=1)
    todo = np.flatnonzero(n_used > 0)
    tasks = [(obs[i], weight[i], cals, lo, hi, nwalkers, nsteps, burn, seed + int(i),
              return_samples, criteria) for i in todo]
    if n_processes > 1 and len(tasks) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=n_processes) as pool:
            results = list(pool.map(_emcee_one_pixel, tasks, chunksize=max(1, len(tasks)
                                                                          // (4 * n_processes))))
    else:
        results = [_emcee_one_pixel(task) for task in tasks]
    samples: list[np.ndarray | None] = [None] * n_pix
    for i, (summary, tau, converged, acceptance, flat) in zip(todo, results, strict=True):
        for key, value in summary.items():
            out[key][i] = value
        out["tau"][i], out["converged"][i], out["acceptance"][i] = tau, converged, acceptance
        samples[i] = flat
    out["n_diagnostics"] = n_used
    out["no_diagnostic"] = n_used == 0
    final = {key: value.reshape(lead) for key, value in out.items()}
    if return_samples:
        final["samples"] = samples
    return final


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
    >>> from klever_nb.calibrations import Calibration, get_calibration
    >>> lines = ["Hbeta", "OIII_5007", "Halpha", "NII_6584"]
    >>> r3, n2 = (10 ** get_calibration(d).log_ratio(8.4) for d in ("R3", "N2"))
    >>> maps = xr.Dataset({"flux": ("line", [1.0, r3, 2.87, 2.87 * n2]),
    ...                    "flux_err": ("line", [0.01, 0.01, 0.01, 0.01])},
    ...                   coords={"line": lines})
    >>> round(float(metallicity_map(maps, diagnostics=["R3", "N2"])["oh"]), 2)
    8.4
    """
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
    spatial = _spatial_dims(maps)
    template = maps["flux"].isel(line=0, drop=True)
    shape = template.shape
    needs_dust = any(DIAGNOSTICS[d].dust_sensitive for d in chosen)
    do_dust = needs_dust if dust_correction is None else bool(dust_correction)
    if maps.attrs.get("dust_corrected", False):
        do_dust = False

    agn_like = _agn_like(maps, shape)
    agn = agn_like if exclude_agn else np.zeros(shape, dtype=bool)

    dust = None
    ratio_kwargs: dict = {}
    if do_dust and chosen:
        dust = dust_inputs(maps, ebv=ebv, ebv_err=ebv_err, min_snr_hbeta=min_snr_hbeta)
        ratio_kwargs = {"ebv": dust["ebv"], "ebv_err": dust["ebv_err"],
                        "ebv_from_balmer": dust["ebv_from_balmer"]}

    n_diag = len(chosen)
    log_r = np.full((*shape, n_diag), np.nan)
    log_r_err = np.full((*shape, n_diag), np.nan)
    for i, name in enumerate(chosen):
        # auto: only ratios of distant lines are corrected (K20 §3.4: R3, N2, S2 need none);
        # dust_correction=True corrects every ratio
        kwargs = ratio_kwargs if (dust_correction or DIAGNOSTICS[name].dust_sensitive) else {}
        value, error, usable = observed_log_ratio(
            maps, name, snr_min_strong=snr_min_strong, snr_min_weak=snr_min_weak, **kwargs)
        ok = usable.values & ~agn
        log_r[..., i] = np.where(ok, value.values, np.nan)
        log_r_err[..., i] = np.where(ok, error.values, np.nan)

    if n_diag == 0:
        nan = np.full(shape, np.nan)
        summary = {"oh": nan, "oh_lo": nan, "oh_hi": nan, "mode": nan, "chi2_min": nan,
                   "bimodal": np.zeros(shape, bool), "at_edge": np.zeros(shape, bool),
                   "n_diagnostics": np.zeros(shape, int), "no_diagnostic": np.ones(shape, bool)}
    elif method == "emcee":  # every summary and flag from the chains that were run
        summary = posterior_emcee(log_r, log_r_err, chosen, calibration_set=calibration_set,
                                  **dict(emcee_kwargs or {}))
    else:
        grid = make_grid(chosen, calibration_set=calibration_set, step=grid_step)
        summary = grid_summary(log_r, log_r_err, chosen, calibration_set=calibration_set,
                               grid=grid, chunk_size=chunk_size, n_threads=n_threads)

    n_used = np.asarray(summary["n_diagnostics"])
    with np.errstate(invalid="ignore"):
        dof = np.maximum(n_used - 1, 1)
        poor = (n_used > 0) & (stats.chi2.sf(np.nan_to_num(summary["chi2_min"]), dof)
                               < POOR_FIT_PVALUE)

    def var(values, long_name, units=None):
        attrs = {"long_name": long_name}
        if units:
            attrs["units"] = units
        return xr.DataArray(np.asarray(values).reshape(shape), dims=spatial,
                            coords=template.coords, attrs=attrs)

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
    out = xr.Dataset(data)
    if n_diag:
        out["log_ratio"] = xr.DataArray(np.moveaxis(log_r, -1, 0), dims=("diagnostic", *spatial),
                                        coords={"diagnostic": chosen, **template.coords},
                                        attrs={"units": dex, "long_name": "log10 ratio used"})
        out["log_ratio_err"] = xr.DataArray(np.moveaxis(log_r_err, -1, 0),
                                            dims=("diagnostic", *spatial),
                                            coords={"diagnostic": chosen, **template.coords},
                                            attrs={"units": dex})
    if dust is not None:
        out["ebv"] = dust["ebv"]
        out["ebv_err"] = dust["ebv_err"]
        out["ebv_from_balmer"] = dust["ebv_from_balmer"]
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

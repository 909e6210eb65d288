"""The eq. (1) posterior of 12+log(O/H): exact grid, fused summaries and emcee (K20 §3.4).

K20 eq. (1): chi^2(x) = sum_i (log R_obs,i - log R_cal,i(x))^2 / (sigma_obs,i^2 + sigma_cal,i^2)
with a flat prior over the calibrations' validity range. The parameter is
one-dimensional, so the posterior exp(-chi^2/2) is computed exactly on a fine
grid for every pixel at once (:func:`posterior_grid`; the fast fused path is
:func:`grid_summary`, checked against the former). The paper's emcee sampling is
:func:`posterior_emcee`; the two agree to Monte-Carlo noise. The calibration
polynomials are evaluated once (:func:`calibrated_log_ratios`) and chi^2 once
(:func:`chi2_eq1`) for the grid, the emcee log-probability and the radial profile's
"mean_ratio" route. In emcee every summary and flag of a pixel comes from its
chains (:func:`chain_summary`).

This is the engine behind :func:`klever_nb.metallicity.metallicity_map`, which
re-exports every public name here (``klever_nb.metallicity.grid_summary`` etc.);
the summaries and flags (``bimodal``, ``at_edge``) are described in
:mod:`klever_nb.metallicity`.

References: K20 §3.4, eq. (1); FACTS.md §1.3-1.4, §11.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from klever_nb.calibrations import Calibration, get_calibration
from klever_nb.errors import ConfigError

#: Default grid step in dex (brief: <= 0.001-0.002).
GRID_STEP = 0.001
#: Bimodality and edge criteria (see :mod:`klever_nb.metallicity`).
VALLEY_RATIO = 0.5
MIN_MODE_MASS = 0.05
EDGE_RATIO = 0.1


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
    """One pixel's emcee run: (chain summary, tau, converged, acceptance, flat chain or None)."""
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

"""Benchmark: exact grid posterior for a 200x200 map (3 diagnostics) vs emcee on a subset.

Prints one JSON object: grid time (best of N, warm), per-pixel emcee time and the
extrapolated full-map emcee time, and the largest |grid - emcee| differences of the
median and 16th/84th percentiles over unimodal pixels (target <= 0.01 dex), plus
peak memory of the grid run (tracemalloc).

Usage: python benchmarks/bench_metallicity.py [--n-side 200] [--n-emcee 40] [--processes 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import tracemalloc

import numpy as np
import xarray as xr

from klever_nb.calibrations import get_calibration
from klever_nb.metallicity import (
    grid_summary,
    make_grid,
    metallicity_map,
    posterior_emcee,
    predicted_line_fluxes,
)

DIAGS = ["R3", "N2", "S2"]


def mock_ratios(n_side: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Observed log ratios of a disc with a -0.05 dex/pixel-scale gradient, 5 % missing."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:n_side, :n_side]
    r = np.hypot(y - n_side / 2, x - n_side / 2) / (n_side / 2)
    truth = np.clip(8.7 - 0.6 * r, 7.7, 8.85)
    obs = np.stack([get_calibration(d).log_ratio(truth) for d in DIAGS], -1)
    err = rng.uniform(0.02, 0.15, obs.shape)
    obs = obs + rng.normal(size=obs.shape) * err
    obs[rng.random(obs.shape) < 0.05] = np.nan
    return truth, obs, err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-side", type=int, default=200)
    parser.add_argument("--n-emcee", type=int, default=40)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nwalkers", type=int, default=32)
    parser.add_argument("--nsteps", type=int, default=2500)
    args = parser.parse_args()

    truth, obs, err = mock_ratios(args.n_side)
    grid = make_grid(DIAGS, step=0.001)
    n_pix = truth.size

    grid_summary(obs[:4], err[:4], DIAGS, grid=grid)  # warm-up
    times = {}
    for threads in (1, 2):
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            summary = grid_summary(obs, err, DIAGS, grid=grid, n_threads=threads)
            runs.append(time.perf_counter() - t0)
        times[threads] = runs
    cpu_runs = []
    for _ in range(max(1, args.repeats // 2)):
        c0 = time.process_time()
        grid_summary(obs, err, DIAGS, grid=grid, n_threads=1)
        cpu_runs.append(time.process_time() - c0)
    tracemalloc.start()
    grid_summary(obs, err, DIAGS, grid=grid, n_threads=2)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    # the whole stage from line maps (ratios, SNR cuts, BPT, grid posterior, Dataset assembly)
    fluxes = predicted_line_fluxes(truth).rename(dim_0="y", dim_1="x")
    noise = fluxes / 30.0
    maps = xr.Dataset({"flux": fluxes + np.random.default_rng(3).normal(size=fluxes.shape)
                       * noise, "flux_err": noise})
    stage_runs = []
    for _ in range(max(1, args.repeats // 2)):
        t0 = time.perf_counter()
        metallicity_map(maps, diagnostics=DIAGS)
        stage_runs.append(time.perf_counter() - t0)

    # emcee on a random subset of unimodal pixels
    rng = np.random.default_rng(1)
    flat_obs, flat_err = obs.reshape(-1, 3), err.reshape(-1, 3)
    unimodal = np.flatnonzero(~summary["bimodal"].ravel() & ~summary["no_diagnostic"].ravel()
                              & ~summary["at_edge"].ravel())
    pick = rng.choice(unimodal, size=min(args.n_emcee, unimodal.size), replace=False)
    t0 = time.perf_counter()
    sampled = posterior_emcee(flat_obs[pick], flat_err[pick], DIAGS, nwalkers=args.nwalkers,
                              nsteps=args.nsteps, seed=2, n_processes=args.processes,
                              grid_range=(grid[0], grid[-1]))
    emcee_time = time.perf_counter() - t0
    diffs = {}
    for key in ("oh", "oh_lo", "oh_hi"):
        diffs[key] = float(np.max(np.abs(sampled[key] - summary[key].ravel()[pick])))
    per_pixel = emcee_time / pick.size
    grid_best = min(times[2])
    result = {
        "benchmark": "metallicity posterior",
        "n_pixels": n_pix,
        "diagnostics": DIAGS,
        "grid_points": int(grid.size),
        "grid_step_dex": 0.001,
        "cpu_count": os.cpu_count(),
        "grid_time_s_2threads_best": grid_best,
        "grid_time_s_2threads_median": float(np.median(times[2])),
        "grid_time_s_1thread_best": min(times[1]),
        "grid_cpu_time_s_1thread_best": min(cpu_runs),
        "load_average_1min": os.getloadavg()[0],
        "grid_peak_memory_mb": peak / 2**20,
        "metallicity_map_stage_time_s_best": min(stage_runs),
        "grid_bimodal_fraction": float(summary["bimodal"].mean()),
        "grid_recovery_median_abs_dev": float(np.nanmedian(np.abs(summary["oh"] - truth))),
        "emcee_pixels": int(pick.size),
        "emcee_nwalkers": args.nwalkers,
        "emcee_nsteps": args.nsteps,
        "emcee_processes": args.processes,
        "emcee_time_per_pixel_s": per_pixel,
        "emcee_full_map_extrapolated_s": per_pixel * n_pix,
        "emcee_over_grid_speed_ratio": per_pixel * n_pix / grid_best,
        "emcee_converged_fraction": float(sampled["converged"].mean()),
        "emcee_tau_median": float(np.median(sampled["tau"])),
        "max_abs_diff_median_dex": diffs["oh"],
        "max_abs_diff_p16_dex": diffs["oh_lo"],
        "max_abs_diff_p84_dex": diffs["oh_hi"],
        "agreement_ok": bool(max(diffs.values()) <= 0.01),
        "grid_time_ok": bool(grid_best <= 1.0),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

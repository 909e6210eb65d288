"""Benchmark of the batched line fitter against its per-spaxel scipy twin (prints one JSON).

A synthetic KMOS-like galaxy at z = 2.2 in three bands (YJ: [OII], [NeIII]; H: Hβ,
[OIII]; K: [OI], [NII], Hα, [SII]), 20×20 spaxels × 2048 channels each, rotating
disc (±150 km/s), σ = 60 km/s, Hα SNR from ~60 at the centre to < 1 at the edges,
OH-shaped noise, 1 % NaN spaxels. Reported:

- ``cube_3band_wall_s``: fit_cube over the three bands (best of ``--repeat``), the
  compiled kernel on 1 thread (default) and on 2 threads, and the pure-numpy path;
- ``cube_3band_cpu_s``: the process CPU time of that fit (on a shared machine the wall
  time also counts the time other processes hold the cores);
- ``batched_spaxels_per_s`` / ``reference_spaxels_per_s`` and their ratio (also in
  CPU time): the
  reference (:func:`klever_nb.fitting.fit_spectrum_reference`, one
  ``scipy.optimize.least_squares`` per spaxel) timed on a subset of every band;
- ``plain_loop_spaxels_per_s`` and ``speedup_vs_plain_loop``: the loop users write
  (:func:`plain_loop_fit`: one ``least_squares`` per spaxel from a data-driven start, no
  grid, no second pass) on a random subset of every band, timed in the same process;
- ``max_dflux_over_sigma`` / ``max_dv_over_sigma_v`` over the subset's SNR > 3 lines;
- peak memory of the batched fit (tracemalloc, numpy allocations) and the process's
  peak RSS.

Usage: ``python benchmarks/bench_linefit.py [--reference-per-band 30] [--repeat 3]``.

References
----------
FACTS.md §12 (speeds measured for this kind of fitter); K20 §3.1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
import tracemalloc

import numpy as np
import xarray as xr
from scipy.stats import norm

from klever_nb import constants, fitting, sky

Z = 2.2
SHAPE = (20, 20)
UNITS = "1e-20 erg/(s cm2 Angstrom)"
BAND_LINES = {
    "YJ": {"OII_3727": 0.45, "OII_3729": 0.6, "NeIII_3869": 0.1},
    "H": {"Hbeta": 0.3, "OIII_4959": 0.9 / constants.OIII_RATIO, "OIII_5007": 0.9},
    "K": {"OI_6300": 0.03, "NII_6548": 0.3 / constants.NII_RATIO, "Halpha": 1.0,
          "NII_6584": 0.3, "SII_6717": 0.12, "SII_6731": 0.09},
}


def synthetic_band(band: str, rng) -> xr.Dataset:
    b = constants.INSTRUMENTS["KMOS"].bands[band]
    wave_um = np.linspace(b.wave_min, b.wave_max, 2048)
    wave = wave_um * 1e4
    mid = 0.5 * (wave[1:] + wave[:-1])
    edges = np.concatenate([[2 * wave[0] - mid[0]], mid, [2 * wave[-1] - mid[-1]]])
    width = np.diff(edges)
    yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    r = np.hypot(yy - 9.7, xx - 10.2)
    v = (150 * np.tanh((xx - 10.2) / 3.0)).ravel()
    sig = np.full(v.size, 60.0)
    ha_flux = (400 * np.exp(-r / 3.0)).ravel()
    n = v.size
    spec = np.tile(0.3 + 0.02 * (wave_um - wave_um.mean()), (n, 1))
    sigma_inst = 1 / (b.resolving_power * fitting.FWHM_PER_SIGMA)
    for name, rel in BAND_LINES[band].items():
        lam0 = constants.LINES[name].wave_vac * (1 + Z)
        mu = lam0 * (1 + v / constants.C_KMS)
        s = lam0 * np.hypot(sig / constants.C_KMS, sigma_inst)
        cdf = norm.cdf((edges[None, :] - mu[:, None]) / s[:, None])
        spec += (rel * ha_flux)[:, None] * np.diff(cdf, axis=1) / width
    shape_noise = np.sqrt(1 + 30 * sky.sky_spectrum(wave_um, resolving_power=b.resolving_power))
    noise = np.tile(shape_noise, (n, 1))
    flux = spec + rng.standard_normal(spec.shape) * noise
    dead = rng.choice(n, size=max(1, n // 100), replace=False)
    flux[dead] = np.nan
    noise[dead] = np.nan
    cube = xr.Dataset(
        {"flux": (("wave", "y", "x"), flux.T.reshape(-1, *SHAPE), {"units": UNITS}),
         "noise": (("wave", "y", "x"), noise.T.reshape(-1, *SHAPE), {"units": UNITS})},
        coords={"wave": wave_um},
        attrs={"band": band, "instrument": "KMOS", "resolving_power": b.resolving_power,
               "pixel_scale_arcsec": 0.2})
    return cube


def plain_loop_fit(model, flux, noise) -> dict:
    """The loop users write today: one ``least_squares`` per spaxel, no grid, no second pass.

    A lean, vectorised model a competent user writes (all lines' pixel-integrated
    Gaussians from one ``erf`` call on the pixel edges, v and sigma tied per group,
    fixed doublet ratios folded in, other fluxes free, a linear continuum per segment),
    started from the data: v from the channel of the highest flux within the velocity
    range of the group's lines, sigma 60 km/s, fluxes and continuum from one linear solve
    there; scipy's default ``trf`` method and tolerances, 2-point Jacobian.
    """
    from scipy.optimize import least_squares
    from scipy.special import erf

    flux, noise = np.asarray(flux, float), np.asarray(noise, float)
    good = np.isfinite(flux) & np.isfinite(noise) & (noise > 0)
    n_g = len(model.groups)
    m_lines = model.combos[0][1]            # fixed ratios folded in, bounded pairs free
    n_f = m_lines.shape[1]
    if good.sum() <= n_f + model.n_cont + 2 * n_g:
        return {"ok": False}
    y, sig = flux[good], noise[good]
    lo_e, hi_e = model.edge_lo[good], model.edge_hi[good]
    width = model.width_int[good]
    basis = model.continuum_basis[good]
    grp = model.line_group
    c0, s_inst = model.centre, model.sigma_inst

    def profiles(theta):
        mu = c0 * (1 + theta[2 * grp] / fitting.C_KMS)
        s = np.sqrt((c0 * theta[2 * grp + 1] / fitting.C_KMS) ** 2 + s_inst ** 2) * np.sqrt(2)
        return 0.5 * (erf((hi_e - mu[:, None]) / s[:, None])
                      - erf((lo_e - mu[:, None]) / s[:, None])) / width

    def residuals(p):
        prof = m_lines.T @ profiles(p[:2 * n_g])
        return (y - p[2 * n_g:2 * n_g + n_f] @ prof - basis @ p[2 * n_g + n_f:]) / sig

    vlo, vhi = model.vel_bounds
    theta = np.tile([0.0, 60.0], n_g)
    wave = model.wave_aa[good]
    for gi in range(n_g):
        best = -np.inf
        for j in np.flatnonzero(grp == gi):
            dv = (wave / c0[j] - 1) * fitting.C_KMS
            near = (dv > vlo) & (dv < vhi)
            if near.any() and np.max(y[near]) > best:
                k = np.flatnonzero(near)[np.argmax(y[near])]
                best, theta[2 * gi] = y[k], dv[k]
    design = np.column_stack([(m_lines.T @ profiles(theta)).T, basis]) / sig[:, None]
    lin0 = np.linalg.lstsq(design, y / sig, rcond=None)[0]
    tlo, thi = model.theta_bounds()
    lower = np.concatenate([tlo, np.full(lin0.size, -np.inf)])
    upper = np.concatenate([thi, np.full(lin0.size, np.inf)])
    x0 = np.clip(np.concatenate([theta, lin0]), lower, upper)
    res = least_squares(residuals, x0, bounds=(lower, upper))
    return {"ok": bool(res.success), "theta": res.x[:2 * n_g],
            "flux": m_lines @ res.x[2 * n_g:2 * n_g + n_f]}


def fit_all(cubes, repeat: int, cpu: list | None = None) -> tuple[float, dict]:
    best, out = np.inf, {}
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = {band: fitting.fit_cube(cube, redshift=Z) for band, cube in cubes.items()}
        best = min(best, time.perf_counter() - t0)
        if cpu is not None:
            cpu.append(time.process_time() - c0)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-per-band", type=int, default=30)
    parser.add_argument("--plain-per-band", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    cubes = {band: synthetic_band(band, rng) for band in BAND_LINES}
    n_spaxels = sum(c.sizes["y"] * c.sizes["x"] for c in cubes.values())

    t0 = time.perf_counter()
    for cube in cubes.values():  # compile (or load the cached) numba kernels
        fitting.fit_cube(cube.isel(y=slice(0, 1), x=slice(0, 2)), redshift=Z)
    warmup = time.perf_counter() - t0

    fitting.kernel.NUMBA_THREADS = 1
    cpu: list = []
    wall_1, maps = fit_all(cubes, args.repeat, cpu)
    wall_2 = None
    if fitting.kernel.NUMBA_PARALLEL:  # KLEVER_NB_NUMBA_PARALLEL=1
        fitting.kernel.NUMBA_THREADS = 2
        wall_2, _ = fit_all(cubes, args.repeat)
        fitting.kernel.NUMBA_THREADS = 1
    fitting.kernel.USE_NUMBA = False
    wall_np, maps_np = fit_all(cubes, 1)
    fitting.kernel.USE_NUMBA = True
    numpy_vs_numba = max(float(np.nanmax(np.abs(maps_np[b].flux - maps[b].flux)
                                         / maps[b].flux_err)) for b in cubes)

    tracemalloc.start()
    fit_all(cubes, 1)
    peak_traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    # reference twin on a subset of every band (spaxels spread over the field)
    worst_f = worst_v = 0.0
    n_ref, n_compared = 0, 0
    t_ref = c_ref = 0.0
    for band, cube in cubes.items():
        ds = maps[band]
        picks = rng.choice(cube.sizes["y"] * cube.sizes["x"], size=args.reference_per_band,
                           replace=False)
        for k in picks:
            yy, xx = divmod(int(k), cube.sizes["x"])
            b = ds.isel(y=yy, x=xx)
            fallback = {}
            for name in b.line.values:
                if bool(b.kinematics_forced.sel(line=name)) and bool(b.fit_ok.sel(line=name)):
                    fallback[constants.LINES[str(name)].group] = (
                        float(b.velocity.sel(line=name)), float(b.sigma.sel(line=name)))
            t0, c0 = time.perf_counter(), time.process_time()
            ref = fitting.fit_spectrum_reference(cube.isel(y=yy, x=xx), redshift=Z,
                                                 fallback_kinematics=fallback or None)
            t_ref += time.perf_counter() - t0
            c_ref += time.process_time() - c0
            n_ref += 1
            sel = (b.snr > 3).values & np.isfinite(ref.flux_err.values)
            if not sel.any():
                continue
            n_compared += 1
            worst_f = max(worst_f, float(np.max(np.abs((b.flux - ref.flux) / ref.flux_err)
                                                .values[sel])))
            free = sel & ~b.kinematics_forced.values
            dv = np.abs((b.velocity - ref.velocity) / ref.velocity_err).values[free]
            if np.isfinite(dv).any():
                worst_v = max(worst_v, float(np.nanmax(dv)))
    # the plain loop users write, on a subset of every band (same spaxels drawn afresh)
    t_plain = c_plain = 0.0
    n_plain = 0
    for cube in cubes.values():
        model = fitting.build_band_model(
            cube.wave.values, redshift=Z, lines=None,
            resolving_power=cube.attrs["resolving_power"], settings=fitting.FitSettings(),
            angstrom_to_int=1.0)
        picks = rng.choice(cube.sizes["y"] * cube.sizes["x"], size=args.plain_per_band,
                           replace=False)
        for k in picks:
            yy, xx = divmod(int(k), cube.sizes["x"])
            spec = cube.isel(y=yy, x=xx, wave=model.channels)
            t0, c0 = time.perf_counter(), time.process_time()
            plain_loop_fit(model, spec.flux.values, spec.noise.values)
            t_plain += time.perf_counter() - t0
            c_plain += time.process_time() - c0
            n_plain += 1
    plain_rate = n_plain / t_plain
    batched_rate = n_spaxels / wall_1
    ref_rate = n_ref / t_ref
    not_converged = sum(int(m.attrs["n_not_converged"]) for m in maps.values())
    print(json.dumps({
        "cube": f"3 bands x {SHAPE[0]}x{SHAPE[1]} x 2048 (z = {Z}, KMOS YJ/H/K)",
        "n_spaxels": n_spaxels,
        "lines_per_band": {b: list(m.line.values) for b, m in maps.items()},
        "numba_warmup_s": round(warmup, 3),
        "cube_3band_wall_s": round(wall_1, 4),
        "cube_3band_cpu_s": round(min(cpu), 4),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "cube_3band_wall_s_numba_2_threads": None if wall_2 is None else round(wall_2, 4),
        "cube_3band_wall_s_pure_numpy": round(wall_np, 4),
        "pure_numpy_vs_numba_max_dflux_over_sigma": numpy_vs_numba,
        "batched_spaxels_per_s": round(batched_rate, 1),
        "reference_spaxels_per_s": round(ref_rate, 2),
        "plain_loop_spaxels_per_s": round(plain_rate, 2),
        "plain_loop_subset_spaxels": n_plain,
        "speedup_vs_plain_loop": round(batched_rate / plain_rate, 1),
        "speedup_vs_plain_loop_cpu_time": round((n_spaxels / min(cpu)) / (n_plain / c_plain), 1),
        "speedup_vs_reference": round(batched_rate / ref_rate, 1),
        "speedup_vs_reference_cpu_time": round((n_spaxels / min(cpu)) / (n_ref / c_ref), 1),
        "reference_subset_spaxels": n_ref,
        "reference_subset_with_snr_gt_3": n_compared,
        "max_dflux_over_sigma": worst_f,
        "max_dv_over_sigma_v": worst_v,
        "not_converged_spaxels": not_converged,
        "peak_memory_traced_mb": round(peak_traced / 2**20, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "targets": {"cube_3band_wall_s": "<= 1", "speedup_vs_reference": ">= 100",
                    "speedup_vs_plain_loop": "reported (issue 20: the honest ratio)",
                    "max_dflux_over_sigma": "<= 0.05", "max_dv_over_sigma_v": "<= 0.05"},
    }, indent=1))


if __name__ == "__main__":
    main()

"""Whole-process ``klever-nb fit`` on generated survey-size cubes (prints one JSON).

Two cubes are generated in a temporary folder (never committed), written plane by
plane so that generating them stays in bounded memory:

- ``kmos150``: a KMOS-style H-band cube, 150×150×2048 float32 ``DATA`` + ``NOISE``
  (σ = 1), a rotating disc at z = 1.4 with Hα, [NII], [SII] (one tied group);
- ``muse``: a MUSE-size cube, 300×300×3681 float32 with MUSE's conventions
  (``DATA`` + ``STAT`` variance, ``AWAV`` axis in Å with ``CD3_3`` = 1.25 Å from
  4749.9 Å, ``INSTRUME = MUSE``, ``10**(-20)`` BUNIT), the same lines at z = 0.3.

For each: ``klever-nb fit`` as a subprocess (imports, reading, fit, writing) timed
end to end, its peak RSS (``resource.getrusage(RUSAGE_CHILDREN)`` of a fresh
child per run), the same for ``--scheduler local --workers 2`` and ``--workers 1``;
and the plain loop users write (:func:`plain_loop_fit`: one
``scipy.optimize.least_squares`` per spaxel from a data-driven start) on a random
subset of the same cube in the same run. The load average is reported because the
machine is shared.

Usage: ``python benchmarks/bench_fit_cli.py [--skip-muse] [--plain-subset 150]``.

References
----------
Issue 20; FACTS.md §12.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy.special import ndtr

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

C_KMS = 299792.458
LINES = {  # vacuum rest wavelength (Å), flux relative to Hα
    "NII_6548": (6549.86, 0.3 / 2.94), "Halpha": (6564.61, 1.0), "NII_6584": (6585.27, 0.3),
    "SII_6717": (6718.29, 0.12), "SII_6731": (6732.67, 0.09),
}
FIT_LINES = ",".join(LINES)


def _edges(wave):
    mid = 0.5 * (wave[1:] + wave[:-1])
    return np.concatenate([[2 * wave[0] - mid[0]], mid, [2 * wave[-1] - mid[-1]]])


def write_cube(path: Path, kind: str, shape=None, seed: int = 0) -> dict:
    """Write a generated cube (``kind`` 'kmos' or 'muse'); returns its description."""
    rng = np.random.default_rng(seed)
    if kind == "kmos":
        ny, nx, nw = shape or (150, 150, 2048)
        z, r_power = 1.4, 4045.0
        wave_file = np.linspace(1.456, 1.846, nw)  # µm, vacuum
        wave_vac_aa = wave_file * 1e4
    else:
        ny, nx, nw = shape or (300, 300, 3681)
        z, r_power = 0.3, 3000.0
        wave_file = 4749.9 + 1.25 * np.arange(nw)  # Å, air
        n_air = 1 + 2.735182e-4 + 131.4182 / wave_file**2 + 2.76249e8 / wave_file**4
        wave_vac_aa = wave_file * n_air
    edges = _edges(wave_vac_aa)
    width = np.diff(edges)
    yy, xx = np.mgrid[0:ny, 0:nx]
    cy, cx = (ny - 1) / 2 + 0.3, (nx - 1) / 2 - 0.2
    scale = min(ny, nx) / 20.0
    r = np.hypot(yy - cy, xx - cx) / scale
    vel = (150 * np.tanh((xx - cx) / (3 * scale))).ravel()
    ha = (60 * np.exp(-r / 3.0)).ravel()     # Hα peak SNR ~ 60 per channel-integrated line
    sig = 60.0
    # the lines only touch a few hundred channels: model planes built per channel block
    data_hdr = fits.Header()
    bunit = "1e-20 erg/s/cm2/Angstrom" if kind == "kmos" else "10**(-20)*erg/s/cm**2/Angstrom"
    data_hdr.update({"BUNIT": bunit, "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN",
                     "CUNIT1": "deg", "CUNIT2": "deg", "CRVAL1": 150.0, "CRVAL2": 2.0,
                     "CRPIX1": nx / 2, "CRPIX2": ny / 2})
    pix_deg = (0.2 if kind == "kmos" else 0.2) / 3600
    if kind == "kmos":
        data_hdr.update({"CDELT1": -pix_deg, "CDELT2": pix_deg, "CTYPE3": "WAVE",
                         "CUNIT3": "um", "CRVAL3": wave_file[0], "CDELT3": wave_file[1] - wave_file[0],
                         "CRPIX3": 1.0})
    else:
        data_hdr.update({"CD1_1": -pix_deg, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": pix_deg,
                         "CTYPE3": "AWAV", "CUNIT3": "Angstrom", "CRVAL3": wave_file[0],
                         "CD3_3": 1.25, "CRPIX3": 1.0, "CD1_3": 0.0, "CD2_3": 0.0,
                         "CD3_1": 0.0, "CD3_2": 0.0})
    primary = fits.PrimaryHDU()
    primary.header["INSTRUME"] = "KMOS" if kind == "kmos" else "MUSE"
    if kind == "kmos":
        primary.header["HIERARCH ESO INS GRAT1 NAME"] = "H"
    noise_name = "NOISE" if kind == "kmos" else "STAT"
    primary.writeto(path, overwrite=True)
    sigma_noise = 1.0
    for name in ("DATA", noise_name):
        hdr = data_hdr.copy()
        if name == "STAT":
            hdr["BUNIT"] = "10**(-40)*(erg/s/cm**2/Angstrom)**2"
        hdu = fits.ImageHDU(data=None, header=hdr, name=name)
        hdu.header["BITPIX"] = -32
        hdu.header["NAXIS"] = 3
        hdu.header["NAXIS1"], hdu.header["NAXIS2"], hdu.header["NAXIS3"] = nx, ny, nw
        shdu = fits.StreamingHDU(str(path), hdu.header)
        block = max(1, int(2**25 // (ny * nx)))
        for c0 in range(0, nw, block):
            c1 = min(nw, c0 + block)
            if name == "DATA":
                plane = np.zeros((c1 - c0, ny * nx), dtype=np.float64)
                plane += 0.2  # flat continuum
                for lam_rest, rel in LINES.values():
                    lam0 = lam_rest * (1 + z)
                    s_aa = lam0 * np.hypot(sig / C_KMS, 1 / (r_power * 2.3548200450309493))
                    if edges[c1] < lam0 * (1 - 700 / C_KMS) - 8 * s_aa or \
                            edges[c0] > lam0 * (1 + 700 / C_KMS) + 8 * s_aa:
                        continue
                    mu = lam0 * (1 + vel / C_KMS)
                    prof = (ndtr((edges[c0 + 1:c1 + 1, None] - mu) / s_aa)
                            - ndtr((edges[c0:c1, None] - mu) / s_aa)) / width[c0:c1, None]
                    # integrated flux so that Hα's peak SNR is ~ha
                    plane += rel * ha * s_aa * 2.5066 * prof
                plane += sigma_noise * rng.standard_normal(plane.shape)
            else:
                value = sigma_noise if name == "NOISE" else sigma_noise**2
                plane = np.full((c1 - c0, ny * nx), value)
            shdu.write(plane.reshape(c1 - c0, ny, nx).astype(">f4"))
        shdu.close()
    return {"path": str(path), "kind": kind, "shape_wave_y_x": [nw, ny, nx], "redshift": z,
            "size_mb": round(path.stat().st_size / 2**20, 1)}


def run_cli(cube: Path, out: Path, redshift: float, extra=()) -> dict:
    """``klever-nb fit`` in a fresh child process: wall time, peak RSS, exit status."""
    code = ("import resource, subprocess, sys, time, json\n"
            "t0 = time.perf_counter()\n"
            "rc = subprocess.call(sys.argv[1:])\n"
            "dt = time.perf_counter() - t0\n"
            "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
            "print(json.dumps({'rc': rc, 'wall_s': dt, 'peak_rss_mb': ru.ru_maxrss / 1024,"
            " 'cpu_s': ru.ru_utime + ru.ru_stime}))\n")
    exe = str(Path(sys.executable).with_name("klever-nb"))
    cmd = [sys.executable, "-c", code, exe, "fit", str(cube), "--redshift", str(redshift),
           "--out", str(out), "--lines", FIT_LINES, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["load_average_1min"] = os.getloadavg()[0]
    if res["rc"] != 0:
        res["stderr"] = proc.stderr[-2000:]
    return res


def plain_loop_subset(cube_path: Path, redshift: float, n: int, seed: int) -> dict:
    """The plain per-spaxel least_squares loop on ``n`` random spaxels of the cube."""
    from bench_linefit import plain_loop_fit

    from klever_nb import fitting
    from klever_nb.io import open_cube

    cube = open_cube(cube_path, lazy=True)
    ny, nx = cube.sizes["y"], cube.sizes["x"]
    rng = np.random.default_rng(seed)
    picks = rng.choice(ny * nx, size=n, replace=False)
    model = fitting.build_band_model(
        cube.wave.values, redshift=redshift, lines=tuple(LINES),
        resolving_power=cube.attrs.get("resolving_power"), settings=fitting.FitSettings())
    spectra = []
    for k in picks:
        yy, xx = divmod(int(k), nx)
        spec = cube.isel(y=yy, x=xx, wave=model.channels)
        spectra.append((spec.flux.values, spec.noise.values))
    t0, c0 = time.perf_counter(), time.process_time()
    for flux, noise in spectra:
        plain_loop_fit(model, flux, noise)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"n": n, "wall_s": dt, "cpu_s": cpu, "spaxels_per_s": n / dt,
            "spaxels_per_cpu_s": n / cpu, "load_average_1min": os.getloadavg()[0]}


def fit_only(cube_path: Path, redshift: float) -> dict:
    """In-process ``fit_cube`` on the lazily read cube (numba warm): the fitter's own rate."""
    from klever_nb import fitting
    from klever_nb.io import open_cube

    cube = open_cube(cube_path, lazy=True)
    fitting.fit_cube(cube.isel(y=slice(0, 2), x=slice(0, 2)), redshift=redshift,
                     lines=tuple(LINES))
    n = cube.sizes["y"] * cube.sizes["x"]
    t0, c0 = time.perf_counter(), time.process_time()
    maps = fitting.fit_cube(cube, redshift=redshift, lines=tuple(LINES),
                            fallback_kinematics={"halpha": (0.0, 60.0)})
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "spaxels_per_s": n / wall,
            "spaxels_per_cpu_s": n / cpu, "n_not_converged": int(maps.attrs["n_not_converged"]),
            "n_halpha_detected": int(maps.detected.sel(line="Halpha").sum()),
            "load_average_1min": os.getloadavg()[0]}


def bench_cube(kind: str, tmp: Path, plain_n: int, seed: int, workers: bool) -> dict:
    t0 = time.perf_counter()
    info = write_cube(tmp / f"{kind}.fits", kind, seed=seed)
    info["generate_s"] = round(time.perf_counter() - t0, 1)
    cube = Path(info["path"])
    n_sp = info["shape_wave_y_x"][1] * info["shape_wave_y_x"][2]
    serial = run_cli(cube, tmp / "out_serial", info["redshift"])
    serial["spaxels_per_s"] = n_sp / serial["wall_s"]
    serial["peak_rss_over_cube_size"] = serial["peak_rss_mb"] / info["size_mb"]
    out = {"cube": info, "serial": serial}
    plain = plain_loop_subset(cube, info["redshift"], plain_n, seed)
    out["plain_loop_subset"] = plain
    out["fit_only_in_process"] = fit_only(cube, info["redshift"])
    out["end_to_end_speedup_vs_plain_loop"] = serial["spaxels_per_s"] / plain["spaxels_per_s"]
    # CPU-time ratio: robust to the other processes sharing the 2 cores
    out["end_to_end_speedup_vs_plain_loop_cpu"] = (n_sp / serial["cpu_s"]) / plain[
        "spaxels_per_cpu_s"]
    if workers:
        for n_w in (1, 2):
            res = run_cli(cube, tmp / f"out_dask{n_w}", info["redshift"],
                          ["--scheduler", "local", "--workers", str(n_w)])
            res["spaxels_per_s"] = n_sp / res["wall_s"]
            out[f"dask_{n_w}_workers"] = res
        out["dask_2_over_1_speedup"] = (out["dask_1_workers"]["wall_s"]
                                        / out["dask_2_workers"]["wall_s"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-muse", action="store_true")
    parser.add_argument("--no-dask", action="store_true")
    parser.add_argument("--plain-subset", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    report = {"load_average_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="klever_bench_") as tmpdir:
        tmp = Path(tmpdir)
        report["kmos150"] = bench_cube("kmos", tmp, args.plain_subset, args.seed,
                                       not args.no_dask)
        (tmp / "kmos.fits").unlink()
        if not args.skip_muse:
            report["muse"] = bench_cube("muse", tmp, max(20, args.plain_subset // 3),
                                        args.seed, not args.no_dask)
    report["load_average_end"] = os.getloadavg()
    report["self_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(report, indent=1, default=float))


if __name__ == "__main__":
    main()

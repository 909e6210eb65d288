"""Benchmark of ``klever-nb sample`` (issue 16): a mock survey end to end; prints/writes JSON.

A survey of ``--n`` mock galaxies (default 40; mixed lensed (SIS, μ ~ 2–10) and unlensed,
z in the K20 windows 1.2–1.6 and 2.0–2.5, KMOS YJ/H/K, 20×20 spaxels, forward gradient off)
is written once, then run:

1. on a local dask cluster of ``--workers`` (default 2) single-threaded processes
   (``sample_run.run_sample(scheduler="local")``): wall time, time per galaxy, statuses;
2. serially in this process on the first ``--serial`` galaxies (default: all) into a
   separate folder: time per galaxy; the dask speed-up is serial time per galaxy × N / dask
   wall time;
3. a rerun of the dask survey (every galaxy resumed): the resume overhead.

Peak RSS of the whole run (this process + every child, sampled every 0.2 s with psutil) is
reported for each phase. Targets (issue 16): ≤ 5 min for 40 galaxies on 2 cores, ≤ 2 GB.
Run: ``nice python benchmarks/bench_sample.py [--n 40] [--serial 8] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from klever_nb import __version__, mock, sample_run
from klever_nb.io import mockfiles
from klever_nb.lensmodels import ParametricLens

RESULTS = Path(__file__).resolve().parent / "results"


def survey_specs(n: int, seed: int = 0) -> list[mock.MockSpec]:
    """``n`` mock galaxies: every other one lensed by an SIS, z in the K20 windows."""
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(n):
        z = rng.uniform(1.2, 1.6) if i % 4 < 2 else rng.uniform(2.0, 2.5)
        lensed = i % 2 == 1
        lens = (ParametricLens(({"type": "SIS", "theta_e": float(rng.uniform(0.6, 1.0)),
                                 "center_x": 0.0, "center_y": 0.0},)) if lensed else None)
        offset = (float(rng.uniform(1.2, 1.8)), float(rng.uniform(-0.3, 0.3))) if lensed \
            else (0.0, 0.0)
        specs.append(mock.MockSpec(
            name=f"survey{i:03d}-{'lensed' if lensed else 'field'}", redshift=round(z, 4),
            shape=(20, 20), halpha_flux=float(10 ** rng.uniform(-16.7, -16.2)),
            scale_length_kpc=float(rng.uniform(1.0, 2.0)),
            inclination_deg=float(rng.uniform(20, 60)), pa_deg=float(rng.uniform(0, 180)),
            centre_offset_arcsec=offset, central_oh=float(rng.uniform(8.3, 8.5)),
            gradient_dex_per_kpc=float(rng.uniform(-0.05, 0.03)), ebv=float(rng.uniform(0.1, 0.3)),
            lens=lens, z_lens=0.4 if lensed else None, snr_halpha_peak=25.0, seed=seed + i,
            log_mstar=round(float(rng.uniform(9.0, 10.5)), 2), lens_map_size_arcsec=6.0))
    return specs


def write_survey(root: Path, specs: list[mock.MockSpec]) -> Path:
    names = []
    for spec in specs:
        toml = mockfiles.write_mock(mock.make_mock(spec), root / spec.name)
        toml.write_text(toml.read_text() + "\n[analysis]\nforward_gradient = false\n")
        names.append(f'"{spec.name}/galaxy.toml"')
    sample = root / "sample.toml"
    sample.write_text("galaxies = [" + ", ".join(names) + "]\n")
    return sample


class PeakRSS:
    """Peak of (this process + children) RSS, sampled in a thread."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _total(self) -> int:
        total = 0
        for p in [self._proc, *self._proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except Exception:  # a child that just ended
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._total())


def _phase(fn) -> tuple[float, float, object]:
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        result = fn()
        wall = time.perf_counter() - t0
    return wall, rss.peak / 2**20, result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40, help="galaxies in the survey")
    parser.add_argument("--workers", type=int, default=2, help="local dask workers")
    parser.add_argument("--serial", type=int, default=None,
                        help="galaxies run serially for the speed-up (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: temp)")
    parser.add_argument("--json", type=Path, default=None,
                        help="write the result here (default: benchmarks/results/sample[_N].json)")
    args = parser.parse_args(argv)
    work = args.out or Path(tempfile.mkdtemp(prefix="bench_sample_"))
    t0 = time.perf_counter()
    specs = survey_specs(args.n)
    sample = write_survey(work / "inputs", specs)
    t_mocks = time.perf_counter() - t0

    wall_dask, rss_dask, res = _phase(lambda: sample_run.run_sample(
        sample, work / "dask", scheduler="local", workers=args.workers, progress=False))
    statuses = {s: sum(r["status"] == s for r in res.rows) for s in sample_run.STATUSES}
    per_galaxy = [r["seconds"] for r in res.rows if r["status"] == "done"]
    wall_resume, rss_resume, res2 = _phase(lambda: sample_run.run_sample(
        sample, work / "dask", scheduler="local", workers=args.workers, progress=False))

    n_serial = args.n if args.serial is None else min(args.serial, args.n)
    serial_sample = work / "inputs" / "serial.toml"
    serial_sample.write_text("galaxies = [" + ", ".join(
        f'"{s.name}/galaxy.toml"' for s in specs[:n_serial]) + "]\n")
    wall_serial, rss_serial, res3 = _phase(lambda: sample_run.run_sample(
        serial_sample, work / "serial", progress=False))
    serial_per_galaxy = wall_serial / max(n_serial, 1)
    out = {
        "benchmark": "bench_sample", "klever_nb_version": __version__,
        "n_galaxies": args.n, "n_lensed": sum(s.lens is not None for s in specs),
        "workers": args.workers, "cpu_count": os.cpu_count(),
        "mock_writing_s": round(t_mocks, 1),
        "dask": {"wall_s": round(wall_dask, 1), "per_galaxy_wall_s": round(wall_dask / args.n, 2),
                 "per_galaxy_task_s_median": round(float(np.median(per_galaxy)), 2)
                 if per_galaxy else None,
                 "per_galaxy_task_s_max": round(float(np.max(per_galaxy)), 2)
                 if per_galaxy else None,
                 "peak_rss_mb": round(rss_dask), "statuses": statuses,
                 "errors": [f"{r['name']}: {r['error']}" for r in res.failed]},
        "resume": {"wall_s": round(wall_resume, 1), "peak_rss_mb": round(rss_resume),
                   "resumed": sum(r["status"] == "resumed" for r in res2.rows)},
        "serial": {"n_galaxies": n_serial, "wall_s": round(wall_serial, 1),
                   "per_galaxy_s": round(serial_per_galaxy, 2), "peak_rss_mb": round(rss_serial),
                   "failed": len(res3.failed)},
        "dask_speedup": round(serial_per_galaxy * args.n / wall_dask, 2),
        "targets": {"wall_s_40_galaxies": 300, "peak_rss_mb": 2048},
        "note": "shared 2-core machine (other developers' jobs running): wall times are upper "
                "bounds; run with nice",
    }
    text = json.dumps(out, indent=2)
    print(text)
    dest = args.json or RESULTS / ("sample.json" if args.n == 40 else f"sample_n{args.n}.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()

"""Run a sample of galaxies: validate all first, run the valid ones, report every failure.

``klever-nb sample SAMPLE.toml --out DIR`` (and :func:`klever_nb.pipeline.run_sample`) call
:func:`run_sample`. Its contract (issue 16, DESIGN.md "Command line"):

- every galaxy file is validated before anything runs, and **every** problem is collected
  (one line each), not only the first;
- the valid galaxies run (in this process, or on a dask cluster); a galaxy that raises is
  recorded with ``status = "failed"`` and its one-line error, and the others go on;
- a dask cluster started here is always closed (``try/finally``), also on Ctrl-C / SIGTERM;
- a finished galaxy leaves a done-marker ``DIR/<name>/done.json`` holding the content hash
  of its inputs (every input file's SHA-256, its settings, the package version); a rerun
  skips a galaxy whose marker matches (``status = "resumed"``) without even opening its
  cubes. Each product and the marker are written atomically, so a killed run leaves no
  half-written file (stale temporary files of a killed worker are removed on the next run);
- the sample table ``DIR/sample.csv`` and ``DIR/sample.nc`` has one row per galaxy with
  ``status``, ``error`` and every scalar field of its ``summary.json`` (units in the CSV
  header comment and in the netCDF variable attrs).
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from klever_nb import __version__
from klever_nb.config import GalaxyConfig, load_galaxy, load_sample
from klever_nb.errors import KleverError
from klever_nb.io import write_json, write_netcdf, write_text

#: Name of the per-galaxy done-marker.
DONE_MARKER = "done.json"

#: Status values of the sample table.
STATUSES = ("done", "resumed", "invalid", "failed")

#: Units of the summary fields (astropy strings; "" = dimensionless). Columns not listed
#: have no unit (flags, names, counts).
UNITS: dict[str, str] = {
    "redshift": "", "halpha_fibre_flux": "1e-20 erg / (s cm2)",
    "halpha_fibre_flux_err": "1e-20 erg / (s cm2)", "halpha_flux": "erg / (s cm2)",
    "halpha_flux_err": "erg / (s cm2)", "sfr": "solMass / yr", "sfr_err": "solMass / yr",
    "ebv": "mag", "ebv_err": "mag", "ebv_raw": "mag", "ebv_raw_err": "mag",
    "global_oh": "dex", "global_oh_err_lo": "dex", "global_oh_err_hi": "dex",
    "central_oh": "dex", "central_oh_err": "dex", "central_forward_oh": "dex",
    "planar_central_oh": "dex", "planar_central_oh_err": "dex",
    "gradient_dex_per_kpc": "dex / kpc", "gradient_err": "dex / kpc",
    "gradient_sys_err": "dex / kpc", "gradient_forward_dex_per_kpc": "dex / kpc",
    "gradient_forward_err": "dex / kpc", "planar_gradient_dex_per_kpc": "dex / kpc",
    "planar_gradient_err": "dex / kpc", "planar_gradient_x": "dex / kpc",
    "planar_gradient_x_err": "dex / kpc", "planar_gradient_y": "dex / kpc",
    "planar_gradient_y_err": "dex / kpc", "planar_direction_deg": "deg",
    "planar_direction_err_deg": "deg", "r_max_kpc": "kpc", "r_max_edge_kpc": "kpc",
    "psf_hwhm_size_kpc": "kpc", "source_psf_fwhm_kpc_major": "kpc",
    "source_psf_fwhm_kpc_minor": "kpc", "source_psf_theta_deg": "deg",
    "source_psf_pa_deg_east_of_north": "deg", "source_psf_fwhm_arcsec": "arcsec",
    "centre_kpc_x": "kpc", "centre_kpc_y": "kpc", "shift_arcsec_x": "arcsec",
    "shift_arcsec_y": "arcsec", "hst_shift_arcsec_x": "arcsec", "hst_shift_arcsec_y": "arcsec",
    "non_axisymmetry_azimuthal_rms_dex": "dex", "non_axisymmetry_expected_rms_dex": "dex",
    "prop_log_mstar": "dex(solMass)", "prop_log_mstar_err": "dex", "seconds": "s",
}

#: Names of the components of list-valued summary fields (others get _0, _1, ...).
_LIST_PARTS = {"global_oh_err": ("lo", "hi"), "source_psf_fwhm_kpc": ("major", "minor"),
               "centre_kpc": ("x", "y"), "shift_arcsec": ("x", "y"),
               "hst_shift_arcsec": ("x", "y")}


@dataclass
class SampleResult:
    """What :func:`run_sample` did: one row per galaxy and the files written."""

    rows: list[dict[str, Any]]
    problems: list[str] = field(default_factory=list)
    csv: Path | None = None
    netcdf: Path | None = None

    @property
    def failed(self) -> list[dict[str, Any]]:
        """Rows of galaxies that are invalid or raised."""
        return [r for r in self.rows if r["status"] in ("invalid", "failed")]

    @property
    def summaries(self) -> dict[str, Path]:
        """``{name: summary.json}`` of the galaxies that finished (now or before)."""
        return {r["name"]: Path(r["summary_path"]) for r in self.rows
                if r["status"] in ("done", "resumed")}


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------
def _guess_name(path: Path) -> str:
    return path.parent.name if path.name == "galaxy.toml" else path.stem


def validate_sample(sample_path: str | Path) -> tuple[list[GalaxyConfig], list[dict[str, Any]]]:
    """Validate every galaxy of a sample file; return (valid configs, invalid rows).

    A broken *sample* file raises :class:`~klever_nb.errors.ConfigError`; a broken galaxy
    file becomes a row ``{"name", "config_path", "status": "invalid", "error"}``, so that
    every problem is listed at once. Two galaxies with the same ``name`` (they would write
    the same product folder) are both invalid.
    """
    paths = load_sample(sample_path)
    valid: list[GalaxyConfig] = []
    invalid: list[dict[str, Any]] = []
    for path in paths:
        try:
            valid.append(load_galaxy(path))
        except KleverError as err:
            invalid.append({"name": _guess_name(path), "config_path": str(path),
                            "status": "invalid", "error": str(err)})
    names: dict[str, list[GalaxyConfig]] = {}
    for cfg in valid:
        names.setdefault(cfg.name, []).append(cfg)
    for name, cfgs in names.items():
        if len(cfgs) > 1:
            others = ", ".join(str(c.path) for c in cfgs)
            for cfg in cfgs:
                invalid.append({"name": name, "config_path": str(cfg.path), "status": "invalid",
                                "error": f"{cfg.path}: name = {name!r} is used by several "
                                         f"galaxies ({others}); names must be unique"})
            valid = [c for c in valid if c.name != name]
    return valid, invalid


# ---------------------------------------------------------------------------
# Resume: content hash and done-marker
# ---------------------------------------------------------------------------
def galaxy_hash(cfg: GalaxyConfig, method: str | None = None) -> str:
    """Content hash of a galaxy's inputs, settings (with a ``method`` override) and the package
    version: :func:`klever_nb.pipeline.galaxy_hash` of the configuration ``run`` will use."""
    from klever_nb import pipeline

    if method is not None:
        cfg = replace(cfg, analysis=replace(cfg.analysis, method=method))
    return pipeline.galaxy_hash(cfg)


def marker_path(out_dir: str | Path, name: str) -> Path:
    """``OUT/<name>/done.json``."""
    return Path(out_dir) / name / DONE_MARKER


def is_done(cfg: GalaxyConfig, out_dir: str | Path, digest: str | None = None,
            method: str | None = None) -> bool:
    """True when the galaxy's done-marker matches its current inputs and its summary exists."""
    marker = marker_path(out_dir, cfg.name)
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    digest = digest or galaxy_hash(cfg, method)
    return info.get("hash") == digest and (Path(out_dir) / cfg.name / "summary.json").is_file()


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete ``.<file>.*.tmp`` left by a killed writer (klever_nb.io.atomic_path)."""
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    text = text[0] if text else ""
    if isinstance(err, KleverError):
        return text
    frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    where = f" ({Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"{type(err).__name__}: {text}{where}"


def run_one(config_path: str | Path, out_dir: str | Path, *, force: bool = False,
            method: str | None = None) -> dict[str, Any]:
    """Run one galaxy unless its done-marker is current; never raises (except interrupts).

    Returns a row ``{"name", "config_path", "status", "error", "summary_path", "seconds"}``
    with ``status`` ``"done"``, ``"resumed"`` or ``"failed"``.
    """
    from klever_nb import pipeline

    t0 = time.perf_counter()
    row: dict[str, Any] = {"name": _guess_name(Path(config_path)),
                           "config_path": str(config_path), "status": "failed", "error": "",
                           "summary_path": "", "seconds": np.nan}
    try:
        cfg = load_galaxy(config_path)
        row["name"] = cfg.name
        folder = Path(out_dir) / cfg.name
        digest = galaxy_hash(cfg, method)
        if not force and is_done(cfg, out_dir, digest):
            row.update(status="resumed", summary_path=str(folder / "summary.json"), seconds=0.0)
            return row
        _remove_stale_temporaries(folder)
        marker_path(out_dir, cfg.name).unlink(missing_ok=True)
        summary = pipeline.run_galaxy(config_path, out_dir, force=force, progress=False,
                                      method=method)
        seconds = time.perf_counter() - t0
        write_json({"hash": digest, "klever_nb_version": __version__, "seconds": seconds,
                    "summary": str(summary)}, marker_path(out_dir, cfg.name))
        row.update(status="done", summary_path=str(summary), seconds=seconds)
    except Exception as err:  # a failing galaxy is reported; the sample goes on
        row.update(status="failed", error=_one_line(err), seconds=time.perf_counter() - t0)
    return row


# ---------------------------------------------------------------------------
# The sample table
# ---------------------------------------------------------------------------
def _flatten_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """Scalar columns of a summary: scalars as they are, short numeric lists split into
    named components, string lists joined with commas, ``properties`` as ``prop_<key>``."""
    out: dict[str, Any] = {}
    for key, value in summary.items():
        if key in ("settings", "versions"):
            continue
        if key == "properties" and isinstance(value, dict):
            out.update({f"prop_{k}": v for k, v in value.items()
                        if isinstance(v, int | float | bool | str)})
        elif value is None:
            out[key] = np.nan
        elif isinstance(value, bool | int | float | str):
            out[key] = value
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            out[key] = ",".join(value)
        elif (isinstance(value, list) and 0 < len(value) <= 4
              and all(isinstance(v, int | float) or v is None for v in value)):
            parts = _LIST_PARTS.get(key, tuple(str(i) for i in range(len(value))))
            for part, v in zip(parts, value, strict=False):
                out[f"{key}_{part}"] = np.nan if v is None else v
    return out


def _column_kind(values: list[Any]) -> str:
    present = [v for v in values if not (isinstance(v, float) and np.isnan(v))]
    if present and all(isinstance(v, bool) for v in present):
        return "bool"
    if present and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return "float"
    return "str"


def sample_table(rows: Iterable[dict[str, Any]]) -> dict[str, list[Any]]:
    """Columns (``{column: values}``) of the sample table from runner rows.

    Each finished row is merged with the scalar fields of its ``summary.json``.
    """
    merged: list[dict[str, Any]] = []
    for row in rows:
        full = dict(row)
        path = row.get("summary_path")
        if row["status"] in ("done", "resumed") and path and Path(path).is_file():
            summary = json.loads(Path(path).read_text())
            flat = _flatten_summary(summary)
            flat.pop("config_path", None)
            full.update({k: v for k, v in flat.items() if k not in ("name",)})
        merged.append(full)
    first = ["name", "status", "error", "redshift", "lensed"]
    keys: list[str] = [k for k in first if any(k in m for m in merged)]
    for m in merged:
        keys += [k for k in m if k not in keys]
    columns: dict[str, list[Any]] = {}
    for key in keys:
        values = [m.get(key, np.nan) for m in merged]
        kind = _column_kind(values)
        if kind == "float":
            columns[key] = [float(v) if isinstance(v, int | float) else np.nan for v in values]
        elif kind == "bool":
            columns[key] = [v if isinstance(v, bool) else None for v in values]
        else:
            columns[key] = ["" if (isinstance(v, float) and np.isnan(v)) else str(v)
                            for v in values]
    return columns


def _csv_text(columns: dict[str, list[Any]]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    buffer.write(f"# klever_nb {__version__} sample table: one row per galaxy; status is one "
                 f"of {', '.join(STATUSES)}\n")
    units = [f"{k}={UNITS[k]}" for k in columns if UNITS.get(k)]
    buffer.write("# units: " + "; ".join(units) + "\n")
    writer = csv.writer(buffer, lineterminator="\n")
    keys = list(columns)
    writer.writerow(keys)
    n = len(next(iter(columns.values()))) if columns else 0
    for i in range(n):
        out = []
        for k in keys:
            v = columns[k][i]
            if v is None or (isinstance(v, float) and np.isnan(v)):
                out.append("")
            elif isinstance(v, float):
                out.append(repr(v))
            else:
                out.append(v)
        writer.writerow(out)
    return buffer.getvalue()


def _dataset(columns: dict[str, list[Any]]):
    import xarray as xr

    names = columns.get("name", [])
    data_vars = {}
    for key, values in columns.items():
        if key == "name":
            continue
        if values and all(isinstance(v, bool) or v is None for v in values) and \
                any(isinstance(v, bool) for v in values):
            arr = np.array([np.nan if v is None else float(v) for v in values])
            attrs = {"kind": "boolean stored as 1/0 (NaN: absent)"}
        elif values and all(isinstance(v, float) for v in values):
            arr, attrs = np.asarray(values, dtype=float), {}
        else:
            arr, attrs = np.asarray([str(v) for v in values], dtype=object), {}
        if UNITS.get(key):
            attrs["units"] = UNITS[key]
        data_vars[key] = ("galaxy", arr, attrs)
    ds = xr.Dataset(data_vars, coords={"galaxy": np.asarray(names, dtype=object)})
    ds.attrs.update({"title": "klever_nb sample table", "klever_nb_version": __version__,
                     "statuses": ",".join(STATUSES)})
    return ds


def write_sample_table(rows: list[dict[str, Any]], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``OUT/sample.csv`` and ``OUT/sample.nc`` (atomically); return their paths."""
    out_dir = Path(out_dir)
    columns = sample_table(rows)
    csv_path = write_text(_csv_text(columns), out_dir / "sample.csv")
    nc_path = write_netcdf(_dataset(columns), out_dir / "sample.nc")
    return csv_path, nc_path


def read_sample_table(path: str | Path):
    """Read ``sample.csv`` (or ``sample.nc``) back as a :class:`pandas.DataFrame`."""
    import pandas as pd

    path = Path(path)
    if path.is_dir():
        path = path / "sample.csv"
    if not path.is_file():
        raise KleverError(f"{path}: sample table not found (run klever-nb sample first)")
    if path.suffix == ".nc":
        from klever_nb.io import read_netcdf

        ds = read_netcdf(path)
        frame = ds.to_dataframe().reset_index().rename(columns={"galaxy": "name"})
        return frame
    return pd.read_csv(path, comment="#", keep_default_na=True)


# ---------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------
def _install_sigterm() -> Callable[[], None]:
    """Make SIGTERM raise KeyboardInterrupt (so ``finally`` blocks run); return a restorer."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def run_sample(sample_path: str | Path, out_dir: str | Path, *, force: bool = False,
               scheduler: str | None = None, workers: int = 2, progress: bool | None = None,
               method: str | None = None,
               report: Callable[[str], None] | None = None) -> SampleResult:
    """Validate every galaxy, run the valid ones, write the sample table.

    Parameters
    ----------
    sample_path : str or Path
        Sample TOML file (``galaxies = [...]`` or ``folders = [...]``).
    out_dir : str or Path
        Products go to ``out_dir/<name>/``; the table to ``out_dir/sample.csv`` / ``.nc``.
    force : bool
        Recompute every galaxy and stage.
    scheduler : None, "local" or str
        None: in this process, one galaxy after the other; ``"local"``: a
        ``dask.distributed.LocalCluster`` of ``workers`` single-threaded processes (closed
        at the end whatever happens); otherwise the address of a running scheduler.
    workers : int
        Number of local dask workers.
    progress : bool or None
        Progress bar (default: on a terminal only).
    method : str, optional
        ``[analysis] method`` override passed to :func:`klever_nb.pipeline.run_galaxy`.
    report : callable, optional
        Called with one line for every invalid galaxy (before running) and every failure.

    Returns
    -------
    SampleResult
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    valid, invalid = validate_sample(sample_path)
    problems = [r["error"] for r in invalid]
    if report:
        for line in problems:
            report(line)
    rows: dict[str, dict[str, Any]] = {}
    restore = _install_sigterm()
    bar = tqdm(total=len(valid), desc="sample", unit="galaxy",
               disable=None if progress is None else not progress)

    def record(row: dict[str, Any]) -> None:
        rows[row["name"]] = row
        bar.update()
        if row["status"] == "failed" and report:
            report(f"{row['config_path']}: {row['error']}")

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if scheduler is None:
            for cfg in valid:
                record(run_one(cfg.path, out_dir, force=force, method=method))
        else:
            _run_on_dask(valid, out_dir, force, method, scheduler, workers, record)
    finally:
        bar.close()
        restore()
    ordered = [rows.get(c.name, {"name": c.name, "config_path": str(c.path), "status": "failed",
                                 "error": "not run", "summary_path": "", "seconds": np.nan})
               for c in valid] + invalid
    csv_path, nc_path = write_sample_table(ordered, out_dir)
    return SampleResult(rows=ordered, problems=problems, csv=csv_path, netcdf=nc_path)


def _run_on_dask(valid: list[GalaxyConfig], out_dir: Path, force: bool, method: str | None,
                 scheduler: str, workers: int, record: Callable[[dict], None]) -> None:
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = client = None
    try:
        if scheduler == "local":
            # one thread per worker process in numba/BLAS too: two workers each spawning
            # two threads on two cores made the cluster slower than a serial run (0.42x)
            single = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                             "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}
            cluster = LocalCluster(n_workers=max(1, int(workers)), threads_per_worker=1,
                                   processes=True, dashboard_address=None, env=single)
            client = Client(cluster)
        else:
            client = Client(scheduler)
        futures = {client.submit(run_one, str(c.path), str(out_dir), force=force,
                                 method=method, pure=False): c for c in valid}
        for future in as_completed(futures):
            cfg = futures[future]
            try:
                record(future.result())
            except Exception as err:  # a worker died: report the galaxy, go on
                record({"name": cfg.name, "config_path": str(cfg.path), "status": "failed",
                        "error": _one_line(err), "summary_path": "", "seconds": np.nan})
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()

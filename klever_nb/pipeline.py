"""Run the stages of one galaxy (or a sample) from input files to products.

This is the only place (with :mod:`klever_nb.io` and :mod:`klever_nb.cli`) that
touches files. Inputs are validated before anything is written; each product is
written atomically; a rerun skips a stage whose inputs (files, settings, code
version) did not change, identified by a hash kept in the product's attrs.

Products in ``OUT/<name>/`` (DESIGN.md "Products"): ``cubes_aligned.nc``,
``line_maps.nc``, ``source_maps.nc``, ``metallicity.nc``, ``profile.csv``,
``gradient.png``, ``summary.json``.

The science of each stage is in :mod:`klever_nb.stages`; the single-cube fit behind
``klever-nb fit`` in :mod:`klever_nb.fit_run` (both re-exported here).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import xarray as xr

from klever_nb import __version__
from klever_nb.config import METHODS, GalaxyConfig, load_galaxy
from klever_nb.errors import ConfigError, InputError, KleverError
from klever_nb.fit_run import fit_single_cube
from klever_nb.io import read_netcdf, write_json, write_netcdf, write_text
from klever_nb.io.cubes import open_cube
from klever_nb.stages import (
    CENTRE_CONTINUUM_BAND,
    CONTINUUM_DETECTION_SNR,
    StageResult,
    _aligned_cubes,
    _band_detection_flags,
    _fit_stage,
    _gradient_stage,
    _lens_stage,
    _metallicity_stage,
)

__all__ = [
    "CENTRE_CONTINUUM_BAND",
    "CONTINUUM_DETECTION_SNR",
    "StageResult",
    "fit_single_cube",
    "galaxy_hash",
    "galaxy_input_files",
    "input_fingerprints",
    "read_galaxy_cubes",
    "read_lens",
    "run_galaxy",
    "run_sample",
]


# ---------------------------------------------------------------------------
# Hashes: a stage reruns only when what it depends on changed
# ---------------------------------------------------------------------------
def _file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hash(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def galaxy_input_files(cfg: GalaxyConfig) -> list[Path]:
    """Every file a galaxy's products depend on: its TOML, cubes and lens maps."""
    files = [cfg.path, *cfg.cubes.values()]
    if cfg.lens is not None:
        files += [p for p in (cfg.lens.deflection_x, cfg.lens.deflection_y, cfg.lens.kappa,
                              cfg.lens.gamma, cfg.lens.hst_image) if p is not None]
        for folder in cfg.lens.models:
            files += sorted(folder.glob("*.fits"))
    return files


def input_fingerprints(cfg: GalaxyConfig) -> list[tuple[str, str]]:
    """(path, SHA-256) of every input file of a galaxy (reads each file once)."""
    return [(str(p), _file_fingerprint(p)) for p in galaxy_input_files(cfg)]


def galaxy_hash(cfg: GalaxyConfig,
                fingerprints: list[tuple[str, str]] | None = None) -> str:
    """Content hash of a galaxy: package version, analysis settings (with the method) and the
    SHA-256 of every input file (``fingerprints`` when already computed, else read). Stage
    hashes derive from it; ``klever-nb sample`` uses it as the resume marker."""
    if fingerprints is None:
        fingerprints = input_fingerprints(cfg)
    return _hash(__version__, asdict(cfg.analysis), [list(f) for f in fingerprints])



# ---------------------------------------------------------------------------
# Reading a galaxy's inputs (all checks happen here, before anything is written)
# ---------------------------------------------------------------------------
def read_galaxy_cubes(cfg: GalaxyConfig) -> xr.DataTree:
    """Read every band's cube of a galaxy into a DataTree (``/YJ``, ``/H``, ``/K``)."""
    children = {}
    for band, path in cfg.cubes.items():
        cube = open_cube(path, band=band, instrument=cfg.instrument, ifu=cfg.ifu)
        cube.attrs["redshift"] = cfg.redshift
        children[f"/{band}"] = cube
    return xr.DataTree.from_dict(children)


def read_lens(cfg: GalaxyConfig, cube_wcs: str,
              cube_shape: tuple[int, int] | None = None) -> tuple[xr.Dataset, list[xr.Dataset]]:
    """Deflection (and kappa/gamma) maps for the source redshift, plus alternative models."""
    from klever_nb import lensing
    from klever_nb.io.images import open_lens_maps

    if cfg.lens is None:
        raise ConfigError(f"{cfg.path}: read_lens needs a [lens] table (the galaxy is unlensed)")
    lens_cfg = cfg.lens
    if lens_cfg.deflection_x is not None:
        raw = open_lens_maps(deflection_x=lens_cfg.deflection_x,
                             deflection_y=lens_cfg.deflection_y, kappa=lens_cfg.kappa,
                             gamma=lens_cfg.gamma, deflection_units=lens_cfg.deflection_units)
        lens = lensing.rescale_lens(raw, z_lens=lens_cfg.z_lens, z_source=cfg.redshift,
                                    normalisation=lens_cfg.normalisation)
    else:
        from klever_nb.lensmodels import ParametricLens

        model = ParametricLens.from_config({"components": list(lens_cfg.components)})
        lens = lensing.lens_from_parametric(
            model, cube_wcs=cube_wcs, pixel_scale_arcsec=lens_cfg.grid_pixel_arcsec,
            size_arcsec=lens_cfg.grid_size_arcsec)
    alternatives = []
    for folder in lens_cfg.models:
        dx, dy = folder / "dx.fits", folder / "dy.fits"
        if not (dx.is_file() and dy.is_file()):
            raise InputError(f"{folder}: lens.models folder needs dx.fits and dy.fits "
                             "(and optionally kappa.fits, gamma.fits)")
        kappa = folder / "kappa.fits" if (folder / "kappa.fits").is_file() else None
        gamma = folder / "gamma.fits" if (folder / "gamma.fits").is_file() else None
        alt = open_lens_maps(deflection_x=dx, deflection_y=dy, kappa=kappa, gamma=gamma,
                             deflection_units=lens_cfg.deflection_units)
        alternatives.append(lensing.rescale_lens(alt, z_lens=lens_cfg.z_lens,
                                                 z_source=cfg.redshift,
                                                 normalisation=lens_cfg.normalisation))
    lensing.check_overlap(lens, cube_wcs=cube_wcs, cube_shape=cube_shape,
                          source=str(lens_cfg.deflection_x or "lens"))
    return lens, alternatives


# ---------------------------------------------------------------------------
# One galaxy
# ---------------------------------------------------------------------------

#: Exceptions that make a cached product unusable (it is then recomputed, never trusted).
_UNREADABLE = (OSError, ValueError, KeyError, RuntimeError)


def _run_stage(products: Path, stage: str, stage_hash: str, force: bool, *,
               compute: Callable[[], StageResult], write: Callable[[StageResult], None],
               read: Callable[[], xr.Dataset | None], files: tuple[str, ...]) -> StageResult:
    """The one caching mechanism of every stage.

    A stage's files are written first (each atomically), then its record
    ``.<stage>.json`` (input hash, summary fields). The stage is up to date when the record
    holds ``stage_hash`` and every file exists and reads back; a run killed between the
    files and the record leaves no valid record, so the stage is recomputed.
    """
    start = time.perf_counter()
    record_path = products / f".{stage}.json"
    if not force and record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
            if record.get("input_hash") == stage_hash and \
                    all((products / name).is_file() for name in files):
                return StageResult(read(), MappingProxyType(record["summary"]),
                                   time.perf_counter() - start)
        except _UNREADABLE:
            pass  # an unreadable record or product is recomputed
    result = compute()
    with _writing(products):
        write(result)
        write_json({"input_hash": stage_hash, "klever_nb_version": __version__,
                    "summary": dict(result.summary)}, record_path)
    return StageResult(result.data, MappingProxyType(dict(result.summary)),
                       time.perf_counter() - start)


@contextlib.contextmanager
def _writing(products: Path):
    """Turn a failed product write (read-only folder, disk full, quota) into one line.

    The atomic writes leave no partial file behind, so the folder holds only complete
    products and the run can be repeated once the cause is fixed (issue 18).
    """
    try:
        yield
    except OSError as err:
        if err.errno not in _WRITE_ERRNOS:
            raise
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise KleverError(f"{products}: cannot write the products ({reason}); free space or "
                          "choose a writable --out folder, then rerun (finished stages are "
                          "kept)") from None


#: errno values of a product write that are the user's to fix (not a bug).
_WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                 errno.ENOTDIR, errno.EEXIST, errno.EFBIG}


def _write_dataset(ds: xr.Dataset, path: Path, stage_hash: str, record: dict) -> None:
    """A stage's netCDF product with its input hash and provenance (settings, versions,
    input SHA-256s)."""
    ds = ds.copy()
    ds.attrs.update(input_hash=stage_hash, klever_nb_version=__version__, provenance=record)
    write_netcdf(ds, path)


def run_galaxy(config_path: str | Path, out_dir: str | Path, *, force: bool = False,
               progress: bool | None = None, method: str | None = None,
               sandbox: str | Path | None = None) -> Path:
    """Run every stage on one galaxy; return the path of its ``summary.json``.

    Parameters
    ----------
    config_path : str or Path
        Galaxy TOML file (DESIGN.md).
    out_dir : str or Path
        Products go to ``out_dir/<name>/``.
    force : bool
        Recompute every stage even when its product is up to date, and replace products
        made with other settings (without it such a folder is refused, issue 18).
    progress : bool or None
        Show a progress bar (default: only on a terminal).
    method : {"default", "k20"}, optional
        Overrides ``[analysis] method`` (``klever-nb run --method``): ``"k20"`` reproduces
        the paper's estimators everywhere.
    sandbox : str or Path, optional
        Every path of the galaxy file must lie below this folder (``--sandbox``).
    """
    from dataclasses import replace

    from tqdm.auto import tqdm

    cfg = load_galaxy(config_path, sandbox=sandbox)
    if method is not None:
        if method not in METHODS:
            raise ConfigError(f"method: must be one of {', '.join(METHODS)}, got {method!r}")
        cfg = replace(cfg, analysis=replace(cfg.analysis, method=method))
    settings = cfg.analysis
    start = time.perf_counter()
    tree = read_galaxy_cubes(cfg)
    first = next(iter(tree.children.values())).to_dataset()
    cube_wcs = first.attrs.get("wcs", "")
    cube_shape = (first.sizes["y"], first.sizes["x"])
    lens, alternatives = (read_lens(cfg, cube_wcs, cube_shape) if cfg.lensed else (None, []))

    products = Path(out_dir) / cfg.name
    with _writing(products):
        products.mkdir(parents=True, exist_ok=True)
    from klever_nb import provenance

    fingerprints = input_fingerprints(cfg)  # every input file read once, large cubes too
    record = provenance.record(asdict(settings), fingerprints)
    provenance.check_settings(products, record, force=force)  # no mixing unless --force
    with _writing(products):
        write_json(record, products / provenance.RECORD_NAME)
        for tmp in products.glob(".*.tmp"):  # left by a killed writer (atomic_path)
            tmp.unlink(missing_ok=True)
    base_hash = galaxy_hash(cfg, fingerprints)
    stages = ["line fitting", "source plane", "metallicity", "gradient"]
    bar = tqdm(total=len(stages), desc=cfg.name, disable=(None if progress is None
                                                          else not progress), leave=False)

    def stage_hash(stage: str) -> str:
        return _hash(base_hash, stage)

    def write_fit(result: StageResult) -> None:
        _write_dataset(result.data, products / "line_maps.nc", stage_hash("fit"), record)
        shifts = json.loads(result.data.attrs.get("alignment_shifts", "{}"))
        aligned = _aligned_cubes(tree, shifts)
        aligned.attrs.update(input_hash=stage_hash("fit"), provenance=record)
        write_netcdf(aligned, products / "cubes_aligned.nc")

    fit = _run_stage(products, "fit", stage_hash("fit"), force,
                     compute=lambda: _fit_stage(tree, cfg), write=write_fit,
                     read=lambda: read_netcdf(products / "line_maps.nc"),
                     files=("line_maps.nc", "cubes_aligned.nc"))
    bar.update()
    lensed = _run_stage(
        products, "lens", stage_hash("lens"), force,
        compute=lambda: _lens_stage(fit.data, cfg, lens, alternatives, cube_wcs, tree),
        write=lambda r: _write_dataset(r.data, products / "source_maps.nc", stage_hash("lens"),
                                       record),
        read=lambda: read_netcdf(products / "source_maps.nc"), files=("source_maps.nc",))
    bar.update()
    metal = _run_stage(
        products, "metallicity", stage_hash("metallicity"), force,
        compute=lambda: _metallicity_stage(fit.data, lensed.data, cfg, lensed.summary),
        write=lambda r: _write_dataset(r.data, products / "metallicity.nc",
                                       stage_hash("metallicity"), record),
        read=lambda: read_netcdf(products / "metallicity.nc"), files=("metallicity.nc",))
    bar.update()
    gradient = _run_stage(
        products, "gradient", stage_hash("gradient"), force,
        compute=lambda: _gradient_stage(metal.data, lensed.data, fit.data, cfg, lens,
                                        lensed.summary, metal.summary),
        write=lambda r: _write_gradient_products(
            r, products, figure=lambda: _gradient_figure(r, metal, lensed, cfg)),
        read=lambda: None, files=("profile.csv", "gradient.png"))
    bar.update()
    bar.close()

    summary: dict[str, Any] = {"name": cfg.name, "redshift": cfg.redshift,
                               "lensed": cfg.lensed, "instrument": cfg.instrument,
                               "config_path": str(cfg.path)}
    for result in (fit, lensed, metal, gradient):
        summary.update(result.summary)
    summary.update(_band_detection_flags(fit.data, cfg))
    summary["properties"] = cfg.properties
    summary["settings"] = asdict(settings)
    summary["versions"] = record["versions"]  # provenance.package_versions()
    summary["inputs"] = record["inputs"]  # SHA-256 of every input file
    # wall time per stage (a stage reused from its products counts its reading only)
    summary["timings_s"] = {"total": time.perf_counter() - start, "fit": fit.seconds,
                            "source_plane": lensed.seconds, "metallicity": metal.seconds,
                            "gradient": gradient.seconds}
    with _writing(products):
        return write_json(summary, products / "summary.json")


def _write_gradient_products(result: StageResult, products: Path, *,
                             figure: Callable[[], Any]) -> None:
    """``profile.csv`` (radius_kpc, oh, oh_err, n_pixels; DESIGN.md) and ``gradient.png``."""
    import matplotlib.pyplot as plt

    from klever_nb.io import atomic_path

    profile = result.data
    lines = ["radius_kpc,oh,oh_err,n_pixels"]
    for r, oh, err, n in zip(profile["radius_kpc"].values, profile["oh"].values,
                             profile["oh_err"].values, profile["n_pixels"].values, strict=True):
        lines.append(f"{r:.4f},{oh:.4f},{err:.4f},{n:.2f}")
    write_text("\n".join(lines) + "\n", products / "profile.csv")
    fig = figure()
    with atomic_path(products / "gradient.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _gradient_figure(gradient: StageResult, metal: StageResult, lensed: StageResult,
                     cfg: GalaxyConfig):
    """K20 Fig. 7 for this galaxy, from the stages' results."""
    from klever_nb import figures, lensing

    info, metal_info = gradient.summary, metal.summary
    forward = ({"gradient_dex_per_kpc": info["gradient_forward_dex_per_kpc"],
                "gradient_err": info["gradient_forward_err"],
                "central_oh": info.get("central_forward_oh", np.nan)}
               if "gradient_forward_dex_per_kpc" in info else None)
    return figures.gradient_figure(
        metal.data, gradient.data, dict(info), psf=lensing.annulus_psf(lensed.summary),
        line_maps=lensed.data, global_oh=metal_info.get("global_oh"),
        global_oh_err=(tuple(metal_info["global_oh_err"]) if "global_oh_err" in metal_info
                       else None), forward=forward, title=cfg.name)


# ---------------------------------------------------------------------------
# A sample
# ---------------------------------------------------------------------------
def run_sample(sample_path: str | Path, out_dir: str | Path, *, force: bool = False,
               scheduler: str | None = None, workers: int = 2,
               progress: bool | None = None) -> dict[str, Path]:
    """Run every galaxy of a sample file; return ``{name: summary.json path}``.

    With ``scheduler=None`` galaxies run one after the other in this process; with
    ``"local"`` on a local ``dask.distributed`` cluster of ``workers`` processes, or on the
    scheduler at the given address. Every galaxy is validated first; finished galaxies are
    skipped on a rerun (content-hash done-marker); ``out_dir/sample.csv`` and ``sample.nc``
    are written. See :func:`klever_nb.sample_run.run_sample`, which also returns the
    per-galaxy status; this wrapper raises :class:`KleverError` naming every galaxy that
    was invalid or failed, after the others finished.
    """
    from klever_nb import sample_run

    result = sample_run.run_sample(sample_path, out_dir, force=force, scheduler=scheduler,
                                   workers=workers, progress=progress)
    if result.failed:
        names = "; ".join(f"{r['name']}: {r['error']}" for r in result.failed)
        raise KleverError(f"{len(result.failed)} of {len(result.rows)} galaxies failed "
                          f"(table: {result.csv}): {names}")
    return result.summaries

"""``klever-nb fit``: the emission lines of any one IFU cube, written to ``OUT/<stem>/``.

The band goes through :func:`klever_nb.fitting.fit_band`, the same function the galaxy
pipeline (:func:`klever_nb.pipeline.run_galaxy`) uses for every band, so the maps are the
same for the same cube and settings. Products: ``line_maps.nc`` and ``summary.json``.

References
----------
DESIGN.md "Products"; issue 15 (one fit path).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import xarray as xr

from klever_nb import __version__, constants
from klever_nb.errors import ConfigError, InputError
from klever_nb.io import write_json, write_netcdf
from klever_nb.io.cubes import open_cube
from klever_nb.provenance import package_versions

__all__ = ["fit_single_cube"]


def fit_single_cube(cube_path: str | Path, *, redshift: float, out_dir: str | Path,
                    lines: tuple[str, ...] | None = None, noise_kind: str | None = None,
                    wavelength_medium: str | None = None, resolving_power: float | None = None,
                    smooth_fwhm_arcsec: float = 0.0, ifu: int | None = None,
                    settings=None,
                    fibre_radius_arcsec: float = constants.FIBRE_RADIUS_ARCSEC,
                    mapper=None) -> Path:
    """Fit the emission lines of any one IFU cube; write ``OUT/<stem>/line_maps.nc`` + summary.

    The band goes through :func:`klever_nb.fitting.fit_band`, the same function
    ``klever-nb run`` uses for every band after refining the redshift: the same cube,
    ``redshift`` (give ``run``'s refined one), lines, smoothing and ``settings``
    (:class:`klever_nb.fitting.FitSettings`; ``resolving_power`` overrides its R)
    give the same maps, before ``run``'s band registration shift.

    The cube is memory-mapped and read in chunks of spaxels (``open_cube(lazy=True)``);
    ``mapper`` (:func:`klever_nb.fitting.parallel.dask_mapper`) fits the chunks on a dask
    cluster, with the same maps. ``summary.json`` has ``timings_s`` per step.

    Returns the product folder.
    """
    from klever_nb import fitting

    _check_fit_arguments(redshift, lines)
    settings = settings if settings is not None else fitting.FitSettings()
    if resolving_power is not None:
        settings = dataclasses.replace(settings, resolving_power=float(resolving_power))

    timings = {}
    t0 = time.perf_counter()
    cube_path = Path(cube_path)
    cube = open_cube(cube_path, noise_kind=noise_kind, wavelength_medium=wavelength_medium,
                     ifu=ifu, lazy=True)
    timings["open"] = time.perf_counter() - t0
    wave = cube["wave"].values
    in_cube = constants.lines_in_range(float(wave.min()), float(wave.max()), redshift,
                                       tuple(lines) if lines else None)
    if not in_cube:
        raise InputError(f"{cube_path}: no line of {'--lines' if lines else 'the catalogue'} "
                         f"falls inside {wave.min():.4f}-{wave.max():.4f} um at z = {redshift}")
    t0 = time.perf_counter()
    maps, integrated = fitting.fit_band(cube, redshift=redshift, settings=settings,
                                        lines=in_cube, smooth_fwhm_arcsec=smooth_fwhm_arcsec,
                                        fibre_radius_arcsec=fibre_radius_arcsec, mapper=mapper)
    timings["fit"] = time.perf_counter() - t0
    for name in ("flux", "flux_err", "snr", "detected", "upper_limit"):
        if name in integrated:
            maps[f"integrated_{name}"] = integrated[name]
    maps.attrs["source_file"] = str(cube_path.resolve())
    maps.attrs["klever_nb_version"] = __version__
    products = Path(out_dir) / cube_path.stem
    t0 = time.perf_counter()
    write_netcdf(maps, products / "line_maps.nc")
    timings["write"] = time.perf_counter() - t0
    summary = {
        "cube": str(cube_path.resolve()), "redshift": redshift,
        "lines_fitted": list(in_cube),
        "integrated": _integrated_fields(integrated),
        "flux_units": maps["flux"].attrs.get("units", ""),
        "settings": {"noise_kind": noise_kind, "wavelength_medium": wavelength_medium,
                     "resolving_power": resolving_power if resolving_power is not None
                     else cube.attrs.get("resolving_power"),
                     "smooth_fwhm_arcsec": smooth_fwhm_arcsec, "ifu": ifu,
                     "fibre_radius_arcsec": fibre_radius_arcsec,
                     "fit": {k: (list(v) if isinstance(v, tuple) else v)
                             for k, v in settings.describe().items()}},
        "cube_attrs": {k: v for k, v in cube.attrs.items() if k != "wcs"},
        "versions": package_versions(),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    write_json(summary, products / "summary.json")
    return products


def _check_fit_arguments(redshift: float, lines: tuple[str, ...] | None) -> None:
    """``--redshift`` a number >= 0 and every ``--lines`` name in the catalogue."""
    if not np.isfinite(redshift) or redshift < 0:
        raise ConfigError(f"--redshift must be a number >= 0, got {redshift}")
    if lines is not None:
        unknown = [name for name in lines if name not in constants.LINES]
        if unknown:
            raise ConfigError(f"--lines: unknown line {unknown[0]!r}; known: "
                              f"{', '.join(constants.LINES)}")


def _integrated_fields(integrated: xr.Dataset) -> dict[str, dict]:
    """The pseudo-fibre fit of each line as ``summary.json`` fields."""
    return {str(line): {
        "flux": float(integrated["flux"].sel(line=line)),
        "flux_err": float(integrated["flux_err"].sel(line=line)),
        "snr": float(integrated["snr"].sel(line=line)),
        "detected": bool(integrated["detected"].sel(line=line)),
        "upper_limit": float(integrated["upper_limit"].sel(line=line)),
    } for line in integrated["line"].values}

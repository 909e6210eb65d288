"""What every product records about how it was made, and the guard against mixing settings.

A galaxy's products folder holds ``.provenance.json``: the analysis settings, the package
versions and the SHA-256 of every input file. Each netCDF product carries the same record
in its attrs (``provenance``), beside the stage's ``input_hash``. ``klever-nb run`` refuses
to write into a folder whose products were made with other settings (one line naming the
settings that differ) unless ``--force`` is given, so a folder never mixes maps made
with, say, two smoothing lengths (issue 18).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from klever_nb.errors import ConfigError

__all__ = ["RECORD_NAME", "check_settings", "package_versions", "read_record", "record"]

#: Name of the provenance record in a galaxy's products folder.
RECORD_NAME = ".provenance.json"


def package_versions() -> dict[str, str]:
    """Versions of klever_nb and of the packages its numbers depend on."""
    import importlib.metadata as metadata

    from klever_nb import __version__

    out = {"klever_nb": __version__}
    for name in ("numpy", "scipy", "astropy", "xarray", "emcee", "numba", "h5netcdf",
                 "lenstronomy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def record(settings: dict[str, Any], inputs: list[tuple[str, str]]) -> dict[str, Any]:
    """The provenance record: ``settings``, ``versions`` and ``inputs`` ({path: sha256})."""
    return {"settings": json.loads(json.dumps(settings, default=list)),
            "versions": package_versions(), "inputs": dict(inputs)}


def read_record(products: Path) -> dict[str, Any] | None:
    """The folder's record, or None when there is none (or it cannot be read)."""
    path = Path(products) / RECORD_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in keys
            if old.get(k, "(unset)") != new.get(k, "(unset)")]


def check_settings(products: Path, new: dict[str, Any], *, force: bool) -> None:
    """Raise :class:`ConfigError` when ``products`` holds products made with other settings.

    Parameters
    ----------
    products : Path
        A galaxy's products folder.
    new : dict
        This run's provenance record (:func:`record`).
    force : bool
        Allow replacing them (``klever-nb run --force``).
    """
    old = read_record(products)
    if force or old is None or not isinstance(old.get("settings"), dict):
        return
    changed = _differences(old["settings"], new["settings"])
    if changed:
        more = f" (+{len(changed) - 2} more)" if len(changed) > 2 else ""
        raise ConfigError(f"{products}: its products were made with other settings "
                          f"({'; '.join(changed[:2])}{more}); rerun with --force to replace "
                          "them, or choose another --out folder")

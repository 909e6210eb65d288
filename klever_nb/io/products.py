"""Writing and reading products: atomic writes, netCDF (h5netcdf) round trips, JSON, CSV.

Every product is written to a temporary name in the destination folder and
renamed into place, so a killed run never leaves a partial file (DESIGN.md,
"Products"). netCDF files keep values, coordinates and attrs exactly; attrs
that netCDF cannot store natively (bool, None, dict, nested lists) are stored
as JSON strings with a ``json:`` prefix and decoded on reading.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import xarray as xr

_JSON_PREFIX = "json:"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> with atomic_path(out) as tmp:
    ...     _ = tmp.write_text("done")
    >>> out.read_text()
    'done'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file private (0600); a product gets the usual 0666 & ~umask
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _encode_attr(value):
    if isinstance(value, bool | np.bool_) or value is None or isinstance(value, dict):
        return _JSON_PREFIX + json.dumps(value if not isinstance(value, np.bool_) else bool(value))
    if isinstance(value, list | tuple):
        if value and all(isinstance(v, str) for v in value):
            return _JSON_PREFIX + json.dumps(list(value))
        if any(isinstance(v, list | tuple | dict | bool | type(None)) for v in value) or not value:
            return _JSON_PREFIX + json.dumps(list(value))
        return np.asarray(value)
    return value


def _decode_attr(value):
    if isinstance(value, str) and value.startswith(_JSON_PREFIX):
        return json.loads(value[len(_JSON_PREFIX):])
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    return value


def _map_attrs(obj: xr.Dataset, func) -> xr.Dataset:
    obj = obj.copy()
    obj.attrs = {k: func(v) for k, v in obj.attrs.items()}
    for name in list(obj.variables):
        obj[name].attrs = {k: func(v) for k, v in obj[name].attrs.items()}
    return obj


def encode_for_netcdf(ds: xr.Dataset) -> xr.Dataset:
    """Return a copy of ``ds`` whose attrs netCDF can store (JSON-encoding the rest)."""
    return _map_attrs(ds, _encode_attr)


def decode_from_netcdf(ds: xr.Dataset) -> xr.Dataset:
    """Inverse of :func:`encode_for_netcdf`."""
    return _map_attrs(ds, _decode_attr)


def write_netcdf(obj: xr.Dataset | xr.DataTree, path: str | Path) -> Path:
    """Write a Dataset or DataTree to netCDF-4 (h5netcdf engine), atomically.

    A DataTree is written as netCDF groups (``/YJ``, ``/H``...).
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        if isinstance(obj, xr.DataTree):
            tree = obj.map_over_datasets(encode_for_netcdf)
            tree.to_netcdf(tmp, engine="h5netcdf", invalid_netcdf=True)
        else:
            encode_for_netcdf(obj).to_netcdf(tmp, engine="h5netcdf", invalid_netcdf=True)
    return path


def read_netcdf(path: str | Path) -> xr.Dataset:
    """Read a Dataset written by :func:`write_netcdf` fully into memory."""
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        return decode_from_netcdf(ds.load())


def read_datatree(path: str | Path) -> xr.DataTree:
    """Read a DataTree written by :func:`write_netcdf` fully into memory."""
    with xr.open_datatree(path, engine="h5netcdf") as tree:
        return tree.load().map_over_datasets(decode_from_netcdf)


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _finite_or_none(obj):
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_none(v) for v in obj]
    return obj


def write_json(data: dict, path: str | Path) -> Path:
    """Write ``data`` as indented JSON atomically; NaN/inf become ``null`` (valid JSON)."""
    path = Path(path)
    text = json.dumps(_finite_or_none(data), indent=2, default=_json_default, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")
    return path


def write_text(text: str, path: str | Path) -> Path:
    """Write text atomically (CSV tables, TOML files)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path

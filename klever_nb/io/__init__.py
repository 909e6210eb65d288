"""File input and output: cube readers, lens-map readers, product writers.

``open_cube(path)`` is what a notebook user calls to read any IFU cube.
"""

from __future__ import annotations

from klever_nb.io.products import (
    atomic_path,
    read_datatree,
    read_netcdf,
    write_json,
    write_netcdf,
    write_text,
)

__all__ = [
    "atomic_path",
    "read_datatree",
    "read_netcdf",
    "write_json",
    "write_netcdf",
    "write_text",
]

try:  # the cube readers (klever_nb/io/cubes.py)
    from klever_nb.io.cubes import open_cube  # noqa: F401

    __all__.append("open_cube")
except ImportError:  # pragma: no cover - during development only
    pass

from klever_nb.io.images import open_image, open_lens_maps  # noqa: E402

__all__ += ["open_image", "open_lens_maps"]

from klever_nb.io.combine import combine_exposures  # noqa: E402

__all__ += ["combine_exposures"]

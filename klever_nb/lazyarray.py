"""One lazily indexed array for xarray: read on demand from a section reader.

Both the lazy cube reader (:mod:`klever_nb.io.cube_lazy`) and the section-by-section
smoothing (:mod:`klever_nb.spectra`) hand xarray a variable whose values come from a
``source.read(key, which)`` call with outer-indexing keys. This module sits below the stages
and ``io`` (it imports only numpy and xarray).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr
from xarray.core import indexing

__all__ = ["SectionArray"]


class SectionArray(xr.backends.BackendArray):
    """xarray view of variable ``which`` of ``source`` (outer indexing, float64, on demand).

    ``source`` has ``read(key, which) -> ndarray`` and, when ``shape`` is not given, a
    ``shape`` attribute.
    """

    def __init__(self, source: Any, which: str, shape: tuple[int, ...] | None = None):
        self.source = source
        self.which = which
        self.shape = tuple(shape) if shape is not None else tuple(source.shape)
        self.dtype = np.dtype(np.float64)

    def __getitem__(self, key):
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.OUTER, self._raw)

    def _raw(self, key):
        return self.source.read(key, self.which)

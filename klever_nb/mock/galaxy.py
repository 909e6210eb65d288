"""A mock galaxy in memory: :class:`MockGalaxy` and :func:`make_mock`.

See :mod:`klever_nb.mock` for the model and its conventions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from klever_nb.mock.render import _band_cubes, _sigma0, image_plane_maps, lens_maps
from klever_nb.mock.spec import MockSpec, demo_specs  # noqa: F401 (demo_specs: doctest)
from klever_nb.mock.truth import _truth, source_maps


@dataclass
class MockGalaxy:
    """A mock galaxy in memory (see :func:`make_mock`).

    Attributes
    ----------
    spec : MockSpec
    cubes : xarray.DataTree
        Noisy cubes, one child per band (DESIGN.md data model).
    noiseless : xarray.DataTree
        Same without noise; also holds the ``continuum`` cube (lines = flux - continuum).
    source : xarray.Dataset
        True source-plane maps (:func:`source_maps`).
    lens_maps : xarray.Dataset or None
        ``alpha_x``, ``alpha_y``, ``kappa``, ``gamma`` in the ``dls_ds`` normalisation.
    truth : dict
        JSON-ready truth (written as ``truth.json``).
    image_maps : xarray.Dataset
        True noiseless image-plane line maps on the spaxel grid (:func:`image_plane_maps`).
    """

    spec: MockSpec
    cubes: xr.DataTree
    noiseless: xr.DataTree
    source: xr.Dataset
    lens_maps: xr.Dataset | None
    truth: dict
    image_maps: xr.Dataset = field(repr=False, default=None)


def make_mock(spec: MockSpec) -> MockGalaxy:
    """Build a mock galaxy in memory; pure and deterministic for ``spec.seed``.

    Examples
    --------
    >>> galaxy = make_mock(demo_specs()[1])
    >>> sorted(galaxy.cubes.children)
    ['H', 'K', 'YJ']
    >>> galaxy.truth["mu"]
    1.0

    References
    ----------
    K20 §2-3 (data, lensing); FACTS.md §1, §5, §7-9.
    """
    maps, info = image_plane_maps(spec)
    sigma0 = _sigma0(spec, maps)
    rng = np.random.default_rng(spec.seed)
    observed, noiseless = _band_cubes(spec, maps, sigma0, rng)
    root = {"name": spec.name, "redshift": spec.redshift, "instrument": spec.instrument}
    cubes = xr.DataTree.from_dict({"/": xr.Dataset(attrs=root),
                                   **{f"/{b}": ds for b, ds in observed.items()}})
    clean = xr.DataTree.from_dict({"/": xr.Dataset(attrs=root),
                                   **{f"/{b}": ds for b, ds in noiseless.items()}})
    source = source_maps(spec)
    truth = _truth(spec, maps, info, source, sigma0)
    return MockGalaxy(spec=spec, cubes=cubes, noiseless=clean, source=source,
                      lens_maps=lens_maps(spec), truth=truth, image_maps=maps)

"""klever_nb: from near-infrared IFU cubes of lensed galaxies to metallicity gradients.

Implements the analysis of Curti et al. 2020 (MNRAS 492, 821; KLEVER gradients):
emission-line fitting, source-plane reconstruction, magnifications, metallicity
maps and gradients, and the sample figures. Stages are pure functions on xarray
objects; :mod:`klever_nb.io` reads and writes files, :mod:`klever_nb.pipeline`
runs a galaxy, :mod:`klever_nb.cli` is the ``klever-nb`` command.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from klever_nb.errors import ConfigError, InputError, KleverError

try:
    __version__ = version("klever_nb")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["ConfigError", "InputError", "KleverError", "__version__"]

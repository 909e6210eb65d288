"""Emission-line fitting of whole cubes: batched variable projection, with a slow scipy twin.

Model (K20 §3.1; FACTS.md §6–8). In each band, every catalogue line inside the band
at the redshift is one Gaussian in wavelength, **integrated over each wavelength
pixel** (pixel edges halfway between channel centres), parametrised by its
integrated flux F. Lines of one kinematic group (``constants.LINES[name].group``)
share a velocity v (km/s relative to ``redshift``) and an intrinsic dispersion σ
(km/s); the observed width is

    σ_λ² = (λ₀ σ / c)² + (λ₀ / (FWHM_PER_SIGMA R))²,   FWHM_PER_SIGMA = 2√(2 ln 2),   centre μ = λ₀ (1 + v / c),

with λ₀ = λ_rest (1 + z) and R the band's resolving power (when R is unknown the
fitted σ is the observed σ, and ``attrs["sigma_is_observed"]`` says so). A linear
continuum is fitted in each *segment*: the union of the line windows
λ₀ (1 ± (|v|_max + 4 σ_max,tot)/c), merged where they overlap. Channels with NaN
flux or noise, non-positive noise, or at a bright OH line
(:func:`fit_sky_mask`, the mask the line-fit widget shows too) get zero weight; the rest inverse-variance weight.

Constraints act on integrated fluxes: fixed ratios (``weak = strong / ratio``) are
folded into the design matrix; bounded ratios ``lo <= F_num / F_den <= hi`` are
enforced exactly: the pair keeps a common, free sign (so that noise fluctuations
give symmetric errors) and when the unconstrained solution violates a bound the
pair is re-solved on each bound line ``F_num = lo F_den`` / ``hi F_den``; the
lowest χ² of the feasible candidates wins (exhaustive over pairs: exact).

Fast path (:func:`fit_cube`): variable projection. For given (v, σ) of all groups,
fluxes and continua follow from one weighted linear least-squares solve (all
spaxels of a chunk at once, through Gram matrices); Levenberg–Marquardt on the
(v, σ) only, with analytic derivatives and Kaufman's projected Jacobian, started
from a coarse velocity grid; bounds by projection. Errors come from the inverse of
the full Gauss–Newton normal matrix in all parameters (fluxes, continua, v, σ),
i.e. the flux errors are marginalised over the kinematics; parameters sitting on
a bound are held fixed. Slow twin (:func:`fit_spectrum_reference`): the same model
written plainly, optimised per spectrum with :func:`scipy.optimize.least_squares`.

Look-elsewhere guard: a free (v, σ) search over ±500 km/s finds >3σ noise peaks in
several per cent of line-free spaxels. When no line of a group reaches
``FitSettings.kinematics_snr`` (default 5) the group's kinematics are not trusted: its fluxes
are re-measured with (v, σ) fixed to those of the neighbouring spaxels where the
group is strong (Gaussian-weighted, σ = 1.5 spaxels), else to ``fallback_kinematics``
(default: the median over strong spaxels, else v = 0 and σ = 60 km/s);
``kinematics_forced`` is set, ``velocity``/``sigma`` hold the values used and their
errors are NaN. Detection (SNR > ``detection_snr``) is then a single-trial test.

Speed: with numba (``USE_NUMBA``) the starting grid and Levenberg–Marquardt run per
spaxel in compiled code (:mod:`klever_nb.fitting.vpfit`: each line only over ±7σ, the
grid's profiles shared by all spaxels, the normal matrix from the last evaluation);
without it the same steps run batched in numpy; both give the same numbers (tests).
Numbers in ``benchmarks/bench_linefit.py`` and ``benchmarks/bench_fit_cli.py``.

Scale: :func:`fit_cube` fits chunks of spaxels that a loader reads on demand (a cube
from ``open_cube(path, lazy=True)`` stays on disk) and a mapper runs (here, or on a
dask cluster: :mod:`klever_nb.fitting.parallel`); each spaxel's fit depends only on its
data and the whole-map fallback kinematics, so the maps do not depend on the chunking.

References
----------
K20 §3.1; FACTS.md §6 (wavelengths), §7 (ratios), §8 (R), §12 (variable projection).
"""

# Layout (each module < 800 lines, imports in this order, no cycles):
#   model.py     FitSettings, BandModel, build_band_model, pixel edges, ratio combos,
#                line profiles, units and input checks
#   vpfit.py     the compiled per-spaxel twin of the grid + Levenberg-Marquardt (numba)
#   kernel.py    numba kernel (USE_NUMBA, NUMBA_PARALLEL, NUMBA_THREADS), numpy Gram and
#                Jacobian products, variable-projection evaluation, Levenberg-Marquardt,
#                covariance
#   cube.py      the two fit passes, fit_cube, fit_spectrum, continuum_image, outputs
#                to a Dataset, Monte Carlo, model cube
#   parallel.py  dask_mapper: chunk tasks on a dask.distributed cluster
#   reference.py fit_spectrum_reference (the slow scipy twin)
#   galaxy.py    refine_redshift, fit_galaxy, band merging
#
# The numba switches live in ``kernel.py``: set ``klever_nb.fitting.kernel.USE_NUMBA = False``
# for the pure-numpy path (``KLEVER_NB_NUMBA_PARALLEL=1`` enables numba threads).

from __future__ import annotations

from klever_nb.fitting import kernel
from klever_nb.fitting.cube import continuum_image, fit_cube, fit_spectrum
from klever_nb.fitting.galaxy import fit_band, fit_galaxy, refine_redshift
from klever_nb.fitting.kernel import _extended_gram as _extended_gram
from klever_nb.fitting.kernel import _gram_numpy as _gram_numpy
from klever_nb.fitting.kernel import _jacobian_products as _jacobian_products
from klever_nb.fitting.kernel import _numba_kernel as _numba_kernel
from klever_nb.fitting.kernel import _numba_kernel_jac as _numba_kernel_jac
from klever_nb.fitting.kernel import _use_numba as _use_numba
from klever_nb.fitting.kernel import base_gram
from klever_nb.fitting.model import (
    C_KMS,
    FWHM_PER_SIGMA,
    BandModel,
    FitSettings,
    build_band_model,
    fit_sky_mask,
    integrated_flux_units,
)
from klever_nb.fitting.model import _kinematics as _kinematics
from klever_nb.fitting.model import _profiles as _profiles
from klever_nb.fitting.reference import fit_spectrum_reference

__all__ = [
    "C_KMS", "FWHM_PER_SIGMA", "BandModel", "FitSettings", "base_gram", "build_band_model",
    "continuum_image", "fit_band", "fit_cube", "fit_galaxy", "fit_sky_mask", "fit_spectrum",
    "fit_spectrum_reference",
    "integrated_flux_units", "kernel", "refine_redshift",
]

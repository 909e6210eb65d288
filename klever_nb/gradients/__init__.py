"""Radial metallicity gradients and 2-D maps the paper's way (K20 §4.2, §4.5, App. A).

The source-plane metallicity map (``oh``, ``oh_lo``, ``oh_hi`` on ``(ys, xs)`` in kpc from
the galaxy centre) is binned in elliptical annuli shaped like the source-plane PSF, the
pixel-fraction-weighted mean metallicity of each annulus is fitted with a straight line
(emcee posterior median, closed-form weighted least squares beside it), and the gradient
is classified as resolved / marginal / unresolved from the radius it reaches in units of the
PSF half width. App. A's systematics repeat the measurement with circular annuli and other
steps. §4.5's 2-D analysis gives residual maps, a planar fit and a non-axisymmetry test.

Decisions where the paper is silent (each one is documented where it is made):

* Annulus size: the *geometric-mean* radius sqrt(a b) of the k-th ellipse is
  k x step, step = ``step_fraction`` x sqrt(FWHM_maj FWHM_min), with the PSF's axis ratio
  and PA (``size="geometric"``; with ``step_fraction=0.5`` the first aperture is the PSF
  half-maximum ellipse). ``size="semi_major"`` makes the semi-major axis k x step instead.
* Radius of a profile point: the weight-averaged circular distance of its pixels from the
  centre, so that an exactly linear map oh = a + b r gives back b whatever the annulus shape.
* Radius reached (for the classification): the outer geometric-mean radius of the outermost
  annulus kept.
* Error of an annulus: sqrt(dispersion^2 + mean individual variance), see :func:`radial_profile`.

References
----------
K20 §4.2 (annuli, errors, MCMC fit, resolution criteria), §4.5 (non-axisymmetric maps),
Appendix A (binning systematics; the appendix is supplementary material, not in the seed text).
"""

# Layout (each module < 800 lines; imports only go down this list, no cycles):
#   annuli.py   PSF axes and sizes, source-plane coordinates, elliptical_annuli,
#               annulus_weights
#   profile.py  DIAGNOSTIC_LINES, gradient_pixels, radial_profile, pixel errors,
#               log_ratio_maps, oh_from_log_ratios (the "mean_ratio" route)
#   fit.py      fit_gradient (emcee / WLS), resolution_class, gradient_systematics,
#               measure_gradient, peak_centre_kpc, gradient_centre
#   maps2d.py   residual_map, correlation_area_pixels, planar_fit,
#               noise_correlation_kernel, non_axisymmetry (K20 §4.5)
#   forward_operators.py, forward.py   the forward-modelled gradient (beyond K20): linear
#               lens/PSF/pixel operators, ForwardModel, fit_forward_gradient
#               (``from klever_nb.gradients import forward``; not re-exported here)
# Only the public names are exported; private helpers stay in their modules.

from __future__ import annotations

from klever_nb.gradients.annuli import (
    annulus_weights,
    elliptical_annuli,
    elliptical_radius_kpc,
    psf_axes,
    psf_hwhm_size_kpc,
    psf_linear_size_kpc,
)
from klever_nb.gradients.fit import (
    CENTRE_USED,
    fit_gradient,
    gradient_centre,
    gradient_systematics,
    measure_gradient,
    peak_centre_kpc,
    resolution_class,
)
from klever_nb.gradients.maps2d import (
    correlation_area_pixels,
    noise_correlation_kernel,
    non_axisymmetry,
    planar_fit,
    residual_map,
)
from klever_nb.gradients.profile import (
    DIAGNOSTIC_LINES,
    gradient_pixels,
    log_ratio_maps,
    oh_from_log_ratios,
    pixel_errors,
    radial_profile,
)

__all__ = [
    "annulus_weights", "elliptical_annuli", "elliptical_radius_kpc", "psf_axes",
    "psf_hwhm_size_kpc", "psf_linear_size_kpc",
    "CENTRE_USED", "fit_gradient", "gradient_centre", "gradient_systematics",
    "measure_gradient", "peak_centre_kpc", "resolution_class",
    "correlation_area_pixels", "noise_correlation_kernel", "non_axisymmetry", "planar_fit",
    "residual_map",
    "DIAGNOSTIC_LINES", "gradient_pixels", "log_ratio_maps", "oh_from_log_ratios",
    "pixel_errors", "radial_profile",
]

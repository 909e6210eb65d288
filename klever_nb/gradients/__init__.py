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
#   profile.py  DIAGNOSTIC_LINES, radial_profile, pixel errors, log_ratio_maps,
#               oh_from_log_ratios (the "mean_ratio" route)
#   fit.py      fit_gradient (emcee / WLS), resolution_class, gradient_systematics,
#               measure_gradient, peak_centre_kpc
#   maps2d.py   residual_map, correlation_area_pixels, planar_fit,
#               noise_correlation_kernel, non_axisymmetry (K20 §4.5)
# Every top-level name of the former single module is re-exported here, private ones too.

from __future__ import annotations

from klever_nb.gradients.annuli import _FWHM_TO_SIGMA as _FWHM_TO_SIGMA
from klever_nb.gradients.annuli import _coords as _coords
from klever_nb.gradients.annuli import _ellipse_shape as _ellipse_shape
from klever_nb.gradients.annuli import _kpc_to_pixel as _kpc_to_pixel
from klever_nb.gradients.annuli import _semi_axes as _semi_axes
from klever_nb.gradients.annuli import annulus_weights as annulus_weights
from klever_nb.gradients.annuli import elliptical_annuli as elliptical_annuli
from klever_nb.gradients.annuli import elliptical_radius_kpc as elliptical_radius_kpc
from klever_nb.gradients.annuli import psf_axes as psf_axes
from klever_nb.gradients.annuli import psf_hwhm_size_kpc as psf_hwhm_size_kpc
from klever_nb.gradients.annuli import psf_linear_size_kpc as psf_linear_size_kpc
from klever_nb.gradients.fit import CENTRE_USED as CENTRE_USED
from klever_nb.gradients.fit import _emcee_line as _emcee_line
from klever_nb.gradients.fit import _nan_fit as _nan_fit
from klever_nb.gradients.fit import _wls_line as _wls_line
from klever_nb.gradients.fit import fit_gradient as fit_gradient
from klever_nb.gradients.fit import gradient_centre as gradient_centre
from klever_nb.gradients.fit import gradient_systematics as gradient_systematics
from klever_nb.gradients.fit import measure_gradient as measure_gradient
from klever_nb.gradients.fit import peak_centre_kpc as peak_centre_kpc
from klever_nb.gradients.fit import resolution_class as resolution_class
from klever_nb.gradients.maps2d import _distance_map as _distance_map
from klever_nb.gradients.maps2d import _map_arrays as _map_arrays
from klever_nb.gradients.maps2d import correlation_area_pixels as correlation_area_pixels
from klever_nb.gradients.maps2d import noise_correlation_kernel as noise_correlation_kernel
from klever_nb.gradients.maps2d import non_axisymmetry as non_axisymmetry
from klever_nb.gradients.maps2d import planar_fit as planar_fit
from klever_nb.gradients.maps2d import residual_map as residual_map
from klever_nb.gradients.profile import DIAGNOSTIC_LINES as DIAGNOSTIC_LINES
from klever_nb.gradients.profile import _diagnostics_of as _diagnostics_of
from klever_nb.gradients.profile import _profile_from_mean_ratios as _profile_from_mean_ratios
from klever_nb.gradients.profile import _valid_pixels as _valid_pixels
from klever_nb.gradients.profile import _weighted_mean_and_error as _weighted_mean_and_error
from klever_nb.gradients.profile import gradient_pixels as gradient_pixels
from klever_nb.gradients.profile import log_ratio_maps as log_ratio_maps
from klever_nb.gradients.profile import oh_from_log_ratios as oh_from_log_ratios
from klever_nb.gradients.profile import pixel_errors as pixel_errors
from klever_nb.gradients.profile import radial_profile as radial_profile

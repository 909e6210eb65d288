"""Lens reconstruction: source-plane maps, source-plane PSF and magnifications (K20 §3.2).

The flow (:func:`reconstruct_source_plane` runs it):

1. :func:`rescale_lens` puts deflection, κ, γ maps at the source redshift (D_ls/D_s).
2. :func:`rebin_to_lens_grid` rebins the IFU line maps onto the lens pixel grid by exact
   pixel overlap (flux conserving) and turns flux per spaxel into surface brightness.
3. :func:`delens` ray-traces every image pixel (β = θ − α, optionally ``subsample``² rays per
   pixel) onto a regular source grid; each source pixel is the mean of the rays landing in it
   (lensing conserves surface brightness), with ``np.bincount`` on flat indices.
4. :func:`magnification_halpha`, :func:`magnification_from_maps`, :func:`magnification_spread`
   and :func:`source_plane_psf` give the paper's μ(Hα), μ_maps (with the spread over lens
   models) and the source-plane PSF ellipse (Table 4).

:func:`forward_model` is the reverse path (beyond the paper): source → lens → PSF → IFU grid,
built on :class:`LensingOperator` (with its exact adjoint); :func:`deconvolve_source` uses it
for a Richardson–Lucy source model whose magnification (``mu_halpha_forward``) is free of the
PSF/spaxel bias that affects the paper's μ(Hα) and μ_maps on strongly magnified arcs.

Frames: a lens ``Dataset`` lives on dims ``(ly, lx)`` (rows, columns of its FITS grid) with
coordinates ``theta_x``/``theta_y`` in arcsec along the pixel axes; source positions β are in
the same frame. Source-plane maps carry ``beta_x``/``beta_y`` (arcsec, lens frame),
``xs_arcsec``/``ys_arcsec`` (arcsec from the galaxy centre) and the dims ``xs``/``ys`` in kpc
from the galaxy centre.

References: K20 §3.2.1–3.2.3; FACTS.md §10 (cosmology), §12 (measured costs).
"""

# The former single module, split by topic (STYLE.md: files under ~800 lines): maps (lens
# grids, rescaling, parametric lenses, κ/γ), registration (overlap, rebinning, alignment),
# delensing (SourceGrid, delens), forward (LensingOperator, forward model, Richardson–Lucy),
# psf (source-plane PSF), magnification (μ(Hα), μ_maps), reconstruct (top level).
# Every name of the former module is re-exported, private helpers included (tests use some),
# hence no F401 for the names outside __all__.
# ruff: noqa: F401

from klever_nb.lensing.curves import (
    caustics,
    critical_curves,
    feeding_pixels,
    landing_pixel,
    lens_at_source,
    magnification_determinant,
    ray_lookup,
    source_plane_kpc,
    trace_to_source,
)
from klever_nb.lensing.delensing import (
    SourceGrid,
    _alpha_subpixel,
    _bin_error,
    _bin_mean,
    _image_bookkeeping,
    _label_images,
    _line_values,
    _map_variables_lens,
    _subpixel_offsets,
    _trace_rays,
    delens,
    delens_reference,
    source_grid_of,
)
from klever_nb.lensing.forward import (
    LensingOperator,
    _bilinear_weights,
    _grid_of_image,
    _pad1,
    deconvolve_source,
    forward_model,
)
from klever_nb.lensing.magnification import (
    NEAR_CRITICAL_MU,
    NearCriticalWarning,
    _total_magnification,
    magnification_from_maps,
    magnification_halpha,
    magnification_spread,
)
from klever_nb.lensing.maps import (
    FWHM_PER_SIGMA,
    _celestial,
    _default_wcs_header,
    as_lens_grid,
    convergence_shear,
    lens_from_components,
    lens_from_parametric,
    rescale_lens,
    sky_to_source_arcsec,
)
from klever_nb.lensing.psf import (
    _position_angle,
    annulus_psf,
    fit_gaussian_ellipse,
    maps_psf_fwhm_arcsec,
    point_images,
    source_plane_psf,
)
from klever_nb.lensing.reconstruct import (
    _at_source,
    _mu_halpha_mc,
    reconstruct_source_plane,
    unlensed_source_maps,
)
from klever_nb.lensing.registration import (
    MAX_HST_SHIFT_ARCSEC,
    _affine_lens_to_cube,
    _axis_overlap,
    _map_variables,
    _Overlap,
    _overlap,
    _overlap_box,
    _resample_mean,
    _sb_attrs,
    check_overlap,
    hst_registration_shift,
    rebin_to_lens_grid,
)

__all__ = [
    "NearCriticalWarning", "as_lens_grid", "rescale_lens", "convergence_shear",
    "lens_from_parametric", "lens_from_components", "rebin_to_lens_grid", "hst_registration_shift", "delens", "forward_model",
    "LensingOperator", "deconvolve_source",
    "source_plane_psf", "fit_gaussian_ellipse", "magnification_halpha",
    "magnification_from_maps", "magnification_spread", "reconstruct_source_plane",
    "check_overlap", "unlensed_source_maps", "source_grid_of", "SourceGrid", "point_images",
    "delens_reference", "sky_to_source_arcsec", "maps_psf_fwhm_arcsec", "annulus_psf",
    "lens_at_source", "magnification_determinant", "trace_to_source", "critical_curves",
    "caustics", "ray_lookup", "landing_pixel", "feeding_pixels", "source_plane_kpc",
]

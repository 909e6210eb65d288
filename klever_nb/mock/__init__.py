"""Mock observatory: deterministic synthetic KMOS galaxies with known truth, written as real files.

A mock galaxy is an inclined exponential Halpha disc in the source plane with a
linear metallicity gradient; every other line follows from the C20 calibrations
(N2, R3, S2, O3O2; FACTS.md §1) and fixed ratios (FACTS.md §7), attenuated by a
uniform CCM89 screen (FACTS.md §5). The image plane is ray-traced through an
analytic lens (:mod:`klever_nb.lensmodels`) on a fine grid, convolved with a
Gaussian PSF and rebinned to 0.2" spaxels conserving flux. Each spaxel gets one
Gaussian per line on the KMOS band grids (2048 channels, K20 §2, §3.1 resolving
powers), a weak linear continuum and OH-sky-shaped Gaussian noise.

Conventions
-----------
- Angular offsets (arcsec) are from the field centre (the cube centre, CRVAL of
  every file), x along +column, y along +row; beta = theta - alpha(theta).
- ``pa_deg`` (galaxy and lens) is measured from +x towards +y (lenstronomy's
  phi); see :mod:`klever_nb.lensmodels`. The receding half of the disc lies
  towards +pa along the major axis.
- Lens-component parameters in :class:`MockSpec.lens` give the deflection for
  the galaxy's own redshift; the written maps are divided by D_ls/D_s
  (``dls_ds`` normalisation, DESIGN.md).
- Metallicity is 12+log(O/H) = central_oh + gradient * R, with R the deprojected
  radius in kpc; it is clipped to the C20 validity range (7.6-8.9) where the
  calibration polynomials stop being meaningful (far out in the disc).
- Velocity structure inside a spaxel (rotation and beam smearing) is folded into
  one Gaussian per line whose first two moments match the flux-weighted ones.

References
----------
K20 §2 (KMOS bands), §3.1 (resolving powers, fixed ratios), §3.2 (lensing);
FACTS.md §1 (C20), §5 (CCM89), §7 (ratios), §8 (KMOS format), §9 (OH sky).

Layout
------
The modules import one way, each only from those above it:

- :mod:`~klever_nb.mock.spec`: the mock constants, :class:`MockSpec` (validated),
  :func:`demo_specs`, :func:`spec_to_dict`;
- :mod:`~klever_nb.mock.physics`: line ratios, dust screen, the source-plane disc;
- :mod:`~klever_nb.mock.render`: image-plane maps (ray tracing, PSF, rebinning), band
  cubes and noise, lens maps and the HST-like image;
- :mod:`~klever_nb.mock.truth`: true source-plane maps and the ``truth`` dict;
- :mod:`~klever_nb.mock.galaxy`: :class:`MockGalaxy` and :func:`make_mock`;
- :mod:`~klever_nb.mock.strong`: the strong-lensing grid (:func:`strong_lensing_specs`,
  :func:`lensed_images`, :func:`halpha_magnification`).

Writing mocks as files is :mod:`klever_nb.io.mockfiles` (the mock builds objects, io
writes them); this package does not import :mod:`klever_nb.io`.
"""

from __future__ import annotations

from klever_nb.mock.galaxy import MockGalaxy, make_mock
from klever_nb.mock.physics import (
    disc_model,
    dust_transmission,
    line_ratios_to_halpha,
    oh_range,
)
from klever_nb.mock.render import _add_lines as _add_lines  # tests/test_mock.py
from klever_nb.mock.render import (
    band_wavelengths,
    celestial_header,
    hst_continuum_image,
    image_plane_maps,
    lens_maps,
    noise_shape,
)
from klever_nb.mock.spec import (
    CALIBRATION_SET,
    CONTINUUM_EW_HALPHA_REST,
    CONTINUUM_SLOPE,
    FLUX_UNIT_CGS,
    FLUX_UNITS,
    LOG_MSTAR_ERR,
    MOCK_LINES,
    NOISE_FLOOR,
    NOISE_SKY,
    OII_3729_TO_3727,
    SII_6717_TO_6731,
    SIII_9531_TO_HALPHA,
    MockSpec,
    demo_specs,
    spec_to_dict,
)
from klever_nb.mock.strong import (
    STRONG_LENSING_CUBE_MARGIN_ARCSEC,
    STRONG_LENSING_MIN_SIDE,
    STRONG_LENSING_MU_RANGE,
    STRONG_LENSING_SHAPE,
    STRONG_LENSING_Z_WINDOWS,
    halpha_magnification,
    lensed_images,
    strong_lensing_specs,
)
from klever_nb.mock.truth import source_maps

__all__ = [
    "CALIBRATION_SET",
    "CONTINUUM_EW_HALPHA_REST",
    "CONTINUUM_SLOPE",
    "FLUX_UNITS",
    "FLUX_UNIT_CGS",
    "LOG_MSTAR_ERR",
    "MOCK_LINES",
    "NOISE_FLOOR",
    "NOISE_SKY",
    "OII_3729_TO_3727",
    "SII_6717_TO_6731",
    "SIII_9531_TO_HALPHA",
    "STRONG_LENSING_CUBE_MARGIN_ARCSEC",
    "STRONG_LENSING_MIN_SIDE",
    "STRONG_LENSING_MU_RANGE",
    "STRONG_LENSING_SHAPE",
    "STRONG_LENSING_Z_WINDOWS",
    "MockGalaxy",
    "MockSpec",
    "band_wavelengths",
    "celestial_header",
    "demo_specs",
    "disc_model",
    "dust_transmission",
    "halpha_magnification",
    "hst_continuum_image",
    "image_plane_maps",
    "lens_maps",
    "lensed_images",
    "line_ratios_to_halpha",
    "make_mock",
    "noise_shape",
    "oh_range",
    "source_maps",
    "spec_to_dict",
    "strong_lensing_specs",
]

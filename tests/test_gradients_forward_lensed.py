"""Forward gradient with the band registration sampled (issue 21: honest errors)."""

from __future__ import annotations

import numpy as np
from test_gradients_forward import GRID, LENS, SHAPE, band_shifted_flux, maps_of

from klever_nb.gradients import forward as fg


def test_vectorised_shift_matrices_equal_the_single_ones():
    shifts = np.array([0.0, 0.37, -1.6, 2.0])
    stack = fg._shift_matrices_1d(11, shifts)
    for k, shift in enumerate(shifts):
        assert np.allclose(stack[k], fg._shift_matrix_1d(11, shift), atol=1e-14)


def test_band_shifts_are_sampled_with_the_disc_and_the_truth_is_recovered():
    """register_bands='absolute' used to fix every band's shift at its maximum-posterior value
    before emcee; now the shifts are parameters of the chain (their error is reported and
    enters the gradient error). Truth: a YJ band displaced by (0.4, -0.3) spaxel."""
    operator = fg.affine_forward(LENS, source_ys_kpc=GRID, source_xs_kpc=GRID, ifu_shape=SHAPE,
                                 pixel_scale_arcsec=0.2, psf_fwhm_arcsec=0.6)
    shift_yx = (0.4, -0.3)
    flux = band_shifted_flux(shift_yx)
    sigma = flux[0].max() / 30
    noisy = flux + np.random.default_rng(3).normal(0, sigma, flux.shape)
    maps = maps_of(noisy, sigma).assign_coords(band=("line", ["H", "H", "YJ", "YJ"]))
    result = fg.fit_forward_gradient(maps, lens_forward=operator, source_grid_kpc=(GRID, GRID),
                                     diagnostics=["N2", "R3"], register_bands="absolute",
                                     nwalkers=24, nsteps=150, seed=1)
    model = result["model"]
    assert model.sampled_bands == ["H", "YJ"] and model.ndim == 11
    errs = result["band_shifts_err_pix"]
    assert set(errs) == {"H", "YJ"} and all(0 < e < 0.3 for v in errs.values() for e in v)
    relative = np.subtract(result["band_shifts_pix"]["YJ"], result["band_shifts_pix"]["H"])
    assert np.allclose(relative, shift_yx, atol=0.15)
    pull = (result["gradient_dex_per_kpc"] + 0.04) / result["gradient_err"]
    assert abs(pull) < 3
    assert result["gradient_err"] > 0

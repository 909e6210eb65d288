"""Tests of the image-plane forward-modelled gradient (klever_nb.gradients.forward)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from scipy.ndimage import gaussian_filter

from klever_nb.calibrations import get_calibration
from klever_nb.errors import ConfigError, InputError
from klever_nb.gradients import forward as fg

N2, R3 = get_calibration("N2"), get_calibration("R3")
LINES = ["Halpha", "NII_6584", "Hbeta", "OIII_5007"]


def disc_lines(h=1.2, oh0=8.45, grad=-0.04, q=0.8, pa=30.0):
    """Analytic source surface brightness of the four lines (exponential disc + gradient)."""
    def func(x, y):
        pr = np.deg2rad(pa)
        u = x * np.cos(pr) + y * np.sin(pr)
        v = -x * np.sin(pr) + y * np.cos(pr)
        sigma = np.exp(-np.hypot(u, v / q) / h)
        oh = oh0 + grad * np.hypot(x, y)
        hbeta = sigma / 2.87
        return np.stack([sigma, sigma * 10 ** N2.log_ratio(oh), hbeta,
                         hbeta * 10 ** R3.log_ratio(oh)])
    return func


def maps_of(flux, err):
    return xr.Dataset({"flux": (("line", "y", "x"), flux),
                       "flux_err": (("line", "y", "x"), np.broadcast_to(err, flux.shape))},
                      coords={"line": LINES}, attrs={"pixel_scale_arcsec": 0.2})


LENS = fg.AffineLens(kpc_per_arcsec=8.69, mu_tangential=2.5, mu_radial=1.6,
                     tangential_angle_deg=20.0)
SHAPE = (18, 22)
GRID = np.arange(-12, 13) * 0.4


@pytest.fixture(scope="module")
def operator():
    return fg.affine_forward(LENS, source_ys_kpc=GRID, source_xs_kpc=GRID, ifu_shape=SHAPE,
                             pixel_scale_arcsec=0.2, psf_fwhm_arcsec=0.6)


def test_affine_operator_matches_the_analytic_rendering_for_a_smooth_source():
    ys = xs = np.arange(-30, 31) * 0.1
    op = fg.affine_forward(LENS, source_ys_kpc=ys, source_xs_kpc=xs, ifu_shape=SHAPE,
                           pixel_scale_arcsec=0.2, psf_fwhm_arcsec=0.6)

    def gauss(x, y):
        return np.exp(-0.5 * ((x - 0.3) ** 2 + (y + 0.2) ** 2) / 0.6**2)

    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    direct = fg.affine_render(LENS, gauss, ifu_shape=SHAPE, pixel_scale_arcsec=0.2,
                              psf_fwhm_arcsec=0.6, oversample=5)
    assert np.abs(op(gauss(xx, yy)) - direct).max() < 3e-3 * direct.max()
    # flux conservation: total IFU flux = magnification x source flux (arcsec^2 units)
    src_flux = 2 * np.pi * 0.6**2 / 8.69**2
    assert direct.sum() == pytest.approx(LENS.magnification * src_flux, rel=1e-3)


def test_affine_source_psf_is_the_image_psf_shrunk_by_the_stretches():
    psf = LENS.source_psf(0.6)
    assert psf["fwhm_major_kpc"] == pytest.approx(0.6 / 1.6 * 8.69)
    assert psf["fwhm_minor_kpc"] == pytest.approx(0.6 / 2.5 * 8.69)
    assert psf["theta_deg"] == pytest.approx(110.0)
    assert "pa_deg" not in psf  # a bare PA would not say its frame (FACTS.md §13)


def test_probing_a_callable_gives_its_matrix_and_rejects_nonlinear_ones(operator):
    small = fg.affine_forward(LENS, source_ys_kpc=GRID[::3], source_xs_kpc=GRID[::3],
                              ifu_shape=(6, 7), pixel_scale_arcsec=0.6, psf_fwhm_arcsec=0.6)
    probed = fg.linear_operator(lambda img: small(img), small.source_shape)
    assert np.allclose(probed.matrix.toarray(), small.matrix.toarray(), atol=1e-14)
    assert fg.linear_operator(operator, operator.source_shape) is operator
    with pytest.raises(ConfigError, match="not linear"):
        fg.linear_operator(lambda img: small(img) ** 2, small.source_shape)


def test_affine_delens_reads_surface_brightness_back():
    lens = fg.AffineLens(kpc_per_arcsec=8.69, mu_tangential=3.0, mu_radial=1.5)
    ny, nx = 30, 40
    yy, xx = np.mgrid[0:ny, 0:nx]
    theta_x, theta_y = (xx - (nx - 1) / 2) * 0.2, (yy - (ny - 1) / 2) * 0.2
    bx, by = lens.to_source_kpc(theta_x, theta_y)
    image = 1.0 + 0.1 * bx - 0.05 * by  # linear in the source plane
    ys = xs = np.linspace(-1.5, 1.5, 13)
    back = fg.affine_delens(image, lens, source_ys_kpc=ys, source_xs_kpc=xs,
                            pixel_scale_arcsec=0.2)
    syy, sxx = np.meshgrid(ys, xs, indexing="ij")
    assert np.allclose(back, 1.0 + 0.1 * sxx - 0.05 * syy, atol=1e-9)


def test_the_noiseless_maximum_posterior_recovers_the_gradient(operator):
    flux = fg.affine_render(LENS, disc_lines(), ifu_shape=SHAPE, pixel_scale_arcsec=0.2,
                            psf_fwhm_arcsec=0.6)
    maps = maps_of(flux, flux[0].max() / 30)
    for scatter in ("offset", "none"):
        model = fg.ForwardModel(maps, operator, source_ys_kpc=GRID, source_xs_kpc=GRID,
                                diagnostics=["N2", "R3"], calibration_scatter=scatter)
        best = model.initial_guess()
        assert best[6] == pytest.approx(-0.04, abs=1e-3)
        assert best[5] == pytest.approx(8.45, abs=0.01)


def test_a_noisy_synthetic_galaxy_gives_the_gradient_within_its_errors(operator):
    flux = fg.affine_render(LENS, disc_lines(grad=0.03, oh0=8.3), ifu_shape=SHAPE,
                            pixel_scale_arcsec=0.2, psf_fwhm_arcsec=0.6)
    noise = flux[0].max() / 30
    rng = np.random.default_rng(5)
    maps = maps_of(flux + rng.normal(0, noise, flux.shape), noise)
    result = fg.fit_forward_gradient(maps, lens_forward=operator,
                                     source_grid_kpc=(GRID, GRID), nwalkers=20, nsteps=500,
                                     seed=1)
    assert abs(result["gradient_dex_per_kpc"] - 0.03) < 3 * result["gradient_err"]
    assert 0.002 < result["gradient_err"] < 0.02
    assert abs(result["central_oh"] - 8.3) < 3 * result["central_oh_err"] + 0.02
    assert result["samples"].shape[1] == 2
    assert np.isfinite(result["chi2"]) and result["n_data"] == 4 * SHAPE[0] * SHAPE[1]
    model_maps = result["model"].model_maps(result["map"])
    assert model_maps["model"].shape == (4, *SHAPE)


def test_an_identity_lens_callable_with_scipy_psf_and_block_rebin_works():
    """Unlensed galaxy: identity lens, Gaussian PSF (scipy) and 2x2 block-sum rebinning."""
    pix = 0.25
    src = np.arange(-12, 12) * pix + pix / 2  # 24 x 24 source pixels, 12 x 12 IFU pixels

    def lens_forward(image):
        blurred = gaussian_filter(image, sigma=1.2 / 2.3548 / pix, mode="constant")
        return blurred.reshape(12, 2, 12, 2).sum(axis=(1, 3))

    yy, xx = np.meshgrid(src, src, indexing="ij")
    truth = disc_lines(h=0.8, grad=-0.06, oh0=8.5)(xx, yy)
    flux = np.array([lens_forward(t) for t in truth])
    maps = maps_of(flux, flux[0].max() / 100)
    op = fg.linear_operator(lens_forward, (24, 24))
    model = fg.ForwardModel(maps, op, source_ys_kpc=src, source_xs_kpc=src,
                            diagnostics=["N2", "R3"])
    best = model.initial_guess()
    assert best[6] == pytest.approx(-0.06, abs=1e-3)


def test_bad_inputs_raise_one_line_errors(operator):
    flux = np.ones((4, *SHAPE))
    with pytest.raises(ConfigError, match="Balmer"):
        fg.ForwardModel(maps_of(flux, 1.0), operator, source_ys_kpc=GRID,
                        source_xs_kpc=GRID, diagnostics=["O3O2"])
    with pytest.raises(InputError, match="needs lines"):
        fg.ForwardModel(maps_of(flux, 1.0), operator, source_ys_kpc=GRID,
                        source_xs_kpc=GRID, diagnostics=["S2"])
    with pytest.raises(InputError, match="pixels"):
        fg.ForwardModel(maps_of(np.ones((4, 5, 5)), 1.0), operator, source_ys_kpc=GRID,
                        source_xs_kpc=GRID, diagnostics=["N2"])


def test_an_extra_ifu_psf_is_applied_when_asked():
    pix = 0.25
    src = np.arange(-12, 12) * pix + pix / 2

    def rebin(image):  # identity lens and 2x2 block sum, no PSF
        return image.reshape(12, 2, 12, 2).sum(axis=(1, 3))

    blur = fg._ifu_psf_matrix((12, 12), 2.0)
    assert blur[5 * 12 + 5].sum() == pytest.approx(1.0, abs=1e-3)  # an interior pixel
    yy, xx = np.meshgrid(src, src, indexing="ij")
    truth = disc_lines(h=0.8, grad=0.05, oh0=8.3)(xx, yy)
    flux = np.array([(blur @ rebin(t).ravel()).reshape(12, 12) for t in truth])
    maps = maps_of(flux, flux[0].max() / 200)
    maps.attrs["pixel_scale_arcsec"] = 0.3
    result = fg.fit_forward_gradient(maps, lens_forward=rebin, source_grid_kpc=(src, src),
                                     psf_fwhm_arcsec=0.6, nwalkers=16, nsteps=150, seed=0)
    assert result["map"][6] == pytest.approx(0.05, abs=1e-3)
    assert not result["converged"] and "run longer" in result["message"]


@pytest.mark.parametrize("scatter", ["offset", "none"])
def test_residual_vector_and_vectorised_likelihood_agree_with_a_loop(operator, scatter):
    flux = fg.affine_render(LENS, disc_lines(), ifu_shape=SHAPE, pixel_scale_arcsec=0.2,
                            psf_fwhm_arcsec=0.6)
    rng = np.random.default_rng(0)
    maps = maps_of(flux + rng.normal(0, flux[0].max() / 20, flux.shape), flux[0].max() / 20)
    model = fg.ForwardModel(maps, operator, source_ys_kpc=GRID, source_xs_kpc=GRID,
                            diagnostics=["N2", "R3"], calibration_scatter=scatter)
    thetas = np.array([[0.1, -0.1, 0.1, 0.05, 0.1, 8.4, -0.03],
                       [0.0, 0.2, 0.0, -0.1, 0.0, 8.6, 0.02]])
    batch = model.log_likelihood(thetas)
    loop = np.array([model.log_likelihood(t)[0] for t in thetas])
    assert np.allclose(batch, loop, rtol=1e-12)
    assert np.allclose(-0.5 * (model.residuals(thetas) ** 2).sum(axis=1), batch, rtol=1e-9)


def test_too_few_walkers_is_a_config_error(operator):
    flux = np.ones((4, *SHAPE))
    with pytest.raises(ConfigError, match="nwalkers"):
        fg.fit_forward_gradient(maps_of(flux, 1.0), lens_forward=operator,
                                source_grid_kpc=(GRID, GRID), nwalkers=8)


def _tan_header(shape, pixel_arcsec):
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [0.0, 0.0]
    w.wcs.crpix = [(shape[1] - 1) / 2 + 1, (shape[0] - 1) / 2 + 1]
    w.wcs.cdelt = [-pixel_arcsec / 3600.0, pixel_arcsec / 3600.0]
    return w.to_header_string()


def test_the_lensing_adapter_agrees_with_the_affine_operator():
    """Two independent implementations (klever_nb.lensing rays vs the affine operator)."""
    lensing = pytest.importorskip("klever_nb.lensing")
    if not hasattr(lensing, "LensingOperator"):
        pytest.skip("klever_nb.lensing.LensingOperator not available")
    jac = LENS.jacobian()

    class Affine:  # beta = A theta, i.e. alpha = theta - A theta
        def deflection(self, x, y):
            return x - (jac[0, 0] * x + jac[0, 1] * y), y - (jac[1, 0] * x + jac[1, 1] * y)

    lens = lensing.lens_from_parametric(Affine(), grid_like=((140, 140), 0.05, None))
    kpc = LENS.kpc_per_arcsec
    ys = xs = np.arange(-15, 16) * 0.2
    source_maps = xr.Dataset(coords={"ys": ys, "xs": xs, "beta_y": ("ys", ys / kpc),
                                     "beta_x": ("xs", xs / kpc)},
                             attrs={"source_pixel_arcsec": 0.2 / kpc})
    op, (sys_, sxs) = fg.lens_forward_from_lensing(
        lens, source_maps=source_maps, psf_fwhm_arcsec=0.6, ifu_wcs=_tan_header(SHAPE, 0.2),
        ifu_shape=SHAPE, subsample=2)
    assert np.array_equal(sys_, ys) and np.array_equal(sxs, xs)
    mine = fg.affine_forward(LENS, source_ys_kpc=ys, source_xs_kpc=xs, ifu_shape=SHAPE,
                             pixel_scale_arcsec=0.2, psf_fwhm_arcsec=0.6)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    source = np.exp(-0.5 * ((xx - 0.4) ** 2 + (yy + 0.3) ** 2) / 0.8**2)
    a, b = op(source), mine(source)
    assert a.sum() == pytest.approx(b.sum(), rel=0.02)
    assert np.abs(a - b).max() < 0.03 * b.max()


def band_shifted_flux(shift_yx: tuple[float, float]) -> np.ndarray:
    """Line images of the disc whose Hbeta and [OIII] (the YJ band) are moved by ``shift_yx``
    IFU pixels (y, x): the disc centre moved through the lens Jacobian."""
    theta = np.array([shift_yx[1], shift_yx[0]]) * 0.2  # arcsec (x, y) of the disc centre
    moved = fg.AffineLens(kpc_per_arcsec=LENS.kpc_per_arcsec,
                          mu_tangential=LENS.mu_tangential, mu_radial=LENS.mu_radial,
                          tangential_angle_deg=LENS.tangential_angle_deg,
                          source_centre_kpc=tuple(-LENS.jacobian() @ theta
                                                  * LENS.kpc_per_arcsec))
    render = dict(ifu_shape=SHAPE, pixel_scale_arcsec=0.2, psf_fwhm_arcsec=0.6)
    flux = fg.affine_render(LENS, disc_lines(), **render)
    flux[2:] = fg.affine_render(moved, disc_lines(), **render)[2:]  # Hbeta, OIII_5007
    return flux


def test_a_misregistered_hbeta_band_is_registered_and_the_gradient_recovered(operator):
    """Regression (z = 1.4 demo mock): Hbeta+[OIII] in YJ displaced by ~0.7 spaxel from
    Halpha+[NII] in H (band alignment on the continuum of an arc) biased the forward gradient
    (-0.018 instead of -0.040 dex/kpc). Registering the bands on the model removes it."""
    shift_yx = (1.0, -0.4)  # pixels, the YJ band's image moved along +y, -x
    flux = band_shifted_flux(shift_yx)
    maps = maps_of(flux, flux[0].max() / 30).assign_coords(band=("line", ["H", "H", "YJ",
                                                                          "YJ"]))
    kwargs = dict(source_ys_kpc=GRID, source_xs_kpc=GRID, diagnostics=["N2", "R3"])
    model = fg.ForwardModel(maps, operator, **kwargs)
    assert model.observable_bands == ["H", "H", "YJ", "YJ"]
    ignored = model.initial_guess()
    assert ignored[6] > -0.035  # -0.0327: the bias
    shifts = model.band_shifts(ignored, fixed_band="H")
    assert shifts["H"] == (0.0, 0.0)
    assert 0.3 < shifts["YJ"][0] < 1.0  # the disc centre took up part of the shift
    result = fg.fit_forward_gradient(maps, lens_forward=operator,
                                     source_grid_kpc=(GRID, GRID), diagnostics=["N2", "R3"],
                                     register_bands="relative", nwalkers=16, nsteps=40)
    assert result["band_shifts_pix"]["H"] == (0.0, 0.0)
    assert np.allclose(result["band_shifts_pix"]["YJ"], shift_yx, atol=0.05)
    assert result["map"][6] == pytest.approx(-0.04, abs=1.5e-3)
    with pytest.raises(ConfigError, match="one registration shift"):
        fg._observable_shifts([("S2", ("SII_6717", "SII_6731"), 1)],
                              {"SII_6717": (0.5, 0.0)})
    with pytest.raises(ConfigError, match="register_bands"):
        fg.fit_forward_gradient(maps, lens_forward=operator, source_grid_kpc=(GRID, GRID),
                                register_bands="both")
    with pytest.raises(InputError, match="'band' coordinate"):
        fg.ForwardModel(maps.drop_vars("band"), operator, **kwargs).band_shifts(ignored)


def test_the_shift_matrix_moves_an_image_like_scipy_and_keeps_integer_shifts_exact():
    from scipy.ndimage import shift as nd_shift

    yy, xx = np.mgrid[0:20, 0:24]
    image = np.exp(-0.5 * ((yy - 9.3) ** 2 + (xx - 11.6) ** 2) / 2.5**2)
    moved = (fg.shift_matrix(image.shape, (0.6, -1.3)) @ image.ravel()).reshape(image.shape)
    assert np.abs(moved - nd_shift(image, (0.6, -1.3), order=3)).max() < 0.01
    whole = (fg.shift_matrix(image.shape, (2.0, -1.0)) @ image.ravel()).reshape(image.shape)
    assert np.allclose(whole[2:, :-1], image[:-2, 1:], atol=1e-12)

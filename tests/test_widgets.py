"""The widgets driven without a browser: a control or a click gives what the package computes.

Each test sets the state exactly as the front end would (a control's ``value``,
the heat map's ``selected``) and compares what the marks hold with a direct call
of the package stage (STYLE.md lesson 9).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from klever_nb import constants, fitting, mock
from klever_nb.errors import ConfigError
from klever_nb.widgets import LineFitExplorer
from klever_nb.widgets._common import WIDGET_VIEW_MIME

HAS_SPECTRA = importlib.util.find_spec("klever_nb.spectra") is not None


@pytest.fixture(scope="module")
def galaxy():
    return mock.make_mock(mock.demo_specs()[0])


@pytest.fixture(scope="module")
def h_fit(galaxy):
    """The package's own fit of the H band (Halpha, [NII], [SII] at z = 1.4), with the model."""
    cube = galaxy.cubes["H"].to_dataset()
    lines = constants.lines_in_range(float(cube.wave.min()), float(cube.wave.max()),
                                     galaxy.spec.redshift, constants.PAPER_LINES)
    return fitting.fit_cube(cube, redshift=galaxy.spec.redshift, lines=lines,
                            return_model=True)


@pytest.fixture
def explorer(galaxy):
    ex = LineFitExplorer(galaxy.cubes, smooth_fwhm=0.0, line="Halpha")
    ex.widget  # noqa: B018 - build the front-end models as a notebook would
    return ex


def test_lines_are_grouped_by_the_band_they_fall_in(explorer):
    assert explorer.band_lines["H"] == ("NII_6548", "Halpha", "NII_6584", "SII_6717", "SII_6731")
    assert explorer.band_lines["YJ"] == ("Hbeta", "OIII_4959", "OIII_5007")
    assert explorer.band == "H"


def test_selected_spaxel_shows_its_cube_spectrum_noise_and_package_model(explorer, galaxy, h_fit):
    y, x = 13, 9
    explorer.select(y, x)
    marks = explorer.marks
    cube = galaxy.cubes["H"].to_dataset()
    wave = np.asarray(marks["data"].x)
    sel = np.isin(cube["wave"].values, wave)
    assert sel.sum() == wave.size > 50
    np.testing.assert_array_equal(np.asarray(marks["data"].y), cube["flux"].values[sel, y, x])
    np.testing.assert_array_equal(np.asarray(marks["noise"].y), cube["noise"].values[sel, y, x])
    np.testing.assert_allclose(np.asarray(marks["model"].y),
                               h_fit["model"].transpose("wave", "y", "x").values[sel, y, x],
                               rtol=1e-10, atol=1e-12, equal_nan=True)
    # the window holds Halpha at the systemic redshift, and the marker sits on the spaxel
    halpha_um = constants.LINES["Halpha"].wave_vac * (1 + galaxy.spec.redshift) / 1e4
    assert wave.min() < halpha_um < wave.max()
    assert (marks["marker"].x[0], marks["marker"].y[0]) == (x, y)
    assert "y=13, x=9" in explorer._ui["spec_fig"].title


def test_sky_band_marks_the_channels_the_fitter_masks(explorer, h_fit):
    sky_y = np.asarray(explorer.marks["sky"].y)
    masked = sky_y == sky_y.max()
    n_window = masked.sum()
    # the fitter reports how many channels of the band it masked; the window holds part of them
    assert 0 < n_window <= h_fit.attrs["sky_channels_masked"]


def test_sky_mask_shown_is_the_mask_the_fit_used(explorer, galaxy):
    """The shaded channels are exactly :func:`klever_nb.fitting.fit_sky_mask` of the fitted cube."""
    explorer.select(12, 12)
    cube = galaxy.cubes["H"].to_dataset()
    mask = fitting.fit_sky_mask(cube, fitting.FitSettings())
    wave = explorer.spectrum["wave"].values
    sel = np.isin(cube["wave"].values, wave)
    assert mask[sel].any()  # the Halpha window holds OH lines
    np.testing.assert_array_equal(explorer.spectrum["sky_mask"].values, mask[sel])
    sky_y = np.asarray(explorer.marks["sky"].y)
    np.testing.assert_array_equal(sky_y == sky_y.max(), mask[sel])


def test_line_fit_explorer_fits_only_when_shown_or_asked(galaxy):
    ex = LineFitExplorer(galaxy.cubes, smooth_fwhm=0.0, line="Halpha")
    ex.snr_threshold = 4.0
    ex.line = "NII_6584"
    assert not ex._cache  # nothing fitted yet
    y, x = ex.selected_spaxel  # the default spaxel needs the fit: the first access runs it
    assert list(ex._cache) == [("H", 0.0)]
    snr = ex.maps["snr"].sel(line="NII_6584").values
    assert snr[y, x] == np.nanmax(snr)


def test_click_on_the_map_selects_that_spaxel(explorer, galaxy):
    # the message bqplot's Image mark sends for a click at data coordinates (x=16.8, y=4.2)
    explorer.marks["image"]._handle_custom_msgs(
        None, {"event": "element_click", "data": {"click_x": 16.8, "click_y": 4.2}})
    assert explorer.selected_spaxel == (4, 17)
    np.testing.assert_array_equal(np.asarray(explorer.marks["data"].y),
                                  explorer.spectrum["flux"].values)
    assert explorer.spectrum.attrs["y"] == 4 and explorer.spectrum.attrs["x"] == 17


def test_snr_slider_masks_exactly_the_pixels_below_the_package_snr(explorer, h_fit):
    snr = h_fit["snr"].sel(line="Halpha").values
    ok_fit = h_fit["fit_ok"].sel(line="Halpha").values.astype(bool)
    counts = {}
    for threshold in (3.0, 8.0):
        n_fits_before = len(explorer._cache)
        png_before = bytes(explorer.image_map.png.value)
        explorer.controls["snr"].value = threshold  # the slider
        assert explorer.snr_threshold == threshold
        shown = explorer.image_map.image
        expected_masked = ~(ok_fit & (snr > threshold))
        np.testing.assert_array_equal(np.isnan(shown), expected_masked)
        np.testing.assert_allclose(shown[~expected_masked],
                                   h_fit["flux"].sel(line="Halpha").values[~expected_masked])
        assert len(explorer._cache) == n_fits_before  # masking never refits
        if threshold == 8.0:
            assert bytes(explorer.image_map.png.value) != png_before  # the drawn image changed
        counts[threshold] = int(expected_masked.sum())
    assert counts[8.0] > counts[3.0]


def test_quantity_toggle_maps_the_package_velocity(explorer, h_fit):
    explorer.controls["quantity"].value = "velocity"
    shown = explorer.image_map.image
    velocity = h_fit["velocity"].sel(line="Halpha").values
    keep = np.isfinite(shown)
    assert keep.sum() > 20
    np.testing.assert_allclose(shown[keep], velocity[keep])
    lo, hi = explorer.image_map.vrange
    assert lo == -hi  # diverging colours centred on the systemic velocity


def test_line_dropdown_switches_band_and_fits_it_once(explorer, galaxy):
    explorer.controls["line"].value = "OIII_5007"
    assert explorer.line == "OIII_5007" and explorer.band == "YJ"
    oiii_um = constants.LINES["OIII_5007"].wave_vac * (1 + galaxy.spec.redshift) / 1e4
    wave = np.asarray(explorer.marks["data"].x)
    assert wave.min() < oiii_um < wave.max()
    keys = set(explorer._cache)
    explorer.controls["line"].value = "Hbeta"  # same band: no new fit
    assert set(explorer._cache) == keys
    names = [row["line"] for row in explorer.line_table()]
    assert names == ["Hbeta", "OIII_4959", "OIII_5007"]
    assert "[OIII]5007" in explorer._ui["table"].value


@pytest.mark.skipif(not HAS_SPECTRA, reason="klever_nb.spectra (smoothing) not in the tree yet")
def test_smoothing_slider_refits_only_the_current_band_with_the_package_smoothing(explorer,
                                                                                  galaxy):
    from klever_nb import spectra

    explorer.controls["smooth"].value = 0.4
    assert explorer.last_refit_seconds > 0
    assert set(explorer._cache) == {("H", 0.0), ("H", 0.4)}
    smoothed = spectra.smooth_cube(galaxy.cubes["H"].to_dataset(), fwhm_arcsec=0.4)
    y, x = explorer.selected_spaxel
    sel = np.isin(smoothed["wave"].values, np.asarray(explorer.marks["data"].x))
    np.testing.assert_allclose(np.asarray(explorer.marks["data"].y),
                               smoothed["flux"].values[sel, y, x], rtol=1e-12)
    explorer.snr_threshold = 4.0
    assert explorer.last_refit_seconds == 0.0


def test_refit_is_the_code_twin_of_the_sliders(explorer):
    seconds = explorer.refit()
    assert seconds > 0 and explorer.last_refit_seconds == seconds


def test_static_figure_and_fallback_bundle(explorer):
    import matplotlib.pyplot as plt

    explorer.select(12, 12)
    fig = explorer.static_figure()
    assert len(fig.axes) >= 3
    plt.close(fig)
    bundle = explorer._repr_mimebundle_()
    assert WIDGET_VIEW_MIME in bundle and bundle["image/png"]


def test_bad_requests_are_one_line_errors(galaxy, explorer):
    with pytest.raises(ConfigError, match="outside the 24x24 map"):
        explorer.select(30, 2)
    with pytest.raises(ConfigError, match="not fitted"):
        LineFitExplorer(galaxy.cubes, line="Paalpha", smooth_fwhm=0.0)
    with pytest.raises(ConfigError, match="no line"):
        LineFitExplorer(galaxy.cubes, lines=["Paalpha"], smooth_fwhm=0.0)


def test_single_cube_without_redshift_attrs_needs_redshift(galaxy):
    cube = galaxy.cubes["H"].to_dataset()
    cube.attrs.pop("redshift", None)
    with pytest.raises(ConfigError, match="redshift="):
        LineFitExplorer(cube, smooth_fwhm=0.0)
    ex = LineFitExplorer(cube, redshift=galaxy.spec.redshift, smooth_fwhm=0.0,
                         lines=("Halpha", "NII_6584"))
    assert ex.band_lines == {"H": ("Halpha", "NII_6584")}


# ---------------------------------------------------------------------------------------------
# LensExplorer
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lens_setup(galaxy):
    from klever_nb import lensing
    from klever_nb.lensmodels import ParametricLens

    spec = galaxy.spec
    cube = galaxy.cubes["H"].to_dataset()
    maps = fitting.fit_cube(cube, redshift=spec.redshift, lines=("Halpha", "NII_6584"))
    comps = [dict(c) for c in spec.lens.components]
    comps[0]["theta_e"] *= 1.05
    alt = lensing.lens_from_parametric(ParametricLens(tuple(comps)),
                                       grid_like=lensing.as_lens_grid(galaxy.lens_maps),
                                       normalisation="source")
    lenses = {"true": galaxy.lens_maps, "theta_e+5%": alt}
    kwargs = {"redshift": spec.redshift, "cube_wcs": cube.attrs["wcs"],
              "psf_fwhm_arcsec": spec.psf_fwhm_arcsec}
    return maps, lenses, kwargs


@pytest.fixture
def lens_explorer(lens_setup):
    from klever_nb.widgets import LensExplorer

    maps, lenses, kwargs = lens_setup
    ex = LensExplorer(maps, lenses, **kwargs)
    ex.widget  # noqa: B018
    return ex


def test_image_click_lands_in_the_package_source_pixel_and_back(lens_explorer, lens_setup):
    from klever_nb import lensing

    ex = lens_explorer
    row, col = ex.selected_image_pixel  # starts on the brightest image pixel
    srow, scol = ex.selected_source_pixel
    assert srow >= 0
    src = ex.source
    # the lookup is the package's, on the reconstruction's own rays (subsample^2 per pixel)
    maps, lenses, kwargs = lens_setup
    lens = lensing.lens_at_source(lenses["true"], redshift=kwargs["redshift"])
    rays = lensing.ray_lookup(src, lens, ly=ex._entry()["sb"]["ly"].values,
                              lx=ex._entry()["sb"]["lx"].values)
    assert rays.sizes["ray"] == src.attrs["subsample"] ** 2 == 4
    np.testing.assert_array_equal(ex.rays["source_index"].values, rays["source_index"].values)
    assert (srow, scol) == lensing.landing_pixel(rays, row, col)
    # the drawn rays of the clicked pixel are its package rays, in the source panel's kpc
    kx, ky = lensing.source_plane_kpc(src, rays["beta_x"].values[row, col],
                                      rays["beta_y"].values[row, col])
    np.testing.assert_allclose(np.asarray(ex.marks["landing"].x), kx)
    np.testing.assert_allclose(np.asarray(ex.marks["landing"].y), ky)
    # vice versa: the image pixels feeding that source pixel include the clicked one
    feeding = ex.source_to_image(srow, scol)
    np.testing.assert_array_equal(feeding, lensing.feeding_pixels(rays, srow, scol))
    assert any((feeding == [row, col]).all(axis=1))
    np.testing.assert_allclose(np.asarray(ex.marks["feeding"].x),
                               ex._entry()["theta_x"][feeding[:, 1]])


def test_lens_explorer_reconstructs_only_when_shown_or_asked(lens_setup):
    from klever_nb.widgets import LensExplorer

    maps, lenses, kwargs = lens_setup
    ex = LensExplorer(maps, lenses, **kwargs)
    ex.source_pixel_arcsec = 0.1
    ex.lens_model = "theta_e+5%"
    assert not ex._cache  # nothing reconstructed yet
    assert ex.selected_source_pixel == ex.image_to_source(*ex.selected_image_pixel)
    assert list(ex._cache) == [("theta_e+5%", 0.1)]


def test_a_click_on_the_image_panel_selects_that_pixel(lens_explorer):
    ex = lens_explorer
    img = ex.panels["image"]
    x, y = float(img.x_coords[5]), float(img.y_coords[7])
    ex.panels["image"].mark._handle_custom_msgs(
        None, {"event": "element_click", "data": {"click_x": x + 0.01, "click_y": y - 0.01}})
    assert ex.selected_image_pixel == (7, 5)
    src = ex.panels["source"]
    ex.panels["source"].mark._handle_custom_msgs(
        None, {"event": "element_click", "data": {"click_x": float(src.x_coords[10]),
                                                  "click_y": float(src.y_coords[12])}})
    assert ex.selected_source_pixel == (12, 10)


def test_source_pixel_slider_and_model_dropdown_give_the_package_reconstruction(lens_explorer,
                                                                                lens_setup):
    from klever_nb import lensing

    maps, lenses, kwargs = lens_setup
    ex = lens_explorer
    ex.controls["source_pixel"].value = 0.1
    assert np.allclose(np.diff(ex.source["beta_x"].values), 0.1)
    ex.controls["lens_model"].value = "theta_e+5%"
    _, direct = lensing.reconstruct_source_plane(
        maps, lenses["theta_e+5%"], source_pixel_arcsec=0.1, alternative_lenses=(lenses["true"],),
        forward_iterations=0, **kwargs)
    assert ex.summary["mu_halpha"] == pytest.approx(direct["mu_halpha"], rel=1e-12)
    assert ex.summary["mu_maps_spread"] == pytest.approx(direct["mu_maps_spread"], rel=1e-12)
    assert "±" in ex._ui["info"].value


def test_psf_ellipse_and_caustics_are_drawn_from_the_package(lens_explorer, lens_setup):
    from klever_nb import lensing

    ex = lens_explorer
    psf = ex.source_psf
    # the ellipse is the reconstruction's source PSF (its summary, as the annuli take it)
    assert psf == {**lensing.annulus_psf(ex.summary),
                   "pa_deg_east_of_north": ex.summary["source_psf_pa_deg_east_of_north"]}
    x, y = np.asarray(ex.marks["psf"].x), np.asarray(ex.marks["psf"].y)
    assert np.hypot(x, y).max() == pytest.approx(psf["fwhm_major_kpc"] / 2, rel=1e-3)
    assert np.hypot(x, y).min() == pytest.approx(psf["fwhm_minor_kpc"] / 2, rel=1e-2)
    # critical curves and caustics are the package's, NaN-separated on one mark each
    _, lenses, kwargs = lens_setup
    lens = lensing.lens_at_source(lenses["true"], redshift=kwargs["redshift"])
    critical = lensing.critical_curves(lens)
    assert critical
    cx = np.asarray(ex.marks["critical"].x, dtype=float)
    cy = np.asarray(ex.marks["critical"].y, dtype=float)
    np.testing.assert_array_equal(cx[np.isfinite(cx)], np.concatenate([c[:, 0] for c in critical]))
    np.testing.assert_array_equal(cy[np.isfinite(cy)], np.concatenate([c[:, 1] for c in critical]))
    assert np.isnan(cx).sum() == len(critical)
    caustic = np.concatenate(lensing.caustics(lens, critical))
    kx, ky = lensing.source_plane_kpc(ex.source, caustic[:, 0], caustic[:, 1])
    mx = np.asarray(ex.marks["caustic"].x, dtype=float)
    my = np.asarray(ex.marks["caustic"].y, dtype=float)
    np.testing.assert_allclose(mx[np.isfinite(mx)], kx[np.isfinite(kx)])
    np.testing.assert_allclose(my[np.isfinite(my)], ky[np.isfinite(ky)])
    assert np.isfinite(mx).sum() > 20
    fig = ex.static_figure()
    assert len(fig.axes) == 2
    import matplotlib.pyplot as plt

    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# MetallicityExplorer
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def metal_maps():
    galaxy = mock.make_mock(mock.demo_specs()[1])  # unlensed z = 2.2: [OII] to [SII]
    maps, _ = fitting.fit_galaxy(galaxy.cubes, redshift=galaxy.spec.redshift)
    return maps, galaxy.spec.redshift


@pytest.fixture
def metal_explorer(metal_maps):
    from klever_nb.widgets import MetallicityExplorer

    maps, z = metal_maps
    ex = MetallicityExplorer(maps, redshift=z)
    ex.widget  # noqa: B018
    return ex


def test_map_and_checkboxes_give_the_package_metallicity(metal_explorer, metal_maps):
    from klever_nb import metallicity

    maps, z = metal_maps
    ex = metal_explorer
    assert set(ex.diagnostics) == set(metallicity.choose_diagnostics(maps, redshift=z))
    ex.controls["diagnostics"]["N2"].value = True  # a check box
    ex.controls["dust"].value = False              # the dust toggle
    direct = metallicity.metallicity_map(maps, diagnostics=ex.diagnostics, redshift=z,
                                         dust_correction=False)
    assert "N2" in ex.diagnostics
    np.testing.assert_array_equal(ex.image_map.image, direct["oh"].values)
    assert ex.image_map.image.shape == direct["oh"].shape
    assert np.isfinite(ex.image_map.image).sum() > 20


def test_pixel_posterior_is_the_package_posterior_and_emcee_agrees(metal_explorer):
    from klever_nb import metallicity

    ex = metal_explorer
    y, x = ex.selected_pixel
    post = ex.pixel_posterior()
    assert np.isfinite(post["oh"])
    # the grid posterior's median is the map's value at that pixel
    summary = metallicity.summarize_posterior(post["density"][None], post["grid"])
    median = float(np.ravel(summary["q50"])[0])
    assert median == pytest.approx(float(ex.image_map.image[y, x]), abs=2e-3)
    np.testing.assert_allclose(np.asarray(ex.marks["density"].y), post["density"])
    # emcee (overlaid) agrees with the exact grid to Monte-Carlo noise
    assert post["emcee"]["oh"] == pytest.approx(post["oh"], abs=0.02)
    # the calibration panel draws each diagnostic's observed ratio at the pixel
    obs = np.asarray(ex.marks["observed"].y)[:, 0]
    expected = [ex.pixel_ratios()[d][0] for d in ex.diagnostics]
    np.testing.assert_allclose(obs, expected)


def test_metallicity_explorer_is_lazy_and_its_posterior_uses_the_maps_grid(metal_maps):
    from klever_nb import metallicity
    from klever_nb.widgets import MetallicityExplorer

    maps, z = metal_maps
    ex = MetallicityExplorer(maps, redshift=z, show_emcee=False,
                             metallicity_kwargs={"grid_step": 0.005})
    ex.dust_correction = False
    assert not ex._maps_cache and ex._bpt is None  # nothing computed before it is asked
    y, x = ex.selected_pixel
    post = ex.pixel_posterior()
    assert np.allclose(np.diff(post["grid"]), 0.005)
    summary = metallicity.summarize_posterior(post["density"][None], post["grid"])
    assert float(np.ravel(summary["q50"])[0]) == pytest.approx(
        float(ex.metallicity["oh"].values[y, x]), abs=1e-6)


def test_click_moves_the_pixel_on_map_and_bpt(metal_explorer):
    ex = metal_explorer
    img = ex.image_map
    ex.show_emcee = False
    img.mark._handle_custom_msgs(None, {"event": "element_click",
                                        "data": {"click_x": 13.2, "click_y": 10.9}})
    assert ex.selected_pixel == (11, 13)
    here = ex.marks["bpt_here"]
    n2, o3 = (float(ex.bpt[k].values[11, 13]) for k in ("log_n2", "log_o3"))
    if np.isfinite(n2) and np.isfinite(o3):
        assert here.visible and (here.x[0], here.y[0]) == pytest.approx((n2, o3))
    else:  # not on the diagram (a line below its SNR cut): no marker
        assert not here.visible
    fig = ex.static_figure()
    import matplotlib.pyplot as plt

    assert len(fig.axes) >= 4
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# GradientExplorer
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source_metallicity(galaxy):
    """Source-plane metallicity map of the lensed demo galaxy, from the package's stages."""
    import warnings

    from klever_nb import lensing, metallicity

    spec = galaxy.spec
    maps = xr_concat_bands(galaxy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source, summary = lensing.reconstruct_source_plane(
            maps, galaxy.lens_maps, redshift=spec.redshift,
            cube_wcs=galaxy.cubes["H"].attrs["wcs"], psf_fwhm_arcsec=spec.psf_fwhm_arcsec,
            forward_iterations=0)
    oh = metallicity.metallicity_map(source, redshift=spec.redshift, diagnostics=["R3", "N2"])
    psf = lensing.annulus_psf(summary)
    return oh, psf, source


def xr_concat_bands(galaxy):
    """Line maps of the YJ and H bands (Hbeta, [OIII], Halpha, [NII]) from fit_cube."""
    import xarray as xr

    parts = []
    for band, lines in (("YJ", ("Hbeta", "OIII_4959", "OIII_5007")),
                        ("H", ("NII_6548", "Halpha", "NII_6584"))):
        m = fitting.fit_cube(galaxy.cubes[band].to_dataset(), redshift=galaxy.spec.redshift,
                             lines=lines)
        parts.append(m[["flux", "flux_err", "snr", "fit_ok"]])
    return xr.concat(parts, dim="line")


@pytest.fixture
def gradient_explorer(source_metallicity):
    from klever_nb.widgets import GradientExplorer

    oh, psf, _ = source_metallicity
    forward = {"gradient_dex_per_kpc": -0.04, "gradient_err": 0.01, "central_oh": 8.45}
    ex = GradientExplorer(oh, psf=psf, forward=forward, global_oh=8.35)
    ex.widget  # noqa: B018
    return ex


def test_step_and_shape_controls_give_the_package_profile(gradient_explorer, source_metallicity):
    from klever_nb import gradients

    oh, psf, _ = source_metallicity
    ex = gradient_explorer
    ex.controls["step"].value = 0.3
    ex.controls["shape"].value = "circular"
    profile, info = gradients.measure_gradient(oh, psf=psf, step_fraction=0.3, shape="circular",
                                               fit_method="wls", systematics=False)
    np.testing.assert_allclose(np.asarray(ex.marks["points"].y), profile["oh"].values)
    np.testing.assert_allclose(np.asarray(ex.marks["points"].x), profile["radius_kpc"].values)
    assert ex.summary["gradient_dex_per_kpc"] == pytest.approx(info["gradient_dex_per_kpc"])
    fit_y = np.asarray(ex.marks["paper"].y)
    assert fit_y[1] - fit_y[0] == pytest.approx(info["gradient_dex_per_kpc"]
                                                * float(profile["r_out_kpc"].max()))
    # circular annuli: every outline is a circle about the centre, one per annulus edge
    outlines = ex.annuli()
    assert len(outlines) == info["n_annuli_total"] if "n_annuli_total" in info else len(outlines)
    for x, y in outlines:
        radius = np.hypot(x - ex.centre_kpc[0], y - ex.centre_kpc[1])
        assert np.ptp(radius) < 1e-9 * max(radius.max(), 1.0)
    outer = [np.hypot(x - ex.centre_kpc[0], y - ex.centre_kpc[1]).max() for x, y in outlines]
    np.testing.assert_allclose(outer[:info["n_annuli"]],
                               profile["r_out_kpc"].values[:info["n_annuli"]], rtol=1e-9)


def test_annuli_drawn_are_the_apertures_the_profile_used(source_metallicity):
    from klever_nb import gradients
    from klever_nb.widgets import GradientExplorer

    oh, psf, _ = source_metallicity
    ex = GradientExplorer(oh, psf=psf, gradient_kwargs={"size": "semi_major"})
    profile, info = gradients.measure_gradient(oh, psf=psf, fit_method="wls", systematics=False,
                                               size="semi_major")
    outlines = ex.annuli()
    n = info["n_annuli"]
    assert n >= 2
    # semi-major axis of each outline = the annulus's outer edge (size="semi_major")
    semi_major = [np.hypot(x - ex.centre_kpc[0], y - ex.centre_kpc[1]).max() for x, y in outlines]
    np.testing.assert_allclose(semi_major[:n], profile["r_out_kpc"].values[:n], rtol=1e-3)


def test_dragging_the_centre_moves_the_annuli_and_refits(gradient_explorer):
    ex = gradient_explorer
    before = ex.summary["gradient_dex_per_kpc"]
    ex.marks["centre"].x = [1.5]  # what a drag of the centre cross sends at the end of the move
    assert ex.centre_kpc == (1.5, 0.0)
    assert ex.profile.attrs["centre_x_kpc"] == pytest.approx(1.5)
    assert ex.summary["gradient_dex_per_kpc"] != before


def test_method_toggle_draws_the_forward_model_and_residuals_are_the_package_ones(
        gradient_explorer, source_metallicity):
    from klever_nb import gradients

    oh, psf, _ = source_metallicity
    ex = gradient_explorer
    assert not np.isfinite(np.asarray(ex.marks["forward"].y, dtype=float)).any()
    ex.controls["method"].value = "forward"
    fy = np.asarray(ex.marks["forward"].y)
    assert fy[0] == pytest.approx(8.45)
    assert ex.summary["forward_gradient_dex_per_kpc"] == -0.04
    _, info = gradients.measure_gradient(oh, psf=psf, fit_method="wls", systematics=False)
    np.testing.assert_allclose(ex.panels["residual"].image,
                               gradients.residual_map(oh, info["fit"]).values)
    planar = gradients.planar_fit(oh, psf=psf)
    ax, ay = np.asarray(ex.marks["arrow"].x), np.asarray(ex.marks["arrow"].y)
    direction = np.degrees(np.arctan2(ay[1] - ay[0], ax[1] - ax[0])) % 360
    assert direction == pytest.approx(planar["direction_deg"], abs=1e-6)
    import matplotlib.pyplot as plt

    plt.close(ex.static_figure())


def test_metallicity_explorer_works_on_source_plane_maps_in_kpc(source_metallicity):
    from klever_nb.widgets import MetallicityExplorer

    oh, _, source = source_metallicity
    ex = MetallicityExplorer(source, diagnostics=["R3", "N2"], show_emcee=False)
    img = ex.image_map
    np.testing.assert_allclose(img.x_coords, source["xs"].values)
    np.testing.assert_array_equal(np.isfinite(img.image), np.isfinite(oh["oh"].values))
    y, x = np.argwhere(np.isfinite(oh["oh"].values))[0]
    img.mark._handle_custom_msgs(None, {"event": "element_click", "data": {
        "click_x": float(source["xs"].values[x]), "click_y": float(source["ys"].values[y])}})
    assert ex.selected_pixel == (y, x)
    assert ex.pixel_posterior()["oh"] == pytest.approx(float(oh["oh"].values[y, x]))


# ---------------------------------------------------------------------------------------------
# Export: savefig(path) and the "Save figure" button of every explorer (issue 17)
# ---------------------------------------------------------------------------------------------
def _export_checks(ex, tmp_path):
    """savefig writes PNG/PDF of the static figure; the button writes the file its box names."""
    import matplotlib.pyplot as plt
    from PIL import Image

    open_before = set(plt.get_fignums())  # other tests in this worker may leave figures
    png = ex.savefig(tmp_path / "view.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = Image.open(png).size
    assert width > 400 and height > 200
    pdf = ex.savefig(tmp_path / "view.pdf")
    assert pdf.read_bytes()[:5] == b"%PDF-"
    with pytest.raises(ValueError, match="png or .pdf"):
        ex.savefig(tmp_path / "view.svg")
    row = ex._ui["export"]
    assert row in ex.widget.children
    name, button, message = row.children
    name.value = str(tmp_path / "button.pdf")
    button.click()
    assert (tmp_path / "button.pdf").read_bytes()[:5] == b"%PDF-"
    assert "saved" in message.value
    name.value = str(tmp_path / "bad.txt")
    button.click()
    assert "png or .pdf" in message.value
    assert set(plt.get_fignums()) <= open_before, "savefig leaves no figure open"


def test_line_fit_explorer_exports_its_view(explorer, tmp_path):
    explorer.select(12, 10)
    _export_checks(explorer, tmp_path)


def test_lens_explorer_exports_its_view(lens_explorer, tmp_path):
    _export_checks(lens_explorer, tmp_path)


def test_metallicity_explorer_exports_its_view(metal_explorer, tmp_path):
    _export_checks(metal_explorer, tmp_path)


def test_gradient_explorer_exports_its_view(gradient_explorer, tmp_path):
    _export_checks(gradient_explorer, tmp_path)


def test_static_fallback_is_the_saved_figure(explorer, tmp_path):
    """The PNG of the fallback bundle and savefig draw the same figure (same function)."""
    import base64
    import io

    from PIL import Image

    explorer.select(3, 4)
    bundle = explorer._repr_mimebundle_()
    fallback = Image.open(io.BytesIO(base64.b64decode(bundle["image/png"])))
    saved = Image.open(explorer.savefig(tmp_path / "v.png", dpi=80))
    assert abs(fallback.size[0] - saved.size[0]) <= 2 and abs(fallback.size[1] - saved.size[1]) <= 2

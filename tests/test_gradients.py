"""Tests of klever_nb.gradients against closed forms and injected truths (K20 §4.2, §4.5)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from scipy import stats

from klever_nb import gradients as g
from klever_nb.calibrations import get_calibration
from klever_nb.errors import ConfigError, InputError

PSF = {"fwhm_major_kpc": 1.5, "fwhm_minor_kpc": 0.8, "theta_deg": 30.0}


def _grid(n=25, pix=0.2):
    ys = xs = np.arange(-n, n + 1) * pix
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return ys, xs, yy, xx


def _map(oh, err, ys, xs):
    return xr.Dataset({"oh": (("ys", "xs"), oh), "oh_lo": (("ys", "xs"), oh - err),
                       "oh_hi": (("ys", "xs"), oh + err)}, coords={"ys": ys, "xs": xs})


def _linear_map(central=8.5, gradient=-0.03, err=0.05, n=25):
    ys, xs, yy, xx = _grid(n)
    oh = central + gradient * np.hypot(xx, yy)
    return _map(oh, np.full_like(oh, err), ys, xs)


def test_annulus_weights_sum_to_the_exact_aperture_areas():
    ds = _linear_map()
    apertures, radii, edges = g.elliptical_annuli(ds, psf=PSF, step_fraction=0.5, r_max=3.0)
    weights = g.annulus_weights(apertures, (ds.sizes["ys"], ds.sizes["xs"]))
    q = PSF["fwhm_minor_kpc"] / PSF["fwhm_major_kpc"]
    pix = 0.2
    for k, (r_in, r_out) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        a_out, b_out = r_out / np.sqrt(q) / pix, r_out * np.sqrt(q) / pix
        a_in, b_in = r_in / np.sqrt(q) / pix, r_in * np.sqrt(q) / pix
        assert weights[k].sum() == pytest.approx(np.pi * (a_out * b_out - a_in * b_in), rel=1e-9)
    # the annuli tile the outer ellipse: no pixel fraction counted twice or lost
    assert weights.sum() == pytest.approx(np.pi * edges[-1] ** 2 / pix**2, rel=1e-9)
    assert np.all(weights.sum(axis=0) <= 1 + 1e-12)
    # the geometric-mean radius of the first edge is step_fraction * sqrt(FWHM_a FWHM_b)
    assert edges[1] == pytest.approx(0.5 * np.sqrt(1.5 * 0.8))
    assert radii[0] == pytest.approx(2 / 3 * edges[1])


def test_semi_major_size_option_scales_the_semi_major_axis():
    ds = _linear_map()
    apertures, _, edges = g.elliptical_annuli(ds, psf=PSF, r_max=2.0, size="semi_major")
    assert apertures[0].a == pytest.approx(edges[1] / 0.2)
    assert apertures[0].b == pytest.approx(edges[1] * 0.8 / 1.5 / 0.2)


@pytest.mark.parametrize("shape", ["psf", "circular"])
@pytest.mark.parametrize("method", ["wls", "emcee"])
def test_an_exact_linear_gradient_is_recovered(shape, method):
    ds = _linear_map(central=8.45, gradient=-0.04)
    profile = g.radial_profile(ds, psf=PSF, shape=shape)
    fit = g.fit_gradient(profile, method=method, seed=1)
    assert fit["gradient_dex_per_kpc"] == pytest.approx(-0.04, abs=1e-3)
    assert fit["central_oh"] == pytest.approx(8.45, abs=1e-3)
    assert fit["gradient_wls"] == pytest.approx(-0.04, abs=1e-9)
    if method == "emcee":
        assert fit["converged"]


def test_off_centre_gradient_is_recovered_about_the_given_centre():
    ys, xs, yy, xx = _grid()
    oh = 8.3 + 0.02 * np.hypot(xx - 0.6, yy + 0.4)
    ds = _map(oh, np.full_like(oh, 0.03), ys, xs)
    profile, summary = g.measure_gradient(ds, psf=PSF, centre_kpc=(0.6, -0.4),
                                          fit_method="wls")
    assert summary["gradient_dex_per_kpc"] == pytest.approx(0.02, abs=1e-9)
    assert np.allclose(g.residual_map(ds, summary["fit"]).values, 0.0, atol=1e-9)


@pytest.mark.parametrize(("factor", "expected"), [
    (2.0, "resolved"), (2.5, "resolved"), (1.999, "marginal"), (1.0, "marginal"),
    (1.5, "marginal"), (0.999, "unresolved"), (0.0, "unresolved")])
def test_resolution_class_boundaries(factor, expected):
    hwhm = 0.5 * np.sqrt(PSF["fwhm_major_kpc"] * PSF["fwhm_minor_kpc"])
    assert g.resolution_class(factor * hwhm, PSF) == expected


def test_resolution_class_of_nan_radius_is_unresolved():
    assert g.resolution_class(np.nan, PSF) == "unresolved"


def test_a_too_small_galaxy_is_unresolved_with_a_message():
    ys, xs, yy, xx = _grid(10)
    oh = np.where(np.hypot(xx, yy) < 0.25, 8.4, np.nan)
    ds = _map(oh, np.full_like(oh, 0.05), ys, xs)
    profile, summary = g.measure_gradient(ds, psf=PSF)
    assert summary["resolved"] == "unresolved"
    assert np.isnan(summary["gradient_dex_per_kpc"])
    assert "too small or too faint" in summary["message"]
    empty = ds.copy()
    empty["oh"][:] = np.nan
    _, summary = g.measure_gradient(empty, psf=PSF)
    assert summary["resolved"] == "unresolved" and summary["n_annuli"] == 0


def test_marginal_gradient_says_why():
    ys, xs, yy, xx = _grid(10)
    hwhm = 0.5 * np.sqrt(1.5 * 0.8)
    oh = np.where(np.hypot(xx, yy) < 1.5 * hwhm, 8.4 - 0.05 * np.hypot(xx, yy), np.nan)
    ds = _map(oh, np.full_like(oh, 0.05), ys, xs)
    _, summary = g.measure_gradient(ds, psf=PSF, shape="circular", step_fraction=0.33,
                                    fit_method="wls")
    assert summary["resolved"] == "marginal"
    assert "marginal" in summary["message"]


def test_oh_from_log_ratios_inverts_the_calibrations():
    truth = np.linspace(7.8, 8.8, 11)
    ratios = {d: (get_calibration(d).log_ratio(truth), np.full_like(truth, 0.01))
              for d in ("N2", "R3")}
    med, lo, hi = g.oh_from_log_ratios(ratios)
    assert np.allclose(med, truth, atol=0.01)
    assert np.all(lo < med) and np.all(hi > med)


def _line_maps_from_oh(oh, ys, xs, halpha):
    n2 = get_calibration("N2").log_ratio(oh)
    r3 = get_calibration("R3").log_ratio(oh)
    hbeta = halpha / 2.87
    flux = np.stack([halpha, halpha * 10**n2, hbeta, hbeta * 10**r3])
    lines = ["Halpha", "NII_6584", "Hbeta", "OIII_5007"]
    return xr.Dataset({"flux": (("line", "ys", "xs"), flux),
                       "flux_err": (("line", "ys", "xs"), 0.01 * flux)},
                      coords={"line": lines, "ys": ys, "xs": xs})


def test_mean_oh_and_mean_ratio_agree_on_a_smooth_map():
    ys, xs, yy, xx = _grid(20)
    r = np.hypot(xx, yy)
    oh_true = 8.55 - 0.05 * r
    maps = _line_maps_from_oh(oh_true, ys, xs, np.exp(-r / 1.5))
    ratios = g.log_ratio_maps(maps, ["N2", "R3"])
    med, lo, hi = g.oh_from_log_ratios(ratios)
    ds = xr.Dataset({"oh": (("ys", "xs"), med), "oh_lo": (("ys", "xs"), lo),
                     "oh_hi": (("ys", "xs"), hi)}, coords={"ys": ys, "xs": xs},
                    attrs={"diagnostics_used": "R3,N2"})
    p_oh = g.radial_profile(ds, psf=PSF, method="mean_oh")
    p_ratio = g.radial_profile(ds, psf=PSF, method="mean_ratio", line_maps=maps)
    assert np.allclose(p_oh["oh"], p_ratio["oh"], atol=0.01)
    f_oh = g.fit_gradient(p_oh, method="wls")
    f_ratio = g.fit_gradient(p_ratio, method="wls")
    assert f_ratio["gradient_dex_per_kpc"] == pytest.approx(f_oh["gradient_dex_per_kpc"],
                                                            abs=0.003)


def test_mean_ratio_without_line_maps_is_a_config_error():
    with pytest.raises(ConfigError, match="line_maps"):
        g.radial_profile(_linear_map(), psf=PSF, method="mean_ratio")


def test_planar_fit_recovers_a_known_tilt_and_direction():
    ys, xs, yy, xx = _grid(20)
    rng = np.random.default_rng(3)
    size, angle = 0.04, 130.0
    oh = 8.4 + size * (np.cos(np.deg2rad(angle)) * xx + np.sin(np.deg2rad(angle)) * yy)
    err = np.full_like(oh, 0.05)
    ds = _map(oh + rng.normal(0, 0.05, oh.shape), err, ys, xs)
    fit = g.planar_fit(ds)
    assert abs(fit["gradient_dex_per_kpc"] - size) < 3 * fit["gradient_err"]
    assert fit["gradient_err"] < 0.003
    assert abs(fit["direction_deg"] - angle) < 3 * fit["direction_err_deg"]
    assert fit["central_oh"] == pytest.approx(8.4, abs=3 * fit["central_oh_err"])


def test_non_axisymmetry_p_values_are_uniform_for_axisymmetric_noise():
    ys, xs, yy, xx = _grid(20)
    oh0 = 8.5 - 0.03 * np.hypot(xx, yy)
    rng = np.random.default_rng(7)
    fit = {"central_oh": 8.5, "gradient_dex_per_kpc": -0.03, "centre_kpc": (0.0, 0.0)}
    pvals = []
    for _ in range(60):
        err = rng.uniform(0.03, 0.08, oh0.shape)
        ds = _map(oh0 + rng.normal(0, 1, oh0.shape) * err, err, ys, xs)
        pvals.append(g.non_axisymmetry(ds, fit=fit, annulus_width_kpc=0.8)["p_value"])
    assert stats.kstest(pvals, "uniform").pvalue > 0.01
    assert 0.35 < np.mean(pvals) < 0.65


def test_non_axisymmetry_detects_an_injected_asymmetry():
    ys, xs, yy, xx = _grid(20)
    rng = np.random.default_rng(8)
    oh = 8.5 - 0.03 * np.hypot(xx, yy) + np.where(xx > 0.5, 0.06, 0.0)
    err = np.full_like(oh, 0.05)
    ds = _map(oh + rng.normal(0, 0.05, oh.shape), err, ys, xs)
    _, summary = g.measure_gradient(ds, psf=PSF, fit_method="wls", systematics=False)
    result = g.non_axisymmetry(ds, fit=summary["fit"], annulus_width_kpc=0.8)
    assert result["p_value"] < 1e-6 and result["significance_sigma"] > 5
    assert result["azimuthal_rms_dex"] > 2 * result["expected_rms_dex"]


def test_correlated_noise_is_accounted_for_with_the_psf():
    ys, xs, yy, xx = _grid(20)
    assert g.correlation_area_pixels(_linear_map(n=20), None) == 1.0
    area = g.correlation_area_pixels(_linear_map(n=20), PSF)
    sig = 1 / (2 * np.sqrt(2 * np.log(2)))
    assert area == pytest.approx(4 * np.pi * 1.5 * sig * 0.8 * sig / 0.04)


def test_systematics_vanish_for_an_exact_linear_map_and_not_for_a_noisy_one():
    sys_exact = g.gradient_systematics(_linear_map(), psf=PSF)
    assert len(sys_exact["table"]) == 8
    assert sys_exact["gradient_sys_err"] < 1e-9
    ds = _linear_map()
    ds["oh"] = ds["oh"] + np.random.default_rng(0).normal(0, 0.05, ds["oh"].shape)
    assert g.gradient_systematics(ds, psf=PSF)["gradient_sys_err"] > 1e-4


def test_bad_grids_and_psfs_raise_one_line_errors():
    ds = _linear_map()
    with pytest.raises(ConfigError, match="fwhm_major_kpc"):
        g.radial_profile(ds, psf={"fwhm": 1.0})
    stretched = ds.assign_coords(xs=ds["xs"] * 2)
    with pytest.raises(InputError, match="square"):
        g.radial_profile(stretched, psf=PSF)
    with pytest.raises(ConfigError, match="shape"):
        g.radial_profile(ds, psf=PSF, shape="square")


def test_descending_axes_give_the_same_profile():
    ds = _linear_map()
    ys, xs, yy, xx = _grid()
    oh = 8.5 - 0.03 * np.hypot(xx, yy) + 0.02 * xx  # not symmetric: orientation matters
    ds = _map(oh, np.full_like(oh, 0.05), ys, xs)
    flipped = ds.isel(xs=slice(None, None, -1), ys=slice(None, None, -1))
    a = g.radial_profile(ds, psf=PSF)
    b = g.radial_profile(flipped, psf=PSF)
    assert np.allclose(a["oh"], b["oh"], atol=1e-12)


def test_gradient_figure_draws_map_annuli_and_profile():
    import matplotlib

    matplotlib.use("Agg")
    from klever_nb.figures import gradient_figure

    ds = _linear_map()
    ys, xs = ds["ys"].values, ds["xs"].values
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    ha = np.exp(-np.hypot(xx, yy))
    maps = xr.Dataset({"flux": (("line", "ys", "xs"), ha[None])},
                      coords={"line": ["Halpha"], "ys": ys, "xs": xs})
    profile, summary = g.measure_gradient(ds, psf=PSF, fit_method="wls", systematics=False)
    fig = gradient_figure(ds, profile, summary, psf=PSF, line_maps=maps, global_oh=8.4,
                          global_oh_err=(0.05, 0.06), title="mock")
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 3
    assert len(panels[1].patches) == profile.sizes["annulus"] + 1  # annuli + PSF
    labels = [t.get_text() for t in panels[2].get_legend().get_texts()]
    assert any("-0.030" in label for label in labels)
    assert "PSF HWHM size" in labels and "global" in labels


def test_mean_ratio_route_is_the_metallicity_grid_posterior():
    """oh_from_log_ratios is grid_summary on the same inputs (no engine of its own)."""
    from klever_nb.metallicity import grid_summary, make_grid

    rng = np.random.default_rng(2)
    truth = rng.uniform(7.9, 8.7, 50)
    ratios = {d: (get_calibration(d).log_ratio(truth) + rng.normal(0, 0.05, 50),
                  np.full(50, 0.05)) for d in ("N2", "R3")}
    ratios["R3"][0][:5] = np.nan  # a missing diagnostic in some pixels
    med, lo, hi = g.oh_from_log_ratios(ratios)
    obs = np.stack([ratios[d][0] for d in ("N2", "R3")], axis=-1)
    err = np.stack([ratios[d][1] for d in ("N2", "R3")], axis=-1)
    ref = grid_summary(obs, err, ["N2", "R3"], grid=make_grid(["N2", "R3"]))
    for a, key in ((med, "oh"), (lo, "oh_lo"), (hi, "oh_hi")):
        assert np.allclose(a, ref[key], rtol=0, atol=1e-10)


def test_mean_ratio_profile_calls_the_one_posterior(monkeypatch):
    import klever_nb.gradients.profile as profile_module

    ys, xs, yy, xx = _grid(12)
    r = np.hypot(xx, yy)
    maps = _line_maps_from_oh(8.5 - 0.04 * r, ys, xs, np.exp(-r / 1.5))
    calls = []
    real = profile_module.grid_summary

    def spy(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(profile_module, "grid_summary", spy)
    ratios = g.log_ratio_maps(maps, ["N2", "R3"])
    med, lo, hi = g.oh_from_log_ratios(ratios)
    ds = xr.Dataset({"oh": (("ys", "xs"), med), "oh_lo": (("ys", "xs"), lo),
                     "oh_hi": (("ys", "xs"), hi)}, coords={"ys": ys, "xs": xs},
                    attrs={"diagnostics_used": "R3,N2"})
    g.radial_profile(ds, psf=PSF, method="mean_ratio", line_maps=maps)
    assert calls == [["N2", "R3"], ["R3", "N2"]]


def test_log_ratio_maps_follow_the_ratio_definitions():
    """Values and first-order errors equal the closed form of a ratio of sums."""
    ys, xs, yy, xx = _grid(6)
    rng = np.random.default_rng(7)
    lines = ["Halpha", "NII_6584", "SII_6717", "SII_6731", "Hbeta", "OIII_5007",
             "OII_3727", "OII_3729"]
    flux = rng.uniform(0.5, 2.0, (len(lines), ys.size, xs.size))
    err = 0.1 * rng.uniform(0.5, 1.5, flux.shape)
    maps = xr.Dataset({"flux": (("line", "ys", "xs"), flux),
                       "flux_err": (("line", "ys", "xs"), err)},
                      coords={"line": lines, "ys": ys, "xs": xs})
    f = {n: flux[i] for i, n in enumerate(lines)}
    e = {n: err[i] for i, n in enumerate(lines)}
    out = g.log_ratio_maps(maps, ["N2", "R3", "S2", "R2", "O3O2"])
    for d, (num, den) in g.DIAGNOSTIC_LINES.items():
        fn, fd = sum(f[n] for n in num), sum(f[n] for n in den)
        vn, vd = sum(e[n] ** 2 for n in num), sum(e[n] ** 2 for n in den)
        assert np.allclose(out[d][0], np.log10(fn / fd), rtol=0, atol=1e-12)
        assert np.allclose(out[d][1], np.sqrt(vn / fn**2 + vd / fd**2) / np.log(10), rtol=1e-12)
    assert set(g.DIAGNOSTIC_LINES) == {"R2", "R3", "O3O2", "N2", "S2"}
    assert g.DIAGNOSTIC_LINES["S2"] == (("SII_6717", "SII_6731"), ("Halpha",))
    assert g.DIAGNOSTIC_LINES["O3O2"] == (("OIII_5007",), ("OII_3727", "OII_3729"))


def test_a_short_emcee_chain_is_flagged_not_raised():
    profile = g.radial_profile(_linear_map(), psf=PSF)
    fit = g.fit_gradient(profile, method="emcee", nsteps=20, burn=5)
    assert fit["converged"] is False and "autocorrelation" in fit["message"]
    with pytest.raises(ConfigError, match="nwalkers"):
        g.fit_gradient(profile, method="emcee", nwalkers=2)


def test_non_axisymmetry_accounts_for_correlated_noise():
    """Noise smoothed by a known Gaussian: p-values uniform with the kernel, tiny without."""
    from scipy.ndimage import gaussian_filter

    ys, xs, yy, xx = _grid(40, pix=0.1)
    kernel = {"fwhm_major_kpc": 0.8, "fwhm_minor_kpc": 0.5, "theta_deg": 0.0}
    sig = (0.5 / 2.3548 / 0.1, 0.8 / 2.3548 / 0.1)  # (y, x) in pixels
    unit = gaussian_filter(np.pad(np.ones((1, 1)), 70), sig)
    norm = np.sqrt((unit**2).sum())
    rng = np.random.default_rng(11)
    fit = {"central_oh": 8.5, "gradient_dex_per_kpc": -0.03, "centre_kpc": (0.0, 0.0)}
    with_kernel, without = [], []
    for _ in range(30):
        field = gaussian_filter(rng.normal(size=(141, 141)), sig)[30:111, 30:111] / norm
        oh = 8.5 - 0.03 * np.hypot(xx, yy) + 0.05 * field
        ds = _map(oh, np.full_like(oh, 0.05), ys, xs)
        with_kernel.append(g.non_axisymmetry(ds, fit=fit, noise_kernel=kernel)["p_value"])
        without.append(g.non_axisymmetry(ds, fit=fit)["p_value"])
    assert stats.kstest(with_kernel, "uniform").pvalue > 0.01
    assert np.median(without) < 1e-6


# ---------------------------------------------------------------------------------------------
# Resolution class, pixel selection and centre (issue 21)
# ---------------------------------------------------------------------------------------------
HWHM = 0.5 * np.sqrt(PSF["fwhm_major_kpc"] * PSF["fwhm_minor_kpc"])


@pytest.mark.parametrize(("extent_hwhm", "expected"), [
    (3.6, "resolved"), (1.9, "marginal"), (0.9, "unresolved")])
def test_resolution_class_with_the_default_step_reaches_every_class(extent_hwhm, expected):
    """K20 §4.2 counts the radius of the outermost metallicity point: with the default step
    (one HWHM size) two annuli reach ~1.6 HWHM, "marginal" (the outer *edge*, 2 HWHM, made
    every two-annulus galaxy "resolved", so "marginal" could never happen)."""
    ds = _linear_map(n=40)
    rell = g.elliptical_radius_kpc(ds["ys"].values, ds["xs"].values, centre_kpc=(0, 0),
                                   q=0.8 / 1.5, pa_deg=30.0)
    ds = ds.where(xr.DataArray(rell < extent_hwhm * HWHM, dims=("ys", "xs")))
    profile, summary = g.measure_gradient(ds, psf=PSF, fit_method="wls", systematics=False)
    assert summary["resolved"] == expected
    if summary["n_annuli"]:
        assert summary["r_max_kpc"] == pytest.approx(float(profile["radius_kpc"].max()))
        assert summary["r_max_kpc"] < summary["r_max_edge_kpc"]


def test_gradient_uses_one_diagnostic_combination_and_drops_bimodal_pixels():
    """Outer pixels with only a subset of the diagnostics (biased here by +0.3 dex) and
    bimodal pixels stay out of the profile by default and are counted (K20 §4.2)."""
    ys, xs, yy, xx = _grid(25)
    r = np.hypot(xx, yy)
    oh = 8.5 - 0.05 * r
    ds = _map(oh, np.full_like(oh, 0.03), ys, xs)
    complete = r < 3.0
    ds["all_diagnostics"] = (("ys", "xs"), complete)
    ds["oh"] = ds["oh"].where(complete, ds["oh"] + 0.3)
    bimodal = (np.abs(xx - 1.0) < 0.15) & (np.abs(yy) < 0.15)
    ds["bimodal"] = (("ys", "xs"), bimodal)
    ds["oh"] = ds["oh"].where(~bimodal, 7.5)
    _, summary = g.measure_gradient(ds, psf=PSF, fit_method="wls", systematics=False)
    assert summary["gradient_dex_per_kpc"] == pytest.approx(-0.05, abs=2e-3)
    assert summary["n_pixels_incomplete_diagnostics"] == int((~complete).sum())
    assert summary["n_pixels_flagged"] == {"bimodal": int(bimodal.sum())}
    assert summary["n_pixels_used"] == int((complete & ~bimodal).sum())
    _, loose = g.measure_gradient(ds, psf=PSF, fit_method="wls", systematics=False,
                                  require_all_diagnostics=False, exclude_flags=())
    assert abs(loose["gradient_dex_per_kpc"] + 0.05) > 0.01  # what the old rule gave


def test_a_psf_dict_with_an_ambiguous_pa_is_refused():
    with pytest.raises(ConfigError, match="theta_deg"):
        g.psf_axes({"fwhm_major_kpc": 1.0, "fwhm_minor_kpc": 0.5, "pa_deg": 30.0})


def _peak_maps(x0, y0, continuum_detected):
    ys, xs, yy, xx = _grid(20)
    halpha = np.exp(-0.5 * (xx**2 + yy**2) / 0.8**2)
    cont = np.exp(-0.5 * ((xx - x0) ** 2 + (yy - y0) ** 2) / 0.6**2)
    ds = xr.Dataset({"flux": (("line", "ys", "xs"), halpha[None])},
                    coords={"line": ["Halpha"], "ys": ys, "xs": xs})
    ds["continuum"] = (("ys", "xs"), cont, {"detected": int(continuum_detected)})
    return ds


def test_centre_is_the_continuum_peak_else_halpha_else_the_users():
    ds = _peak_maps(0.53, -0.37, True)
    (x, y), used = g.gradient_centre(ds)
    assert used == "h_continuum_peak"
    assert (x, y) == pytest.approx((0.53, -0.37), abs=0.03)  # sub-pixel (pixel 0.2 kpc)
    (x, y), used = g.gradient_centre(_peak_maps(0.53, -0.37, False))
    assert used == "halpha_peak" and (x, y) == pytest.approx((0.0, 0.0), abs=1e-9)
    (x, y), used = g.gradient_centre(ds, rule="halpha")
    assert used == "halpha_peak"
    (x, y), used = g.gradient_centre(ds, user_centre_kpc=(1.0, 2.0))
    assert used == "user" and (x, y) == (1.0, 2.0)
    assert set(g.CENTRE_USED) == {"h_continuum_peak", "halpha_peak", "user"}

"""Metallicity posteriors: exact grid vs reference vs emcee, injection-recovery, coverage, flags."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr

from klever_nb.calibrations import get_calibration, register_calibration_file
from klever_nb.errors import ConfigError
from klever_nb.metallicity import (
    choose_diagnostics,
    grid_summary,
    make_grid,
    metallicity_map,
    posterior_emcee,
    posterior_grid,
    predicted_line_fluxes,
    summarize_posterior,
)

DIAGS = ["R3", "N2", "S2"]


def line_maps(truth, *, snr=100.0, ebv=0.0, dims=None, rng=None, oii_from="O3O2",
              hbeta=1.0, drop=()):
    """Line maps following the calibrations at ``truth`` with noise flux/snr on every line."""
    fluxes = predicted_line_fluxes(truth, ebv=ebv, oii_from=oii_from, hbeta=hbeta)
    shape = np.shape(truth)
    dims = dims or tuple(f"d{i}" for i in range(len(shape)))
    fluxes = fluxes.rename({f"dim_{i}": d for i, d in enumerate(dims)})
    err = fluxes / snr  # every line at the same SNR

    noisy = fluxes if rng is None else fluxes + rng.normal(size=fluxes.shape) * err
    maps = xr.Dataset({"flux": noisy, "flux_err": err})
    if drop:
        maps = maps.drop_sel(line=list(drop))
    return maps


# --------------------------------------------------------------------------- grid maths
def test_fast_grid_summary_equals_reference_posterior():
    rng = np.random.default_rng(0)
    n = 300
    truth = rng.uniform(7.7, 8.8, n)
    obs = np.stack([get_calibration(d).log_ratio(truth) for d in DIAGS], -1)
    obs += rng.normal(0, 0.05, obs.shape)
    err = rng.uniform(0.01, 0.2, obs.shape)
    obs[rng.random(obs.shape) < 0.2] = np.nan  # dropped diagnostics
    obs[:5] = np.nan  # pixels without any diagnostic
    grid = make_grid(DIAGS)
    post = posterior_grid(obs, err, DIAGS, calibration_set="C20", grid=grid)
    ref = summarize_posterior(post, grid)
    fast = grid_summary(obs, err, DIAGS, grid=grid, chunk_size=64, n_threads=2)
    assert np.allclose(np.trapezoid(post[5:], grid, axis=-1), 1.0)
    assert np.array_equal(np.isnan(fast["oh"]), np.isnan(ref["q50"]))
    for key, ref_key in (("oh", "q50"), ("oh_lo", "q16"), ("oh_hi", "q84"), ("mode", "mode")):
        assert np.allclose(fast[key], ref[ref_key], atol=1e-5, rtol=0, equal_nan=True)
    assert np.array_equal(fast["bimodal"], ref["bimodal"])
    assert np.array_equal(fast["at_edge"], ref["at_edge"])
    assert fast["no_diagnostic"][:5].all() and (fast["n_diagnostics"][:5] == 0).all()


@pytest.fixture(scope="module")
def linear_set(tmp_path_factory):
    """A linear 'calibration' log R = 0.2 - 2 x: the posterior is an exact Gaussian in x."""
    path = tmp_path_factory.mktemp("cal") / "linear.toml"
    path.write_text('name = "LINEAR"\noh_min = 7.0\noh_max = 9.5\n'
                    '[diagnostics.R3]\ncoefficients = [0.2, -2.0]\nsigma = 0.05\n')
    return register_calibration_file(path)


def test_grid_posterior_matches_closed_form_gaussian(linear_set):
    x0 = 8.3123
    obs = np.array([[0.2 - 2.0 * (x0 - 8.69)]])
    err = np.array([[0.06]])
    sigma_x = np.hypot(0.05, 0.06) / 2.0
    grid = make_grid(["R3"], calibration_set=linear_set, step=0.001)
    out = grid_summary(obs, err, ["R3"], calibration_set=linear_set, grid=grid)
    assert out["oh"][0] == pytest.approx(x0, abs=2e-5)
    assert out["oh_lo"][0] == pytest.approx(x0 - 0.99446 * sigma_x, abs=2e-5)  # 16th pct
    assert out["oh_hi"][0] == pytest.approx(x0 + 0.99446 * sigma_x, abs=2e-5)
    assert out["chi2_min"][0] == pytest.approx(0.0, abs=1e-3)  # minimum over grid nodes
    assert not out["bimodal"][0] and not out["at_edge"][0]


def test_no_pile_up_at_grid_nodes(linear_set):
    """Medians move smoothly with the data (not in steps of the 0.001 grid)."""
    x0 = 8.3 + np.linspace(0, 0.002, 41)  # 20 sub-steps per grid cell
    obs = (0.2 - 2.0 * (x0 - 8.69))[:, None]
    grid = make_grid(["R3"], calibration_set=linear_set, step=0.001)
    out = grid_summary(obs, np.full_like(obs, 0.02), ["R3"], calibration_set=linear_set,
                       grid=grid)
    assert np.allclose(out["oh"], x0, atol=2e-5)
    assert np.allclose(np.diff(out["oh"]), np.diff(x0), atol=2e-6)


def test_r3_alone_is_bimodal_and_r3_n2_is_not():
    grid = make_grid(["R3", "N2"])
    r3 = float(get_calibration("R3").log_ratio(8.3))  # the same R3 at 7.635 on the other branch
    out = grid_summary(np.array([[r3]]), np.array([[0.02]]), ["R3"], grid=grid)
    assert out["bimodal"][0]
    n2 = float(get_calibration("N2").log_ratio(8.3))
    both = grid_summary(np.array([[r3, n2]]), np.array([[0.02, 0.02]]), ["R3", "N2"], grid=grid)
    assert not both["bimodal"][0]
    assert both["oh"][0] == pytest.approx(8.3, abs=0.02)


def test_edge_mass_is_flagged():
    grid = make_grid(["O3O2"])
    o3o2 = float(get_calibration("O3O2").log_ratio(7.62))
    out = grid_summary(np.array([[o3o2]]), np.array([[0.05]]), ["O3O2"], grid=grid)
    assert out["at_edge"][0]
    inner = float(get_calibration("O3O2").log_ratio(8.3))
    out = grid_summary(np.array([[inner]]), np.array([[0.05]]), ["O3O2"], grid=grid)
    assert not out["at_edge"][0]


# --------------------------------------------------------------------------- recovery
def test_injection_recovery_within_0p02_dex_at_high_snr():
    rng = np.random.default_rng(1)
    truth = rng.uniform(7.8, 8.75, (30, 30))
    maps = line_maps(truth, snr=300.0, dims=("y", "x"), rng=rng)
    out = metallicity_map(maps, diagnostics=DIAGS)
    err = np.abs(out["oh"].values - truth)
    assert np.nanmax(err) < 0.02
    assert not out["no_diagnostic"].any()
    assert out.attrs["diagnostics_used"] == "R3,N2,S2" and out.attrs["method"] == "grid"
    assert out["oh"].dims == ("y", "x") and out["oh"].attrs["units"] == "dex"


def test_one_sigma_intervals_cover_truth_68_percent():
    """2000 realisations with calibration scatter (sigma_R) and flux noise: coverage 68 +- 5 %."""
    rng = np.random.default_rng(2)
    n = 2000
    truth = rng.uniform(8.2, 8.6, n)
    snr = 20.0
    fluxes = predicted_line_fluxes(truth).rename(dim_0="pix")
    # intrinsic scatter of each calibration, drawn independently (R3 moves [OIII], N2 moves [NII])
    for line, diag in (("OIII_5007", "R3"), ("NII_6584", "N2")):
        scatter = 10 ** rng.normal(0, get_calibration(diag).sigma, n)
        fluxes.loc[dict(line=line)] = fluxes.sel(line=line) * scatter
    err = fluxes / snr
    maps = xr.Dataset({"flux": fluxes + rng.normal(size=fluxes.shape) * err, "flux_err": err})
    # (no BPT cut: the drawn scatter pushes a few per cent above Kewley+01)
    out = metallicity_map(maps, diagnostics=["R3", "N2"], exclude_agn=False)
    assert not out["no_diagnostic"].any()
    covered = (out["oh_lo"] <= truth) & (truth <= out["oh_hi"])
    assert float(covered.mean()) == pytest.approx(0.68, abs=0.05)


def test_missing_line_widens_the_posterior_without_sentinels():
    truth = np.full(3, 8.4)
    maps = line_maps(truth, snr=50.0, dims=("pix",))
    maps["flux"].loc[dict(line="NII_6584", pix=1)] = np.nan
    maps["flux"].loc[dict(line="NII_6584", pix=2)] = -1.0
    out = metallicity_map(maps, diagnostics=["R3", "N2", "S2"])
    width = (out["oh_hi"] - out["oh_lo"]).values
    assert out["n_diagnostics"].values.tolist() == [3, 2, 2]
    assert width[1] > width[0] and np.isfinite(out["oh"]).all()


def test_bad_pixels_are_flagged_never_crash_or_warn():
    truth = np.full((2, 3), 8.4)
    maps = line_maps(truth, snr=50.0, dims=("y", "x"))
    maps["flux"][:, 0, 0] = np.nan            # all lines NaN
    maps["flux"][:, 0, 1] = 0.0               # all lines zero
    maps["flux"][:, 0, 2] = -1.0              # all negative
    maps["flux_err"][:, 1, 0] = 0.0           # zero errors
    # ratios outside every calibration: R3 = 1.5 dex, N2 = 0.5 dex (not AGN-excluded here)
    maps["flux"].loc[dict(line="OIII_5007", y=1, x=1)] = 10**1.5
    maps["flux"].loc[dict(line="NII_6584", y=1, x=1)] = 10**0.5 * 2.87
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = metallicity_map(maps, diagnostics=["R3", "N2"], exclude_agn=False)
    flags = out["no_diagnostic"].values
    assert flags[0].all() and flags[1, 0] and not flags[1, 1:].any()
    assert np.isnan(out["oh"].values[flags]).all()
    assert out["poor_fit"].values[1, 1] and not out["poor_fit"].values[1, 2]
    assert np.isfinite(out["oh"].values[1, 1])


def test_agn_pixels_are_flagged_and_kept_by_default_as_k20():
    """K20 §3.4 removed one AGN galaxy and cut no pixels: flag by default, cut on request."""
    maps = line_maps(np.full(2, 8.5), snr=100.0, dims=("pix",))
    maps["flux"].loc[dict(line="OIII_5007", pix=1)] = 10**0.9   # log O3 0.9, log N2 ~ -0.5: AGN
    kept = metallicity_map(maps, diagnostics=["R3", "N2"])
    assert kept["agn_like"].values.tolist() == [False, True]
    assert not kept["agn_excluded"].values.any()
    assert np.isfinite(kept["oh"].values).all()
    out = metallicity_map(maps, diagnostics=["R3", "N2"], exclude_agn=True)
    assert out["agn_excluded"].values.tolist() == [False, True]
    assert np.isnan(float(out["oh"][1])) and np.isfinite(float(out["oh"][0]))


@pytest.mark.parametrize("dims", [("ys", "xs"), ()])
def test_source_plane_and_integrated_shapes(dims):
    truth = np.full((4, 3), 8.3) if dims else 8.3
    maps = line_maps(truth, snr=200.0, dims=dims or None)
    out = metallicity_map(maps, diagnostics=["R3", "N2"])
    assert out["oh"].dims == dims
    assert np.allclose(out["oh"], 8.3, atol=0.02)


# --------------------------------------------------------------------------- dust
def test_dust_corrected_o3o2_recovers_truth_on_dusty_input():
    rng = np.random.default_rng(4)
    truth = rng.uniform(7.9, 8.5, 400)
    maps = line_maps(truth, snr=200.0, ebv=0.4, dims=("pix",), rng=rng)
    out = metallicity_map(maps, diagnostics=["R3", "N2", "O3O2"])
    assert out.attrs["dust_corrected"] == 1
    assert float(out["ebv"].mean()) == pytest.approx(0.4, abs=0.01)
    assert out["ebv_from_balmer"].all()
    assert np.nanmax(np.abs(out["oh"] - truth)) < 0.03
    raw = metallicity_map(maps, diagnostics=["R3", "N2", "O3O2"], dust_correction=False)
    assert float(np.nanmean(raw["oh"] - truth)) < -0.02  # reddened O3O2 reads metal-poor


def test_global_ebv_used_where_hbeta_is_weak():
    truth = np.full(3, 8.2)
    maps = line_maps(truth, snr=200.0, ebv=0.3, dims=("pix",))
    maps["flux_err"].loc[dict(line="Hbeta", pix=2)] = 10.0  # Hbeta SNR << 3 in pixel 2
    out = metallicity_map(maps, diagnostics=["N2", "O3O2"], ebv=0.3, ebv_err=0.02)
    assert out["ebv_from_balmer"].values.tolist() == [True, True, False]
    assert float(out["ebv"][2]) == 0.3
    assert np.allclose(out["oh"], 8.2, atol=0.03)


# --------------------------------------------------------------------------- choice
def test_choose_diagnostics_follows_k20():
    full = line_maps(np.full(4, 8.4), snr=50.0, dims=("pix",))
    assert choose_diagnostics(full, redshift=1.5) == ["R3", "N2"]
    assert choose_diagnostics(full, redshift=2.2) == ["R3", "N2", "O3O2"]
    no_nii = full.copy(deep=True)
    no_nii["flux_err"].loc[dict(line="NII_6584")] = 1e3
    assert choose_diagnostics(no_nii, redshift=1.5) == ["R3", "S2"]
    no_oii = full.drop_sel(line=["OII_3727", "OII_3729"])
    assert choose_diagnostics(no_oii, redshift=2.2) == ["R3", "N2"]
    assert choose_diagnostics(full, redshift=1.5, use_s2="always") == ["R3", "N2", "S2"]
    assert choose_diagnostics(full, redshift=1.5, requested=["S2", "O3N2"]) == ["S2", "O3N2"]
    with pytest.raises(ConfigError, match="OII"):
        choose_diagnostics(no_oii, redshift=2.2, requested=["O3O2"])
    with pytest.raises(ConfigError, match="unknown diagnostic"):
        choose_diagnostics(full, redshift=2.2, requested=["N3"])
    integrated = full.isel(pix=0)
    assert choose_diagnostics(integrated, redshift=1.5) == ["R3", "N2"]


def test_no_usable_diagnostic_gives_all_nan_map():
    maps = line_maps(np.full(2, 8.4), dims=("pix",)).sel(line=["Halpha", "Hbeta"])
    out = metallicity_map(maps, redshift=1.5)
    assert out.attrs["diagnostics_used"] == ""
    assert out["no_diagnostic"].all() and np.isnan(out["oh"]).all()


def test_bad_options_are_config_errors():
    maps = line_maps(np.full(2, 8.4), dims=("pix",))
    with pytest.raises(ConfigError, match="method"):
        metallicity_map(maps, diagnostics=["R3"], method="mcmc")
    with pytest.raises(ConfigError, match="S2"):
        metallicity_map(maps, diagnostics=["S2"], calibration_set="C17")
    with pytest.raises(ConfigError, match="grid_step"):
        metallicity_map(maps, diagnostics=["R3"], grid_step=0.1)


def test_output_round_trips_through_netcdf(tmp_path):
    from klever_nb.io.products import read_netcdf, write_netcdf

    out = metallicity_map(line_maps(np.full((2, 2), 8.4), dims=("y", "x")), diagnostics=DIAGS)
    path = write_netcdf(out, tmp_path / "metallicity.nc")
    back = read_netcdf(path)
    xr.testing.assert_identical(back, out)


# --------------------------------------------------------------------------- emcee
def test_emcee_agrees_with_grid_on_unimodal_pixels():
    rng = np.random.default_rng(6)
    truth = np.array([8.05, 8.35, 8.65])
    obs = np.stack([get_calibration(d).log_ratio(truth) for d in DIAGS], -1)
    err = np.full_like(obs, 0.05)
    obs += rng.normal(0, 0.05, obs.shape)
    grid = make_grid(DIAGS)
    exact = grid_summary(obs, err, DIAGS, grid=grid)
    sampled = posterior_emcee(obs, err, DIAGS, nwalkers=32, nsteps=2000, seed=1)
    assert not exact["bimodal"].any()
    for key in ("oh", "oh_lo", "oh_hi"):
        assert np.max(np.abs(sampled[key] - exact[key])) < 0.01
    assert sampled["converged"].all()
    assert (sampled["acceptance"] > 0.2).all()


def test_emcee_short_chain_is_not_converged_and_does_not_raise():
    obs = np.array([[0.3, -0.8]])
    out = posterior_emcee(obs, np.full_like(obs, 0.05), ["R3", "N2"], nwalkers=4, nsteps=30)
    assert not out["converged"][0] and np.isfinite(out["oh"][0])
    with pytest.raises(ConfigError, match="nwalkers"):
        posterior_emcee(obs, obs, ["R3", "N2"], nwalkers=3)


def test_emcee_vectorised_log_prob_equals_looped():
    from klever_nb.posterior import _log_prob_factory

    cals = [get_calibration(d) for d in DIAGS]
    obs, weight = np.array([0.3, -0.8, -0.9]), np.array([100.0, 50.0, 80.0])
    log_prob = _log_prob_factory(obs, weight, cals, 7.6, 8.9)
    theta = np.array([[7.5], [7.7], [8.2], [8.8], [9.0]])
    vector = log_prob(theta)
    looped = [log_prob(t[None, :])[0] for t in theta]
    assert np.array_equal(vector, looped)
    assert np.isneginf(vector[[0, 4]]).all() and np.isfinite(vector[1:4]).all()


# --------------------------------------------------------------------------- one eq. (1)
def _closed_form_log_r(diagnostic, oh):
    """sum_n c_n (oh - 8.69)^n written out from the C20 coefficients (FACTS.md §1.3)."""
    coefficients = get_calibration(diagnostic).coefficients
    return sum(c * (oh - 8.69) ** n for n, c in enumerate(coefficients))


def test_calibration_polynomials_at_known_points():
    # at the solar point x = 0: log R = c0 (FACTS.md §1.3 table)
    for diagnostic, c0 in (("R3", -0.277), ("N2", -0.489), ("S2", -0.442), ("R2", 0.435),
                           ("O3O2", -0.691)):
        assert float(get_calibration(diagnostic).log_ratio(8.69)) == pytest.approx(c0, abs=1e-12)
    # one step away: x = -0.69 at 12+log(O/H) = 8.0
    x = -0.69
    expected = -0.277 - 3.549 * x - 3.593 * x**2 - 0.981 * x**3
    assert float(get_calibration("R3").log_ratio(8.0)) == pytest.approx(expected, abs=1e-12)
    # the turnover of R3 (FACTS.md §1.4): maximum 0.784 at 8.003
    assert float(get_calibration("R3").log_ratio(8.003)) == pytest.approx(0.784, abs=1e-3)


def test_the_eq1_routes_agree_with_the_closed_form():
    """Grid reference, fast grid, emcee ln p and the mean_ratio route: one chi^2, to 1e-10."""
    from klever_nb.gradients import oh_from_log_ratios
    from klever_nb.posterior import _log_prob_factory, _weights, chi2_eq1

    points = np.array([7.7, 8.0, 8.3, 8.5, 8.69, 8.85])
    cals = [get_calibration(d) for d in DIAGS]
    obs = np.array([0.45, -0.75, -0.8])
    err = np.array([0.05, 0.1, 0.02])
    weight = 1.0 / (err**2 + np.array([c.sigma for c in cals]) ** 2)
    closed = np.array([sum(w * (o - _closed_form_log_r(d, x)) ** 2
                           for d, o, w in zip(DIAGS, obs, weight, strict=True)) for x in points])

    obs0, w0 = _weights(obs[None], err[None], np.array([c.sigma for c in cals]))
    assert np.allclose(w0[0], weight, rtol=1e-14, atol=0)
    model = np.array([[_closed_form_log_r(d, x) for x in points] for d in DIAGS])
    assert np.allclose(chi2_eq1(obs0, w0, model)[0], closed, rtol=0, atol=1e-10)
    # emcee: ln p = -chi^2 / 2
    log_prob = _log_prob_factory(obs, weight, cals, 7.6, 8.9)
    assert np.allclose(log_prob(points[:, None]), -0.5 * closed, rtol=0, atol=1e-10)
    # reference grid posterior: log density differences are chi^2 differences
    post = posterior_grid(obs, err, DIAGS, grid=points)
    assert np.allclose(np.log(post / post[0]), -0.5 * (closed - closed[0]), rtol=0, atol=1e-10)
    # fast grid: chi2_min and mode on the same nodes
    fast = grid_summary(obs, err, DIAGS, grid=points)
    assert float(fast["chi2_min"]) == pytest.approx(closed.min(), abs=1e-10)
    assert float(fast["mode"]) == points[np.argmin(closed)]
    # mean_ratio route: the same function, the same numbers
    dense = make_grid(DIAGS)
    ratios = {d: (np.array([o]), np.array([e])) for d, o, e in zip(DIAGS, obs, err, strict=True)}
    med, lo, hi = oh_from_log_ratios(ratios, grid=dense)
    ref = grid_summary(obs, err, DIAGS, grid=dense)
    for a, key in ((med, "oh"), (lo, "oh_lo"), (hi, "oh_hi")):
        assert np.allclose(a, ref[key], rtol=0, atol=1e-10)


def test_fast_grid_chi2_min_is_chi2_eq1_on_many_pixels():
    """grid_summary's expanded matrix product = chi2_eq1 on the grid, NaN ratios included."""
    from klever_nb.posterior import _weights, calibrated_log_ratios, chi2_eq1

    rng = np.random.default_rng(11)
    obs = np.stack([get_calibration(d).log_ratio(rng.uniform(7.7, 8.8, 400)) for d in DIAGS], -1)
    obs += rng.normal(0, 0.1, obs.shape)
    err = rng.uniform(0.01, 0.3, obs.shape)
    obs[rng.random(obs.shape) < 0.2] = np.nan
    grid = make_grid(DIAGS)
    cals = [get_calibration(d) for d in DIAGS]
    o, w = _weights(obs, err, np.array([c.sigma for c in cals]))
    chi2 = chi2_eq1(o, w, calibrated_log_ratios(cals, grid))
    fast = grid_summary(obs, err, DIAGS, grid=grid, chunk_size=64)
    used = (w > 0).any(axis=1)
    assert np.allclose(fast["chi2_min"][used], chi2[used].min(axis=1), rtol=0, atol=1e-10)
    assert np.array_equal(fast["mode"][used], grid[np.argmin(chi2[used], axis=1)])


def test_exact_ratios_give_chi2_zero_at_the_truth_on_every_route():
    from klever_nb.posterior import _log_prob_factory, _weights

    truth = 8.3
    obs = np.array([_closed_form_log_r(d, truth) for d in DIAGS])
    err = np.full(3, 0.05)
    cals = [get_calibration(d) for d in DIAGS]
    _, weight = _weights(obs[None], err[None], np.array([c.sigma for c in cals]))
    assert _log_prob_factory(obs, weight[0], cals, 7.6, 8.9)(np.array([[truth]]))[0] == \
        pytest.approx(0.0, abs=1e-10)
    grid = make_grid(DIAGS)
    fast = grid_summary(obs, err, DIAGS, grid=grid)
    assert float(fast["chi2_min"]) == pytest.approx(0.0, abs=1e-10)
    assert float(fast["mode"]) == pytest.approx(truth, abs=1e-9)
    post = posterior_grid(obs, err, DIAGS, grid=grid)
    assert grid[np.argmax(post)] == pytest.approx(truth, abs=1e-9)


# --------------------------------------------------------------------------- emcee flags
def test_chain_summary_flags_follow_the_samples():
    from klever_nb.metallicity import chain_summary

    rng = np.random.default_rng(3)
    one = rng.normal(8.3, 0.05, 40_000)
    two = np.concatenate([rng.normal(7.9, 0.04, 20_000), rng.normal(8.6, 0.04, 20_000)])
    edge = 7.6 + np.abs(rng.normal(0, 0.1, 40_000))
    logp = -np.abs(one - 8.3)  # highest ln p at the sample nearest 8.3
    s1 = chain_summary(one, logp, lo=7.6, hi=8.9)
    assert not s1["bimodal"] and not s1["at_edge"]
    assert s1["mode"] == pytest.approx(8.3, abs=1e-3) and s1["chi2_min"] == pytest.approx(0, abs=2e-3)
    assert s1["oh"] == pytest.approx(8.3, abs=0.005)
    assert chain_summary(two, np.zeros_like(two), lo=7.6, hi=8.9)["bimodal"]
    assert chain_summary(edge, np.zeros_like(edge), lo=7.6, hi=8.9)["at_edge"]


def test_chain_flags_equal_grid_flags_when_the_chain_samples_the_grid_posterior():
    """Samples drawn from the exact posterior (inverse CDF) carry its flags."""
    from klever_nb.metallicity import chain_summary

    rng = np.random.default_rng(4)
    grid = make_grid(["R3"])
    cases = {"bimodal": [0.6], "unimodal": [0.1], "edge": [-1.3]}  # R3 alone: two branches
    for name, value in cases.items():
        obs, err = np.array(value), np.array([0.05])
        post = posterior_grid(obs, err, ["R3"], grid=grid)
        cdf = np.concatenate([[0.0], np.cumsum(0.5 * (post[1:] + post[:-1]) * np.diff(grid))])
        samples = np.interp(rng.random(60_000), cdf / cdf[-1], grid)
        chain = chain_summary(samples, np.zeros_like(samples), lo=grid[0], hi=grid[-1])
        exact = summarize_posterior(post, grid)
        assert chain["bimodal"] == bool(exact["bimodal"]), name
        assert chain["at_edge"] == bool(exact["at_edge"]), name
    assert summarize_posterior(posterior_grid(np.array([0.6]), np.array([0.05]), ["R3"],
                                              grid=grid), grid)["bimodal"]


def test_emcee_flags_come_from_the_chains_not_from_a_grid(monkeypatch):
    """A 3-step chain has not left its uniform start: at_edge from the chain, not the grid."""
    import klever_nb.metallicity as met

    maps = line_maps(np.array([8.3]), snr=100.0, dims=("pix",))
    grid = metallicity_map(maps, diagnostics=["R3", "N2"])
    assert not grid["at_edge"].any() and not grid["bimodal"].any()

    def no_grid(*args, **kwargs):
        raise AssertionError("grid_summary called in emcee mode")

    monkeypatch.setattr(met, "grid_summary", no_grid)
    kwargs = {"nwalkers": 64, "nsteps": 3, "burn": 0, "seed": 5}
    out = metallicity_map(maps, diagnostics=["R3", "N2"], method="emcee", emcee_kwargs=kwargs)
    sampled = posterior_emcee(out["log_ratio"].values.T, out["log_ratio_err"].values.T,
                              ["R3", "N2"], **kwargs)
    assert out["at_edge"].values.all() and not out["converged"].values.any()
    for key in ("oh", "oh_lo", "oh_hi", "mode", "chi2_min", "bimodal", "at_edge"):
        assert np.array_equal(out[key].values, sampled[key], equal_nan=True), key
    # the chain's best sample is its chi^2 minimum, worse than the grid's
    assert (out["chi2_min"].values >= grid["chi2_min"].values - 1e-9).all()


def test_metallicity_map_emcee_method():
    maps = line_maps(np.array([8.3, 8.6]), snr=100.0, dims=("pix",))
    out = metallicity_map(maps, diagnostics=["R3", "N2"], method="emcee",
                          emcee_kwargs={"nwalkers": 16, "nsteps": 1500})
    grid = metallicity_map(maps, diagnostics=["R3", "N2"])
    assert out.attrs["method"] == "emcee" and "converged" in out
    assert np.allclose(out["oh"], grid["oh"], atol=0.01)
    assert np.allclose(out["mode"], grid["mode"], atol=0.01)
    assert np.allclose(out["chi2_min"], grid["chi2_min"], atol=0.05)
    assert np.array_equal(out["bimodal"], grid["bimodal"])
    assert np.array_equal(out["at_edge"], grid["at_edge"])


# --------------------------------------------------------------------------- mock observatory
@pytest.mark.slow
def test_recovery_on_mock_observatory_source_maps():
    """The unlensed z = 2.2 demo mock (E(B-V) = 0.3): noisy true source maps -> O/H and E(B-V)."""
    mock = pytest.importorskip("klever_nb.mock")
    spec = next(s for s in mock.demo_specs() if not s.lens and s.redshift > 2)
    source = mock.source_maps(spec)
    bright = source["sb"].sel(line="Halpha") > 0.05 * source["sb"].sel(line="Halpha").max()
    rng = np.random.default_rng(7)
    err = source["sb"] / 100.0
    maps = xr.Dataset({"flux": source["sb"] + rng.normal(size=err.shape) * err, "flux_err": err})
    maps = maps.where(bright)
    chosen = choose_diagnostics(maps, redshift=spec.redshift)
    assert chosen == ["R3", "N2", "O3O2"]
    out = metallicity_map(maps, redshift=spec.redshift)
    assert out.attrs["diagnostics_used"] == "R3,N2,O3O2" and out.attrs["dust_corrected"] == 1
    residual = (out["oh"] - source["oh"]).where(bright)
    assert float(np.abs(residual).median()) < 0.02
    assert float(out["ebv"].where(bright).median()) == pytest.approx(spec.ebv, abs=0.01)
    # integrated (pseudo-fibre-like) fluxes with the same machinery: N2 alone inverts exactly
    integrated = xr.Dataset({"flux": source["sb"].sum(("ys", "xs")),
                             "flux_err": source["sb"].sum(("ys", "xs")) / 1e4})
    glob = metallicity_map(integrated, diagnostics=["N2"])
    log_n2 = float(np.log10(integrated["flux"].sel(line="NII_6584")
                            / integrated["flux"].sel(line="Halpha")))
    fine = np.linspace(7.6, 8.85, 125_001)  # N2 is monotonic below its 8.87 turnover
    inverted = fine[np.argmin(np.abs(get_calibration("N2").log_ratio(fine) - log_n2))]
    assert float(glob["mode"]) == pytest.approx(inverted, abs=0.002)
    assert float(glob["oh_lo"]) < inverted < float(glob["oh_hi"])


def test_global_metallicity_summary_fields():
    from klever_nb.metallicity import global_metallicity

    integrated = line_maps(8.35, snr=200.0, ebv=0.25)
    summary = global_metallicity(integrated, redshift=2.2)
    assert summary["diagnostics"] == ["R3", "N2", "O3O2"]
    assert summary["global_oh"] == pytest.approx(8.35, abs=0.02)
    assert all(e > 0 for e in summary["global_oh_err"])
    assert summary["ebv"] == pytest.approx(0.25, abs=0.005)
    assert summary["bpt_class_n2"] in (1, 2)
    with pytest.raises(ConfigError, match="integrated"):
        global_metallicity(line_maps(np.full(2, 8.3), dims=("pix",)))


def test_error_bars_comparable_to_k20_table_3():
    """Sanity check against K20 Table 3: MS2137-sp1 has 12+log(O/H) = 8.37 +0.04 -0.04 from
    R3 and N2 (Table 4) on integrated spectra. With sigma_cal in eq. (1) the R3+N2 error at
    8.37 is ~0.035 dex even at infinite SNR and ~0.04 at SNR 10: the paper's error is
    calibration-dominated, as ours."""
    floor = metallicity_map(line_maps(8.37, snr=1e4), diagnostics=["R3", "N2"])
    assert 0.03 < float(floor["oh_err_lo"]) < 0.04 and 0.03 < float(floor["oh_err_hi"]) < 0.04
    snr10 = metallicity_map(line_maps(8.37, snr=10.0), diagnostics=["R3", "N2"])
    assert float(snr10["oh_err_lo"]) == pytest.approx(0.04, abs=0.01)
    assert float(snr10["oh"]) == pytest.approx(8.37, abs=0.01)

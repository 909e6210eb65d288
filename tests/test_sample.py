"""klever_nb.sample: closed forms (Speagle+14, magnification, MZR), the regression on known
lines, the literature table, and the paper-number test (K20 Fig. 9 / Fig. 10)."""

from __future__ import annotations

import numpy as np
import pytest

from klever_nb import sample


def test_speagle14_matches_the_facts_check_values_and_imf_shift():
    # FACTS.md §3: z = 2 gives log SFR = 0.650 at log M* = 9 and 1.406 at log M* = 10
    assert sample.speagle14_sfms(9.0, 2.0) == pytest.approx(0.650, abs=2e-3)
    assert sample.speagle14_sfms(10.0, 2.0) == pytest.approx(1.406, abs=2e-3)
    assert sample.universe_age_gyr([1.5, 2.0, 2.5]) == pytest.approx([4.201, 3.227, 2.574],
                                                                     abs=1e-3)
    shift = sample.speagle14_sfms(10.0, 2.0, imf="chabrier") - sample.speagle14_sfms(10.0, 2.0)
    assert shift == pytest.approx(-np.log10(1.06))


def test_delta_sfms_and_its_error_closed_form():
    z, m = 1.4, 9.5
    on = sample.speagle14_sfms(m, z)
    d, e = sample.delta_sfms(on + 0.3, m, z, log_sfr_err=0.1, log_mstar_err=0.2)
    slope = 0.84 - 0.026 * sample.universe_age_gyr(z)
    assert d == pytest.approx(0.3)
    assert e == pytest.approx(np.hypot(0.1, slope * 0.2))


def test_stellar_mass_is_demagnified_only_when_not_corrected():
    m, e = sample.demagnify_log_mstar([10.0, 10.0, 10.0], [0.1, 0.1, 0.1], [10.0, 10.0, np.nan],
                                      [1.0, 1.0, np.nan], corrected=[False, True, False])
    assert m == pytest.approx([9.0, 10.0, 10.0])
    assert e[0] == pytest.approx(np.hypot(0.1, 0.1 / np.log(10)))
    assert e[1:] == pytest.approx([0.1, 0.1])


def test_derive_uses_the_toml_flag_and_mu_for_a_run_table():
    import pandas as pd

    table = pd.DataFrame({"name": ["a", "b", "c"], "redshift": [1.4, 1.4, 2.2],
                          "lensed": [True, True, False], "mu_halpha": [4.0, 4.0, np.nan],
                          "mu_halpha_err": [0.4, 0.4, np.nan], "prop_log_mstar": [10.0] * 3,
                          "prop_log_mstar_err": [0.1] * 3,
                          "prop_mstar_mu_corrected": [0, 1, np.nan],
                          "sfr": [10.0, 10.0, 10.0], "sfr_err": [1.0, 1.0, 1.0],
                          "global_oh": [8.5, 8.5, 8.5],
                          "gradient_dex_per_kpc": [0.0] * 3, "gradient_err": [0.01] * 3})
    d = sample.derive(table)
    assert d["log_mstar"].tolist() == pytest.approx([10 - np.log10(4.0), 10.0, 10.0])
    assert d["log_ssfr"].iloc[2] == pytest.approx(1.0 - 10.0)
    assert d["log_sfr_err"].iloc[0] == pytest.approx(0.1 / np.log(10))
    assert d["mzr_offset"].iloc[1] == pytest.approx(8.5 - sample.mzr_curti20(10.0))


def test_local_mzr_shape():
    # C20 eq. 5: at M0 the metallicity is Z0 - (gamma/beta) log10(2); asymptote Z0
    p = sample.CURTI20_MZR
    assert sample.mzr_curti20(p["log_m0"]) == pytest.approx(
        p["z0"] - p["gamma"] / p["beta"] * np.log10(2))
    assert sample.mzr_curti20(13.0) == pytest.approx(p["z0"], abs=1e-3)
    # low-mass slope tends to gamma
    lo = sample.mzr_curti20([7.0, 7.5])
    assert (lo[1] - lo[0]) / 0.5 == pytest.approx(p["gamma"], rel=0.02)


@pytest.mark.parametrize("estimator", sample.ESTIMATORS)
def test_regression_recovers_a_known_line_with_honest_errors(estimator):
    rng = np.random.default_rng(4)
    slopes, errs = [], []
    for _ in range(12):
        x = rng.normal(-8.5, 0.5, 120)
        y = 0.02 + 0.013 * (x + 8.5) + rng.normal(0, 0.02, x.size)
        r = sample.regress(x, y, estimator=estimator, n_boot=150, seed=1)
        slopes.append(r.slope)
        errs.append(r.slope_err)
    assert np.mean(slopes) == pytest.approx(0.013, abs=0.0015)
    # the bootstrap error describes the scatter of the slopes between realisations
    assert np.std(slopes, ddof=1) == pytest.approx(np.mean(errs), rel=0.5)
    assert r.rms == pytest.approx(0.02, rel=0.2)
    assert r.spearman_rho > 0.2 and r.spearman_p < 0.05


def test_huber_resists_an_outlier_that_moves_least_squares():
    x = np.linspace(0, 1, 40)
    y = 0.01 * x + np.random.default_rng(0).normal(0, 0.002, x.size)
    y[-1] = 0.5
    huber = sample.regress(x, y, estimator="huber", n_boot=20)
    ols = sample.regress(x, y, estimator="ols", n_boot=20)
    assert huber.slope == pytest.approx(0.01, abs=0.003)
    assert abs(ols.slope - 0.01) > 0.05


def test_literature_loader_one_table():
    lit = sample.load_literature()
    assert {"survey", "redshift", "gradient_dex_per_kpc", "gradient_err", "method",
            "lensed", "log_mstar", "log_sfr", "source", "name"} <= set(lit.columns)
    counts = lit["survey"].value_counts()
    assert counts["KLEVER (Curti+20, digitised)"] == 12
    assert counts["Wuyts+16 (KMOS3D)"] == 159        # rows with a gradient (README check)
    assert counts["Carton+18 (MUSE)"] == 65           # 84 minus 19 'Unreliable'
    assert counts["KLEVER (K20 tables)"] == 6
    assert lit.loc[lit["survey"] == "Wang+17", "lensed"].all()
    # the K20 rows as printed (Table 4): sp1 0.019 +- 0.012, CSWA164 -0.006 +- 0.013
    k20 = sample.k20_table().set_index("name")
    assert k20.loc["sp1", "gradient_dex_per_kpc"] == 0.019
    assert k20.loc["CSWA164", "gradient_err"] == 0.013
    # the digitised KLEVER set: median ~0.015 and 11/12 flatter than 0.05 (its README)
    kl = lit[lit["survey"] == "KLEVER (Curti+20, digitised)"]["gradient_dex_per_kpc"]
    assert np.median(kl) == pytest.approx(0.015, abs=0.003)
    assert (kl.abs() < 0.05).sum() == 11


# K20 §4.4 / Fig. 9 and Fig. 10
PAPER = {"log_ssfr": (0.013, 0.004, 0.29), "log_mstar": (-0.013, 0.005, -0.25),
         "delta_sfms": (None, None, 0.20)}


@pytest.fixture(scope="module")
def paper_correlations():
    cs = sample.correlation_sample(sample.k20_table())
    return cs, sample.correlations(cs, estimator="huber", n_boot=300, seed=0)


def test_paper_numbers_fig9_fig10_from_the_tables(paper_correlations):
    """K20's Table 2-4 rows + the literature at z >= 0.8 with M* and SFR (Wuyts+16) give back
    the Fig. 9 slopes within the paper's errors and Spearman rho within 1/sqrt(N-3)."""
    cs, res = paper_correlations
    n = len(cs)
    assert n == res["log_ssfr"].n > 100
    rho_err = 1 / np.sqrt(n - 3)
    for key, (slope, slope_err, rho) in PAPER.items():
        r = res[key]
        print(f"{key}: slope {r.slope:+.4f} +- {r.slope_err:.4f} (paper {slope}), "
              f"rho {r.spearman_rho:+.3f} p={r.spearman_p:.2g} (paper {rho}), N={r.n}")
        assert r.spearman_rho == pytest.approx(rho, abs=rho_err), key
        if slope is not None:
            assert r.slope == pytest.approx(slope, abs=slope_err), key
            assert np.sign(r.slope) == np.sign(slope)
    # K20: both correlations significant at >= 99.9 per cent
    assert res["log_ssfr"].spearman_p < 1e-3 and res["log_mstar"].spearman_p < 1e-3

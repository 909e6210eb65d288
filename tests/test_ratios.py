"""Each ratio definition, one by one, with hand numbers; log-space errors; SNR cuts; bad input."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import xarray as xr

from klever_nb.constants import OIII_RATIO
from klever_nb.dust import balmer_constant, balmer_ebv, correct_for_dust, k_lambda
from klever_nb.errors import ConfigError
from klever_nb.ratios import (
    DIAGNOSTICS,
    balmer_dust_slope,
    observed_log_ratio,
    oiii_4959_is_tied,
)

LN10 = math.log(10)
HAND = {  # line -> flux; [OIII]4959 deliberately NOT 5007/2.98 (measured case)
    "OII_3727": 1.0, "OII_3729": 2.0, "Hbeta": 2.0, "OIII_4959": 1.5, "OIII_5007": 6.0,
    "Halpha": 2.0, "NII_6584": 0.5, "SII_6717": 0.3, "SII_6731": 0.2,
}


def make_maps(fluxes: dict[str, float | np.ndarray], errors: dict | float = 0.001,
              dims: tuple[str, ...] = ()) -> xr.Dataset:
    names = list(fluxes)
    flux = np.stack([np.asarray(fluxes[n], dtype=float) for n in names])
    if isinstance(errors, dict):
        err = np.stack([np.broadcast_to(np.asarray(errors[n], float), flux.shape[1:])
                        for n in names])
    else:
        err = np.full_like(flux, errors)
    return xr.Dataset({"flux": (("line", *dims), flux), "flux_err": (("line", *dims), err)},
                      coords={"line": names})


def ratio(maps, name, **kwargs):
    value, error, usable = observed_log_ratio(maps, name, **kwargs)
    return float(value), float(error), bool(usable)


@pytest.mark.parametrize("name, expected", [
    ("R2", 3.0 / 2.0),                  # ([OII]3727 + 3729) / Hb
    ("R3", 6.0 / 2.0),                  # [OIII]5007 / Hb, 5007 only
    ("O3O2", 6.0 / 3.0),                # [OIII]5007 / [OII] sum
    ("R23", (3.0 + 1.5 + 6.0) / 2.0),   # ([OII] + [OIII]4959 + 5007) / Hb, measured 4959
    ("N2", 0.5 / 2.0),                  # [NII]6584 / Ha
    ("O3N2", (6.0 / 2.0) / (0.5 / 2.0)),
    ("S2", 0.5 / 2.0),                  # [SII]6717+6731 / Ha
    ("RS32", 6.0 / 2.0 + 0.5 / 2.0),    # a SUM of two ratios, then log
    ("O3S2", (6.0 / 2.0) / (0.5 / 2.0)),
])
def test_each_ratio_definition_by_hand(name, expected):
    value, _, usable = ratio(make_maps(HAND), name)
    assert usable
    assert value == pytest.approx(math.log10(expected), abs=1e-12)


def test_o3s2_has_hbeta_unlike_the_pyoxy_bug():
    value, _, _ = ratio(make_maps(HAND), "O3S2")
    buggy = math.log10(6.0 / (0.5 / 2.0))  # pyOxy: [OIII] / ([SII]/Ha), Hb missing
    assert abs(value - buggy) == pytest.approx(math.log10(2.0))


def test_r23_uses_5007_over_oiii_ratio_when_tied():
    tied = dict(HAND, OIII_4959=6.0 / OIII_RATIO)
    maps = make_maps(tied)
    assert oiii_4959_is_tied(maps)
    assert not oiii_4959_is_tied(make_maps(HAND))
    value, _, _ = ratio(maps, "R23")
    assert value == pytest.approx(math.log10((3.0 + 6.0 * (1 + 1 / OIII_RATIO)) / 2.0))
    # 4959 absent from the maps: derived from 5007 as well
    no4959 = {k: v for k, v in HAND.items() if k != "OIII_4959"}
    assert ratio(make_maps(no4959), "R23")[0] == pytest.approx(value)
    # the 2.98 vs "3" choice (K20 §3.1 writes 3) moves log R23 by < 0.01 dex here
    with_3 = math.log10((3.0 + 6.0 * (1 + 1 / 3.0)) / 2.0)
    assert 0 < abs(value - with_3) < 0.01


def test_measured_4959_missing_in_a_pixel_falls_back_to_5007_over_ratio():
    fluxes = {k: np.full(2, v) for k, v in HAND.items()}
    fluxes["OIII_4959"] = np.array([1.5, np.nan])
    value, error, usable = observed_log_ratio(make_maps(fluxes, 0.01, ("pix",)), "R23",
                                              oiii_4959="measured")
    assert usable.all() and np.isfinite(error).all()
    assert float(value[0]) == pytest.approx(math.log10((3.0 + 1.5 + 6.0) / 2.0))
    assert float(value[1]) == pytest.approx(math.log10((3.0 + 6.0 * (1 + 1 / OIII_RATIO)) / 2.0))


def test_r3_error_is_first_order_log_propagation():
    errors = {n: 0.01 for n in HAND} | {"OIII_5007": 0.3, "Hbeta": 0.2}
    _, error, _ = ratio(make_maps(HAND, errors), "R3")
    assert error == pytest.approx(math.hypot(0.3 / 6.0, 0.2 / 2.0) / LN10, rel=1e-12)


def test_tied_4959_error_is_fully_correlated_with_5007():
    tied = dict(HAND, OIII_4959=6.0 / OIII_RATIO)
    errors = {n: 0.0 for n in tied} | {"OIII_5007": 0.3, "OIII_4959": 0.3 / OIII_RATIO,
                                       "OII_3727": 0.1, "OII_3729": 0.1, "Hbeta": 0.05}
    _, error, _ = ratio(make_maps(tied, {k: max(v, 1e-9) for k, v in errors.items()}), "R23")
    numerator = 3.0 + 6.0 * (1 + 1 / OIII_RATIO)
    sigma_num = math.sqrt(0.1**2 + 0.1**2 + (0.3 * (1 + 1 / OIII_RATIO)) ** 2)
    expected = math.hypot(sigma_num / numerator, 0.05 / 2.0) / LN10
    assert error == pytest.approx(expected, rel=1e-6)


def test_rs32_and_o3n2_errors_match_monte_carlo():
    rng = np.random.default_rng(3)
    n = 200_000
    errors = {k: 0.01 * v for k, v in HAND.items()}
    noisy = {k: v + rng.normal(0, errors[k], n) for k, v in HAND.items()}
    for name in ("RS32", "O3N2", "S2"):
        _, predicted, _ = ratio(make_maps(HAND, errors), name)
        sampled, _, _ = observed_log_ratio(make_maps(noisy, errors, ("n",)), name)
        assert float(sampled.std()) == pytest.approx(predicted, rel=0.02)


def test_snr_thresholds_strong_5_weak_2p5_and_doublet_sum():
    base = {"Halpha": 10.0, "NII_6584": 1.0}
    ok = make_maps(base, {"Halpha": 10.0 / 5.0, "NII_6584": 1.0 / 2.5})
    assert ratio(ok, "N2")[2]
    low_ha = make_maps(base, {"Halpha": 10.0 / 4.9, "NII_6584": 0.1})
    assert not ratio(low_ha, "N2")[2]
    low_nii = make_maps(base, {"Halpha": 0.1, "NII_6584": 1.0 / 2.4})
    assert not ratio(low_nii, "N2")[2]
    # each [SII] member at SNR 2 but the doublet sum at SNR 2.83 >= 2.5: usable
    sii = make_maps({"Halpha": 10.0, "SII_6717": 1.0, "SII_6731": 1.0},
                    {"Halpha": 0.1, "SII_6717": 0.5, "SII_6731": 0.5})
    assert ratio(sii, "S2")[2]
    assert not ratio(sii, "S2", snr_min_weak=3.0)[2]


def test_snr_variable_fit_ok_and_optional_detected_mask_are_honoured():
    maps = make_maps({"Halpha": 10.0, "NII_6584": 1.0}, 0.01)
    maps["snr"] = ("line", [100.0, 1.0])  # the fitter's SNR wins over flux/err
    assert not ratio(maps, "N2")[2]
    maps["snr"] = ("line", [100.0, 2.7])  # weak line at 2.7 >= 2.5 but below the 3-sigma flag
    maps["detected"] = ("line", [True, False])
    assert ratio(maps, "N2")[2]  # K20 §4.2 thresholds rule by default
    assert not ratio(maps, "N2", use_detected=True)[2]
    maps["fit_ok"] = ("line", [True, False])
    assert not ratio(maps, "N2")[2]


@pytest.mark.parametrize("dims, shape", [((), ()), (("y", "x"), (3, 4)), (("ys", "xs"), (5, 2))])
def test_works_for_integrated_image_and_source_plane_shapes(dims, shape):
    fluxes = {k: np.full(shape, v) for k, v in HAND.items()}
    maps = make_maps(fluxes, 0.001, dims)
    value, error, usable = observed_log_ratio(maps, "O3N2")
    assert value.dims == dims and value.shape == shape
    assert np.allclose(value, math.log10(12.0)) and usable.all() and np.all(error > 0)


def test_bad_fluxes_are_flagged_without_warnings():
    nii = np.array([1.0, 0.0, -1.0, np.nan, 1.0, 1.0, np.inf])
    err = np.array([0.1, 0.1, 0.1, 0.1, 0.0, np.nan, 0.1])
    maps = make_maps({"Halpha": np.full(7, 10.0), "NII_6584": nii},
                     {"Halpha": np.full(7, 0.1), "NII_6584": err}, ("pix",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value, error, usable = observed_log_ratio(maps, "N2")
    assert usable.values.tolist() == [True] + [False] * 6
    assert np.isnan(value.values[1:]).all() and np.isnan(error.values[1:]).all()


def test_missing_line_is_a_config_error():
    with pytest.raises(ConfigError, match="NII_6584"):
        observed_log_ratio(make_maps({"Halpha": 1.0, "Hbeta": 1.0}), "N2")
    with pytest.raises(ConfigError, match="unknown diagnostic"):
        observed_log_ratio(make_maps(HAND), "N3")


@pytest.mark.parametrize("name", sorted(DIAGNOSTICS))
def test_dust_sensitive_flag_matches_the_reddening_slope(name):
    slope = balmer_dust_slope(name, fluxes={"OIII_5007": 3.0, "OIII_4959": 1.0})
    assert (abs(slope) > 0.1) == DIAGNOSTICS[name].dust_sensitive


def test_dust_corrected_ratio_shift_and_error_term():
    ebv, ebv_err = 0.3, 0.1
    maps = make_maps(HAND, 0.001)
    raw, raw_err, _ = ratio(maps, "R2")
    corrected, corrected_err, _ = ratio(maps, "R2", ebv=ebv, ebv_err=ebv_err)
    dk = float(k_lambda(3727.09) - k_lambda(4862.69))  # [OII] k nearly equal for 3727/3729
    assert corrected - raw == pytest.approx(0.4 * dk * ebv, abs=0.002)
    assert corrected_err == pytest.approx(math.hypot(raw_err, 0.4 * dk * ebv_err), rel=0.01)
    # the same through correct_for_dust: ebv_err kept and added once, correlated
    dusty = correct_for_dust(maps, ebv=ebv, ebv_err=ebv_err)
    via, via_err, _ = ratio(dusty, "R2")
    assert via == pytest.approx(corrected, abs=1e-12)
    assert via_err == pytest.approx(corrected_err, rel=1e-9)
    with pytest.raises(ConfigError, match="already dust-corrected"):
        observed_log_ratio(dusty, "R2", ebv=0.1)


def test_balmer_chain_rule_error_matches_monte_carlo():
    """E(B-V) from the same Hbeta that sits in R2: the errors add coherently (not in quadrature)."""
    rng = np.random.default_rng(5)
    truth = dict(HAND, Halpha=2.87 * 2.0 * 10 ** (0.4 * 1.0733 * 0.2))
    errors = {k: 0.02 * v for k, v in truth.items()}
    n = 100_000
    noisy = make_maps({k: v + rng.normal(0, errors[k], n) for k, v in truth.items()}, errors,
                      ("n",))
    dust = balmer_ebv(noisy)
    value, _, _ = observed_log_ratio(noisy, "R2", ebv=dust["ebv"], ebv_err=dust["ebv_err"],
                                     ebv_from_balmer=True)
    exact = make_maps(truth, errors)
    e0 = balmer_ebv(exact)
    _, predicted, _ = ratio(exact, "R2", ebv=e0["ebv"], ebv_err=e0["ebv_err"],
                            ebv_from_balmer=True)
    _, independent, _ = ratio(exact, "R2", ebv=e0["ebv"], ebv_err=e0["ebv_err"])
    assert float(value.std()) == pytest.approx(predicted, rel=0.03)
    assert independent < 0.85 * predicted  # treating E(B-V) as independent underestimates
    assert balmer_constant() == pytest.approx(2.329, abs=0.001)


def test_doublet_covariance_from_the_fitter_enters_the_s2_error():
    """[SII] members fitted together are anti-correlated; the fitter's pair_sum_err carries it.
    The S2 error must match a Monte-Carlo of correlated member fluxes (it was the
    independent-error value, 1.5x too large here)."""
    rng = np.random.default_rng(4)
    f_a, f_b, f_h = 30.0, 22.0, 200.0
    s_a, s_b, s_h, rho = 4.0, 4.0, 2.0, -0.7
    cov = rho * s_a * s_b
    sum_err = np.sqrt(s_a**2 + s_b**2 + 2 * cov)
    lines = ["Halpha", "SII_6717", "SII_6731"]
    maps = xr.Dataset({"flux": ("line", [f_h, f_a, f_b]), "flux_err": ("line", [s_h, s_a, s_b]),
                       "pair_sum_err": ("line", [np.nan, sum_err, sum_err])},
                      coords={"line": lines})
    _, err, usable = observed_log_ratio(maps, "S2", snr_min_strong=0.0, snr_min_weak=0.0)
    draws = rng.multivariate_normal([f_a, f_b], [[s_a**2, cov], [cov, s_b**2]], 200_000)
    halpha = f_h + s_h * rng.standard_normal(200_000)
    mc = np.std(np.log10(draws.sum(axis=1) / halpha))
    assert bool(usable) and float(err) == pytest.approx(mc, rel=0.03)
    independent = observed_log_ratio(maps.drop_vars("pair_sum_err"), "S2", snr_min_strong=0.0,
                                     snr_min_weak=0.0)[1]
    assert float(independent) > 1.3 * mc

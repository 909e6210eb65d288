"""CCM89 k(lambda), Balmer-decrement E(B-V) and dust correction (K20 §3.3-3.4; FACTS.md §5)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import xarray as xr

from klever_nb.constants import BALMER_INTRINSIC, LINES
from klever_nb.dust import (
    balmer_constant,
    balmer_ebv,
    correct_for_dust,
    integrated_balmer_ebv,
    k_lambda,
)
from klever_nb.errors import ConfigError

# FACTS.md §5 table (CCM89, R_V = 3.1, vacuum wavelengths)
K_CCM89 = {
    "OII_3727": 4.771, "OII_3729": 4.769, "Hbeta": 3.608, "OIII_4959": 3.515,
    "OIII_5007": 3.472, "NII_6548": 2.541, "Halpha": 2.534, "NII_6584": 2.524,
    "SII_6717": 2.461, "SII_6731": 2.454, "SIII_9069": 1.466, "SIII_9531": 1.353,
}


@pytest.mark.parametrize("line", sorted(K_CCM89))
def test_k_lambda_reproduces_facts_table(line):
    assert float(k_lambda(LINES[line].wave_vac)) == pytest.approx(K_CCM89[line], abs=0.002)


def test_k_lambda_vectorised_and_other_laws():
    waves = np.array([[4862.69, 6564.61], [5008.24, 6585.27]])
    assert k_lambda(waves).shape == (2, 2)
    assert float(k_lambda(4862.69, law="Calzetti00", r_v=4.05)) == pytest.approx(4.596, abs=0.002)
    assert float(k_lambda(6564.61, law="Calzetti00", r_v=4.05)) == pytest.approx(3.325, abs=0.002)
    assert float(k_lambda(4862.69, law="O94")) == pytest.approx(3.661, abs=0.002)
    with pytest.raises(ConfigError, match="extinction law"):
        k_lambda(5000.0, law="XYZ")


def maps_from(halpha, hbeta, err_ha, err_hb, dims=("pix",)):
    flux = np.stack([np.atleast_1d(halpha), np.atleast_1d(hbeta)]).astype(float)
    err = np.stack([np.broadcast_to(err_ha, flux.shape[1:]),
                    np.broadcast_to(err_hb, flux.shape[1:])]).astype(float)
    return xr.Dataset({"flux": (("line", *dims), flux), "flux_err": (("line", *dims), err)},
                      coords={"line": ["Halpha", "Hbeta"]})


def test_ebv_is_2p329_log_ratio_over_2p87():
    ratios = np.array([2.87, 3.5, 5.0, 2.5])
    out = balmer_ebv(maps_from(ratios, np.ones(4), 0.001, 0.001))
    assert balmer_constant() == pytest.approx(2.329, abs=0.001)
    assert np.allclose(out["ebv"], 2.329 * np.log10(ratios / 2.87), atol=0.001)
    assert out["ebv_negative"].values.tolist() == [False, False, False, True]  # kept, flagged
    assert float(out["ebv"][3]) < 0


def test_ebv_error_propagation():
    out = balmer_ebv(maps_from(3.5, 1.0, 0.07, 0.05))
    expected = balmer_constant() / math.log(10) * math.hypot(0.07 / 3.5, 0.05 / 1.0)
    assert float(out["ebv_err"][0]) == pytest.approx(expected, rel=1e-9)


def test_ebv_recovered_on_a_dusty_input():
    """Redden intrinsic Balmer lines by E = 0.35 with CCM89, add noise, recover E."""
    rng = np.random.default_rng(11)
    true_ebv = 0.35
    k_ha, k_hb = (float(k_lambda(LINES[n].wave_vac)) for n in ("Halpha", "Hbeta"))
    n = 4000
    hb = 1.0 * 10 ** (-0.4 * k_hb * true_ebv)
    ha = BALMER_INTRINSIC * 10 ** (-0.4 * k_ha * true_ebv)
    err_hb, err_ha = hb / 30, ha / 60
    maps = maps_from(ha + rng.normal(0, err_ha, n), hb + rng.normal(0, err_hb, n), err_ha, err_hb)
    out = balmer_ebv(maps)
    assert float(out["ebv"].mean()) == pytest.approx(true_ebv, abs=0.005)
    pull = (out["ebv"] - true_ebv) / out["ebv_err"]
    assert float(pull.std()) == pytest.approx(1.0, abs=0.05)
    glob, glob_err = integrated_balmer_ebv(maps)
    assert glob == pytest.approx(true_ebv, abs=0.003) and glob_err < 0.003


def test_low_snr_hbeta_missing_or_bad_gives_nan_not_warnings():
    ha = np.array([3.0, 3.0, 3.0, 0.0, np.nan, 3.0])
    hb = np.array([1.0, 0.2, -1.0, 1.0, 1.0, np.nan])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = balmer_ebv(maps_from(ha, hb, 0.01, 0.1))
    assert out["balmer_ok"].values.tolist() == [True] + [False] * 5
    assert np.isnan(out["ebv"].values[1:]).all()
    with pytest.raises(ConfigError, match="Hbeta"):
        balmer_ebv(maps_from(1.0, 1.0, 0.1, 0.1).sel(line=["Halpha"]))


def test_correct_for_dust_restores_intrinsic_fluxes_and_errors():
    ebv, ebv_err = 0.4, 0.05
    waves = {n: LINES[n].wave_vac for n in ("Hbeta", "OIII_5007", "Halpha")}
    intrinsic = np.array([1.0, 3.0, 2.87])
    k = k_lambda(np.array(list(waves.values())))
    observed = intrinsic * 10 ** (-0.4 * k * ebv)
    maps = xr.Dataset({"flux": (("line", "y", "x"), observed[:, None, None] * np.ones((3, 2, 2))),
                       "flux_err": (("line", "y", "x"), 0.01 * np.ones((3, 2, 2)))},
                      coords={"line": list(waves)})
    out = correct_for_dust(maps, ebv=ebv, ebv_err=ebv_err)
    assert np.allclose(out["flux"].isel(y=0, x=0), intrinsic, rtol=1e-12)
    factor = 10 ** (0.4 * k * ebv)
    assert np.allclose(out["flux_err_stat"].isel(y=0, x=0), 0.01 * factor)
    dust_part = intrinsic * 0.4 * math.log(10) * k * ebv_err
    assert np.allclose(out["flux_err"].isel(y=0, x=0), np.hypot(0.01 * factor, dust_part))
    assert out.attrs["dust_corrected"] == 1 and "k_lambda" in out.coords
    with pytest.raises(ConfigError, match="already"):
        correct_for_dust(out, ebv=0.1)


def test_correct_for_dust_per_pixel_ebv_dataset_and_clipping():
    maps = maps_from(np.array([2.87 * 1.5, 2.5]), np.array([1.0, 1.0]), 0.01, 0.01)
    dust = balmer_ebv(maps)
    out = correct_for_dust(maps, ebv=dust)
    # first pixel corrected back to the intrinsic decrement; second (negative E) clipped to 0
    ratio = out["flux"].sel(line="Halpha") / out["flux"].sel(line="Hbeta")
    assert float(ratio[0]) == pytest.approx(BALMER_INTRINSIC, rel=1e-9)
    assert float(ratio[1]) == pytest.approx(2.5, rel=1e-12)
    unclipped = correct_for_dust(maps, ebv=dust, clip_negative=False)
    ratio = unclipped["flux"].sel(line="Halpha") / unclipped["flux"].sel(line="Hbeta")
    assert float(ratio[1]) == pytest.approx(BALMER_INTRINSIC, rel=1e-9)


# --- issue 21: dust edge cases ---------------------------------------------------------------

def test_calzetti00_defaults_to_its_own_r_v_4_05():
    """FACTS.md §5: k(Halpha) = 3.325, k(Hbeta) = 4.596 for Calzetti00 with R_V = 4.05;
    E(B-V) = 1.966 log10(ratio / R_int)."""
    from klever_nb import dust as D

    assert D.default_r_v("Calzetti00") == 4.05 and D.default_r_v("CCM89") == 3.1
    assert float(D.k_lambda(6564.61, law="Calzetti00")) == pytest.approx(3.325, abs=0.002)
    assert float(D.k_lambda(4862.69, law="Calzetti00")) == pytest.approx(4.596, abs=0.002)
    assert D.balmer_constant(law="Calzetti00") == pytest.approx(1.966, abs=0.002)
    assert D.balmer_constant(law="CCM89") == pytest.approx(2.329, abs=0.002)


def test_negative_ebv_is_clipped_and_flagged_with_the_raw_value_kept():
    from klever_nb import dust as D

    out = D.global_ebv_for_correction(-0.08, 0.05)
    assert out["ebv"] == 0.0 and out["ebv_err"] == 0.05
    assert out["ebv_raw"] == -0.08 and out["ebv_flag"] == "negative_clipped"
    ok = D.global_ebv_for_correction(0.3, 0.05)
    assert ok["ebv"] == 0.3 and ok["ebv_flag"] == "ok"


def test_missing_ebv_is_flagged_and_gets_a_nonzero_error():
    from klever_nb import dust as D

    out = D.global_ebv_for_correction(float("nan"), float("nan"))
    assert out["ebv"] == 0.0 and out["ebv_err"] > 0 and np.isnan(out["ebv_raw"])
    assert out["ebv_flag"] == "no_balmer_decrement" and "Hbeta" in out["ebv_message"]

"""SFR from Halpha (K20 §3.3; Kennicutt & Evans 2012; FACTS.md §4)."""

from __future__ import annotations

import math

import astropy.units as u
import numpy as np
import pytest
import xarray as xr

from klever_nb.constants import COSMOLOGY
from klever_nb.dust import k_lambda
from klever_nb.errors import ConfigError
from klever_nb.sfr import sfr_from_halpha, total_halpha


def flux_for_luminosity(luminosity: float, redshift: float) -> float:
    d_l = COSMOLOGY.luminosity_distance(redshift).to(u.cm).value  # independent of klever_nb
    return luminosity / (4 * math.pi * d_l**2)


@pytest.mark.parametrize("redshift", [1.2, 1.5, 2.2])
def test_sfr_of_known_luminosity_within_one_percent(redshift):
    luminosity = 2.0e42
    out = sfr_from_halpha(flux_for_luminosity(luminosity, redshift), 0.0, redshift=redshift)
    expected = luminosity / 10**41.27 / 1.06  # KE12 (Kroupa) -> Chabrier
    assert out["sfr"] == pytest.approx(expected, rel=0.01)
    assert out["luminosity"] == pytest.approx(luminosity, rel=1e-9)
    kroupa = sfr_from_halpha(flux_for_luminosity(luminosity, redshift), 0.0, redshift=redshift,
                             imf="kroupa")
    assert kroupa["sfr"] / out["sfr"] == pytest.approx(1.06)


def test_luminosity_by_hand_4_pi_dl2_f():
    flux, z = 1e-16, 1.5
    d_l_mpc = COSMOLOGY.luminosity_distance(z).to(u.Mpc).value
    by_hand = 4 * math.pi * (d_l_mpc * 3.0856775814913673e24) ** 2 * flux
    out = sfr_from_halpha(flux, 0.0, redshift=z)
    assert out["luminosity"] == pytest.approx(by_hand, rel=1e-9)
    assert out["log_sfr"] == pytest.approx(math.log10(by_hand) - 41.27 - math.log10(1.06))


def test_dust_and_magnification_and_error_budget():
    luminosity, z, ebv, mu = 1e42, 2.0, 0.3, 8.0
    k_ha = float(k_lambda(6564.61))
    observed = flux_for_luminosity(luminosity, z) * 10 ** (-0.4 * k_ha * ebv) * mu
    out = sfr_from_halpha(observed, 0.1 * observed, redshift=z, ebv=ebv, ebv_err=0.1, mu=mu,
                          mu_err=2.0)
    assert out["luminosity"] == pytest.approx(luminosity, rel=1e-9)
    assert out["err_flux_dex"] == pytest.approx(0.1 / math.log(10))
    assert out["err_ebv_dex"] == pytest.approx(0.4 * k_ha * 0.1)
    assert out["err_mu_dex"] == pytest.approx(0.25 / math.log(10))
    total = math.sqrt(out["err_flux_dex"] ** 2 + out["err_ebv_dex"] ** 2 + out["err_mu_dex"] ** 2)
    assert out["log_sfr_err"] == pytest.approx(total)
    assert out["sfr_err"] == pytest.approx(out["sfr"] * math.log(10) * total)


def test_bad_flux_gives_nan_not_an_exception():
    assert math.isnan(sfr_from_halpha(-1e-17, 1e-18, redshift=1.5)["sfr"])
    assert math.isnan(sfr_from_halpha(float("nan"), 1e-18, redshift=1.5)["sfr"])


def test_total_halpha_coadds_spaxels_above_snr_5():
    flux = np.array([[10.0, 4.0], [np.nan, 6.0]])
    err = np.array([[1.0, 1.0], [1.0, 1.0]])  # SNR 10, 4, nan, 6
    maps = xr.Dataset({"flux": (("line", "y", "x"), flux[None]),
                       "flux_err": (("line", "y", "x"), err[None])}, coords={"line": ["Halpha"]})
    total, total_err = total_halpha(maps)
    assert total == 16.0 and total_err == pytest.approx(math.sqrt(2.0))
    maps["flux"].attrs["units"] = "1e-20 erg / (s cm2)"
    total, _ = total_halpha(maps)
    assert total == 16.0  # in the maps' own units
    cgs = sfr_from_halpha(total, 1.0, redshift=1.5, flux_units="1e-20 erg / (s cm2)")
    assert cgs["halpha_flux_cgs"] == pytest.approx(16e-20)
    assert cgs["sfr"] == pytest.approx(sfr_from_halpha(16e-20, 1e-20, redshift=1.5)["sfr"])
    with pytest.raises(ConfigError, match="surface brightness"):
        sfr_from_halpha(1.0, 0.1, redshift=1.5, flux_units="erg / (s cm2 arcsec2)")


def test_sfr_of_mock_galaxy_from_its_source_maps():
    """Dust-attenuated source-plane Halpha of a demo mock, corrected with its E(B-V): SFR within 1 %."""
    mock = pytest.importorskip("klever_nb.mock")
    spec = mock.demo_specs()[2]
    source = mock.source_maps(spec)
    pixel_area = source.attrs["pixel_scale_arcsec"] ** 2
    observed = float(source["sb"].sel(line="Halpha").sum()) * pixel_area  # erg/s/cm2
    out = sfr_from_halpha(observed, 0.0, redshift=spec.redshift, ebv=spec.ebv)
    expected = sfr_from_halpha(spec.halpha_flux, 0.0, redshift=spec.redshift)
    assert out["sfr"] == pytest.approx(expected["sfr"], rel=0.01)
    # and by hand from the intrinsic flux: KE12 / 1.06
    d_l = COSMOLOGY.luminosity_distance(spec.redshift).to(u.cm).value
    by_hand = 4 * math.pi * d_l**2 * spec.halpha_flux / 10**41.27 / 1.06
    assert out["sfr"] == pytest.approx(by_hand, rel=0.01)


def test_sfr_summary_fields():
    from klever_nb.sfr import sfr_summary

    flux = np.full((1, 3, 3), 1e-18)
    maps = xr.Dataset({"flux": (("line", "y", "x"), flux * 1e20),
                       "flux_err": (("line", "y", "x"), flux * 1e19)}, coords={"line": ["Halpha"]})
    maps["flux"].attrs["units"] = "1e-20 erg / (s cm2)"
    out = sfr_summary(maps, redshift=1.5, mu=3.0, mu_err=0.3)
    assert out["halpha_flux"] == pytest.approx(9e-18)
    direct = sfr_from_halpha(9e-18, math.sqrt(9) * 1e-19, redshift=1.5, mu=3.0, mu_err=0.3)
    assert out["sfr"] == pytest.approx(direct["sfr"])
    assert out["sfr_err"] == pytest.approx(direct["sfr_err"])


def test_negative_ebv_does_not_reach_the_sfr():
    """Issue 21: a negative E(B-V) would dim Halpha; the SFR applies 0 and flags it."""
    from klever_nb.sfr import sfr_from_halpha

    neg = sfr_from_halpha(1e-16, 1e-18, redshift=1.5, ebv=-0.1, ebv_err=0.05)
    zero = sfr_from_halpha(1e-16, 1e-18, redshift=1.5, ebv=0.0, ebv_err=0.05)
    assert neg["sfr"] == pytest.approx(zero["sfr"]) and neg["ebv_clipped"]
    assert neg["log_sfr_err"] == pytest.approx(zero["log_sfr_err"])


def test_sfr_divides_by_the_given_magnification():
    from klever_nb.sfr import sfr_from_halpha

    one = sfr_from_halpha(1e-16, 1e-18, redshift=1.5)
    lensed = sfr_from_halpha(1e-16, 1e-18, redshift=1.5, mu=12.4, mu_err=0.3)
    assert lensed["sfr"] == pytest.approx(one["sfr"] / 12.4)

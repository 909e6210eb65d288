"""Truth of the mocks: true source-plane maps, global metallicity, the ``truth.json`` dict.

See :mod:`klever_nb.mock` for the model and its conventions.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import xarray as xr

from klever_nb import constants, cosmology
from klever_nb.calibrations import get_calibration
from klever_nb.mock.physics import disc_model, dust_transmission, line_ratios_to_halpha, oh_range
from klever_nb.mock.render import _band_lines
from klever_nb.mock.spec import (
    CALIBRATION_SET,
    CONTINUUM_EW_HALPHA_REST,
    CONTINUUM_SLOPE,
    MOCK_LINES,
    NOISE_FLOOR,
    NOISE_SKY,
    OII_3729_TO_3727,
    SII_6717_TO_6731,
    SIII_9531_TO_HALPHA,
    MockSpec,
)

# ---------------------------------------------------------------------------
# Source maps, truth
# ---------------------------------------------------------------------------


def source_maps(spec: MockSpec) -> xr.Dataset:
    """True source-plane maps around the galaxy centre (kpc coordinates, arcsec too).

    Variables: ``sb`` (line, ys, xs) observed (dust-attenuated) surface brightness and
    ``sb_intrinsic`` (before dust), erg/s/cm2/arcsec2; ``oh``, ``velocity``, ``radius_kpc``.
    """
    kpc = cosmology.kpc_per_arcsec(spec.redshift)
    half = max(8.0 * spec.scale_length_kpc / kpc, 0.5)  # 8 h: 0.3 % of the flux outside
    n = 2 * int(math.ceil(half / spec.source_pixel_arcsec)) + 1
    offsets = (np.arange(n) - (n - 1) / 2) * spec.source_pixel_arcsec
    cx, cy = spec.centre_offset_arcsec
    bx, by = np.meshgrid(offsets + cx, offsets + cy)
    disc = disc_model(spec, bx, by)
    ratios = line_ratios_to_halpha(disc["oh"])
    intrinsic = np.stack([disc["sb"] * ratios[name] for name in MOCK_LINES])
    dust = np.array([dust_transmission(name, spec.ebv) for name in MOCK_LINES])
    sb_units = {"units": "erg / (s cm2 arcsec2)"}
    return xr.Dataset(
        {"sb": (("line", "ys", "xs"), intrinsic * dust[:, None, None], sb_units),
         "sb_intrinsic": (("line", "ys", "xs"), intrinsic, sb_units),
         "oh": (("ys", "xs"), disc["oh"], {"units": "dex", "long_name": "12+log(O/H)"}),
         "velocity": (("ys", "xs"), disc["velocity"], {"units": "km / s"}),
         "radius_kpc": (("ys", "xs"), disc["radius_kpc"], {"units": "kpc"})},
        coords={"line": list(MOCK_LINES),
                "xs": ("xs", offsets * kpc, {"units": "kpc"}),
                "ys": ("ys", offsets * kpc, {"units": "kpc"}),
                "xs_arcsec": ("xs", offsets + cx, {"units": "arcsec",
                                                    "long_name": "offset from field centre"}),
                "ys_arcsec": ("ys", offsets + cy, {"units": "arcsec"})},
        attrs={"redshift": spec.redshift, "kpc_per_arcsec": kpc,
               "pixel_scale_arcsec": spec.source_pixel_arcsec, "sigma_kms": spec.sigma_kms},
    )


def _global_oh(source: xr.Dataset) -> dict[str, Any]:
    """Halpha-weighted mean O/H and the O/H each diagnostic gives from total source fluxes."""
    weight = source["sb_intrinsic"].sel(line="Halpha").values
    oh = source["oh"].values
    out: dict[str, Any] = {"halpha_weighted": float(np.sum(weight * oh) / np.sum(weight))}
    totals = {name: float(source["sb_intrinsic"].sel(line=name).sum()) for name in MOCK_LINES}
    observed = {
        "N2": totals["NII_6584"] / totals["Halpha"],
        "R3": totals["OIII_5007"] / totals["Hbeta"],
        "S2": (totals["SII_6717"] + totals["SII_6731"]) / totals["Halpha"],
        "O3O2": totals["OIII_5007"] / (totals["OII_3727"] + totals["OII_3729"]),
    }
    lo, hi = oh_range()
    grid = np.linspace(lo, hi, 26001)
    per_diag = {}
    for diag, value in observed.items():
        model = get_calibration(diag, set_name=CALIBRATION_SET).log_ratio(grid)
        miss = np.abs(model - np.log10(value))
        candidates = grid[miss < 1e-3]
        if candidates.size == 0:
            per_diag[diag] = None
            continue
        per_diag[diag] = float(candidates[np.argmin(np.abs(candidates
                                                           - out["halpha_weighted"]))])
    out["integrated"] = per_diag
    return out


def _truth(spec: MockSpec, maps: xr.Dataset, info: dict[str, Any], source: xr.Dataset,
           sigma0: float) -> dict[str, Any]:
    kpc = cosmology.kpc_per_arcsec(spec.redshift)
    ratios = line_ratios_to_halpha(source["oh"].values)
    weight = source["sb_intrinsic"].sel(line="Halpha").values
    # Intrinsic line fluxes: Halpha exact, others weighted by the ratio maps on the source grid.
    intrinsic = {name: float(spec.halpha_flux * np.sum(weight * ratios[name]) / np.sum(weight))
                 for name in MOCK_LINES}
    attenuated = {name: intrinsic[name] * dust_transmission(name, spec.ebv)
                  for name in MOCK_LINES}
    observed = {name: float(maps["flux"].sel(line=name).sum()) for name in MOCK_LINES}
    fine = {name: float(v) for name, v in info["fine_flux"].items()}
    lensed = spec.lens is not None
    mu_lines = {name: observed[name] / attenuated[name] for name in MOCK_LINES}
    global_oh = _global_oh(source)
    truth: dict[str, Any] = {
        "name": spec.name,
        "redshift": spec.redshift,
        "instrument": spec.instrument,
        "bands": {b: list(_band_lines(spec, b)) for b in spec.bands},
        "lensed": lensed,
        "z_lens": spec.z_lens,
        "mu": mu_lines["Halpha"] if lensed else 1.0,
        "mu_definition": ("noiseless image-plane Halpha flux inside the cube / source Halpha "
                          "flux (both after dust); 1 by definition when unlensed"),
        "mu_fine_grid": fine["Halpha"] / attenuated["Halpha"] if lensed else 1.0,
        "mu_lines": mu_lines if lensed else dict.fromkeys(MOCK_LINES, 1.0),
        "image_flux_fraction_in_cube": observed["Halpha"] / fine["Halpha"],
        "line_fluxes_observed": observed,
        "line_fluxes_source_attenuated": attenuated,
        "line_fluxes_intrinsic": intrinsic,
        "flux_units": "erg / (s cm2)",
        "central_oh": spec.central_oh,
        "gradient_dex_per_kpc": spec.gradient_dex_per_kpc,
        "global_oh": global_oh["halpha_weighted"],
        "global_oh_definition": ("Halpha-flux-weighted mean of 12+log(O/H) over the source "
                                 "plane (intrinsic Halpha weights)"),
        "global_oh_from_integrated_ratios": global_oh["integrated"],
        "oh_clip_range": list(oh_range()),
        "ebv": spec.ebv,
        "dust_law": "CCM89, R_V = 3.1 (uniform screen)",
        "sigma_kms": spec.sigma_kms,
        "v_max_kms": spec.v_max_kms,
        "v_turnover_kpc": spec.v_turnover_kpc,
        "inclination_deg": spec.inclination_deg,
        "pa_deg": spec.pa_deg,
        "pa_convention": "degrees from +x (column) towards +y (row)",
        "centre_offset_arcsec": list(spec.centre_offset_arcsec),
        "psf_fwhm_arcsec": spec.psf_fwhm_arcsec,
        "scale_length_kpc": spec.scale_length_kpc,
        "scale_length_arcsec": spec.scale_length_kpc / kpc,
        "kpc_per_arcsec": kpc,
        "pixel_scale_arcsec": spec.pixel_scale_arcsec,
        "lens_fine_pixel_arcsec": spec.lens_fine_pixel_arcsec if lensed else None,
        "source_pixel_arcsec": spec.source_pixel_arcsec,
        "ray_pixel_arcsec": spec.pixel_scale_arcsec / spec.subsample,
        "lens": None,
        "noise_sigma0": sigma0,
        "noise_model": f"sigma0 * sqrt({NOISE_FLOOR} + {NOISE_SKY} * sky), sky peak 1",
        "snr_halpha_peak": spec.snr_halpha_peak,
        "halpha_flux_intrinsic": spec.halpha_flux,
        "ratios": {"SII_6717/SII_6731": SII_6717_TO_6731, "OII_3729/OII_3727": OII_3729_TO_3727,
                   "SIII_9531/Halpha": SIII_9531_TO_HALPHA, "calibrations": CALIBRATION_SET},
        "continuum": {"ew_halpha_rest_angstrom": CONTINUUM_EW_HALPHA_REST,
                      "slope": CONTINUUM_SLOPE},
        "seed": spec.seed,
        "nan_spaxels": spec.nan_spaxels,
        "noiseless": spec.noiseless,
        "cube_offset_arcsec": list(spec.cube_offset_arcsec),
        "cube_offset_definition": ("true sky offset (arcsec, +x/+y cube axes) of the cube "
                                   "centre from its WCS position"),
        "log_mstar": spec.log_mstar,
        "sfr": _sfr_chabrier(spec),
        "sfr_definition": ("Kennicutt & Evans 2012 (Kroupa) / 1.06 -> Chabrier, from the "
                           "intrinsic Halpha flux (K20 §3.3)"),
        "ra_deg": spec.ra_deg,
        "dec_deg": spec.dec_deg,
    }
    if lensed:
        truth["lens"] = {"components": [dict(c) for c in spec.lens.components],
                         "components_normalisation": "source",
                         "z_lens": spec.z_lens,
                         "dls_ds": cosmology.dls_over_ds(spec.z_lens, spec.redshift),
                         "maps_normalisation": "dls_ds"}
    return truth


def _sfr_chabrier(spec: MockSpec) -> float:
    """SFR (Msun/yr, Chabrier) of the intrinsic Halpha flux (K20 §3.3; FACTS.md §4)."""
    lum = 4.0 * np.pi * cosmology.luminosity_distance_cm(spec.redshift) ** 2 * spec.halpha_flux
    return float(10 ** (np.log10(lum) - constants.KE12_LOG_C_HALPHA)
                 / constants.KROUPA_TO_CHABRIER)

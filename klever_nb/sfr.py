"""Star-formation rate from the dust-corrected Halpha luminosity (K20 §3.3).

log SFR [Msun/yr] = log L(Halpha) [erg/s] - 41.27 (Kennicutt & Evans 2012, Kroupa IMF),
divided by 1.06 for a Chabrier IMF (K20 §3.3) and by the magnification mu(Halpha).
L = 4 pi D_L^2 F 10^(0.4 k(Halpha) E(B-V)), D_L in the paper's cosmology.
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from klever_nb.constants import (
    FWHM_PER_SIGMA,
    KE12_LOG_C_HALPHA,
    KROUPA_TO_CHABRIER,
    LINES,
    SFR_SNR,
)
from klever_nb.cosmology import luminosity_distance_cm
from klever_nb.dust import k_lambda
from klever_nb.errors import ConfigError

LN10 = math.log(10.0)
#: Units of the fluxes this module expects.
FLUX_UNITS = "erg / (s cm2)"


def sfr_from_halpha(halpha_flux: float, halpha_flux_err: float, *, redshift: float,
                    ebv: float = 0.0, ebv_err: float = 0.0, mu: float = 1.0, mu_err: float = 0.0,
                    imf: str = "chabrier", law: str = "CCM89", r_v: float | None = None,
                    flux_units: str | None = None) -> dict:
    """SFR (Msun/yr) from an observed Halpha flux in erg/s/cm^2.

    Parameters
    ----------
    halpha_flux, halpha_flux_err : float
        Observed (image-plane, lensed) Halpha flux and 1-sigma error, erg s^-1 cm^-2.
    redshift : float
        Source redshift (D_L from :func:`klever_nb.cosmology.luminosity_distance_cm`).
    ebv, ebv_err : float
        Nebular E(B-V) and its error (mag), CCM89 k(Halpha) = 2.534. A negative E(B-V) is
        clipped to 0 (``ebv_clipped``), its error kept; NaN is an error.
    mu, mu_err : float
        Magnification mu(Halpha) and its error (1 for unlensed sources).
    imf : {"chabrier", "kroupa"}
        IMF of the output (K20: Chabrier, i.e. Kroupa / 1.06).
    flux_units : str, optional
        Units of the flux and error (astropy string, e.g. ``"1e-20 erg / (s cm2)"``);
        default erg/s/cm2.

    Returns
    -------
    dict
        ``sfr``, ``sfr_err`` (Msun/yr; symmetric, from the log error), ``log_sfr``,
        ``log_sfr_err``, ``luminosity`` (erg/s, dust-corrected, de-magnified),
        ``luminosity_distance_cm``, ``a_halpha`` (mag), ``halpha_flux_cgs`` and
        ``halpha_flux_err_cgs`` (the input in erg/s/cm2), and the error budget in dex
        (``err_flux_dex``, ``err_ebv_dex``, ``err_mu_dex``), independent terms in quadrature.

    References
    ----------
    K20 §3.3; Kennicutt & Evans 2012 Table 1; FACTS.md §4-5.

    Examples
    --------
    >>> out = sfr_from_halpha(1e-16, 1e-18, redshift=1.5)
    >>> round(out["log_sfr"], 3)
    0.881
    """
    if imf not in ("chabrier", "kroupa"):
        raise ConfigError(f"imf={imf!r}: use 'chabrier' or 'kroupa'")
    halpha_flux = flux_to_cgs(float(halpha_flux), flux_units)
    halpha_flux_err = flux_to_cgs(float(halpha_flux_err), flux_units)
    if not (np.isfinite(halpha_flux) and halpha_flux > 0):
        nan = float("nan")
        return {"sfr": nan, "sfr_err": nan, "log_sfr": nan, "log_sfr_err": nan,
                "luminosity": nan, "luminosity_distance_cm": luminosity_distance_cm(redshift),
                "a_halpha": nan, "halpha_flux_cgs": halpha_flux,
                "halpha_flux_err_cgs": halpha_flux_err, "err_flux_dex": nan,
                "err_ebv_dex": nan, "err_mu_dex": nan}
    if not mu > 0:
        raise ConfigError(f"mu={mu}: the magnification must be positive")
    d_l = luminosity_distance_cm(redshift)
    k_ha = float(k_lambda(LINES["Halpha"].wave_vac, law=law, r_v=r_v))
    if not np.isfinite(ebv):
        raise ConfigError("sfr_from_halpha: E(B-V) is NaN; decide the correction first "
                          "(klever_nb.dust.global_ebv_for_correction)")
    ebv_raw = float(ebv)
    ebv = max(ebv_raw, 0.0)  # a negative E(B-V) would dim Halpha (unphysical): clipped
    a_ha = k_ha * ebv
    luminosity = 4.0 * math.pi * d_l**2 * halpha_flux * 10.0 ** (0.4 * a_ha) / mu
    log_sfr = math.log10(luminosity) - KE12_LOG_C_HALPHA
    if imf == "chabrier":
        log_sfr -= math.log10(KROUPA_TO_CHABRIER)
    err_flux = halpha_flux_err / (halpha_flux * LN10)
    err_ebv = 0.4 * k_ha * ebv_err
    err_mu = mu_err / (mu * LN10)
    log_err = math.sqrt(err_flux**2 + err_ebv**2 + err_mu**2)
    sfr = 10.0**log_sfr
    return {"sfr": sfr, "sfr_err": sfr * LN10 * log_err, "log_sfr": log_sfr,
            "log_sfr_err": log_err, "luminosity": luminosity, "luminosity_distance_cm": d_l,
            "a_halpha": a_ha, "halpha_flux_cgs": halpha_flux,
            "halpha_flux_err_cgs": halpha_flux_err, "err_flux_dex": err_flux,
            "err_ebv_dex": err_ebv, "err_mu_dex": err_mu, "ebv_applied": ebv,
            "ebv_clipped": ebv_raw < 0}


def flux_to_cgs(value: float, units: str | None) -> float:
    """Convert a line flux in ``units`` (astropy string) to erg/s/cm2 (None: already cgs).

    Raises
    ------
    ConfigError
        If ``units`` is not a flux unit (e.g. a surface brightness).
    """
    if not units:
        return value
    import astropy.units as u

    try:
        return value * u.Unit(units).to(u.Unit(FLUX_UNITS))
    except (ValueError, u.UnitConversionError):
        raise ConfigError(f"flux units {units!r} cannot be converted to {FLUX_UNITS}; "
                          "the SFR needs line fluxes (not surface brightness)") from None


def smooth_sigma_pix(maps: xr.Dataset) -> float:
    """σ (spaxels) of the Gaussian the cube was smoothed with before the fit (0 if none).

    From ``maps.attrs["smooth_fwhm_arcsec"]`` and ``["pixel_scale_arcsec"]`` (written by
    :func:`klever_nb.fitting.fit_galaxy` and the pipeline; K20 §3.1: 0.4").
    """
    fwhm = float(maps.attrs.get("smooth_fwhm_arcsec", 0.0) or 0.0)
    pix = float(maps.attrs.get("pixel_scale_arcsec", np.nan))
    if fwhm <= 0 or not np.isfinite(pix) or pix <= 0:
        return 0.0
    return fwhm / FWHM_PER_SIGMA / pix


def correlated_sum_error(err: np.ndarray, mask: np.ndarray, *,
                         smooth_sigma_pix: float = 0.0) -> float:
    """1σ error of the sum of the ``mask`` spaxels of a map fitted on a smoothed cube.

    Smoothing by a kernel K correlates neighbouring spaxels: ρ(Δ) = (K ⋆ K)(Δ) / Σ K² (the
    autocorrelation of :func:`klever_nb.spectra.smooth_cube`'s kernel, exact for uniform input
    noise), so var(Σ_S f) = Σ_{i,j ∈ S} σ_i σ_j ρ(i − j), not Σ σ_i² (up to Σ K⁻² ≈ 9 × larger
    for 0.4" at 0.2"/spaxel over a large region). ``smooth_sigma_pix = 0``: quadrature sum.
    """
    v = np.where(mask & np.isfinite(err), err, 0.0).astype(float)
    if smooth_sigma_pix <= 0:
        return float(np.sqrt(np.sum(v * v)))
    from scipy import ndimage

    from klever_nb.spectra import gaussian_kernel

    kernel = gaussian_kernel(smooth_sigma_pix)
    rho = ndimage.correlate(np.pad(kernel, kernel.shape[0] // 2), kernel, mode="constant")
    rho /= np.sum(kernel**2)
    return float(np.sqrt(max(np.sum(v * ndimage.convolve(v, rho, mode="constant")), 0.0)))


def total_halpha(maps: xr.Dataset, *, snr_min: float = SFR_SNR,
                 smooth_sigma: float | None = None) -> tuple[float, float]:
    """Total Halpha flux co-added over the spaxels with Halpha SNR > ``snr_min`` (K20 §3.3).

    Returns ``(flux, err)`` in the units of ``maps["flux"]`` (``attrs["units"]``;
    pass them as ``flux_units`` to :func:`sfr_from_halpha`). The error includes the
    correlation between spaxels of a map fitted on a smoothed cube
    (:func:`correlated_sum_error`; ``smooth_sigma`` in spaxels, default from the maps' attrs,
    :func:`smooth_sigma_pix`); K20 adds the spaxel errors in quadrature, which is right
    only without smoothing. NaN when no spaxel passes.
    """
    if "Halpha" not in maps["line"].values:
        raise ConfigError("total_halpha needs Halpha in the line maps")
    flux = maps["flux"].sel(line="Halpha").values.astype(float)
    err = maps["flux_err"].sel(line="Halpha").values.astype(float)
    snr = maps["snr"].sel(line="Halpha").values.astype(float) if "snr" in maps else None
    with np.errstate(divide="ignore", invalid="ignore"):
        if snr is None:
            snr = flux / err
        good = np.isfinite(flux) & np.isfinite(err) & (np.nan_to_num(snr, nan=-np.inf) > snr_min)
    if not good.any():
        return float("nan"), float("nan")
    sigma = smooth_sigma_pix(maps) if smooth_sigma is None else float(smooth_sigma)
    return float(flux[good].sum()), correlated_sum_error(err, good, smooth_sigma_pix=sigma)


def sfr_summary(maps: xr.Dataset, *, redshift: float, ebv: float = 0.0, ebv_err: float = 0.0,
                mu: float = 1.0, mu_err: float = 0.0, snr_min: float = SFR_SNR) -> dict:
    """The SFR fields of ``summary.json``: total Halpha (spaxels with SNR > 5) -> SFR (K20 §3.3).

    ``maps`` are image-plane line maps (the flux is co-added in the image plane and
    de-magnified by ``mu``; ``maps["flux"].attrs["units"]`` is honoured). Returns
    ``halpha_flux``, ``halpha_flux_err`` (erg/s/cm2),
    ``sfr``, ``sfr_err``, ``log_sfr``, ``log_sfr_err``.
    """
    flux, err = total_halpha(maps, snr_min=snr_min)
    result = sfr_from_halpha(flux, err, redshift=redshift, ebv=ebv, ebv_err=ebv_err, mu=mu,
                             mu_err=mu_err, flux_units=maps["flux"].attrs.get("units"))
    return {"halpha_flux": result["halpha_flux_cgs"],
            "halpha_flux_err": result["halpha_flux_err_cgs"], "sfr": result["sfr"],
            "sfr_err": result["sfr_err"], "log_sfr": result["log_sfr"],
            "log_sfr_err": result["log_sfr_err"]}

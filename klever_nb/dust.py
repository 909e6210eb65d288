"""Nebular dust: k(lambda), Balmer-decrement E(B-V) and dust-corrected line maps.

K20 §3.3-3.4: Cardelli, Clayton & Mathis (1989) with R_V = 3.1 and an intrinsic
Halpha/Hbeta = 2.87; per-pixel E(B-V) where Hbeta is good enough, otherwise a
global E(B-V) from the integrated Halpha and Hbeta applied to every pixel.

Decisions
---------
- :func:`balmer_ebv` returns the *unclipped* E(B-V) (negative values, i.e.
  Halpha/Hbeta < 2.87, are consistent with zero within the errors and averaging
  them is unbiased); ``ebv_negative`` marks them.
- :func:`correct_for_dust` clips negative E(B-V) to 0 by default
  (``clip_negative=True``): a negative correction would dim the lines, which is
  unphysical. Its error is kept.
- Error bookkeeping of corrected maps: ``flux_err`` is the total error of each
  line on its own (measurement and E(B-V) in quadrature, right for the SFR);
  ``flux_err_stat`` is the measurement part only, and ``ebv_err`` is kept, so
  that :func:`klever_nb.ratios.observed_log_ratio` adds the E(B-V) term once,
  correlated between the lines of a ratio: sigma^2(log R) gets
  (0.4 sum_i J_i k_i)^2 sigma_E^2, i.e. 0.4 (k_num - k_den) sigma_E for a plain ratio.
"""

from __future__ import annotations

from functools import cache

import astropy.units as u
import numpy as np
import xarray as xr

from klever_nb.constants import BALMER_INTRINSIC, BALMER_SNR, LINES, R_V
from klever_nb.errors import ConfigError

LN10 = np.log(10.0)

_LAWS = ("CCM89", "O94", "F99", "Calzetti00")

#: Default R_V of each law: 3.1 for the Milky-Way laws (CCM89, O94, F99; K20 §3.4), 4.05 for
#: Calzetti et al. 2000 (their eq. 5; FACTS.md §5 lists k(Calz00) with R_V = 4.05).
DEFAULT_R_V = {"CCM89": R_V, "O94": R_V, "F99": R_V, "Calzetti00": 4.05}


def default_r_v(law: str) -> float:
    """R_V that goes with ``law`` when none is given (:data:`DEFAULT_R_V`)."""
    if law not in DEFAULT_R_V:
        raise ConfigError(f"unknown extinction law {law!r}; use one of {_LAWS}")
    return DEFAULT_R_V[law]


@cache
def _law_model(law: str, r_v: float):
    if law == "CCM89":
        from dust_extinction.parameter_averages import CCM89

        return CCM89(Rv=r_v)
    if law == "O94":
        from dust_extinction.parameter_averages import O94

        return O94(Rv=r_v)
    if law == "F99":
        from dust_extinction.parameter_averages import F99

        return F99(Rv=r_v)
    raise ConfigError(f"unknown extinction law {law!r}; use one of {_LAWS}")


def _calzetti00_k(wave_um: np.ndarray, r_v: float) -> np.ndarray:
    """Calzetti et al. 2000 k(lambda) (their eq. 4), 0.12-2.2 micron."""
    x = 1.0 / wave_um
    short = 2.659 * (-2.156 + 1.509 * x - 0.198 * x**2 + 0.011 * x**3) + r_v
    long = 2.659 * (-1.857 + 1.040 * x) + r_v
    return np.where(wave_um < 0.63, short, long)


def k_lambda(wave_angstrom_vacuum: np.ndarray | float, *, law: str = "CCM89",
             r_v: float | None = None) -> np.ndarray:
    """k(lambda) = A(lambda) / E(B-V) at rest-frame vacuum wavelengths in Angstrom.

    Parameters
    ----------
    wave_angstrom_vacuum : array_like
        Rest-frame vacuum wavelength(s) in Angstrom.
    law : {"CCM89", "O94", "F99", "Calzetti00"}
        Extinction law (K20: CCM89). CCM89/O94/F99 via ``dust_extinction``;
        Calzetti00 (R_V = 4.05 customary) from its closed form.
    r_v : float, optional
        R_V = A(V)/E(B-V); default per law (:data:`DEFAULT_R_V`: 3.1, K20; Calzetti00 4.05).

    Returns
    -------
    numpy.ndarray
        k(lambda) (same shape as the input).

    References
    ----------
    FACTS.md §5 (Hbeta 3.608, Halpha 2.534, [OIII]5007 3.472, [NII]6584 2.524 for CCM89).

    Examples
    --------
    >>> round(float(k_lambda(6564.61)), 3)
    2.534
    """
    wave = np.asarray(wave_angstrom_vacuum, dtype=float)
    r_v = default_r_v(law) if r_v is None else float(r_v)
    if law == "Calzetti00":
        return _calzetti00_k(wave / 1e4, r_v)
    model = _law_model(law, float(r_v))
    flat = np.atleast_1d(wave).ravel()
    values = np.asarray(model(flat * u.AA), dtype=float) * r_v
    return values.reshape(wave.shape) if wave.ndim else values[0]


def balmer_constant(*, law: str = "CCM89", r_v: float | None = None) -> float:
    """2.5 / (k(Hbeta) - k(Halpha)): E(B-V) per dex of (Halpha/Hbeta)/R_int (CCM89: 2.329)."""
    r_v = default_r_v(law) if r_v is None else float(r_v)
    k_hb = float(k_lambda(LINES["Hbeta"].wave_vac, law=law, r_v=r_v))
    k_ha = float(k_lambda(LINES["Halpha"].wave_vac, law=law, r_v=r_v))
    return 2.5 / (k_hb - k_ha)


def balmer_ebv(maps: xr.Dataset, *, min_snr_hbeta: float = BALMER_SNR, min_snr_halpha: float = BALMER_SNR,
               intrinsic: float = BALMER_INTRINSIC, law: str = "CCM89",
               r_v: float | None = None) -> xr.Dataset:
    """E(B-V) from the Balmer decrement, per pixel (or for integrated fluxes).

    E(B-V) = 2.5 / (k(Hbeta) - k(Halpha)) log10[(Halpha/Hbeta)_obs / R_int].

    Parameters
    ----------
    maps : xarray.Dataset
        Line maps with ``flux``, ``flux_err`` (and optionally ``snr``) on ``(line, ...)``.
    min_snr_hbeta, min_snr_halpha : float
        Pixels below these SNRs get NaN (K20 §3.4: "Hbeta good enough"; default 3,
        the detection threshold of K20 §3.1).
    intrinsic : float
        Intrinsic Halpha/Hbeta (K20: 2.87).
    law, r_v : str, float
        Extinction law.

    Returns
    -------
    xarray.Dataset
        ``ebv`` and ``ebv_err`` (mag; unclipped, NaN where Halpha or Hbeta is not
        good enough or not positive), ``ebv_negative`` (bool), ``balmer_ok`` (bool).

    References
    ----------
    K20 §3.3-3.4; FACTS.md §5.
    """
    r_v = default_r_v(law) if r_v is None else float(r_v)
    names = list(maps["line"].values)
    for line in ("Halpha", "Hbeta"):
        if line not in names:
            raise ConfigError(f"balmer_ebv needs {line} in the line maps (have {names})")
    ha, hb = (maps["flux"].sel(line=n, drop=True).astype(float) for n in ("Halpha", "Hbeta"))
    ha_err, hb_err = (maps["flux_err"].sel(line=n, drop=True).astype(float)
                      for n in ("Halpha", "Hbeta"))
    with np.errstate(divide="ignore", invalid="ignore"):
        if "snr" in maps:
            snr_ha = maps["snr"].sel(line="Halpha", drop=True)
            snr_hb = maps["snr"].sel(line="Hbeta", drop=True)
        else:
            snr_ha, snr_hb = ha / ha_err, hb / hb_err
        ok = (ha > 0) & (hb > 0) & (ha_err > 0) & (hb_err > 0)
        if "fit_ok" in maps and "line" in maps["fit_ok"].dims:
            ok = ok & maps["fit_ok"].sel(line="Halpha", drop=True).astype(bool)
            ok = ok & maps["fit_ok"].sel(line="Hbeta", drop=True).astype(bool)
        ok = ok & (snr_ha.fillna(-np.inf) >= min_snr_halpha)
        ok = ok & (snr_hb.fillna(-np.inf) >= min_snr_hbeta)
        const = balmer_constant(law=law, r_v=r_v)
        ebv = (const * np.log10((ha / hb) / intrinsic)).where(ok)
        ebv_err = (const / LN10 * np.sqrt((ha_err / ha) ** 2 + (hb_err / hb) ** 2)).where(ok)
    out = xr.Dataset({
        "ebv": ebv.assign_attrs(units="mag", long_name="nebular E(B-V), Balmer decrement",
                                law=law, r_v=r_v, intrinsic_halpha_hbeta=intrinsic),
        "ebv_err": ebv_err.assign_attrs(units="mag", long_name="1-sigma error of E(B-V)"),
        "ebv_negative": (ebv < 0).where(ok, False).astype(bool),
        "balmer_ok": ok.astype(bool),
    })
    out.attrs["references"] = "K20 §3.3-3.4; FACTS.md §5"
    return out


def integrated_balmer_ebv(maps: xr.Dataset, **kwargs) -> tuple[float, float]:
    """Global E(B-V) from the Halpha and Hbeta fluxes summed over all pixels where both are finite.

    K20 §3.4: used for every pixel when no reliable E(B-V) map exists.
    Keyword arguments go to :func:`balmer_ebv`. Returns ``(ebv, ebv_err)`` (NaN if undefined).
    """
    spatial = [d for d in maps["flux"].dims if d != "line"]
    flux = maps["flux"].sel(line=["Halpha", "Hbeta"])
    err = maps["flux_err"].sel(line=["Halpha", "Hbeta"])
    both = np.isfinite(flux).all("line") & np.isfinite(err).all("line")
    total = flux.where(both).sum(spatial)
    total_err = np.sqrt((err.where(both) ** 2).sum(spatial))
    integrated = xr.Dataset({"flux": total, "flux_err": total_err})
    result = balmer_ebv(integrated, **kwargs)
    return float(result["ebv"]), float(result["ebv_err"])


def correct_for_dust(maps: xr.Dataset, *, ebv: xr.Dataset | xr.DataArray | float,
                     ebv_err: xr.DataArray | float = 0.0, law: str = "CCM89",
                     r_v: float | None = None, clip_negative: bool = True) -> xr.Dataset:
    """Dust-corrected line maps: F_corr = F_obs 10**(0.4 k(lambda) E(B-V)).

    Parameters
    ----------
    maps : xarray.Dataset
        Line maps (``flux``, ``flux_err``...) on ``(line, ...)``.
    ebv : Dataset, DataArray or float
        E(B-V) in mag; a Dataset from :func:`balmer_ebv` supplies ``ebv`` and ``ebv_err``.
    ebv_err : DataArray or float
        1-sigma error of E(B-V) (ignored when ``ebv`` is a Dataset).
    law, r_v : str, float
        Extinction law (K20: CCM89, 3.1).
    clip_negative : bool
        Apply max(E, 0) (default; see module notes). The error is kept.

    Returns
    -------
    xarray.Dataset
        Copy of ``maps`` with corrected ``flux``, total ``flux_err`` (measurement and
        E(B-V) in quadrature), ``flux_err_stat`` (measurement only), ``ebv``,
        ``ebv_err``, coordinate ``k_lambda`` on ``line`` and ``attrs["dust_corrected"] = 1``.
        ``snr`` (the detection SNR) is unchanged.

    References
    ----------
    K20 §3.3-3.4; FACTS.md §5.
    """
    if maps.attrs.get("dust_corrected", False):
        raise ConfigError("maps are already dust-corrected (attrs['dust_corrected'])")
    r_v = default_r_v(law) if r_v is None else float(r_v)
    if isinstance(ebv, xr.Dataset):
        ebv, ebv_err = ebv["ebv"], ebv["ebv_err"]
    ebv_da = ebv if isinstance(ebv, xr.DataArray) else xr.DataArray(float(ebv))
    err_da = ebv_err if isinstance(ebv_err, xr.DataArray) else xr.DataArray(float(ebv_err))
    applied = np.maximum(ebv_da, 0.0).where(np.isfinite(ebv_da)) if clip_negative else ebv_da
    waves = np.array([LINES[str(n)].wave_vac for n in maps["line"].values])
    k = xr.DataArray(k_lambda(waves, law=law, r_v=r_v), dims="line",
                     coords={"line": maps["line"]})
    factor = 10.0 ** (0.4 * k * applied)
    out = maps.copy()
    flux = maps["flux"] * factor
    stat = maps["flux_err"] * factor
    dust_part = np.abs(flux) * 0.4 * LN10 * k * err_da
    out["flux"] = flux.assign_attrs(maps["flux"].attrs)
    out["flux_err_stat"] = stat.assign_attrs(maps["flux_err"].attrs,
                                             long_name="measurement error of corrected flux")
    out["flux_err"] = np.sqrt(stat**2 + dust_part**2).assign_attrs(
        maps["flux_err"].attrs, long_name="total error incl. E(B-V)")
    out["ebv"] = applied.broadcast_like(maps["flux"].isel(line=0, drop=True)).assign_attrs(
        units="mag", long_name="E(B-V) applied", law=law, r_v=r_v, clipped=int(clip_negative))
    out["ebv_err"] = err_da.broadcast_like(maps["flux"].isel(line=0, drop=True)).assign_attrs(
        units="mag")
    out = out.assign_coords(k_lambda=k.assign_attrs(long_name="A(lambda)/E(B-V)", law=law))
    out.attrs.update(dust_corrected=1, extinction_law=law, r_v=r_v)
    return out


def global_ebv_for_correction(ebv: float, ebv_err: float, *, no_balmer_err: float = 0.2
                              ) -> dict:
    """The E(B-V) applied to a galaxy's global quantities (SFR, global O/H), with a flag.

    - finite and >= 0: used as it is (``ebv_flag = "ok"``);
    - negative (Halpha/Hbeta below the intrinsic 2.87, consistent with no dust within the
      errors): 0 is applied, the error kept, the raw value returned as ``ebv_raw``
      (``"negative_clipped"``; a negative correction would dim the lines, which is unphysical);
    - NaN (no usable Hbeta, no Balmer decrement): 0 is applied with an error of
      ``no_balmer_err`` mag (``"no_balmer_decrement"``): not measured is not "no dust".
      0.2 mag is about the scatter of nebular E(B-V) in z ~ 1-2.5 star-forming galaxies at
      fixed mass (decision recorded here; K20 §3.4 gives no prescription for this case).

    Returns ``ebv``, ``ebv_err``, ``ebv_raw``, ``ebv_raw_err``, ``ebv_flag``, ``ebv_message``.
    """
    raw, raw_err = float(ebv), float(ebv_err)
    if not np.isfinite(raw):
        return {"ebv": 0.0, "ebv_err": float(no_balmer_err), "ebv_raw": float("nan"),
                "ebv_raw_err": float("nan"), "ebv_flag": "no_balmer_decrement",
                "ebv_message": ("no Balmer decrement (Hbeta missing or not detected): no dust "
                                f"correction applied, E(B-V) = 0 +- {no_balmer_err} mag assumed")}
    err = raw_err if np.isfinite(raw_err) else float(no_balmer_err)
    if raw < 0:
        return {"ebv": 0.0, "ebv_err": err, "ebv_raw": raw, "ebv_raw_err": raw_err,
                "ebv_flag": "negative_clipped",
                "ebv_message": (f"Balmer decrement gives E(B-V) = {raw:.3f} +- {raw_err:.3f} < 0: "
                                "clipped to 0 for the correction")}
    return {"ebv": raw, "ebv_err": err, "ebv_raw": raw, "ebv_raw_err": raw_err,
            "ebv_flag": "ok", "ebv_message": ""}

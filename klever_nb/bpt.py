"""BPT classification: [NII] and [SII] diagrams with Kewley+01 and Kauffmann+03 lines.

x = log10 [NII]6584/Halpha (or log10 [SII]6717+6731/Halpha), y = log10 [OIII]5007/Hbeta.

Classes (int codes, legend in ``attrs["legend"]``):
0 undetermined (a line below ``snr_min`` or not positive), 1 star-forming,
2 composite (between Kauffmann+03 and Kewley+01; [NII] diagram only), 3 AGN
(above Kewley+01, or right of its asymptote). ``agn`` is true where either
diagram says AGN; :func:`klever_nb.metallicity.metallicity_map` excludes those
pixels by default (K20 §3.4; issue 6).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from klever_nb.constants import DETECTION_SNR
from klever_nb.errors import ConfigError

UNDETERMINED, STAR_FORMING, COMPOSITE, AGN = 0, 1, 2, 3
LEGEND = "0: undetermined, 1: star-forming, 2: composite, 3: AGN"


def _hyperbola(x, a: float, x0: float, b: float) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x < x0, a / (x - x0) + b, np.nan)


def kewley01_n2(x):
    """Kewley+01 maximum-starburst line, [NII] diagram: y = 0.61/(x - 0.47) + 1.19 (x < 0.47).

    NaN for x >= 0.47 (right of the asymptote everything is AGN). FACTS.md §2.

    Examples
    --------
    >>> round(float(kewley01_n2(0.0)), 4)
    -0.1079
    """
    return _hyperbola(x, 0.61, 0.47, 1.19)


def kewley01_s2(x):
    """Kewley+01 line, [SII] diagram: y = 0.72/(x - 0.32) + 1.30 (x < 0.32). FACTS.md §2."""
    return _hyperbola(x, 0.72, 0.32, 1.30)


def kauffmann03_n2(x):
    """Kauffmann+03 empirical star-forming line: y = 0.61/(x - 0.05) + 1.30 (x < 0.05). FACTS.md §2."""
    return _hyperbola(x, 0.61, 0.05, 1.30)


def _log_line_ratio(maps: xr.Dataset, numerator: list[str], denominator: str, snr_min: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    flux = maps["flux"]
    snr = maps["snr"] if "snr" in maps else flux / maps["flux_err"]
    ok = np.ones(flux.isel(line=0).shape, dtype=bool)
    num = 0.0
    for line in [*numerator, denominator]:
        f = flux.sel(line=line).values.astype(float)
        s = snr.sel(line=line).values.astype(float)
        ok &= np.isfinite(f) & (f > 0) & (np.nan_to_num(s, nan=-np.inf) >= snr_min)
        if "fit_ok" in maps and "line" in maps["fit_ok"].dims:
            ok &= maps["fit_ok"].sel(line=line).values.astype(bool)
    for line in numerator:
        num = num + flux.sel(line=line).values.astype(float)
    den = flux.sel(line=denominator).values.astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(ok, np.log10(np.where(ok, num / den, 1.0)), np.nan)
    return value, ok


def _classify(x: np.ndarray, y: np.ndarray, ok: np.ndarray, *, diagram: str) -> np.ndarray:
    code = np.full(x.shape, UNDETERMINED, dtype=np.int8)
    if diagram == "N2":
        kew, kau, x_kew, x_kau = kewley01_n2(x), kauffmann03_n2(x), 0.47, 0.05
        agn = (x >= x_kew) | (y > kew)
        comp = ~agn & ((x >= x_kau) | (y > kau))
        code[ok & comp] = COMPOSITE
    else:
        kew, x_kew = kewley01_s2(x), 0.32
        agn = (x >= x_kew) | (y > kew)
        comp = np.zeros_like(agn)
    code[ok & agn] = AGN
    code[ok & ~agn & ~comp] = STAR_FORMING
    return code


def bpt_classify(maps: xr.Dataset, *, snr_min: float = DETECTION_SNR) -> xr.Dataset:
    """Per-pixel (or integrated) BPT classes in the [NII] and [SII] diagrams.

    Parameters
    ----------
    maps : xarray.Dataset
        Line maps with ``flux``, ``flux_err`` (optionally ``snr``) on ``(line, ...)``.
        Missing lines make the corresponding diagram undetermined.
    snr_min : float
        Minimum SNR of each of the four lines of a diagram (default 3, K20 §3.1).

    Returns
    -------
    xarray.Dataset
        ``class_n2``, ``class_s2`` (int8 codes, ``attrs["legend"]``), ``agn`` (bool),
        ``log_n2``, ``log_s2``, ``log_o3`` (the diagram coordinates; NaN where not usable).

    References
    ----------
    Kewley et al. 2001; Kauffmann et al. 2003; FACTS.md §2.
    """
    if "line" not in maps.dims:
        raise ConfigError("bpt_classify needs line maps with a 'line' dimension")
    names = set(str(n) for n in maps["line"].values)
    template = maps["flux"].isel(line=0, drop=True)
    shape = template.shape
    nan = np.full(shape, np.nan)
    no = np.zeros(shape, dtype=bool)
    y, ok_y = (_log_line_ratio(maps, ["OIII_5007"], "Hbeta", snr_min)
               if {"OIII_5007", "Hbeta"} <= names else (nan, no))
    x_n2, ok_n2 = (_log_line_ratio(maps, ["NII_6584"], "Halpha", snr_min)
                   if {"NII_6584", "Halpha"} <= names else (nan, no))
    x_s2, ok_s2 = (_log_line_ratio(maps, ["SII_6717", "SII_6731"], "Halpha", snr_min)
                   if {"SII_6717", "SII_6731", "Halpha"} <= names else (nan, no))
    class_n2 = _classify(x_n2, y, ok_n2 & ok_y, diagram="N2")
    class_s2 = _classify(x_s2, y, ok_s2 & ok_y, diagram="S2")

    def var(values, **attrs):
        return xr.DataArray(values, dims=template.dims, coords=template.coords, attrs=attrs)

    return xr.Dataset({
        "class_n2": var(class_n2, legend=LEGEND, long_name="BPT class, [NII] diagram"),
        "class_s2": var(class_s2, legend=LEGEND, long_name="BPT class, [SII] diagram"),
        "agn": var((class_n2 == AGN) | (class_s2 == AGN), long_name="AGN in either diagram"),
        "log_n2": var(np.where(ok_n2, x_n2, np.nan), units="dex", long_name="log [NII]/Ha"),
        "log_s2": var(np.where(ok_s2, x_s2, np.nan), units="dex", long_name="log [SII]/Ha"),
        "log_o3": var(np.where(ok_y, y, np.nan), units="dex", long_name="log [OIII]/Hb"),
    }, attrs={"legend": LEGEND, "snr_min": snr_min,
              "references": "Kewley+01, Kauffmann+03; FACTS.md §2"})

"""Read any IFU cube (KMOS, SINFONI, MUSE, JWST, IRAF/GMOS, MaNGA, bare) into the cube Dataset.

``open_cube(path)`` recognises the common layouts from the HDU names and headers
and always returns the data model of DESIGN.md: ``flux`` and ``noise`` (1σ) on
``(wave, y, x)``, ``wave`` in vacuum micron (observed frame), masks as NaN,
units exact from BUNIT, the celestial WCS and the pixel scale in attrs.

Layouts (first match wins; names are case-insensitive):

=====================  ===================================  ===========================
layout                 data / noise / mask HDUs             noise default
=====================  ===================================  ===========================
KMOS per-exposure      ``IFU.<n>.DATA`` / ``IFU.<n>.NOISE``  sigma
KMOS combined          ``DATA`` or ``*.DATA`` / ``NOISE``    sigma
MUSE                   ``DATA`` / ``STAT`` / ``FIELDMAP``    variance
JWST s3d               ``SCI`` / ``ERR`` / ``DQ``            sigma
IRAF-style (GMOS)      ``SCI`` / ``ERR`` or ``VAR`` / ``MASK``  sigma / variance
MaNGA                  ``FLUX`` / ``IVAR`` / ``MASK``, ``WAVE``  inverse variance
SINFONI / bare         primary (or first 3-D) HDU           estimated from the data
=====================  ===================================  ===========================

References
----------
DESIGN.md "Data model" and "Input files"; FACTS.md §6 (air/vacuum) and §8 (KMOS/SINFONI
format); issues 3 and 12.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import astropy.units as u
import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import proj_plane_pixel_area
from scipy.ndimage import median_filter
from xarray.core import indexing

from klever_nb.celestial import WCS_ERRORS
from klever_nb.constants import INSTRUMENTS
from klever_nb.errors import ConfigError, InputError

__all__ = [
    "NOISE_KINDS",
    "WAVELENGTH_MEDIA",
    "WavelengthMediumWarning",
    "air_to_vacuum",
    "estimate_noise",
    "open_cube",
    "vacuum_to_air",
]

#: Accepted values of ``noise_kind``.
NOISE_KINDS = ("sigma", "variance", "inverse_variance")
#: Accepted values of ``wavelength_medium``.
WAVELENGTH_MEDIA = ("vacuum", "air")

#: Extension names (after any ``IFU.<n>.``/``<prefix>.`` prefix) and what they hold.
_NOISE_NAMES = {
    "NOISE": "sigma", "ERR": "sigma", "ERROR": "sigma", "SIGMA": "sigma", "STDDEV": "sigma",
    "STAT": "variance", "VAR": "variance", "VARIANCE": "variance",
    "IVAR": "inverse_variance", "INVVAR": "inverse_variance",
}
_MASK_NAMES = ("MASK", "DQ", "BADPIX", "QUALITY", "FIELDMAP")
_DATA_NAMES = ("DATA", "SCI", "FLUX")
_WAVE_TABLE_NAMES = ("WAVE", "WAVELENGTH", "LAMBDA")

#: Canonical instrument names, keyed by what INSTRUME may contain.
_INSTRUMENT_NAMES = {
    "KMOS": "KMOS", "SINFONI": "SINFONI", "MUSE": "MUSE", "NIRSPEC": "NIRSpec",
    "MIRI": "MIRI", "GMOS": "GMOS", "MANGA": "MaNGA",
}

#: CTYPE3 values (first 4 characters for the standard ones) that mean wavelength.
_CTYPE_MEDIUM = {"WAVE": "vacuum", "AWAV": "air"}
_CTYPE_NONSTANDARD = ("LAMBDA", "LINEAR", "WAVELENGTH", "WAVELEN", "LAMBDA_AIR", "SPECTRAL")

#: Cubes whose medium is not stated are assumed vacuum from this wavelength on (issue 12).
_VACUUM_FROM_UM = 1.0

#: Target units of JWST-like f_nu surface brightness cubes.
_FLAMBDA_SB = u.erg / u.s / u.cm**2 / u.AA / u.arcsec**2
_FLAMBDA = u.erg / u.s / u.cm**2 / u.AA


class WavelengthMediumWarning(UserWarning):
    """The cube's header does not say whether its wavelengths are in air or in vacuum."""


# ---------------------------------------------------------------------------
# Air <-> vacuum (IAU standard)
# ---------------------------------------------------------------------------
def _refractive_index_minus_one(wave_vac_um: np.ndarray) -> np.ndarray:
    """n - 1 of standard dry air (15 °C, 101 325 Pa, 450 ppm CO2) at vacuum wavelength (µm)."""
    s2 = (1.0 / wave_vac_um) ** 2  # vacuum wavenumber squared, µm^-2
    return 8.34254e-5 + 2.406147e-2 / (130.0 - s2) + 1.5998e-4 / (38.9 - s2)


def vacuum_to_air(wave_um) -> np.ndarray:
    """Convert vacuum wavelengths (µm) to standard air, IAU standard.

    Parameters
    ----------
    wave_um : array_like
        Vacuum wavelengths in micron (valid above ~0.2 µm).

    Returns
    -------
    numpy.ndarray
        Air wavelengths in micron, ``wave_vac / n(wave_vac)``.

    References
    ----------
    Morton 2000 (ApJS 130, 403) eq. 8, the IAU standard, which uses the Ciddor 1996
    (Appl. Opt. 35, 1566) refractive index of standard air; FACTS.md §6.

    Examples
    --------
    >>> round(float(vacuum_to_air(0.656461)) * 1e4, 2)
    6562.8
    """
    wave = np.asarray(wave_um, dtype=np.float64)
    return wave / (1.0 + _refractive_index_minus_one(wave))


def air_to_vacuum(wave_um) -> np.ndarray:
    """Convert standard-air wavelengths (µm) to vacuum, IAU standard.

    The exact inverse of :func:`vacuum_to_air`: ``wave_vac = wave_air · n(wave_vac)``,
    solved by fixed-point iteration (converged to machine precision in four steps,
    since dn/dλ is tiny).

    Parameters
    ----------
    wave_um : array_like
        Air wavelengths in micron.

    Returns
    -------
    numpy.ndarray
        Vacuum wavelengths in micron.

    References
    ----------
    Morton 2000 (ApJS 130, 403) eq. 8 with the Ciddor 1996 index (IAU standard);
    FACTS.md §6 (Hα 6562.80 Å air = 6564.61 Å vacuum; +6.0 Å at 2.2 µm).

    Examples
    --------
    >>> round(float(air_to_vacuum(0.656280)) * 1e4, 2)
    6564.61
    """
    air = np.asarray(wave_um, dtype=np.float64)
    vac = air * (1.0 + _refractive_index_minus_one(air))
    for _ in range(4):
        vac = air * (1.0 + _refractive_index_minus_one(vac))
    return vac


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------
def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _input_error(path, hdu, key, problem: str, fix: str) -> InputError:
    where = f"{path}"
    if hdu is not None:
        where += f", HDU '{hdu}'"
    if key is not None:
        where += f", key {key}"
    return InputError(_one_line(f"{where}: {problem}; {fix}"))


# ---------------------------------------------------------------------------
# Opening the file and finding the HDUs
# ---------------------------------------------------------------------------
def _open_fits(path: Path, memmap: bool = False) -> fits.HDUList:
    if not path.exists():
        raise _input_error(path, None, None, "file not found", "check the path")
    if path.is_dir():
        raise _input_error(path, None, None, "is a folder, not a FITS file", "give the cube file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hdul = fits.open(path, memmap=memmap, lazy_load_hdus=False)
        except Exception as exc:  # astropy raises OSError, ValueError, TypeError...
            raise _input_error(path, None, None, f"not a readable FITS file ({exc})",
                               "give a FITS cube (re-download it if it was truncated)") from exc
    for w in caught:
        message = str(w.message).lower()
        if "truncated" in message or "corrupted" in message:
            hdul.close()
            raise _input_error(path, None, None, f"truncated or corrupted FITS file ({w.message})",
                               "re-download or re-write the file")
    return hdul


def _hdu_name(hdul: fits.HDUList, index: int) -> str:
    name = hdul[index].name.strip().upper()
    return name or ("PRIMARY" if index == 0 else str(index))


def _is_cube(hdu) -> bool:
    """A 3-D image HDU with data, decided from the header (the data stay unread)."""
    header = hdu.header
    if isinstance(hdu, fits.CompImageHDU):
        return header.get("ZNAXIS", header.get("NAXIS", 0)) == 3 and all(
            int(header.get(f"ZNAXIS{i}", header.get(f"NAXIS{i}", 0)) or 0) > 0
            for i in (1, 2, 3))
    return (isinstance(hdu, fits.PrimaryHDU | fits.ImageHDU)
            and header.get("NAXIS", 0) == 3
            and all(int(header.get(f"NAXIS{i}", 0) or 0) > 0 for i in (1, 2, 3)))


@dataclass(frozen=True)
class _Layout:
    """Where the pieces of a cube live in its FITS file."""

    name: str
    data: int
    noise: int | None
    noise_kind: str | None
    mask: int | None
    wave_table: int | None
    instrument_hint: str
    ifu: int | None = None


def _find(names: list[str], wanted: str) -> int | None:
    return names.index(wanted) if wanted in names else None


def _companions(names: list[str], prefix: str) -> tuple[int | None, str | None, int | None]:
    """Noise HDU (and its default kind) and mask HDU beside a data HDU named ``prefix + DATA``."""
    noise = kind = mask = None
    for candidate, candidate_kind in _NOISE_NAMES.items():
        index = _find(names, prefix + candidate)
        if index is not None:
            noise, kind = index, candidate_kind
            break
    for candidate in _MASK_NAMES:
        index = _find(names, prefix + candidate)
        if index is not None:
            mask = index
            break
    return noise, kind, mask


def _kmos_ifu_layout(path, hdul, names, ifu) -> _Layout | None:
    ifu_hdus = {}
    for index, name in enumerate(names):
        match = re.fullmatch(r"IFU\.(\d+)\.DATA", name)
        if match:
            ifu_hdus[int(match.group(1))] = index
    if not ifu_hdus:
        return None
    with_data = sorted(n for n, index in ifu_hdus.items() if _is_cube(hdul[index]))
    listed = ", ".join(map(str, with_data)) or "none"
    if ifu is None:
        if len(with_data) != 1:
            problem = (f"per-exposure KMOS file with {len(with_data)} IFUs holding data "
                       f"({listed})")
            raise _input_error(path, None, "ifu", problem, "choose one with ifu=N (--ifu N)")
        ifu = with_data[0]
    try:
        ifu = int(ifu)
    except (TypeError, ValueError) as exc:
        raise ConfigError(_one_line(f"{path}: ifu={ifu!r} is not an integer; "
                                    f"IFUs with data: {listed}")) from exc
    if ifu not in ifu_hdus:
        raise _input_error(path, f"IFU.{ifu}.DATA", "ifu", f"IFU {ifu} is not in the file",
                           f"choose one of the IFUs with data: {listed}")
    if ifu not in with_data:
        raise _input_error(path, f"IFU.{ifu}.DATA", "ifu", f"IFU {ifu} is empty (disabled)",
                           f"choose one of the IFUs with data: {listed}")
    noise, kind, mask = _companions(names, f"IFU.{ifu}.")
    return _Layout("KMOS per-exposure", ifu_hdus[ifu], noise, kind, mask, None, "KMOS", ifu)


def _find_layout(path: Path, hdul: fits.HDUList, ifu) -> _Layout:
    names = [_hdu_name(hdul, i) for i in range(len(hdul))]
    layout = _kmos_ifu_layout(path, hdul, names, ifu)
    if layout is not None:
        return layout
    if ifu is not None:
        raise _input_error(path, None, "ifu", f"ifu={ifu!r} was given but the file has no "
                           "IFU.<n>.DATA extensions (not a KMOS per-exposure file)",
                           "drop ifu= (--ifu)")
    wave_table = next((i for i, n in enumerate(names) if n in _WAVE_TABLE_NAMES), None)
    for index, name in enumerate(names):
        prefix = ""
        if name in _DATA_NAMES:
            stem = name
        elif name.endswith(".DATA"):
            stem, prefix = "DATA", name[: -len("DATA")]
        else:
            continue
        noise, kind, mask = _companions(names, prefix)
        if noise is None and prefix:
            noise, kind, mask2 = _companions(names, "")
            mask = mask if mask is not None else mask2
        hint = {"DATA": "KMOS" if kind == "sigma" else ("MUSE" if kind == "variance" else ""),
                "SCI": "", "FLUX": "MaNGA" if kind == "inverse_variance" else ""}[stem]
        layout_name = {"DATA": "DATA/NOISE", "SCI": "SCI/ERR", "FLUX": "FLUX/IVAR"}[stem]
        return _Layout(layout_name, index, noise, kind, mask, wave_table, hint)
    cubes = [i for i in range(len(hdul)) if _is_cube(hdul[i])]
    if not cubes:
        listed = ", ".join(f"{n}(NAXIS={hdul[i].header.get('NAXIS', 0)})"
                           for i, n in enumerate(names))
        raise _input_error(path, None, "NAXIS", f"no 3-D image HDU found among {listed}",
                           "give an IFU cube (NAXIS = 3)")
    data = cubes[0]
    noise, kind, mask = _companions(names, "")
    return _Layout("bare", data, noise, kind, mask, wave_table, "")


# ---------------------------------------------------------------------------
# Header look-ups: instrument, band
# ---------------------------------------------------------------------------
def _get(headers, key, default=None):
    for header in headers:
        if key in header and header[key] not in (None, ""):
            return header[key]
    return default


def _instrument_from_headers(headers, hint: str) -> str:
    text = " ".join(str(_get(headers, key, "")) for key in ("INSTRUME", "TELESCOP", "SURVEY"))
    text = text.upper()
    if "MANGAID" in " ".join(k.upper() for h in headers for k in h):
        text += " MANGA"
    for key, name in _INSTRUMENT_NAMES.items():
        if key in text:
            return name
    return hint or "unknown"


def _canonical_instrument(instrument: str) -> str:
    return _INSTRUMENT_NAMES.get(instrument.strip().upper(), instrument.strip())


def _band_from_headers(headers) -> str:
    for key in ("HIERARCH ESO INS GRAT1 ID", "HIERARCH ESO INS GRAT1 NAME",
                "HIERARCH ESO INS FILT1 NAME", "HIERARCH ESO INS FILT1 ID"):
        value = _get(headers, key)
        if value is not None:
            return str(value).strip().upper().replace("+", "")
    grating, filt = _get(headers, "GRATING"), _get(headers, "FILTER")  # JWST NIRSpec
    if grating and str(grating).upper() not in ("N/A", "NONE"):
        return "/".join(str(v).strip() for v in (grating, filt) if v and str(v) != "N/A")
    channel, band = _get(headers, "CHANNEL"), _get(headers, "BAND")  # JWST MIRI
    if channel and band:
        return f"ch{str(channel).strip()}-{str(band).strip().lower()}"
    return ""


def _band_from_range(instrument: str, wave_um: np.ndarray) -> str:
    """The band of ``instrument`` that holds ≥ 90 % of the cube's range (best overlap/union)."""
    if instrument not in INSTRUMENTS or wave_um.size < 2:
        return ""
    lo, hi = float(np.nanmin(wave_um)), float(np.nanmax(wave_um))
    best, best_score = "", -1.0
    for name, band in INSTRUMENTS[instrument].bands.items():
        overlap = min(hi, band.wave_max) - max(lo, band.wave_min)
        union = max(hi, band.wave_max) - min(lo, band.wave_min)
        if overlap < 0.9 * (hi - lo):
            continue
        if overlap / union > best_score:
            best, best_score = name, overlap / union
    return best


def _resolving_power(instrument: str, band: str) -> float:
    bands = INSTRUMENTS[instrument].bands if instrument in INSTRUMENTS else {}
    return float(bands[band].resolving_power) if band in bands else float("nan")


# ---------------------------------------------------------------------------
# Wavelength axis
# ---------------------------------------------------------------------------
def _quiet_wcs(header, **kwargs) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header, **kwargs)


def _assumed_unit(path, hdu_name, header, key: str, values) -> u.UnitBase:
    """Unit of a wavelength axis from ``key``; when absent, from the values.

    Without a unit keyword, values above 100 are Å (the IRAF convention for ``LAMBDA``),
    values above 1e-3 are µm (KMOS/SINFONI-like), smaller ones m (the FITS default).
    """
    text = str(header.get(key, "") or "").strip()
    if text:
        try:
            unit = u.Unit(text, parse_strict="raise")
        except ValueError as exc:
            raise _input_error(path, hdu_name, key, f"wavelength unit {text!r} is not a unit "
                               "astropy can parse", "fix the keyword (e.g. 'um' or 'Angstrom')"
                               ) from exc
        if unit.physical_type != "length":
            raise _input_error(path, hdu_name, key, f"spectral unit {text!r} is not a length",
                               "only wavelength axes are supported")
        return unit
    typical = float(np.nanmedian(np.abs(values)))
    return u.AA if typical > 100.0 else (u.um if typical > 1e-3 else u.m)


def _spectral_step(header) -> float:
    """Step of axis 3 per pixel: CD3_3, else PC3_3 × CDELT3, else CDELT3 (FITS WCS paper I)."""
    if "CD3_3" in header:
        return float(header["CD3_3"])
    return float(header.get("PC3_3", 1.0)) * float(header.get("CDELT3", 1.0))


def _wave_from_header(path, hdul, hdu_name, header,
                      n_wave: int) -> tuple[np.ndarray, str | None, str]:
    """Wavelengths (µm, file medium), the medium the header states (or None), and CTYPE3."""
    ctype = str(header.get("CTYPE3", "") or "").strip().upper()
    if not ctype:
        raise _input_error(path, hdu_name, "CTYPE3", "no spectral axis (CTYPE3 missing)",
                           "add CTYPE3 = 'WAVE' (vacuum) or 'AWAV' (air) with CRVAL3/CDELT3/CUNIT3")
    for key in ("CRVAL3", "CRPIX3", "CDELT3", "CD3_3", "PC3_3"):  # issue 18: no bare ValueError
        value = header.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, int | float) or \
                not np.isfinite(value):
            raise _input_error(path, hdu_name, key, f"{key} = {value!r} is not a number",
                               "fix the spectral WCS keywords")
    code, _, algorithm = ctype.partition("-")
    algorithm = algorithm.strip("-")
    if code in _CTYPE_MEDIUM and algorithm in ("", "LOG"):
        medium, spectral_ctype = _CTYPE_MEDIUM[code], f"WAVE-{algorithm}" if algorithm else "WAVE"
        unit_text = _assumed_unit(path, hdu_name, header, "CUNIT3",
                                  np.atleast_1d(header.get("CRVAL3", 1.0))).to_string("fits")
    elif code in _CTYPE_MEDIUM and algorithm == "TAB":  # JWST non-linear grids: WCS-TABLE
        return _wave_from_tab(path, hdul, hdu_name, header, n_wave), _CTYPE_MEDIUM[code], ctype
    elif ctype in _CTYPE_NONSTANDARD:
        medium, spectral_ctype = None, "WAVE"
        unit_text = _assumed_unit(path, hdu_name, header, "CUNIT3",
                                  np.atleast_1d(header.get("CRVAL3", 1.0))).to_string("fits")
    else:
        raise _input_error(path, hdu_name, "CTYPE3", f"axis 3 is {ctype!r}, not a wavelength",
                           "only wavelength axes (WAVE, AWAV, WAVE-LOG, LAMBDA) are supported")
    spectral_header = {"NAXIS": 1, "NAXIS1": n_wave, "CTYPE1": spectral_ctype,
                       "CUNIT1": unit_text, "CRVAL1": header.get("CRVAL3", 0.0),
                       "CRPIX1": header.get("CRPIX3", 1.0), "CDELT1": _spectral_step(header)}
    try:
        spectral = _quiet_wcs(fits.Header(spectral_header))
        spectral.wcs.set()
        native = spectral.all_pix2world(np.arange(n_wave, dtype=np.float64), 0)[0]
        wave_um = (native * u.Unit(spectral.wcs.cunit[0])).to_value(u.um)
    except Exception as exc:  # wcslib and unit errors are many and varied
        raise _input_error(path, hdu_name, "CRVAL3/CDELT3/CUNIT3", f"cannot compute the "
                           f"wavelength axis ({exc})", "check the spectral WCS keywords") from exc
    if not np.all(np.isfinite(wave_um)) or np.any(wave_um <= 0):
        raise _input_error(path, hdu_name, "CRVAL3/CDELT3", "wavelength axis has non-positive "
                           "or non-finite values", "check the spectral WCS keywords")
    return wave_um, medium, ctype


def _wave_from_tab(path, hdul, hdu_name, header, n_wave: int) -> np.ndarray:
    """Wavelengths of a ``WAVE-TAB`` axis: table HDU ``PS3_0``, column ``PS3_1`` (FITS paper III)."""
    table_name = str(header.get("PS3_0", "WCS-TABLE")).strip().upper()
    column = str(header.get("PS3_1", "wavelength")).strip()
    names = [_hdu_name(hdul, i) for i in range(len(hdul))]
    if table_name not in names:
        raise _input_error(path, hdu_name, "PS3_0", f"CTYPE3 is -TAB but the table HDU "
                           f"{table_name!r} is missing", "keep the WCS-TABLE extension")
    table = hdul[names.index(table_name)]
    try:
        values = np.asarray(table.data[column], dtype=np.float64).ravel()
    except (KeyError, TypeError) as exc:
        raise _input_error(path, table_name, "PS3_1", f"no column {column!r}",
                           "keep the wavelength column of the WCS table") from exc
    if values.size != n_wave:
        raise _input_error(path, table_name, "PS3_1", f"{values.size} wavelengths for "
                           f"{n_wave} channels", "give the matching WCS table")
    unit_text = header.get("CUNIT3") or table.columns[column].unit or ""
    unit = _assumed_unit(path, hdu_name, {"CUNIT3": unit_text}, "CUNIT3", values)
    return (values * unit).to_value(u.um)


def _wave_from_table(path, hdul, index: int, n_wave: int) -> np.ndarray:
    hdu = hdul[index]
    name = _hdu_name(hdul, index)
    if isinstance(hdu, fits.BinTableHDU | fits.TableHDU):
        columns = {c.name.upper(): c for c in hdu.columns}
        column = next((columns[c] for c in _WAVE_TABLE_NAMES if c in columns), None)
        if column is None:
            raise _input_error(path, name, "TTYPE", "wavelength table has no WAVE column",
                               "name the column WAVE")
        values = np.asarray(hdu.data[column.name], dtype=np.float64).ravel()
        unit = _assumed_unit(path, name, {"TUNIT": column.unit or ""}, "TUNIT", values)
    else:
        values = np.asarray(hdu.data, dtype=np.float64).ravel()
        key = "CUNIT1" if "CUNIT1" in hdu.header else "BUNIT"
        unit = _assumed_unit(path, name, hdu.header, key, values)
    if values.size != n_wave:
        raise _input_error(path, name, "NAXIS1", f"wavelength table has {values.size} values "
                           f"but the cube has {n_wave} channels", "give the matching table")
    return (values * unit).to_value(u.um)


# ---------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------
_UNIT_TOKENS = {"A": "Angstrom", "Ang": "Angstrom", "ANGSTROM": "Angstrom", "ADU": "adu",
                "counts": "count", "COUNTS": "count", "spaxel": "pix", "SPAXEL": "pix",
                "pixel": "pix", "PIXEL": "pix"}


def _parse_unit(text: str) -> u.UnitBase:
    """BUNIT → astropy unit; tolerates 'A'/'Ang' for Ångström, 'ADU', 'counts', 'spaxel'."""
    text = text.strip()
    if not text:
        return u.dimensionless_unscaled
    tolerant = re.sub(r"[A-Za-z]+", lambda m: _UNIT_TOKENS.get(m.group(0), m.group(0)), text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", u.UnitsWarning)
        for attempt, candidate in enumerate((text, tolerant)):
            for fmt in ("fits", "generic"):
                try:
                    unit = u.Unit(candidate.replace("^", "**") if fmt == "generic" else candidate,
                                  format=fmt, parse_strict="raise")
                except ValueError:
                    continue
                if attempt == 0 and candidate != tolerant and u.A in unit.decompose().bases:
                    break  # 'A' read as Ampere: try the Ångström reading
                return unit
    raise ValueError(f"astropy cannot parse {text!r}")


def _flux_unit(path, hdu_name, header, primary) -> tuple[u.UnitBase, str]:
    original = str(_get([header, primary], "BUNIT", "") or "").strip()
    try:
        return _parse_unit(original), original
    except ValueError as exc:
        raise _input_error(path, hdu_name, "BUNIT", f"flux unit {original!r} is not a unit "
                           "astropy can parse", "fix BUNIT (e.g. '1e-20 erg/s/cm2/Angstrom')"
                           ) from exc


def _fnu_to_flambda(unit: u.UnitBase, wave_um: np.ndarray):
    """Per-channel factors turning an f_ν (surface brightness) unit into F_λ; None if not f_ν."""
    for per_area, target in ((u.arcsec**2, _FLAMBDA_SB), (u.dimensionless_unscaled, _FLAMBDA)):
        if (unit * per_area).is_equivalent(u.Jy):
            factor = (1.0 * unit * per_area).to(_FLAMBDA, equivalencies=u.spectral_density(
                wave_um * u.um)).value
            return np.asarray(factor, dtype=np.float64), target
    return None, unit


# ---------------------------------------------------------------------------
# Noise and masks
# ---------------------------------------------------------------------------
def _any_usable(source, channels: int = 64) -> bool:
    """Whether a lazily read cube has any voxel with finite flux and noise > 0 (stops at the
    first slab of ``channels`` channels that has one, so a normal cube costs one slab)."""
    n_wave = source.shape[0]
    for lo in range(0, n_wave, channels):
        key = (slice(lo, min(lo + channels, n_wave)), slice(None), slice(None))
        if np.isfinite(source.read(key, "noise")).any():
            return True
    return False


def _nothing_usable(path, hdul, layout: _Layout, data_name: str, noise_name: str,
                    mask_name: str) -> InputError:
    """The one-line error of a cube in which no voxel has finite flux and noise > 0 (issue 18)."""
    flux = np.asarray(hdul[layout.data].data, dtype=np.float64)
    if not np.isfinite(flux).any():
        return _input_error(path, data_name, None, "no usable spaxel: the flux is NaN or "
                            "infinite in every voxel", "give a cube with data")
    if mask_name:
        values = np.asarray(hdul[layout.mask].data)
        covers = (values == 0) if mask_name.endswith("FIELDMAP") else (values != 0)
        if covers.all():
            return _input_error(path, mask_name, None, "no usable spaxel: the mask flags "
                                "every voxel", "check the mask (or drop the extension)")
    if not noise_name:
        return _input_error(path, data_name, None, "no usable spaxel: the noise cannot be "
                            "estimated from the data (constant or too few channels)",
                            "add a NOISE extension")
    noise = np.asarray(hdul[layout.noise].data, dtype=np.float64)
    finite = np.isfinite(noise)
    if not finite.any():
        reason = "the noise is NaN or infinite in every voxel"
    elif np.all(noise[finite] == 0):
        reason = "the noise is zero in every voxel"
    elif np.all(noise[finite] <= 0):
        reason = "the noise is zero or negative in every voxel"
    else:
        reason = "no voxel has both a finite flux and a finite positive noise"
    return _input_error(path, noise_name, None, f"no usable spaxel: {reason}",
                        "check the noise extension (1 sigma, variance or inverse variance > 0)")


def _noise_to_sigma(values: np.ndarray, kind: str) -> np.ndarray:
    good = np.isfinite(values) & (values > 0)
    out = np.full(values.shape, np.nan)
    if kind == "sigma":
        out[good] = values[good]
    elif kind == "variance":
        out[good] = np.sqrt(values[good])
    else:
        out[good] = 1.0 / np.sqrt(values[good])
    return out


def _noise_unit_scale(noise_header, flux_unit: u.UnitBase, kind: str) -> float:
    """Scale from the noise HDU's own BUNIT (if any) to σ in flux units; 1 when unknown."""
    text = str(noise_header.get("BUNIT", "") or "").strip()
    if not text:
        return 1.0
    try:
        unit = _parse_unit(text)
    except ValueError:
        return 1.0
    sigma_unit = {"sigma": unit, "variance": unit**0.5, "inverse_variance": unit**-0.5}[kind]
    try:
        return float(sigma_unit.to(flux_unit))
    except u.UnitConversionError:
        return 1.0


def estimate_noise(flux: np.ndarray, *, smooth_channels: int = 5) -> np.ndarray:
    """Per-wavelength 1σ noise of a cube without a noise extension.

    For each channel, ``d = 2 f_i − f_{i−2} − f_{i+2}`` (which cancels any linear
    continuum and skips neighbouring, possibly correlated channels) has variance 6σ²
    for white noise; σ_i = 1.4826 · MAD over spaxels of ``d`` / √6, then a running
    median over ``smooth_channels`` channels. Emission lines in a few spaxels do not
    bias it (the MAD ignores them).

    Parameters
    ----------
    flux : numpy.ndarray
        Cube ``(wave, y, x)``; NaN spaxels are ignored.
    smooth_channels : int, optional
        Width of the running median along the wavelength axis.

    Returns
    -------
    numpy.ndarray
        σ per channel, shape ``(wave,)``.

    References
    ----------
    Stoehr et al. 2008 (ASP Conf. Ser. 394, 505; DER_SNR); issue 3 (SINFONI noise).
    """
    n_wave = flux.shape[0]
    spectra = flux.reshape(n_wave, -1)
    second = np.full(spectra.shape, np.nan)
    if n_wave >= 5:
        second[2:-2] = 2.0 * spectra[2:-2] - spectra[:-4] - spectra[4:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        centre = np.nanmedian(second, axis=1, keepdims=True)
        sigma = 1.482602 * np.nanmedian(np.abs(second - centre), axis=1) / np.sqrt(6.0)
    good = np.isfinite(sigma) & (sigma > 0)
    if not good.any():
        return np.full(n_wave, np.nan)
    index = np.arange(n_wave)
    sigma = np.interp(index, index[good], sigma[good])  # fill edges and empty channels
    return median_filter(sigma, size=max(1, int(smooth_channels)), mode="nearest")


def _read_mask(path, hdul, index: int, shape) -> np.ndarray:
    """Boolean ``bad`` array broadcastable to ``shape`` from a MASK/DQ/FIELDMAP HDU."""
    name = _hdu_name(hdul, index)
    values = hdul[index].data
    if values is None:
        return np.zeros(shape, dtype=bool)
    values = np.asarray(values)
    bad = values == 0 if name.endswith("FIELDMAP") else values != 0
    if bad.shape != tuple(shape) and bad.shape != tuple(shape[1:]):
        raise _input_error(path, name, "NAXIS", f"mask shape {values.shape} does not match the "
                           f"cube {tuple(shape)}", "give a mask of the cube's shape")
    return bad


# ---------------------------------------------------------------------------
# Spatial WCS
# ---------------------------------------------------------------------------
def _celestial(header) -> tuple[str, float | None]:
    """Celestial WCS header string and pixel scale (arcsec, sqrt|det CD|) or ("", None)."""
    try:
        full = _quiet_wcs(header, naxis=[1, 2])  # spatial axes only: CD + CDELT3 mixes are common
        celestial = full.celestial
    except WCS_ERRORS as err:  # a broken spatial WCS must not stop reading the spectra
        warnings.warn("the cube's celestial WCS (CTYPE1/2, CRVAL1/2, CRPIX1/2, CD/PC/CDELT1/2) "
                      f"is unreadable ({err}); the maps get no sky position or pixel scale",
                      RuntimeWarning, stacklevel=3)
        return "", None
    if celestial.naxis == 2:
        scale = np.sqrt(proj_plane_pixel_area(celestial)) * u.Unit(celestial.wcs.cunit[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            text = celestial.to_header_string()
        return text, float(scale.to_value(u.arcsec))
    units = [str(header.get(f"CUNIT{i}", "") or "").strip() for i in (1, 2)]
    try:
        angles = [u.Unit(x) for x in units]
    except ValueError:
        return "", None
    if all(x and a.physical_type == "angle" for x, a in zip(units, angles, strict=True)):
        spatial = full
        matrix = spatial.pixel_scale_matrix  # in the (possibly normalised) CUNIT of each axis
        factors = np.array([u.Unit(c).to(u.arcsec) for c in spatial.wcs.cunit])
        return "", float(np.sqrt(abs(np.linalg.det(matrix * factors[:, None]))))
    return "", None


# ---------------------------------------------------------------------------
# Public reader
# ---------------------------------------------------------------------------
def _validate_choices(path, noise_kind, wavelength_medium) -> None:
    if noise_kind is not None and noise_kind not in NOISE_KINDS:
        raise ConfigError(f"{path}: noise_kind={noise_kind!r} is not one of "
                          f"{', '.join(NOISE_KINDS)}")
    if wavelength_medium is not None and wavelength_medium not in WAVELENGTH_MEDIA:
        raise ConfigError(f"{path}: wavelength_medium={wavelength_medium!r} is not one of "
                          f"{', '.join(WAVELENGTH_MEDIA)}")


def _decide_medium(path, wave_um, medium_in_header, wavelength_medium, ctype) -> tuple[str, bool]:
    """(medium of the file's wavelengths, whether it was assumed)."""
    if wavelength_medium is not None:
        if medium_in_header is not None and medium_in_header != wavelength_medium:
            warnings.warn(f"{path}: CTYPE3={ctype!r} says {medium_in_header}, but "
                          f"wavelength_medium={wavelength_medium!r} was given; using "
                          f"{wavelength_medium}", WavelengthMediumWarning, stacklevel=3)
        return wavelength_medium, False
    if medium_in_header is not None:
        return medium_in_header, False
    medium = "vacuum" if float(np.min(wave_um)) >= _VACUUM_FROM_UM else "air"
    warnings.warn(f"{path}: CTYPE3={ctype!r} does not say air or vacuum; assuming {medium} "
                  f"(cube starts at {float(np.min(wave_um)):.3f} um); pass "
                  "wavelength_medium='air' or 'vacuum' to decide", WavelengthMediumWarning,
                  stacklevel=3)
    return medium, True


def open_cube(path, *, noise_kind: str | None = None, wavelength_medium: str | None = None,
              ifu: int | None = None, band: str | None = None,
              instrument: str | None = None, lazy: bool = False) -> xr.Dataset:
    """Read an IFU cube of any common layout into the klever_nb cube Dataset.

    Parameters
    ----------
    path : str or Path
        FITS file (KMOS combined or per-exposure, SINFONI, MUSE, JWST s3d, IRAF/GMOS,
        MaNGA, or a bare 3-D primary HDU).
    noise_kind : {"sigma", "variance", "inverse_variance"}, optional
        What the noise extension holds; default from its name (NOISE/ERR σ, STAT/VAR
        variance, IVAR inverse variance). Use it for reductions that store variance in ERR.
    wavelength_medium : {"vacuum", "air"}, optional
        Medium of the file's wavelengths. Overrides CTYPE3; needed when CTYPE3 does not
        say (``LAMBDA``, ``LINEAR``). Without it such cubes are taken as vacuum when they
        start at ≥ 1 µm and air below, with a :class:`WavelengthMediumWarning`.
    ifu : int, optional
        IFU number of a KMOS per-exposure file (``IFU.<n>.DATA``). When exactly one IFU
        holds data it is chosen automatically.
    band : str, optional
        Band name (default: ESO grating/filter keywords, else the instrument band whose
        range matches the cube's, else "").
    instrument : str, optional
        Instrument name (default: INSTRUME, else guessed from the layout, else "unknown").
    lazy : bool, optional
        Memory-map the file and read only the sections that are indexed (``flux`` and
        ``noise`` are lazily indexed arrays: ``cube.isel(...).values`` reads and converts
        just that part, with the same numbers as an eager read). A whole-file-compressed
        FITS (``.fits.gz``) cannot be memory-mapped: it is read whole, or refused with an
        :class:`InputError` when that exceeds :func:`memory_budget_bytes`.

    Returns
    -------
    xarray.Dataset
        ``flux`` and ``noise`` (1σ, float64) on ``(wave, y, x)``; ``wave`` in vacuum
        micron, increasing; masked voxels NaN in both. attrs: ``instrument``, ``band``,
        ``resolving_power``, ``pixel_scale_arcsec`` (celestial axes only), ``wcs``,
        ``source_file``, ``source_hdu``, ``layout``, ``wavelength_medium_in_file``,
        ``wavelength_medium_assumed``, ``noise_kind_in_file``, ``noise_estimated``
        (and ``noise_method``), ``ifu`` (KMOS per-exposure files).

    Raises
    ------
    InputError
        Missing/unreadable file, no cube, no spectral axis, unparseable BUNIT, noise or
        mask of another shape, IFU missing/empty/ambiguous. One line naming file, HDU, key.
    ConfigError
        ``noise_kind`` or ``wavelength_medium`` not one of the accepted values.

    References
    ----------
    DESIGN.md (data model, input files); FACTS.md §6 (air→vacuum), §8 (KMOS/SINFONI).

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib
    >>> from astropy.io import fits
    >>> data = np.random.default_rng(0).normal(1.0, 0.05, (20, 3, 4)).astype("f4")
    >>> hdu = fits.PrimaryHDU(data)
    >>> hdu.header.update(CTYPE3="WAVE", CUNIT3="um", CRVAL3=2.0, CDELT3=2e-4, CRPIX3=1,
    ...                   BUNIT="1e-20 erg/s/cm2/Angstrom")
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "cube.fits"
    >>> hdu.writeto(path)
    >>> cube = open_cube(path, noise_kind=None)
    >>> cube.flux.dims, cube.flux.attrs["units"]
    (('wave', 'y', 'x'), '1e-20 erg / (Angstrom s cm2)')
    """
    path = Path(path)
    _validate_choices(path, noise_kind, wavelength_medium)
    compression = _file_compression(path) if lazy and path.is_file() else None
    with _open_fits(path, memmap=lazy and compression is None) as hdul:
        layout = _find_layout(path, hdul, ifu)
        if lazy and compression is not None:
            _check_fits_in_memory(path, hdul, layout, compression)
        return _build_cube(path, hdul, layout, noise_kind=noise_kind,
                           wavelength_medium=wavelength_medium, band=band,
                           instrument=instrument, lazy=lazy and compression is None)


def _check_fits_in_memory(path, hdul, layout: _Layout, compression: str) -> None:
    """A whole-file-compressed cube is read at once: refuse it when it exceeds the budget."""
    if not _is_cube(hdul[layout.data]):
        return
    n_voxels = int(np.prod(_hdu_shape(hdul[layout.data])))
    need = n_voxels * 8 * 3  # float64 flux and noise, and the file's own copy
    budget = memory_budget_bytes()
    if need > budget:
        raise _input_error(path, None, None,
                           f"{compression}-compressed FITS cannot be memory-mapped or read in "
                           f"chunks, and reading it whole needs ~{need / 2**30:.1f} GB (budget "
                           f"{budget / 2**30:.1f} GB)",
                           f"decompress it first (e.g. gunzip) so that it is read in chunks, or "
                           f"raise {MEMORY_BUDGET_ENV}")


def _unit_note(hdul, layout: _Layout, header) -> str:
    if layout.wave_table is None and header.get("CUNIT3"):
        return str(header["CUNIT3"]).strip()
    if layout.wave_table is None:
        return "assumed from the values (CUNIT3 missing): Å above 100, µm above 1e-3, else m"
    return f"from HDU {_hdu_name(hdul, layout.wave_table)}"


def _read_noise(path, hdul, layout: _Layout, flux: np.ndarray, flux_unit: u.UnitBase,
                noise_kind: str | None) -> tuple[np.ndarray, str, str, dict, str]:
    """1σ noise cube, its HDU name, the kind in the file, its attrs, and how it was estimated."""
    shape = flux.shape
    if layout.noise is None:
        sigma = estimate_noise(flux)
        method = ("estimated per channel: 1.4826*MAD over spaxels of "
                  "(2f_i - f_(i-2) - f_(i+2))/sqrt(6), running median over 5 channels "
                  "(DER_SNR, Stoehr et al. 2008)")
        return np.broadcast_to(sigma[:, None, None], shape).copy(), "", "none", {}, method
    noise_hdu = hdul[layout.noise]
    noise_name = _hdu_name(hdul, layout.noise)
    kind = noise_kind or layout.noise_kind
    if noise_hdu.data is None or noise_hdu.data.shape != shape:
        found = None if noise_hdu.data is None else noise_hdu.data.shape
        raise _input_error(path, noise_name, "NAXIS", f"noise shape {found} differs from "
                           f"the data shape {shape}", "give a noise cube of the same shape")
    noise = _noise_to_sigma(np.array(noise_hdu.data, dtype=np.float64), kind)
    noise *= _noise_unit_scale(noise_hdu.header, flux_unit, kind)
    attrs = {"units_original": str(noise_hdu.header.get("BUNIT", "") or "")}
    return noise, noise_name, kind, attrs, ""


def _build_cube(path, hdul, layout: _Layout, *, noise_kind, wavelength_medium, band,
                instrument, lazy: bool = False) -> xr.Dataset:
    data_hdu = hdul[layout.data]
    data_name = _hdu_name(hdul, layout.data)
    if not _is_cube(data_hdu):
        raise _input_error(path, data_name, "NAXIS", f"data HDU has NAXIS = "
                           f"{data_hdu.header.get('NAXIS', 0)}, not a 3-D cube",
                           "give an IFU cube")
    header, primary = data_hdu.header, hdul[0].header
    if lazy:
        flux = None
        shape = _hdu_shape(data_hdu)
    else:
        flux = np.array(data_hdu.data, dtype=np.float64)
        shape = flux.shape

    # Wavelengths (file medium, µm), then vacuum.
    if layout.wave_table is not None:
        wave_file = _wave_from_table(path, hdul, layout.wave_table, shape[0])
        medium_in_header = {"AWAV": "air"}.get(str(header.get("CTYPE3", ""))[:4].upper(),
                                               "vacuum")
        ctype = str(header.get("CTYPE3", "") or _hdu_name(hdul, layout.wave_table))
    else:
        wave_file, medium_in_header, ctype = _wave_from_header(path, hdul, data_name, header,
                                                               shape[0])
    medium, assumed = _decide_medium(path, wave_file, medium_in_header, wavelength_medium, ctype)
    wave_um = air_to_vacuum(wave_file) if medium == "air" else wave_file

    # Units.
    flux_unit, units_original = _flux_unit(path, data_name, header, primary)

    # Masks from the file first (so that a noise estimate ignores them), then noise (1σ).
    mask_name = ""
    factors, out_unit = _fnu_to_flambda(flux_unit, wave_um)
    if lazy:
        source, noise_name, kind, noise_attrs, noise_method = _lazy_source(
            path, hdul, layout, shape, flux_unit, noise_kind, factors)
        mask_name = _hdu_name(hdul, layout.mask) if layout.mask is not None else ""
        if not _any_usable(source):  # nothing usable is not a success (issue 18)
            raise _nothing_usable(path, hdul, layout, data_name, noise_name, mask_name)
        reverse = wave_um.size > 1 and wave_um[-1] < wave_um[0]
        if reverse:
            wave_um = wave_um[::-1]
            source.reverse = True
        flux = _LazyCubeArray(source, "flux")
        noise = _LazyCubeArray(source, "noise")
    else:
        if layout.mask is not None:
            mask_name = _hdu_name(hdul, layout.mask)
            flux[np.broadcast_to(_read_mask(path, hdul, layout.mask, shape), shape)] = np.nan
        noise, noise_name, kind, noise_attrs, noise_method = _read_noise(
            path, hdul, layout, flux, flux_unit, noise_kind)
        bad = ~np.isfinite(flux) | ~np.isfinite(noise) | (noise <= 0)
        if bad.all():  # nothing usable is not a success (issue 18)
            raise _nothing_usable(path, hdul, layout, data_name, noise_name, mask_name)
        flux[bad] = np.nan
        noise[bad] = np.nan

        # f_nu → F_lambda (JWST MJy/sr): per-channel factors through spectral_density.
        if factors is not None:
            flux *= factors[:, None, None]
            noise *= factors[:, None, None]

        # Increasing wavelengths.
        if wave_um.size > 1 and wave_um[-1] < wave_um[0]:
            wave_um, flux, noise = wave_um[::-1], flux[::-1], noise[::-1]
    estimated = layout.noise is None
    if np.any(np.diff(wave_um) <= 0):
        raise _input_error(path, data_name, "CTYPE3", "wavelengths are not monotonic",
                           "check the spectral axis")

    # Instrument, band, resolving power, WCS.
    headers = [header, primary]
    instrument = (_canonical_instrument(instrument) if instrument
                  else _instrument_from_headers(headers, layout.instrument_hint))
    band = band if band is not None else (_band_from_headers(headers)
                                          or _band_from_range(instrument, wave_um))
    wcs_text, pixel_scale = _celestial(header)

    units = out_unit.to_string()
    attrs = {
        "instrument": instrument,
        "band": band,
        "resolving_power": _resolving_power(instrument, band),
        "wcs": wcs_text,
        "source_file": str(path),
        "source_hdu": data_name,
        "noise_hdu": noise_name,
        "mask_hdu": mask_name,
        "layout": layout.name,
        "wavelength_medium_in_file": medium,
        "wavelength_medium_assumed": assumed,
        "ctype3": ctype,
        "wave_unit_in_file": _unit_note(hdul, layout, header),
        "noise_kind_in_file": kind,
        "noise_estimated": estimated,
    }
    if pixel_scale is not None:
        attrs["pixel_scale_arcsec"] = pixel_scale
    if estimated:
        attrs["noise_method"] = noise_method
    if layout.ifu is not None:
        attrs["ifu"] = layout.ifu
    flux_attrs = {"units": units, "units_original": units_original,
                  "long_name": "flux density"}
    noise_attrs.update(units=units, long_name="1 sigma noise of flux")
    ny, nx = shape[1:]
    if lazy:
        attrs["lazy"] = True
        flux = xr.Variable(("wave", "y", "x"), indexing.LazilyIndexedArray(flux), flux_attrs)
        noise = xr.Variable(("wave", "y", "x"), indexing.LazilyIndexedArray(noise),
                            noise_attrs)
    return xr.Dataset(
        {"flux": flux if lazy else (("wave", "y", "x"), flux, flux_attrs),
         "noise": noise if lazy else (("wave", "y", "x"), noise, noise_attrs)},
        coords={"wave": ("wave", wave_um, {"units": "um", "medium": "vacuum",
                                           "frame": "observed"}),
                "y": ("y", np.arange(ny)), "x": ("x", np.arange(nx))},
        attrs=attrs,
    )


# ---------------------------------------------------------------------------
# Lazy (memory-mapped, section-by-section) reading for cubes larger than memory
# ---------------------------------------------------------------------------
#: Environment variable that sets the memory budget (MB) of whole-cube reads.
MEMORY_BUDGET_ENV = "KLEVER_NB_MEMORY_BUDGET_MB"


def memory_budget_bytes() -> float:
    """Bytes a whole-cube read may use: ``$KLEVER_NB_MEMORY_BUDGET_MB``, else half the
    available memory (psutil), else unlimited."""
    env = os.environ.get(MEMORY_BUDGET_ENV)
    if env:
        try:
            return float(env) * 2**20
        except ValueError:
            raise ConfigError(f"{MEMORY_BUDGET_ENV}={env!r} is not a number of MB") from None
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return float("inf")
    return 0.5 * float(psutil.virtual_memory().available)


def _file_compression(path: Path) -> str | None:
    """'gzip', 'bzip2' or 'zip' for a whole-file-compressed FITS (cannot be memory-mapped)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:3] == b"BZh":
        return "bzip2"
    if head[:2] == b"PK":
        return "zip"
    return None


def _hdu_shape(hdu) -> tuple[int, int, int]:
    header = hdu.header
    if isinstance(hdu, fits.CompImageHDU) and "ZNAXIS1" in header:
        return tuple(int(header[f"ZNAXIS{i}"]) for i in (3, 2, 1))
    return tuple(int(header[f"NAXIS{i}"]) for i in (3, 2, 1))


def _as_slice(key, n: int):
    """(slice to read, index into what was read or None, whether to drop the axis)."""
    if isinstance(key, int | np.integer):
        k = int(key) % n
        return slice(k, k + 1), None, True
    if isinstance(key, slice):
        return key, None, False
    idx = np.asarray(key, dtype=np.int64) % n
    if idx.size == 0:
        return slice(0, 0), None, False
    lo, hi = int(idx.min()), int(idx.max()) + 1
    return slice(lo, hi), idx - lo, False


class _CubeSource:
    """Reads sections of a cube's data (+ noise, mask) HDUs and converts them as
    :func:`open_cube` does for the whole cube (masks, noise kind and units, bad voxels,
    f_nu factors, wavelength order), so that only the sections asked for are in memory.

    Picklable (the file is re-opened where it is used, e.g. on a dask worker).
    """

    def __init__(self, path, data: int, noise: int | None, kind: str | None, mask: int | None,
                 shape, noise_scale: float, factors, sigma_channel=None):
        self.path = str(path)
        self.data, self.noise, self.kind, self.mask = data, noise, kind, mask
        self.shape = tuple(shape)
        self.noise_scale = float(noise_scale)
        self.factors = factors
        self.sigma_channel = sigma_channel
        self.reverse = False
        self._hdul = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_hdul"] = None
        state["_fd"] = None
        return state

    def _open(self):
        if self._hdul is None:
            self._hdul = fits.open(self.path, memmap=True, lazy_load_hdus=True)
        return self._hdul

    def close(self) -> None:
        if self._hdul is not None:
            self._hdul.close()
            self._hdul = None
        if self.__dict__.get("_fd") is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: S110 - interpreter shutdown
            pass

    _DTYPES = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}

    def _plain(self, index: int):
        """(data offset, dtype, shape) of a plain (uncompressed, unscaled) image HDU, else None.

        Such HDUs are read with ``os.pread`` of the rows asked for: unlike a memory map, the
        file's pages then never count in this process's resident memory."""
        cache = self.__dict__.setdefault("_plain_cache", {})
        if index not in cache:
            hdul = self._open()
            hdu = hdul[index]
            header = hdu.header
            info = None
            if (not isinstance(hdu, fits.CompImageHDU) and "BSCALE" not in header
                    and "BZERO" not in header and header.get("BITPIX") in self._DTYPES):
                naxis = int(header.get("NAXIS", 0))
                shape = tuple(int(header[f"NAXIS{i}"]) for i in range(naxis, 0, -1))
                info = (int(hdul.fileinfo(index)["datLoc"]),
                        np.dtype(self._DTYPES[header["BITPIX"]]), shape)
            cache[index] = info
        return cache[index]

    def _pread(self, info, planes, ys: slice, xs) -> np.ndarray:
        offset, dtype, shape = info
        if self.__dict__.get("_fd") is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        ny, nx = shape[-2:]
        y0, y1, step = ys.indices(ny)
        y1 = max(y0, y1) if step > 0 else y1
        rows = slice(y0, y1) if step > 0 else slice(y1 + 1, y0 + 1)
        n_rows = max(rows.stop - rows.start, 0)
        per_plane = ny * nx * dtype.itemsize
        out = np.empty((len(planes), n_rows, nx), dtype=dtype)
        nbytes = n_rows * nx * dtype.itemsize
        for k, plane in enumerate(planes):
            start = offset + int(plane) * per_plane + rows.start * nx * dtype.itemsize
            buf = os.pread(self._fd, nbytes, start)
            if len(buf) != nbytes:
                raise _input_error(self.path, None, None, "file is shorter than its header "
                                   "says (truncated)", "re-download or re-write the file")
            out[k] = np.frombuffer(buf, dtype=dtype).reshape(n_rows, nx)
        sub = slice(None, None, step) if step > 0 else slice(None, None, step)
        if step != 1:
            out = out[:, sub] if step > 0 else out[:, ::-1][:, ::-step]
        return out[:, :, xs]

    def _array(self, index: int):
        """The HDU's memory map (plain images), else its section reader (compressed or
        scaled integers: astropy decompresses/scales only the tiles asked for)."""
        hdu = self._open()[index]
        header = hdu.header
        if isinstance(hdu, fits.CompImageHDU) or "BSCALE" in header or "BZERO" in header:
            return hdu.section
        return hdu.data

    def _section(self, index: int, wave_idx, ys, xs) -> np.ndarray:
        info = self._plain(index)
        if info is not None and len(info[2]) == 3:
            return np.asarray(self._pread(info, wave_idx, ys, xs), dtype=np.float64)
        array = self._array(index)
        lo, hi = int(wave_idx.min()), int(wave_idx.max()) + 1
        if hi - lo == wave_idx.size:  # sorted and unique: a contiguous run of channels
            block = array[lo:hi, ys, xs]
        elif isinstance(array, np.ndarray):
            block = array[wave_idx, ys, xs]  # only these planes' rows are touched
        else:
            block = np.stack([array[int(i), ys, xs] for i in wave_idx])
        return np.asarray(block, dtype=np.float64)

    def read(self, key, which: str) -> np.ndarray:
        """Section ``key`` (outer indexing on (wave, y, x), increasing wavelength)."""
        n_wave, ny, nx = self.shape
        wave_idx = np.arange(n_wave)[key[0]]
        drop_w = np.ndim(wave_idx) == 0
        wave_idx = np.atleast_1d(wave_idx)
        ys, ysub, drop_y = _as_slice(key[1], ny)
        xs, xsub, drop_x = _as_slice(key[2], nx)
        shape_out = (wave_idx.size, len(range(*ys.indices(ny))), len(range(*xs.indices(nx))))
        if wave_idx.size == 0 or 0 in shape_out:
            out = np.zeros(shape_out)
        else:
            file_idx = n_wave - 1 - wave_idx if self.reverse else wave_idx
            order = np.argsort(file_idx, kind="stable")
            sorted_idx = file_idx[order]
            flux = self._section(self.data, sorted_idx, ys, xs)
            if self.mask is not None:
                mhdu = self._open()[self.mask]
                if mhdu.header.get("NAXIS", 0) == 3:
                    mvals = np.asarray(self._section(self.mask, sorted_idx, ys, xs))
                else:
                    mvals = np.asarray(self._array(self.mask)[ys, xs], dtype=np.float64)[None]
                name = mhdu.name.strip().upper()
                bad = mvals == 0 if name.endswith("FIELDMAP") else mvals != 0
                flux[np.broadcast_to(bad, flux.shape)] = np.nan
            if self.noise is None:
                noise = np.broadcast_to(self.sigma_channel[sorted_idx][:, None, None],
                                        flux.shape).copy()
            else:
                noise = _noise_to_sigma(self._section(self.noise, sorted_idx, ys, xs),
                                        self.kind)
                noise *= self.noise_scale
            bad = ~np.isfinite(flux) | ~np.isfinite(noise) | (noise <= 0)
            flux[bad] = np.nan
            noise[bad] = np.nan
            if self.factors is not None:
                flux *= self.factors[sorted_idx][:, None, None]
                noise *= self.factors[sorted_idx][:, None, None]
            out = flux if which == "flux" else noise
            inverse = np.empty_like(order)
            inverse[order] = np.arange(order.size)
            out = out[inverse]
        if ysub is not None:
            out = out[:, ysub]
        if xsub is not None:
            out = out[:, :, xsub]
        index = tuple(0 if drop else slice(None) for drop in (drop_w, drop_y, drop_x))
        return out[index]


class _LazyCubeArray(xr.backends.BackendArray):
    """xarray view of one variable of a :class:`_CubeSource` (outer indexing, read on demand)."""

    def __init__(self, source: _CubeSource, which: str):
        self.source = source
        self.which = which
        self.shape = source.shape
        self.dtype = np.dtype(np.float64)

    def __getitem__(self, key):
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.OUTER, self._raw)

    def _raw(self, key):
        return self.source.read(key, self.which)


def _estimate_noise_chunked(source: _CubeSource, smooth_channels: int = 5) -> np.ndarray:
    """:func:`estimate_noise` (the same numbers) from blocks of channels of the file."""
    n_wave, ny, nx = source.shape
    block = max(8, int(2**24 // max(ny * nx, 1)))
    sigma = np.full(n_wave, np.nan)
    key_all = (slice(None), slice(None))
    for c0 in range(2, max(n_wave - 2, 2), block):
        c1 = min(n_wave - 2, c0 + block)
        flux = source.read((np.arange(c0 - 2, c1 + 2),) + key_all, "flux").reshape(
            c1 - c0 + 4, -1)
        second = 2.0 * flux[2:-2] - flux[:-4] - flux[4:]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            centre = np.nanmedian(second, axis=1, keepdims=True)
            sigma[c0:c1] = 1.482602 * np.nanmedian(np.abs(second - centre), axis=1) / np.sqrt(6)
    good = np.isfinite(sigma) & (sigma > 0)
    if not good.any():
        return np.full(n_wave, np.nan)
    index = np.arange(n_wave)
    sigma = np.interp(index, index[good], sigma[good])
    return median_filter(sigma, size=max(1, int(smooth_channels)), mode="nearest")


def _lazy_source(path, hdul, layout: _Layout, shape, flux_unit, noise_kind, factors):
    """The section reader of a cube, its noise HDU name, kind, attrs and estimate method."""
    if layout.mask is not None:
        mask_hdu = hdul[layout.mask]
        mshape = tuple(int(mask_hdu.header.get(f"NAXIS{i}", 0))
                       for i in range(int(mask_hdu.header.get("NAXIS", 0)), 0, -1))
        if mshape != tuple(shape) and mshape != tuple(shape[1:]):
            raise _input_error(path, _hdu_name(hdul, layout.mask), "NAXIS",
                               f"mask shape {mshape} does not match the cube {tuple(shape)}",
                               "give a mask of the cube's shape")
    if layout.noise is None:
        source = _CubeSource(path, layout.data, None, None, layout.mask, shape, 1.0, factors,
                             sigma_channel=np.ones(shape[0]))
        source.sigma_channel = _estimate_noise_chunked(source)
        method = ("estimated per channel: 1.4826*MAD over spaxels of "
                  "(2f_i - f_(i-2) - f_(i+2))/sqrt(6), running median over 5 channels "
                  "(DER_SNR, Stoehr et al. 2008)")
        return source, "", "none", {}, method
    noise_hdu = hdul[layout.noise]
    noise_name = _hdu_name(hdul, layout.noise)
    kind = noise_kind or layout.noise_kind
    if not _is_cube(noise_hdu) or _hdu_shape(noise_hdu) != tuple(shape):
        found = _hdu_shape(noise_hdu) if _is_cube(noise_hdu) else None
        raise _input_error(path, noise_name, "NAXIS", f"noise shape {found} differs from "
                           f"the data shape {tuple(shape)}", "give a noise cube of the same shape")
    scale = _noise_unit_scale(noise_hdu.header, flux_unit, kind)
    source = _CubeSource(path, layout.data, layout.noise, kind, layout.mask, shape, scale,
                         factors)
    attrs = {"units_original": str(noise_hdu.header.get("BUNIT", "") or "")}
    return source, noise_name, kind, attrs, ""

"""Header parsing of IFU cubes: wavelength axis, air/vacuum, units, instrument/band, WCS.

The pieces of :func:`klever_nb.io.cubes.open_cube` that read one FITS header (or a
wavelength table) and return numbers: the wavelength axis in micron (linear, log,
``-TAB`` or a table HDU), the IAU air <-> vacuum conversion, the BUNIT flux unit and the
f_nu -> F_lambda factors, the noise HDU's unit and kind, the instrument and band from the
header keywords, and the celestial WCS with its pixel scale. Also the one-line
:class:`InputError` that names file, HDU and key, which every reader module raises.

References
----------
DESIGN.md "Input files"; FACTS.md §6 (air/vacuum) and §8 (KMOS/SINFONI format); issues 3,
12 and 18.
"""

from __future__ import annotations

import re
import warnings

import astropy.units as u
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import proj_plane_pixel_area

from klever_nb.celestial import WCS_ERRORS
from klever_nb.constants import INSTRUMENTS
from klever_nb.errors import InputError

__all__ = ["air_to_vacuum", "vacuum_to_air"]

_WAVE_TABLE_NAMES = ("WAVE", "WAVELENGTH", "LAMBDA")

#: Canonical instrument names, keyed by what INSTRUME may contain.
_INSTRUMENT_NAMES = {
    "KMOS": "KMOS", "SINFONI": "SINFONI", "MUSE": "MUSE", "NIRSPEC": "NIRSpec",
    "MIRI": "MIRI", "GMOS": "GMOS", "MANGA": "MaNGA",
}

#: CTYPE3 values (first 4 characters for the standard ones) that mean wavelength.
_CTYPE_MEDIUM = {"WAVE": "vacuum", "AWAV": "air"}
_CTYPE_NONSTANDARD = ("LAMBDA", "LINEAR", "WAVELENGTH", "WAVELEN", "LAMBDA_AIR", "SPECTRAL")

#: Target units of JWST-like f_nu surface brightness cubes.
_FLAMBDA_SB = u.erg / u.s / u.cm**2 / u.AA / u.arcsec**2
_FLAMBDA = u.erg / u.s / u.cm**2 / u.AA


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
# HDU names and shapes
# ---------------------------------------------------------------------------
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
    except (*WCS_ERRORS, u.UnitsError) as exc:  # wcslib errors are ValueErrors
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
# Noise kind and unit
# ---------------------------------------------------------------------------
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

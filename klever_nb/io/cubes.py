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

Modules: this one finds the layout (which HDU holds data, noise, mask, wavelengths) and
builds the Dataset; :mod:`klever_nb.io.cube_header` parses the headers (wavelength axis,
air/vacuum, units, instrument/band, celestial WCS); :mod:`klever_nb.io.cube_lazy` reads
sections of cubes larger than memory (``lazy=True``).

References
----------
DESIGN.md "Data model" and "Input files"; FACTS.md §6 (air/vacuum) and §8 (KMOS/SINFONI
format); issues 3 and 12.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import astropy.units as u
import numpy as np
import xarray as xr
from astropy.io import fits
from scipy.ndimage import median_filter
from xarray.core import indexing

from klever_nb.celestial import WCS_ERRORS
from klever_nb.errors import ConfigError, InputError
from klever_nb.io.cube_header import (
    _WAVE_TABLE_NAMES,
    _band_from_headers,
    _band_from_range,
    _canonical_instrument,
    _celestial,
    _flux_unit,
    _fnu_to_flambda,
    _hdu_name,
    _input_error,
    _instrument_from_headers,
    _is_cube,
    _noise_to_sigma,
    _noise_unit_scale,
    _one_line,
    _resolving_power,
    _wave_from_header,
    _wave_from_table,
    air_to_vacuum,
    vacuum_to_air,
)
from klever_nb.io.cube_lazy import (
    MEMORY_BUDGET_ENV,
    _any_usable,
    _check_fits_in_memory,
    _file_compression,
    _hdu_shape,
    _lazy_source,
    memory_budget_bytes,
)
from klever_nb.lazyarray import SectionArray

__all__ = [
    "MEMORY_BUDGET_ENV",
    "NOISE_KINDS",
    "WAVELENGTH_MEDIA",
    "WavelengthMediumWarning",
    "air_to_vacuum",
    "estimate_noise",
    "memory_budget_bytes",
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

#: Cubes whose medium is not stated are assumed vacuum from this wavelength on (issue 12).
_VACUUM_FROM_UM = 1.0


class WavelengthMediumWarning(UserWarning):
    """The cube's header does not say whether its wavelengths are in air or in vacuum."""


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
        except (OSError, *WCS_ERRORS) as exc:  # astropy: OSError, ValueError, TypeError...
            raise _input_error(path, None, None, f"not a readable FITS file ({exc})",
                               "give a FITS cube (re-download it if it was truncated)") from exc
    for w in caught:
        message = str(w.message).lower()
        if "truncated" in message or "corrupted" in message:
            hdul.close()
            raise _input_error(path, None, None, f"truncated or corrupted FITS file ({w.message})",
                               "re-download or re-write the file")
    return hdul


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
# Noise and masks
# ---------------------------------------------------------------------------
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
        flux = SectionArray(source, "flux")
        noise = SectionArray(source, "noise")
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

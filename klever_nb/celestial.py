"""Celestial WCS helpers shared by every stage: header strings and pixel scales.

A map's celestial WCS travels as a FITS header string in ``attrs["wcs"]`` (DESIGN.md "Data
model") so that it survives netCDF round trips. This module sits below the stages and
``io`` (it imports only astropy and :mod:`klever_nb.errors`), so that lensing, alignment
and the readers use one implementation without importing each other.
"""

from __future__ import annotations

import warnings

import astropy.units as u
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

__all__ = ["WCS_ERRORS", "wcs_from_string", "pixel_scale_from_wcs"]

#: What astropy raises for a broken header or WCS: ValueError (every wcslib WcsError is one),
#: KeyError/TypeError for missing or mistyped keywords, and fits' VerifyError. Catch these,
#: never a bare Exception, and say which file and key.
WCS_ERRORS = (ValueError, KeyError, TypeError, fits.VerifyError)


def wcs_from_string(header: str) -> WCS:
    """Celestial :class:`~astropy.wcs.WCS` from the header string kept in ``attrs["wcs"]``."""
    sep = "\n" if "\n" in header else ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(fits.Header.fromstring(header, sep=sep)).celestial


def pixel_scale_from_wcs(wcs: WCS) -> float:
    """Mean pixel side in arcsec from the full CD/PC matrix (square pixels assumed)."""
    scales = wcs.proj_plane_pixel_scales()
    values = [s.to_value(u.arcsec) for s in scales]
    return float(np.sqrt(values[0] * values[1]))

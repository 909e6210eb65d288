"""Readers of 2-D FITS maps: deflection, convergence and shear maps, HST images.

A map is an ``xarray.DataArray`` on dims ``(ly, lx)`` (row, column of the FITS image;
integer pixel coordinates), with the celestial WCS as a FITS header string in
``attrs["wcs"]`` so that it survives netCDF round trips (DESIGN.md "Data model").
Lens maps are combined into one ``Dataset`` with ``alpha_x``, ``alpha_y`` (arcsec,
along the map's +x column and +y row axes; β = θ − α, DESIGN.md "Input files") and
optionally ``kappa``, ``gamma``; ``theta_x``/``theta_y`` coordinates give the
image-plane position of each pixel centre in arcsec from the WCS reference pixel.

References: K20 §3.2.2 (deflection maps from the Frontier Fields / CLASH models);
DESIGN.md "Input files".
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from klever_nb.celestial import WCS_ERRORS, pixel_scale_from_wcs, wcs_from_string
from klever_nb.errors import InputError

__all__ = ["open_image", "open_lens_maps", "wcs_from_string", "pixel_scale_from_wcs"]


def _read_2d(path: Path, hdu: int | str | None) -> tuple[np.ndarray, fits.Header]:
    """Data and header of the first HDU holding a 2-D image (or the one asked for)."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        hdul = fits.open(path, memmap=False)
    except OSError as exc:
        raise InputError(f"{path}: not a readable FITS file ({exc})") from None
    with hdul:
        if hdu is not None:
            try:
                candidates = [hdul[hdu]]
            except (KeyError, IndexError):
                raise InputError(f"{path}: has no HDU {hdu!r}") from None
        else:
            candidates = list(hdul)
        for h in candidates:
            if h.data is None or not isinstance(h, fits.PrimaryHDU | fits.ImageHDU):
                continue
            data = np.squeeze(np.asarray(h.data, dtype=np.float64))
            if data.ndim == 2:
                return data, h.header.copy()
    where = f"HDU {hdu!r}" if hdu is not None else "any HDU"
    raise InputError(f"{path}: {where} holds no 2-D image (expected a 2-D map)")


def open_image(path: str | Path, *, hdu: int | str | None = None) -> xr.DataArray:
    """Read a 2-D FITS map (deflection, κ, γ, HST image) with its celestial WCS.

    Parameters
    ----------
    path : str or Path
        FITS file.
    hdu : int or str, optional
        HDU to read; default: the first HDU with a 2-D image.

    Returns
    -------
    xarray.DataArray
        Dims ``(ly, lx)`` with integer pixel coordinates; attrs ``wcs`` (celestial header
        string), ``pixel_scale_arcsec``, ``units`` (BUNIT, "" when absent), ``source_file``.

    Raises
    ------
    InputError
        Missing file, no 2-D image, no celestial WCS, or only NaN values.

    References
    ----------
    DESIGN.md "Input files"; K20 §3.2.2.
    """
    path = Path(path)
    data, header = _read_2d(path, hdu)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(header)
        except WCS_ERRORS as exc:
            raise InputError(f"{path}: unreadable WCS in the header ({exc})") from None
    if not wcs.has_celestial:
        raise InputError(f"{path}: no celestial WCS (CTYPE RA---/DEC-- with CRVAL, CRPIX, "
                         "CDELT or CD) in the header; add one so the map can be placed on the sky")
    wcs = wcs.celestial
    if not np.isfinite(data).any():
        raise InputError(f"{path}: the map holds only NaN values")
    ny, nx = data.shape
    return xr.DataArray(
        data,
        dims=("ly", "lx"),
        coords={"ly": np.arange(ny), "lx": np.arange(nx)},
        name=path.stem,
        attrs={
            "wcs": wcs.to_header_string(),
            "pixel_scale_arcsec": pixel_scale_from_wcs(wcs),
            "units": str(header.get("BUNIT", "")).strip(),
            "source_file": str(path),
        },
    )


def _same_grid(a: xr.DataArray, b: xr.DataArray, tol_pix: float = 1e-3) -> bool:
    """True when two maps share shape and WCS (corners agree to ``tol_pix`` pixels)."""
    if a.shape != b.shape:
        return False
    wa, wb = wcs_from_string(a.attrs["wcs"]), wcs_from_string(b.attrs["wcs"])
    ny, nx = a.shape
    px = np.array([0, nx - 1, 0, nx - 1, (nx - 1) / 2])
    py = np.array([0, 0, ny - 1, ny - 1, (ny - 1) / 2])
    sky = wa.pixel_to_world(px, py)
    bx, by = wb.world_to_pixel(sky)
    return bool(np.all(np.abs(bx - px) < tol_pix) and np.all(np.abs(by - py) < tol_pix))


def open_lens_maps(
    *,
    deflection_x: str | Path,
    deflection_y: str | Path,
    kappa: str | Path | None = None,
    gamma: str | Path | None = None,
    deflection_units: str = "arcsec",
    normalisation: str = "dls_ds",
    z_lens: float | None = None,
) -> xr.Dataset:
    """Read deflection (and optional κ, γ) maps into one lens ``Dataset``.

    Parameters
    ----------
    deflection_x, deflection_y : str or Path
        Deflection along the map's +x (column) and +y (row) axes, β = θ − α.
    kappa, gamma : str or Path, optional
        Convergence and shear modulus, in the same normalisation.
    deflection_units : {"arcsec", "pixel"}
        Units of the deflection maps ("pixel": pixels of their own grid).
    normalisation : {"dls_ds", "source"}
        ``dls_ds``: maps for D_ls/D_s = 1 (Frontier Fields / CLASH); ``source``: already for
        the source redshift. Stored in ``attrs["normalisation"]`` for :func:`rescale_lens`.
    z_lens : float, optional
        Lens redshift, stored in the attrs.

    Returns
    -------
    xarray.Dataset
        ``alpha_x``, ``alpha_y`` (arcsec) and optionally ``kappa``, ``gamma`` on ``(ly, lx)``;
        coordinates ``theta_x`` (lx), ``theta_y`` (ly) in arcsec from the WCS reference pixel;
        attrs ``wcs``, ``pixel_scale_arcsec``, ``normalisation``, ``z_lens``, ``source_files``.

    Raises
    ------
    InputError
        Any reader error of :func:`open_image`, maps on different grids, NaN values.

    References
    ----------
    K20 §3.2.2; DESIGN.md "Input files".
    """
    if deflection_units not in {"arcsec", "pixel"}:
        raise InputError(f"deflection_units must be 'arcsec' or 'pixel', got {deflection_units!r}")
    if normalisation not in {"dls_ds", "source"}:
        raise InputError(f"normalisation must be 'dls_ds' or 'source', got {normalisation!r}")
    paths = {"alpha_x": deflection_x, "alpha_y": deflection_y, "kappa": kappa, "gamma": gamma}
    maps = {name: open_image(p) for name, p in paths.items() if p is not None}
    ref = maps["alpha_x"]
    for name, m in maps.items():
        if not _same_grid(ref, m):
            raise InputError(f"{m.attrs['source_file']}: not on the same pixel grid (shape and "
                             f"WCS) as {ref.attrs['source_file']}; resample the lens maps to one grid")
        bad = int(np.count_nonzero(~np.isfinite(m.values)))
        if bad:
            raise InputError(f"{m.attrs['source_file']}: {bad} NaN/inf pixels in the {name} map; "
                             "crop or fill the map so every pixel has a value")
    scale = ref.attrs["pixel_scale_arcsec"]
    wcs = wcs_from_string(ref.attrs["wcs"])
    data_vars = {}
    for name, m in maps.items():
        values = m.values
        units = ""
        if name.startswith("alpha"):
            values = values * scale if deflection_units == "pixel" else values
            units = "arcsec"
        data_vars[name] = (("ly", "lx"), values, {"units": units,
                                                  "source_file": m.attrs["source_file"]})
    ny, nx = ref.shape
    crpix_x, crpix_y = wcs.wcs.crpix[0] - 1.0, wcs.wcs.crpix[1] - 1.0
    coords = {
        "ly": np.arange(ny),
        "lx": np.arange(nx),
        "theta_x": ("lx", (np.arange(nx) - crpix_x) * scale, {"units": "arcsec"}),
        "theta_y": ("ly", (np.arange(ny) - crpix_y) * scale, {"units": "arcsec"}),
    }
    attrs = {
        "wcs": ref.attrs["wcs"],
        "pixel_scale_arcsec": scale,
        "normalisation": normalisation,
        "source_files": ", ".join(m.attrs["source_file"] for m in maps.values()),
    }
    if z_lens is not None:
        attrs["z_lens"] = float(z_lens)
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)

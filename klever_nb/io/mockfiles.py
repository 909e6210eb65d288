"""Files of the mock observatory: KMOS-layout FITS cubes, lens maps, galaxy TOML, truth.

The science of the mocks is in :mod:`klever_nb.mock` (pure, in memory); this module
writes a :class:`klever_nb.mock.MockGalaxy` as the real input files a user would have
(DESIGN.md "Mock observatory"), atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from klever_nb.mock import (
    FLUX_UNITS,
    LOG_MSTAR_ERR,
    MockGalaxy,
    demo_specs,
    make_mock,
)


def _cube_header(ds: xr.Dataset, name: str, band: str):
    """3-D header: celestial CD matrix from ``attrs["wcs"]``, WAVE axis in micron, BUNIT."""
    from astropy.io import fits

    wave = ds["wave"].values
    step = float(wave[1] - wave[0])
    header = fits.Header()
    header["OBJECT"] = name
    header["WCSAXES"] = 3
    for key, value in fits.Header.fromstring(ds.attrs["wcs"]).items():
        if key != "WCSAXES":
            header[key] = value
    for key in ("CD1_3", "CD2_3", "CD3_1", "CD3_2"):
        header[key] = 0.0
    header["CTYPE3"] = "WAVE"
    header["CUNIT3"] = "um"
    header["CRPIX3"] = 1.0
    header["CRVAL3"] = float(wave[0])
    header["CDELT3"] = step
    header["CD3_3"] = step
    header["SPECSYS"] = "TOPOCENT"
    header["BUNIT"] = FLUX_UNITS
    return header


def _cube_hdul(galaxy: MockGalaxy, band: str):
    """KMOS combined layout (empty primary, DATA, NOISE); SINFONI: data in the primary, no noise.

    References
    ----------
    FACTS.md §8 (KMOS/SINFONI data format); DESIGN.md "Input files".
    """
    from astropy.io import fits

    spec = galaxy.spec
    ds = galaxy.cubes[band].to_dataset()
    header = _cube_header(ds, spec.name, band)
    if spec.instrument == "SINFONI":
        primary = fits.PrimaryHDU(ds["flux"].values.astype(np.float32), header=header)
        primary.header["INSTRUME"] = "SINFONI"
        primary.header["HIERARCH ESO INS GRAT1 NAME"] = band
        primary.header["ORIGIN"] = "klever_nb.mock"
        primary.header["COMMENT"] = "Synthetic cube (no noise extension); truth in truth.json"
        return fits.HDUList([primary])
    primary = fits.PrimaryHDU()
    primary.header["OBJECT"] = spec.name
    primary.header["INSTRUME"] = spec.instrument
    primary.header["HIERARCH ESO INS GRAT1 ID"] = band
    primary.header["ORIGIN"] = "klever_nb.mock"
    primary.header["COMMENT"] = "Synthetic cube; truth in truth.json"
    hdus = [primary]
    for extname, var in (("DATA", "flux"), ("NOISE", "noise")):
        ext = header.copy()
        ext.insert(0, ("EXTNAME", extname))
        ext["HIERARCH ESO INS GRAT1 ID"] = band
        hdus.append(fits.ImageHDU(ds[var].values.astype(np.float32), header=ext))
    return fits.HDUList(hdus)


def _map_hdu(values: np.ndarray, wcs_header: str, bunit: str, comment: str, extra: dict):
    from astropy.io import fits

    header = fits.Header.fromstring(wcs_header)
    header["BUNIT"] = bunit
    for key, value in extra.items():
        header[key] = value
    header["COMMENT"] = comment
    return fits.PrimaryHDU(values.astype(np.float32), header=header)


def _write_fits(hdul, path: Path) -> None:
    from klever_nb.io.products import atomic_path

    with atomic_path(path) as tmp:
        hdul.writeto(tmp, overwrite=True)


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(float(value)) if isinstance(value, float) else str(value)


def galaxy_toml_text(galaxy: MockGalaxy) -> str:
    """The galaxy TOML (DESIGN.md layout) of a mock written by :func:`write_mock`."""
    spec = galaxy.spec
    lines = [f"# Mock galaxy written by klever_nb.mock (seed {spec.seed}); truth in truth.json",
             f"name = {_toml_value(spec.name)}",
             f"redshift = {_toml_value(float(spec.redshift))}",
             f"instrument = {_toml_value(spec.instrument)}", "", "[cubes]"]
    lines += [f"{band} = {_toml_value(f'cubes/{spec.name}_{band}.fits')}" for band in spec.bands]
    lines += ["", "[psf]", f"fwhm_arcsec = {_toml_value(float(spec.psf_fwhm_arcsec))}"]
    if spec.lens is not None:
        lines += ["", "[lens]", 'deflection_x = "lens/dx.fits"', 'deflection_y = "lens/dy.fits"',
                  f"z_lens = {_toml_value(float(spec.z_lens))}", 'normalisation = "dls_ds"',
                  'kappa = "lens/kappa.fits"', 'gamma = "lens/gamma.fits"',
                  'hst_image = "lens/f160w.fits"']
    if spec.log_mstar is not None:
        lines += ["", "[properties]", f"log_mstar = {_toml_value(float(spec.log_mstar))}",
                  f"log_mstar_err = {_toml_value(LOG_MSTAR_ERR)}"]
    return "\n".join(lines) + "\n"


def write_mock(galaxy: MockGalaxy, out_dir: str | Path) -> Path:
    """Write a mock as real input files; return the path of its ``galaxy.toml``.

    Files (relative to ``out_dir``): ``cubes/<name>_<band>.fits`` (KMOS combined layout:
    empty primary, ``DATA`` and ``NOISE`` extensions, celestial + WAVE WCS, BUNIT; for
    ``instrument="SINFONI"`` the data sit in the primary HDU without noise, as SINFONI
    pipeline cubes do),
    ``lens/dx.fits``, ``dy.fits``, ``kappa.fits``, ``gamma.fits`` (lensed only, arcsec,
    ``dls_ds`` normalisation), ``galaxy.toml``, ``truth.json`` and ``truth/source.nc``,
    ``truth/image_maps.nc`` (true maps). Every file is written atomically.

    Examples
    --------
    >>> import tempfile
    >>> path = write_mock(make_mock(demo_specs()[1]), tempfile.mkdtemp())
    >>> path.name
    'galaxy.toml'
    """
    from klever_nb.io.products import write_json, write_netcdf, write_text

    out = Path(out_dir)
    spec = galaxy.spec
    for band in spec.bands:
        _write_fits(_cube_hdul(galaxy, band), out / "cubes" / f"{spec.name}_{band}.fits")
    if galaxy.lens_maps is not None:
        lm = galaxy.lens_maps
        extra = {"ZLENS": float(spec.z_lens), "ZSOURCE": float(spec.redshift),
                 "HIERARCH KLEVER NORMALISATION": "dls_ds",
                 "HIERARCH KLEVER DLS_DS": float(lm.attrs["dls_ds"])}
        for var, fname, unit, what in (
                ("alpha_x", "dx.fits", "arcsec", "deflection along +x (column) axis"),
                ("alpha_y", "dy.fits", "arcsec", "deflection along +y (row) axis"),
                ("kappa", "kappa.fits", "", "convergence"),
                ("gamma", "gamma.fits", "", "shear modulus"),
                ("hst_image", "f160w.fits", "erg / (s cm2 Angstrom arcsec2)",
                 "HST-like continuum image (not a deflection; normalisation irrelevant)")):
            hdu = _map_hdu(lm[var].values, lm.attrs["wcs"], unit,
                           f"{what}; Dls/Ds = 1 normalisation; beta = theta - alpha", extra)
            _write_fits(hdu, out / "lens" / fname)
    write_netcdf(galaxy.source, out / "truth" / "source.nc")
    if galaxy.image_maps is not None:
        write_netcdf(galaxy.image_maps, out / "truth" / "image_maps.nc")
    write_json(galaxy.truth, out / "truth.json")
    toml_path = out / "galaxy.toml"
    write_text(galaxy_toml_text(galaxy), toml_path)
    return toml_path




def write_demo_sample(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write every :func:`demo_specs` galaxy to ``<out>/<name>/`` and ``<out>/sample.toml``.

    Returns the path of ``sample.toml`` (``galaxies = [...]`` relative to it).
    """
    from klever_nb.io.products import write_text

    out = Path(out_dir)
    rels = []
    for spec in demo_specs(seed=seed):
        write_mock(make_mock(spec), out / spec.name)
        rels.append(f"{spec.name}/galaxy.toml")
    text = ("# Demo sample written by klever_nb.mock\n"
            "galaxies = [" + ", ".join(json.dumps(r) for r in rels) + "]\n")
    sample = out / "sample.toml"
    write_text(text, sample)
    return sample

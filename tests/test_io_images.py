"""2-D FITS map readers (deflection, κ, γ, HST images): layout, units and one clear error each."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from klever_nb.errors import InputError
from klever_nb.io.images import open_image, open_lens_maps, wcs_from_string


def _header(shape=(40, 50), scale=0.05, crpix=(25.5, 20.5)) -> fits.Header:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [342.18, -44.53]
    w.wcs.crpix = list(crpix)
    w.wcs.cdelt = [-scale / 3600, scale / 3600]
    return w.to_header()


def _write(path, data, header=None, *, extra_hdu=False):
    hdus = [fits.PrimaryHDU(data=None if extra_hdu else data, header=None if extra_hdu
                            else header)]
    if extra_hdu:
        hdus.append(fits.ImageHDU(data=data, header=header, name="SCI"))
    fits.HDUList(hdus).writeto(path)
    return path


def test_open_image_layout_scale_and_wcs(tmp_path):
    data = np.arange(40 * 50, dtype=float).reshape(40, 50)
    header = _header()
    header["BUNIT"] = "arcsec"
    img = open_image(_write(tmp_path / "dx.fits", data, header, extra_hdu=True))
    assert img.dims == ("ly", "lx") and img.shape == (40, 50)
    assert np.array_equal(img.values, data)
    assert img.attrs["pixel_scale_arcsec"] == pytest.approx(0.05, rel=1e-9)
    assert img.attrs["units"] == "arcsec"
    w = wcs_from_string(img.attrs["wcs"])
    assert w.wcs.crval[0] == pytest.approx(342.18)
    assert img.attrs["source_file"].endswith("dx.fits")


def test_open_image_errors_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(InputError, match="missing.fits: file not found"):
        open_image(tmp_path / "missing.fits")
    cube = _write(tmp_path / "cube.fits", np.zeros((3, 4, 5)), _header())
    with pytest.raises(InputError, match="no 2-D image"):
        open_image(cube)
    nowcs = _write(tmp_path / "nowcs.fits", np.ones((4, 5)))
    with pytest.raises(InputError, match="nowcs.fits: no celestial WCS"):
        open_image(nowcs)
    allnan = _write(tmp_path / "nan.fits", np.full((40, 50), np.nan), _header())
    with pytest.raises(InputError, match="only NaN"):
        open_image(allnan)


def test_open_lens_maps_pixel_units_and_theta_origin(tmp_path):
    shape = (40, 50)
    h = _header(shape)
    dx = _write(tmp_path / "dx.fits", np.full(shape, 2.0), h)
    dy = _write(tmp_path / "dy.fits", np.full(shape, -1.0), h)
    kappa = _write(tmp_path / "kappa.fits", np.full(shape, 0.3), h)
    lens = open_lens_maps(deflection_x=dx, deflection_y=dy, kappa=kappa,
                          deflection_units="pixel", z_lens=0.348)
    assert np.allclose(lens["alpha_x"], 0.1) and np.allclose(lens["alpha_y"], -0.05)
    assert lens.attrs["normalisation"] == "dls_ds" and lens.attrs["z_lens"] == 0.348
    # θ = 0 at the WCS reference pixel (CRPIX 25.5, 20.5 -> 0-based 24.5, 19.5)
    assert lens["theta_x"].values[0] == pytest.approx(-24.5 * 0.05)
    assert lens["theta_y"].values[0] == pytest.approx(-19.5 * 0.05)
    assert "kappa" in lens and "gamma" not in lens


def test_open_lens_maps_rejects_nan_and_mismatched_grids(tmp_path):
    shape = (40, 50)
    h = _header(shape)
    dx = _write(tmp_path / "dx.fits", np.ones(shape), h)
    holes = np.ones(shape)
    holes[3, 4] = np.nan
    dy_nan = _write(tmp_path / "dy_nan.fits", holes, h)
    with pytest.raises(InputError, match="dy_nan.fits: 1 NaN/inf pixels"):
        open_lens_maps(deflection_x=dx, deflection_y=dy_nan)
    dy_shift = _write(tmp_path / "dy_shift.fits", np.ones(shape), _header(shape, crpix=(30, 20.5)))
    with pytest.raises(InputError, match="not on the same pixel grid"):
        open_lens_maps(deflection_x=dx, deflection_y=dy_shift)
    with pytest.raises(InputError, match="deflection_units"):
        open_lens_maps(deflection_x=dx, deflection_y=dx, deflection_units="deg")

"""Angle, axis and PSF conventions where lensing meets the gradients (FACTS.md §13, issue 21)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from astropy.wcs import WCS

from klever_nb import gradients, lensing, mock
from klever_nb.celestial import wcs_from_string
from klever_nb.errors import InputError
from klever_nb.lensmodels import ParametricLens


def _sis_lens(theta_e=0.9):
    spec = mock.MockSpec(name="sis", redshift=2.0, z_lens=0.5, lens_map_size_arcsec=6.0,
                         lens=ParametricLens(({"type": "SIS", "theta_e": theta_e,
                                               "center_x": 0.0, "center_y": 0.0},)))
    raw = mock.lens_maps(spec)
    return lensing.rescale_lens(raw, z_lens=0.5, z_source=2.0, normalisation="dls_ds")


@pytest.mark.parametrize("pixel", [(30, 100), (61, 61), (95, 20)])
def test_a_sky_position_goes_to_the_closed_form_sis_source_position(pixel):
    """β = θ − θ_E θ/|θ| for an SIS; the sky position enters through the lens WCS."""
    lens = lensing.as_lens_grid(_sis_lens(0.9))
    px, py = pixel
    ra, dec = wcs_from_string(lens.attrs["wcs"]).pixel_to_world_values(px, py)
    theta = np.array([float(lens["theta_x"][px]), float(lens["theta_y"][py])])
    beta = lensing.sky_to_source_arcsec(lens, float(ra), float(dec))
    expected = theta - 0.9 * theta / np.hypot(*theta)
    assert beta == pytest.approx(tuple(expected), abs=2e-3)  # bilinear α on a 0.05" grid


def test_a_sky_position_outside_the_lens_maps_is_one_clear_error():
    lens = _sis_lens()
    ra, dec = WCS(wcs_from_string(lens.attrs["wcs"]).to_header()).pixel_to_world_values(
        -500, -500)
    with pytest.raises(InputError, match="outside the lens maps"):
        lensing.sky_to_source_arcsec(lens, float(ra), float(dec))


def test_the_psf_of_smoothed_maps_adds_the_smoothing_in_quadrature():
    maps = xr.Dataset(attrs={"smooth_fwhm_arcsec": 0.4})
    assert lensing.maps_psf_fwhm_arcsec(0.55, maps) == pytest.approx(np.hypot(0.55, 0.4))
    assert lensing.maps_psf_fwhm_arcsec(0.55, xr.Dataset()) == pytest.approx(0.55)
    assert lensing.maps_psf_fwhm_arcsec(0.55, maps, smooth_fwhm_arcsec=0.0) == 0.55


@pytest.mark.parametrize("angle", [0.0, 45.0, 90.0, 135.0])
def test_source_psf_theta_follows_the_source_position_and_pa_is_theta_minus_90(angle):
    """For an SIS the de-lensed PSF is squeezed tangentially (the magnified direction is
    better resolved): its major axis is radial, at ``angle`` on the source grid for a source
    at polar angle ``angle``. On a north-up,
    east-left lens grid the sky PA is θ − 90° (FACTS.md §13). The annuli get θ."""
    lens = _sis_lens(0.9)
    phi = np.deg2rad(angle)
    beta = (0.3 * np.cos(phi), 0.3 * np.sin(phi))
    psf = lensing.source_plane_psf(lens, position_arcsec=beta, psf_fwhm_arcsec=0.5,
                                   source_pixel_arcsec=0.02, kpc_per_arcsec=8.4)
    delta = (psf["theta_deg"] - angle + 90.0) % 180.0 - 90.0
    assert abs(delta) < 3.0
    assert psf["pa_deg_east_of_north"] == pytest.approx((psf["theta_deg"] - 90.0) % 180.0,
                                                        abs=1e-6)
    summary = {"source_psf_fwhm_kpc": [psf["fwhm_major_kpc"], psf["fwhm_minor_kpc"]],
               "source_psf_theta_deg": psf["theta_deg"]}
    annulus = lensing.annulus_psf(summary)
    assert gradients.psf_axes(annulus)[2] == pytest.approx(psf["theta_deg"] % 180.0)


def test_annulus_psf_needs_the_named_angle():
    with pytest.raises(InputError, match="source_psf_theta_deg"):
        lensing.annulus_psf({"source_psf_fwhm_kpc": [1.0, 0.5], "source_psf_pa_deg": 30.0})

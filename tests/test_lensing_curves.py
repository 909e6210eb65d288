"""Critical curves, caustics and the ray lookup of :mod:`klever_nb.lensing.curves`.

Truth: the SIS closed form (critical curve = circle of radius θ_E, caustic = the point β = 0),
lenstronomy for an SIE (det A = 0 on the curve, its ray shooting and its own critical curves),
and :func:`klever_nb.lensing.delens`'s own bookkeeping for the lookup.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import xarray as xr

from klever_nb import lensing
from klever_nb.lensmodels import ParametricLens

HAS_LENSTRONOMY = importlib.util.find_spec("lenstronomy") is not None
PIXEL = 0.05


def _grid_lens(components, n: int = 121) -> tuple[xr.Dataset, ParametricLens]:
    model = ParametricLens(tuple(components))
    lens = lensing.lens_from_parametric(model, grid_like=((n, n), PIXEL, None),
                                        normalisation="source")
    return lens, model


def test_sis_critical_curve_is_the_einstein_circle_and_the_caustic_a_point():
    theta_e = 1.0
    lens, _ = _grid_lens([{"type": "SIS", "theta_e": theta_e}])
    curves = lensing.critical_curves(lens)
    assert len(curves) == 1
    crit = curves[0]
    assert crit.shape[1] == 2 and len(crit) > 100
    radius = np.hypot(crit[:, 0], crit[:, 1])
    np.testing.assert_allclose(radius, theta_e, atol=2e-3)
    # closed, going all the way round
    angles = np.sort(np.arctan2(crit[:, 1], crit[:, 0]))
    assert np.max(np.diff(angles)) < 0.1
    (caustic,) = lensing.caustics(lens)
    assert caustic.shape == crit.shape
    assert np.hypot(caustic[:, 0], caustic[:, 1]).max() < 3e-3


def test_trace_to_source_is_the_map_at_pixel_centres_and_nan_outside():
    lens, model = _grid_lens([{"type": "SIE", "theta_e": 1.0, "q": 0.7, "pa_deg": 30.0}], n=61)
    tx, ty = np.meshgrid(lens["theta_x"].values, lens["theta_y"].values)
    bx, by = lensing.trace_to_source(lens, tx, ty)
    np.testing.assert_allclose(bx, tx - lens["alpha_x"].values, atol=1e-12)
    np.testing.assert_allclose(by, ty - lens["alpha_y"].values, atol=1e-12)
    # between pixel centres: bilinear, close to the analytic ray shooting away from the centre
    x, y = np.array([0.73, -1.21]), np.array([-0.52, 0.34])
    bx, by = lensing.trace_to_source(lens, x, y)
    ex, ey = model.ray_shoot(x, y)
    np.testing.assert_allclose(bx, ex, atol=2e-3)
    np.testing.assert_allclose(by, ey, atol=2e-3)
    far = lensing.trace_to_source(lens, np.array([10.0]), np.array([0.0]))
    assert np.isnan(far[0]).all() and np.isnan(far[1]).all()


@pytest.mark.skipif(not HAS_LENSTRONOMY, reason="lenstronomy not installed")
def test_sie_critical_curve_and_caustic_agree_with_lenstronomy():
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LensModel.lens_model_extensions import LensModelExtensions

    comps = [{"type": "SIE", "theta_e": 1.0, "q": 0.7, "pa_deg": 30.0},
             {"type": "SHEAR", "gamma1": 0.03, "gamma2": -0.02}]
    lens, model = _grid_lens(comps)
    names, kwargs = model.to_lenstronomy()
    lm = LensModel(names)
    curves = lensing.critical_curves(lens)
    crit = max(curves, key=len)
    # det A = 1/mu of lenstronomy vanishes on the curve (to the linear interpolation between
    # pixel centres: |d det / d theta| ~ 2 per arcsec, so a 1e-3" offset gives ~2e-3)
    inv_mu = 1.0 / lm.magnification(crit[:, 0], crit[:, 1], kwargs)
    assert np.max(np.abs(inv_mu)) < 1e-2
    # the caustic is lenstronomy's ray shooting of those points (bilinear alpha)
    caustic = lensing.caustics(lens, [crit])[0]
    bx, by = lm.ray_shooting(crit[:, 0], crit[:, 1], kwargs)
    np.testing.assert_allclose(caustic[:, 0], bx, atol=2e-3)
    np.testing.assert_allclose(caustic[:, 1], by, atol=2e-3)
    # and the curves are lenstronomy's own critical curve and caustic
    ext = LensModelExtensions(lm)
    ra_c, dec_c, ra_k, dec_k = ext.critical_curve_caustics(kwargs, compute_window=5,
                                                           grid_scale=0.01)
    ref_crit = np.column_stack([np.concatenate(ra_c), np.concatenate(dec_c)])
    ref_caus = np.column_stack([np.concatenate(ra_k), np.concatenate(dec_k)])

    def distance(points, ref):
        d = np.hypot(points[:, None, 0] - ref[None, :, 0], points[:, None, 1] - ref[None, :, 1])
        return d.min(axis=1)

    assert distance(crit, ref_crit).max() < 0.01
    assert distance(caustic, ref_caus).max() < 0.01


def test_lens_at_source_rescales_dls_ds_maps_as_the_reconstruction_does():
    lens, _ = _grid_lens([{"type": "SIS", "theta_e": 1.0}], n=21)
    raw = lens.assign_attrs(normalisation="dls_ds", z_lens=0.5)
    at_source = lensing.lens_at_source(raw, redshift=2.0)
    direct = lensing.rescale_lens(raw, z_lens=0.5, z_source=2.0)
    np.testing.assert_allclose(at_source["alpha_x"].values, direct["alpha_x"].values)
    assert at_source.attrs["normalisation"] == "source"


@pytest.fixture(scope="module")
def reconstruction():
    """A lensed mock's noiseless maps de-lensed with 2x2 rays per pixel."""
    from klever_nb import mock

    galaxy = mock.make_mock(mock.demo_specs()[0])
    spec = galaxy.spec
    lens = lensing.lens_at_source(galaxy.lens_maps, redshift=spec.redshift)
    maps = galaxy.image_maps.sel(line=["Halpha"])
    sb = lensing.rebin_to_lens_grid(maps, lens, cube_wcs=galaxy.cubes["H"].attrs["wcs"])
    source = lensing.delens(sb, lens, subsample=2, source_pixel_arcsec=0.08)
    return lens, sb, source


def test_ray_lookup_holds_the_rays_delens_binned(reconstruction):
    lens, sb, source = reconstruction
    lookup = lensing.ray_lookup(source, lens, ly=sb["ly"].values, lx=sb["lx"].values)
    assert lookup.attrs["subsample"] == 2 and lookup.sizes["ray"] == 4
    # the coverage-weighted count of rays per source pixel is delens's n_image_pixels
    flux = sb["flux"].sel(line="Halpha").values
    cover = np.nan_to_num(sb["coverage"].sel(line="Halpha").values)
    idx = lookup["source_index"].values
    ok = np.isfinite(flux)[..., None] & (idx >= 0) & (cover[..., None] > 0)
    weights = np.broadcast_to(cover[..., None], idx.shape)[ok]
    counts = np.bincount(idx[ok], weights, minlength=source.sizes["xs"] * source.sizes["ys"])
    np.testing.assert_allclose(counts.reshape(source.sizes["ys"], source.sizes["xs"]) / 4,
                               source["n_image_pixels"].sel(line="Halpha").values, atol=1e-9)


def test_landing_and_feeding_pixels_are_inverse(reconstruction):
    lens, sb, source = reconstruction
    lookup = lensing.ray_lookup(source, lens, ly=sb["ly"].values, lx=sb["lx"].values)
    flux = sb["flux"].sel(line="Halpha").values
    row, col = np.unravel_index(np.nanargmax(flux), flux.shape)
    srow, scol = lensing.landing_pixel(lookup, row, col)
    assert srow >= 0
    # most of the pixel's rays fall inside that source pixel's bounds
    pixel = float(source.attrs["source_pixel_arcsec"])
    bx = lookup["beta_x"].values[row, col]
    by = lookup["beta_y"].values[row, col]
    inside = ((np.abs(bx - source["beta_x"].values[scol]) <= pixel / 2 + 1e-12)
              & (np.abs(by - source["beta_y"].values[srow]) <= pixel / 2 + 1e-12))
    assert inside.sum() >= 1
    feeding = lensing.feeding_pixels(lookup, srow, scol)
    assert any((feeding == [row, col]).all(axis=1))
    # every feeding pixel has a ray in the source pixel
    flat = srow * lookup.attrs["nx"] + scol
    for r, c in feeding:
        assert flat in lookup["source_index"].values[r, c]
    # a pixel whose rays all miss the grid lands nowhere
    far = lensing.ray_lookup(source, lens, ly=[0], lx=[0])
    if (far["source_index"].values < 0).all():
        assert lensing.landing_pixel(far, 0, 0) == (-1, -1)


def test_source_plane_kpc_is_the_maps_kpc_frame(reconstruction):
    _, _, source = reconstruction
    x, y = lensing.source_plane_kpc(source, source["beta_x"].values, source["beta_y"].values)
    np.testing.assert_allclose(x, source["xs"].values, atol=1e-12)
    np.testing.assert_allclose(y, source["ys"].values, atol=1e-12)

"""Band registration: known sub-pixel shifts recovered; NaN-aware shifting."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from klever_nb import align


def maps(centre, *, continuum=1.0, line_flux=10.0, shape=(24, 24), seed=0, lines=("Halpha",)):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    blob = np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * 2.0 ** 2))
    n = len(lines)
    flux = np.stack([line_flux * (k + 1) * blob for k in range(n)])
    flux = flux + 0.01 * rng.standard_normal(flux.shape)
    cont = np.stack([continuum * blob] * n) + 0.001 * rng.standard_normal(flux.shape)
    dims = ("line", "y", "x")
    return xr.Dataset({"flux": (dims, flux), "continuum": (dims, cont),
                       "snr": (dims, flux / 0.01), "detected": (dims, flux / 0.01 > 3),
                       "fit_ok": (dims, np.ones(flux.shape, bool)),
                       "n_sky_masked": (dims, np.zeros(flux.shape, int))},
                      coords={"line": list(lines)})


def test_band_offsets_recover_known_sub_pixel_shifts():
    bands = {"H": maps((11.0, 12.0), seed=1), "K": maps((11.6, 11.3), seed=2)}
    offsets = align.band_offsets(bands, reference_band="H")
    assert offsets["H"] == (0.0, 0.0)
    assert offsets["K"][0] == pytest.approx(-0.6, abs=0.05)
    assert offsets["K"][1] == pytest.approx(0.7, abs=0.05)
    assert align.band_position(bands["K"])["method"] == "continuum"


def test_without_continuum_the_brightest_line_is_used():
    ds = maps((9.4, 13.2), continuum=0.0, lines=("NII_6584", "Halpha"))
    pos = align.band_position(ds)
    assert pos["method"] == "line:Halpha"
    assert pos["y"] == pytest.approx(9.4, abs=0.05)
    assert pos["x"] == pytest.approx(13.2, abs=0.05)


def test_shift_then_shift_back_restores_a_smooth_map_and_respects_nans():
    ds = maps((12.0, 12.0))
    moved = align.apply_offsets(ds, (0.4, -0.7))
    assert moved.attrs["alignment_shift_yx"] == [0.4, -0.7]
    pos = align.band_position(moved)
    assert pos["y"] == pytest.approx(12.4, abs=0.05)
    assert pos["x"] == pytest.approx(11.3, abs=0.05)
    # bilinear interpolation conserves the flux away from the edges
    np.testing.assert_allclose(np.nansum(moved.flux.values), np.nansum(ds.flux.values),
                               rtol=1e-3)
    # integer shifts are exact
    back = align.apply_offsets(align.apply_offsets(ds, (2.0, -3.0)), (-2.0, 3.0))
    inner = (slice(None), slice(4, 20), slice(4, 20))
    np.testing.assert_allclose(back.flux.values[inner], ds.flux.values[inner], atol=1e-12)
    # a NaN spreads only to the pixels it feeds
    ds["flux"].values[0, 5, 5] = np.nan
    moved = align.apply_offsets(ds, (0.5, 0.5))
    assert np.isnan(moved.flux.values).sum() <= 4 + 2 * 24  # the hole + the far edges
    assert not moved.fit_ok.values[0][np.isnan(moved.flux.values[0])].any()
    assert moved.n_sky_masked.dtype.kind == "i"


def test_dict_interface_and_bad_reference():
    bands = {"H": maps((11.0, 12.0)), "K": maps((11.5, 11.0))}
    offsets = align.band_offsets(bands)
    shifted = align.apply_offsets(bands, offsets)
    positions = {b: align.band_position(ds) for b, ds in shifted.items()}
    assert positions["H"]["y"] == pytest.approx(positions["K"]["y"], abs=0.05)
    assert positions["H"]["x"] == pytest.approx(positions["K"]["x"], abs=0.05)
    with pytest.raises(Exception, match="reference_band"):
        align.band_offsets(bands, reference_band="J")


def test_lensed_arc_with_two_near_equal_knots_is_registered_by_its_whole_shape():
    """Peak alignment jumps between the knots of an arc; the cross-correlation does not."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:24, 0:24].astype(float)

    def arc(dy, dx):
        angle = np.arctan2(yy - 4.0 - dy, xx - 12.0 - dx)
        radius = np.hypot(yy - 4.0 - dy, xx - 12.0 - dx)
        ring = np.exp(-0.5 * ((radius - 10.0) / 1.2) ** 2) * np.exp(-0.5 * (angle - 1.57) ** 2)
        knots = sum(np.exp(-((yy - 4.0 - dy - 10 * np.sin(a)) ** 2
                             + (xx - 12.0 - dx - 10 * np.cos(a)) ** 2) / 2.0)
                    for a in (1.1, 2.05))
        return ring + knots

    truth = (0.6, -0.4)
    ref = arc(0.0, 0.0) + 0.03 * rng.standard_normal(yy.shape)
    img = arc(-truth[0], -truth[1]) + 0.03 * rng.standard_normal(yy.shape)
    dy, dx = align.cross_correlation_shift(ref, img)
    assert abs(dy - truth[0]) < 0.15 and abs(dx - truth[1]) < 0.15

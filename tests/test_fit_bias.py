"""Flux pulls of the unsmoothed per-spaxel fit on a strongly lensed mock (no bias at low SNR).

A colleague measured faint YJ lines biased low before commit 9c0c0c3 ([OIII]5007 mean pull
-0.59 at true SNR 1-3, Hbeta -0.55); on the current fit path they are unbiased (6 SIS mocks:
[OIII]5007 -0.01 / -0.10, Hbeta +0.01 / -0.13 at SNR 1-3 / 3-10), and this guards it. The
ratio-bounded [SII] doublet had per-line errors 2.5x too small where the split sat on a
bound ([SII]6717 pull -2.5 at SNR 3-10, -0.48 at 1-3): fixed in ``fitting.cube``.
"""

from __future__ import annotations

import numpy as np
import pytest

from klever_nb.fitting import fit_galaxy
from klever_nb.lensmodels import ParametricLens
from klever_nb.mock import MockSpec, make_mock

BINS = ((1.0, 3.0), (3.0, 10.0))
MIN_SPAXELS = 20
BOUNDED_PAIR = ("SII_6717", "SII_6731")
#: YJ and H lines of a z ~ 1.4 source. Not [SIII] (K): all its spaxels get forced kinematics
#: and it stays ~0.2 low at SNR 1-3 (flux 0.85x; not fixed here).
LINES = ("Hbeta", "OIII_4959", "OIII_5007", "NII_6548", "Halpha", "NII_6584", *BOUNDED_PAIR)


OFFSETS = ((0.35, 0.0), (0.4, 0.2), (0.0, 0.5))  # source 0.35-0.5" from the lens


@pytest.fixture(scope="module")
def lensed_fit():
    """Three SIS mocks (~1.5 s each), pooled: one mock's SNR 1-3 bin has ~80 spaxels and
    spatially correlated errors, so its mean pull scatters by ~0.15 around the truth."""
    lens = ParametricLens(({"type": "SIS", "theta_e": 1.0, "center_x": 0.0, "center_y": 0.0},))
    out = []
    for seed, offset in enumerate(OFFSETS):
        spec = MockSpec(name="bias", redshift=1.38 + 0.03 * seed, shape=(30, 30), lens=lens,
                        z_lens=0.5, centre_offset_arcsec=offset, snr_halpha_peak=25.0,
                        seed=seed, halpha_flux=4e-17, scale_length_kpc=1.2)
        galaxy = make_mock(spec)
        # no cube offsets: the true band shift is 0, so unregistered maps are in the truth's frame
        maps, _ = fit_galaxy(galaxy.cubes, redshift=spec.redshift, smooth_fwhm_arcsec=0.0,
                             align=False)
        out.append((maps, galaxy.image_maps.flux))
    return out


def _pulls(fits, line):
    pooled = {}
    for maps, truth in fits:
        for key, pull in _pulls_one(maps, truth, line).items():
            pooled.setdefault(key, []).append(pull)
    return {k: np.concatenate(v) for k, v in pooled.items()
            if sum(p.size for p in v) >= MIN_SPAXELS}


def _pulls_one(maps, truth, line):
    scale = 1e20 if "1e-20" in maps.flux.attrs["units"] else 1.0
    fit = maps.flux.sel(line=line).values
    err = maps.flux_err.sel(line=line).values
    true = truth.sel(line=line).values * scale
    ok = np.isfinite(fit) & np.isfinite(err) & (err > 0)
    snr = np.where(ok, true / np.where(ok, err, 1.0), np.nan)
    out = {}
    for lo, hi in BINS:
        sel = ok & (snr >= lo) & (snr < hi)
        if sel.any():
            out[(lo, hi)] = (fit[sel] - true[sel]) / err[sel]
    return out


def test_lensed_mock_pulls_unbiased_at_low_snr(lensed_fit):
    maps, truth = lensed_fit[0]
    checked = []
    for line in LINES:
        assert line in maps.line.values and line in truth.line.values
        for (lo, hi), pull in _pulls(lensed_fit, line).items():
            label = f"{line} SNR {lo:g}-{hi:g} (n={pull.size})"
            checked.append(label)
            assert abs(pull.mean()) <= 0.2, f"{label}: mean pull {pull.mean():+.2f}"
            # a bounded doublet's split is truncated by its bounds: scatter below the
            # free-ratio error is expected there, never above
            lo_std = 0.5 if line in BOUNDED_PAIR else 0.8
            assert lo_std <= pull.std() <= 1.2, f"{label}: pull std {pull.std():.2f}"
    for line in ("Hbeta", "OIII_5007", "Halpha"):
        assert any(c.startswith(f"{line} SNR 1-3") for c in checked), checked
        assert any(c.startswith(f"{line} SNR 3-10") for c in checked), checked


def test_bounded_doublet_errors_not_tied_to_the_bound(lensed_fit):
    """Where the [SII] split sits on a bound, err_6717 = bound * err_6731 ignored the free split."""
    maps, _ = lensed_fit[0]
    a, b = (maps.sel(line=n) for n in BOUNDED_PAIR)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = (a.flux / b.flux).values
        err_ratio = (a.flux_err / b.flux_err).values
    on_low = np.isfinite(ratio) & np.isclose(ratio, 0.4, atol=1e-6)
    assert on_low.sum() >= 5
    assert np.all(err_ratio[on_low] > 0.6)

"""BPT demarcation lines at tabulated points and per-pixel classes (FACTS.md §2)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr

from klever_nb.bpt import (
    AGN,
    COMPOSITE,
    STAR_FORMING,
    UNDETERMINED,
    bpt_classify,
    kauffmann03_n2,
    kewley01_n2,
    kewley01_s2,
)


@pytest.mark.parametrize("func, x, y", [
    (kewley01_n2, 0.0, 0.61 / -0.47 + 1.19),     # -0.1079
    (kewley01_n2, -1.0, 0.61 / -1.47 + 1.19),    # 0.7750
    (kewley01_n2, 0.2, 0.61 / -0.27 + 1.19),
    (kewley01_s2, 0.0, 0.72 / -0.32 + 1.30),     # -0.95
    (kewley01_s2, -0.5, 0.72 / -0.82 + 1.30),
    (kauffmann03_n2, -0.5, 0.61 / -0.55 + 1.30),  # 0.1909
    (kauffmann03_n2, -1.0, 0.61 / -1.05 + 1.30),
])
def test_demarcation_lines_at_tabulated_points(func, x, y):
    assert float(func(x)) == pytest.approx(y, abs=1e-12)


def test_lines_undefined_right_of_their_asymptotes():
    assert np.isnan(kewley01_n2(0.47)) and np.isnan(kauffmann03_n2(0.1))
    assert np.isnan(kewley01_s2(0.5))
    assert float(kewley01_n2(-0.5)) == pytest.approx(0.61 / -0.97 + 1.19)


def make_maps(points, snr=50.0):
    """points: list of (log N2, log S2, log O3) -> (line, pix) fluxes with Ha = Hb = 1."""
    n2, s2, o3 = (np.array(c, dtype=float) for c in zip(*points, strict=True))
    flux = np.stack([np.ones_like(n2), 10**o3, np.ones_like(n2), 10**n2, 0.5 * 10**s2,
                     0.5 * 10**s2])
    names = ["Hbeta", "OIII_5007", "Halpha", "NII_6584", "SII_6717", "SII_6731"]
    maps = xr.Dataset({"flux": (("line", "pix"), flux), "flux_err": (("line", "pix"), flux / snr)},
                      coords={"line": names})
    return maps


def test_classes_of_known_points():
    points = [
        (-1.0, -1.0, 0.3),   # SF in both (below Kauffmann: 0.719; Kewley S2: 0.774)
        (-0.3, -1.0, 0.3),   # N2: between Ka03 (-0.400) and Ke01 (0.428): composite
        (-0.3, -1.0, 0.6),   # N2 above Ke01 (0.428): AGN
        (0.6, -0.6, 0.0),    # right of the N2 asymptote: AGN; S2 below Ke01 (0.517): SF
        (-1.0, 0.4, 0.0),    # S2 right of its asymptote: AGN in S2
    ]
    out = bpt_classify(make_maps(points))
    assert out["class_n2"].values.tolist() == [STAR_FORMING, COMPOSITE, AGN, AGN, STAR_FORMING]
    assert out["class_s2"].values.tolist() == [STAR_FORMING, STAR_FORMING, STAR_FORMING,
                                               STAR_FORMING, AGN]
    assert out["agn"].values.tolist() == [False, False, True, True, True]
    assert np.allclose(out["log_n2"], [p[0] for p in points])
    assert "AGN" in out.attrs["legend"]


def test_low_snr_or_bad_lines_are_undetermined():
    maps = make_maps([(-1.0, -1.0, 0.3)] * 3)
    maps["flux_err"].loc[dict(line="NII_6584", pix=0)] = 1.0  # SNR 0.1
    maps["flux"].loc[dict(line="Hbeta", pix=1)] = np.nan
    maps["flux"].loc[dict(line="SII_6717", pix=2)] = -1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = bpt_classify(maps)
    assert out["class_n2"].values.tolist() == [UNDETERMINED, UNDETERMINED, STAR_FORMING]
    assert out["class_s2"].values.tolist() == [STAR_FORMING, UNDETERMINED, UNDETERMINED]
    assert not out["agn"].any()


def test_missing_lines_make_a_diagram_undetermined():
    maps = make_maps([(-1.0, -1.0, 0.3)]).sel(line=["Hbeta", "OIII_5007", "Halpha", "NII_6584"])
    out = bpt_classify(maps)
    assert out["class_n2"].values.tolist() == [STAR_FORMING]
    assert out["class_s2"].values.tolist() == [UNDETERMINED]

"""Calibrations as data: coefficients, tabulated turnovers and spans (FACTS.md §1.3-1.6)."""

from __future__ import annotations

import numpy as np
import pytest

from klever_nb.calibrations import calibration_sets, get_calibration, register_calibration_file
from klever_nb.errors import ConfigError

# FACTS.md §1.3 (C20 Table 2: three codes agree digit for digit), with sigma (1-SRC).
C20_TABLE = {
    "R2": ([0.435, -1.362, -5.655, -4.851, -0.478, 0.736], 0.10),
    "R3": ([-0.277, -3.549, -3.593, -0.981], 0.07),
    "O3O2": ([-0.691, -2.944, -1.308], 0.14),
    "R23": ([0.527, -1.569, -1.652, -0.421], 0.12),
    "N2": ([-0.489, 1.513, -2.554, -5.293, -2.867], 0.10),
    "O3N2": ([0.281, -4.765, -2.268], 0.09),
    "S2": ([-0.442, -0.360, -6.271, -8.339, -3.559], 0.06),
    "RS32": ([-0.054, -2.546, -1.970, 0.082, 0.222], 0.08),
    "O3S2": ([0.191, -4.292, -2.538, 0.053, 0.332], 0.11),
}

# FACTS.md §1.4: (extremum position, value) inside 7.0-9.3, and log R span over 7.6-8.9.
TURNOVERS = {
    "R2": (8.542, 0.528, -0.324, 0.528),
    "R3": (8.003, 0.784, -1.190, 0.783),
    "R23": (8.067, 0.965, 0.121, 0.965),
    "RS32": (7.999, 0.788, -0.674, 0.788),
    "S2": (8.660, -0.437, -1.725, -0.437),
    "N2": (8.871, -0.333, -2.365, -0.333),
    "O3O2": (7.565, 0.966, -1.367, 0.964),
    "O3N2": (7.640, 2.784, -0.820, 2.784),
}


@pytest.mark.parametrize("name", sorted(C20_TABLE))
def test_c20_coefficients_and_sigma_match_table_2(name):
    cal = get_calibration(name, set_name="C20")
    coeffs, sigma = C20_TABLE[name]
    assert cal.coefficients == pytest.approx(coeffs, abs=0)
    assert cal.sigma == sigma
    assert (cal.oh_min, cal.oh_max) == (7.6, 8.9)
    assert cal.x_offset == 8.69


@pytest.mark.parametrize("name", sorted(C20_TABLE))
def test_c20_polynomial_values_by_hand(name):
    cal = get_calibration(name, set_name="C20")
    coeffs, _ = C20_TABLE[name]
    for oh in (7.7, 8.0, 8.69, 8.85):
        x = oh - 8.69
        by_hand = sum(c * x**n for n, c in enumerate(coeffs))
        assert float(cal.log_ratio(oh)) == pytest.approx(by_hand, abs=1e-12)
    assert float(cal.log_ratio(8.69)) == coeffs[0]  # x = 0 gives c0


@pytest.mark.parametrize("name", sorted(TURNOVERS))
def test_c20_turnovers_and_spans_match_facts_table(name):
    cal = get_calibration(name, set_name="C20")
    x_peak, y_peak, span_lo, span_hi = TURNOVERS[name]
    fine = np.linspace(7.0, 9.3, 230_001)
    values = cal.log_ratio(fine)
    assert fine[np.argmax(values)] == pytest.approx(x_peak, abs=0.0015)
    assert values.max() == pytest.approx(y_peak, abs=0.0015)
    inside = cal.log_ratio(np.linspace(7.6, 8.9, 13_001))
    assert inside.min() == pytest.approx(span_lo, abs=0.0015)
    assert inside.max() == pytest.approx(span_hi, abs=0.0015)


def test_o3s2_is_monotonic_over_the_range():
    values = get_calibration("O3S2").log_ratio(np.linspace(7.6, 8.9, 1301))
    assert np.all(np.diff(values) < 0)
    assert values[0] == pytest.approx(2.254, abs=0.0015)
    assert values[-1] == pytest.approx(-0.821, abs=0.0015)


def test_c17_shares_c20_except_r2():
    for name in ("R3", "O3O2", "R23", "N2", "O3N2"):
        assert get_calibration(name, set_name="C17").coefficients == get_calibration(name, set_name="C20").coefficients
    assert get_calibration("R2", set_name="C17").coefficients == (0.418, -0.961, -3.505, -1.949)
    assert get_calibration("R2", set_name="C20").coefficients != get_calibration("R2", set_name="C17").coefficients
    with pytest.raises(ConfigError, match="S2"):
        get_calibration("S2", set_name="C17")


def test_m08_coefficients_facts_1_6():
    assert get_calibration("R23", set_name="M08").coefficients == (0.7462, -0.7149, -0.9401, -0.6154,
                                                          -0.2524)
    assert get_calibration("N2", set_name="M08").coefficients == (-0.7732, 1.2357, -0.2811, -0.7201,
                                                         -0.3330)


def test_user_can_register_a_calibration_set(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "MINE"\noh_min = 7.5\noh_max = 9.0\n'
                    '[diagnostics.R3]\ncoefficients = [0.1, -1.0]\nsigma = 0.05\n')
    assert register_calibration_file(path) == "MINE"
    assert "MINE" in calibration_sets()
    cal = get_calibration("R3", set_name="MINE")
    assert float(cal.log_ratio(8.69 + 0.5)) == pytest.approx(0.1 - 0.5)
    assert cal.sigma == 0.05 and cal.oh_min == 7.5


def test_unknown_set_or_diagnostic_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown calibration set"):
        get_calibration("R3", set_name="NOPE")
    with pytest.raises(ConfigError, match="no diagnostic"):
        get_calibration("XYZ", set_name="C20")

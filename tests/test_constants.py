"""Constants once: every number of klever_nb.constants is written there only, and used.

The source scan keeps the known duplicates (FWHM/sigma, doublet ratios, the forward-model
diagnostics, SNR thresholds typed as literals) from coming back.
"""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import numpy as np
import pytest

import klever_nb
from klever_nb import constants

PACKAGE = Path(klever_nb.__file__).parent
SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "constants.py")

#: (pattern, what it duplicates); matched line by line in every package module but constants.py.
FORBIDDEN = (
    (r"2\.354", "FWHM_PER_SIGMA"),
    (r"sqrt\(\s*(2|8)(\.0)?\s*\*\s*(np|math)\.log\(\s*2(\.0)?\s*\)\s*\)", "FWHM_PER_SIGMA"),
    (r"\b(SII|OII)_\d{4}_(TO_)?\d{4}\s*=\s*[0-9]", "SII_6717_6731 / OII_3729_3727"),
    (r"""["']N2["'],\s*["']R3["'],\s*["']S2["'],\s*["']R2["']""", "FORWARD_DIAGNOSTICS"),
    # an SNR threshold typed as a number (a default or a module constant)
    (r"(?<![\w.])(?!kinematics_snr|snr_halpha_peak|CONTINUUM_DETECTION_SNR)"
     r"\w*(snr|SNR)\w*\s*(:\s*float\s*)?=\s*[0-9]", "the SNR thresholds"),
)
# Allowed above: FitSettings.kinematics_snr (a fit setting of klever_nb.fitting), the mock's
# input snr_halpha_peak (not a threshold), pipeline's continuum-detection cut for alignment.


def _offences(pattern: str) -> list[str]:
    regex = re.compile(pattern)
    hits = []
    for path in SOURCES:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if regex.search(line):
                hits.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    return hits


@pytest.mark.parametrize(("pattern", "constant"), FORBIDDEN)
def test_no_copy_of_a_constant_in_the_package(pattern, constant):
    hits = _offences(pattern)
    assert not hits, f"use klever_nb.constants.{constant} instead of:\n" + "\n".join(hits)


def test_the_scan_catches_the_old_copies():
    old = {
        "_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))": 1,
        "sigma = fwhm / np.sqrt(8 * np.log(2))": 1,
        "fwhm / 2.3548": 0,
        "SII_6717_6731 = 1.3": 2,
        "OII_3729_TO_3727 = 1.3": 2,
        'if d in {"N2", "R3", "S2", "R2"}': 3,
        "snr_min: float = 3.0,": 4,
        "CHOICE_SNR = 3.0": 4,
    }
    for line, index in old.items():
        assert re.search(FORBIDDEN[index][0], line), line
    for allowed in ("    kinematics_snr: float = 5.0", "snr_halpha_peak=25.0",
                    "    ex.snr_threshold = 5.0", "snr_min: float = SFR_SNR"):
        assert not re.search(FORBIDDEN[4][0], allowed), allowed


def test_fwhm_per_sigma_value():
    assert constants.FWHM_PER_SIGMA == pytest.approx(2.3548200450309493, rel=1e-15)
    assert constants.FWHM_PER_SIGMA == 2.0 * math.sqrt(2.0 * math.log(2.0))


def test_doublet_ratios_are_one_density_inside_the_fit_bounds():
    """pyneb 1.1.32, T = 1e4 K, n_e = 100 cm^-3: [SII] 1.351, [OII] 1.349 (FACTS.md §7)."""
    assert constants.SII_6717_6731 == pytest.approx(1.351, abs=0.005)
    assert constants.OII_3729_3727 == pytest.approx(1.349, abs=0.005)
    bounds = {(b.numerator, b.denominator): (b.lo, b.hi) for b in constants.BOUNDED_RATIOS}
    lo, hi = bounds[("SII_6717", "SII_6731")]
    assert lo < constants.SII_6717_6731 < hi
    lo, hi = bounds[("OII_3729", "OII_3727")]
    assert lo < constants.OII_3729_3727 < hi


def test_mock_and_metallicity_forward_model_split_doublets_alike():
    from klever_nb.metallicity import predicted_line_fluxes
    from klever_nb.mock import line_ratios_to_halpha

    oh = np.array([7.9, 8.4, 8.7])
    model = predicted_line_fluxes(oh)
    mock = line_ratios_to_halpha(oh)
    for num, den, ratio in (("SII_6717", "SII_6731", constants.SII_6717_6731),
                            ("OII_3729", "OII_3727", constants.OII_3729_3727)):
        assert np.allclose(model.sel(line=num) / model.sel(line=den), ratio, rtol=1e-12)
        assert np.allclose(mock[num] / mock[den], ratio, rtol=1e-12)


def test_forward_diagnostics_defined_once():
    from klever_nb.gradients import forward as forward_gradient

    assert forward_gradient.FORWARD_DIAGNOSTICS is constants.FORWARD_DIAGNOSTICS
    from klever_nb.gradients import DIAGNOSTIC_LINES

    assert set(constants.FORWARD_DIAGNOSTICS) <= set(DIAGNOSTIC_LINES)


def _default(func, name):
    return inspect.signature(func).parameters[name].default


def test_snr_defaults_are_the_constants():
    from klever_nb import dust, metallicity, ratios, sfr
    from klever_nb.lensing import delensing, magnification, reconstruct

    assert _default(magnification.magnification_halpha, "snr_min") == constants.MAGNIFICATION_SNR
    assert _default(reconstruct.reconstruct_source_plane, "snr_min") == \
        constants.MAGNIFICATION_SNR
    assert _default(delensing.delens, "footprint_snr") == constants.DETECTION_SNR
    assert _default(sfr.total_halpha, "snr_min") == constants.SFR_SNR
    assert _default(dust.balmer_ebv, "min_snr_hbeta") == constants.BALMER_SNR
    assert _default(metallicity.metallicity_map, "min_snr_hbeta") == constants.BALMER_SNR
    assert _default(metallicity.choose_diagnostics, "min_snr") == constants.DETECTION_SNR
    assert _default(metallicity.metallicity_map, "snr_min_strong") == \
        constants.METALLICITY_SNR_STRONG
    assert _default(ratios.observed_log_ratio, "snr_min_weak") == constants.METALLICITY_SNR_WEAK

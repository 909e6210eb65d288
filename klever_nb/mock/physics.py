"""Source-plane physics of the mocks: line ratios, dust screen, the exponential disc.

See :mod:`klever_nb.mock` for the model and its conventions.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np

from klever_nb import constants, cosmology
from klever_nb.calibrations import get_calibration
from klever_nb.mock.spec import (
    CALIBRATION_SET,
    MOCK_LINES,
    OII_3729_TO_3727,
    SII_6717_TO_6731,
    SIII_9531_TO_HALPHA,
    MockSpec,
)

# ---------------------------------------------------------------------------
# Source-plane physics
# ---------------------------------------------------------------------------


def line_ratios_to_halpha(oh: np.ndarray | float, *, calibration_set: str = CALIBRATION_SET
                          ) -> dict[str, np.ndarray]:
    """Intrinsic (dust-free) flux ratio of every mock line to Halpha at 12+log(O/H) = ``oh``.

    N2 -> [NII]6584/Ha, R3 -> [OIII]5007/Hb, S2 -> [SII]6717+6731/Ha (split 1.35:1),
    O3O2 -> [OIII]5007/[OII]3727+3729 (split 1:1.35), Hb = Ha/2.87, [OIII]4959, [NII]6548 and
    [SIII]9069 from the fixed ratios, [SIII]9531/Ha = :data:`SIII_9531_TO_HALPHA`.

    Examples
    --------
    >>> r = line_ratios_to_halpha(8.69)
    >>> round(float(np.log10(r["NII_6584"])), 3)   # C20 N2 at solar: c0
    -0.489

    References
    ----------
    FACTS.md §1.2-1.3 (C20 Table 2), §7; K20 §3.3 (Halpha/Hbeta = 2.87).
    """
    oh = np.asarray(oh, dtype=float)

    def ratio(diag: str) -> np.ndarray:
        return 10.0 ** get_calibration(diag, set_name=calibration_set).log_ratio(oh)

    hbeta = np.full(oh.shape, 1.0 / constants.BALMER_INTRINSIC)
    oiii = hbeta * ratio("R3")
    nii = ratio("N2")
    sii = ratio("S2")
    oii = oiii / ratio("O3O2")
    siii = np.full(oh.shape, SIII_9531_TO_HALPHA)
    return {
        "OII_3727": oii / (1.0 + OII_3729_TO_3727),
        "OII_3729": oii * OII_3729_TO_3727 / (1.0 + OII_3729_TO_3727),
        "Hbeta": hbeta,
        "OIII_4959": oiii / constants.OIII_RATIO,
        "OIII_5007": oiii,
        "NII_6548": nii / constants.NII_RATIO,
        "Halpha": np.ones(oh.shape),
        "NII_6584": nii,
        "SII_6717": sii * SII_6717_TO_6731 / (1.0 + SII_6717_TO_6731),
        "SII_6731": sii / (1.0 + SII_6717_TO_6731),
        "SIII_9069": siii / constants.SIII_RATIO,
        "SIII_9531": siii,
    }


@cache
def dust_transmission(line: str, ebv: float) -> float:
    """Fraction 10^(-0.4 k(lambda) E(B-V)) of a line's flux passing a CCM89 (R_V = 3.1) screen.

    References
    ----------
    Cardelli, Clayton & Mathis 1989; FACTS.md §5 (dust_extinction CCM89, vacuum wavelengths).
    """
    import astropy.units as u
    from dust_extinction.parameter_averages import CCM89

    k = float(CCM89(Rv=constants.R_V)(constants.LINES[line].wave_vac * u.AA)) * constants.R_V
    return 10.0 ** (-0.4 * k * ebv)


def oh_range() -> tuple[float, float]:
    """Validity range of the calibrations the mocks use (the clip applied to the O/H map)."""
    cals = [get_calibration(d, set_name=CALIBRATION_SET) for d in ("N2", "R3", "S2", "O3O2")]
    return max(c.oh_min for c in cals), min(c.oh_max for c in cals)


def disc_model(spec: MockSpec, beta_x: np.ndarray, beta_y: np.ndarray
               ) -> dict[str, np.ndarray]:
    """Source-plane quantities of the mock disc at source positions (arcsec from field centre).

    Returns
    -------
    dict
        ``sb`` intrinsic Halpha surface brightness (erg/s/cm2/arcsec2, before dust),
        ``radius_kpc`` (deprojected), ``oh`` (12+log(O/H), clipped to :func:`oh_range`),
        ``velocity`` (line of sight, km/s).

    Notes
    -----
    Sigma(R) = F / (2 pi h^2 cos i) exp(-R/h) integrates to ``halpha_flux`` over the sky.
    """
    kpc = cosmology.kpc_per_arcsec(spec.redshift)
    cx, cy = spec.centre_offset_arcsec
    phi = math.radians(spec.pa_deg)
    cos_i = math.cos(math.radians(spec.inclination_deg))
    sin_i = math.sin(math.radians(spec.inclination_deg))
    dx = np.asarray(beta_x, dtype=float) - cx
    dy = np.asarray(beta_y, dtype=float) - cy
    x_major = math.cos(phi) * dx + math.sin(phi) * dy
    y_minor = -math.sin(phi) * dx + math.cos(phi) * dy
    r_arcsec = np.hypot(x_major, y_minor / cos_i)
    h_arcsec = spec.scale_length_kpc / kpc
    sb = spec.halpha_flux / (2.0 * np.pi * h_arcsec**2 * cos_i) * np.exp(-r_arcsec / h_arcsec)
    radius_kpc = r_arcsec * kpc
    lo, hi = oh_range()
    oh = np.clip(spec.central_oh + spec.gradient_dex_per_kpc * radius_kpc, lo, hi)
    v_circ = spec.v_max_kms * 2.0 / np.pi * np.arctan(radius_kpc / spec.v_turnover_kpc)
    cos_theta = np.where(r_arcsec > 0, x_major / np.where(r_arcsec > 0, r_arcsec, 1.0), 0.0)
    return {"sb": sb, "radius_kpc": radius_kpc, "oh": oh, "velocity": v_circ * sin_i * cos_theta}


def _line_sb(spec: MockSpec, disc: dict[str, np.ndarray],
             names: tuple[str, ...] = MOCK_LINES) -> np.ndarray:
    """Observed (dust-attenuated) surface brightness of the named lines, stacked on axis 0."""
    ratios = line_ratios_to_halpha(disc["oh"])
    return np.stack([disc["sb"] * ratios[name] * dust_transmission(name, spec.ebv)
                     for name in names])

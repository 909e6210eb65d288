"""Physical constants, line catalogue, instrument bands and cosmology, each with its source.

Every number the science needs lives here (or in ``klever_nb/data``) once, with
the section of ``FACTS.md`` or of the paper (Curti et al. 2020, MNRAS 492, 821;
"K20") it comes from. Code elsewhere imports these names; it never retypes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache

from astropy.cosmology import FlatLambdaCDM

#: Speed of light in km/s (CODATA, exact).
C_KMS = 299_792.458

# ---------------------------------------------------------------------------
# Cosmology (K20 §1; FACTS.md §10): flat, H0 = 67.8, Omega_m = 0.308.
# ---------------------------------------------------------------------------
#: The paper's cosmology. Used for kpc/arcsec, luminosity distances and D_ls/D_s.
COSMOLOGY = FlatLambdaCDM(H0=67.8, Om0=0.308, name="K20 (H0=67.8, Om0=0.308)")

#: Cosmology of Speagle+14 for the age of the Universe in the SFMS (FACTS.md §3).
SPEAGLE_COSMOLOGY = FlatLambdaCDM(H0=70.0, Om0=0.3, name="Speagle+14 (70, 0.3)")


# ---------------------------------------------------------------------------
# Emission lines (vacuum rest wavelengths in Angstrom; FACTS.md §6)
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Line:
    """One emission line of the catalogue.

    Attributes
    ----------
    name : str
        Identifier used as the ``line`` coordinate (e.g. ``"Halpha"``).
    wave_vac : float
        Vacuum rest wavelength in Angstrom.
    group : str
        Kinematic tie group: lines of one group share velocity and width
        within a band (K20 §3.1).
    label : str
        Human-readable label for plots.
    source : str
        Where the wavelength comes from.
    """

    name: str
    wave_vac: float
    group: str
    label: str
    source: str = "FACTS.md §6 (pyneb 1.1.32 air -> vacuum, SDSS vacuum list)"


_LINE_LIST = [
    Line("OII_3727", 3727.09, "oii", "[OII]3726"),
    Line("OII_3729", 3729.88, "oii", "[OII]3729"),
    Line("NeIII_3869", 3869.86, "neiii", "[NeIII]3869",
         "NIST air 3868.76 A -> vacuum (Morton 2000)"),
    Line("Hgamma", 4341.69, "oiii", "Hgamma", "NIST air 4340.47 A -> vacuum (Morton 2000)"),
    Line("Hbeta", 4862.69, "oiii", "Hbeta"),
    Line("OIII_4959", 4960.30, "oiii", "[OIII]4959"),
    Line("OIII_5007", 5008.24, "oiii", "[OIII]5007"),
    Line("OI_6300", 6302.05, "halpha", "[OI]6300", "NIST air 6300.30 A -> vacuum (Morton 2000)"),
    Line("NII_6548", 6549.86, "halpha", "[NII]6548"),
    Line("Halpha", 6564.61, "halpha", "Halpha"),
    Line("NII_6584", 6585.27, "halpha", "[NII]6584"),
    Line("SII_6717", 6718.29, "halpha", "[SII]6717"),
    Line("SII_6731", 6732.67, "halpha", "[SII]6731"),
    Line("SIII_9069", 9071.1, "siii", "[SIII]9069"),
    Line("SIII_9531", 9533.2, "siii", "[SIII]9531"),
    Line("Pabeta", 12821.59, "pabeta", "Pabeta", "NIST air 12818.08 A -> vacuum (Morton 2000)"),
    Line("Paalpha", 18756.13, "paalpha", "Paalpha", "NIST air 18751.01 A -> vacuum (Morton 2000)"),
]

#: The line catalogue keyed by name, in order of wavelength.
LINES: dict[str, Line] = {line.name: line for line in _LINE_LIST}

#: The lines K20 fits (§3.1); the default set of the per-galaxy pipeline.
PAPER_LINES = (
    "OII_3727", "OII_3729", "Hbeta", "OIII_4959", "OIII_5007", "NII_6548",
    "Halpha", "NII_6584", "SII_6717", "SII_6731", "SIII_9069", "SIII_9531",
)


@dataclass(frozen=True)
class FixedRatio:
    """``weak`` line flux = ``strong`` line flux / ``ratio`` (integrated fluxes)."""

    weak: str
    strong: str
    ratio: float
    source: str


@dataclass(frozen=True)
class BoundedRatio:
    """``lo <= flux(numerator) / flux(denominator) <= hi`` (integrated fluxes)."""

    numerator: str
    denominator: str
    lo: float
    hi: float
    source: str


#: [OIII]5007/4959 (FACTS.md §7: pyneb 2.984; K20 §3.1 writes "3"; FACTS §11.1 default 2.98).
OIII_RATIO = 2.98
#: [NII]6584/6548 (FACTS.md §7: pyneb 2.942).
NII_RATIO = 2.94
#: [SIII]9531/9069 (K20 §3.1: 2.47; pyneb 2.469).
SIII_RATIO = 2.47

FIXED_RATIOS = (
    FixedRatio("OIII_4959", "OIII_5007", OIII_RATIO, "FACTS.md §7, §11.1 (K20 §3.1 rounds to 3)"),
    FixedRatio("NII_6548", "NII_6584", NII_RATIO, "FACTS.md §7 (pyneb 1.1.32, FFT04)"),
    FixedRatio("SIII_9069", "SIII_9531", SIII_RATIO, "K20 §3.1; FACTS.md §7"),
)

#: [SII]6717/6731 and [OII]3729/3727 of the forward models (mock cubes,
#: :func:`klever_nb.metallicity.predicted_line_fluxes`): pyneb 1.1.32 default atomic data
#: (S II RGJ19+TZ10, O II Z82-WFD96+Kal09) at FACTS.md §7's reference conditions
#: T = 1e4 K, n_e = 100 cm^-3 (computed here: 1.351 and 1.349; the same pyneb run gives the
#: §7 density limits 1.454/1.499 at n_e = 1 and 0.447/0.353 at 1e5). Both doublets at one
#: density, inside K20's fit bounds (:data:`BOUNDED_RATIOS`).
SII_6717_6731 = 1.35
OII_3729_3727 = 1.35

BOUNDED_RATIOS = (
    BoundedRatio("SII_6717", "SII_6731", 0.4, 1.45, "K20 §3.1; FACTS.md §7"),
    BoundedRatio("OII_3729", "OII_3727", 0.35, 1.5,
                 "FACTS.md §7 density limits (pyneb: 0.347 at 1e6 cm^-3, 1.499 at 1 cm^-3)"),
)

# ---------------------------------------------------------------------------
# Instruments and bands (K20 §2, §3.1; FACTS.md §8)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Band:
    """A grating/band of an IFU spectrograph.

    Attributes
    ----------
    name : str
        Band name (``"YJ"``, ``"H"``, ``"K"``...).
    wave_min, wave_max : float
        Wavelength range in micron (vacuum).
    resolving_power : float
        R = lambda / FWHM at the band centre.
    source : str
        Provenance of the numbers.
    """

    name: str
    wave_min: float
    wave_max: float
    resolving_power: float
    source: str

    @property
    def centre(self) -> float:
        """Central wavelength in micron."""
        return 0.5 * (self.wave_min + self.wave_max)


@dataclass(frozen=True)
class Instrument:
    """An IFU spectrograph: its bands, spaxel size and spectral pixels."""

    name: str
    bands: dict[str, Band] = field(default_factory=dict)
    pixel_scale_arcsec: float = 0.2
    n_spectral_pixels: int = 2048


INSTRUMENTS: dict[str, Instrument] = {
    "KMOS": Instrument(
        "KMOS",
        {
            "YJ": Band("YJ", 1.025, 1.344, 3582.0, "K20 §2 (range), §3.1 (R)"),
            "H": Band("H", 1.456, 1.846, 4045.0, "K20 §2 (range), §3.1 (R)"),
            "K": Band("K", 1.92, 2.46, 4227.0, "K20 §2 (range), §3.1 (R)"),
            "IZ": Band("IZ", 0.78, 1.08, 3400.0, "FACTS.md §8 (ESO slides, 1-SRC; range UNVERIFIED)"),
            "HK": Band("HK", 1.48, 2.42, 2000.0, "FACTS.md §8 (ESO slides, 1-SRC; range UNVERIFIED)"),
        },
        pixel_scale_arcsec=0.2,  # FACTS.md §8
        n_spectral_pixels=2048,  # FACTS.md §8
    ),
    "SINFONI": Instrument(
        "SINFONI",
        {
            "J": Band("J", 1.10, 1.40, 2000.0, "SINFONI user manual (UNVERIFIED here)"),
            "H": Band("H", 1.45, 1.85, 3000.0, "SINFONI user manual (UNVERIFIED here)"),
            "K": Band("K", 1.95, 2.45, 4000.0, "SINFONI user manual (UNVERIFIED here)"),
            "HK": Band("HK", 1.45, 2.45, 1500.0, "SINFONI user manual (UNVERIFIED here)"),
        },
        pixel_scale_arcsec=0.25,  # K20 §2 (0.25" x 0.25" scale adopted)
        n_spectral_pixels=2048,
    ),
}

#: Redshift range of the per-galaxy pipeline (K20 §2 targets 1.2 < z < 2.6; z > 3 sources exist).
REDSHIFT_RANGE = (0.0, 4.0)

# ---------------------------------------------------------------------------
# Dust, SFR (FACTS.md §4-5; K20 §3.3-3.4)
# ---------------------------------------------------------------------------
#: Intrinsic Halpha/Hbeta (K20 §3.3, §3.4; Calzetti 2001).
BALMER_INTRINSIC = 2.87
#: R_V of the Cardelli+89 law (K20 §3.4).
R_V = 3.1
#: log10 of the Kennicutt & Evans 2012 Halpha constant (Kroupa IMF): log SFR = log L - 41.27.
KE12_LOG_C_HALPHA = 41.27
#: Kroupa -> Chabrier SFR factor (K20 §3.3): SFR_Chabrier = SFR_Kroupa / 1.06.
KROUPA_TO_CHABRIER = 1.06

# ---------------------------------------------------------------------------
# Paper defaults for the analysis (K20)
# ---------------------------------------------------------------------------
#: FWHM of a Gaussian in units of its standard deviation: 2 sqrt(2 ln 2) = 2.35482...
#: (exact; use ``sigma = fwhm / FWHM_PER_SIGMA``).
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: Spatial smoothing FWHM before fitting (K20 §3.1).
SMOOTH_FWHM_ARCSEC = 0.4
#: Pseudo-fibre radius (K20 §3.1).
FIBRE_RADIUS_ARCSEC = 0.6
#: Detection threshold on line SNR (K20 §3.1, Table 2).
DETECTION_SNR = 3.0
#: Per-pixel SNR thresholds for metallicity (K20 §4.2).
METALLICITY_SNR_STRONG = 5.0  # Halpha, [OIII]5007
METALLICITY_SNR_WEAK = 2.5  # every other line
#: SNR cut of the spaxels that enter mu(Halpha) (K20 §3.2.3: "spaxels in the Halpha map
#: with SNR > 3 before and after the reconstruction").
MAGNIFICATION_SNR = 3.0
#: SNR cut of the spaxels that enter the total Halpha flux for the SFR (K20 §3.3).
SFR_SNR = 5.0
#: SNR of Halpha and Hbeta for a per-pixel Balmer-decrement E(B-V) (package decision: the
#: lines detected, :data:`DETECTION_SNR`; K20 §3.4 falls back to the global E(B-V) where
#: Hbeta is too faint without giving a number).
BALMER_SNR = DETECTION_SNR

#: Diagnostics the image-plane forward gradient model handles: ratios of a line to a Balmer
#: line (FACTS.md §1.2), so that every observable is one line map (the pipeline's
#: ``gradient_forward`` stage and :mod:`klever_nb.gradients.forward` use this one tuple).
FORWARD_DIAGNOSTICS = ("N2", "R3", "S2", "R2")


def band_of(instrument: str, band: str) -> Band:
    """Return the :class:`Band` ``band`` of ``instrument`` (KeyError if unknown)."""
    return INSTRUMENTS[instrument].bands[band]


@cache
def lines_in_range(wave_min_um: float, wave_max_um: float, redshift: float,
                   names: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Names of catalogue lines whose observed wavelength falls in ``[wave_min, wave_max]`` micron.

    Parameters
    ----------
    wave_min_um, wave_max_um : float
        Observed-frame wavelength range in micron (vacuum).
    redshift : float
        Source redshift.
    names : tuple of str, optional
        Restrict to these catalogue names (default: the whole catalogue).
    """
    chosen = names if names is not None else tuple(LINES)
    out = []
    for name in chosen:
        obs = LINES[name].wave_vac * (1.0 + redshift) / 1e4
        if wave_min_um <= obs <= wave_max_um:
            out.append(name)
    return tuple(out)

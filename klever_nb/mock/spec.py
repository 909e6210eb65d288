"""Mock specification: :class:`MockSpec`, its validation, the mock constants and the demo sample.

See :mod:`klever_nb.mock` for the model and its conventions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from klever_nb import constants
from klever_nb.errors import ConfigError
from klever_nb.lensmodels import ParametricLens

#: Cube flux unit (KMOS pipeline-like, astropy-parsable); numbers in cubes are in this unit.
FLUX_UNITS = "1e-20 erg / (s cm2 Angstrom)"
FLUX_UNIT_CGS = 1e-20
#: Fixed [SII]6717/6731 of the mocks (n_e = 100 cm^-3, see the constant; FACTS.md §7).
SII_6717_TO_6731 = constants.SII_6717_6731
#: Fixed [OII]3729/3727 of the mocks (n_e = 100 cm^-3, see the constant; FACTS.md §7).
OII_3729_TO_3727 = constants.OII_3729_3727
#: Fixed [SIII]9531/Halpha of the mocks: a typical star-forming value (mock choice, not a
#: calibration; [SIII]9069/Halpha = 0.15/2.47 ~ 0.06 as in local HII regions).
SIII_9531_TO_HALPHA = 0.15
#: Noise model sigma(lambda) = sigma0 sqrt(NOISE_FLOOR + NOISE_SKY * sky(lambda)), sky peak = 1.
NOISE_FLOOR = 1.0
NOISE_SKY = 30.0
#: Continuum, shaped like the lensed Halpha map: level set by the rest-frame Halpha equivalent
#: width (Angstrom); f(lambda) = f(lambda_Ha) (1 + slope (lambda - lambda_Ha) / lambda_Ha).
CONTINUUM_EW_HALPHA_REST = 150.0
CONTINUUM_SLOPE = -0.3
#: Uncertainty written with a mock's stellar mass (dex; a typical SED-fitting error).
LOG_MSTAR_ERR = 0.1
#: Calibrations used to make the line ratios (C20; FACTS.md §1.2 definitions).
CALIBRATION_SET = "C20"
#: Lines every mock carries (K20 §3.1).
MOCK_LINES = constants.PAPER_LINES
_FWHM_PER_SIGMA = constants.FWHM_PER_SIGMA


# ---------------------------------------------------------------------------
# Specification
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MockSpec:
    """Everything that defines one mock galaxy (deterministic for a given ``seed``).

    Attributes
    ----------
    name : str
        Galaxy name (also the folder and file stem).
    redshift : float
        Source redshift.
    instrument, bands : str, tuple of str
        Instrument and bands of ``constants.INSTRUMENTS`` to simulate.
    shape : tuple of int
        Cube spatial shape (ny, nx) in spaxels.
    pixel_scale_arcsec : float
        Spaxel size (KMOS: 0.2", FACTS.md §8).
    psf_fwhm_arcsec : float
        FWHM of the Gaussian image-plane PSF.
    halpha_flux : float
        Total intrinsic source-plane Halpha flux (erg/s/cm2), before dust and lensing.
    scale_length_kpc : float
        Exponential scale length of the Halpha disc.
    inclination_deg, pa_deg : float
        Disc inclination (0 = face-on) and major-axis angle (degrees from +x to +y).
    centre_offset_arcsec : tuple of float
        Source-plane position of the galaxy centre relative to the field centre.
    central_oh, gradient_dex_per_kpc : float
        12+log(O/H) at the centre and its radial gradient.
    ebv : float
        Uniform E(B-V) of a CCM89 screen (R_V = 3.1).
    v_max_kms, v_turnover_kpc, sigma_kms : float
        Arctan rotation curve v(R) = v_max 2/pi arctan(R / R_t) and intrinsic dispersion.
    lens : ParametricLens or None
        Lens (deflection for this source redshift); None for an unlensed galaxy.
    z_lens : float or None
        Lens redshift (required with ``lens``).
    lens_fine_pixel_arcsec, lens_map_size_arcsec : float
        Pixel and side of the written deflection / kappa / gamma maps.
    snr_halpha_peak : float
        Optimal-extraction SNR of Halpha in the brightest spaxel at inter-line sky level;
        sets the noise sigma0.
    seed : int
        Seed of ``numpy.random.default_rng`` for the noise.
    subsample : int
        Rays per spaxel side for ray tracing and PSF convolution (>= 5).
    ra_deg, dec_deg : float
        Sky position of the field centre (CRVAL).
    source_pixel_arcsec : float
        Pixel of the truth source-plane maps.
    cube_offset_arcsec : tuple of float
        Astrometric error of the cubes: the sky position actually observed at the cube
        centre is this offset (arcsec along +x, +y) from where the cube WCS puts it. The
        lens maps and HST-like image have exact WCS; registration (K20 §3.2.2) should
        recover the offset.
    hst_psf_fwhm_arcsec : float
        PSF FWHM of the HST-like continuum image written with lensed mocks.
    log_mstar : float or None
        Stellar mass written to ``[properties]`` (not used by the simulation).
    nan_spaxels : int
        Number of randomly chosen spaxels set to NaN (flux and noise, every band) in the
        noisy cubes, as dead or unreduced spaxels are in real data (PITFALLS.md §6).
    noiseless : bool
        Write the noiseless cubes as the data (``cubes`` = ``noiseless``) while keeping the
        noise extension (the sigma a noisy realisation would have), so that a pipeline run
        applies the same SNR cuts as on noisy data: the "noiseless analysis" that isolates
        the beam smearing of an estimator from its noise (injection-recovery benchmarks).
        Dead spaxels (``nan_spaxels``) are still set to NaN.
    """

    name: str
    redshift: float
    instrument: str = "KMOS"
    bands: tuple[str, ...] = ("YJ", "H", "K")
    shape: tuple[int, int] = (24, 24)
    pixel_scale_arcsec: float = 0.2
    psf_fwhm_arcsec: float = 0.55
    halpha_flux: float = 2e-17
    scale_length_kpc: float = 1.5
    inclination_deg: float = 45.0
    pa_deg: float = 30.0
    centre_offset_arcsec: tuple[float, float] = (0.0, 0.0)
    central_oh: float = 8.45
    gradient_dex_per_kpc: float = -0.03
    ebv: float = 0.2
    v_max_kms: float = 120.0
    v_turnover_kpc: float = 1.0
    sigma_kms: float = 60.0
    lens: ParametricLens | None = None
    z_lens: float | None = None
    lens_fine_pixel_arcsec: float = 0.05
    lens_map_size_arcsec: float = 8.0
    snr_halpha_peak: float = 30.0
    seed: int = 0
    subsample: int = 5
    ra_deg: float = 150.0
    dec_deg: float = 2.0
    source_pixel_arcsec: float = 0.025
    cube_offset_arcsec: tuple[float, float] = (0.0, 0.0)
    hst_psf_fwhm_arcsec: float = 0.18
    log_mstar: float | None = None
    nan_spaxels: int = 0
    noiseless: bool = False

    def __post_init__(self):
        _validate_spec(self)


def _validate_spec(spec: MockSpec) -> None:
    def bad(key: str, why: str):
        raise ConfigError(f"MockSpec({spec.name!r}).{key} {why}")

    if spec.instrument not in constants.INSTRUMENTS:
        bad("instrument", f"must be one of {', '.join(constants.INSTRUMENTS)}")
    for band in spec.bands:
        if band not in constants.INSTRUMENTS[spec.instrument].bands:
            bad("bands", f"has {band!r}, not a band of {spec.instrument}")
    z_lo, z_hi = constants.REDSHIFT_RANGE
    if not z_lo < spec.redshift <= z_hi:
        bad("redshift", f"= {spec.redshift} is out of range ({z_lo}, {z_hi}]")
    if len(spec.shape) != 2 or min(spec.shape) < 2:
        bad("shape", "must be (ny, nx) with at least 2 spaxels each")
    for key in ("pixel_scale_arcsec", "psf_fwhm_arcsec", "halpha_flux", "scale_length_kpc",
                "hst_psf_fwhm_arcsec",
                "v_turnover_kpc", "lens_fine_pixel_arcsec", "lens_map_size_arcsec",
                "snr_halpha_peak", "source_pixel_arcsec"):
        if not getattr(spec, key) > 0:
            bad(key, f"must be positive, got {getattr(spec, key)!r}")
    if not 0 <= spec.inclination_deg < 85:
        bad("inclination_deg", "must be in [0, 85) degrees")
    if spec.sigma_kms < 0 or spec.ebv < 0:
        bad("sigma_kms/ebv", "must be >= 0")
    if not 0 <= spec.nan_spaxels < spec.shape[0] * spec.shape[1]:
        bad("nan_spaxels", "must be between 0 and the number of spaxels - 1")
    if spec.subsample < 5:
        bad("subsample", "must be >= 5 rays per spaxel side")
    if spec.lens is not None:
        if not isinstance(spec.lens, ParametricLens):
            bad("lens", "must be a klever_nb.lensmodels.ParametricLens")
        if spec.z_lens is None or not 0 < spec.z_lens < spec.redshift:
            bad("z_lens", f"must lie between 0 and the source redshift {spec.redshift}")


# ---------------------------------------------------------------------------
# Demo sample
# ---------------------------------------------------------------------------


def demo_specs(*, seed: int = 0) -> list[MockSpec]:
    """The embedded demo sample: a lensed z = 1.40 (SIE + shear), an unlensed z = 2.20 and
    a lensed z = 2.25 (SIS).

    At z = 1.40 Hbeta+[OIII] fall in YJ, Halpha+[NII]+[SII] in H, [SIII] in K; at z = 2.2
    [OII] in YJ, Hbeta+[OIII] in H, Halpha+[NII]+[SII] in K (K20 §2).
    """
    sie = ParametricLens((
        {"type": "SIE", "theta_e": 1.0, "q": 0.75, "pa_deg": 30.0,
         "center_x": 0.0, "center_y": 0.0},
        {"type": "SHEAR", "gamma1": 0.04, "gamma2": -0.02},
    ))
    sis = ParametricLens(({"type": "SIS", "theta_e": 0.9, "center_x": 0.0, "center_y": 0.0},))
    return [
        MockSpec(name="mock-lensed-z1.4", redshift=1.40, halpha_flux=4e-17,
                 scale_length_kpc=1.2, inclination_deg=50.0, pa_deg=20.0,
                 centre_offset_arcsec=(0.12, 0.08), central_oh=8.45,
                 gradient_dex_per_kpc=-0.04, ebv=0.2, v_max_kms=110.0, sigma_kms=55.0,
                 lens=sie, z_lens=0.45, snr_halpha_peak=25.0, seed=seed, log_mstar=9.4,
                 ra_deg=177.39, dec_deg=22.40),
        MockSpec(name="mock-unlensed-z2.2", redshift=2.20, halpha_flux=1.5e-16,
                 scale_length_kpc=2.0, inclination_deg=40.0, pa_deg=-30.0,
                 central_oh=8.40, gradient_dex_per_kpc=-0.02, ebv=0.3, v_max_kms=150.0,
                 sigma_kms=70.0, snr_halpha_peak=30.0, seed=seed + 1, log_mstar=10.3,
                 ra_deg=53.12, dec_deg=-27.80),
        MockSpec(name="mock-lensed-z2.2", redshift=2.25, halpha_flux=3e-17,
                 scale_length_kpc=1.0, inclination_deg=30.0, pa_deg=70.0,
                 centre_offset_arcsec=(0.35, -0.1), central_oh=8.30,
                 gradient_dex_per_kpc=0.01, ebv=0.15, v_max_kms=90.0, sigma_kms=65.0,
                 lens=sis, z_lens=0.55, snr_halpha_peak=20.0, seed=seed + 2, log_mstar=9.2,
                 ra_deg=73.55, dec_deg=-3.01),
    ]


def spec_to_dict(spec: MockSpec) -> dict[str, Any]:
    """JSON-ready dict of a spec (the lens as its component list)."""
    out = asdict(spec)
    out["lens"] = None if spec.lens is None else [dict(c) for c in spec.lens.components]
    return out

"""Mock observatory: deterministic synthetic KMOS galaxies with known truth, written as real files.

A mock galaxy is an inclined exponential Halpha disc in the source plane with a
linear metallicity gradient; every other line follows from the C20 calibrations
(N2, R3, S2, O3O2; FACTS.md §1) and fixed ratios (FACTS.md §7), attenuated by a
uniform CCM89 screen (FACTS.md §5). The image plane is ray-traced through an
analytic lens (:mod:`klever_nb.lensmodels`) on a fine grid, convolved with a
Gaussian PSF and rebinned to 0.2" spaxels conserving flux. Each spaxel gets one
Gaussian per line on the KMOS band grids (2048 channels, K20 §2, §3.1 resolving
powers), a weak linear continuum and OH-sky-shaped Gaussian noise.

Conventions
-----------
- Angular offsets (arcsec) are from the field centre (the cube centre, CRVAL of
  every file), x along +column, y along +row; beta = theta - alpha(theta).
- ``pa_deg`` (galaxy and lens) is measured from +x towards +y (lenstronomy's
  phi); see :mod:`klever_nb.lensmodels`. The receding half of the disc lies
  towards +pa along the major axis.
- Lens-component parameters in :class:`MockSpec.lens` give the deflection for
  the galaxy's own redshift; the written maps are divided by D_ls/D_s
  (``dls_ds`` normalisation, DESIGN.md).
- Metallicity is 12+log(O/H) = central_oh + gradient * R, with R the deprojected
  radius in kpc; it is clipped to the C20 validity range (7.6-8.9) where the
  calibration polynomials stop being meaningful (far out in the disc).
- Velocity structure inside a spaxel (rotation and beam smearing) is folded into
  one Gaussian per line whose first two moments match the flux-weighted ones.

References
----------
K20 §2 (KMOS bands), §3.1 (resolving powers, fixed ratios), §3.2 (lensing);
FACTS.md §1 (C20), §5 (CCM89), §7 (ratios), §8 (KMOS format), §9 (OH sky).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from typing import Any

import numpy as np
import xarray as xr
from scipy import signal, special

from klever_nb import constants, cosmology, sky
from klever_nb.calibrations import get_calibration
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


# ---------------------------------------------------------------------------
# Image plane: ray tracing, PSF, rebinning
# ---------------------------------------------------------------------------


def _gaussian_kernel(fwhm: float, pixel: float) -> np.ndarray:
    """Pixel-integrated, unit-sum 2-D Gaussian kernel."""
    sigma = fwhm / _FWHM_PER_SIGMA
    half = int(math.ceil(5.0 * sigma / pixel))
    edges = (np.arange(-half, half + 2) - 0.5) * pixel
    one = np.diff(special.ndtr(edges / sigma))
    kernel = np.outer(one, one)
    return kernel / kernel.sum()


def _fine_grid(spec: MockSpec) -> dict[str, Any]:
    ny, nx = spec.shape
    p = spec.pixel_scale_arcsec
    n_sub = spec.subsample
    pad = int(math.ceil(2.5 * spec.psf_fwhm_arcsec / p)) + 1
    d = p / n_sub
    fy, fx = (ny + 2 * pad) * n_sub, (nx + 2 * pad) * n_sub
    x = -(nx / 2 + pad) * p + (np.arange(fx) + 0.5) * d
    y = -(ny / 2 + pad) * p + (np.arange(fy) + 0.5) * d
    xx, yy = np.meshgrid(x, y)
    return {"x": xx, "y": yy, "pixel": d, "pad": pad, "n_sub": n_sub}


def _crop_rebin(maps: np.ndarray, spec: MockSpec, pad: int) -> np.ndarray:
    """Sum fine pixels into spaxels (flux-conserving) after removing the padding."""
    ny, nx = spec.shape
    n = spec.subsample
    core = maps[..., pad * n:(pad + ny) * n, pad * n:(pad + nx) * n]
    lead = core.shape[:-2]
    return core.reshape(*lead, ny, n, nx, n).sum(axis=(-3, -1))


def image_plane_maps(spec: MockSpec, *, lines: tuple[str, ...] | None = None,
                     kinematics: bool = True, deflection=None
                     ) -> tuple[xr.Dataset, dict[str, Any]]:
    """Noiseless image-plane line maps on the spaxel grid (after lensing and PSF).

    This is the mock's forward model (source disc -> lens -> PSF -> spaxels); a
    forward-modelling fit can call it with trial specs (``dataclasses.replace``).

    Parameters
    ----------
    spec : MockSpec
    lines : tuple of str, optional
        Lines to compute (default: every line of :data:`MOCK_LINES`).
    kinematics : bool
        Also compute the flux-weighted velocity and dispersion maps (3x the PSF
        convolutions); without them ``velocity`` is 0 and ``sigma`` is ``spec.sigma_kms``.
    deflection : callable, optional
        ``deflection(x, y) -> (alpha_x, alpha_y)`` in arcsec for the source redshift,
        overriding ``spec.lens`` (e.g. an interpolator of real deflection maps).

    Returns
    -------
    maps : xarray.Dataset
        ``flux`` (line, y, x) in erg/s/cm2 per spaxel (after dust), ``velocity`` and
        ``sigma`` (km/s; flux-weighted first moment and kinematic dispersion including
        beam smearing, without the instrument), ``continuum_weight`` (y, x): the
        PSF-convolved Halpha map used to shape the continuum.
    info : dict
        Fine-grid fluxes before PSF (``fine_flux`` per line) for the truth.

    References
    ----------
    K20 §3.2 (lensing), §3.1 (PSF); FACTS.md §12 (ray sub-sampling).
    """
    grid = _fine_grid(spec)
    names = tuple(MOCK_LINES) if lines is None else tuple(lines)
    unknown = [name for name in names if name not in MOCK_LINES]
    if unknown:
        raise ConfigError(f"image_plane_maps: lines has {unknown[0]!r}; known: "
                          f"{', '.join(MOCK_LINES)}")
    theta_x = grid["x"] + spec.cube_offset_arcsec[0]
    theta_y = grid["y"] + spec.cube_offset_arcsec[1]
    if deflection is not None:
        ax, ay = deflection(theta_x, theta_y)
        beta_x, beta_y = theta_x - ax, theta_y - ay
    elif spec.lens is not None:
        beta_x, beta_y = spec.lens.ray_shoot(theta_x, theta_y)
    else:
        beta_x, beta_y = theta_x, theta_y
    disc = disc_model(spec, beta_x, beta_y)
    area = grid["pixel"] ** 2
    flux = _line_sb(spec, disc, names) * area               # (line, fy, fx), erg/s/cm2
    v = disc["velocity"]
    stack = np.concatenate([flux, flux * v, flux * v * v]) if kinematics else flux
    kernel = _gaussian_kernel(spec.psf_fwhm_arcsec, grid["pixel"])
    conv = signal.fftconvolve(stack, kernel[None], mode="same", axes=(-2, -1))
    binned = _crop_rebin(conv, spec, grid["pad"])
    n = len(names)
    f = binned[:n]
    if kinematics:
        fv, fvv = binned[n:2 * n], binned[2 * n:]
        positive = f > 1e-40
        safe = np.where(positive, f, 1.0)
        mean_v = np.where(positive, fv / safe, 0.0)
        var_v = np.clip(np.where(positive, fvv / safe, 0.0) - mean_v**2, 0.0, None)
    else:
        mean_v = np.zeros_like(f)
        var_v = np.zeros_like(f)
    sigma = np.sqrt(spec.sigma_kms**2 + var_v)
    f = np.clip(f, 0.0, None)  # FFT round-off
    ny, nx = spec.shape
    coords = {"line": list(names), "y": np.arange(ny), "x": np.arange(nx)}
    maps = xr.Dataset(
        {
            "flux": (("line", "y", "x"), f, {"units": "erg / (s cm2)",
                                             "long_name": "line flux per spaxel (noiseless)"}),
            "velocity": (("line", "y", "x"), mean_v, {"units": "km / s"}),
            "sigma": (("line", "y", "x"), sigma,
                      {"units": "km / s", "long_name": "kinematic dispersion (no instrument)"}),
        },
        coords=coords,
        attrs={"pixel_scale_arcsec": spec.pixel_scale_arcsec, "redshift": spec.redshift},
    )
    info = {"fine_flux": dict(zip(names, flux.sum(axis=(-2, -1)), strict=True))}
    return maps, info


# ---------------------------------------------------------------------------
# Spectra and noise
# ---------------------------------------------------------------------------


def band_wavelengths(instrument: str, band: str) -> np.ndarray:
    """Channel centres (micron, vacuum) of a band: ``n_spectral_pixels`` over its range."""
    inst = constants.INSTRUMENTS[instrument]
    b = inst.bands[band]
    return np.linspace(b.wave_min, b.wave_max, inst.n_spectral_pixels)


@cache
def noise_shape(instrument: str, band: str) -> np.ndarray:
    """sqrt(NOISE_FLOOR + NOISE_SKY * sky(lambda)) on the band grid (read-only).

    The sky is the observed SINFONI K-band sky (``sky.observed_sky_k``) where it
    covers the grid, otherwise the OH line-list model ``sky.sky_spectrum``.

    References
    ----------
    FACTS.md §9; Rousselot et al. 2000.
    """
    wave = band_wavelengths(instrument, band)
    b = constants.INSTRUMENTS[instrument].bands[band]
    model = sky.sky_spectrum(wave, resolving_power=b.resolving_power)
    obs_wave, obs_flux = sky.observed_sky_k()
    covered = (wave >= obs_wave.min()) & (wave <= obs_wave.max())
    if covered.any():
        model = model.copy()
        model[covered] = np.interp(wave[covered], obs_wave, obs_flux)
    shape = np.sqrt(NOISE_FLOOR + NOISE_SKY * model)
    shape.setflags(write=False)
    return shape


def _add_lines(cube: np.ndarray, wave: np.ndarray, flux: np.ndarray, centre: np.ndarray,
               sigma: np.ndarray) -> None:
    """Add Gaussian lines integrated over channel edges (erf differences) to ``cube`` in place.

    ``flux`` (y, x) in erg/s/cm2, ``centre``/``sigma`` (y, x) in micron; the cube is in
    FLUX_UNITS per Angstrom, so sum(cube) * dlambda_A * 1e-20 gives back ``flux``.
    """
    step = wave[1] - wave[0]
    edges = np.concatenate([wave - 0.5 * step, [wave[-1] + 0.5 * step]])
    lo = float(np.min(centre - 8.0 * sigma))
    hi = float(np.max(centre + 8.0 * sigma))
    k0 = max(int(np.searchsorted(edges, lo)) - 1, 0)
    k1 = min(int(np.searchsorted(edges, hi)) + 1, wave.size)
    if k1 <= k0:
        return
    cdf = special.ndtr((edges[k0:k1 + 1, None, None] - centre) / sigma)
    cube[k0:k1] += np.diff(cdf, axis=0) * (flux / (step * 1e4 * FLUX_UNIT_CGS))


def celestial_header(*, ra_deg: float, dec_deg: float, shape: tuple[int, int],
                     pixel_arcsec: float):
    """TAN celestial header with a CD matrix (RA increasing to the left), centred on the image.

    CRPIX is the image centre ((n + 1) / 2, 1-based), so that pixel offsets from the centre
    times ``pixel_arcsec`` are the arcsec offsets used throughout (+x = West, +y = North).
    """
    from astropy.io import fits

    ny, nx = shape
    scale = pixel_arcsec / 3600.0
    header = fits.Header()
    header["WCSAXES"] = 2
    header["CTYPE1"] = "RA---TAN"
    header["CTYPE2"] = "DEC--TAN"
    header["CUNIT1"] = "deg"
    header["CUNIT2"] = "deg"
    header["CRPIX1"] = (nx + 1) / 2.0
    header["CRPIX2"] = (ny + 1) / 2.0
    header["CRVAL1"] = float(ra_deg)
    header["CRVAL2"] = float(dec_deg)
    header["CD1_1"] = -scale
    header["CD1_2"] = 0.0
    header["CD2_1"] = 0.0
    header["CD2_2"] = scale
    header["RADESYS"] = "ICRS"
    return header


def _celestial_wcs_string(spec: MockSpec) -> str:
    return celestial_header(ra_deg=spec.ra_deg, dec_deg=spec.dec_deg, shape=spec.shape,
                            pixel_arcsec=spec.pixel_scale_arcsec).tostring()


def _lens_wcs_string(spec: MockSpec, n: int) -> str:
    return celestial_header(ra_deg=spec.ra_deg, dec_deg=spec.dec_deg, shape=(n, n),
                            pixel_arcsec=spec.lens_fine_pixel_arcsec).tostring()


def _reference_line(spec: MockSpec, maps: xr.Dataset) -> tuple[str, str] | None:
    """(line, band) whose peak SNR ``snr_halpha_peak`` sets: Halpha, else the brightest line."""
    observed = [(name, band) for band in spec.bands for name in _band_lines(spec, band)]
    if not observed:
        return None
    for name, band in observed:
        if name == "Halpha":
            return name, band
    return max(observed, key=lambda nb: float(maps["flux"].sel(line=nb[0]).sum()))


def _sigma0(spec: MockSpec, maps: xr.Dataset) -> float:
    """Noise scale sigma0 (FLUX_UNITS) that gives the reference line SNR = ``snr_halpha_peak``.

    The SNR is that of optimal (profile-weighted) extraction of the line in its brightest
    spaxel with the actual sky-shaped noise at its wavelength:
    SNR = F / (dlambda sigma0) sqrt(sum_i p_i^2 / s_i^2), p_i the fraction of the line in
    channel i and s_i the noise shape. The reference line is Halpha when a band covers it,
    otherwise the brightest observed line.
    """
    ref = _reference_line(spec, maps)
    if ref is None:  # no line in any band: a continuum-only mock, scale from Halpha anyway
        ref = ("Halpha", spec.bands[0])
    name, band_name = ref
    band = constants.INSTRUMENTS[spec.instrument].bands[band_name]
    wave = band_wavelengths(spec.instrument, band_name)
    step_um = wave[1] - wave[0]
    flux = maps["flux"].sel(line=name).values
    iy, ix = np.unravel_index(np.argmax(flux), flux.shape)
    rest = constants.LINES[name].wave_vac * (1 + spec.redshift) / 1e4
    centre = rest * (1 + float(maps["velocity"].sel(line=name).values[iy, ix]) / constants.C_KMS)
    sig_v = float(maps["sigma"].sel(line=name).values[iy, ix])
    sig_um = math.hypot(centre * sig_v / constants.C_KMS,
                        centre / (band.resolving_power * _FWHM_PER_SIGMA))
    edges = np.concatenate([wave - 0.5 * step_um, [wave[-1] + 0.5 * step_um]])
    frac = np.diff(special.ndtr((edges - centre) / sig_um))
    shape = noise_shape(spec.instrument, band_name)
    weight = math.sqrt(float(np.sum(frac**2 / shape**2)))
    if weight == 0.0:  # line outside the grid
        weight = 1.0 / float(np.median(shape))
    return float(flux[iy, ix]) * weight / (spec.snr_halpha_peak * step_um * 1e4 * FLUX_UNIT_CGS)


def _band_lines(spec: MockSpec, band: str) -> tuple[str, ...]:
    b = constants.INSTRUMENTS[spec.instrument].bands[band]
    return constants.lines_in_range(b.wave_min, b.wave_max, spec.redshift, MOCK_LINES)


def _band_cubes(spec: MockSpec, maps: xr.Dataset, sigma0: float, rng: np.random.Generator
                ) -> tuple[dict[str, xr.Dataset], dict[str, xr.Dataset]]:
    ny, nx = spec.shape
    header = _celestial_wcs_string(spec)
    ha_obs = constants.LINES["Halpha"].wave_vac * (1 + spec.redshift) / 1e4
    cont_map = (maps["flux"].sel(line="Halpha").values
                / (CONTINUUM_EW_HALPHA_REST * (1 + spec.redshift)) / FLUX_UNIT_CGS)
    observed, noiseless = {}, {}
    dead = np.zeros(ny * nx, dtype=bool)
    if spec.nan_spaxels:
        dead[rng.choice(ny * nx, size=spec.nan_spaxels, replace=False)] = True
    dead = dead.reshape(ny, nx)
    for band_name in spec.bands:
        band = constants.INSTRUMENTS[spec.instrument].bands[band_name]
        wave = band_wavelengths(spec.instrument, band_name)
        lines = np.zeros((wave.size, ny, nx))
        for name in _band_lines(spec, band_name):
            rest = constants.LINES[name].wave_vac * (1 + spec.redshift) / 1e4
            v = maps["velocity"].sel(line=name).values
            centre = rest * (1.0 + v / constants.C_KMS)
            sig_kin = centre * maps["sigma"].sel(line=name).values / constants.C_KMS
            sig_ins = centre / (band.resolving_power * _FWHM_PER_SIGMA)
            _add_lines(lines, wave, maps["flux"].sel(line=name).values, centre,
                       np.hypot(sig_kin, sig_ins))
        slope = 1.0 + CONTINUUM_SLOPE * (wave - ha_obs) / ha_obs
        continuum = slope[:, None, None] * cont_map[None]
        clean = lines + continuum
        noise_1d = sigma0 * noise_shape(spec.instrument, band_name)
        noise = np.broadcast_to(noise_1d[:, None, None], clean.shape).copy()
        noise_clean = noise
        data = clean + rng.standard_normal(clean.shape) * noise
        if spec.noiseless:
            data = clean.copy()
        if dead.any():
            data[:, dead] = np.nan
            noise = noise.copy()
            noise[:, dead] = np.nan
        attrs = {"band": band_name, "instrument": spec.instrument,
                 "resolving_power": float(band.resolving_power),
                 "pixel_scale_arcsec": float(spec.pixel_scale_arcsec), "wcs": header,
                 "redshift": float(spec.redshift), "object": spec.name}
        coords = {"wave": ("wave", wave, {"units": "um", "medium": "vacuum"}),
                  "y": np.arange(ny), "x": np.arange(nx)}
        units = {"units": FLUX_UNITS}
        observed[band_name] = xr.Dataset(
            {"flux": (("wave", "y", "x"), data, units),
             "noise": (("wave", "y", "x"), noise, units)}, coords=coords, attrs=attrs)
        noiseless[band_name] = xr.Dataset(
            {"flux": (("wave", "y", "x"), clean, units),
             "noise": (("wave", "y", "x"), noise_clean, units),
             "continuum": (("wave", "y", "x"), continuum, units)},
            coords=coords, attrs={**attrs, "noiseless": "true"})
    return observed, noiseless


# ---------------------------------------------------------------------------
# Lens maps, source maps, truth
# ---------------------------------------------------------------------------


def lens_maps(spec: MockSpec) -> xr.Dataset | None:
    """Deflection, convergence and shear maps on the fine lens grid, ``dls_ds`` normalisation.

    alpha, kappa and gamma for the source redshift are divided by D_ls/D_s(z_lens, z)
    (Frontier Fields convention, DESIGN.md; ``klever_nb.cosmology.dls_over_ds``).
    """
    if spec.lens is None:
        return None
    n = max(int(round(spec.lens_map_size_arcsec / spec.lens_fine_pixel_arcsec)), 2)
    offsets = (np.arange(n) - (n - 1) / 2.0) * spec.lens_fine_pixel_arcsec
    xx, yy = np.meshgrid(offsets, offsets)
    factor = cosmology.dls_over_ds(spec.z_lens, spec.redshift)
    ax, ay = spec.lens.deflection(xx, yy)
    kappa, gamma = spec.lens.convergence_shear(xx, yy)
    arcsec = {"units": "arcsec"}
    hst = hst_continuum_image(spec, offsets)
    return xr.Dataset(
        {"alpha_x": (("y", "x"), ax / factor, arcsec),
         "alpha_y": (("y", "x"), ay / factor, arcsec),
         "kappa": (("y", "x"), kappa / factor, {"units": ""}),
         "gamma": (("y", "x"), gamma / factor, {"units": ""}),
         "hst_image": (("y", "x"), hst, {"units": "erg / (s cm2 Angstrom arcsec2)",
                                         "long_name": "HST-like lensed continuum image"})},
        coords={"y": np.arange(n), "x": np.arange(n),
                "x_arcsec": ("x", offsets, arcsec), "y_arcsec": ("y", offsets, arcsec)},
        attrs={"wcs": _lens_wcs_string(spec, n),
               "normalisation": "dls_ds", "dls_ds": factor, "z_lens": float(spec.z_lens),
               "z_source": float(spec.redshift),
               "pixel_scale_arcsec": float(spec.lens_fine_pixel_arcsec)},
    )


def hst_continuum_image(spec: MockSpec, offsets: np.ndarray, *, n_sub: int = 3) -> np.ndarray:
    """Noiseless HST-like continuum image of the lensed galaxy on a square grid.

    The continuum follows the (dust-attenuated) Halpha disc with the cube's continuum
    level at the observed Halpha wavelength, ray-traced with ``n_sub`` x ``n_sub`` rays per
    pixel and convolved with a Gaussian PSF of ``hst_psf_fwhm_arcsec``; surface brightness in
    erg/s/cm2/A/arcsec2. ``offsets`` are the pixel centres (arcsec) along x and y.
    """
    step = float(offsets[1] - offsets[0])
    sub = (np.arange(offsets.size * n_sub) + 0.5) * step / n_sub + offsets[0] - 0.5 * step
    xx, yy = np.meshgrid(sub, sub)
    bx, by = spec.lens.ray_shoot(xx, yy) if spec.lens is not None else (xx, yy)
    sb = disc_model(spec, bx, by)["sb"] * dust_transmission("Halpha", spec.ebv)
    sb = sb / (CONTINUUM_EW_HALPHA_REST * (1 + spec.redshift))
    kernel = _gaussian_kernel(spec.hst_psf_fwhm_arcsec, step / n_sub)
    sb = signal.fftconvolve(sb, kernel, mode="same")
    n = offsets.size
    return np.clip(sb.reshape(n, n_sub, n, n_sub).mean(axis=(1, 3)), 0.0, None)


def source_maps(spec: MockSpec) -> xr.Dataset:
    """True source-plane maps around the galaxy centre (kpc coordinates, arcsec too).

    Variables: ``sb`` (line, ys, xs) observed (dust-attenuated) surface brightness and
    ``sb_intrinsic`` (before dust), erg/s/cm2/arcsec2; ``oh``, ``velocity``, ``radius_kpc``.
    """
    kpc = cosmology.kpc_per_arcsec(spec.redshift)
    half = max(8.0 * spec.scale_length_kpc / kpc, 0.5)  # 8 h: 0.3 % of the flux outside
    n = 2 * int(math.ceil(half / spec.source_pixel_arcsec)) + 1
    offsets = (np.arange(n) - (n - 1) / 2) * spec.source_pixel_arcsec
    cx, cy = spec.centre_offset_arcsec
    bx, by = np.meshgrid(offsets + cx, offsets + cy)
    disc = disc_model(spec, bx, by)
    ratios = line_ratios_to_halpha(disc["oh"])
    intrinsic = np.stack([disc["sb"] * ratios[name] for name in MOCK_LINES])
    dust = np.array([dust_transmission(name, spec.ebv) for name in MOCK_LINES])
    sb_units = {"units": "erg / (s cm2 arcsec2)"}
    return xr.Dataset(
        {"sb": (("line", "ys", "xs"), intrinsic * dust[:, None, None], sb_units),
         "sb_intrinsic": (("line", "ys", "xs"), intrinsic, sb_units),
         "oh": (("ys", "xs"), disc["oh"], {"units": "dex", "long_name": "12+log(O/H)"}),
         "velocity": (("ys", "xs"), disc["velocity"], {"units": "km / s"}),
         "radius_kpc": (("ys", "xs"), disc["radius_kpc"], {"units": "kpc"})},
        coords={"line": list(MOCK_LINES),
                "xs": ("xs", offsets * kpc, {"units": "kpc"}),
                "ys": ("ys", offsets * kpc, {"units": "kpc"}),
                "xs_arcsec": ("xs", offsets + cx, {"units": "arcsec",
                                                    "long_name": "offset from field centre"}),
                "ys_arcsec": ("ys", offsets + cy, {"units": "arcsec"})},
        attrs={"redshift": spec.redshift, "kpc_per_arcsec": kpc,
               "pixel_scale_arcsec": spec.source_pixel_arcsec, "sigma_kms": spec.sigma_kms},
    )


def _global_oh(source: xr.Dataset) -> dict[str, Any]:
    """Halpha-weighted mean O/H and the O/H each diagnostic gives from total source fluxes."""
    weight = source["sb_intrinsic"].sel(line="Halpha").values
    oh = source["oh"].values
    out: dict[str, Any] = {"halpha_weighted": float(np.sum(weight * oh) / np.sum(weight))}
    totals = {name: float(source["sb_intrinsic"].sel(line=name).sum()) for name in MOCK_LINES}
    observed = {
        "N2": totals["NII_6584"] / totals["Halpha"],
        "R3": totals["OIII_5007"] / totals["Hbeta"],
        "S2": (totals["SII_6717"] + totals["SII_6731"]) / totals["Halpha"],
        "O3O2": totals["OIII_5007"] / (totals["OII_3727"] + totals["OII_3729"]),
    }
    lo, hi = oh_range()
    grid = np.linspace(lo, hi, 26001)
    per_diag = {}
    for diag, value in observed.items():
        model = get_calibration(diag, set_name=CALIBRATION_SET).log_ratio(grid)
        miss = np.abs(model - np.log10(value))
        candidates = grid[miss < 1e-3]
        if candidates.size == 0:
            per_diag[diag] = None
            continue
        per_diag[diag] = float(candidates[np.argmin(np.abs(candidates
                                                           - out["halpha_weighted"]))])
    out["integrated"] = per_diag
    return out


def _truth(spec: MockSpec, maps: xr.Dataset, info: dict[str, Any], source: xr.Dataset,
           sigma0: float) -> dict[str, Any]:
    kpc = cosmology.kpc_per_arcsec(spec.redshift)
    ratios = line_ratios_to_halpha(source["oh"].values)
    weight = source["sb_intrinsic"].sel(line="Halpha").values
    # Intrinsic line fluxes: Halpha exact, others weighted by the ratio maps on the source grid.
    intrinsic = {name: float(spec.halpha_flux * np.sum(weight * ratios[name]) / np.sum(weight))
                 for name in MOCK_LINES}
    attenuated = {name: intrinsic[name] * dust_transmission(name, spec.ebv)
                  for name in MOCK_LINES}
    observed = {name: float(maps["flux"].sel(line=name).sum()) for name in MOCK_LINES}
    fine = {name: float(v) for name, v in info["fine_flux"].items()}
    lensed = spec.lens is not None
    mu_lines = {name: observed[name] / attenuated[name] for name in MOCK_LINES}
    global_oh = _global_oh(source)
    truth: dict[str, Any] = {
        "name": spec.name,
        "redshift": spec.redshift,
        "instrument": spec.instrument,
        "bands": {b: list(_band_lines(spec, b)) for b in spec.bands},
        "lensed": lensed,
        "z_lens": spec.z_lens,
        "mu": mu_lines["Halpha"] if lensed else 1.0,
        "mu_definition": ("noiseless image-plane Halpha flux inside the cube / source Halpha "
                          "flux (both after dust); 1 by definition when unlensed"),
        "mu_fine_grid": fine["Halpha"] / attenuated["Halpha"] if lensed else 1.0,
        "mu_lines": mu_lines if lensed else dict.fromkeys(MOCK_LINES, 1.0),
        "image_flux_fraction_in_cube": observed["Halpha"] / fine["Halpha"],
        "line_fluxes_observed": observed,
        "line_fluxes_source_attenuated": attenuated,
        "line_fluxes_intrinsic": intrinsic,
        "flux_units": "erg / (s cm2)",
        "central_oh": spec.central_oh,
        "gradient_dex_per_kpc": spec.gradient_dex_per_kpc,
        "global_oh": global_oh["halpha_weighted"],
        "global_oh_definition": ("Halpha-flux-weighted mean of 12+log(O/H) over the source "
                                 "plane (intrinsic Halpha weights)"),
        "global_oh_from_integrated_ratios": global_oh["integrated"],
        "oh_clip_range": list(oh_range()),
        "ebv": spec.ebv,
        "dust_law": "CCM89, R_V = 3.1 (uniform screen)",
        "sigma_kms": spec.sigma_kms,
        "v_max_kms": spec.v_max_kms,
        "v_turnover_kpc": spec.v_turnover_kpc,
        "inclination_deg": spec.inclination_deg,
        "pa_deg": spec.pa_deg,
        "pa_convention": "degrees from +x (column) towards +y (row)",
        "centre_offset_arcsec": list(spec.centre_offset_arcsec),
        "psf_fwhm_arcsec": spec.psf_fwhm_arcsec,
        "scale_length_kpc": spec.scale_length_kpc,
        "scale_length_arcsec": spec.scale_length_kpc / kpc,
        "kpc_per_arcsec": kpc,
        "pixel_scale_arcsec": spec.pixel_scale_arcsec,
        "lens_fine_pixel_arcsec": spec.lens_fine_pixel_arcsec if lensed else None,
        "source_pixel_arcsec": spec.source_pixel_arcsec,
        "ray_pixel_arcsec": spec.pixel_scale_arcsec / spec.subsample,
        "lens": None,
        "noise_sigma0": sigma0,
        "noise_model": f"sigma0 * sqrt({NOISE_FLOOR} + {NOISE_SKY} * sky), sky peak 1",
        "snr_halpha_peak": spec.snr_halpha_peak,
        "halpha_flux_intrinsic": spec.halpha_flux,
        "ratios": {"SII_6717/SII_6731": SII_6717_TO_6731, "OII_3729/OII_3727": OII_3729_TO_3727,
                   "SIII_9531/Halpha": SIII_9531_TO_HALPHA, "calibrations": CALIBRATION_SET},
        "continuum": {"ew_halpha_rest_angstrom": CONTINUUM_EW_HALPHA_REST,
                      "slope": CONTINUUM_SLOPE},
        "seed": spec.seed,
        "nan_spaxels": spec.nan_spaxels,
        "noiseless": spec.noiseless,
        "cube_offset_arcsec": list(spec.cube_offset_arcsec),
        "cube_offset_definition": ("true sky offset (arcsec, +x/+y cube axes) of the cube "
                                   "centre from its WCS position"),
        "log_mstar": spec.log_mstar,
        "sfr": _sfr_chabrier(spec),
        "sfr_definition": ("Kennicutt & Evans 2012 (Kroupa) / 1.06 -> Chabrier, from the "
                           "intrinsic Halpha flux (K20 §3.3)"),
        "ra_deg": spec.ra_deg,
        "dec_deg": spec.dec_deg,
    }
    if lensed:
        truth["lens"] = {"components": [dict(c) for c in spec.lens.components],
                         "components_normalisation": "source",
                         "z_lens": spec.z_lens,
                         "dls_ds": cosmology.dls_over_ds(spec.z_lens, spec.redshift),
                         "maps_normalisation": "dls_ds"}
    return truth


def _sfr_chabrier(spec: MockSpec) -> float:
    """SFR (Msun/yr, Chabrier) of the intrinsic Halpha flux (K20 §3.3; FACTS.md §4)."""
    lum = 4.0 * np.pi * cosmology.luminosity_distance_cm(spec.redshift) ** 2 * spec.halpha_flux
    return float(10 ** (np.log10(lum) - constants.KE12_LOG_C_HALPHA)
                 / constants.KROUPA_TO_CHABRIER)


@dataclass
class MockGalaxy:
    """A mock galaxy in memory (see :func:`make_mock`).

    Attributes
    ----------
    spec : MockSpec
    cubes : xarray.DataTree
        Noisy cubes, one child per band (DESIGN.md data model).
    noiseless : xarray.DataTree
        Same without noise; also holds the ``continuum`` cube (lines = flux - continuum).
    source : xarray.Dataset
        True source-plane maps (:func:`source_maps`).
    lens_maps : xarray.Dataset or None
        ``alpha_x``, ``alpha_y``, ``kappa``, ``gamma`` in the ``dls_ds`` normalisation.
    truth : dict
        JSON-ready truth (written as ``truth.json``).
    image_maps : xarray.Dataset
        True noiseless image-plane line maps on the spaxel grid (:func:`image_plane_maps`).
    """

    spec: MockSpec
    cubes: xr.DataTree
    noiseless: xr.DataTree
    source: xr.Dataset
    lens_maps: xr.Dataset | None
    truth: dict
    image_maps: xr.Dataset = field(repr=False, default=None)


def make_mock(spec: MockSpec) -> MockGalaxy:
    """Build a mock galaxy in memory; pure and deterministic for ``spec.seed``.

    Examples
    --------
    >>> galaxy = make_mock(demo_specs()[1])
    >>> sorted(galaxy.cubes.children)
    ['H', 'K', 'YJ']
    >>> galaxy.truth["mu"]
    1.0

    References
    ----------
    K20 §2-3 (data, lensing); FACTS.md §1, §5, §7-9.
    """
    maps, info = image_plane_maps(spec)
    sigma0 = _sigma0(spec, maps)
    rng = np.random.default_rng(spec.seed)
    observed, noiseless = _band_cubes(spec, maps, sigma0, rng)
    root = {"name": spec.name, "redshift": spec.redshift, "instrument": spec.instrument}
    cubes = xr.DataTree.from_dict({"/": xr.Dataset(attrs=root),
                                   **{f"/{b}": ds for b, ds in observed.items()}})
    clean = xr.DataTree.from_dict({"/": xr.Dataset(attrs=root),
                                   **{f"/{b}": ds for b, ds in noiseless.items()}})
    source = source_maps(spec)
    truth = _truth(spec, maps, info, source, sigma0)
    return MockGalaxy(spec=spec, cubes=cubes, noiseless=clean, source=source,
                      lens_maps=lens_maps(spec), truth=truth, image_maps=maps)


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


# ---------------------------------------------------------------------------
# Strong-lensing grid (injection-recovery, issue 21)
# ---------------------------------------------------------------------------

#: Redshift windows of the strong-lensing grid: K20 §2 targets z in [1.2, 1.65] (Hbeta+[OIII]
#: in YJ, Halpha+[NII]+[SII] in H) and [2, 2.6] ([OII] in YJ, Hbeta+[OIII] in H, Halpha in K),
#: narrowed so that every one of those lines stays inside the KMOS band ranges.
STRONG_LENSING_Z_WINDOWS = ((1.32, 1.62), (2.02, 2.40))
#: Total-magnification range the grid aims at (issue 21: 2 to 30).
STRONG_LENSING_MU_RANGE = (2.0, 30.0)
#: Largest cube of the strong-lensing mocks: 30 x 30 KMOS spaxels (6"), enough for an arc and
#: its counter-image around an Einstein radius of <= 1.3" (KMOS mosaics reach ~ 6-8"); the
#: magnification targeting runs on it.
STRONG_LENSING_SHAPE = (30, 30)
#: Each mock's cube is cropped (square, even side, at least this many spaxels) to the point
#: images of its centre plus :data:`STRONG_LENSING_CUBE_MARGIN_ARCSEC` (the pipeline's cost
#: grows with the spaxels).
STRONG_LENSING_MIN_SIDE = 24
STRONG_LENSING_CUBE_MARGIN_ARCSEC = 0.8


def lensed_images(lens: ParametricLens, beta: tuple[float, float], *, half_size: float,
                  step: float = 0.02, core: float = 0.03) -> list[dict[str, Any]]:
    """Images of a point source at ``beta`` (arcsec) inside the square |theta| <= half_size.

    Local minima of |beta(theta) - beta| on a grid of ``step`` arcsec are refined by Newton
    iterations with the analytic Jacobian A = I - Hessian; images closer than ``core`` to
    the lens centre (the singular core of isothermal lenses, where the third image has
    mu -> 0) are dropped.

    Returns
    -------
    list of dict
        ``theta_x``, ``theta_y`` (arcsec), ``mu`` (signed, 1/det A) and ``jacobian``
        ([[dbx/dx, dbx/dy], [dby/dx, dby/dy]]), brightest first.

    Examples
    --------
    >>> sis = ParametricLens(({"type": "SIS", "theta_e": 1.0},))
    >>> [round(im["mu"], 3) for im in lensed_images(sis, (0.25, 0.0), half_size=3.0)]
    [5.0, -3.0]
    """
    from scipy import ndimage, optimize

    bx0, by0 = (float(v) for v in beta)
    axis = np.arange(-half_size, half_size + 0.5 * step, step)
    xx, yy = np.meshgrid(axis, axis)
    bx, by = lens.ray_shoot(xx, yy)
    d2 = (bx - bx0) ** 2 + (by - by0) ** 2
    minima = (ndimage.minimum_filter(d2, size=3, mode="nearest") == d2) & (d2 < 0.2**2)
    cx, cy = lens.center

    def jacobian(t):
        f_xx, f_xy, f_yx, f_yy = lens.hessian(t[0], t[1])
        return np.array([[1.0 - float(f_xx), -float(f_xy)], [-float(f_yx), 1.0 - float(f_yy)]])

    def residual(t):
        px, py = lens.ray_shoot(t[0], t[1])
        return np.array([float(px) - bx0, float(py) - by0])

    images: list[dict[str, Any]] = []
    for iy, ix in zip(*np.nonzero(minima), strict=True):
        sol = optimize.root(residual, [xx[iy, ix], yy[iy, ix]], jac=jacobian, method="hybr",
                            options={"xtol": 1e-10})
        t = sol.x
        if not sol.success or np.hypot(*residual(t)) > 1e-6 \
                or max(abs(t[0]), abs(t[1])) > half_size or np.hypot(t[0] - cx, t[1] - cy) < core:
            continue
        if any(np.hypot(t[0] - im["theta_x"], t[1] - im["theta_y"]) < 0.25 * step
               for im in images):
            continue
        a = jacobian(t)
        images.append({"theta_x": float(t[0]), "theta_y": float(t[1]),
                       "mu": float(1.0 / np.linalg.det(a)), "jacobian": a.tolist()})
    return sorted(images, key=lambda im: -abs(im["mu"]))


def halpha_magnification(spec: MockSpec) -> float:
    """The mock's true total magnification (``truth["mu"]``) without building the cubes.

    Noiseless image-plane Halpha flux inside the cube (after the PSF) over the source
    Halpha flux, both after dust: the definition of ``truth["mu"]`` (:func:`make_mock`).
    """
    if spec.lens is None:
        return 1.0
    maps, _ = image_plane_maps(spec, lines=("Halpha",), kinematics=False)
    return float(maps["flux"].sum()) / (spec.halpha_flux * dust_transmission("Halpha", spec.ebv))


def _tangential_caustic_radius(lens: ParametricLens, phi: float, theta_e: float,
                               half_size: float) -> float | None:
    """Distance from the lens centre along ``phi`` where the 4-image region ends (bisection)."""
    cx, cy = lens.center

    def count(r):
        return len(lensed_images(lens, (cx + r * math.cos(phi), cy + r * math.sin(phi)),
                                 half_size=half_size))

    lo, hi = 0.002 * theta_e, 0.8 * theta_e
    if count(lo) < 4 or count(hi) >= 4:
        return None
    for _ in range(14):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if count(mid) >= 4 else (lo, mid)
    return 0.5 * (lo + hi)


def strong_lensing_specs(n: int, *, seed: int = 0,
                         shape: tuple[int, int] = STRONG_LENSING_SHAPE) -> list[MockSpec]:
    """A deterministic grid of ``n`` strongly lensed KMOS mocks (issue 21 injection-recovery).

    Galaxy ``i`` depends only on ``(seed, i)``, so the first k galaxies of any grid are the
    same. Even ``i``: an SIS; odd ``i``: an SIE (q 0.6-0.9) plus external shear (0.02-0.08),
    with random lens and shear angles, Einstein radius 0.8-1.3" and the lens centre within
    0.2" of the cube centre. The source disc (random PA, inclination 20-65 deg, scale length
    0.5-1.4 kpc, gradient -0.08 to +0.03 dex/kpc) sits along a random direction from the
    lens centre at the distance whose true Halpha magnification (:func:`halpha_magnification`,
    = ``truth["mu"]``) is closest to a target spread log-uniformly (golden-ratio sequence)
    over :data:`STRONG_LENSING_MU_RANGE` (targets above 12 get a compact disc, 0.4-0.8 kpc, except on the caustic);
    ``i % 10 == 9`` (SIE) is instead centred exactly on the tangential caustic (4 -> 2
    images) and ``i % 10 == 5`` (SIE) half way to it (a quad). Redshifts alternate between the two K20 §2
    windows (:data:`STRONG_LENSING_Z_WINDOWS`; bands YJ, H, K as in :func:`demo_specs`); seeing
    0.45-0.7" (the pipeline's 0.4" smoothing comes on top), Halpha peak SNR 8-40
    (log-uniform; K20's galaxies span this), E(B-V) 0.05-0.4.

    The cube holds every point image of the galaxy centre (:func:`lensed_images`) with
    :data:`STRONG_LENSING_CUBE_MARGIN_ARCSEC` to spare (square, between
    :data:`STRONG_LENSING_MIN_SIDE` and ``shape`` spaxels): the counter-image of a multiply
    imaged source is inside it.

    Examples
    --------
    >>> specs = strong_lensing_specs(2)
    >>> [s.lens.components[0]["type"] for s in specs]
    ['SIS', 'SIE']
    """
    half = 0.5 * max(shape) * 0.2
    golden = 0.5 * (math.sqrt(5.0) - 1.0)
    mu_lo, mu_hi = STRONG_LENSING_MU_RANGE
    specs = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        lens_centre = tuple(float(v) for v in rng.uniform(-0.2, 0.2, 2))
        theta_e = float(rng.uniform(0.8, 1.3))
        cx, cy = lens_centre
        if i % 2 == 0:
            lens = ParametricLens(({"type": "SIS", "theta_e": theta_e, "center_x": cx,
                                    "center_y": cy},))
        else:
            gamma, shear_angle = float(rng.uniform(0.02, 0.08)), float(rng.uniform(0, np.pi))
            lens = ParametricLens((
                {"type": "SIE", "theta_e": theta_e, "q": float(rng.uniform(0.6, 0.9)),
                 "pa_deg": float(rng.uniform(0, 180)), "center_x": cx, "center_y": cy},
                {"type": "SHEAR", "gamma1": gamma * math.cos(2 * shear_angle),
                 "gamma2": gamma * math.sin(2 * shear_angle), "center_x": cx, "center_y": cy}))
        window = STRONG_LENSING_Z_WINDOWS[(i // 2) % 2]
        z = float(rng.uniform(*window))
        base = MockSpec(
            name=f"sl{i:03d}-{'sis' if i % 2 == 0 else 'sie'}", redshift=round(z, 4),
            shape=tuple(shape), psf_fwhm_arcsec=round(float(rng.uniform(0.45, 0.70)), 3),
            halpha_flux=float(10 ** rng.uniform(-17.0, -16.2)),
            scale_length_kpc=float(rng.uniform(0.5, 1.4)),
            inclination_deg=float(rng.uniform(20, 65)), pa_deg=float(rng.uniform(0, 180)),
            central_oh=float(rng.uniform(8.25, 8.55)),
            gradient_dex_per_kpc=round(float(rng.uniform(-0.08, 0.03)), 4),
            ebv=float(rng.uniform(0.05, 0.4)), v_max_kms=float(rng.uniform(60, 160)),
            v_turnover_kpc=float(rng.uniform(0.5, 1.5)), sigma_kms=float(rng.uniform(40, 80)),
            lens=lens, z_lens=round(float(rng.uniform(0.3, 0.6)), 3),
            snr_halpha_peak=round(float(10 ** rng.uniform(math.log10(8), math.log10(40))), 2),
            seed=1000 * seed + i, log_mstar=round(float(rng.uniform(9.0, 10.5)), 2),
            lens_map_size_arcsec=2 * half + 1.6)
        phi = float(rng.uniform(0, 2 * np.pi))
        target = mu_lo * (mu_hi / mu_lo) ** ((0.5 + i * golden) % 1.0)
        compact = float(rng.uniform(0.4, 0.8))
        r_caustic = None
        if i % 10 in (5, 9):
            r_caustic = _tangential_caustic_radius(lens, phi, theta_e, half)
        if r_caustic is not None:
            r = r_caustic * (1.0 if i % 10 == 9 else 0.5)
        else:
            if target > 12.0:  # only compact discs reach mu ~ 30 inside an arcsec-scale ring
                base = replace(base, scale_length_kpc=compact)
            radii = theta_e * np.geomspace(0.02, 1.6, 26)
            mus = [halpha_magnification(replace(base, centre_offset_arcsec=(
                cx + r * math.cos(phi), cy + r * math.sin(phi)))) for r in radii]
            miss = np.abs(np.log(np.asarray(mus) / target))
            miss[np.asarray(mus) > 1.1 * mu_hi] = np.inf  # caustic crossings overshoot
            r = float(radii[int(np.argmin(miss))]) if np.isfinite(miss).any() \
                else float(radii[int(np.argmin(mus))])
        centre = (round(cx + r * math.cos(phi), 5), round(cy + r * math.sin(phi), 5))
        images = lensed_images(lens, centre, half_size=half + 1.0)
        reach = max(max(abs(im["theta_x"]), abs(im["theta_y"])) for im in images)
        side = 2 * int(math.ceil((reach + STRONG_LENSING_CUBE_MARGIN_ARCSEC)
                                 / base.pixel_scale_arcsec))  # half side >= reach + margin
        side = int(np.clip(side, STRONG_LENSING_MIN_SIDE, max(shape)))
        specs.append(replace(base, centre_offset_arcsec=centre, shape=(side, side),
                             lens_map_size_arcsec=0.2 * side + 1.6))
    return specs


def spec_to_dict(spec: MockSpec) -> dict[str, Any]:
    """JSON-ready dict of a spec (the lens as its component list)."""
    out = asdict(spec)
    out["lens"] = None if spec.lens is None else [dict(c) for c in spec.lens.components]
    return out

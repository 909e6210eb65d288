"""Per-band model description: settings, lines, segments, ratio ties, line profiles, units.

Everything about a band's fit that does not depend on the spaxel
(:func:`build_band_model`), the pixel-integrated Gaussian profiles shared by the
batched fitter and its outputs, and the checks/conversions of the fitters' inputs.
See the :mod:`klever_nb.fitting` docstring for the model.

References
----------
K20 §3.1; FACTS.md §6 (wavelengths), §7 (ratios), §8 (R).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import xarray as xr
from astropy import units as u
from scipy.special import ndtr

from klever_nb import constants, sky
from klever_nb.errors import ConfigError, InputError

C_KMS = constants.C_KMS
FWHM_PER_SIGMA = constants.FWHM_PER_SIGMA
_TRUNCATE_SIGMA = 7.0  # each profile is evaluated within +-7 sigma (mass outside 2.6e-12)
_INV_SQRT_2PI = 1.0 / np.sqrt(2.0 * np.pi)


# ---------------------------------------------------------------------------
# Settings and the per-band model description
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class FitSettings:
    """Every option of the line fit, in one place (the fit defaults are written here only).

    :func:`~klever_nb.fitting.fit_cube`, :func:`~klever_nb.fitting.fit_spectrum`, the
    reference twin, :func:`~klever_nb.fitting.fit_galaxy` / :func:`fit_band` (``klever-nb
    run`` and ``klever-nb fit``) and the Monte-Carlo refits all take one of these, so the
    same settings give the same fit everywhere. Invalid values raise
    :class:`~klever_nb.errors.ConfigError` on construction.

    Attributes
    ----------
    velocity_range_kms, sigma_range_kms : (float, float)
        Bounds on v (relative to the redshift) and on the intrinsic σ.
    sigma_start_kms, velocity_grid_step_kms : float
        Starting σ and the step of the coarse starting grid in v.
    window_sigmas : float
        Fit windows reach ``|v|_max + window_sigmas * σ_max,tot`` around each line.
    detection_snr : float
        ``detected = snr > detection_snr`` (K20 §3.1).
    kinematics_snr : float
        A kinematic group whose best line is below this SNR gets fixed kinematics
        (strong neighbours, else the fallback; :mod:`klever_nb.fitting` docstring).
    max_iterations, first_pass_iterations, chi2_tolerance
        Levenberg–Marquardt controls.
    resolving_power : float or None
        R = λ/FWHM overriding ``cube.attrs["resolving_power"]``.
    fixed_ratios, bounded_ratios : tuple
        Flux-ratio constraints (``constants.FIXED_RATIOS`` / ``BOUNDED_RATIOS``).
    mask_sky : bool
        Give zero weight to channels at bright OH lines (:func:`sky_mask_for_cube`).
    sky_min_relative_amplitude : float
        OH-line threshold on the common amplitude scale (:func:`klever_nb.sky.sky_mask`).
    monte_carlo, seed : int
        If ``monte_carlo > 0`` also ``flux_err_mc``: the scatter of that many refits of
        (best model + noise), each done with these same settings.
    """

    velocity_range_kms: tuple[float, float] = (-500.0, 500.0)
    sigma_range_kms: tuple[float, float] = (5.0, 400.0)
    sigma_start_kms: float = 60.0
    velocity_grid_step_kms: float = 100.0
    window_sigmas: float = 4.0
    detection_snr: float = constants.DETECTION_SNR
    kinematics_snr: float = 5.0
    max_iterations: int = 300
    first_pass_iterations: int = 15
    chi2_tolerance: float = 1e-7
    resolving_power: float | None = None
    fixed_ratios: tuple = constants.FIXED_RATIOS
    bounded_ratios: tuple = constants.BOUNDED_RATIOS
    mask_sky: bool = True
    sky_min_relative_amplitude: float = sky.MASK_MIN_RELATIVE_AMPLITUDE
    monte_carlo: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("velocity_range_kms", "sigma_range_kms"):
            value = getattr(self, name)
            try:
                pair = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise ConfigError(f"{name}={value!r}: need two numbers (low, high)") from None
            if len(pair) != 2:
                raise ConfigError(f"{name}={value!r}: need two numbers (low, high)")
            object.__setattr__(self, name, pair)
        for name in ("fixed_ratios", "bounded_ratios"):
            object.__setattr__(self, name, tuple(getattr(self, name) or ()))
        self.validate()

    def validate(self) -> None:
        vlo, vhi = self.velocity_range_kms
        slo, shi = self.sigma_range_kms
        if not vlo < vhi:
            raise ConfigError(f"velocity_range_kms={self.velocity_range_kms}: need low < high")
        if not 0 < slo < shi:
            raise ConfigError(f"sigma_range_kms={self.sigma_range_kms}: need 0 < low < high")
        if not slo <= self.sigma_start_kms <= shi:
            raise ConfigError("sigma_start_kms must lie inside sigma_range_kms")
        if int(self.monte_carlo) < 0:
            raise ConfigError(f"monte_carlo={self.monte_carlo}: need >= 0")
        if not 0 <= float(self.sky_min_relative_amplitude):
            raise ConfigError("sky_min_relative_amplitude must be >= 0")

    def describe(self) -> dict:
        """The settings as plain values (for ``attrs["settings"]`` and summaries)."""
        out = {}
        for key, value in self.__dict__.items():
            if key in ("fixed_ratios", "bounded_ratios"):
                value = [(r.weak, r.strong, r.ratio) if hasattr(r, "weak")
                         else (r.numerator, r.denominator, r.lo, r.hi) for r in value]
            out[key] = value
        return out


def as_settings(settings: FitSettings | None) -> FitSettings:
    """``settings`` itself, or the defaults; anything else is a :class:`ConfigError`."""
    if settings is None:
        return FitSettings()
    if not isinstance(settings, FitSettings):
        raise ConfigError(f"settings must be a fitting.FitSettings, got {type(settings).__name__}"
                          " (build one: FitSettings(mask_sky=False, ...))")
    return settings


@dataclass
class BandModel:
    """Everything about one band's fit that does not depend on the spaxel."""

    lines: tuple[str, ...]
    groups: tuple[str, ...]
    line_group: np.ndarray          # (n_l,) index into groups
    centre: np.ndarray              # (n_l,) observed centre at v = 0, Angstrom
    sigma_inst: np.ndarray          # (n_l,) instrumental sigma, Angstrom (0 when R unknown)
    channels: np.ndarray            # (n_c,) indices into the band's wave axis
    edge_lo: np.ndarray             # (n_c,) Angstrom
    edge_hi: np.ndarray             # (n_c,) Angstrom
    width_int: np.ndarray           # (n_c,) pixel width in the integration unit
    wave_aa: np.ndarray             # (n_c,) channel centres, Angstrom
    continuum_basis: np.ndarray     # (n_c, 2 n_seg)
    segment_of_line: np.ndarray     # (n_l,)
    segment_mid: np.ndarray         # (n_seg,) Angstrom
    segment_half: np.ndarray        # (n_seg,) Angstrom
    fixed: list = field(default_factory=list)     # (weak, strong, ratio) indices
    bounded: list = field(default_factory=list)   # (num, den, lo, hi) indices
    combos: list = field(default_factory=list)    # [(states, M (n_l, n_par))]
    full_maps: list = field(default_factory=list)  # per combo: (n_l + n_cont, n_par + n_cont)
    vel_bounds: tuple = (-500.0, 500.0)
    sig_bounds: tuple = (5.0, 400.0)

    @property
    def n_lines(self) -> int:
        return len(self.lines)

    @property
    def n_theta(self) -> int:
        return 2 * len(self.groups)

    @property
    def n_cont(self) -> int:
        return self.continuum_basis.shape[1]

    def theta_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lo = np.tile([self.vel_bounds[0], self.sig_bounds[0]], len(self.groups))
        hi = np.tile([self.vel_bounds[1], self.sig_bounds[1]], len(self.groups))
        return lo.astype(float), hi.astype(float)


def _pixel_edges(wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper pixel edges: halfway between centres, mirrored at the ends."""
    mid = 0.5 * (wave[1:] + wave[:-1])
    first = wave[0] - (mid[0] - wave[0])
    last = wave[-1] + (wave[-1] - mid[-1])
    edges = np.concatenate([[first], mid, [last]])
    return edges[:-1], edges[1:]


def _combos(n_l: int, fixed: list, bounded: list) -> list:
    """Flux-parameter maps M (line fluxes F = M a) for every bound state of the bounded pairs."""
    out = []
    for states in itertools.product(("free", "lo", "hi"), repeat=len(bounded)):
        rows = np.eye(n_l)
        dropped = set()
        for weak, strong, ratio in fixed:
            rows[weak] = rows[strong] / ratio
            dropped.add(weak)
        for (num, den, lo, hi), state in zip(bounded, states, strict=True):
            if state != "free":
                rows[num] = rows[den] * (lo if state == "lo" else hi)
                dropped.add(num)
        keep = [j for j in range(n_l) if j not in dropped]
        out.append((states, rows[:, keep]))
    return out


def build_band_model(wave_um: np.ndarray, *, redshift: float, lines, resolving_power,
                     settings: FitSettings, angstrom_to_int: float = 1.0) -> BandModel | None:
    """Describe the fit of one band: the lines inside it, segments, ties, bound states.

    Returns None when no requested line falls inside the band at ``redshift``.
    """
    wave_aa = np.asarray(wave_um, dtype=float) * 1e4
    wmin, wmax = np.nanmin(wave_aa), np.nanmax(wave_aa)
    names = tuple(lines) if lines is not None else tuple(constants.LINES)
    inside = [n for n in names
              if wmin <= constants.LINES[n].wave_vac * (1 + redshift) <= wmax]
    if not inside:
        return None
    inside.sort(key=lambda n: constants.LINES[n].wave_vac)
    centre = np.array([constants.LINES[n].wave_vac * (1 + redshift) for n in inside])
    groups = tuple(dict.fromkeys(constants.LINES[n].group for n in inside))
    line_group = np.array([groups.index(constants.LINES[n].group) for n in inside])
    known_r = resolving_power is not None and np.isfinite(resolving_power)
    sigma_inst = centre / (resolving_power * FWHM_PER_SIGMA) if known_r else np.zeros_like(centre)
    vmax = max(abs(settings.velocity_range_kms[0]), abs(settings.velocity_range_kms[1]))
    sig_tot = np.hypot(settings.sigma_range_kms[1], sigma_inst / centre * C_KMS)
    half = centre * (vmax + settings.window_sigmas * sig_tot) / C_KMS
    lo_all, hi_all = _pixel_edges(wave_aa)
    near = np.zeros(wave_aa.size, dtype=bool)
    for c, h in zip(centre, half, strict=True):
        near |= (hi_all >= c - h) & (lo_all <= c + h)
    channels = np.flatnonzero(near)
    # segments: runs of consecutive channels
    breaks = np.flatnonzero(np.diff(channels) > 1) + 1
    seg_id = np.zeros(channels.size, dtype=int)
    seg_id[breaks] = 1
    seg_id = np.cumsum(seg_id)
    n_seg = int(seg_id[-1]) + 1
    w = wave_aa[channels]
    seg_mid = np.array([0.5 * (w[seg_id == s].min() + w[seg_id == s].max()) for s in range(n_seg)])
    seg_half = np.array([max(0.5 * (w[seg_id == s].max() - w[seg_id == s].min()), 1e-3)
                         for s in range(n_seg)])
    basis = np.zeros((channels.size, 2 * n_seg))
    basis[np.arange(channels.size), 2 * seg_id] = 1.0
    basis[np.arange(channels.size), 2 * seg_id + 1] = (w - seg_mid[seg_id]) / seg_half[seg_id]
    seg_of_line = seg_id[np.clip(np.searchsorted(w, centre), 0, w.size - 1)]
    index = {n: i for i, n in enumerate(inside)}
    fixed = [(index[r.weak], index[r.strong], float(r.ratio)) for r in settings.fixed_ratios
             if r.weak in index and r.strong in index]
    bounded = [(index[r.numerator], index[r.denominator], float(r.lo), float(r.hi))
               for r in settings.bounded_ratios
               if r.numerator in index and r.denominator in index]
    model = BandModel(
        lines=tuple(inside), groups=groups, line_group=line_group, centre=centre,
        sigma_inst=sigma_inst, channels=channels, edge_lo=lo_all[channels],
        edge_hi=hi_all[channels], width_int=(hi_all - lo_all)[channels] * angstrom_to_int,
        wave_aa=w, continuum_basis=basis, segment_of_line=seg_of_line, segment_mid=seg_mid,
        segment_half=seg_half, fixed=fixed, bounded=bounded,
        vel_bounds=tuple(settings.velocity_range_kms),
        sig_bounds=tuple(settings.sigma_range_kms),
    )
    model.combos = _combos(len(inside), fixed, bounded)
    model.full_maps = [_full_map(model, m) for _, m in model.combos]
    return model


# ---------------------------------------------------------------------------
# Line profiles
# ---------------------------------------------------------------------------
def _kinematics(model: BandModel, theta: np.ndarray) -> tuple[np.ndarray, ...]:
    """Line centres and observed sigmas (Angstrom), (N, n_l), and d/dv, d/dsigma factors."""
    v = theta[:, 0::2][:, model.line_group]
    sig = theta[:, 1::2][:, model.line_group]
    mu = model.centre * (1.0 + v / C_KMS)
    s = np.sqrt((model.centre * sig / C_KMS) ** 2 + model.sigma_inst ** 2)
    dmu_dv = np.broadcast_to(model.centre / C_KMS, mu.shape)
    ds_dsig = (model.centre / C_KMS) ** 2 * sig / s
    return mu, s, dmu_dv, ds_dsig


def _profiles(model: BandModel, mu, s, derivs: bool):
    """Pixel-integrated unit-flux Gaussians (N, n_c, n_l) and their mu, s derivatives."""
    n, n_l = mu.shape
    n_c = model.edge_lo.size
    prof = np.zeros((n, n_c, n_l))
    dmu = np.zeros((n, n_c, n_l)) if derivs else None
    ds = np.zeros((n, n_c, n_l)) if derivs else None
    for j in range(n_l):
        lo = np.min(mu[:, j] - _TRUNCATE_SIGMA * s[:, j])
        hi = np.max(mu[:, j] + _TRUNCATE_SIGMA * s[:, j])
        i0 = int(np.searchsorted(model.edge_hi, lo))
        i1 = int(np.searchsorted(model.edge_lo, hi, side="right"))
        if i1 <= i0:
            continue
        m, sj = mu[:, j, None], s[:, j, None]
        a = (model.edge_lo[i0:i1] - m) / sj
        b = (model.edge_hi[i0:i1] - m) / sj
        # difference of normal CDFs, computed on the side where it does not cancel
        right = a > 0
        diff = np.where(right, ndtr(-a) - ndtr(-b), ndtr(b) - ndtr(a))
        width = model.width_int[i0:i1]
        prof[:, i0:i1, j] = diff / width
        if derivs:
            pa = np.exp(-0.5 * a * a) * _INV_SQRT_2PI
            pb = np.exp(-0.5 * b * b) * _INV_SQRT_2PI
            dmu[:, i0:i1, j] = -(pb - pa) / (sj * width)
            ds[:, i0:i1, j] = -(b * pb - a * pa) / (sj * width)
    return prof, dmu, ds


def _full_map(model: BandModel, m_lines: np.ndarray) -> np.ndarray:
    """Block-diagonal map (n_l + n_cont, n_par + n_cont) from parameters to coefficients."""
    n_l, n_par = m_lines.shape
    nc = model.n_cont
    full = np.zeros((n_l + nc, n_par + nc))
    full[:n_l, :n_par] = m_lines
    full[n_l:, n_par:] = np.eye(nc)
    return full


# ---------------------------------------------------------------------------
# Units, inputs
# ---------------------------------------------------------------------------
def integrated_flux_units(flux_units: str | None) -> tuple[str, float, str]:
    """Units of an integrated line flux, and the factor from Angstrom to the integration unit.

    The integral runs over the wavelength unit that the flux density is "per"
    (``1e-20 erg/(s cm2 Angstrom)`` -> integrate in Angstrom -> ``1e-20 erg / (s cm2)``;
    per-arcsec² stays per arcsec²). Without such a unit (F_nu, counts, no units) the
    integral runs over Angstrom and the unit is the product.

    Returns
    -------
    units : str
        astropy string of flux units x integration unit, simplified exactly.
    angstrom_to_int : float
        One Angstrom expressed in the integration unit.
    integration_unit : str
    """
    if not flux_units:
        return "Angstrom", 1.0, "Angstrom"
    try:
        unit = u.Unit(flux_units, parse_strict="raise")
    except ValueError as err:
        raise InputError(f"flux units {flux_units!r}: astropy cannot parse them ({err}); "
                         "fix BUNIT / flux.attrs['units']") from None
    per_length = [base for base, power in zip(unit.bases, unit.powers, strict=True)
                  if power == -1 and base.physical_type == "length"]
    wave_unit = per_length[-1] if per_length else u.AA
    result = unit * wave_unit
    return result.to_string(), float((1 * u.AA).to_value(wave_unit)), wave_unit.to_string()


def _check_cube(cube: xr.Dataset) -> None:
    for name in ("flux", "noise"):
        if name not in cube:
            raise InputError(f"cube has no {name!r} variable; a cube needs flux and noise "
                             "on (wave, y, x) (DESIGN.md data model)")
    if "wave" not in cube.flux.dims:
        raise InputError("cube flux has no 'wave' dimension (DESIGN.md data model)")


def _resolving_power(cube: xr.Dataset, resolving_power) -> float | None:
    value = resolving_power if resolving_power is not None else cube.attrs.get("resolving_power")
    try:
        value = float(value) if value is not None else None
    except (TypeError, ValueError):
        raise ConfigError(f"resolving_power={value!r} is not a number") from None
    if value is not None and (not np.isfinite(value) or value <= 0):
        return None
    return value


def _sky_resolving_power(cube: xr.Dataset, r_fit: float | None) -> float:
    if r_fit is not None:
        return r_fit
    inst = constants.INSTRUMENTS.get(str(cube.attrs.get("instrument", "")))
    band = inst.bands.get(str(cube.attrs.get("band", ""))) if inst else None
    return band.resolving_power if band else 3000.0


def fit_sky_mask(cube: xr.Dataset, settings: FitSettings | None = None) -> np.ndarray:
    """The OH-line channel mask (True = zero weight) the fit of ``cube`` uses.

    One function for the fitters and the line-fit widget: the window width comes
    from ``settings.resolving_power``, else ``cube.attrs["resolving_power"]``, else
    the instrument band's R, else 3000; the threshold from
    ``settings.sky_min_relative_amplitude`` (:func:`klever_nb.sky.sky_mask`). All
    False when ``settings.mask_sky`` is off. Returned on the cube's own wave order.
    """
    settings = as_settings(settings)
    wave_um = np.asarray(cube["wave"].values, dtype=float)
    if not settings.mask_sky or wave_um.size == 0:
        return np.zeros(wave_um.shape, dtype=bool)
    r_fit = _resolving_power(cube, settings.resolving_power)
    return sky.sky_mask(wave_um, resolving_power=_sky_resolving_power(cube, r_fit),
                        min_relative_amplitude=settings.sky_min_relative_amplitude)


def _check_lines(lines) -> tuple[str, ...] | None:
    if lines is None:
        return None
    if isinstance(lines, str):
        lines = (lines,)
    unknown = [n for n in lines if n not in constants.LINES]
    if unknown:
        raise ConfigError(f"lines: unknown name(s) {unknown}; known: {list(constants.LINES)}")
    return tuple(lines)

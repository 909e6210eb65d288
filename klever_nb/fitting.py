"""Emission-line fitting of whole cubes: batched variable projection, with a slow scipy twin.

Model (K20 §3.1; FACTS.md §6–8). In each band, every catalogue line inside the band
at the redshift is one Gaussian in wavelength, **integrated over each wavelength
pixel** (pixel edges halfway between channel centres), parametrised by its
integrated flux F. Lines of one kinematic group (``constants.LINES[name].group``)
share a velocity v (km/s relative to ``redshift``) and an intrinsic dispersion σ
(km/s); the observed width is

    σ_λ² = (λ₀ σ / c)² + (λ₀ / (2.3548 R))²,   centre μ = λ₀ (1 + v / c),

with λ₀ = λ_rest (1 + z) and R the band's resolving power (when R is unknown the
fitted σ is the observed σ, and ``attrs["sigma_is_observed"]`` says so). A linear
continuum is fitted in each *segment*: the union of the line windows
λ₀ (1 ± (|v|_max + 4 σ_max,tot)/c), merged where they overlap. Channels with NaN
flux or noise, non-positive noise, or at a bright OH line
(:func:`klever_nb.sky.sky_mask`) get zero weight; the rest inverse-variance weight.

Constraints act on integrated fluxes: fixed ratios (``weak = strong / ratio``) are
folded into the design matrix; bounded ratios ``lo <= F_num / F_den <= hi`` are
enforced exactly: the pair keeps a common, free sign (so that noise fluctuations
give symmetric errors) and when the unconstrained solution violates a bound the
pair is re-solved on each bound line ``F_num = lo F_den`` / ``hi F_den``; the
lowest χ² of the feasible candidates wins (exhaustive over pairs: exact).

Fast path (:func:`fit_cube`): variable projection. For given (v, σ) of all groups,
fluxes and continua follow from one weighted linear least-squares solve (all
spaxels of a chunk at once, through Gram matrices); Levenberg–Marquardt on the
(v, σ) only, with analytic derivatives and Kaufman's projected Jacobian, started
from a coarse velocity grid; bounds by projection. Errors come from the inverse of
the full Gauss–Newton normal matrix in all parameters (fluxes, continua, v, σ),
i.e. the flux errors are marginalised over the kinematics; parameters sitting on
a bound are held fixed. Slow twin (:func:`fit_spectrum_reference`): the same model
written plainly, optimised per spectrum with :func:`scipy.optimize.least_squares`.

Look-elsewhere guard: a free (v, σ) search over ±500 km/s finds >3σ noise peaks in
several per cent of line-free spaxels. When no line of a group reaches
``kinematics_snr`` (default 5) the group's kinematics are not trusted: its fluxes
are re-measured with (v, σ) fixed to those of the neighbouring spaxels where the
group is strong (Gaussian-weighted, σ = 1.5 spaxels), else to ``fallback_kinematics``
(default: the median over strong spaxels, else v = 0 and σ = 60 km/s);
``kinematics_forced`` is set, ``velocity``/``sigma`` hold the values used and their
errors are NaN. Detection (SNR > ``detection_snr``) is then a single-trial test.

Speed: the Gram matrices are accumulated sparsely (each line only over ±7σ) by a
numba kernel when numba is importable (``USE_NUMBA``; single-threaded by default,
``NUMBA_THREADS``), else by dense numpy matrix products; both paths give the same
numbers (tested to 1e-9). Numbers in ``benchmarks/bench_linefit.py``.

References
----------
K20 §3.1; FACTS.md §6 (wavelengths), §7 (ratios), §8 (R), §12 (variable projection).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

import numpy as np
import xarray as xr
from astropy import units as u
from scipy.special import ndtr

from klever_nb import constants, sky
from klever_nb.errors import ConfigError, InputError

C_KMS = constants.C_KMS
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
_TRUNCATE_SIGMA = 7.0  # each profile is evaluated within +-7 sigma (mass outside 2.6e-12)
_INV_SQRT_2PI = 1.0 / np.sqrt(2.0 * np.pi)


# ---------------------------------------------------------------------------
# Settings and the per-band model description
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class FitSettings:
    """Options shared by the fast fitter and its reference twin (see :func:`fit_cube`)."""

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

    def validate(self) -> None:
        vlo, vhi = self.velocity_range_kms
        slo, shi = self.sigma_range_kms
        if not vlo < vhi:
            raise ConfigError(f"velocity_range_kms={self.velocity_range_kms}: need low < high")
        if not 0 < slo < shi:
            raise ConfigError(f"sigma_range_kms={self.sigma_range_kms}: need 0 < low < high")
        if not slo <= self.sigma_start_kms <= shi:
            raise ConfigError("sigma_start_kms must lie inside sigma_range_kms")


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
                     fixed_ratios, bounded_ratios, settings: FitSettings,
                     angstrom_to_int: float = 1.0) -> BandModel | None:
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
    fixed = [(index[r.weak], index[r.strong], float(r.ratio)) for r in fixed_ratios
             if r.weak in index and r.strong in index]
    bounded = [(index[r.numerator], index[r.denominator], float(r.lo), float(r.hi))
               for r in bounded_ratios if r.numerator in index and r.denominator in index]
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
# Optional numba kernel: the same Gram matrix, accumulated sparsely per spaxel
# ---------------------------------------------------------------------------
#: Use the compiled kernel when numba is importable (set False to force pure numpy).
USE_NUMBA = True
#: The kernels are compiled serial by default: on a shared 2-core machine a busy core
#: stalls every parallel loop (3 ms single-threaded vs 12-16 ms on 2 threads under
#: load) and parallel compilation is slower. Set the environment variable
#: ``KLEVER_NB_NUMBA_PARALLEL=1`` before import to compile ``prange`` loops in parallel;
#: ``NUMBA_THREADS`` (None = numba's default) then sets the thread count.
NUMBA_PARALLEL = os.environ.get("KLEVER_NB_NUMBA_PARALLEL", "0") == "1"
NUMBA_THREADS: int | None = 1


def _make_numba_kernel():
    try:
        import math

        import numba
    except ImportError:  # pragma: no cover - numba is optional
        return None

    sqrt_half = math.sqrt(0.5)
    inv_sqrt_2pi = 1.0 / math.sqrt(2.0 * math.pi)

    @numba.njit(parallel=NUMBA_PARALLEL, cache=True)
    def kernel(mu, s, edge_lo, edge_hi, width, seg, xrel, w, yw, n_seg, derivs, trunc, base):
        n_sp, n_l = mu.shape
        n_c = edge_lo.size
        k1 = n_l + 2 * n_seg + 1
        kk = k1 + 2 * n_l if derivs else k1
        ky = k1 - 1
        out = np.zeros((n_sp, kk, kk))
        use_base = base.shape[0] == n_sp
        for n in numba.prange(n_sp):
            g = out[n]
            # theta-independent block: continuum x continuum, continuum x y, y x y
            if use_base:
                for a_ in range(n_l, k1):
                    for b_ in range(a_, k1):
                        g[a_, b_] = base[n, a_, b_]
            for i in range(n_c if not use_base else 0):
                wi = w[n, i]
                if wi == 0.0:
                    continue
                c0 = n_l + 2 * seg[i]
                x = xrel[i]
                w2 = wi * wi
                g[c0, c0] += w2
                g[c0, c0 + 1] += w2 * x
                g[c0 + 1, c0 + 1] += w2 * x * x
                g[c0, ky] += wi * yw[n, i]
                g[c0 + 1, ky] += wi * yw[n, i] * x
                g[ky, ky] += yw[n, i] * yw[n, i]
            # unweighted profiles (and derivatives) of every line on its own window
            i0 = np.empty(n_l, np.int64)
            i1 = np.empty(n_l, np.int64)
            for j in range(n_l):
                i0[j] = np.searchsorted(edge_hi, mu[n, j] - trunc * s[n, j])
                i1[j] = np.searchsorted(edge_lo, mu[n, j] + trunc * s[n, j], side="right")
            prof = np.empty((3 * n_l, n_c))
            for j in range(n_l):
                sj = s[n, j]
                prev_edge = np.nan
                qa = 0.0
                pa = 0.0
                for i in range(i0[j], i1[j]):
                    a = (edge_lo[i] - mu[n, j]) / sj
                    b = (edge_hi[i] - mu[n, j]) / sj
                    if edge_lo[i] != prev_edge:  # contiguous pixels share an edge
                        qa = 0.5 * math.erfc(a * sqrt_half)
                        pa = math.exp(-0.5 * a * a) * inv_sqrt_2pi
                    qb = 0.5 * math.erfc(b * sqrt_half)
                    pb = math.exp(-0.5 * b * b) * inv_sqrt_2pi
                    inv = 1.0 / width[i]
                    prof[j, i] = (qa - qb) * inv
                    if derivs:
                        prof[n_l + j, i] = -(pb - pa) * inv / sj
                        prof[2 * n_l + j, i] = -(b * pb - a * pa) * inv / sj
                    prev_edge = edge_hi[i]
                    qa = qb
                    pa = pb
            # line columns (and derivative columns) against everything; only lines whose
            # windows overlap can share a channel
            n_types = 3 if derivs else 1
            for j in range(n_l):
                for t in range(n_types):
                    r = t * n_l + j
                    col_r = r if t == 0 else k1 + (r - n_l)
                    for i in range(i0[j], i1[j]):
                        wi = w[n, i]
                        if wi == 0.0:
                            continue
                        pr = prof[r, i] * wi
                        c0 = n_l + 2 * seg[i]
                        g[col_r, c0] += pr * wi
                        g[col_r, c0 + 1] += pr * wi * xrel[i]
                        g[col_r, ky] += pr * yw[n, i]
                    for j2 in range(n_l):
                        lo = max(i0[j], i0[j2])
                        hi = min(i1[j], i1[j2])
                        if hi <= lo:
                            continue
                        for t2 in range(n_types):
                            r2 = t2 * n_l + j2
                            if r2 < r:
                                continue
                            col2 = r2 if t2 == 0 else k1 + (r2 - n_l)
                            acc = 0.0
                            for i in range(lo, hi):
                                wi = w[n, i]
                                acc += prof[r, i] * prof[r2, i] * wi * wi
                            g[col_r, col2] += acc
            # symmetrise: copy whichever triangle was filled
            for a_ in range(kk):
                for b_ in range(a_ + 1, kk):
                    v = g[a_, b_] + g[b_, a_]
                    g[a_, b_] = v
                    g[b_, a_] = v
        return out

    @numba.njit(parallel=NUMBA_PARALLEL, cache=True)
    def kernel_jac(mu, s, edge_lo, edge_hi, width, seg, xrel, w, yw, n_seg, mix, trunc):
        n_sp, n_l = mu.shape
        n_c = edge_lo.size
        nt = mix.shape[2]
        k1 = n_l + 2 * n_seg + 1
        ky = k1 - 1
        cross = np.zeros((n_sp, k1, nt))
        jj = np.zeros((n_sp, nt, nt))
        for n in numba.prange(n_sp):
            i0 = np.empty(n_l, np.int64)
            i1 = np.empty(n_l, np.int64)
            imin = n_c
            imax = 0
            for j in range(n_l):
                i0[j] = np.searchsorted(edge_hi, mu[n, j] - trunc * s[n, j])
                i1[j] = np.searchsorted(edge_lo, mu[n, j] + trunc * s[n, j], side="right")
                imin = min(imin, i0[j])
                imax = max(imax, i1[j])
            if imax <= imin:
                continue
            prof = np.empty((n_l, n_c))
            jac = np.zeros((nt, n_c))
            for j in range(n_l):
                sj = s[n, j]
                for i in range(i0[j], i1[j]):
                    a = (edge_lo[i] - mu[n, j]) / sj
                    b = (edge_hi[i] - mu[n, j]) / sj
                    inv = 1.0 / width[i]
                    prof[j, i] = 0.5 * (math.erfc(a * sqrt_half) - math.erfc(b * sqrt_half)) * inv
                    pa = math.exp(-0.5 * a * a) * inv_sqrt_2pi
                    pb = math.exp(-0.5 * b * b) * inv_sqrt_2pi
                    dmu = -(pb - pa) * inv / sj
                    dsg = -(b * pb - a * pa) * inv / sj
                    for t in range(nt):
                        jac[t, i] += mix[n, j, t] * dmu + mix[n, n_l + j, t] * dsg
            cr = cross[n]
            q = jj[n]
            for i in range(imin, imax):
                wi = w[n, i]
                if wi == 0.0:
                    continue
                w2 = wi * wi
                c0 = n_l + 2 * seg[i]
                for t in range(nt):
                    jt = jac[t, i]
                    if jt == 0.0:
                        continue
                    cr[c0, t] += w2 * jt
                    cr[c0 + 1, t] += w2 * xrel[i] * jt
                    cr[ky, t] += wi * yw[n, i] * jt
                    for j in range(n_l):
                        if i >= i0[j] and i < i1[j]:
                            cr[j, t] += w2 * prof[j, i] * jt
                    for t2 in range(nt):
                        q[t, t2] += w2 * jt * jac[t2, i]
        return cross, jj

    return kernel, kernel_jac


_numba_kernel, _numba_kernel_jac = _make_numba_kernel() or (None, None)


# ---------------------------------------------------------------------------
# Batched kernel
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


def _solve_sym(mat: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve stacked symmetric systems with Jacobi scaling; singular ones by pseudo-inverse."""
    d = np.sqrt(np.abs(np.diagonal(mat, axis1=-2, axis2=-1)))
    d = np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), 1.0)
    scaled = mat * d[..., :, None] * d[..., None, :]
    matrix_rhs = rhs.ndim == mat.ndim
    srhs = rhs * d[..., None] if matrix_rhs else (rhs * d)[..., None]
    try:
        sol = np.linalg.solve(scaled, srhs)
    except np.linalg.LinAlgError:
        sol = np.matmul(np.linalg.pinv(scaled, hermitian=True), srhs)
    return sol * d[..., None] if matrix_rhs else sol[..., 0] * d


def _guard_empty(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Replace rows/columns of parameters without data (zero diagonal) by the identity."""
    diag = np.diagonal(gram, axis1=-2, axis2=-1)
    scale = np.max(np.abs(diag), axis=-1, keepdims=True)
    empty = diag <= 1e-14 * np.where(scale > 0, scale, 1.0)
    if empty.any():  # modified in place
        rhs[empty] = 0.0
        n, k = np.nonzero(empty)
        gram[n, k, :] = 0.0
        gram[n, :, k] = 0.0
        gram[n, k, k] = 1.0
    return empty


@dataclass
class _Eval:
    chi2: np.ndarray
    coef: np.ndarray        # (N, n_l + n_cont) line fluxes then continuum coefficients
    combo: np.ndarray       # (N,) chosen combo index
    grad: np.ndarray | None = None
    hess: np.ndarray | None = None
    normal: np.ndarray | None = None   # full normal matrix in (params of combo, theta)
    lin_params: np.ndarray | None = None


def _full_map(model: BandModel, m_lines: np.ndarray) -> np.ndarray:
    """Block-diagonal map (n_l + n_cont, n_par + n_cont) from parameters to coefficients."""
    n_l, n_par = m_lines.shape
    nc = model.n_cont
    full = np.zeros((n_l + nc, n_par + nc))
    full[:n_l, :n_par] = m_lines
    full[n_l:, n_par:] = np.eye(nc)
    return full


def _gram_numpy(model: BandModel, mu, s, w, yw, derivs: bool) -> np.ndarray:
    """Gram matrix of the weighted columns [P | C | y | dP/dmu | dP/ds] (dense numpy path)."""
    prof, dmu, ds = _profiles(model, mu, s, derivs)
    cols = [prof * w[:, :, None], model.continuum_basis[None] * w[:, :, None], yw[:, :, None]]
    if derivs:
        cols += [dmu * w[:, :, None], ds * w[:, :, None]]
    x = np.concatenate(cols, axis=2)
    return np.matmul(x.transpose(0, 2, 1), x)


def _numba_args(model: BandModel):
    seg = np.argmax(model.continuum_basis[:, 0::2], axis=1)
    xrel = model.continuum_basis[np.arange(seg.size), 2 * seg + 1]
    return model.edge_lo, model.edge_hi, model.width_int, seg, xrel


def _use_numba() -> bool:
    return _numba_kernel is not None and USE_NUMBA


def _call_numba(kernel, *args):
    import numba

    if NUMBA_THREADS is None or not NUMBA_PARALLEL:
        return kernel(*args)
    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(NUMBA_THREADS), numba.config.NUMBA_NUM_THREADS)))
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(previous)


def base_gram(model: BandModel, yw, w) -> np.ndarray:
    """The theta-independent block of the Gram matrix (continuum and data columns), (N, k1, k1)
    upper triangle, computed once per fit instead of at every evaluation."""
    n_l = model.n_lines
    x = np.concatenate([model.continuum_basis[None] * w[:, :, None], yw[:, :, None]], axis=2)
    block = np.matmul(x.transpose(0, 2, 1), x)
    k1 = n_l + model.n_cont + 1
    out = np.zeros((w.shape[0], k1, k1))
    out[:, n_l:, n_l:] = np.triu(block)
    return out


_NO_BASE = np.zeros((0, 1, 1))


def _extended_gram(model: BandModel, mu, s, w, yw, derivs: bool, base=None) -> np.ndarray:
    """Gram matrix of [P | C | y] (and, with ``derivs``, of the dP/dmu, dP/ds columns)."""
    if _use_numba():
        return _call_numba(_numba_kernel, np.ascontiguousarray(mu), np.ascontiguousarray(s),
                           *_numba_args(model), np.ascontiguousarray(w),
                           np.ascontiguousarray(yw), model.n_cont // 2, derivs,
                           _TRUNCATE_SIGMA, _NO_BASE if base is None else base)
    return _gram_numpy(model, mu, s, w, yw, derivs)


def _jacobian_products(model: BandModel, mu, s, w, yw, mix) -> tuple[np.ndarray, np.ndarray]:
    """[P | C | y]^T J and J^T J for the weighted Jacobian J = sum_l mix_l . dP_l (N, n_c, nt)."""
    if _use_numba():
        return _call_numba(_numba_kernel_jac, np.ascontiguousarray(mu),
                           np.ascontiguousarray(s),
                                 *_numba_args(model), np.ascontiguousarray(w),
                                 np.ascontiguousarray(yw), model.n_cont // 2,
                                 np.ascontiguousarray(mix), _TRUNCATE_SIGMA)
    n_l = model.n_lines
    prof, dmu, ds = _profiles(model, mu, s, True)
    jac = (np.matmul(dmu, mix[:, :n_l, :]) + np.matmul(ds, mix[:, n_l:, :])) * w[:, :, None]
    x1 = np.concatenate([prof * w[:, :, None], model.continuum_basis[None] * w[:, :, None],
                         yw[:, :, None]], axis=2)
    return np.matmul(x1.transpose(0, 2, 1), jac), np.matmul(jac.transpose(0, 2, 1), jac)


def _evaluate(model: BandModel, theta, yw, w, derivs: bool, frozen=None, base=None,
              bounded: bool = True) -> _Eval:
    """Variable-projection evaluation of a batch: linear solve for every bound state, choose.

    ``yw`` = flux / noise and ``w`` = 1 / noise (0 where masked), both (N, n_c); ``base``
    the theta-independent Gram block (:func:`base_gram`) if already known. With
    ``bounded=False`` the ratio bounds are ignored (used for the starting grid only).
    """
    mu, s, dmu_dv, ds_dsig = _kinematics(model, theta)
    gram = _extended_gram(model, mu, s, w, yw, False, base)
    n_l, nc = model.n_lines, model.n_cont
    yy = gram[:, -1, -1]
    n = theta.shape[0]
    best_chi2 = np.full(n, np.inf)
    best_coef = np.zeros((n, n_l + nc))
    best_combo = np.zeros(n, dtype=int)
    solutions = {}
    for k, (states, _) in enumerate(model.combos):
        full = model.full_maps[k]
        g = full.T @ gram[:, :-1, :-1] @ full
        b = gram[:, :-1, -1] @ full
        _guard_empty(g, b)
        a = _solve_sym(g, b)
        chi2 = yy - np.einsum("ni,ni->n", a, b)
        coef = a @ full.T
        feasible = np.ones(n, dtype=bool)
        for (num, den, lo, hi), state in zip(model.bounded, states, strict=True):
            if state == "free":
                fn, fd = coef[:, num], coef[:, den]
                eps = 1e-12 * np.abs(fd)
                ok_pos = (fd > 0) & (fn >= lo * fd - eps) & (fn <= hi * fd + eps)
                ok_neg = (fd < 0) & (fn <= lo * fd + eps) & (fn >= hi * fd - eps)
                feasible &= ok_pos | ok_neg | ((fd == 0) & (fn == 0))
        solutions[k] = (g, a)
        if not bounded:
            feasible[:] = True
        better = feasible & (chi2 < best_chi2)
        best_chi2 = np.where(better, chi2, best_chi2)
        best_coef[better] = coef[better]
        best_combo[better] = k
        if k == 0 and feasible.all():
            break
    out = _Eval(chi2=np.maximum(best_chi2, 0.0), coef=best_coef, combo=best_combo)
    if not derivs:
        return out
    # d(model)/d(theta) = sum over lines of F_l dP_l/dmu dmu/dv (and sigma alike)
    flux = best_coef[:, :n_l]
    ng = len(model.groups)
    nt = 2 * ng
    mix = np.zeros((n, 2 * n_l, nt))
    lines = np.arange(n_l)
    mix[:, lines, 2 * model.line_group] = flux * dmu_dv
    mix[:, n_l + lines, 2 * model.line_group + 1] = flux * ds_dsig
    if frozen is not None:
        mix *= ~frozen[:, None, :]
    cross, jj = _jacobian_products(model, mu, s, w, yw, mix)     # (N, k1, nt), (N, nt, nt)
    grad = np.zeros((n, nt))
    hess = np.zeros((n, nt, nt))
    n_par_max = max(m.shape[1] for _, m in model.combos) + nc
    normal = np.zeros((n, n_par_max + nt, n_par_max + nt))
    lin = np.zeros((n, n_par_max))
    for k in solutions:
        sel = best_combo == k
        if not sel.any():
            continue
        full = model.full_maps[k]
        npar = full.shape[1]
        g, a = solutions[k]
        if not sel.all():
            g, a = g[sel], a[sel]
        aj = np.einsum("ip,nit->npt", full, cross[sel][:, :-1, :])   # A_w^T J
        jty = cross[sel][:, -1, :]
        grad[sel] = jty - np.einsum("npt,np->nt", aj, a)
        ginv_aj = _solve_sym(g, aj)
        hess[sel] = jj[sel] - np.einsum("npt,npu->ntu", aj, ginv_aj)
        blk = np.zeros((int(sel.sum()), n_par_max + nt, n_par_max + nt))
        blk[:, :npar, :npar] = g
        blk[:, :npar, n_par_max:] = aj
        blk[:, n_par_max:, :npar] = aj.transpose(0, 2, 1)
        blk[:, n_par_max:, n_par_max:] = jj[sel]
        blk[:, npar:n_par_max, npar:n_par_max] = np.eye(n_par_max - npar)
        normal[sel] = blk
        lin[sel, :npar] = a
    out.grad, out.hess, out.normal, out.lin_params = grad, hess, normal, lin
    return out


def _take(ev: _Eval, idx) -> dict:
    return {k: getattr(ev, k)[idx] for k in ("chi2", "coef", "combo", "grad", "hess",
                                            "normal", "lin_params")}


def _levenberg_marquardt(model: BandModel, theta, yw, w, settings: FitSettings, frozen,
                         max_iterations: int):
    """Batched, bounded Levenberg–Marquardt on (v, sigma) with variable projection.

    Returns the final theta, the state at it (dict of arrays), converged flags and
    iteration counts. Spaxels leave the active set when converged.
    """
    lo, hi = model.theta_bounds()
    theta = np.clip(theta, lo, hi)
    base = base_gram(model, yw, w) if _use_numba() else None
    ev = _evaluate(model, theta, yw, w, True, frozen, base)
    state = _take(ev, slice(None))
    n, nt = theta.shape
    lam = np.full(n, 1e-3)
    # spaxels with every (v, sigma) frozen only need the linear solve done above
    converged = frozen.all(axis=1).copy()
    active = ~converged
    n_iter = np.zeros(n, dtype=int)
    tol = settings.chi2_tolerance
    span = hi - lo
    eye = np.eye(nt)
    for _ in range(max_iterations):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        th = theta[idx]
        g = state["grad"][idx].copy()
        h = state["hess"][idx]
        # freeze parameters on a bound whose gradient points outwards, and frozen ones
        hold = ((th <= lo + 1e-9 * span) & (g < 0)) | ((th >= hi - 1e-9 * span) & (g > 0))
        hold |= frozen[idx]
        diag = np.maximum(np.diagonal(h, axis1=1, axis2=2), 1e-30)
        damp = h + lam[idx, None, None] * diag[:, None, :] * eye
        damp = np.where(hold[:, :, None] | hold[:, None, :], 0.0, damp)
        damp[hold] += 0.0
        ii, kk = np.nonzero(hold)
        damp[ii, kk, kk] = 1.0
        g[hold] = 0.0
        step = _solve_sym(damp, g)
        trial = np.clip(th + step, lo, hi)
        trial[hold] = th[hold]
        pred = np.einsum("nt,nt->n", trial - th, g)
        tev = _evaluate(model, trial, yw[idx], w[idx], True, frozen[idx],
                        None if base is None else base[idx])
        dchi = state["chi2"][idx] - tev.chi2
        acc = dchi > 0
        n_iter[idx] += 1
        if acc.any():
            ai = idx[acc]
            theta[ai] = trial[acc]
            new = _take(tev, acc)
            for key, val in new.items():
                state[key][ai] = val
        lam[idx] = np.where(acc, np.maximum(lam[idx] / 10.0, 1e-9), lam[idx] * 10.0)
        done = (acc & (dchi < tol)) | (~acc & (np.abs(dchi) < tol) & (pred < 10 * tol))
        done |= lam[idx] > 1e10
        done |= np.all(np.abs(trial - th) <= 1e-10 * span, axis=1) & ~acc
        converged[idx[done]] = True
        active[idx[done]] = False
    return theta, state, converged, n_iter


def _covariance(model: BandModel, theta, state, frozen):
    """Flux (line) variances and theta variances from the inverse full normal matrix."""
    lo, hi = model.theta_bounds()
    span = hi - lo
    n = theta.shape[0]
    nt = model.n_theta
    normal = state["normal"].copy()
    npm = normal.shape[1] - nt
    held = frozen | (theta <= lo + 1e-6 * span) | (theta >= hi - 1e-6 * span)
    ii, kk = np.nonzero(held)
    normal[ii, npm + kk, :] = 0.0
    normal[ii, :, npm + kk] = 0.0
    normal[ii, npm + kk, npm + kk] = 1.0
    d = np.sqrt(np.abs(np.diagonal(normal, axis1=1, axis2=2)))
    d = np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), 1.0)
    scaled = normal * d[:, :, None] * d[:, None, :]
    try:
        cov = np.linalg.inv(scaled)
    except np.linalg.LinAlgError:
        cov = np.linalg.pinv(scaled, hermitian=True)
    cov = cov * d[:, :, None] * d[:, None, :]
    var_theta = np.diagonal(cov, axis1=1, axis2=2)[:, npm:].copy()
    var_theta[held] = np.nan
    n_l = model.n_lines
    n_pairs = len(model.bounded)
    var_coef = np.full((n, n_l + model.n_cont + n_pairs), np.nan)
    for k, (_, m_lines) in enumerate(model.combos):
        sel = state["combo"] == k
        if not sel.any():
            continue
        full = _full_map(model, m_lines)
        npar = full.shape[1]
        c = cov[sel][:, :npar, :npar]
        var_coef[sel, :n_l + model.n_cont] = np.einsum("ip,npq,iq->ni", full, c, full)
        for q, (num, den, _, _) in enumerate(model.bounded):
            row = full[num] + full[den]   # variance of the doublet sum F_num + F_den
            var_coef[sel, n_l + model.n_cont + q] = np.einsum("p,npq,q->n", row, c, row)
    return var_coef, var_theta


def _weights(flux, noise, skymask):
    good = np.isfinite(flux) & np.isfinite(noise) & (noise > 0) & ~skymask[None, :]
    w = np.where(good, 1.0 / np.where(good, noise, 1.0), 0.0)
    yw = np.where(good, flux, 0.0) * w
    return good, w, yw


def _start_theta(model: BandModel, yw, w, settings: FitSettings) -> np.ndarray:
    """Coarse grid in velocity, one group after the other, at the starting sigma.

    The grid compares unconstrained linear fits (ratio bounds ignored): it only
    chooses where the iterations start.
    """
    n = yw.shape[0]
    theta = np.tile([0.0, settings.sigma_start_kms], (n, len(model.groups))).astype(float)
    vgrid = np.arange(settings.velocity_range_kms[0],
                      settings.velocity_range_kms[1] + 1e-9, settings.velocity_grid_step_kms)
    base = base_gram(model, yw, w) if _use_numba() else None
    for gi in range(len(model.groups)):
        best = np.full(n, np.inf)
        best_v = np.zeros(n)
        for v in vgrid:
            trial = theta.copy()
            trial[:, 2 * gi] = v
            chi2 = _evaluate(model, trial, yw, w, False, base=base, bounded=False).chi2
            better = chi2 < best
            best[better] = chi2[better]
            best_v[better] = v
        theta[:, 2 * gi] = best_v
    return theta


def _group_snr_max(model: BandModel, coef, var_coef) -> np.ndarray:
    """(N, n_groups): the highest line SNR of each kinematic group."""
    n_l = model.n_lines
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = coef[:, :n_l] / np.sqrt(var_coef[:, :n_l])
    out = np.full((coef.shape[0], len(model.groups)), -np.inf)
    for gi in range(len(model.groups)):
        in_g = snr[:, model.line_group == gi]
        out[:, gi] = np.max(np.where(np.isfinite(in_g), in_g, -np.inf), axis=1)
    return out


def _fit_free(model: BandModel, yw, w, settings: FitSettings) -> dict:
    """First pass: everything free, grid start, modest iteration cap.

    Spaxels where no group reaches 0.4 ``kinematics_snr`` even at the best grid point
    (the look-elsewhere maximum) skip the iterations: they get fixed kinematics anyway.
    """
    n = yw.shape[0]
    frozen = np.zeros((n, model.n_theta), dtype=bool)
    theta = _start_theta(model, yw, w, settings)
    start = _take(_evaluate(model, theta, yw, w, True, frozen), slice(None))
    var_coef, var_theta = _covariance(model, theta, start, frozen)
    hopeless = np.all(_group_snr_max(model, start["coef"], var_coef)
                      < 0.4 * settings.kinematics_snr, axis=1)
    converged = np.zeros(n, dtype=bool)
    n_iter = np.zeros(n, dtype=int)
    state = start
    go = np.flatnonzero(~hopeless)
    if go.size:
        # weak groups crawl along flat v-sigma valleys and are re-fitted with fixed
        # kinematics anyway; everything not converged here continues in the second pass
        th, st, conv, it = _levenberg_marquardt(model, theta[go], yw[go], w[go], settings,
                                                frozen[go], settings.first_pass_iterations)
        vc, vt = _covariance(model, th, st, frozen[go])
        theta[go] = th
        for key in state:
            state[key][go] = st[key]
        converged[go] = conv
        n_iter[go] = it
        var_coef[go] = vc
        var_theta[go] = vt
    forced = _group_snr_max(model, state["coef"], var_coef) < settings.kinematics_snr
    forced |= hopeless[:, None]
    return {"theta": theta, "state": state, "converged": converged, "n_iter": n_iter,
            "var_coef": var_coef, "var_theta": var_theta, "forced": forced}


def _fit_fixed(model: BandModel, theta, yw, w, settings: FitSettings, frozen) -> dict:
    """Second pass: continue from theta with the frozen (v, sigma) held fixed."""
    theta, state, converged, n_iter = _levenberg_marquardt(
        model, theta, yw, w, settings, frozen, settings.max_iterations)
    var_coef, var_theta = _covariance(model, theta, state, frozen)
    return {"theta": theta, "state": state, "converged": converged, "n_iter": n_iter,
            "var_coef": var_coef, "var_theta": var_theta}


def _fallback_theta(model: BandModel, theta, strong, shape, global_fallback, user_groups,
                    settings: FitSettings) -> np.ndarray:
    """Per-spaxel kinematics for weak groups: NaN-aware Gaussian average (sigma 1.5 pixels)
    of the neighbouring spaxels where the group is strong; else the global fallback.

    The global fallback is the user's ``fallback_kinematics`` for that group, else the
    median over the strong spaxels, else v = 0 and the starting sigma.
    """
    from scipy.ndimage import gaussian_filter

    n = theta.shape[0]
    out = np.tile(global_fallback, (n, 1)).astype(float)
    spatial = len(shape) == 2 and n == int(np.prod(shape)) and n > 1
    for gi, grp in enumerate(model.groups):
        st = strong[:, gi]
        for comp in (0, 1):
            col = 2 * gi + comp
            if st.any() and grp not in user_groups:
                out[:, col] = np.median(theta[st, col])
            if not (spatial and st.any()):
                continue
            vals = np.where(st, theta[:, col], 0.0).reshape(shape)
            wts = st.astype(float).reshape(shape)
            num = gaussian_filter(vals, 1.5, mode="constant")
            den = gaussian_filter(wts, 1.5, mode="constant")
            near = (den > 0.02).ravel()
            with np.errstate(invalid="ignore", divide="ignore"):
                fill = (num / den).ravel()
            out[near, col] = fill[near]
    lo, hi = model.theta_bounds()
    return np.clip(out, lo, hi)


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


def _settings(velocity_range_kms, sigma_range_kms, detection_snr, kinematics_snr
              ) -> FitSettings:
    """Validated :class:`FitSettings` from the keyword arguments of the fitters."""
    settings = FitSettings(velocity_range_kms=tuple(map(float, velocity_range_kms)),
                           sigma_range_kms=tuple(map(float, sigma_range_kms)),
                           detection_snr=float(detection_snr),
                           kinematics_snr=float(kinematics_snr))
    settings.validate()
    return settings


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


def _check_lines(lines) -> tuple[str, ...] | None:
    if lines is None:
        return None
    if isinstance(lines, str):
        lines = (lines,)
    unknown = [n for n in lines if n not in constants.LINES]
    if unknown:
        raise ConfigError(f"lines: unknown name(s) {unknown}; known: {list(constants.LINES)}")
    return tuple(lines)


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------
_PER_LINE = ("flux", "flux_err", "velocity", "velocity_err", "sigma", "sigma_err", "snr",
             "upper_limit", "chi2_red", "continuum", "continuum_slope", "pair_sum",
             "pair_sum_err")


def fit_cube(cube: xr.Dataset, *, redshift: float, lines=None, resolving_power=None,
             fixed_ratios=constants.FIXED_RATIOS, bounded_ratios=constants.BOUNDED_RATIOS,
             mask_sky: bool = True,
             sky_min_relative_amplitude: float = sky.MASK_MIN_RELATIVE_AMPLITUDE,
             detection_snr: float = constants.DETECTION_SNR, kinematics_snr: float = 5.0,
             fallback_kinematics: dict | None = None,
             velocity_range_kms=(-500.0, 500.0), sigma_range_kms=(5.0, 400.0),
             monte_carlo: int = 0, seed: int = 0, return_model: bool = False,
             chunk_size: int = 2048) -> xr.Dataset:
    """Fit the emission lines of every spaxel of one band's cube at once.

    Parameters
    ----------
    cube : xarray.Dataset
        ``flux`` and ``noise`` (1σ) on ``(wave, y, x)``, ``wave`` in µm (vacuum).
        Any IFU and any redshift ≥ 0; only the lines inside the band are fitted.
    redshift : float
        Systemic redshift; velocities are relative to it.
    lines : sequence of str, optional
        Catalogue names (default: every catalogue line inside the band). Requested
        lines outside the band come back as NaN with ``fit_ok = False``.
    resolving_power : float, optional
        R = λ/FWHM (default ``cube.attrs["resolving_power"]``); when unknown the
        fitted σ is the observed one (``attrs["sigma_is_observed"] = 1``).
    fixed_ratios, bounded_ratios
        Flux-ratio constraints (defaults: ``constants.FIXED_RATIOS`` / ``BOUNDED_RATIOS``).
    mask_sky, sky_min_relative_amplitude
        Mask channels at OH lines brighter than this fraction of the band's brightest.
    detection_snr : float
        ``detected = snr > detection_snr``; otherwise ``upper_limit`` = 3 ``flux_err``.
    kinematics_snr : float
        A group whose best line is below this SNR gets fixed kinematics: those of its
        strong neighbours, else ``fallback_kinematics`` (module docstring).
    fallback_kinematics : dict, optional
        ``{group: (v_kms, sigma_kms)}`` (default: median of the strong spaxels, else
        v = 0 and σ = 60 km/s). :func:`fit_galaxy` passes the integrated fit's.
    velocity_range_kms, sigma_range_kms
        Bounds on v and on intrinsic σ.
    monte_carlo : int
        If > 0, also ``flux_err_mc``: the scatter of that many refits of the best
        model plus noise.
    return_model : bool
        Add ``model`` (best-fit lines + continuum on the fitted channels, NaN elsewhere).
    chunk_size : int
        Spaxels per batch (bounds the memory).

    Returns
    -------
    xarray.Dataset
        On ``(line, y, x)``: ``flux``, ``flux_err``, ``velocity``, ``velocity_err``,
        ``sigma``, ``sigma_err``, ``snr``, ``detected``, ``upper_limit``, ``fit_ok``,
        ``converged``, ``chi2_red``, ``n_sky_masked``, ``window_masked``,
        ``kinematics_forced``, ``continuum``, ``continuum_slope``, ``pair_sum`` and
        ``pair_sum_err`` (sum of a ratio-bounded doublet and its error including the
        covariance of the two lines: use these for [SII]6717+6731 and [OII]3726+3729),
        and ``band`` on ``line``; ``continuum_image`` on ``(y, x)`` (:func:`continuum_image`).
        NaN spaxels give NaN and ``fit_ok = False``. attrs: ``redshift``,
        ``resolving_power``, ``sigma_is_observed``, ``flux_units``, ``settings``,
        ``n_not_converged``, ``note`` (when no line is in the band).

    References
    ----------
    K20 §3.1; FACTS.md §6–8, §12.

    Examples
    --------
    >>> from klever_nb.mock import demo_specs, make_mock
    >>> galaxy = make_mock(demo_specs()[1])
    >>> maps = fit_cube(galaxy.cubes["K"].to_dataset(), redshift=galaxy.spec.redshift)
    >>> maps.flux.attrs["units"]
    '1e-20 erg / (s cm2)'
    >>> int(maps.detected.sel(line="Halpha").sum()) > 30
    True
    """
    _check_cube(cube)
    if not (np.isfinite(redshift) and redshift >= 0):
        raise ConfigError(f"redshift={redshift!r}: must be a finite number >= 0")
    lines = _check_lines(lines)
    settings = _settings(velocity_range_kms, sigma_range_kms, detection_snr, kinematics_snr)
    r_fit = _resolving_power(cube, resolving_power)
    units, aa_to_int, int_unit = integrated_flux_units(cube.flux.attrs.get("units"))
    cube = cube.transpose("wave", ...)
    if cube.sizes["wave"] > 1 and float(cube.wave[0]) > float(cube.wave[-1]):
        cube = cube.isel(wave=slice(None, None, -1))  # increasing wavelength
    wave_um = np.asarray(cube.wave.values, dtype=float)
    band = str(cube.attrs.get("band", ""))
    model = build_band_model(wave_um, redshift=redshift, lines=lines, resolving_power=r_fit,
                             fixed_ratios=fixed_ratios, bounded_ratios=bounded_ratios,
                             settings=settings, angstrom_to_int=aa_to_int)
    spatial_dims = [d for d in cube.flux.dims if d != "wave"]
    shape = tuple(cube.sizes[d] for d in spatial_dims)
    attrs = {
        "redshift": float(redshift), "band": band,
        "resolving_power": r_fit if r_fit is not None else np.nan,
        "sigma_is_observed": int(r_fit is None),
        "flux_units": units, "integration_unit": int_unit,
        "settings": repr(dict(settings.__dict__, mask_sky=mask_sky,
                              sky_min_relative_amplitude=sky_min_relative_amplitude,
                              monte_carlo=monte_carlo)),
        "velocity_reference": f"km/s relative to z = {redshift}",
        "model": "pixel-integrated Gaussians with tied kinematics + linear continuum per "
                 "segment; variable projection + Levenberg-Marquardt (klever_nb.fitting)",
        "numba": int(_numba_kernel is not None and USE_NUMBA),
    }
    requested_missing = [n for n in (lines or ()) if model is None or n not in model.lines]
    if model is None:
        attrs["note"] = (f"no line of {list(lines) if lines else 'the catalogue'} falls inside "
                         f"band {band!r} ({wave_um.min():.4f}-{wave_um.max():.4f} um) at "
                         f"z = {redshift}")
        return _empty_result(cube, spatial_dims, shape, requested_missing, band, attrs, units)
    fallback = np.tile([0.0, settings.sigma_start_kms], len(model.groups)).astype(float)
    for gi, grp in enumerate(model.groups):
        if fallback_kinematics and grp in fallback_kinematics:
            v0, s0 = fallback_kinematics[grp]
            if np.isfinite(v0) and np.isfinite(s0):
                fallback[2 * gi] = np.clip(v0, *settings.velocity_range_kms)
                fallback[2 * gi + 1] = np.clip(s0, *settings.sigma_range_kms)
    skymask_full = np.zeros(wave_um.size, dtype=bool)
    if mask_sky:
        skymask_full = sky.sky_mask(wave_um, resolving_power=_sky_resolving_power(cube, r_fit),
                                    min_relative_amplitude=sky_min_relative_amplitude)
    skymask = skymask_full[model.channels]
    # only the fitted channels are read (a lazily loaded cube stays on disk otherwise)
    n_c = model.channels.size
    flux = np.asarray(cube.flux.isel(wave=model.channels).values, dtype=float).reshape(n_c, -1).T
    noise = np.asarray(cube.noise.isel(wave=model.channels).values,
                       dtype=float).reshape(n_c, -1).T
    user_groups = tuple(fallback_kinematics or ())
    result = _fit_all(model, flux, noise, skymask, settings, fallback, chunk_size, shape,
                      user_groups)
    if monte_carlo and monte_carlo > 0:
        result["flux_err_mc"] = _monte_carlo(model, result, noise, skymask, settings, fallback,
                                             int(monte_carlo), seed, chunk_size)
    ds = _to_dataset(model, result, skymask, settings, spatial_dims, shape, band, units,
                     requested_missing, cube)
    if return_model:
        ds["model"] = _model_cube(model, result, cube, spatial_dims, shape)
    ds["continuum_image"] = continuum_image(cube, redshift=redshift, skymask=skymask_full,
                                            settings=settings)
    ds.attrs.update(attrs)
    ds.attrs["n_spaxels_fitted"] = int(result["valid"].sum())
    ds.attrs["n_not_converged"] = int((result["valid"] & ~result["converged"]).sum())
    ds.attrs["sky_channels_masked"] = int(skymask_full.sum())
    return ds


def continuum_image(cube: xr.Dataset, *, redshift: float, skymask=None,
                    settings: FitSettings | None = None) -> xr.DataArray:
    """Median flux density of each spaxel over the band's line-free, sky-free channels.

    Channels within ±(|v|_max + 4 σ_max) of every catalogue line and at masked OH
    lines are excluded. This is the continuum image used to register bands
    (K20 §3.1), far less noisy than the continuum of the narrow fit segments.
    """
    settings = settings or FitSettings()
    cube = cube.transpose("wave", ...)
    wave_aa = np.asarray(cube.wave.values, dtype=float) * 1e4
    vmax = max(abs(v) for v in settings.velocity_range_kms)
    half_kms = vmax + settings.window_sigmas * settings.sigma_range_kms[1]
    keep = np.ones(wave_aa.size, dtype=bool) if skymask is None else ~np.asarray(skymask)
    for line in constants.LINES.values():
        lam = line.wave_vac * (1 + redshift)
        keep &= np.abs(wave_aa - lam) > lam * half_kms / C_KMS
    spatial = [d for d in cube.flux.dims if d != "wave"]
    shape = tuple(cube.sizes[d] for d in spatial)
    n_keep = int(keep.sum())
    flux_all = cube.flux.isel(wave=np.flatnonzero(keep))
    image = np.full(int(np.prod(shape)), np.nan)
    if n_keep:
        flat = np.asarray(flux_all.values, dtype=float).reshape(n_keep, -1)
        step = max(1, 2**24 // max(n_keep, 1))  # bounded memory for very large cubes
        for start in range(0, flat.shape[1], step):
            block = flat[:, start:start + step]
            # NaN-aware median by sorting (NaN sort last): much faster than np.nanmedian
            ordered = np.sort(block, axis=0)
            n_ok = np.isfinite(block).sum(axis=0)
            lo = np.clip((n_ok - 1) // 2, 0, None)
            hi = np.clip(n_ok // 2, 0, None)
            cols = np.arange(block.shape[1])
            image[start:start + step] = np.where(
                n_ok > 0, 0.5 * (ordered[lo, cols] + ordered[hi, cols]), np.nan)
    da = xr.DataArray(image.reshape(shape), dims=spatial)
    da.attrs.update(units=cube.flux.attrs.get("units", ""),
                    long_name="median flux density over line-free, sky-free channels",
                    n_channels=int(keep.sum()))
    return da


def _fit_all(model: BandModel, flux, noise, skymask, settings, fallback, chunk_size,
             shape=(), user_groups=()) -> dict:
    """Fit every spectrum with enough valid channels, in chunks; NaN rows for the rest.

    Pass 1 fits everything freely; groups below ``kinematics_snr`` then get their
    kinematics from strong neighbours (or the global fallback) and, with the
    spaxels not yet converged, are re-fitted in pass 2.
    """
    n_sp = flux.shape[0]
    good, w, yw = _weights(flux, noise, skymask)
    n_par_max = max(m.shape[1] for m in model.full_maps)
    valid = good.sum(axis=1) > n_par_max + model.n_theta
    n_l, nc, nt = model.n_lines, model.n_cont, model.n_theta
    out = {
        "theta": np.full((n_sp, nt), np.nan), "coef": np.full((n_sp, n_l + nc), np.nan),
        "var_coef": np.full((n_sp, n_l + nc + len(model.bounded)), np.nan),
        "var_theta": np.full((n_sp, nt), np.nan),
        "chi2": np.full(n_sp, np.nan), "dof": np.zeros(n_sp, dtype=int),
        "converged": np.zeros(n_sp, dtype=bool), "n_iter": np.zeros(n_sp, dtype=int),
        "forced": np.zeros((n_sp, len(model.groups)), dtype=bool),
        "combo": np.zeros(n_sp, dtype=int),
    }
    chunk = max(int(chunk_size), 1)

    def run(rows_all, fn, *extra):
        for start in range(0, rows_all.size, chunk):
            rows = rows_all[start:start + chunk]
            res = fn(model, *[e[start:start + chunk] for e in extra[:1]], yw[rows], w[rows],
                     settings, *[e[start:start + chunk] for e in extra[1:]])
            out["theta"][rows] = res["theta"]
            out["coef"][rows] = res["state"]["coef"]
            out["chi2"][rows] = res["state"]["chi2"]
            out["combo"][rows] = res["state"]["combo"]
            out["var_coef"][rows] = res["var_coef"]
            out["var_theta"][rows] = res["var_theta"]
            out["converged"][rows] = res["converged"]
            out["n_iter"][rows] += res["n_iter"]
            if "forced" in res:
                out["forced"][rows] = res["forced"]

    idx = np.flatnonzero(valid)
    run(idx, lambda m, yw_, w_, st: _fit_free(m, yw_, w_, st))
    strong = valid[:, None] & ~out["forced"]
    fb = _fallback_theta(model, np.nan_to_num(out["theta"]), strong, shape, fallback,
                         user_groups, settings)
    redo = idx[out["forced"][idx].any(axis=1) | ~out["converged"][idx]]
    if redo.size:
        frozen = np.repeat(out["forced"][redo], 2, axis=1)
        theta0 = np.where(frozen, fb[redo], out["theta"][redo])
        run(redo, lambda m, th, yw_, w_, st, fz: _fit_fixed(m, th, yw_, w_, st, fz),
            theta0, frozen)
    frozen_all = np.repeat(out["forced"], 2, axis=1)
    n_par = np.array([m.shape[1] for m in model.full_maps])[out["combo"]]
    out["dof"] = good.sum(axis=1) - n_par - (nt - frozen_all.sum(axis=1))
    out["good"] = good
    out["valid"] = valid
    return out


def _line_model(model: BandModel, theta, coef) -> np.ndarray:
    """Best-fit model spectra (N, n_c) for rows with finite parameters."""
    mu, s, _, _ = _kinematics(model, theta)
    prof, _, _ = _profiles(model, mu, s, False)
    n_l = model.n_lines
    return (np.einsum("ncl,nl->nc", prof, coef[:, :n_l])
            + coef[:, n_l:] @ model.continuum_basis.T)


def _monte_carlo(model, result, noise, skymask, settings, fallback, n_real, seed, chunk_size):
    """Scatter of the fluxes over refits of (best model + Gaussian noise)."""
    rng = np.random.default_rng(seed)
    valid = np.flatnonzero(result["valid"])
    out = np.full((result["coef"].shape[0], model.n_lines), np.nan)
    if valid.size == 0:
        return out
    best = _line_model(model, result["theta"][valid], result["coef"][valid])
    nz = noise[valid]
    draws = []
    for _ in range(n_real):
        fake = best + np.where(np.isfinite(nz), nz, 0.0) * rng.standard_normal(best.shape)
        fake[~result["good"][valid]] = np.nan
        res = _fit_all(model, fake, nz, skymask, settings, fallback, chunk_size)
        res["coef"][:, :model.n_lines][res["forced"][:, model.line_group]] = np.nan
        draws.append(res["coef"][:, :model.n_lines])
    out[valid] = np.nanstd(np.stack(draws), axis=0, ddof=1)
    return out


def _per_line_outputs(model: BandModel, result: dict, skymask, settings) -> dict:
    """Arrays (n_spaxel, n_line) of every per-line output."""
    n_l = model.n_lines
    theta = result["theta"]
    valid = result["valid"]
    th = np.where(np.isfinite(theta), theta, 0.0)
    mu, s, _, _ = _kinematics(model, th)
    n_sky = np.zeros((theta.shape[0], n_l), dtype=int)
    n_good = np.zeros((theta.shape[0], n_l), dtype=int)
    for j in range(n_l):
        inside = ((model.edge_hi[None, :] > (mu[:, j] - 3 * s[:, j])[:, None])
                  & (model.edge_lo[None, :] < (mu[:, j] + 3 * s[:, j])[:, None]))
        n_sky[:, j] = (inside & skymask[None, :]).sum(axis=1)
        n_good[:, j] = (inside & result["good"]).sum(axis=1)
    window_masked = valid[:, None] & (n_good == 0)
    flux = result["coef"][:, :n_l].copy()
    flux_err = np.sqrt(result["var_coef"][:, :n_l])
    forced = result["forced"][:, model.line_group]
    v = theta[:, 0::2][:, model.line_group]
    sg = theta[:, 1::2][:, model.line_group]
    v_err = np.sqrt(result["var_theta"][:, 0::2][:, model.line_group])
    s_err = np.sqrt(result["var_theta"][:, 1::2][:, model.line_group])
    fit_ok = valid[:, None] & ~window_masked & np.isfinite(flux) & np.isfinite(flux_err)
    fit_ok &= flux_err > 0
    for arr in (flux, flux_err):
        arr[~fit_ok] = np.nan
    v, sg = (np.where(fit_ok, a, np.nan) for a in (v, sg))
    v_err, s_err = (np.where(fit_ok & ~forced, a, np.nan) for a in (v_err, s_err))
    snr = flux / flux_err
    detected = fit_ok & (snr > settings.detection_snr)
    upper = np.where(fit_ok & ~detected, 3.0 * flux_err, np.nan)
    pair_sum = np.full_like(flux, np.nan)
    pair_sum_err = np.full_like(flux, np.nan)
    for q, (num, den, _, _) in enumerate(model.bounded):
        ok = fit_ok[:, num] & fit_ok[:, den]
        total = np.where(ok, flux[:, num] + flux[:, den], np.nan)
        err = np.where(ok, np.sqrt(result["var_coef"][:, n_l + model.n_cont + q]), np.nan)
        for j in (num, den):
            pair_sum[:, j], pair_sum_err[:, j] = total, err
    seg = model.segment_of_line
    c0 = result["coef"][:, n_l + 2 * seg]
    c1 = result["coef"][:, n_l + 2 * seg + 1]
    rel = (model.centre - model.segment_mid[seg]) / model.segment_half[seg]
    continuum = np.where(valid[:, None], c0 + c1 * rel, np.nan)
    slope = np.where(valid[:, None], c1 / model.segment_half[seg] * 1e4, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        chi2_red = np.where(result["dof"] > 0, result["chi2"] / result["dof"], np.nan)
    return {
        "flux": flux, "flux_err": flux_err, "velocity": v, "velocity_err": v_err,
        "sigma": sg, "sigma_err": s_err, "snr": snr, "detected": detected,
        "upper_limit": upper, "fit_ok": fit_ok,
        "converged": valid[:, None] & result["converged"][:, None] & np.ones(n_l, bool),
        "chi2_red": np.repeat(chi2_red[:, None], n_l, axis=1),
        "n_sky_masked": np.where(valid[:, None], n_sky, 0),
        "window_masked": window_masked, "kinematics_forced": valid[:, None] & forced,
        "continuum": continuum, "continuum_slope": slope,
        "pair_sum": pair_sum, "pair_sum_err": pair_sum_err,
    }


_ATTRS = {
    "flux": ("integrated line flux", None),
    "flux_err": ("1 sigma error of flux (full covariance, marginalised over v, sigma)", None),
    "velocity": ("line-of-sight velocity relative to the redshift", "km / s"),
    "velocity_err": ("1 sigma error of velocity", "km / s"),
    "sigma": ("intrinsic velocity dispersion (instrumental resolution removed)", "km / s"),
    "sigma_err": ("1 sigma error of sigma", "km / s"),
    "snr": ("flux / flux_err", ""),
    "upper_limit": ("3 sigma flux upper limit where not detected", None),
    "chi2_red": ("reduced chi-square of the band fit in this spaxel", ""),
    "continuum": ("continuum flux density at the line's systemic wavelength", "cube"),
    "continuum_slope": ("continuum slope per micron", "cube/um"),
    "n_sky_masked": ("sky-masked channels within +-3 sigma of the fitted line", ""),
    "window_masked": ("no valid channel within +-3 sigma of the line: not fitted", ""),
    "kinematics_forced": ("group below kinematics_snr: v, sigma fixed to the fallback", ""),
    "flux_err_mc": ("Monte Carlo flux scatter (refits of best model + noise)", None),
    "pair_sum": ("flux of a ratio-bounded doublet ([SII], [OII]): sum of both lines", None),
    "pair_sum_err": ("1 sigma error of pair_sum, with the covariance of the two lines", None),
}


def _to_dataset(model, result, skymask, settings, spatial_dims, shape, band, units,
                requested_missing, cube) -> xr.Dataset:
    per_line = _per_line_outputs(model, result, skymask, settings)
    if "flux_err_mc" in result:
        per_line["flux_err_mc"] = result["flux_err_mc"]
    names = list(model.lines) + list(requested_missing)
    n_extra = len(requested_missing)
    cube_units = cube.flux.attrs.get("units", "")
    data_vars = {}
    for key, arr in per_line.items():
        if n_extra:
            fill = False if arr.dtype == bool else (0 if arr.dtype.kind == "i" else np.nan)
            arr = np.concatenate([arr, np.full((arr.shape[0], n_extra), fill, arr.dtype)], 1)
        arr = arr.T.reshape((len(names),) + shape)
        da = xr.DataArray(arr, dims=("line", *spatial_dims))
        desc, unit = _ATTRS.get(key, ("", ""))
        if desc:
            da.attrs["long_name"] = desc
        if unit is None:
            da.attrs["units"] = units
        elif unit == "cube":
            da.attrs["units"] = cube_units
        elif unit == "cube/um":
            da.attrs["units"] = f"({cube_units}) / um" if cube_units else "1 / um"
        elif unit:
            da.attrs["units"] = unit
        data_vars[key] = da
    coords = {"line": names, "band": ("line", [band] * len(names))}
    for d in spatial_dims:
        if d in cube.coords:
            coords[d] = cube[d].values
    return xr.Dataset(data_vars, coords=coords)


def _empty_result(cube, spatial_dims, shape, names, band, attrs, units) -> xr.Dataset:
    nl = len(names)
    nan = np.full((nl,) + shape, np.nan)
    false = np.zeros((nl,) + shape, dtype=bool)
    data = {k: (("line", *spatial_dims), nan.copy()) for k in _PER_LINE}
    for k in ("detected", "fit_ok", "converged", "window_masked", "kinematics_forced"):
        data[k] = (("line", *spatial_dims), false.copy())
    data["n_sky_masked"] = (("line", *spatial_dims), np.zeros((nl,) + shape, dtype=int))
    coords = {"line": list(names), "band": ("line", [band] * nl)}
    for d in spatial_dims:
        if d in cube.coords:
            coords[d] = cube[d].values
    ds = xr.Dataset(data, coords=coords, attrs=attrs)
    for k in ("flux", "flux_err", "upper_limit", "pair_sum", "pair_sum_err"):
        ds[k].attrs["units"] = units
    return ds


def _model_cube(model, result, cube, spatial_dims, shape) -> xr.DataArray:
    n_wave = cube.sizes["wave"]
    full = np.full((int(np.prod(shape)), n_wave), np.nan)
    valid = np.flatnonzero(result["valid"])
    if valid.size:
        spec = _line_model(model, result["theta"][valid], result["coef"][valid])
        full[np.ix_(valid, model.channels)] = spec
    arr = full.T.reshape((n_wave,) + shape)
    da = xr.DataArray(arr, dims=("wave", *spatial_dims), coords={"wave": cube.wave.values})
    da.attrs["units"] = cube.flux.attrs.get("units", "")
    da.attrs["long_name"] = "best-fit model (lines + continuum) on the fitted channels"
    return da


def _as_cube(spectrum: xr.Dataset) -> xr.Dataset:
    _check_cube(spectrum)
    extra = [d for d in spectrum.flux.dims if d != "wave"]
    if extra:
        raise InputError(f"fit_spectrum needs a 1-D spectrum on (wave,), got dims "
                         f"{spectrum.flux.dims}; use fit_cube for cubes")
    return spectrum.expand_dims(y=1, x=1).transpose("wave", "y", "x")


def fit_spectrum(spectrum: xr.Dataset, *, redshift: float, **options) -> xr.Dataset:
    """Fit one (integrated) spectrum on ``(wave,)``: same model and outputs as :func:`fit_cube`.

    Returns a Dataset on ``(line,)``.

    References
    ----------
    K20 §3.1 (pseudo-fibre integrated fluxes).
    """
    ds = fit_cube(_as_cube(spectrum), redshift=redshift, **options)
    return ds.isel(y=0, x=0, drop=True)


# ---------------------------------------------------------------------------
# The slow twin: one spectrum at a time with scipy.optimize.least_squares
# ---------------------------------------------------------------------------
class _ReferenceProblem:
    """The same model as the batched fitter, written plainly for one spectrum.

    Parameters are ``[theta (v, sigma per group) | flux params | continuum]``; the
    flux params are one integrated flux per line except fixed-ratio weak lines
    (``weak = strong / ratio``) and bounded numerators, which are a ratio ``r`` in
    ``[lo, hi]`` times their denominator's flux.
    """

    def __init__(self, model: BandModel, flux, noise, good):
        self.m = model
        self.good = good
        self.y = flux[good]
        self.sig = noise[good]
        self.fixed_weak = {weak: (strong, ratio) for weak, strong, ratio in model.fixed}
        self.bounded_num = {num: (den, lo, hi) for num, den, lo, hi in model.bounded}
        self.flux_lines = [j for j in range(model.n_lines) if j not in self.fixed_weak]
        self.nt = model.n_theta

    def profiles(self, theta):
        m = self.m
        out = np.empty((m.n_lines, m.edge_lo.size))
        from scipy.special import erf

        for j in range(m.n_lines):
            g = m.line_group[j]
            v, sig = theta[2 * g], theta[2 * g + 1]
            mu = m.centre[j] * (1 + v / C_KMS)
            s = np.sqrt((m.centre[j] * sig / C_KMS) ** 2 + m.sigma_inst[j] ** 2)
            cdf_hi = 0.5 * erf((m.edge_hi - mu) / (np.sqrt(2) * s))
            cdf_lo = 0.5 * erf((m.edge_lo - mu) / (np.sqrt(2) * s))
            out[j] = (cdf_hi - cdf_lo) / m.width_int
        return out

    def line_fluxes(self, p):
        """All line fluxes from the parameter vector."""
        nt = self.nt
        fl = np.zeros(self.m.n_lines)
        vals = dict(zip(self.flux_lines, p[nt:nt + len(self.flux_lines)], strict=True))
        for j in self.flux_lines:
            if j not in self.bounded_num:
                fl[j] = vals[j]
        for j, (den, _, _) in self.bounded_num.items():
            fl[j] = vals[j] * fl[den]
        for j, (strong, ratio) in self.fixed_weak.items():
            fl[j] = fl[strong] / ratio
        return fl

    def flux_jacobian(self, p):
        """d(line fluxes) / d(parameters), by central differences (exact for this algebra)."""
        jac = np.zeros((self.m.n_lines, p.size))
        for k in range(self.nt, self.nt + len(self.flux_lines)):
            h = 1e-6 * max(abs(p[k]), 1.0)
            up, dn = p.copy(), p.copy()
            up[k] += h
            dn[k] -= h
            jac[:, k] = (self.line_fluxes(up) - self.line_fluxes(dn)) / (2 * h)
        return jac

    def model(self, p):
        nt = self.nt
        cont = p[nt + len(self.flux_lines):]
        spec = self.line_fluxes(p) @ self.profiles(p[:nt]) + self.m.continuum_basis @ cont
        return spec

    def residuals(self, p):
        return (self.y - self.model(p)[self.good]) / self.sig

    def linear_start(self, theta, constrained: bool = True):
        """Constrained linear least squares at fixed theta (plain numpy lstsq per bound state).

        ``constrained=False``: the ratio bounds are ignored (the starting grid).
        """
        prof = self.profiles(theta)[:, self.good]
        basis = self.m.continuum_basis[self.good]
        best = (np.inf, None)
        for states, m_lines in (self.m.combos if constrained else self.m.combos[:1]):
            design = np.column_stack([(m_lines.T @ prof).T, basis]) / self.sig[:, None]
            coef, *_ = np.linalg.lstsq(design, self.y / self.sig, rcond=None)
            fl = m_lines @ coef[:m_lines.shape[1]]
            ok = True
            for (num, den, lo, hi), state in zip(self.m.bounded, states, strict=True):
                if state == "free" and constrained:
                    r = fl[num] / fl[den] if fl[den] != 0 else np.inf
                    ok &= bool(lo <= r <= hi)
            chi2 = np.sum((self.y / self.sig - design @ coef) ** 2)
            if ok and chi2 < best[0]:
                best = (chi2, (fl, coef[m_lines.shape[1]:], states))
        fl, cont, states = best[1]
        params = []
        for j in self.flux_lines:
            if j in self.bounded_num:
                den, lo, hi = self.bounded_num[j]
                params.append(np.clip(fl[j] / fl[den], lo, hi) if fl[den] != 0 else 1.0)
            else:
                params.append(fl[j])
        return best[0], np.concatenate([np.asarray(params), cont])


def _reference_one(model: BandModel, flux, noise, good, settings: FitSettings, fallback):
    """Fit one spectrum with least_squares; returns the row of a result dict."""
    from scipy.optimize import least_squares

    prob = _ReferenceProblem(model, flux, noise, good)
    nt = prob.nt
    theta = np.tile([0.0, settings.sigma_start_kms], len(model.groups)).astype(float)
    vgrid = np.arange(settings.velocity_range_kms[0],
                      settings.velocity_range_kms[1] + 1e-9, settings.velocity_grid_step_kms)
    for gi in range(len(model.groups)):
        chi2s = []
        for v in vgrid:
            trial = theta.copy()
            trial[2 * gi] = v
            chi2s.append(prob.linear_start(trial, constrained=False)[0])
        theta[2 * gi] = vgrid[int(np.argmin(chi2s))]
    tlo, thi = model.theta_bounds()

    def solve(theta0, frozen):
        lin0 = prob.linear_start(theta0)[1]
        free_t = ~frozen
        p_lo = [-np.inf] * lin0.size
        p_hi = [np.inf] * lin0.size
        for k, j in enumerate(prob.flux_lines):
            if j in prob.bounded_num:
                _, lo, hi = prob.bounded_num[j]
                p_lo[k], p_hi[k] = lo, hi
        lower = np.concatenate([tlo[free_t], p_lo])
        upper = np.concatenate([thi[free_t], p_hi])
        x0 = np.clip(np.concatenate([theta0[free_t], lin0]), lower, upper)

        def full(x):
            th = theta0.copy()
            th[free_t] = x[:free_t.sum()]
            return np.concatenate([th, x[free_t.sum():]])

        res = least_squares(lambda x: prob.residuals(full(x)), x0, bounds=(lower, upper),
                            method="trf", x_scale="jac", ftol=1e-12, xtol=1e-12, gtol=1e-12,
                            max_nfev=5000)
        p = full(res.x)
        jac = np.zeros((res.fun.size, p.size))
        jac[:, np.concatenate([free_t, np.ones(p.size - nt, bool)])] = res.jac
        at_bound = np.zeros(p.size, dtype=bool)
        at_bound[:nt] = frozen | (p[:nt] <= tlo + 1e-6 * (thi - tlo)) | (
            p[:nt] >= thi - 1e-6 * (thi - tlo))
        for k, j in enumerate(prob.flux_lines):
            if j in prob.bounded_num:
                _, lo, hi = prob.bounded_num[j]
                at_bound[nt + k] = (p[nt + k] <= lo + 1e-9) or (p[nt + k] >= hi - 1e-9)
        keep = ~at_bound
        cov = np.zeros((p.size, p.size))
        cov[np.ix_(keep, keep)] = np.linalg.pinv(jac[:, keep].T @ jac[:, keep])
        fj = prob.flux_jacobian(p)
        var_f = np.einsum("ip,pq,iq->i", fj, cov, fj)
        for num, den, _, _ in model.bounded:
            row = fj[num] + fj[den]
            var_f = np.append(var_f, row @ cov @ row)
        var_t = np.where(at_bound[:nt], np.nan, np.diagonal(cov)[:nt])
        return p, var_f, var_t, 2 * res.cost, res.status > 0

    frozen = np.zeros(nt, dtype=bool)
    p, var_f, var_t, chi2, ok = solve(theta, frozen)
    fl = prob.line_fluxes(p)
    snr = fl / np.sqrt(var_f[:model.n_lines])
    forced = np.zeros(len(model.groups), dtype=bool)
    for gi in range(len(model.groups)):
        in_g = snr[model.line_group == gi]
        forced[gi] = not np.nanmax(np.where(np.isfinite(in_g), in_g, -np.inf)) >= \
            settings.kinematics_snr
    if forced.any():
        frozen = np.repeat(forced, 2)
        th = p[:nt].copy()
        th[frozen] = fallback[frozen]
        p, var_f, var_t, chi2, ok = solve(th, frozen)
        fl = prob.line_fluxes(p)
    n_flux = len(prob.flux_lines)
    coef = np.concatenate([fl, p[nt + n_flux:]])
    n_free = n_flux + model.n_cont + int((~frozen).sum())
    n_l = model.n_lines
    return {"theta": p[:nt], "coef": coef,
            "var_coef": np.concatenate([var_f[:n_l], np.full(model.n_cont, np.nan),
                                        var_f[n_l:]]),
            "var_theta": var_t, "chi2": chi2, "dof": int(good.sum()) - n_free,
            "converged": bool(ok), "forced": forced}


def fit_spectrum_reference(spectrum: xr.Dataset, *, redshift: float, lines=None,
                           resolving_power=None, fixed_ratios=constants.FIXED_RATIOS,
                           bounded_ratios=constants.BOUNDED_RATIOS, mask_sky: bool = True,
                           sky_min_relative_amplitude: float = sky.MASK_MIN_RELATIVE_AMPLITUDE,
                           detection_snr: float = constants.DETECTION_SNR,
                           kinematics_snr: float = 5.0, fallback_kinematics: dict | None = None,
                           velocity_range_kms=(-500.0, 500.0),
                           sigma_range_kms=(5.0, 400.0)) -> xr.Dataset:
    """The slow twin of :func:`fit_spectrum`: same model, one ``least_squares`` fit.

    Plain per-spectrum code (full-range error functions, 2-point Jacobian, bounded
    ratios as a bounded ratio parameter, the same coarse velocity grid to start),
    used by the tests and the benchmark to check the batched fitter.

    References
    ----------
    K20 §3.1; FACTS.md §12.
    """
    cube = _as_cube(spectrum)
    lines = _check_lines(lines)
    settings = _settings(velocity_range_kms, sigma_range_kms, detection_snr, kinematics_snr)
    r_fit = _resolving_power(cube, resolving_power)
    units, aa_to_int, _ = integrated_flux_units(cube.flux.attrs.get("units"))
    wave_um = np.asarray(cube.wave.values, dtype=float)
    band = str(cube.attrs.get("band", ""))
    model = build_band_model(wave_um, redshift=redshift, lines=lines, resolving_power=r_fit,
                             fixed_ratios=fixed_ratios, bounded_ratios=bounded_ratios,
                             settings=settings, angstrom_to_int=aa_to_int)
    missing = [n for n in (lines or ()) if model is None or n not in model.lines]
    if model is None:
        return _empty_result(cube, ["y", "x"], (1, 1), missing, band, {}, units).isel(
            y=0, x=0, drop=True)
    skymask = np.zeros(wave_um.size, dtype=bool)
    if mask_sky:
        skymask = sky.sky_mask(wave_um, resolving_power=_sky_resolving_power(cube, r_fit),
                               min_relative_amplitude=sky_min_relative_amplitude)
    skymask = skymask[model.channels]
    flux = np.asarray(cube.flux.values, dtype=float)[model.channels, 0, 0]
    noise = np.asarray(cube.noise.values, dtype=float)[model.channels, 0, 0]
    good = np.isfinite(flux) & np.isfinite(noise) & (noise > 0) & ~skymask
    fallback = np.tile([0.0, settings.sigma_start_kms], len(model.groups)).astype(float)
    for gi, grp in enumerate(model.groups):
        if fallback_kinematics and grp in fallback_kinematics:
            fallback[2 * gi:2 * gi + 2] = fallback_kinematics[grp]
    n_par_max = max(m.shape[1] for m in model.full_maps)
    nl, nc, nt = model.n_lines, model.n_cont, model.n_theta
    result = {"theta": np.full((1, nt), np.nan), "coef": np.full((1, nl + nc), np.nan),
              "var_coef": np.full((1, nl + nc + len(model.bounded)), np.nan),
              "var_theta": np.full((1, nt), np.nan),
              "chi2": np.full(1, np.nan), "dof": np.zeros(1, dtype=int),
              "converged": np.zeros(1, dtype=bool),
              "forced": np.zeros((1, len(model.groups)), dtype=bool)}
    valid = good.sum() > n_par_max + nt
    if valid:
        row = _reference_one(model, flux, noise, good, settings, fallback)
        for key, val in row.items():
            result[key][0] = val
    result["good"] = good[None, :]
    result["valid"] = np.array([valid])
    ds = _to_dataset(model, result, skymask, settings, ["y", "x"], (1, 1), band, units,
                     missing, cube)
    ds.attrs.update({"redshift": float(redshift), "band": band, "fitter": "reference"})
    return ds.isel(y=0, x=0, drop=True)


# ---------------------------------------------------------------------------
# Galaxy level: integrated spectra, refined redshift, per-band maps, alignment
# ---------------------------------------------------------------------------
def refine_redshift(integrated_fit: xr.Dataset, *, redshift: float) -> float:
    """Redshift from the integrated Hα centroid (else [OIII]5007); unchanged if neither fits.

    ``z' = (1 + z)(1 + v / c) - 1`` with v the fitted velocity relative to ``redshift``
    (the model's line centre is λ_rest (1 + z)(1 + v/c), so this is exact).

    References
    ----------
    K20 §3.1 (redshift from the integrated spectrum).
    """
    for name in ("Halpha", "OIII_5007"):
        if "line" not in integrated_fit.dims or name not in integrated_fit["line"].values:
            continue
        row = integrated_fit.sel(line=name)
        usable = bool(row["fit_ok"]) and bool(row.get("detected", True))
        if "kinematics_forced" in row:
            usable &= not bool(row["kinematics_forced"])
        v = float(row["velocity"])
        if usable and np.isfinite(v):
            return float((1.0 + redshift) * (1.0 + v / C_KMS) - 1.0)
    return float(redshift)


def _band_lines(cube: xr.Dataset, redshift: float, lines) -> tuple[str, ...]:
    wave = np.asarray(cube.wave.values, dtype=float)
    return constants.lines_in_range(float(wave.min()), float(wave.max()), float(redshift),
                                    tuple(lines) if lines is not None else None)


def _group_kinematics(integrated: xr.Dataset) -> dict:
    out = {}
    for name in integrated["line"].values:
        row = integrated.sel(line=name)
        if bool(row["fit_ok"]) and not bool(row["kinematics_forced"]):
            out[constants.LINES[str(name)].group] = (float(row["velocity"]), float(row["sigma"]))
    return out


def _merge_bands(per_band: dict[str, xr.Dataset]) -> xr.Dataset:
    """Concatenate per-band Datasets along ``line``; a line fitted in two bands keeps the
    band with more fitted spaxels."""
    chosen: dict[str, tuple[str, int]] = {}
    for band, ds in per_band.items():
        for name in ds["line"].values:
            n_ok = int(ds["fit_ok"].sel(line=name).sum())
            if str(name) not in chosen or n_ok > chosen[str(name)][1]:
                chosen[str(name)] = (band, n_ok)
    parts = []
    for band, ds in per_band.items():
        keep = [n for n in ds["line"].values if chosen[str(n)][0] == band]
        if keep:
            parts.append(ds.drop_vars([v for v in ds.data_vars if "line" not in ds[v].dims])
                         .sel(line=keep))
    if not parts:
        return xr.Dataset()
    merged = xr.concat(parts, dim="line", data_vars="all", coords="minimal",
                       compat="override", join="outer", combine_attrs="drop_conflicts")
    for name in merged.data_vars:
        template = parts[0][name]
        if template.dtype == bool and merged[name].dtype != bool:
            merged[name] = merged[name].fillna(False).astype(bool)
        elif template.dtype.kind in "iu" and merged[name].dtype != template.dtype:
            merged[name] = merged[name].fillna(0).astype(template.dtype)
    order = sorted(merged["line"].values, key=lambda n: constants.LINES[str(n)].wave_vac)
    return merged.sel(line=order)


def fit_galaxy(tree: xr.DataTree, *, redshift: float,
               smooth_fwhm_arcsec: float = constants.SMOOTH_FWHM_ARCSEC,
               fibre_radius_arcsec: float = constants.FIBRE_RADIUS_ARCSEC, lines=None,
               align: bool = True, **fit_options) -> tuple[xr.Dataset, xr.Dataset]:
    """Line maps and integrated fluxes of a galaxy's cubes, bands aligned (K20 §3.1).

    For each band: pseudo-fibre spectrum on its emission peak and its fit; the
    redshift refined from the integrated Hα (else [OIII]5007) centroid; the
    integrated fits repeated at the refined redshift; the smoothed cube fitted
    spaxel by spaxel with the integrated kinematics as fallback for weak groups.
    The bands' maps are then registered (:mod:`klever_nb.align`) and merged.

    Parameters
    ----------
    tree : xarray.DataTree
        One child per band, each a cube Dataset.
    redshift : float
        Input redshift (the maps' velocities are relative to the refined one).
    smooth_fwhm_arcsec, fibre_radius_arcsec : float
        K20 §3.1 defaults 0.4″ and 0.6″.
    lines : sequence of str, optional
        Lines to fit (default: every catalogue line inside each band).
    align : bool
        Register the bands (K20 §3.1).
    **fit_options
        Passed to :func:`fit_cube` / :func:`fit_spectrum`.

    Returns
    -------
    line_maps : xarray.Dataset on ``(line, y, x)``
    integrated : xarray.Dataset on ``(line,)``
        attrs: ``redshift`` (refined), ``redshift_input``, ``redshift_refined``,
        ``alignment_shifts`` and ``alignment_methods`` (JSON), per-band
        ``resolving_power``, fibre centres, ``noise_correlation_scaling``.

    References
    ----------
    K20 §3.1.

    Examples
    --------
    >>> import json
    >>> from klever_nb.mock import demo_specs, make_mock
    >>> galaxy = make_mock(demo_specs()[1])
    >>> maps, integrated = fit_galaxy(galaxy.cubes, redshift=galaxy.spec.redshift)
    >>> sorted(json.loads(maps.attrs["alignment_shifts"]))
    ['H', 'K', 'YJ']
    """
    import json

    from klever_nb import align as align_mod
    from klever_nb import spectra

    lines = _check_lines(lines)
    cubes = {name: node.to_dataset() for name, node in tree.children.items()
             if "flux" in node.to_dataset()}
    if not cubes:
        raise InputError("fit_galaxy: the DataTree has no band with a 'flux' cube")
    fibres, notes = {}, {}
    band_lines = {}
    for band, cube in cubes.items():
        names = _band_lines(cube, redshift, lines)
        if not names:
            notes[band] = f"no requested line inside band {band} at z = {redshift}"
            continue
        band_lines[band] = names
        fibres[band] = spectra.pseudo_fibre_spectrum(cube, radius_arcsec=fibre_radius_arcsec,
                                                     redshift=redshift, lines=names)
    if not band_lines:
        raise InputError(f"fit_galaxy: no line of {list(lines) if lines else 'the catalogue'} "
                         f"falls inside any band at z = {redshift}")
    first = {b: fit_spectrum(fibres[b], redshift=redshift, lines=band_lines[b], **fit_options)
             for b in band_lines}
    z_ref = redshift
    for b in band_lines:
        z_try = refine_redshift(first[b], redshift=redshift)
        if z_try != redshift:
            z_ref = z_try
            if "Halpha" in first[b]["line"].values:
                break
    integrated, maps = {}, {}
    scaling = {}
    for band in band_lines:
        names = _band_lines(cubes[band], z_ref, band_lines[band]) or band_lines[band]
        integrated[band] = fit_spectrum(fibres[band], redshift=z_ref, lines=names,
                                        **fit_options)
        cube = cubes[band]
        if smooth_fwhm_arcsec and smooth_fwhm_arcsec > 0:
            cube = spectra.smooth_cube(cube, fwhm_arcsec=smooth_fwhm_arcsec)
        scaling[band] = float(cube.attrs.get("noise_correlation_scaling", 1.0))
        options = dict(fit_options)
        options.setdefault("fallback_kinematics", _group_kinematics(integrated[band]))
        maps[band] = fit_cube(cube, redshift=z_ref, lines=names, **options)
    shifts = {b: (0.0, 0.0) for b in maps}
    methods = {}
    if align and len(maps) > 1:
        positions = {b: align_mod.band_position(ds) for b, ds in maps.items()}
        methods = {b: p["method"] for b, p in positions.items()}
        shifts = align_mod.band_offsets(maps)
        maps = align_mod.apply_offsets(maps, shifts)
    line_maps = _merge_bands(maps)
    integ = _merge_bands(integrated)
    images = [maps[b]["continuum_image"] for b in maps if "continuum_image" in maps[b]]
    if images and "y" in line_maps.dims:
        line_maps["continuum_image"] = xr.concat(images, dim="bands", join="outer").assign_coords(
            bands=[b for b in maps if "continuum_image" in maps[b]])
    attrs = {
        "redshift": float(z_ref), "redshift_input": float(redshift),
        "redshift_refined": float(z_ref),
        "smooth_fwhm_arcsec": float(smooth_fwhm_arcsec),
        "fibre_radius_arcsec": float(fibre_radius_arcsec),
        "alignment_shifts": json.dumps({b: [float(s[0]), float(s[1])] for b, s in shifts.items()}),
        "alignment_methods": json.dumps(methods),
        "resolving_power": json.dumps({b: maps[b].attrs.get("resolving_power") for b in maps}),
        "noise_correlation_scaling": json.dumps(scaling),
        "fibre_centres_yx": json.dumps({b: fibres[b].attrs["centre_yx"] for b in fibres}),
        "bands": json.dumps(list(maps)),
        "notes": json.dumps(notes),
        "flux_units": next(iter(maps.values())).attrs.get("flux_units", ""),
    }
    line_maps.attrs = dict(attrs)
    integ.attrs = dict(attrs)
    return line_maps, integ

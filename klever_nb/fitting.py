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
are re-measured with (v, σ) fixed to ``fallback_kinematics`` (default v = 0 and the
starting σ), ``kinematics_forced`` is set and its velocity and σ are NaN. Detection
(SNR > ``detection_snr``) is then a single-trial test.

References
----------
K20 §3.1; FACTS.md §6 (wavelengths), §7 (ratios), §8 (R), §12 (variable projection).
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field

import numpy as np
import xarray as xr
from astropy import units as u
from scipy.special import ndtr

from klever_nb import constants, sky
from klever_nb.errors import ConfigError, InputError

C_KMS = constants.C_KMS
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
_TRUNCATE_SIGMA = 8.0  # each profile is evaluated within +-8 sigma (mass outside < 1e-15)
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
    velocity_grid_step_kms: float = 50.0
    window_sigmas: float = 4.0
    detection_snr: float = constants.DETECTION_SNR
    kinematics_snr: float = 5.0
    max_iterations: int = 300
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
    return model



# ---------------------------------------------------------------------------
# Optional numba kernel: the same Gram matrix, accumulated sparsely per spaxel
# ---------------------------------------------------------------------------
#: Use the compiled kernel when numba is importable (set False to force pure numpy).
USE_NUMBA = True


def _make_numba_kernel():
    try:
        import math

        import numba
    except ImportError:  # pragma: no cover - numba is optional
        return None

    sqrt_half = math.sqrt(0.5)
    inv_sqrt_2pi = 1.0 / math.sqrt(2.0 * math.pi)

    @numba.njit(parallel=True, cache=True, fastmath=False)
    def kernel(mu, s, edge_lo, edge_hi, width, seg, xrel, w, yw, n_seg, derivs, trunc):
        n_sp, n_l = mu.shape
        n_c = edge_lo.size
        k1 = n_l + 2 * n_seg + 1
        kk = k1 + 2 * n_l if derivs else k1
        out = np.zeros((n_sp, kk, kk))
        for n in numba.prange(n_sp):
            i0 = np.empty(n_l, np.int64)
            i1 = np.empty(n_l, np.int64)
            for j in range(n_l):
                i0[j] = np.searchsorted(edge_hi, mu[n, j] - trunc * s[n, j])
                i1[j] = np.searchsorted(edge_lo, mu[n, j] + trunc * s[n, j], side="right")
            vals = np.empty(kk)
            idx = np.empty(kk, np.int64)
            g = out[n]
            for i in range(n_c):
                wi = w[n, i]
                if wi == 0.0:
                    continue
                sg = seg[i]
                idx[0] = n_l + 2 * sg
                vals[0] = wi
                idx[1] = n_l + 2 * sg + 1
                vals[1] = wi * xrel[i]
                idx[2] = k1 - 1
                vals[2] = yw[n, i]
                k = 3
                for j in range(n_l):
                    if i < i0[j] or i >= i1[j]:
                        continue
                    sj = s[n, j]
                    a = (edge_lo[i] - mu[n, j]) / sj
                    b = (edge_hi[i] - mu[n, j]) / sj
                    if a > 0:
                        diff = 0.5 * (math.erfc(a * sqrt_half) - math.erfc(b * sqrt_half))
                    else:
                        diff = 0.5 * (math.erfc(-b * sqrt_half) - math.erfc(-a * sqrt_half))
                    scale = wi / width[i]
                    idx[k] = j
                    vals[k] = scale * diff
                    k += 1
                    if derivs:
                        pa = math.exp(-0.5 * a * a) * inv_sqrt_2pi
                        pb = math.exp(-0.5 * b * b) * inv_sqrt_2pi
                        idx[k] = k1 + j
                        vals[k] = -scale * (pb - pa) / sj
                        k += 1
                        idx[k] = k1 + n_l + j
                        vals[k] = -scale * (b * pb - a * pa) / sj
                        k += 1
                for p in range(k):
                    vp = vals[p]
                    ip = idx[p]
                    for q in range(k):
                        g[ip, idx[q]] += vp * vals[q]
        return out

    return kernel


_numba_kernel = _make_numba_kernel()


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
    srhs = rhs * d
    try:
        sol = np.linalg.solve(scaled, srhs[..., None])[..., 0]
    except np.linalg.LinAlgError:
        sol = np.einsum("...ij,...j->...i", np.linalg.pinv(scaled, hermitian=True), srhs)
    return sol * d


def _guard_empty(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Replace rows/columns of parameters without data (zero diagonal) by the identity."""
    diag = np.diagonal(gram, axis1=-2, axis2=-1)
    scale = np.max(np.abs(diag), axis=-1, keepdims=True)
    empty = diag <= 1e-14 * np.where(scale > 0, scale, 1.0)
    if empty.any():
        gram = gram.copy()
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


def _extended_gram(model: BandModel, mu, s, w, yw, derivs: bool) -> np.ndarray:
    if _numba_kernel is not None and USE_NUMBA:
        seg = np.argmax(model.continuum_basis[:, 0::2], axis=1)
        xrel = model.continuum_basis[np.arange(seg.size), 2 * seg + 1]
        return _numba_kernel(np.ascontiguousarray(mu), np.ascontiguousarray(s), model.edge_lo,
                             model.edge_hi, model.width_int, seg, xrel,
                             np.ascontiguousarray(w), np.ascontiguousarray(yw),
                             model.n_cont // 2, derivs, _TRUNCATE_SIGMA)
    return _gram_numpy(model, mu, s, w, yw, derivs)


def _evaluate(model: BandModel, theta, yw, w, derivs: bool, frozen=None) -> _Eval:
    """Variable-projection evaluation of a batch: linear solve for every bound state, choose.

    ``yw`` = flux / noise and ``w`` = 1 / noise (0 where masked), both (N, n_c).
    """
    mu, s, dmu_dv, ds_dsig = _kinematics(model, theta)
    gram_all = _extended_gram(model, mu, s, w, yw, derivs)
    n_l, nc = model.n_lines, model.n_cont
    k1 = n_l + nc + 1
    gram = gram_all[:, :k1, :k1]
    yy = gram[:, -1, -1]
    n = theta.shape[0]
    best_chi2 = np.full(n, np.inf)
    best_coef = np.zeros((n, n_l + nc))
    best_combo = np.zeros(n, dtype=int)
    for k, (states, m_lines) in enumerate(model.combos):
        full = _full_map(model, m_lines)
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
    cross = np.matmul(gram_all[:, :k1, k1:], mix)                      # (N, k1, nt)
    jj = np.matmul(mix.transpose(0, 2, 1), np.matmul(gram_all[:, k1:, k1:], mix))
    grad = np.zeros((n, nt))
    hess = np.zeros((n, nt, nt))
    n_par_max = max(m.shape[1] for _, m in model.combos) + nc
    normal = np.zeros((n, n_par_max + nt, n_par_max + nt))
    lin = np.zeros((n, n_par_max))
    for k, (_, m_lines) in enumerate(model.combos):
        sel = best_combo == k
        if not sel.any():
            continue
        full = _full_map(model, m_lines)
        npar = full.shape[1]
        g = full.T @ gram[sel][:, :-1, :-1] @ full
        b = gram[sel][:, :-1, -1] @ full
        _guard_empty(g, b)
        a = _solve_sym(g, b)
        aj = np.einsum("ip,nit->npt", full, cross[sel][:, :-1, :])   # A_w^T J
        jty = cross[sel][:, -1, :]
        grad[sel] = jty - np.einsum("npt,np->nt", aj, a)
        ginv_aj = np.stack([_solve_sym(g, aj[:, :, t]) for t in range(nt)], axis=2)
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


def _levenberg_marquardt(model: BandModel, theta, yw, w, settings: FitSettings, frozen):
    """Batched, bounded Levenberg–Marquardt on (v, sigma) with variable projection.

    Returns the final theta, the state at it (dict of arrays), converged flags and
    iteration counts. Spaxels leave the active set when converged.
    """
    lo, hi = model.theta_bounds()
    theta = np.clip(theta, lo, hi)
    ev = _evaluate(model, theta, yw, w, True, frozen)
    state = _take(ev, slice(None))
    n, nt = theta.shape
    lam = np.full(n, 1e-3)
    active = np.ones(n, dtype=bool)
    converged = np.zeros(n, dtype=bool)
    n_iter = np.zeros(n, dtype=int)
    tol = settings.chi2_tolerance
    span = hi - lo
    eye = np.eye(nt)
    for _ in range(settings.max_iterations):
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
        tev = _evaluate(model, trial, yw[idx], w[idx], True, frozen[idx])
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
    var_coef = np.full((n, n_l + model.n_cont), np.nan)
    for k, (_, m_lines) in enumerate(model.combos):
        sel = state["combo"] == k
        if not sel.any():
            continue
        full = _full_map(model, m_lines)
        npar = full.shape[1]
        c = cov[sel][:, :npar, :npar]
        var_coef[sel] = np.einsum("ip,npq,iq->ni", full, c, full)
    return var_coef, var_theta


def _fit_batch(model: BandModel, flux, noise, skymask, settings: FitSettings,
               fallback_theta: np.ndarray) -> dict:
    """Fit spectra (N, n_c) already restricted to the model's channels. All arrays out (N, ...)."""
    n = flux.shape[0]
    good = np.isfinite(flux) & np.isfinite(noise) & (noise > 0) & ~skymask[None, :]
    w = np.where(good, 1.0 / np.where(good, noise, 1.0), 0.0)
    yw = np.where(good, flux, 0.0) * w
    nt = model.n_theta
    # zero the columns of lines whose possible window has no valid channel: done via weights
    # implicitly (empty columns are guarded in the solve).
    theta = np.tile(fallback_theta, (n, 1)).astype(float)
    theta[:, 1::2] = settings.sigma_start_kms
    vgrid = np.arange(settings.velocity_range_kms[0],
                      settings.velocity_range_kms[1] + 1e-9, settings.velocity_grid_step_kms)
    for gi in range(len(model.groups)):
        best = np.full(n, np.inf)
        best_v = np.zeros(n)
        for v in vgrid:
            trial = theta.copy()
            trial[:, 2 * gi] = v
            chi2 = _evaluate(model, trial, yw, w, False).chi2
            better = chi2 < best
            best[better] = chi2[better]
            best_v[better] = v
        theta[:, 2 * gi] = best_v
    frozen = np.zeros((n, nt), dtype=bool)
    theta, state, converged, n_iter = _levenberg_marquardt(model, theta, yw, w, settings, frozen)
    var_coef, var_theta = _covariance(model, theta, state, frozen)
    # look-elsewhere guard: groups without a line above kinematics_snr get fixed kinematics
    n_l = model.n_lines
    snr = state["coef"][:, :n_l] / np.sqrt(var_coef[:, :n_l])
    forced = np.zeros((n, len(model.groups)), dtype=bool)
    for gi in range(len(model.groups)):
        in_g = model.line_group == gi
        best_snr = np.nanmax(np.where(np.isfinite(snr[:, in_g]), snr[:, in_g], -np.inf), axis=1)
        forced[:, gi] = ~(best_snr >= settings.kinematics_snr)
    if forced.any():
        redo = np.flatnonzero(forced.any(axis=1))
        fz = np.repeat(forced[redo], 2, axis=1)
        th = theta[redo].copy()
        th[fz] = np.tile(fallback_theta, (redo.size, 1))[fz]
        th2, st2, conv2, it2 = _levenberg_marquardt(model, th, yw[redo], w[redo], settings, fz)
        vc2, vt2 = _covariance(model, th2, st2, fz)
        theta[redo] = th2
        for key in state:
            state[key][redo] = st2[key]
        converged[redo] = conv2
        n_iter[redo] += it2
        var_coef[redo] = vc2
        var_theta[redo] = vt2
        frozen[redo] = fz
    n_par = np.array([m.shape[1] for _, m in model.combos])[state["combo"]] + model.n_cont
    n_free_theta = nt - frozen.sum(axis=1)
    dof = good.sum(axis=1) - n_par - n_free_theta
    return {"theta": theta, "coef": state["coef"], "var_coef": var_coef,
            "var_theta": var_theta, "chi2": state["chi2"], "dof": dof,
            "converged": converged, "n_iter": n_iter, "forced": forced, "good": good}

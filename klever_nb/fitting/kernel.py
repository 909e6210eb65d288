"""Batched variable-projection kernel: Gram matrices, Levenberg–Marquardt, covariance.

The Gram matrices of the weighted columns [profiles | continuum | data | derivatives]
are accumulated sparsely by a numba kernel when numba is importable (``USE_NUMBA``),
else by dense numpy products; :func:`_evaluate` solves the linear parameters for
every bound state of the ratio-bounded pairs, :func:`_levenberg_marquardt` iterates
on (v, σ) and :func:`_covariance` inverts the full Gauss–Newton normal matrix.

The switches ``USE_NUMBA``, ``NUMBA_PARALLEL`` and ``NUMBA_THREADS`` live here;
``klever_nb.fitting.USE_NUMBA = False`` (reading or setting the package attribute)
acts on them (see :mod:`klever_nb.fitting`).

References
----------
K20 §3.1; FACTS.md §12 (variable projection).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from klever_nb.fitting import vpfit
from klever_nb.fitting.model import (
    _TRUNCATE_SIGMA,
    BandModel,
    FitSettings,
    _full_map,
    _kinematics,
    _profiles,
)

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
    iteration counts. Spaxels leave the active set when converged. With numba the
    compiled per-spaxel twin (:mod:`klever_nb.fitting.vpfit`, the same steps) runs instead.
    """
    if _use_numba() and vpfit.available():
        return vpfit.levenberg_marquardt(model, theta, yw, w, settings, frozen, max_iterations)
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

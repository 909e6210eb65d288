"""Compiled per-spaxel variable projection: starting grid, Levenberg–Marquardt, normal matrix.

The same algorithm as the batched numpy path of :mod:`klever_nb.fitting.kernel`
(:func:`~klever_nb.fitting.kernel._evaluate`, :func:`~klever_nb.fitting.kernel._levenberg_marquardt`,
the coarse velocity grid of ``cube._start_theta``), step for step — the same linear
solves for every bound state of the ratio-bounded pairs, the same Kaufman gradient and
Gauss–Newton Hessian in (v, σ), the same damping, holds on bounds and stopping rules —
written once per spaxel in numba so that a spaxel never waits for the slowest of its
batch and no (N, k, k) temporaries are built. The last evaluation also returns the full
Gauss–Newton normal matrix, so the covariance needs no further pass over the data.

Each line is evaluated only within ±7σ (``_TRUNCATE_SIGMA``), contiguous pixels share
their edge's error function. Used when numba is importable and ``kernel.USE_NUMBA``;
the numpy path gives the same numbers (tests).

References
----------
K20 §3.1; FACTS.md §12 (variable projection, 18 000–39 000 spaxels/s on one thread).
"""

from __future__ import annotations

import math

import numpy as np

from klever_nb.fitting.model import _TRUNCATE_SIGMA, C_KMS, BandModel, FitSettings

try:
    import numba
except ImportError:  # pragma: no cover - numba is optional
    numba = None


def pack(model: BandModel) -> tuple:
    """The model's spaxel-independent arrays, in the order the compiled functions take them."""
    seg = np.argmax(model.continuum_basis[:, 0::2], axis=1).astype(np.int64)
    xrel = model.continuum_basis[np.arange(seg.size), 2 * seg + 1].copy()
    n_combo = len(model.full_maps)
    kdim = model.n_lines + model.n_cont
    pmax = max(m.shape[1] for m in model.full_maps)
    maps = np.zeros((n_combo, kdim, pmax))
    npar = np.zeros(n_combo, dtype=np.int64)
    for k, full in enumerate(model.full_maps):
        maps[k, :, :full.shape[1]] = full
        npar[k] = full.shape[1]
    nb = len(model.bounded)
    bnum = np.array([b[0] for b in model.bounded], dtype=np.int64).reshape(nb)
    bden = np.array([b[1] for b in model.bounded], dtype=np.int64).reshape(nb)
    blo = np.array([b[2] for b in model.bounded], dtype=float).reshape(nb)
    bhi = np.array([b[3] for b in model.bounded], dtype=float).reshape(nb)
    states = np.zeros((n_combo, max(nb, 1)), dtype=np.int64)
    for k, (st, _) in enumerate(model.combos):
        for q, s in enumerate(st):
            states[k, q] = {"free": 0, "lo": 1, "hi": 2}[s]
    tlo, thi = model.theta_bounds()
    return (np.ascontiguousarray(model.edge_lo), np.ascontiguousarray(model.edge_hi),
            np.ascontiguousarray(model.width_int), seg, xrel,
            np.ascontiguousarray(model.centre, dtype=float),
            np.ascontiguousarray(model.sigma_inst, dtype=float),
            np.ascontiguousarray(model.line_group, dtype=np.int64),
            maps, npar, bnum, bden, blo, bhi, states, tlo, thi)


_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# module-level functions (not closures) so that numba's on-disk cache is reused
jit = numba.njit(cache=True, nogil=True) if numba is not None else (lambda f: f)

@jit
def solve_sym(a, b, n, m, out, work):
    """Solve a[:n,:n] x = b[:n,:m] (symmetric) with Jacobi scaling; pinv if singular."""
    d = work[0]
    for i in range(n):
        v = math.sqrt(abs(a[i, i]))
        d[i] = 1.0 / v if v > 0 else 1.0
    s = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            s[i, j] = a[i, j] * d[i] * d[j]
    # Cholesky of the scaled matrix
    lo = np.zeros((n, n))
    ok = True
    for j in range(n):
        acc = s[j, j]
        for k in range(j):
            acc -= lo[j, k] * lo[j, k]
        if not acc > 1e-13:
            ok = False
            break
        ljj = math.sqrt(acc)
        lo[j, j] = ljj
        for i in range(j + 1, n):
            acc2 = s[i, j]
            for k in range(j):
                acc2 -= lo[i, k] * lo[j, k]
            lo[i, j] = acc2 / ljj
    if ok:
        for c in range(m):
            y = np.empty(n)
            for i in range(n):
                acc = b[i, c] * d[i]
                for k in range(i):
                    acc -= lo[i, k] * y[k]
                y[i] = acc / lo[i, i]
            for i in range(n - 1, -1, -1):
                acc = y[i]
                for k in range(i + 1, n):
                    acc -= lo[k, i] * out[k, c]
                out[i, c] = acc / lo[i, i]
            for i in range(n):
                out[i, c] *= d[i]
    else:
        # LU with partial pivoting (what numpy.linalg.solve does), pinv if singular
        sb = np.empty((n, m))
        for i in range(n):
            for c in range(m):
                sb[i, c] = b[i, c] * d[i]
        if np.all(np.isfinite(s)) and abs(np.linalg.det(s)) > 0:
            x = np.linalg.solve(s, sb)
        elif np.all(np.isfinite(s)):
            x = np.linalg.pinv(s) @ sb
        else:
            x = np.full((n, m), np.nan)
        for i in range(n):
            for c in range(m):
                out[i, c] = x[i, c] * d[i]

@jit
def line_profiles(theta, edge_lo, edge_hi, width, centre, sigma_inst, line_group, derivs,
                  mu, s, i0, i1, prof, dmu, dsg):
    """Centres, sigmas, windows (+-7 sigma) and pixel-integrated profiles (and derivatives)."""
    n_l = centre.size
    for j in range(n_l):
        g = line_group[j]
        v = theta[2 * g]
        sig = theta[2 * g + 1]
        mu[j] = centre[j] * (1.0 + v / C_KMS)
        cs = centre[j] * sig / C_KMS
        s[j] = math.sqrt(cs * cs + sigma_inst[j] * sigma_inst[j])
        i0[j] = np.searchsorted(edge_hi, mu[j] - _TRUNCATE_SIGMA * s[j])
        i1[j] = np.searchsorted(edge_lo, mu[j] + _TRUNCATE_SIGMA * s[j], side="right")
    for j in range(n_l):
        sj = s[j]
        prev_edge = np.nan
        qa = 0.0
        pa = 0.0
        pb = 0.0
        for i in range(i0[j], i1[j]):
            a = (edge_lo[i] - mu[j]) / sj
            b = (edge_hi[i] - mu[j]) / sj
            if edge_lo[i] != prev_edge:
                qa = 0.5 * math.erfc(a * _SQRT_HALF)
                if derivs:
                    pa = math.exp(-0.5 * a * a) * _INV_SQRT_2PI
            qb = 0.5 * math.erfc(b * _SQRT_HALF)
            inv = 1.0 / width[i]
            prof[j, i] = (qa - qb) * inv
            if derivs:
                pb = math.exp(-0.5 * b * b) * _INV_SQRT_2PI
                dmu[j, i] = -(pb - pa) * inv / sj
                dsg[j, i] = -(b * pb - a * pa) * inv / sj
            prev_edge = edge_hi[i]
            qa = qb
            pa = pb


@jit
def evaluate(theta, wrow, ywrow, base, edge_lo, edge_hi, width, seg, xrel, centre,
             sigma_inst, line_group, maps, npar, bnum, bden, blo, bhi, states,
             derivs, bounded, frozen, res_coef, res_normal, res_grad, res_hess):
    """Variable-projection evaluation of one spaxel; returns (chi2, combo)."""
    n_l = centre.size
    n_c = edge_lo.size
    mu = np.empty(n_l)
    s = np.empty(n_l)
    i0 = np.empty(n_l, np.int64)
    i1 = np.empty(n_l, np.int64)
    # only each line's own window [i0, i1) of these is ever read
    prof = np.empty((n_l, n_c))
    dmu = np.empty((n_l, n_c)) if derivs else prof
    dsg = np.empty((n_l, n_c)) if derivs else prof
    line_profiles(theta, edge_lo, edge_hi, width, centre, sigma_inst, line_group, derivs,
                  mu, s, i0, i1, prof, dmu, dsg)
    return project(theta, prof, dmu, dsg, mu, s, i0, i1, wrow, ywrow, base, seg, xrel,
                   centre, line_group, maps, npar, bnum, bden, blo, bhi, states, derivs,
                   bounded, frozen, res_coef, res_normal, res_grad, res_hess)


@jit
def project(theta, prof, dmu, dsg, mu, s, i0, i1, wrow, ywrow, base, seg, xrel, centre,
            line_group, maps, npar, bnum, bden, blo, bhi, states, derivs, bounded, frozen,
            res_coef, res_normal, res_grad, res_hess):
    """Linear solve at given profiles (every bound state), and the (v, sigma) derivatives."""
    n_l = centre.size
    n_c = prof.shape[1]
    kdim = maps.shape[1]
    pmax = maps.shape[2]
    nt = theta.size
    n_combo = maps.shape[0]
    nb = bnum.size
    # Gram of [P | C] and its products with y
    gram = np.zeros((kdim, kdim))
    bvec = np.zeros(kdim)
    for a_ in range(n_l, kdim):
        for b_ in range(n_l, kdim):
            gram[a_, b_] = base[a_ - n_l, b_ - n_l]
        bvec[a_] = base[a_ - n_l, kdim - n_l]
    yy = base[kdim - n_l, kdim - n_l]
    for j in range(n_l):
        for i in range(i0[j], i1[j]):
            wi = wrow[i]
            if wi == 0.0:
                continue
            pw = prof[j, i] * wi
            c0 = n_l + 2 * seg[i]
            gram[j, c0] += pw * wi
            gram[j, c0 + 1] += pw * wi * xrel[i]
            bvec[j] += pw * ywrow[i]
        for j2 in range(j, n_l):
            lo_ = max(i0[j], i0[j2])
            hi_ = min(i1[j], i1[j2])
            acc = 0.0
            for i in range(lo_, hi_):
                wi = wrow[i]
                acc += prof[j, i] * prof[j2, i] * wi * wi
            gram[j, j2] = acc
    for a_ in range(kdim):
        for b_ in range(a_ + 1, kdim):
            if a_ < n_l:
                gram[b_, a_] = gram[a_, b_]
            else:
                gram[b_, a_] = gram[a_, b_]
    # linear solve for every bound state of the bounded pairs
    best_chi2 = np.inf
    best_k = 0
    best_g = np.zeros((pmax, pmax))
    best_a = np.zeros(pmax)
    work = np.empty((1, pmax))
    sol = np.empty((pmax, 1))
    gk = np.empty((pmax, pmax))
    bk = np.empty((pmax, 1))
    coef = np.empty(kdim)
    for k in range(n_combo):
        npk = npar[k]
        mk = maps[k]
        # gk = M^T G M, bk = M^T b
        tmp = np.zeros((kdim, npk))
        for r in range(kdim):
            for c in range(npk):
                acc = 0.0
                for q in range(kdim):
                    acc += gram[r, q] * mk[q, c]
                tmp[r, c] = acc
        for p1 in range(npk):
            acc = 0.0
            for q in range(kdim):
                acc += mk[q, p1] * bvec[q]
            bk[p1, 0] = acc
            for p2 in range(npk):
                acc = 0.0
                for q in range(kdim):
                    acc += mk[q, p1] * tmp[q, p2]
                gk[p1, p2] = acc
        # parameters without data (zero diagonal): identity, zero right-hand side
        dmax = 0.0
        for p1 in range(npk):
            dmax = max(dmax, abs(gk[p1, p1]))
        thr = 1e-14 * (dmax if dmax > 0 else 1.0)
        for p1 in range(npk):
            if gk[p1, p1] <= thr:
                bk[p1, 0] = 0.0
                for p2 in range(npk):
                    gk[p1, p2] = 0.0
                    gk[p2, p1] = 0.0
                gk[p1, p1] = 1.0
        solve_sym(gk, bk, npk, 1, sol, work)
        chi2 = yy
        for p1 in range(npk):
            chi2 -= sol[p1, 0] * bk[p1, 0]
        for r in range(kdim):
            acc = 0.0
            for p1 in range(npk):
                acc += mk[r, p1] * sol[p1, 0]
            coef[r] = acc
        feasible = True
        if bounded:
            for q in range(nb):
                if states[k, q] == 0:
                    fn = coef[bnum[q]]
                    fd = coef[bden[q]]
                    eps = 1e-12 * abs(fd)
                    okp = (fd > 0) and (fn >= blo[q] * fd - eps) and (fn <= bhi[q] * fd + eps)
                    okn = (fd < 0) and (fn <= blo[q] * fd + eps) and (fn >= bhi[q] * fd - eps)
                    if not (okp or okn or (fd == 0 and fn == 0)):
                        feasible = False
        if feasible and chi2 < best_chi2:
            best_chi2 = chi2
            best_k = k
            for r in range(kdim):
                res_coef[r] = coef[r]
            for p1 in range(npk):
                best_a[p1] = sol[p1, 0]
                for p2 in range(npk):
                    best_g[p1, p2] = gk[p1, p2]
        if k == 0 and (feasible or not bounded):
            break
    if best_chi2 == np.inf:
        for r in range(kdim):
            res_coef[r] = 0.0
    chi2_out = max(best_chi2, 0.0)
    if not derivs:
        return chi2_out, best_k
    # Jacobian in theta of the weighted model: J_t = sum_l F_l dP_l/dtheta_t
    imin = n_c
    imax = 0
    for j in range(n_l):
        imin = min(imin, i0[j])
        imax = max(imax, i1[j])
    jac = np.empty((nt, n_c))
    jac[:, imin:imax] = 0.0
    for j in range(n_l):
        g = line_group[j]
        fl = res_coef[j]
        sig = theta[2 * g + 1]
        fv = 0.0 if frozen[2 * g] else fl * centre[j] / C_KMS
        fs = 0.0 if frozen[2 * g + 1] else fl * (centre[j] / C_KMS) ** 2 * sig / s[j]
        for i in range(i0[j], i1[j]):
            jac[2 * g, i] += fv * dmu[j, i]
            jac[2 * g + 1, i] += fs * dsg[j, i]
    cross = np.zeros((kdim, nt))
    jty = np.zeros(nt)
    jj = np.zeros((nt, nt))
    for i in range(imin, imax):
        wi = wrow[i]
        if wi == 0.0:
            continue
        w2 = wi * wi
        c0 = n_l + 2 * seg[i]
        for t in range(nt):
            jt = jac[t, i]
            if jt == 0.0:
                continue
            cross[c0, t] += w2 * jt
            cross[c0 + 1, t] += w2 * xrel[i] * jt
            jty[t] += wi * ywrow[i] * jt
            for t2 in range(nt):
                jj[t, t2] += w2 * jt * jac[t2, i]
    for j in range(n_l):  # line columns: only over their own windows
        for i in range(i0[j], i1[j]):
            wi = wrow[i]
            pw = wi * wi * prof[j, i]
            for t in range(nt):
                cross[j, t] += pw * jac[t, i]
    npk = npar[best_k]
    mk = maps[best_k]
    aj = np.zeros((pmax, nt))
    for p1 in range(npk):
        for t in range(nt):
            acc = 0.0
            for q in range(kdim):
                acc += mk[q, p1] * cross[q, t]
            aj[p1, t] = acc
    for t in range(nt):
        acc = jty[t]
        for p1 in range(npk):
            acc -= aj[p1, t] * best_a[p1]
        res_grad[t] = acc
    ginv_aj = np.empty((pmax, nt))
    solve_sym(best_g, aj, npk, nt, ginv_aj, work)
    for t in range(nt):
        for u in range(nt):
            acc = jj[t, u]
            for p1 in range(npk):
                acc -= aj[p1, t] * ginv_aj[p1, u]
            res_hess[t, u] = acc
    res_normal[:, :] = 0.0
    for p1 in range(npk):
        for p2 in range(npk):
            res_normal[p1, p2] = best_g[p1, p2]
        for t in range(nt):
            res_normal[p1, pmax + t] = aj[p1, t]
            res_normal[pmax + t, p1] = aj[p1, t]
    for p1 in range(npk, pmax):
        res_normal[p1, p1] = 1.0
    for t in range(nt):
        for u in range(nt):
            res_normal[pmax + t, pmax + u] = jj[t, u]
    return chi2_out, best_k

@jit
def base_block(wrow, ywrow, seg, xrel, n_cont):
    """theta-independent [C | y] Gram block of one spaxel, (n_cont + 1)^2."""
    out = np.zeros((n_cont + 1, n_cont + 1))
    for i in range(wrow.size):
        wi = wrow[i]
        if wi == 0.0:
            continue
        c0 = 2 * seg[i]
        x = xrel[i]
        w2 = wi * wi
        out[c0, c0] += w2
        out[c0, c0 + 1] += w2 * x
        out[c0 + 1, c0 + 1] += w2 * x * x
        out[c0, n_cont] += wi * ywrow[i]
        out[c0 + 1, n_cont] += wi * ywrow[i] * x
        out[n_cont, n_cont] += ywrow[i] * ywrow[i]
    for a_ in range(n_cont + 1):
        for b_ in range(a_ + 1, n_cont + 1):
            out[b_, a_] = out[a_, b_]
    return out

@jit
def grid_table(vgrid, sig0, edge_lo, edge_hi, width, centre, sigma_inst, line_group, ng):
    """Profiles of every line at every grid velocity (and v = 0), sigma = sig0: the same for
    every spaxel, so the starting grid evaluates no error function per spaxel."""
    n_l = centre.size
    n_c = edge_lo.size
    nv = vgrid.size + 1
    ptab = np.empty((nv, n_l, n_c))
    i0tab = np.empty((nv, n_l), np.int64)
    i1tab = np.empty((nv, n_l), np.int64)
    theta = np.empty(2 * ng)
    for r in range(nv):
        for g in range(ng):
            theta[2 * g] = vgrid[r] if r < vgrid.size else 0.0
            theta[2 * g + 1] = sig0
        mu = np.empty(n_l)
        s = np.empty(n_l)
        line_profiles(theta, edge_lo, edge_hi, width, centre, sigma_inst, line_group, False,
                      mu, s, i0tab[r], i1tab[r], ptab[r], ptab[r], ptab[r])
    return ptab, i0tab, i1tab


@jit
def _grid_all(w, yw, theta, vgrid, edge_lo, edge_hi, width, seg, xrel, centre,
              sigma_inst, line_group, maps, npar, bnum, bden, blo, bhi, states):
    """The coarse velocity grid (one group after the other), in place on theta.

    Every group starts at v = 0 (the table's last row) and sigma = theta[:, 1]."""
    n_sp, nt = theta.shape
    ng = nt // 2
    n_l = centre.size
    n_c = edge_lo.size
    kdim = maps.shape[1]
    pmax = maps.shape[2]
    n_cont = kdim - n_l
    ptab, i0tab, i1tab = grid_table(vgrid, theta[0, 1] if n_sp else 0.0, edge_lo, edge_hi,
                                    width, centre, sigma_inst, line_group, ng)
    nv = vgrid.size
    coef = np.empty(kdim)
    normal = np.empty((pmax + nt, pmax + nt))
    grad = np.empty(nt)
    hess = np.empty((nt, nt))
    frozen = np.zeros(nt, dtype=np.bool_)
    prof = np.empty((n_l, n_c))
    mu = np.zeros(n_l)
    s = np.ones(n_l)
    i0 = np.empty(n_l, np.int64)
    i1 = np.empty(n_l, np.int64)
    row = np.empty(ng, np.int64)
    for n in range(n_sp):
        base = base_block(w[n], yw[n], seg, xrel, n_cont)
        th = theta[n].copy()
        row[:] = nv
        for gi in range(ng):
            best = np.inf
            best_r = 0
            for r in range(nv):
                row[gi] = r
                for j in range(n_l):
                    rr = row[line_group[j]]
                    i0[j] = i0tab[rr, j]
                    i1[j] = i1tab[rr, j]
                    for i in range(i0[j], i1[j]):
                        prof[j, i] = ptab[rr, j, i]
                th[2 * gi] = vgrid[r]
                chi2, _ = project(th, prof, prof, prof, mu, s, i0, i1, w[n], yw[n], base, seg,
                                  xrel, centre, line_group, maps, npar, bnum, bden, blo, bhi,
                                  states, False, False, frozen, coef, normal, grad, hess)
                if chi2 < best:
                    best = chi2
                    best_r = r
            row[gi] = best_r
            th[2 * gi] = vgrid[best_r]
        theta[n, :] = th


@jit
def _lm_all(w, yw, theta, frozen, max_iterations, tol, edge_lo, edge_hi,
                        width, seg, xrel, centre, sigma_inst, line_group, maps, npar,
                        bnum, bden, blo, bhi, states, tlo, thi,
                        out_chi2, out_coef, out_combo, out_normal, converged, n_iter):
    """Bounded Levenberg–Marquardt on (v, sigma) of every spaxel, in place on theta."""
    n_sp, nt = theta.shape
    kdim = maps.shape[1]
    pmax = maps.shape[2]
    n_cont = kdim - centre.size
    span = thi - tlo
    coef = np.empty(kdim)
    normal = np.empty((pmax + nt, pmax + nt))
    grad = np.empty(nt)
    hess = np.empty((nt, nt))
    tcoef = np.empty(kdim)
    tnormal = np.empty((pmax + nt, pmax + nt))
    tgrad = np.empty(nt)
    thess = np.empty((nt, nt))
    damp = np.empty((nt, nt))
    gv = np.empty((nt, 1))
    step = np.empty((nt, 1))
    work = np.empty((1, nt))
    hold = np.empty(nt, dtype=np.bool_)
    for n in range(n_sp):
        wrow = w[n]
        ywrow = yw[n]
        fz = frozen[n]
        base = base_block(wrow, ywrow, seg, xrel, n_cont)
        th = theta[n].copy()
        for t in range(nt):
            th[t] = min(max(th[t], tlo[t]), thi[t])
        chi2, combo = evaluate(th, wrow, ywrow, base, edge_lo, edge_hi, width, seg, xrel,
                               centre, sigma_inst, line_group, maps, npar, bnum, bden,
                               blo, bhi, states, True, True, fz, coef, normal, grad, hess)
        lam = 1e-3
        conv = True
        for t in range(nt):
            if not fz[t]:
                conv = False
        it = 0
        while not conv and it < max_iterations:
            for t in range(nt):
                g = grad[t]
                hold[t] = fz[t] or ((th[t] <= tlo[t] + 1e-9 * span[t]) and g < 0) or (
                    (th[t] >= thi[t] - 1e-9 * span[t]) and g > 0)
            for t in range(nt):
                for u in range(nt):
                    damp[t, u] = hess[t, u]
                damp[t, t] += lam * max(hess[t, t], 1e-30)
            for t in range(nt):
                gv[t, 0] = 0.0 if hold[t] else grad[t]
                if hold[t]:
                    for u in range(nt):
                        damp[t, u] = 0.0
                        damp[u, t] = 0.0
            for t in range(nt):
                if hold[t]:
                    damp[t, t] = 1.0
            solve_sym(damp, gv, nt, 1, step, work)
            trial = np.empty(nt)
            pred = 0.0
            moved = False
            for t in range(nt):
                trial[t] = min(max(th[t] + step[t, 0], tlo[t]), thi[t])
                if hold[t]:
                    trial[t] = th[t]
                pred += (trial[t] - th[t]) * gv[t, 0]
                if abs(trial[t] - th[t]) > 1e-10 * span[t]:
                    moved = True
            tchi2, tcombo = evaluate(trial, wrow, ywrow, base, edge_lo, edge_hi, width,
                                     seg, xrel, centre, sigma_inst, line_group, maps, npar,
                                     bnum, bden, blo, bhi, states, True, True, fz, tcoef,
                                     tnormal, tgrad, thess)
            dchi = chi2 - tchi2
            acc = dchi > 0
            it += 1
            if acc:
                th[:] = trial
                chi2 = tchi2
                combo = tcombo
                coef[:] = tcoef
                normal[:, :] = tnormal
                grad[:] = tgrad
                hess[:, :] = thess
                lam = max(lam / 10.0, 1e-9)
            else:
                lam = lam * 10.0
            done = (acc and dchi < tol) or ((not acc) and abs(dchi) < tol and pred < 10 * tol)
            done = done or lam > 1e10 or ((not moved) and not acc)
            if done:
                conv = True
        theta[n, :] = th
        out_chi2[n] = chi2
        out_coef[n, :] = coef
        out_combo[n] = combo
        out_normal[n, :, :] = normal
        converged[n] = conv
        n_iter[n] = it




_COMPILED = (_grid_all, _lm_all) if numba is not None else None


def available() -> bool:
    return _COMPILED is not None


def start_theta(model: BandModel, yw, w, settings: FitSettings) -> np.ndarray:
    """Compiled twin of ``cube._start_theta`` (coarse velocity grid, one group after another)."""
    n = yw.shape[0]
    theta = np.tile([0.0, settings.sigma_start_kms], (n, len(model.groups))).astype(float)
    vgrid = np.arange(settings.velocity_range_kms[0],
                      settings.velocity_range_kms[1] + 1e-9, settings.velocity_grid_step_kms)
    _COMPILED[0](np.ascontiguousarray(w, dtype=float), np.ascontiguousarray(yw, dtype=float),
                 theta, vgrid, *pack(model)[:-2])
    return theta


def levenberg_marquardt(model: BandModel, theta, yw, w, settings: FitSettings, frozen,
                        max_iterations: int):
    """Compiled twin of ``kernel._levenberg_marquardt``: (theta, state, converged, n_iter).

    ``state`` holds ``chi2``, ``coef``, ``combo`` and ``normal`` at the final theta
    (``max_iterations=0``: the evaluation at the clipped starting point).
    """
    packed = pack(model)
    n, nt = theta.shape
    kdim = model.n_lines + model.n_cont
    pmax = packed[8].shape[2]
    theta = np.array(theta, dtype=float, copy=True, order="C")
    state = {"chi2": np.empty(n), "coef": np.empty((n, kdim)), "combo": np.empty(n, np.int64),
             "normal": np.empty((n, pmax + nt, pmax + nt))}
    converged = np.zeros(n, dtype=bool)
    n_iter = np.zeros(n, dtype=np.int64)
    _COMPILED[1](np.ascontiguousarray(w, dtype=float), np.ascontiguousarray(yw, dtype=float),
                 theta, np.ascontiguousarray(frozen, dtype=np.bool_), int(max_iterations),
                 float(settings.chi2_tolerance), *packed, state["chi2"], state["coef"],
                 state["combo"], state["normal"], converged, n_iter)
    state["combo"] = state["combo"].astype(int)
    return theta, state, converged, n_iter.astype(int)

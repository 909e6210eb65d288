"""The slow twin of the batched fitter: one spectrum at a time with scipy's least_squares.

References
----------
K20 §3.1; FACTS.md §12.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from klever_nb.fitting.cube import _as_cube, _empty_result, _global_fallback, _to_dataset
from klever_nb.fitting.model import (
    C_KMS,
    BandModel,
    FitSettings,
    _check_lines,
    _resolving_power,
    as_settings,
    build_band_model,
    fit_sky_mask,
    integrated_flux_units,
)


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


def fit_spectrum_reference(spectrum: xr.Dataset, *, redshift: float,
                           settings: FitSettings | None = None, lines=None,
                           fallback_kinematics: dict | None = None) -> xr.Dataset:
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
    settings = as_settings(settings)
    r_fit = _resolving_power(cube, settings.resolving_power)
    units, aa_to_int, _ = integrated_flux_units(cube.flux.attrs.get("units"))
    wave_um = np.asarray(cube.wave.values, dtype=float)
    band = str(cube.attrs.get("band", ""))
    model = build_band_model(wave_um, redshift=redshift, lines=lines, resolving_power=r_fit,
                             settings=settings, angstrom_to_int=aa_to_int)
    missing = [n for n in (lines or ()) if model is None or n not in model.lines]
    if model is None:
        return _empty_result(cube, ["y", "x"], (1, 1), missing, band, {}, units).isel(
            y=0, x=0, drop=True)
    skymask = fit_sky_mask(cube, settings)[model.channels]
    flux = np.asarray(cube.flux.values, dtype=float)[model.channels, 0, 0]
    noise = np.asarray(cube.noise.values, dtype=float)[model.channels, 0, 0]
    good = np.isfinite(flux) & np.isfinite(noise) & (noise > 0) & ~skymask
    fallback = _global_fallback(model, settings, fallback_kinematics)
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

"""Straight-line fit of the profile, resolution class, App. A systematics, the measurement.

Part of :mod:`klever_nb.gradients` (import from there).

References
----------
K20 §4.2 (MCMC fit, resolution criteria, centre), Table 4, Appendix A (systematics).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from klever_nb.errors import ConfigError
from klever_nb.gradients.annuli import psf_hwhm_size_kpc
from klever_nb.gradients.profile import gradient_pixels, radial_profile


# ---------------------------------------------------------------------------
# Linear fit of the profile
# ---------------------------------------------------------------------------
def _wls_line(x: np.ndarray, y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form weighted least squares of y = a + b x: (params, covariance)."""
    w = 1.0 / np.maximum(s, 1e-6) ** 2
    design = np.stack([np.ones_like(x), x], axis=1)
    normal = design.T @ (design * w[:, None])
    cov = np.linalg.inv(normal)
    return cov @ (design.T @ (w * y)), cov


def _nan_fit(message: str, n: int, method: str) -> dict:
    return {"central_oh": np.nan, "central_oh_err": np.nan, "gradient_dex_per_kpc": np.nan,
            "gradient_err": np.nan, "central_oh_wls": np.nan, "central_oh_wls_err": np.nan,
            "gradient_wls": np.nan, "gradient_wls_err": np.nan, "method": method,
            "converged": False, "n_points": n, "chi2": np.nan, "ndof": max(n - 2, 0),
            "message": message}


def fit_gradient(profile: xr.Dataset, *, method: str = "emcee", seed: int = 0,
                 nwalkers: int = 16, nsteps: int = 2000, burn: int = 500) -> dict:
    """Straight-line fit 12+log(O/H) = central + gradient x r to a radial profile.

    Parameters
    ----------
    profile : Dataset
        From :func:`radial_profile` (``radius_kpc``, ``oh``, ``oh_err``).
    method : {"emcee", "wls"}
        Posterior median and 1 sigma (half the 16-84 range) from emcee with flat priors
        (central in [5, 11], gradient in [-5, 5] dex/kpc), as in K20 §4.2; or the
        closed-form weighted least squares. The WLS numbers are always returned too
        (``*_wls`` keys).
    seed, nwalkers, nsteps, burn
        emcee settings (``burn`` steps are discarded).

    Returns
    -------
    dict with ``central_oh``, ``central_oh_err``, ``gradient_dex_per_kpc``, ``gradient_err``,
    the WLS equivalents, ``converged`` (emcee: chain longer than 50 autocorrelation times
    and acceptance 0.15-0.85; WLS: True), ``chi2``, ``ndof``, ``n_points``, ``message`` and the
    profile's ``centre_kpc``. Fewer than two points give NaN and a message, never an error.

    References
    ----------
    K20 §4.2.
    """
    if method not in ("emcee", "wls"):
        raise ConfigError(f"method: must be 'emcee' or 'wls', got {method!r}")
    if method == "emcee" and (nwalkers < 4 or nsteps < 10):
        raise ConfigError(f"nwalkers={nwalkers}, nsteps={nsteps}: emcee needs nwalkers >= 4 "
                          "(twice the 2 parameters) and nsteps >= 10")
    x = np.asarray(profile["radius_kpc"], float)
    y = np.asarray(profile["oh"], float)
    s = np.asarray(profile["oh_err"], float)
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(s)
    x, y, s = x[ok], y[ok], s[ok]
    centre = (profile.attrs.get("centre_x_kpc", 0.0), profile.attrs.get("centre_y_kpc", 0.0))
    if x.size < 2 or np.ptp(x) <= 0:
        out = _nan_fit(f"only {x.size} annulus/annuli with metallicities: no gradient",
                       x.size, method)
        out["centre_kpc"] = centre
        return out
    params, cov = _wls_line(x, y, s)
    s_floor = np.maximum(s, 1e-6)
    chi2 = float(np.sum(((y - params[0] - params[1] * x) / s_floor) ** 2))
    out = {"central_oh_wls": float(params[0]), "central_oh_wls_err": float(np.sqrt(cov[0, 0])),
           "gradient_wls": float(params[1]), "gradient_wls_err": float(np.sqrt(cov[1, 1])),
           "method": method, "n_points": int(x.size), "chi2": chi2, "ndof": int(x.size - 2),
           "centre_kpc": centre, "message": ""}
    if method == "wls":
        out.update(central_oh=out["central_oh_wls"], central_oh_err=out["central_oh_wls_err"],
                   gradient_dex_per_kpc=out["gradient_wls"], gradient_err=out["gradient_wls_err"],
                   converged=True)
        return out
    samples, converged = _emcee_line(x, y, s_floor, params, cov, seed=seed, nwalkers=nwalkers,
                                     nsteps=nsteps, burn=burn)
    p16, p50, p84 = np.percentile(samples, [16, 50, 84], axis=0)
    out.update(central_oh=float(p50[0]), central_oh_err=float(0.5 * (p84[0] - p16[0])),
               gradient_dex_per_kpc=float(p50[1]), gradient_err=float(0.5 * (p84[1] - p16[1])),
               converged=converged)
    if not converged:
        out["message"] = "emcee chain shorter than 50 autocorrelation times"
    return out


def _emcee_line(x, y, s, params, cov, *, seed, nwalkers, nsteps, burn):
    import emcee

    def log_prob(theta: np.ndarray) -> np.ndarray:
        theta = np.atleast_2d(theta)
        a, b = theta[:, :1], theta[:, 1:2]
        lp = -0.5 * np.sum(((y[None] - a - b * x[None]) / s[None]) ** 2, axis=1)
        inside = (np.abs(theta[:, 0] - 8.0) < 3.0) & (np.abs(theta[:, 1]) < 5.0)
        return np.where(inside, lp, -np.inf)

    rng = np.random.default_rng(seed)
    start = rng.multivariate_normal(params, cov, size=nwalkers)
    sampler = emcee.EnsembleSampler(nwalkers, 2, log_prob, vectorize=True)
    sampler.random_state = np.random.RandomState(seed).get_state()
    sampler.run_mcmc(start, nsteps, progress=False)
    tau = sampler.get_autocorr_time(tol=0, quiet=True)
    acceptance = float(np.mean(sampler.acceptance_fraction))
    converged = bool(np.all(np.isfinite(tau)) and nsteps > 50 * np.max(tau)
                     and 0.15 < acceptance < 0.85)
    return sampler.get_chain(discard=min(burn, nsteps // 2), flat=True), converged


def resolution_class(r_max_kpc: float, psf: Mapping[str, float]) -> str:
    """"resolved" if r_max >= 2 sqrt(HWHM_maj HWHM_min), "marginal" if 1-2 x, else "unresolved".

    The boundaries belong to the better class (exactly 2 x is resolved, exactly 1 x marginal),
    with a relative tolerance of 1e-9 for rounding.

    References
    ----------
    K20 §4.2 and Table 4.
    """
    if r_max_kpc is None or not np.isfinite(r_max_kpc):
        return "unresolved"
    ratio = float(r_max_kpc) / psf_hwhm_size_kpc(psf)
    if ratio >= 2.0 * (1 - 1e-9):
        return "resolved"
    if ratio >= 1.0 * (1 - 1e-9):
        return "marginal"
    return "unresolved"


# ---------------------------------------------------------------------------
# Appendix A systematics and the top-level measurement
# ---------------------------------------------------------------------------
def gradient_systematics(metallicity: xr.Dataset, *, psf: Mapping[str, float],
                         step_fractions: Sequence[float] = (0.33, 0.5, 0.75, 1.0),
                         shapes: Sequence[str] = ("psf", "circular"),
                         centre_kpc: Sequence[float] = (0.0, 0.0), method: str = "wls",
                         size: str = "geometric", min_pixels: float = 3.0,
                         exclude_flags: Sequence[str] | None = None, seed: int = 0) -> dict:
    """Spread of the gradient over binning choices, used as a systematic error (App. A).

    Returns
    -------
    dict with ``table`` (one row per (shape, step_fraction): gradient, error, n_annuli),
    ``gradient_sys_err`` (standard deviation, ddof=1, of the finite gradients; NaN when fewer
    than two), ``gradient_min``/``gradient_max`` and ``central_oh_sys_err``.

    References
    ----------
    K20 §4.2 and Appendix A (circular vs PSF-shaped annuli, step choices).
    """
    rows = []
    for shape in shapes:
        for step in step_fractions:
            prof = radial_profile(metallicity, psf=psf, centre_kpc=centre_kpc,
                                  step_fraction=step, shape=shape, size=size,
                                  min_pixels=min_pixels, exclude_flags=exclude_flags)
            fit = fit_gradient(prof, method=method, seed=seed)
            rows.append({"shape": shape, "step_fraction": float(step),
                         "gradient_dex_per_kpc": fit["gradient_dex_per_kpc"],
                         "gradient_err": fit["gradient_err"], "central_oh": fit["central_oh"],
                         "n_annuli": int(prof.sizes["annulus"])})
    grads = np.array([r["gradient_dex_per_kpc"] for r in rows], float)
    cents = np.array([r["central_oh"] for r in rows], float)
    finite = np.isfinite(grads)
    spread = float(np.std(grads[finite], ddof=1)) if finite.sum() >= 2 else np.nan
    cspread = float(np.std(cents[finite], ddof=1)) if finite.sum() >= 2 else np.nan
    return {"table": rows, "gradient_sys_err": spread, "central_oh_sys_err": cspread,
            "gradient_min": float(np.min(grads[finite])) if finite.any() else np.nan,
            "gradient_max": float(np.max(grads[finite])) if finite.any() else np.nan}


def measure_gradient(metallicity: xr.Dataset, *, psf: Mapping[str, float],
                     centre_kpc: Sequence[float] | None = None, step_fraction: float = 0.5,
                     shape: str = "psf", size: str = "geometric", min_pixels: float = 3.0,
                     line_maps: xr.Dataset | None = None, method: str = "mean_oh",
                     fit_method: str = "emcee", systematics: bool = True,
                     exclude_flags: Sequence[str] | None = ("bimodal",),
                     require_all_diagnostics: bool = True,
                     seed: int = 0) -> tuple[xr.Dataset, dict]:
    """The paper's gradient of one galaxy: profile, fit, resolution class, systematics.

    Parameters
    ----------
    metallicity : Dataset
        Source-plane metallicity map (``oh``, ``oh_lo``, ``oh_hi`` on ``(ys, xs)`` in kpc).
    psf : dict
        Source PSF ``{"fwhm_major_kpc", "fwhm_minor_kpc", "theta_deg"}`` (source-grid frame).
    centre_kpc : (x, y), optional
        Default: the coordinate origin, which the lensing stage puts on the galaxy centre
        (continuum or Halpha peak, K20 §4.2; see :func:`peak_centre_kpc`).
    step_fraction, shape, size, min_pixels, line_maps, method
        See :func:`radial_profile`.
    exclude_flags, require_all_diagnostics
        Which pixels enter (:func:`gradient_pixels`): by default only those where every
        diagnostic of the galaxy's set entered (K20 §4.2: one combination per galaxy) and
        whose posterior is not bimodal. The counts are in the summary.
    fit_method : {"emcee", "wls"}
    systematics : bool
        Also run :func:`gradient_systematics` (WLS, fast) for ``gradient_sys_err``.

    Returns
    -------
    profile : Dataset
    summary : dict
        ``gradient_dex_per_kpc``, ``gradient_err``, ``central_oh``, ``central_oh_err``,
        ``resolved`` ("resolved" | "marginal" | "unresolved"), ``r_max_kpc`` (radius of
        the outermost profile point in the fit, K20 §4.2's "radial distance out to which
        metallicities are extracted"), ``r_max_edge_kpc`` (that annulus's outer edge), the
        pixel counts of :func:`gradient_pixels`,
        ``gradient_sys_err``, ``n_annuli``, ``converged``, ``message``, and the full ``fit``.
        A galaxy with fewer than two usable annuli gets NaN numbers, "unresolved" and a
        message; no exception.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> ys = xs = np.arange(-20, 21) * 0.2
    >>> r = np.hypot(*np.meshgrid(ys, xs, indexing="ij"))
    >>> oh = 8.5 - 0.03 * r
    >>> ds = xr.Dataset({"oh": (("ys", "xs"), oh), "oh_lo": (("ys", "xs"), oh - 0.05),
    ...                  "oh_hi": (("ys", "xs"), oh + 0.05)}, coords={"ys": ys, "xs": xs})
    >>> psf = {"fwhm_major_kpc": 1.5, "fwhm_minor_kpc": 0.8, "theta_deg": 30.0}
    >>> profile, summary = measure_gradient(ds, psf=psf, fit_method="wls")
    >>> round(summary["gradient_dex_per_kpc"], 4), summary["resolved"]
    (-0.03, 'resolved')

    References
    ----------
    K20 §4.2, Appendix A.
    """
    centre = (0.0, 0.0) if centre_kpc is None else (float(centre_kpc[0]), float(centre_kpc[1]))
    metallicity, counts = gradient_pixels(metallicity, exclude_flags=exclude_flags,
                                          require_all_diagnostics=require_all_diagnostics)
    profile = radial_profile(metallicity, psf=psf, centre_kpc=centre,
                             step_fraction=step_fraction, shape=shape, size=size,
                             min_pixels=min_pixels, line_maps=line_maps, method=method)
    n_annuli = int(profile.sizes["annulus"])
    r_max = float(profile["radius_kpc"].max()) if n_annuli else 0.0
    summary: dict[str, Any] = {"r_max_kpc": r_max, "n_annuli": n_annuli,
                               "r_max_edge_kpc": float(profile["r_out_kpc"].max())
                               if n_annuli else 0.0,
                               "psf_hwhm_size_kpc": psf_hwhm_size_kpc(psf),
                               "centre_kpc": list(centre), **counts}
    if n_annuli < 2:
        fit = _nan_fit(f"unresolved: only {n_annuli} annulus/annuli with >= {min_pixels} valid "
                       f"pixels (step {profile.attrs['step_kpc']:.2f} kpc); the metallicity "
                       "map is too small or too faint for a gradient", n_annuli, fit_method)
        summary.update(gradient_dex_per_kpc=np.nan, gradient_err=np.nan, central_oh=np.nan,
                       central_oh_err=np.nan, resolved="unresolved", gradient_sys_err=np.nan,
                       converged=False, message=fit["message"], fit=fit)
        return profile, summary
    fit = fit_gradient(profile, method=fit_method, seed=seed)
    resolved = resolution_class(r_max, psf)
    message = fit["message"]
    if resolved != "resolved":
        ratio = r_max / psf_hwhm_size_kpc(psf)
        message = (f"{resolved}: metallicities reach {r_max:.2f} kpc = {ratio:.2f} x the PSF "
                   "HWHM size (resolved needs >= 2)" + (f"; {message}" if message else ""))
    sys_err = np.nan
    if systematics:
        sys_err = gradient_systematics(metallicity, psf=psf, centre_kpc=centre, size=size,
                                       min_pixels=min_pixels)["gradient_sys_err"]
    summary.update(gradient_dex_per_kpc=fit["gradient_dex_per_kpc"],
                   gradient_err=fit["gradient_err"], central_oh=fit["central_oh"],
                   central_oh_err=fit["central_oh_err"], resolved=resolved,
                   gradient_sys_err=sys_err, converged=fit["converged"], message=message,
                   fit=fit)
    return profile, summary


def peak_centre_kpc(line_maps: xr.Dataset | xr.DataArray, *, line: str = "Halpha",
                    smooth_pixels: float = 1.0) -> tuple[float, float]:
    """(x, y) in kpc of the peak of a (lightly Gaussian-smoothed) source-plane map.

    ``line_maps`` is a Dataset of line maps (the ``line`` map is used: the paper's fallback
    centre when the H-band continuum is not detected, K20 §4.2) or one DataArray on
    ``(ys, xs)`` such as a de-lensed continuum map.
    """
    from scipy.ndimage import gaussian_filter

    image = line_maps if isinstance(line_maps, xr.DataArray) else \
        line_maps["flux"].sel(line=line)
    flux = image.transpose("ys", "xs").values
    filled = gaussian_filter(np.nan_to_num(flux), smooth_pixels) if smooth_pixels else \
        np.nan_to_num(flux)
    iy, ix = np.unravel_index(np.argmax(filled), filled.shape)
    # sub-pixel peak: vertex of the parabola through the maximum and its two neighbours
    # along each axis (a pixel of an unlensed z ~ 2 map is 1.7 kpc)
    dy = _parabola_vertex(filled[max(iy - 1, 0):iy + 2, ix]) if 0 < iy < flux.shape[0] - 1 else 0.0
    dx = _parabola_vertex(filled[iy, max(ix - 1, 0):ix + 2]) if 0 < ix < flux.shape[1] - 1 else 0.0
    ys, xs = image["ys"].values, image["xs"].values
    return (float(xs[ix] + dx * (xs[1] - xs[0])), float(ys[iy] + dy * (ys[1] - ys[0])))


def _parabola_vertex(values: np.ndarray) -> float:
    """Offset in [-0.5, 0.5] pixel of the vertex of the parabola through three values."""
    left, centre, right = (float(v) for v in values)
    curvature = left - 2 * centre + right
    if curvature >= 0:
        return 0.0
    return float(np.clip(0.5 * (left - right) / curvature, -0.5, 0.5))


#: Names of the centre choices recorded in the summary (``centre_used``; DESIGN.md).
CENTRE_USED = ("h_continuum_peak", "halpha_peak", "user")


def gradient_centre(source_maps: xr.Dataset, *, rule: str = "continuum",
                    user_centre_kpc: Sequence[float] | None = None,
                    halpha: str = "Halpha") -> tuple[tuple[float, float], str]:
    """The centre of the annuli and which one was used (K20 §4.2).

    K20 §4.2 centres on the H-band continuum peak, or on the Halpha peak where the
    continuum is not detected, each mapped to the source plane. A user-given centre wins.

    Parameters
    ----------
    source_maps : Dataset
        Source-plane maps on ``(ys, xs)`` (kpc); the continuum map, when there is one, is
        the variable ``continuum`` with ``attrs["detected"]`` true when it is detected.
    rule : {"continuum", "halpha"}
        ``[analysis] centre`` when it is not a sky position.
    user_centre_kpc : (x, y), optional
        A centre already mapped to the source plane (kpc): used as it is.

    Returns
    -------
    ((x_kpc, y_kpc), label)
        ``label`` is one of :data:`CENTRE_USED`.
    """
    if user_centre_kpc is not None:
        return (float(user_centre_kpc[0]), float(user_centre_kpc[1])), "user"
    if rule not in ("continuum", "halpha"):
        raise ConfigError(f"centre: must be 'continuum', 'halpha' or a sky position, got {rule!r}")
    continuum = source_maps.get("continuum")
    if rule == "continuum" and continuum is not None and bool(continuum.attrs.get("detected")):
        return peak_centre_kpc(continuum), "h_continuum_peak"
    if "line" in source_maps.dims and halpha in source_maps["line"].values:
        return peak_centre_kpc(source_maps, line=halpha), "halpha_peak"
    raise ConfigError(f"centre: no detected continuum and no {halpha} map to centre the annuli "
                      "on; give [analysis] centre = [ra_deg, dec_deg]")

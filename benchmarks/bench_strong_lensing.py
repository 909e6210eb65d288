"""Injection-recovery on strongly lensed mocks: gradients, magnifications, source PSF, SFR.

Issue 21 "What it must show". Each galaxy of :func:`klever_nb.mock.strong_lensing_specs`
(SIS and SIE + external shear; sources near and on caustics with 2-4 point images, the
counter-image inside the cube: 24-30 spaxels of 0.2", >= 0.8" beyond every image; true mu
~2-35; random source, lens and shear angles; z in the K20 §2 windows; Halpha peak SNR 8-40;
seeing 0.45-0.7") is written as real
files (:func:`klever_nb.io.mockfiles.write_mock`) and run through the real pipeline
(:func:`klever_nb.pipeline.run_galaxy`, default settings: the paper's 0.4" smoothing) twice:

* the noisy mock (every estimator);
* the same galaxy with ``MockSpec(noiseless=True)``: the noiseless cubes as data with the
  noise extension a noisy realisation has (same SNR cuts), forward model off. Its paper-method
  gradient is the beam-smeared value the K20 annuli give without noise: the reference of the
  paper-method gradient (which is also reported against the truth).

Compared (``rec`` recovered, ``err`` its quoted 1 sigma):

* ``paper_vs_noiseless`` / ``paper_vs_truth``: ``gradient_dex_per_kpc`` +- ``gradient_err``;
* ``forward``: ``gradient_forward_dex_per_kpc`` +- ``gradient_forward_err`` against the truth;
* every magnification estimator in ``summary.json`` (``mu_halpha`` the headline, ``mu_halpha_k20``,
  ``mu_maps``, ``mu_maps_k20``, ``mu_halpha_forward``, ... whichever the package writes) against
  ``truth["mu"]`` (fractional: rec / true - 1, error err / true);
* ``sfr`` +- ``sfr_err`` against ``truth["sfr"]`` (fractional); ``global_oh`` against the truth;
* the source-plane PSF axes ``source_psf_fwhm_kpc`` against the Jacobian prediction. For
  image i of the galaxy centre (point images, :func:`klever_nb.mock.lensed_images`) with
  A_i = d beta / d theta, a circular Gaussian image PSF of sigma maps to a source-plane
  Gaussian of covariance C_i = sigma^2 A_i A_i^T (integral: the source flux, for every image).
  The pipeline de-lenses the PSF of all images together (K20 §3.2.3); the de-lensed surface
  brightness is the mean over the rays landing in a source pixel, and image i sends |mu_i|
  times more rays there, so the stack is the mixture sum_i |mu_i| N(0, C_i) / sum |mu_i|.
  The compared prediction (``stack``) is the least-squares Gaussian fit to that mixture
  above 1e-3 of its peak, as the pipeline fits its de-lensed PSF; its moments
  (``stack_moments``, covariance sum |mu_i| C_i / sum |mu_i|, inflated by the wide PSF of
  demagnified counter-images) and the brightest image alone (``brightest``, the single-image
  Jacobian prediction) are reported as well. sigma is the FWHM the pipeline says it used
  (``source_psf_fwhm_arcsec``, else seeing (+) 0.4" smoothing) / 2.3548. Axes are compared
  as rec / pred - 1 (no error is quoted), and the major-axis angle (source frame, from +x
  towards +y) where the predicted axis ratio exceeds 1.3.

The pipeline de-lenses its PSF at its own estimate of the centre (``centre_beta_arcsec`` of
``source_maps.nc``); near a caustic the PSF shape changes fast with position, so the same
prediction is also made there (``..._vs_stack_at_pipeline_centre``) and the centre error is
reported: what remains is the PSF machinery, the rest the centre.

Statistics per estimator: ``bias_median``, ``bias_mean`` (rec - ref; fractional for mu and
SFR), ``scatter`` (std) and ``scatter_robust`` (1.4826 MAD), ``coverage_1sigma`` (fraction with
|rec - ref| < err), ``pull_std`` (std of (rec - ref) / err) and ``pull_std_robust``; for the
whole grid, the multiple-image subset (>= 2 point images and the counter-image |mu| >= 0.5,
i.e. a visible counter-image), quads (>= 4 images) and the rest. Failed galaxies are counted
(``n_failed``), never dropped silently.

Run ``python benchmarks/bench_strong_lensing.py [--n 60] [--quick] [--jobs 2]``: prints one JSON
object and writes ``benchmarks/results/strong_lensing.json`` (``strong_lensing_quick.json`` with
``--quick``) and the figure ``.png`` next to it. The JSON is rewritten after every galaxy
(``"complete": false`` until the end), so an interrupted run keeps what finished;
``--replot JSON`` recomputes the summary and figure of a saved run.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from klever_nb.constants import FWHM_PER_SIGMA  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: Smoothing the pipeline applies by default (K20 §3.1), used when the summary does not say
#: which PSF it de-lensed.
DEFAULT_SMOOTH_ARCSEC = 0.4
#: A counter-image counts (multiple-image subset) when its point magnification reaches this.
COUNTER_IMAGE_MIN_MU = 0.5
#: Targets of issue 21.
TARGETS = {"forward_abs_bias_lt": 0.005, "forward_coverage": [0.63, 0.73],
           "mu_halpha_abs_median_bias_lt": 0.05}
#: Summary keys that are magnification estimators (numbers; their errors are <key>_err):
#: ``mu_halpha*`` and ``mu_maps*`` without the suffixes below.
MU_PREFIXES = ("mu_halpha", "mu_maps")
MU_EXCLUDE_SUFFIXES = ("_err", "_err_mc", "_err_paper", "_spread", "_max_abs", "_average",
                       "_method", "_models", "_definition")


def _float(value) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return out


def _mu_estimators(summary: dict) -> dict[str, dict[str, float]]:
    """Every numeric ``mu_*`` estimator of a summary with its quoted error (NaN if none)."""
    out = {}
    for key, value in summary.items():
        if not key.startswith(MU_PREFIXES) or key.endswith(MU_EXCLUDE_SUFFIXES) \
                or "chi2" in key:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        err = summary.get(f"{key}_err")
        if err is None and key == "mu_halpha_forward":
            err = summary.get("mu_halpha_forward_err")
        out[key] = {"rec": _float(value), "err": _float(err)}
    return out


def _fit_gaussian(covs: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Covariance of the least-squares Gaussian fit to sum_i w_i N(0, C_i) (the K20 ellipse fit).

    The mixture is sampled on a grid around 0 where it exceeds 1e-3 of its peak (the
    pipeline's threshold); centre fixed at 0.
    """
    from scipy import optimize

    half = 4.0 * max(float(np.sqrt(np.linalg.eigvalsh(c)[1])) for c in covs)
    axis = np.linspace(-half, half, 161)
    xx, yy = np.meshgrid(axis, axis)
    pts = np.stack([xx.ravel(), yy.ravel()])
    mix = np.zeros(pts.shape[1])
    for w, c in zip(weights, covs, strict=True):
        inv = np.linalg.inv(c)
        mix += w * np.exp(-0.5 * np.einsum("ik,ij,jk->k", pts, inv, pts)) / (
            2 * np.pi * np.sqrt(np.linalg.det(c)))
    keep = mix > 1e-3 * mix.max()
    pts, mix = pts[:, keep], mix[keep]
    brightest = covs[int(np.argmax(weights))]
    evals, evecs = np.linalg.eigh(brightest)
    start = [np.log(mix.max()), 0.5 * np.log(evals[1]), 0.5 * np.log(evals[0]),
             float(np.arctan2(evecs[1, 1], evecs[0, 1]))]

    def model(par):
        la, l1, l2, th = par
        c, s = np.cos(th), np.sin(th)
        u = pts[0] * c + pts[1] * s
        v = -pts[0] * s + pts[1] * c
        return np.exp(la - 0.5 * (u**2 * np.exp(-2 * l1) + v**2 * np.exp(-2 * l2)))

    res = optimize.least_squares(lambda par: model(par) - mix, start, method="lm")
    _, l1, l2, th = res.x
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    return rot @ np.diag([np.exp(2 * l1), np.exp(2 * l2)]) @ rot.T


def psf_prediction(spec, fwhm_arcsec: float, beta: tuple[float, float] | None = None) -> dict:
    """Jacobian prediction of the de-lensed source PSF at the galaxy centre (module docstring),
    or at the source position ``beta`` (arcsec)."""
    from klever_nb import cosmology, mock

    half = 0.5 * max(spec.shape) * spec.pixel_scale_arcsec + 0.5
    beta = spec.centre_offset_arcsec if beta is None else tuple(beta)
    images = mock.lensed_images(spec.lens, beta, half_size=half)
    kpc = cosmology.kpc_per_arcsec(spec.redshift)
    sigma = fwhm_arcsec / FWHM_PER_SIGMA

    def axes(cov):
        evals, evecs = np.linalg.eigh(cov)
        major = evecs[:, 1]
        theta = float(np.degrees(np.arctan2(major[1], major[0])) % 180.0)
        return ([float(FWHM_PER_SIGMA * np.sqrt(evals[1]) * kpc),
                 float(FWHM_PER_SIGMA * np.sqrt(evals[0]) * kpc)], theta)

    covs = [sigma**2 * np.asarray(im["jacobian"]) @ np.asarray(im["jacobian"]).T
            for im in images]
    weights = np.array([abs(im["mu"]) for im in images])
    moments = sum(w * c for w, c in zip(weights, covs, strict=True)) / weights.sum()
    (b_axes, b_theta), (m_axes, m_theta) = axes(covs[0]), axes(moments)
    (s_axes, s_theta) = axes(_fit_gaussian(covs, weights))
    return {"fwhm_arcsec_used": fwhm_arcsec, "brightest_kpc": b_axes,
            "brightest_theta_deg": b_theta, "stack_kpc": s_axes, "stack_theta_deg": s_theta,
            "stack_moments_kpc": m_axes, "stack_moments_theta_deg": m_theta,
            "images": [{"theta": [im["theta_x"], im["theta_y"]], "mu": im["mu"]}
                       for im in images]}


def _run_pipeline(galaxy, folder: Path, extra_toml: str = "") -> tuple[dict, float]:
    """Write the mock, run the pipeline; the summary gets ``_centre_beta_arcsec`` (the source
    position at which the pipeline de-lensed its PSF, from ``source_maps.nc``)."""
    import xarray as xr

    from klever_nb import pipeline
    from klever_nb.io import mockfiles

    toml = mockfiles.write_mock(galaxy, folder / "input")
    if extra_toml:
        toml.write_text(toml.read_text() + extra_toml)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = pipeline.run_galaxy(toml, folder / "products", progress=False)
    summary = json.loads(Path(path).read_text())
    elapsed = time.perf_counter() - t0
    try:
        with xr.open_dataset(Path(path).parent / "source_maps.nc") as src:
            summary["_centre_beta_arcsec"] = [float(v) for v in src.attrs["centre_beta_arcsec"]]
    except (OSError, KeyError, ValueError, TypeError):
        pass
    return summary, elapsed


def run_one(job: tuple[int, object, bool]) -> dict:
    """One galaxy: noisy and noiseless pipeline runs, truth, predictions; never raises."""
    from klever_nb import mock

    index, spec, with_noiseless = job
    row: dict = {"index": index, "name": spec.name, "lens_type": spec.lens.components[0]["type"],
                 "redshift": spec.redshift, "snr_halpha_peak": spec.snr_halpha_peak,
                 "psf_fwhm_arcsec": spec.psf_fwhm_arcsec, "ok": False}
    t_start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="klever_sl_") as tmp:
            galaxy = mock.make_mock(spec)
            truth = galaxy.truth
            half = 0.5 * max(spec.shape) * spec.pixel_scale_arcsec + 0.5
            images = mock.lensed_images(spec.lens, spec.centre_offset_arcsec, half_size=half)
            mus = sorted((abs(im["mu"]) for im in images), reverse=True)
            row.update(
                mu_true=truth["mu"], gradient_true=truth["gradient_dex_per_kpc"],
                sfr_true=truth["sfr"], global_oh_true=truth["global_oh"],
                central_oh_true=truth["central_oh"], n_images=len(images),
                image_abs_mu=mus,
                multiple=bool(len(mus) >= 2 and mus[1] >= COUNTER_IMAGE_MIN_MU),
                images_inside_cube=int(sum(
                    max(abs(im["theta_x"]), abs(im["theta_y"]))
                    < 0.5 * max(spec.shape) * spec.pixel_scale_arcsec for im in images)),
                scale_length_kpc=spec.scale_length_kpc, inclination_deg=spec.inclination_deg,
                source_pa_deg=spec.pa_deg, lens=[dict(c) for c in spec.lens.components])
            summary, t_noisy = _run_pipeline(galaxy, Path(tmp) / "noisy")
            row["time_noisy_s"] = t_noisy
            row["paper"] = {"rec": _float(summary.get("gradient_dex_per_kpc")),
                            "err": _float(summary.get("gradient_err")),
                            "resolved": summary.get("resolved"),
                            "r_max_kpc": _float(summary.get("r_max_kpc"))}
            row["forward"] = {"rec": _float(summary.get("gradient_forward_dex_per_kpc")),
                              "err": _float(summary.get("gradient_forward_err")),
                              "converged": summary.get("gradient_forward_converged"),
                              "message": summary.get("gradient_forward_message")}
            row["mu"] = _mu_estimators(summary)
            row["mu_halpha_method"] = summary.get("mu_halpha_method")
            row["sfr"] = {"rec": _float(summary.get("sfr")), "err": _float(summary.get("sfr_err"))}
            goh_err = summary.get("global_oh_err")
            goh_err = (float(np.mean(goh_err)) if isinstance(goh_err, list | tuple)
                       else _float(goh_err))
            row["global_oh"] = {"rec": _float(summary.get("global_oh")), "err": goh_err}
            row["source_psf_kpc"] = [_float(v) for v in summary.get("source_psf_fwhm_kpc",
                                                                     [np.nan, np.nan])]
            row["source_psf_theta_deg"] = _float(summary.get("source_psf_theta_deg"))
            fwhm_used = _float(summary.get("source_psf_fwhm_arcsec"))
            if not np.isfinite(fwhm_used):
                fwhm_used = math.hypot(spec.psf_fwhm_arcsec, DEFAULT_SMOOTH_ARCSEC)
            row["psf_prediction"] = psf_prediction(spec, fwhm_used)
            centre = summary.get("_centre_beta_arcsec")
            if centre is not None:
                row["pipeline_centre_beta_arcsec"] = centre
                row["centre_error_arcsec"] = float(np.hypot(
                    centre[0] - spec.centre_offset_arcsec[0],
                    centre[1] - spec.centre_offset_arcsec[1]))
                try:
                    row["psf_prediction_at_pipeline_centre"] = psf_prediction(spec, fwhm_used,
                                                                              centre)
                except (ValueError, IndexError, np.linalg.LinAlgError):
                    pass
            if with_noiseless:
                clean = mock.make_mock(dataclasses.replace(spec, noiseless=True))
                ref, t_clean = _run_pipeline(clean, Path(tmp) / "noiseless",
                                             "\n[analysis]\nforward_gradient = false\n")
                row["time_noiseless_s"] = t_clean
                row["paper_noiseless"] = {"rec": _float(ref.get("gradient_dex_per_kpc")),
                                          "err": _float(ref.get("gradient_err")),
                                          "resolved": ref.get("resolved")}
                row["mu_noiseless"] = _mu_estimators(ref)
        row["ok"] = True
    except Exception as err:  # noqa: BLE001 - a failed galaxy is a result, not a crash
        row["error"] = f"{type(err).__name__}: {err}"
        row["traceback"] = traceback.format_exc(limit=6)
    row["time_total_s"] = time.perf_counter() - t_start
    return row


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


def stats(rec, ref, err, *, relative: bool = False) -> dict:
    """Bias, scatter, coverage and pull of ``rec`` against ``ref`` with quoted ``err``."""
    rec, ref, err = (np.asarray(a, dtype=float) for a in (rec, ref, err))
    n_total = int(rec.size)
    ok = np.isfinite(rec) & np.isfinite(ref)
    if relative:
        ok &= ref > 0
    out: dict = {"n": int(ok.sum()), "n_failed": n_total - int(ok.sum())}
    if not ok.any():
        return out
    scale = ref[ok] if relative else np.ones(ok.sum())
    resid = (rec[ok] - ref[ok]) / scale
    out.update(bias_median=float(np.median(resid)), bias_mean=float(np.mean(resid)),
               bias_mean_se=float(np.std(resid, ddof=1) / np.sqrt(resid.size))
               if resid.size > 1 else None,
               scatter=float(np.std(resid, ddof=1)) if resid.size > 1 else None,
               scatter_robust=float(1.4826 * np.median(np.abs(resid - np.median(resid)))))
    has_err = np.isfinite(err[ok]) & (err[ok] > 0)
    out["n_with_error"] = int(has_err.sum())
    if has_err.any():
        e = err[ok][has_err] / scale[has_err]
        pull = resid[has_err] / e
        out.update(median_quoted_err=float(np.median(e)),
                   coverage_1sigma=float(np.mean(np.abs(pull) < 1.0)),
                   pull_mean=float(np.mean(pull)),
                   pull_std=float(np.std(pull, ddof=1)) if pull.size > 1 else None,
                   pull_std_robust=float(1.4826 * np.median(np.abs(pull - np.median(pull)))))
    return out


def _get(rows, *path, default=np.nan):
    out = []
    for row in rows:
        value = row
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
            if value is None:
                break
        out.append(_float(value) if value is not None else default)
    return np.array(out, dtype=float)


def summarise(rows: list[dict]) -> dict:
    """Per-estimator statistics for the whole grid and its subsets (module docstring)."""
    done = [r for r in rows if r.get("ok")]
    groups = {"all": done,
              "multiple_images": [r for r in done if r.get("multiple")],
              "quads": [r for r in done if r.get("n_images", 0) >= 4],
              "single_or_faint_counter_image": [r for r in done if not r.get("multiple")],
              "mu_lt_5": [r for r in done if r["mu_true"] < 5],
              "mu_5_15": [r for r in done if 5 <= r["mu_true"] < 15],
              "mu_ge_15": [r for r in done if r["mu_true"] >= 15]}
    mu_keys = sorted({k for r in done for k in r.get("mu", {})})
    out: dict = {"n_rows": len(rows), "n_ok": len(done),
                 "n_pipeline_errors": len(rows) - len(done),
                 "errors": sorted({r["error"] for r in rows if not r.get("ok")})}
    for name, sel in groups.items():
        if not sel:
            out[name] = {"n": 0}
            continue
        g = {"n": len(sel), "mu_true_range": [float(min(r["mu_true"] for r in sel)),
                                              float(max(r["mu_true"] for r in sel))]}
        truth = _get(sel, "gradient_true")
        g["paper_vs_noiseless"] = stats(_get(sel, "paper", "rec"),
                                        _get(sel, "paper_noiseless", "rec"),
                                        _get(sel, "paper", "err"))
        g["paper_vs_truth"] = stats(_get(sel, "paper", "rec"), truth, _get(sel, "paper", "err"))
        g["paper_noiseless_vs_truth"] = stats(_get(sel, "paper_noiseless", "rec"), truth,
                                              _get(sel, "paper_noiseless", "err"))
        g["forward"] = stats(_get(sel, "forward", "rec"), truth, _get(sel, "forward", "err"))
        g["paper_resolved_fraction"] = float(np.mean([r.get("paper", {}).get("resolved")
                                                      == "resolved" for r in sel]))
        g["mu"] = {k: stats(_get(sel, "mu", k, "rec"), _get(sel, "mu_true"),
                            _get(sel, "mu", k, "err"), relative=True) for k in mu_keys}
        g["mu_noiseless"] = {k: stats(_get(sel, "mu_noiseless", k, "rec"), _get(sel, "mu_true"),
                                      _get(sel, "mu_noiseless", k, "err"), relative=True)
                             for k in mu_keys}
        g["sfr"] = stats(_get(sel, "sfr", "rec"), _get(sel, "sfr_true"), _get(sel, "sfr", "err"),
                         relative=True)
        g["global_oh"] = stats(_get(sel, "global_oh", "rec"), _get(sel, "global_oh_true"),
                               _get(sel, "global_oh", "err"))
        for which in ("stack", "stack_moments", "brightest"):
            for axis, label in ((0, "major"), (1, "minor")):
                pred = np.array([r["psf_prediction"][f"{which}_kpc"][axis] for r in sel])
                rec = np.array([r["source_psf_kpc"][axis] for r in sel])
                g[f"source_psf_{label}_vs_{which}"] = stats(rec, pred, np.full(pred.size, np.nan),
                                                            relative=True)
        at_centre = [r for r in sel if r.get("psf_prediction_at_pipeline_centre")]
        if at_centre:
            for axis, label in ((0, "major"), (1, "minor")):
                pred = np.array([r["psf_prediction_at_pipeline_centre"]["stack_kpc"][axis]
                                 for r in at_centre])
                rec = np.array([r["source_psf_kpc"][axis] for r in at_centre])
                g[f"source_psf_{label}_vs_stack_at_pipeline_centre"] = stats(
                    rec, pred, np.full(pred.size, np.nan), relative=True)
            g["pipeline_centre_error_arcsec_median"] = float(np.median(
                [r["centre_error_arcsec"] for r in at_centre]))
        pred = [r["psf_prediction"] for r in sel]
        elongated = [(r, p) for r, p in zip(sel, pred, strict=True)
                     if p["stack_kpc"][0] > 1.3 * p["stack_kpc"][1]
                     and np.isfinite(r.get("source_psf_theta_deg", np.nan))]
        if elongated:
            diff = np.array([((r["source_psf_theta_deg"] - p["stack_theta_deg"] + 90) % 180) - 90
                             for r, p in elongated])
            g["source_psf_theta_minus_stack_deg"] = {
                "n": len(diff), "median": float(np.median(diff)),
                "median_abs": float(np.median(np.abs(diff))),
                "fraction_within_15deg": float(np.mean(np.abs(diff) < 15))}
        out[name] = g
    fwd = out["all"].get("forward", {}) if out["all"].get("n") else {}
    fwd_m = out["multiple_images"].get("forward", {}) if out["multiple_images"].get("n") else {}
    mu_h = out["all"].get("mu", {}).get("mu_halpha", {}) if out["all"].get("n") else {}

    def meets(s):
        return bool(s.get("n", 0) and abs(s.get("bias_mean", np.inf)) < 0.005
                    and 0.63 <= s.get("coverage_1sigma", 0.0) <= 0.73)

    out["targets"] = TARGETS
    out["meets"] = {"forward_all": meets(fwd), "forward_multiple_images": meets(fwd_m),
                    "mu_halpha_median_bias": bool(mu_h.get("n", 0) and abs(
                        mu_h.get("bias_median", np.inf)) < 0.05)}
    return out


# ---------------------------------------------------------------------------
# Figure
# ---------------------------------------------------------------------------


def _loglog(ax) -> None:
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        axis.set_major_formatter(FormatStrFormatter("%g"))
        axis.set_minor_formatter(FormatStrFormatter("%g"))


def figure(rows: list[dict], summary: dict, path: Path) -> None:
    """Recovered against reference for every estimator; open symbols: single/faint image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("ok")]
    mu_keys = sorted({k for r in done for k in r.get("mu", {})})
    panels = [("paper_vs_noiseless", "paper gradient vs noiseless analysis [dex/kpc]"),
              ("paper_vs_truth", "paper gradient vs truth [dex/kpc]"),
              ("forward", "forward gradient vs truth [dex/kpc]")]
    panels += [(f"mu:{k}", f"{k} vs true mu") for k in mu_keys]
    panels += [("psf", "source PSF axes vs Jacobian (stack) [kpc]"),
               ("sfr", "SFR vs truth [Msun/yr]"), ("global_oh", "global O/H vs truth")]
    ncol = 4
    nrow = int(math.ceil(len(panels) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.9 * nrow), squeeze=False)
    multi = np.array([bool(r.get("multiple")) for r in done])

    def scatter(ax, x, y, yerr=None, log=False):
        x, y = np.asarray(x, float), np.asarray(y, float)
        for sel, style in ((multi, {"fmt": "o", "color": "tab:blue", "label": "multiple"}),
                           (~multi, {"fmt": "o", "mfc": "none", "color": "tab:orange",
                                     "label": "single / faint"})):
            if sel.any():
                ax.errorbar(x[sel], y[sel], yerr=None if yerr is None else np.asarray(
                    yerr, float)[sel], ms=3.5, lw=0.8, alpha=0.8, **style)
        good = np.isfinite(x) & np.isfinite(y)
        if good.any():
            lo, hi = np.nanmin(np.r_[x[good], y[good]]), np.nanmax(np.r_[x[good], y[good]])
            ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        if log:
            _loglog(ax)

    def annotate(ax, s):
        if not s or not s.get("n"):
            return
        text = (f"n={s['n']} (failed {s['n_failed']})\nbias med {s['bias_median']:+.3g}, "
                f"mean {s['bias_mean']:+.3g}\nscatter {s.get('scatter') or np.nan:.3g}")
        if "coverage_1sigma" in s:
            text += f"\ncov {s['coverage_1sigma']:.2f}, pull sd {s.get('pull_std') or np.nan:.2f}"
        ax.text(0.03, 0.97, text, transform=ax.transAxes, va="top", fontsize=7,
                bbox={"fc": "white", "alpha": 0.7, "lw": 0})

    allg = summary.get("all", {})
    for ax, (key, title) in zip(axes.flat, panels, strict=False):
        ax.set_title(title, fontsize=9)
        if key == "paper_vs_noiseless":
            scatter(ax, _get(done, "paper_noiseless", "rec"), _get(done, "paper", "rec"),
                    _get(done, "paper", "err"))
            annotate(ax, allg.get(key))
        elif key in ("paper_vs_truth", "forward"):
            est = "paper" if key == "paper_vs_truth" else "forward"
            scatter(ax, _get(done, "gradient_true"), _get(done, est, "rec"), _get(done, est, "err"))
            annotate(ax, allg.get(key))
        elif key.startswith("mu:"):
            k = key[3:]
            scatter(ax, _get(done, "mu_true"), _get(done, "mu", k, "rec"),
                    _get(done, "mu", k, "err"), log=True)
            annotate(ax, allg.get("mu", {}).get(k))
        elif key == "psf":
            for axis, marker in ((0, "o"), (1, "s")):
                pred = [r["psf_prediction"]["stack_kpc"][axis] for r in done]
                rec = [r["source_psf_kpc"][axis] for r in done]
                ax.plot(pred, rec, marker, ms=3.5, alpha=0.7,
                        label="major" if axis == 0 else "minor")
            ax.plot([0.1, 20], [0.1, 20], "k-", lw=0.8)
            _loglog(ax)
            ax.legend(fontsize=7, loc="lower right")
            annotate(ax, allg.get("source_psf_major_vs_stack"))
        elif key == "sfr":
            scatter(ax, _get(done, "sfr_true"), _get(done, "sfr", "rec"), _get(done, "sfr", "err"),
                    log=True)
            annotate(ax, allg.get("sfr"))
        elif key == "global_oh":
            scatter(ax, _get(done, "global_oh_true"), _get(done, "global_oh", "rec"),
                    _get(done, "global_oh", "err"))
            annotate(ax, allg.get("global_oh"))
        ax.set_xlabel("reference", fontsize=8)
        ax.set_ylabel("recovered", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"strong-lensing injection-recovery: {len(done)} galaxies "
                 f"({int(multi.sum())} with a visible counter-image)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def _code_version() -> dict:
    """The commit and uncommitted package files the run measured (the package moves fast)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--", "klever_nb")
    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted_package_files": status.splitlines() if status else []}


#: Package modules the pipeline imports lazily; the driver imports them before forking the
#: workers, so every galaxy of a run measures the same code even while the tree is edited.
PRELOAD = ("klever_nb.pipeline", "klever_nb.fitting", "klever_nb.lensing", "klever_nb.gradients",
           "klever_nb.metallicity", "klever_nb.dust", "klever_nb.sfr", "klever_nb.figures",
           "klever_nb.align", "klever_nb.forward_gradient", "klever_nb.gradients.forward",
           "klever_nb.io.mockfiles", "klever_nb.io.products", "klever_nb.io.images")


def _preload(retries: int = 6, wait_s: float = 30.0) -> list[str]:
    """Import :data:`PRELOAD` (retrying while a module fails to import); return those loaded."""
    import importlib

    for attempt in range(retries):
        loaded, failed = [], None
        for name in PRELOAD:
            try:
                importlib.import_module(name)
                loaded.append(name)
            except ModuleNotFoundError as err:
                if err.name != name:  # a module that exists failed to import one it needs
                    failed = f"{name}: {err}"
            except Exception as err:  # noqa: BLE001 - a half-edited module: wait and retry
                failed = f"{name}: {type(err).__name__}: {err}"
        if failed is None:
            return loaded
        print(f"preload failed ({failed}); retry {attempt + 1}/{retries}", file=sys.stderr)
        for name in [m for m in sys.modules if m.startswith("klever_nb")]:
            del sys.modules[name]
        time.sleep(wait_s)
    raise SystemExit(f"cannot import the package: {failed}")


def _write(result: dict, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{stem}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=_float))
    tmp.replace(out / f"{stem}.json")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=60, help="galaxies (default 60)")
    parser.add_argument("--quick", action="store_true",
                        help="4 galaxies (or --n <= 6): a smoke test, not statistics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--no-noiseless", action="store_true",
                        help="skip the noiseless reference runs (no paper_vs_noiseless)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--replot", type=Path, default=None,
                        help="recompute the summary and figure of a saved JSON and exit")
    args = parser.parse_args(argv)
    if args.replot is not None:
        saved = json.loads(args.replot.read_text())
        saved["summary"] = summarise(saved["rows"])
        args.replot.write_text(json.dumps(saved, indent=1, default=_float))
        figure(saved["rows"], saved["summary"], args.replot.with_suffix(".png"))
        return saved

    preloaded = _preload()
    from klever_nb import mock

    n = min(args.n, 6) if args.quick else args.n
    if args.quick and "--n" not in " ".join(argv or sys.argv[1:]):
        n = 4
    stem = "strong_lensing_quick" if args.quick else "strong_lensing"
    t0 = time.perf_counter()
    specs = mock.strong_lensing_specs(n, seed=args.seed)
    t_specs = time.perf_counter() - t0
    jobs = [(i, spec, not args.no_noiseless) for i, spec in enumerate(specs)]
    rows: list[dict] = []
    base = {"benchmark": "strong_lensing", "quick": args.quick, "n_requested": n,
            "seed": args.seed, "jobs": args.jobs, "noiseless_reference": not args.no_noiseless,
            "spec_generation_s": t_specs, "code_version": _code_version(),
            "preloaded_modules": preloaded,
            "grid": [{"name": s.name, "lens": [dict(c) for c in s.lens.components],
                      "redshift": s.redshift, "snr_halpha_peak": s.snr_halpha_peak,
                      "psf_fwhm_arcsec": s.psf_fwhm_arcsec,
                      "gradient_dex_per_kpc": s.gradient_dex_per_kpc,
                      "centre_offset_arcsec": list(s.centre_offset_arcsec)} for s in specs]}

    def record(row: dict) -> None:
        rows.append(row)
        rows.sort(key=lambda r: r["index"])
        fwd = row.get("forward", {})
        print(f"[{len(rows)}/{n}] {row['name']} mu={row.get('mu_true', np.nan):.1f} "
              f"n_img={row.get('n_images')} ok={row['ok']} paper "
              f"{row.get('paper', {}).get('rec', np.nan):+.3f} (noiseless "
              f"{row.get('paper_noiseless', {}).get('rec', np.nan):+.3f}) forward "
              f"{fwd.get('rec', np.nan):+.3f}+-{fwd.get('err', np.nan):.3f} true "
              f"{row.get('gradient_true', np.nan):+.3f} mu_halpha "
              f"{row.get('mu', {}).get('mu_halpha', {}).get('rec', np.nan):.2f} "
              f"t={row['time_total_s']:.0f}s {row.get('error', '')}", file=sys.stderr, flush=True)
        partial = dict(base, complete=False, n_galaxies=len(rows),
                       wall_time_s=time.perf_counter() - t0, rows=rows)
        _write(partial, args.out, stem)

    if args.jobs > 1:
        ctx = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
        with ctx.Pool(args.jobs) as pool:
            for row in pool.imap_unordered(run_one, jobs):
                record(row)
    else:
        for job in jobs:
            record(run_one(job))
    wall = time.perf_counter() - t0
    summary = summarise(rows)
    done = [r for r in rows if r.get("ok")]
    result = dict(
        base, complete=True, n_galaxies=len(rows), wall_time_s=wall,
        time_per_galaxy_s={
            "noisy_pipeline": float(np.mean([r["time_noisy_s"] for r in done])) if done else None,
            "noiseless_pipeline": float(np.mean([r["time_noiseless_s"] for r in done
                                                 if "time_noiseless_s" in r]))
            if any("time_noiseless_s" in r for r in done) else None,
            "total": float(np.mean([r["time_total_s"] for r in rows])) if rows else None},
        note=("quick run: a smoke test; a few galaxies are far too few for bias and coverage "
              "statistics") if args.quick else "",
        summary=summary, rows=rows)
    _write(result, args.out, stem)
    figure(rows, summary, args.out / f"{stem}.png")
    printed = {k: v for k, v in result.items() if k not in ("rows", "grid")}
    print(json.dumps(printed, default=_float))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

"""Injection-recovery of metallicity gradients: the paper's annuli vs the forward model.

A grid of synthetic lensed galaxies (exponential Halpha disc, linear metallicity gradient in
the projected source-plane radius, [NII]/Halpha and [OIII]/Hbeta from the C20 N2 and R3
calibrations) is observed through a constant-Jacobian lens (magnification mu split as
mu_t = mu^0.7 tangential, mu_r = mu^0.3 radial, random orientation), a Gaussian seeing PSF
(0.6") and 0.2" IFU pixels with Gaussian noise of one level for all lines (Halpha peak
pixel SNR as given). Then

* the paper's method (K20 §3.1, §4.2): line maps smoothed by 0.4" (the paper's smoothing),
  de-lensed onto a fine source grid, per-pixel metallicity with the SNR cuts (5 on Halpha
  and [OIII], 2.5 on the other lines) and the K20 eq. (1) grid posterior, PSF-shaped annuli
  in steps of half the source-PSF size, emcee line fit (:func:`klever_nb.gradients.
  measure_gradient`); the source PSF is the smoothed image PSF mapped back;
* the forward model (:func:`klever_nb.gradients.forward.fit_forward_gradient`) on the
  unsmoothed image-plane maps with their independent errors.

Bias is the mean of (recovered - true) (also inverse-variance weighted); coverage the
fraction with |recovered - true| < 1 sigma (statistical); the slope of recovered vs true
gradient measures flattening (1 = none). Run ``python benchmarks/bench_gradients.py [--quick] [--jobs 2]``;
it prints one JSON object and writes ``benchmarks/results/gradients_injection.json`` and
``gradients_injection.png``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402
from scipy.ndimage import convolve  # noqa: E402

from klever_nb import gradients  # noqa: E402
from klever_nb.calibrations import get_calibration  # noqa: E402
from klever_nb.constants import (  # noqa: E402
    BALMER_INTRINSIC,
    METALLICITY_SNR_STRONG,
    METALLICITY_SNR_WEAK,
    SMOOTH_FWHM_ARCSEC,
)
from klever_nb.cosmology import kpc_per_arcsec  # noqa: E402
from klever_nb.gradients import forward as fg  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LINES = ["Halpha", "NII_6584", "Hbeta", "OIII_5007"]
PIXEL_ARCSEC = 0.2
PSF_ARCSEC = 0.6
REDSHIFT = 1.5
SCALE_LENGTH_KPC = 1.5
CENTRAL_OH = 8.45
MAX_IFU_PIXELS = 40
FULL = {"gradients": [-0.10, -0.05, -0.02, 0.0, 0.02, 0.05],
        "magnifications": [1.5, 4.0, 10.0, 30.0], "snr": [15.0, 50.0], "realisations": 2}
QUICK = {"gradients": [-0.05, 0.02], "magnifications": [2.0, 10.0], "snr": [30.0],
         "realisations": 1}


def _source_function(gradient: float, q: float, pa_deg: float, box_kpc: tuple):
    n2, r3 = get_calibration("N2"), get_calibration("R3")
    (x_lo, x_hi), (y_lo, y_hi) = box_kpc

    def func(x, y):
        pa = np.deg2rad(pa_deg)
        u = x * np.cos(pa) + y * np.sin(pa)
        v = -x * np.sin(pa) + y * np.cos(pa)
        inside = (x >= x_lo) & (x <= x_hi) & (y >= y_lo) & (y <= y_hi)
        sigma = np.exp(-np.hypot(u, v / q) / SCALE_LENGTH_KPC) * inside
        oh = CENTRAL_OH + gradient * np.hypot(x, y)
        hbeta = sigma / BALMER_INTRINSIC
        return np.stack([sigma, sigma * 10 ** n2.log_ratio(oh), hbeta,
                         hbeta * 10 ** r3.log_ratio(oh)])

    return func


def _geometry(mu: float, angle: float, scale: float):
    lens = fg.AffineLens(kpc_per_arcsec=scale, mu_tangential=mu**0.7, mu_radial=mu**0.3,
                         tangential_angle_deg=angle)
    # image of the +-4 h source disc plus a PSF margin, capped like a KMOS mosaic
    inv = np.linalg.inv(lens.jacobian()) / scale
    corners = np.array([[sx, sy] for sx in (-4, 4) for sy in (-4, 4)]) * SCALE_LENGTH_KPC
    theta = corners @ inv.T
    half = np.abs(theta).max(axis=0) + 1.5 * PSF_ARCSEC
    nx, ny = (min(int(np.ceil(2 * h / PIXEL_ARCSEC)), MAX_IFU_PIXELS) for h in half)
    # source box: pre-image of the field of view + 3 sigma of the PSF, within +-4 h
    fov = np.array([[sx * nx / 2, sy * ny / 2] for sx in (-1, 1) for sy in (-1, 1)])
    fov = fov * PIXEL_ARCSEC + np.sign(fov) * 1.3 * PSF_ARCSEC
    pre = fov @ (lens.jacobian().T * scale)
    lim = np.minimum(np.abs(pre).max(axis=0), 4 * SCALE_LENGTH_KPC)
    box = ((-lim[0], lim[0]), (-lim[1], lim[1]))
    return lens, (ny, nx), box


def _grid(box, pixel):
    (x_lo, x_hi), (y_lo, y_hi) = box
    nx, ny = int(np.ceil((x_hi - x_lo) / pixel)), int(np.ceil((y_hi - y_lo) / pixel))
    xs = x_lo + pixel * (np.arange(nx + 1)) if nx else np.array([x_lo, x_hi])
    ys = y_lo + pixel * (np.arange(ny + 1)) if ny else np.array([y_lo, y_hi])
    return ys, xs


def _smooth(flux: np.ndarray, err: np.ndarray, fwhm_pix: float):
    sigma = fwhm_pix / 2.3548
    r = int(np.ceil(4 * sigma))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    kernel = np.exp(-0.5 * (xx**2 + yy**2) / sigma**2)
    kernel /= kernel.sum()
    sm = np.array([convolve(f, kernel, mode="constant") for f in flux])
    var = np.array([convolve(e**2, kernel**2, mode="constant") for e in err])
    norm = convolve(np.ones(flux.shape[1:]), kernel, mode="constant")  # edge renormalisation
    return sm / norm, np.sqrt(var) / norm


def paper_method(obs, err, lens, shape, scale, box, seed):
    """Smooth, de-lens, per-pixel metallicity, annuli: the K20 pipeline in miniature."""
    sm_flux, sm_err = _smooth(obs, err, SMOOTH_FWHM_ARCSEC / PIXEL_ARCSEC)
    eff_fwhm = float(np.hypot(PSF_ARCSEC, SMOOTH_FWHM_ARCSEC))
    psf = lens.source_psf(eff_fwhm)
    pixel = max(min(psf["fwhm_minor_kpc"] / 4, SCALE_LENGTH_KPC / 5), 2 * 4 * SCALE_LENGTH_KPC
                / 100)
    ys, xs = _grid(box, pixel)
    kw = {"source_ys_kpc": ys, "source_xs_kpc": xs, "pixel_scale_arcsec": PIXEL_ARCSEC}
    flux = np.array([fg.affine_delens(f, lens, **kw) for f in sm_flux])
    ferr = np.array([fg.affine_delens(e, lens, **kw) for e in sm_err])
    snr = flux / ferr
    thresholds = np.array([METALLICITY_SNR_STRONG, METALLICITY_SNR_WEAK, METALLICITY_SNR_WEAK,
                           METALLICITY_SNR_STRONG])[:, None, None]
    det = snr >= thresholds
    maps = xr.Dataset({"flux": (("line", "ys", "xs"), flux),
                       "flux_err": (("line", "ys", "xs"), ferr)},
                      coords={"line": LINES, "ys": ys, "xs": xs})
    ratios = gradients.log_ratio_maps(maps, ["N2", "R3"])
    usable = {"N2": det[0] & det[1], "R3": det[2] & det[3]}
    ratios = {d: (np.where(usable[d], v, np.nan), np.where(usable[d], e, np.nan))
              for d, (v, e) in ratios.items()}
    med, lo, hi = gradients.oh_from_log_ratios(ratios)
    valid = det[0] & np.isfinite(med)
    metallicity = xr.Dataset({"oh": (("ys", "xs"), np.where(valid, med, np.nan)),
                              "oh_lo": (("ys", "xs"), np.where(valid, lo, np.nan)),
                              "oh_hi": (("ys", "xs"), np.where(valid, hi, np.nan))},
                             coords={"ys": ys, "xs": xs})
    _, summary = gradients.measure_gradient(metallicity, psf=psf, centre_kpc=(0.0, 0.0),
                                            systematics=False, seed=seed)
    return summary, psf


def run_one(config: dict) -> dict:
    """One synthetic galaxy through both methods."""
    rng = np.random.default_rng(config["seed"])
    scale = kpc_per_arcsec(REDSHIFT)
    angle = float(rng.uniform(0, 180))
    q, pa = float(rng.uniform(0.6, 0.95)), float(rng.uniform(0, 180))
    lens, shape, box = _geometry(config["mu"], angle, scale)
    source = _source_function(config["gradient"], q, pa, box)
    clean = fg.affine_render(lens, source, ifu_shape=shape, pixel_scale_arcsec=PIXEL_ARCSEC,
                             psf_fwhm_arcsec=PSF_ARCSEC, oversample=5)
    noise = clean[0].max() / config["snr"]
    obs = clean + rng.normal(0.0, noise, clean.shape)
    err = np.full_like(obs, noise)
    row = dict(config, ifu_shape=list(shape), angle_deg=angle, disc_q=q, disc_pa_deg=pa)
    t0 = time.perf_counter()
    summary, psf = paper_method(obs, err, lens, shape, scale, box, config["seed"])
    row.update(paper_gradient=summary["gradient_dex_per_kpc"],
               paper_err=summary["gradient_err"], paper_resolved=summary["resolved"],
               paper_r_max_kpc=summary["r_max_kpc"], paper_time_s=time.perf_counter() - t0,
               source_psf_kpc=[psf["fwhm_major_kpc"], psf["fwhm_minor_kpc"]])
    t0 = time.perf_counter()
    src_psf = lens.source_psf(PSF_ARCSEC)
    pixel = max(min(SCALE_LENGTH_KPC / 4, src_psf["fwhm_minor_kpc"] / 2),
                np.sqrt(np.ptp(box[0]) * np.ptp(box[1]) / 1600))
    ys, xs = _grid(box, pixel)
    operator = fg.affine_forward(lens, source_ys_kpc=ys, source_xs_kpc=xs, ifu_shape=shape,
                                 pixel_scale_arcsec=PIXEL_ARCSEC, psf_fwhm_arcsec=PSF_ARCSEC)
    maps = xr.Dataset({"flux": (("line", "y", "x"), obs), "flux_err": (("line", "y", "x"), err)},
                      coords={"line": LINES}, attrs={"pixel_scale_arcsec": PIXEL_ARCSEC})
    fit = fg.fit_forward_gradient(maps, lens_forward=operator, source_grid_kpc=(ys, xs),
                                  redshift=REDSHIFT, nwalkers=config["nwalkers"],
                                  nsteps=config["nsteps"], seed=config["seed"])
    row.update(forward_gradient=fit["gradient_dex_per_kpc"], forward_err=fit["gradient_err"],
               forward_central_oh=fit["central_oh"], forward_converged=fit["converged"],
               forward_tau=fit["tau_max"], forward_time_s=time.perf_counter() - t0,
               source_grid=[int(ys.size), int(xs.size)])
    return row


def _stats(true: np.ndarray, est: np.ndarray, err: np.ndarray) -> dict:
    ok = np.isfinite(est) & np.isfinite(err) & (err > 0)
    if not ok.any():
        return {"n": 0}
    resid = est[ok] - true[ok]
    w = 1.0 / err[ok] ** 2
    pull = resid / err[ok]
    slope, slope_se = np.nan, np.nan
    if np.ptp(true[ok]) > 0 and ok.sum() > 2:
        coef, cov = np.polyfit(true[ok], est[ok], 1, cov=True)
        slope, slope_se = float(coef[0]), float(np.sqrt(cov[0, 0]))
    return {"n": int(ok.sum()), "bias": float(np.mean(resid)),
            "slope_recovered_vs_true": slope, "slope_se": slope_se,
            "bias_se": float(np.std(resid, ddof=1) / np.sqrt(ok.sum())) if ok.sum() > 1 else None,
            "weighted_bias": float(np.sum(w * resid) / np.sum(w)),
            "weighted_bias_se": float(1 / np.sqrt(np.sum(w))),
            "median_abs_error": float(np.median(np.abs(resid))),
            "median_sigma": float(np.median(err[ok])),
            "coverage_1sigma": float(np.mean(np.abs(pull) < 1)),
            "pull_mean": float(np.mean(pull)), "pull_std": float(np.std(pull))}


def summarise(rows: list[dict]) -> dict:
    """Bias and coverage of both methods, overall and per magnification and SNR."""
    def arrays(sel, key):
        return np.array([r[key] if r[key] is not None else np.nan for r in sel], float)

    out: dict = {}
    groups = {"all": rows}
    for mu in sorted({r["mu"] for r in rows}):
        groups[f"mu={mu:g}"] = [r for r in rows if r["mu"] == mu]
    for snr in sorted({r["snr"] for r in rows}):
        groups[f"snr={snr:g}"] = [r for r in rows if r["snr"] == snr]
    for name, sel in groups.items():
        true = arrays(sel, "gradient")
        out[name] = {
            "paper": _stats(true, arrays(sel, "paper_gradient"), arrays(sel, "paper_err")),
            "forward": _stats(true, arrays(sel, "forward_gradient"), arrays(sel, "forward_err")),
            "paper_resolved_fraction": float(np.mean([r["paper_resolved"] == "resolved"
                                                      for r in sel])),
            "paper_unmeasured": int(np.sum(~np.isfinite(arrays(sel, "paper_gradient")))),
        }
    return out


def figure(rows: list[dict], summary: dict, path: Path) -> None:
    """Recovered minus true gradient for both methods, and coverage by magnification."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    mus = sorted({r["mu"] for r in rows})
    cmap = plt.get_cmap("viridis", len(mus))
    for ax, key, title in ((axes[0], "paper", "paper's annuli (K20 §4.2)"),
                           (axes[1], "forward", "forward model (image plane)")):
        for k, mu in enumerate(mus):
            sel = [r for r in rows if r["mu"] == mu]
            true = np.array([r["gradient"] for r in sel]) + (k - len(mus) / 2) * 0.002
            est = np.array([r[f"{key}_gradient"] for r in sel], float)
            err = np.array([r[f"{key}_err"] for r in sel], float)
            ax.errorbar(true, est - (true - (k - len(mus) / 2) * 0.002), yerr=err, fmt="o",
                        ms=3, color=cmap(k), label=f"mu = {mu:g}", alpha=0.8)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylim(-0.1, 0.1)
        ax.set_xlabel("true gradient [dex/kpc]")
        ax.set_ylabel("recovered - true [dex/kpc]")
        stats = summary["all"][key]
        ax.set_title(f"{title}\nslope {stats.get('slope_recovered_vs_true', np.nan):.2f}, "
                     f"coverage {stats.get('coverage_1sigma', np.nan):.2f}", fontsize=10)
    axes[0].legend(fontsize=8)
    ax = axes[2]
    x = np.arange(len(mus))
    for off, key, colour in ((-0.2, "paper", "tab:red"), (0.2, "forward", "tab:blue")):
        cov = [summary[f"mu={mu:g}"][key].get("coverage_1sigma", np.nan) for mu in mus]
        bias = [summary[f"mu={mu:g}"][key].get("bias", np.nan) for mu in mus]
        ax.bar(x + off, cov, width=0.4, color=colour, alpha=0.7, label=f"{key}: coverage")
        for xi, b, c in zip(x + off, bias, cov, strict=True):
            ax.text(xi, (c if np.isfinite(c) else 0) + 0.02, f"{b:+.3f}", ha="center",
                    fontsize=7)
    ax.axhspan(0.63, 0.73, color="grey", alpha=0.3, label="68 +- 5 %")
    ax.set_xticks(x, [f"mu={mu:g}" for mu in mus])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("1 sigma coverage (numbers: bias, dex/kpc)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="4 galaxies, about 20 s: a smoke test, not statistics")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--realisations", type=int, default=None)
    parser.add_argument("--nsteps", type=int, default=900)
    parser.add_argument("--nwalkers", type=int, default=24)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--replot", type=Path, default=None,
                        help="redraw the figure of an existing JSON result and exit")
    args = parser.parse_args(argv)
    if args.replot is not None:
        saved = json.loads(args.replot.read_text())
        saved["summary"] = summarise(saved["rows"])
        args.replot.write_text(json.dumps(saved, indent=1, default=float))
        figure(saved["rows"], saved["summary"], args.replot.with_suffix(".png"))
        return saved
    grid = dict(QUICK if args.quick else FULL)
    if args.realisations:
        grid["realisations"] = args.realisations
    configs = [{"gradient": g, "mu": mu, "snr": snr, "realisation": k,
                "seed": 1000 * i + k, "nsteps": args.nsteps, "nwalkers": args.nwalkers}
               for i, (g, mu, snr) in enumerate(itertools.product(
                   grid["gradients"], grid["magnifications"], grid["snr"]))
               for k in range(grid["realisations"])]
    t0 = time.perf_counter()
    def progress(k: int, row: dict) -> dict:
        print(f"[{k + 1}/{len(configs)}] g={row['gradient']:+.2f} mu={row['mu']:g} "
              f"snr={row['snr']:g}: paper {row['paper_gradient']:+.3f}, forward "
              f"{row['forward_gradient']:+.3f} +- {row['forward_err']:.3f}", file=sys.stderr)
        return row

    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            rows = [progress(k, r) for k, r in enumerate(pool.map(run_one, configs))]
    else:
        rows = [progress(k, run_one(c)) for k, c in enumerate(configs)]
    wall = time.perf_counter() - t0
    summary = summarise(rows)
    fwd, pap = summary["all"]["forward"], summary["all"]["paper"]
    result = {
        "benchmark": "gradients_injection", "quick": args.quick, "grid": grid,
        "note": ("quick grid: a runtime smoke test; 4 galaxies are far too few for bias and "
                 "coverage statistics, use the full grid") if args.quick else "",
        "n_galaxies": len(rows), "wall_time_s": wall,
        "time_per_galaxy_s": {"paper": float(np.mean([r["paper_time_s"] for r in rows])),
                              "forward": float(np.mean([r["forward_time_s"] for r in rows]))},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "targets": {"forward_abs_bias_lt": 0.005, "forward_coverage": [0.63, 0.73]},
        "forward_meets_targets": bool(abs(fwd.get("weighted_bias", np.inf)) < 0.005
                                      and 0.63 <= fwd.get("coverage_1sigma", 0) <= 0.73),
        "summary": summary, "paper_overall": pap, "forward_overall": fwd, "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "gradients_injection_quick" if args.quick else "gradients_injection"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1, default=float))
    figure(rows, summary, args.out / f"{name}.png")
    printed = {k: v for k, v in result.items() if k != "rows"}
    print(json.dumps(printed, default=float))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

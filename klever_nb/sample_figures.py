"""The paper's sample figures (K20 Figs 4–11), one function each; re-exported by
:mod:`klever_nb.figures`. ``klever-nb figures`` calls :func:`write_figures`.

Every function takes a sample table (``sample.csv`` of ``klever-nb sample``, derived with
:func:`klever_nb.sample.derive`) and/or the paper's tables, returns a matplotlib ``Figure``
and says in a caption text (``fig.texts``, bottom) which points come from the paper's tables
(K20 Tables 2–4, literature) and which from this run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from klever_nb import sample as S

RUN_STYLE = {"marker": "*", "s": 90, "color": "crimson", "edgecolor": "k", "zorder": 5}
K20_STYLE = {"marker": "o", "s": 45, "color": "navy", "edgecolor": "k", "zorder": 4}
LIT_COLOURS = {"Wuyts+16 (KMOS3D)": "0.6", "Carton+18 (MUSE)": "tan",
               "Queyrel+12": "tab:green", "Swinbank+12": "tab:orange",
               "Leethochawalit+16": "tab:purple", "Wang+17": "tab:cyan", "Wang+19": "tab:pink",
               "KLEVER (Curti+20, digitised)": "cornflowerblue"}


def _figure(width=6.0, height=4.5, caption: str = ""):
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(width, height))
    if caption:
        fig.text(0.01, 0.005, caption, fontsize=6.5, va="bottom", ha="left", wrap=True)
    return fig


def _caption(run: Any, paper: bool, extra: str = "") -> str:
    parts = []
    if run is not None and len(run):
        parts.append(f"red stars: this run ({len(run)} galaxies)")
    if paper:
        parts.append("navy circles: K20 Tables 2-4 (6 printed rows)")
    return "; ".join(parts + ([extra] if extra else []))


def _finished(run):
    if run is None:
        return None
    run = S.derive(run) if "log_ssfr" not in run else run
    if "status" in run:
        run = run[run["status"].isin(["done", "resumed"])]
    return run


def fig4_mu_spread(run=None, *, paper: bool = True):
    """K20 Fig. 4: relative systematic μ uncertainty (spread across lens models) vs μ.

    From the run: ``mu_maps_spread / mu_maps`` of galaxies with ``[lens] models``. The paper
    gives no per-galaxy values in print; its typical 10–25 % range is drawn as a band.
    """
    fig = _figure(caption=_caption(run, False, "grey band: K20's typical 10-25 % systematic "
                                   "range (§3.2; per-galaxy values not printed)"))
    ax = fig.add_axes([0.13, 0.2, 0.82, 0.72])
    ax.axhspan(0.10, 0.25, color="0.85", label="K20 typical range")
    run = _finished(run)
    if run is not None and "mu_maps_spread" in run:
        mu = run["mu_maps"].astype(float)
        rel = run["mu_maps_spread"].astype(float) / mu
        ok = np.isfinite(rel)
        ax.scatter(mu[ok], rel[ok], **RUN_STYLE, label="this run")
        if not ok.any():
            ax.text(0.5, 0.5, "no galaxy of this run has alternative lens models "
                    "([lens] models)", transform=ax.transAxes, ha="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(r"$\mu$ (median over lens models)")
    ax.set_ylabel(r"$\sigma_\mu / \mu$")
    ax.legend(fontsize=8)
    return fig


def fig5_bpt(ratios=None):
    """K20 Fig. 5: N2- and S2-BPT of integrated ratios, with Kewley+01 and Kauffmann+03.

    ``ratios``: table with ``name``, ``redshift``, ``log_n2``, ``log_s2``, ``log_r3`` (from
    :func:`bpt_ratios`). The paper prints no ratios, so every point is from this run.
    """
    from klever_nb import bpt

    fig = _figure(10, 4.5, caption="points: this run (integrated pseudo-fibre fluxes); "
                  "solid: Kewley+01, dashed: Kauffmann+03; K20 prints no line ratios")
    axes = [fig.add_axes([0.07, 0.18, 0.4, 0.74]), fig.add_axes([0.57, 0.18, 0.4, 0.74])]
    x = np.linspace(-2, 0.46, 200)
    axes[0].plot(x, bpt.kewley01_n2(x), "k-")
    xk = np.linspace(-2, 0.04, 200)
    axes[0].plot(xk, bpt.kauffmann03_n2(xk), "k--")
    xs = np.linspace(-2, 0.31, 200)
    axes[1].plot(xs, bpt.kewley01_s2(xs), "k-")
    if ratios is not None and len(ratios):
        colour = np.where(ratios["redshift"] < 1.8, "tab:blue", "tab:red")
        axes[0].scatter(ratios["log_n2"], ratios["log_r3"], c=colour, edgecolor="k")
        axes[1].scatter(ratios["log_s2"], ratios["log_r3"], c=colour, edgecolor="k")
    for ax, label in zip(axes, ("N2", "S2"), strict=True):
        ax.set_xlim(-2, 0.5)
        ax.set_ylim(-1.2, 1.5)
        ax.set_xlabel(f"log {label}")
        ax.set_ylabel(r"log [OIII]$\lambda$5007/H$\beta$")
    return fig


def fig6_sfr_mass_mzr(run=None, *, paper: bool = True):
    """K20 Fig. 6: SFR–M* with the Speagle+14 SFMS at z = 0.07, 1.4, 2.2 (±0.2 dex), and
    the MZR with the local Curti+20a relation."""
    fig = _figure(11, 4.8, caption=_caption(run, paper, "SFMS: Speagle+14 (Kroupa, as K20); "
                                            "MZR: Curti+20a local relation"))
    a1 = fig.add_axes([0.06, 0.2, 0.4, 0.72])
    a2 = fig.add_axes([0.56, 0.2, 0.4, 0.72])
    m = np.linspace(8.0, 11.5, 100)
    for z, c in ((0.07, "0.6"), (1.4, "tab:green"), (2.2, "gold")):
        sf = S.speagle14_sfms(m, z)
        a1.fill_between(m, sf - S.SFMS_SCATTER_DEX, sf + S.SFMS_SCATTER_DEX, color=c, alpha=0.35,
                        label=f"Speagle+14 z={z}")
    a2.plot(m, S.mzr_curti20(m), color="green", label="Curti+20a local MZR")
    for table, style, label in _tables(run, paper):
        a1.errorbar(table["log_mstar"], table["log_sfr"], xerr=table["log_mstar_err"],
                    yerr=table["log_sfr_err"], fmt="none", ecolor="0.3", lw=0.8)
        a1.scatter(table["log_mstar"], table["log_sfr"], **style, label=label)
        if "global_oh" in table:
            a2.scatter(table["log_mstar"], table["global_oh"], **style, label=label)
    a1.set_xlabel(r"log M$_*$ [M$_\odot$]")
    a1.set_ylabel(r"log SFR [M$_\odot$/yr]")
    a2.set_xlabel(r"log M$_*$ [M$_\odot$]")
    a2.set_ylabel("12+log(O/H)")
    a1.legend(fontsize=7)
    a2.legend(fontsize=7)
    return fig


def _tables(run, paper: bool):
    out = []
    if paper:
        out.append((S.derive(S.k20_table()), K20_STYLE, "K20 tables"))
    run = _finished(run)
    if run is not None and len(run):
        out.append((run, RUN_STYLE, "this run"))
    return out


def fig7_galaxy(products: str | Path):
    """K20 Fig. 7 for one galaxy from its products folder: source-plane Hα, the metallicity
    map with the PSF, and the radial profile with the fitted gradient."""
    from klever_nb.io import read_netcdf

    products = Path(products)
    summary = json.loads((products / "summary.json").read_text())
    metal = read_netcdf(products / "metallicity.nc")
    source = read_netcdf(products / "source_maps.nc")
    profile = np.genfromtxt(products / "profile.csv", delimiter=",", names=True)
    fig = _figure(12, 4, caption=f"{summary['name']}: this run's products")
    axes = [fig.add_axes([0.04 + 0.33 * i, 0.18, 0.27, 0.72]) for i in range(3)]
    xs, ys = np.asarray(source["xs"]), np.asarray(source["ys"])
    ha = source["flux"].sel(line="Halpha").transpose("ys", "xs")
    axes[0].pcolormesh(xs, ys, ha / np.nanmax(ha), cmap="magma", shading="nearest")
    axes[0].set_title(r"source-plane H$\alpha$ / peak")
    oh = metal["oh"].transpose("ys", "xs")
    mesh = axes[1].pcolormesh(np.asarray(metal["xs"]), np.asarray(metal["ys"]), oh,
                              cmap="viridis", shading="nearest")
    fig.colorbar(mesh, ax=axes[1], label="12+log(O/H)")
    axes[1].set_title("metallicity map")
    for ax in axes[:2]:
        ax.set_aspect("equal")
        ax.set_xlabel("x [kpc]")
    axes[2].errorbar(np.atleast_1d(profile["radius_kpc"]), np.atleast_1d(profile["oh"]),
                     yerr=np.atleast_1d(profile["oh_err"]), fmt="ko", capsize=2)
    g = summary.get("gradient_dex_per_kpc")
    if g is not None and summary.get("central_oh") is not None:
        r = np.linspace(0, float(np.nanmax(np.atleast_1d(profile["radius_kpc"]))) * 1.1, 20)
        axes[2].plot(r, summary["central_oh"] + g * r, "r-",
                     label=f"{g:+.3f} ± {summary.get('gradient_err') or np.nan:.3f} dex/kpc")
        axes[2].legend(fontsize=8)
    if summary.get("psf_hwhm_size_kpc"):
        axes[2].axvline(summary["psf_hwhm_size_kpc"], color="blue", label="PSF HWHM")
    axes[2].set_xlabel("radius [kpc]")
    axes[2].set_ylabel("12+log(O/H)")
    axes[2].set_title(f"profile ({summary.get('resolved', '')})")
    return fig


def fig8_gradient_vs_redshift(run=None, *, paper: bool = True, literature=None):
    """K20 Fig. 8: gradients vs redshift with the literature compilation; resolved in dark
    blue / marginal in light blue as the paper; this run's galaxies as red stars."""
    lit = S.load_literature() if literature is None else literature
    fig = _figure(8, 5, caption=_caption(run, paper, "other symbols: literature tables shipped "
                                         "with klever_nb (digitised or VizieR; see "
                                         "data/literature)"))
    ax = fig.add_axes([0.1, 0.18, 0.86, 0.75])
    for survey, colour in LIT_COLOURS.items():
        sub = lit[lit["survey"] == survey]
        if len(sub):
            ax.scatter(sub["redshift"], sub["gradient_dex_per_kpc"], s=12, color=colour,
                       alpha=0.7, label=survey)
    ax.axhline(0, color="k", lw=0.6)
    for table, style, label in _tables(run, paper):
        marg = np.asarray(table.get("resolved", "resolved")).astype(str) == "marginal"
        st = dict(style)
        ax.errorbar(table["redshift"], table["gradient_dex_per_kpc"], yerr=table["gradient_err"],
                    fmt="none", ecolor="0.3", lw=0.8)
        ax.scatter(np.asarray(table["redshift"])[~marg],
                   np.asarray(table["gradient_dex_per_kpc"])[~marg], **st, label=label)
        if marg.any():
            st["color"] = "lightblue"
            ax.scatter(np.asarray(table["redshift"])[marg],
                       np.asarray(table["gradient_dex_per_kpc"])[marg], **st,
                       label=f"{label} (marginal)")
    ax.set_xlabel("redshift")
    ax.set_ylabel(r"$\nabla$Z [dex/kpc]")
    ax.set_ylim(-0.25, 0.2)
    ax.legend(fontsize=6, ncol=2)
    return fig


def _regression_panel(ax, cs, key: str, xlabel: str, reg):
    for origin, style in (("literature", {"s": 12, "color": "0.6", "alpha": 0.7}),
                          ("K20 tables", K20_STYLE), ("this run", RUN_STYLE)):
        sub = cs[cs["origin"] == origin]
        if len(sub):
            ax.scatter(sub[key], sub["gradient_dex_per_kpc"], label=origin, **style)
    x = np.linspace(np.nanmin(cs[key]), np.nanmax(cs[key]), 50)
    ax.plot(x, reg.predict(x), "k-", label=f"{reg.estimator}: {reg.slope:+.4f} ± "
            f"{reg.slope_err:.4f}, ρ={reg.spearman_rho:+.2f}")
    ax.fill_between(x, reg.predict(x) - reg.rms, reg.predict(x) + reg.rms, color="0.8",
                    alpha=0.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(r"$\nabla$Z [dex/kpc]")
    ax.legend(fontsize=7)


def correlation_inputs(run=None, *, paper: bool = True):
    """The Fig. 9/10 sample (:func:`klever_nb.sample.correlation_sample`) of this run and/or
    the paper's tables, with the literature at z ≥ 0.8."""
    import pandas as pd

    frames = []
    if paper:
        frames.append(S.correlation_sample(S.k20_table(), include_literature=True))
    run = _finished(run)
    if run is not None and len(run):
        frames.append(S.correlation_sample(run.assign(origin="this run"),
                                           include_literature=not paper))
    return pd.concat(frames, ignore_index=True)


def fig9_gradient_vs_ssfr_mass(run=None, *, paper: bool = True, correlations=None):
    """K20 Fig. 9: gradient vs sSFR and vs M* with the robust regression and its RMS band."""
    cs = correlation_inputs(run, paper=paper)
    res = correlations or S.correlations(cs)
    fig = _figure(7, 9, caption=_caption(run, paper, "grey: Wuyts+16 z>=0.8 (VizieR); line: "
                                         "Huber regression of all points, band: its RMS"))
    a1 = fig.add_axes([0.12, 0.57, 0.83, 0.4])
    a2 = fig.add_axes([0.12, 0.08, 0.83, 0.4])
    _regression_panel(a1, cs, "log_ssfr", r"log sSFR [yr$^{-1}$]", res["log_ssfr"])
    _regression_panel(a2, cs, "log_mstar", r"log M$_*$ [M$_\odot$]", res["log_mstar"])
    return fig


def fig10_gradient_vs_dsfms(run=None, *, paper: bool = True, correlations=None):
    """K20 Fig. 10: ΔSFMS histograms and gradient vs ΔSFMS (Speagle+14 at each z)."""
    cs = correlation_inputs(run, paper=paper)
    res = correlations or S.correlations(cs)
    fig = _figure(7, 8, caption=_caption(run, paper, "grey: Wuyts+16 z>=0.8; ΔSFMS from "
                                         "Speagle+14 at each galaxy's z"))
    h1 = fig.add_axes([0.1, 0.66, 0.38, 0.3])
    h2 = fig.add_axes([0.58, 0.66, 0.38, 0.3])
    ax = fig.add_axes([0.1, 0.08, 0.86, 0.48])
    kl = cs[cs["origin"] != "literature"]["delta_sfms"]
    h1.hist(kl.dropna(), bins=10, color="navy")
    h1.set_title("KLEVER / this run", fontsize=8)
    h2.hist(cs[cs["origin"] == "literature"]["delta_sfms"].dropna(), bins=20, color="0.6")
    h2.set_title("literature z ≥ 0.8", fontsize=8)
    for h in (h1, h2):
        h.set_xlabel("ΔSFMS [dex]")
    _regression_panel(ax, cs, "delta_sfms", "ΔSFMS [dex]", res["delta_sfms"])
    return fig


def fig11_maps_residuals(products: str | Path):
    """K20 Fig. 11: the metallicity map and its residual from the planar (2-D) fit."""
    from klever_nb.io import read_netcdf

    products = Path(products)
    summary = json.loads((products / "summary.json").read_text())
    metal = read_netcdf(products / "metallicity.nc")
    oh = np.asarray(metal["oh"].transpose("ys", "xs"))
    xs, ys = np.asarray(metal["xs"]), np.asarray(metal["ys"])
    cx, cy = (summary.get("centre_kpc") or [0.0, 0.0])[:2]
    model = (summary.get("planar_central_oh") or np.nan) \
        + (summary.get("planar_gradient_x") or 0.0) * (xs[None, :] - cx) \
        + (summary.get("planar_gradient_y") or 0.0) * (ys[:, None] - cy)
    fig = _figure(10, 4, caption=f"{summary['name']}: this run's products; residual = map - "
                  "planar fit (summary planar_*)")
    a1 = fig.add_axes([0.06, 0.18, 0.38, 0.74])
    a2 = fig.add_axes([0.55, 0.18, 0.38, 0.74])
    m1 = a1.pcolormesh(xs, ys, oh, cmap="viridis", shading="nearest")
    fig.colorbar(m1, ax=a1, label="12+log(O/H)")
    res = oh - model
    lim = float(np.nanmax(np.abs(res))) if np.isfinite(res).any() else 0.1
    m2 = a2.pcolormesh(xs, ys, res, cmap="RdBu_r", vmin=-lim, vmax=lim, shading="nearest")
    fig.colorbar(m2, ax=a2, label="residual [dex]")
    for a, t in ((a1, "metallicity"), (a2, "residual from the planar fit")):
        a.set_aspect("equal")
        a.set_title(t)
        a.set_xlabel("x [kpc]")
    return fig


def bpt_ratios(results: str | Path, names) -> Any:
    """Integrated log N2, S2, R3 of each galaxy from ``line_maps.nc`` (pseudo-fibre fluxes)."""
    import pandas as pd

    from klever_nb.io import read_netcdf

    rows = []
    for name in names:
        path = Path(results) / name / "line_maps.nc"
        if not path.is_file():
            continue
        maps = read_netcdf(path)
        flux = maps["integrated_flux"]
        lines = set(np.asarray(flux["line"]).astype(str))

        def f(line, _flux=flux, _lines=lines):
            return float(_flux.sel(line=line)) if line in _lines else np.nan

        with np.errstate(divide="ignore", invalid="ignore"):
            rows.append({"name": name, "redshift": float(maps.attrs.get("redshift", np.nan)),
                         "log_n2": np.log10(f("NII_6584") / f("Halpha")),
                         "log_s2": np.log10((f("SII_6717") + f("SII_6731")) / f("Halpha")),
                         "log_r3": np.log10(f("OIII_5007") / f("Hbeta"))})
    return pd.DataFrame(rows)


def write_figures(out: str | Path, *, results: str | Path | None = None,
                  paper: bool = True) -> list[Path]:
    """Write every figure as PNG and PDF into ``out``; return the paths.

    ``results``: a ``klever-nb sample`` output folder (its ``sample.csv`` and per-galaxy
    products); without it, the figures are drawn from the paper's tables alone.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from klever_nb.errors import InputError
    from klever_nb.sample_run import read_sample_table

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = None
    if results is not None:
        if not (Path(results) / "sample.csv").is_file():
            raise InputError(f"{results}: no sample.csv (give the --out folder of "
                             "klever-nb sample)")
        run = read_sample_table(Path(results) / "sample.csv")
    if run is None and not paper:
        raise InputError("nothing to draw: give --results or allow the paper's tables")
    figures: dict[str, Any] = {}
    figures["fig04_mu_spread"] = lambda: fig4_mu_spread(run, paper=paper)
    figures["fig06_sfr_mass_mzr"] = lambda: fig6_sfr_mass_mzr(run, paper=paper)
    figures["fig08_gradient_vs_z"] = lambda: fig8_gradient_vs_redshift(run, paper=paper)
    cs = correlation_inputs(run, paper=paper)
    corr = S.correlations(cs)
    figures["fig09_gradient_vs_ssfr_mass"] = lambda: fig9_gradient_vs_ssfr_mass(
        run, paper=paper, correlations=corr)
    figures["fig10_gradient_vs_dsfms"] = lambda: fig10_gradient_vs_dsfms(
        run, paper=paper, correlations=corr)
    if run is not None:
        done = _finished(run)
        names = list(done["name"]) if done is not None else []
        figures["fig05_bpt"] = lambda: fig5_bpt(bpt_ratios(results, names))
        for name in names:
            folder = Path(results) / name
            if (folder / "metallicity.nc").is_file() and (folder / "profile.csv").is_file():
                figures[f"fig07_{name}"] = lambda f=folder: fig7_galaxy(f)
                figures[f"fig11_{name}"] = lambda f=folder: fig11_maps_residuals(f)
    written = []
    for stem, make in figures.items():
        fig = make()
        for ext in ("png", "pdf"):
            path = out / f"{stem}.{ext}"
            fig.savefig(path, dpi=150)
            written.append(path)
        plt.close(fig)
    (out / "correlations.json").write_text(json.dumps(
        {k: v.as_dict() for k, v in corr.items()}, indent=2) + "\n")
    written.append(out / "correlations.json")
    return written

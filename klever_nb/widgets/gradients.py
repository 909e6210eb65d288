"""Gradient explorer: metallicity map with centre and annuli, live profile and fit, residuals.

A thin :class:`traitlets.HasTraits` over :mod:`klever_nb.gradients`: the annuli are
:func:`~klever_nb.gradients.elliptical_annuli`, the profile and fit
:func:`~klever_nb.gradients.measure_gradient`, the residual map
:func:`~klever_nb.gradients.residual_map` and the arrow :func:`~klever_nb.gradients.planar_fit`.
The forward-modelled gradient (beyond K20) is whatever
:mod:`klever_nb.gradients.forward` returned; pass it in (or a function computing it), the
explorer only draws it. Code twins::

    ex = GradientExplorer(metallicity_map, psf=psf)
    ex.centre_kpc = (0.5, -0.3)   # dragging the centre cross
    ex.step_fraction = 0.3        # the step slider
    ex.shape = "circular"         # the annulus-shape toggle (App. A)
    ex.method = "forward"         # paper's annuli <-> forward model toggle
    ex.summary                    # the numbers shown

References
----------
K20 §4.2 (annuli, fit, resolution), §4.5 (2-D maps), Appendix A (systematics).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import traitlets
import xarray as xr

from klever_nb.errors import ConfigError
from klever_nb.widgets._common import (
    MASKED_COLOUR,
    ExplorerBase,
    ImageMap,
    ellipse_outline,
    finite_range,
    fmt,
)

METHODS = ("paper", "forward")


class GradientExplorer(ExplorerBase):
    """Radial metallicity gradient of one galaxy, the paper's way, with live controls.

    Parameters
    ----------
    metallicity : xarray.Dataset
        Source-plane metallicity map (``oh``, ``oh_lo``, ``oh_hi`` on ``(ys, xs)`` in kpc).
    psf : dict
        Source-plane PSF ``{"fwhm_major_kpc", "fwhm_minor_kpc", "theta_deg"}``.
    centre_kpc : (x, y)
        Initial centre (default the origin, the galaxy centre of the lensing stage).
    forward : dict or callable, optional
        Result of :func:`klever_nb.gradients.forward.fit_forward_gradient` (or a function
        returning it, called once when the forward model is first shown).
    global_oh : float, optional
        The galaxy's integrated metallicity, drawn as a band on the profile.
    fit_method : {"wls", "emcee"}
        Fit of the profile (``wls`` is instantaneous; ``emcee`` is the paper's, ~1 s).
    gradient_kwargs : dict, optional
        Extra keywords of :func:`klever_nb.gradients.measure_gradient`.

    Examples
    --------
    >>> from klever_nb import gradients                           # doctest: +SKIP
    >>> ex = GradientExplorer(oh_map, psf=psf)   # a source-plane map  # doctest: +SKIP
    >>> ex.step_fraction = 0.3; ex.summary["gradient_dex_per_kpc"]  # doctest: +SKIP
    """

    _main_map = "map"

    centre_kpc = traitlets.Tuple(traitlets.Float(), traitlets.Float(), default_value=(0.0, 0.0))
    step_fraction = traitlets.Float(0.5, min=0.05)
    shape = traitlets.Enum(("psf", "circular"), default_value="psf")
    method = traitlets.Enum(METHODS, default_value="paper")
    fit_method = traitlets.Enum(("wls", "emcee"), default_value="wls")

    def __init__(self, metallicity: xr.Dataset, *, psf: Mapping[str, float],
                 centre_kpc: tuple[float, float] = (0.0, 0.0),
                 forward: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
                 global_oh: float | None = None, fit_method: str = "wls",
                 step_fraction: float = 0.5, shape: str = "psf",
                 gradient_kwargs: dict | None = None):
        super().__init__()
        for dim in ("ys", "xs"):
            if dim not in metallicity.dims:
                raise ConfigError("GradientExplorer: the metallicity map must be on (ys, xs) in "
                                  "kpc (a source-plane map)")
        self.metallicity = metallicity
        self.psf = dict(psf)
        self.global_oh = global_oh
        self._forward = forward
        self._kwargs = {"systematics": False, **(gradient_kwargs or {})}
        self._cache: dict[tuple, tuple[xr.Dataset, dict]] = {}
        self._ui: dict[str, Any] | None = None
        with self.hold_trait_notifications():
            self.centre_kpc = tuple(float(v) for v in centre_kpc)
            self.step_fraction = float(step_fraction)
            self.shape = shape
            self.fit_method = fit_method

    # ------------------------------------------------------------------ package calls
    def _measure(self) -> tuple[xr.Dataset, dict]:
        from klever_nb import gradients

        key = (self.centre_kpc, round(self.step_fraction, 6), self.shape, self.fit_method)
        if key not in self._cache:
            self._cache[key] = gradients.measure_gradient(
                self.metallicity, psf=self.psf, centre_kpc=self.centre_kpc,
                step_fraction=self.step_fraction, shape=self.shape, fit_method=self.fit_method,
                **self._kwargs)
        return self._cache[key]

    @property
    def profile(self) -> xr.Dataset:
        """The radial profile (:func:`klever_nb.gradients.measure_gradient`)."""
        return self._measure()[0]

    @property
    def summary(self) -> dict[str, Any]:
        """The paper's gradient fields, plus ``forward_*`` when the forward model is shown."""
        out = {k: v for k, v in self._measure()[1].items() if k != "fit"}
        if self.method == "forward" and self.forward is not None:
            fw = self.forward
            out.update(forward_gradient_dex_per_kpc=fw.get("gradient_dex_per_kpc"),
                       forward_gradient_err=fw.get("gradient_err"),
                       forward_central_oh=fw.get("central_oh"))
        return out

    @property
    def forward(self) -> Mapping[str, Any] | None:
        """The forward-model result (computed on first use when a function was given)."""
        if callable(self._forward):
            self._forward = self._forward()
        return self._forward

    def annuli(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Outlines (x, y in kpc) of the ellipses bounding the annuli of the profile.

        The apertures are :func:`klever_nb.gradients.elliptical_annuli` with the settings the
        profile records (centre, step, shape, ``size``), out to its last annulus.
        """
        from klever_nb import gradients

        profile = self.profile
        a = profile.attrs
        r_max = float(profile["r_out_kpc"].values.max()) if profile.sizes.get(
            "annulus", 0) else None
        apertures, _, _ = gradients.elliptical_annuli(
            self.metallicity, centre_kpc=(a["centre_x_kpc"], a["centre_y_kpc"]), psf=self.psf,
            step_fraction=a["step_fraction"], shape=a["shape"], r_max=r_max,
            size=a.get("size", "geometric"))
        xs, ys = self.metallicity["xs"].values, self.metallicity["ys"].values
        dx, dy = xs[1] - xs[0], ys[1] - ys[0]
        out = []
        for ap in apertures:
            px, py = np.atleast_2d(ap.positions)[0]
            a = getattr(ap, "a_out", getattr(ap, "a", None))
            b = getattr(ap, "b_out", getattr(ap, "b", None))
            theta = ap.theta.to_value("rad") if hasattr(ap.theta, "to_value") else ap.theta
            ex, ey = ellipse_outline(px, py, a, b, float(theta))
            out.append((xs[0] + ex * dx, ys[0] + ey * dy))
        return out

    def residuals(self) -> xr.DataArray:
        """Metallicity minus the fitted radial model (:func:`klever_nb.gradients.residual_map`)."""
        from klever_nb import gradients

        return gradients.residual_map(self.metallicity, self._measure()[1]["fit"])

    def planar(self) -> dict[str, Any]:
        """:func:`klever_nb.gradients.planar_fit` about the current centre."""
        from klever_nb import gradients

        return gradients.planar_fit(self.metallicity, centre_kpc=self.centre_kpc, psf=self.psf)

    # ------------------------------------------------------------------ widget
    def _build_ui(self) -> None:
        import bqplot as bq
        import ipywidgets as w

        xs, ys = self.metallicity["xs"].values, self.metallicity["ys"].values
        oh_map = ImageMap((ys.size, xs.size), title="12+log(O/H) and annuli", width="420px",
                          height="400px", x_label="x [kpc]", y_label="y [kpc]",
                          css_class="klever-gradient-map", x_coords=xs, y_coords=ys)
        oh_map.marker.visible = False
        annuli = bq.Lines(x=[np.nan], y=[np.nan], scales=oh_map.scales, colors=["black"],
                          stroke_width=1)
        centre = bq.Scatter(x=[0.0], y=[0.0], scales=oh_map.scales, marker="cross",
                            colors=["black"], default_size=150, enable_move=True,
                            update_on_move=False)
        centre.observe(self._on_drag, names=["x", "y"])
        oh_map.add_marks(annuli, centre)
        res_map = ImageMap((ys.size, xs.size), title="residual map and planar gradient",
                           width="420px", height="400px", x_label="x [kpc]", y_label="y [kpc]",
                           css_class="klever-residual-map", x_coords=xs, y_coords=ys)
        res_map.marker.visible = False
        arrow = bq.Lines(x=[np.nan], y=[np.nan], scales=res_map.scales, colors=["black"],
                         stroke_width=2.5)
        res_map.add_marks(arrow)
        sx, sy = bq.LinearScale(min=0.0), bq.LinearScale()
        sc = {"x": sx, "y": sy}
        points = bq.Scatter(x=[0.0], y=[0.0], scales=sc, colors=["black"], default_size=40,
                            labels=["annuli"], display_legend=True)
        errors = bq.Lines(x=[[0, 0]], y=[[0, 0]], scales=sc, colors=["black"], stroke_width=1)
        paper = bq.Lines(x=[0, 1], y=[0, 0], scales=sc, colors=["#1f77b4"], stroke_width=2,
                         labels=["paper's fit"], display_legend=True)
        forward = bq.Lines(x=[np.nan], y=[np.nan], scales=sc, colors=["#d62728"], stroke_width=2,
                           line_style="dashed", labels=["forward model"], display_legend=True)
        global_band = bq.Lines(x=[np.nan], y=[np.nan], scales=sc, colors=["#999999"],
                               line_style="dotted", labels=["global"], display_legend=True)
        hwhm = bq.Lines(x=[np.nan], y=[np.nan], scales=sc, colors=["#2ca02c"],
                        line_style="dash_dotted", labels=["PSF HWHM"], display_legend=True)
        prof_fig = bq.Figure(marks=[global_band, hwhm, errors, points, paper, forward],
                             axes=[bq.Axis(scale=sx, label="radius [kpc]"),
                                   bq.Axis(scale=sy, side="left", label="12+log(O/H)")],
                             title="radial profile", legend_location="top-right",
                             fig_margin={"top": 40, "bottom": 45, "left": 60, "right": 15},
                             layout={"width": "440px", "height": "400px"})
        prof_fig.add_class("klever-profile")
        step = w.FloatSlider(min=0.2, max=1.0, step=0.05, description="step / PSF size",
                             continuous_update=False, readout_format=".2f",
                             style={"description_width": "initial"})
        shape = w.ToggleButtons(options=[("PSF-shaped", "psf"), ("circular", "circular")],
                                description="annuli", style={"button_width": "90px"})
        method = w.ToggleButtons(options=[("paper (annuli)", "paper"),
                                          ("forward model", "forward")],
                                 description="gradient", style={"button_width": "110px"},
                                 disabled=self._forward is None)
        fit = w.ToggleButtons(options=[("WLS", "wls"), ("emcee", "emcee")], description="fit",
                              style={"button_width": "70px"})
        for control, trait in ((step, "step_fraction"), (shape, "shape"), (method, "method"),
                               (fit, "fit_method")):
            traitlets.link((self, trait), (control, "value"))
        info = w.HTML()
        info.add_class("klever-gradient-summary")
        box = w.VBox([w.HBox([step, shape]), w.HBox([method, fit]),
                      w.HBox([oh_map.figure, prof_fig]), w.HBox([res_map.figure, info])])
        box.add_class("klever-gradients")
        self._ui = {"box": box, "map": oh_map, "residual": res_map, "annuli": annuli,
                    "centre": centre, "arrow": arrow, "points": points, "errors": errors,
                    "paper": paper, "forward": forward, "global": global_band, "hwhm": hwhm,
                    "profile_fig": prof_fig, "scales": (sx, sy), "info": info,
                    "controls": {"step": step, "shape": shape, "method": method, "fit": fit}}
        oh = self.metallicity["oh"].values
        oh_map.set_image(oh, vrange=finite_range(oh), cmap="RdYlBu_r")
        self._redraw()

    @property
    def marks(self) -> dict[str, Any]:
        self.widget  # noqa: B018
        keys = ("annuli", "centre", "arrow", "points", "errors", "paper", "forward", "global",
                "hwhm")
        return {k: self._ui[k] for k in keys}

    @property
    def panels(self) -> dict[str, ImageMap]:
        self.widget  # noqa: B018
        return {"map": self._ui["map"], "residual": self._ui["residual"]}

    def _on_drag(self, change) -> None:
        c = self._ui["centre"]
        if len(c.x) and len(c.y):
            new = (float(c.x[0]), float(c.y[0]))
            if new != self.centre_kpc:
                self.centre_kpc = new

    def _arrow(self, planar: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        xs = self.metallicity["xs"].values
        length = 0.3 * (xs[-1] - xs[0]) / 2
        ang = np.radians(planar.get("direction_deg", np.nan))
        if not np.isfinite(ang):
            return np.array([np.nan]), np.array([np.nan])
        x0, y0 = self.centre_kpc
        x1, y1 = x0 + length * np.cos(ang), y0 + length * np.sin(ang)
        head = 0.25 * length
        hx = [x1 - head * np.cos(ang - s) for s in (0.4, -0.4)]
        hy = [y1 - head * np.sin(ang - s) for s in (0.4, -0.4)]
        return (np.array([x0, x1, np.nan, hx[0], x1, hx[1]]),
                np.array([y0, y1, np.nan, hy[0], y1, hy[1]]))

    def _redraw(self) -> None:
        if self._ui is None:
            return
        ui = self._ui
        profile, info = self._measure()
        ax, ay = [], []
        for ex, ey in self.annuli():
            ax += [ex, [np.nan]]
            ay += [ey, [np.nan]]
        with ui["annuli"].hold_sync():
            ui["annuli"].x = np.concatenate(ax) if ax else [np.nan]
            ui["annuli"].y = np.concatenate(ay) if ay else [np.nan]
        with ui["centre"].hold_sync():
            ui["centre"].x, ui["centre"].y = [self.centre_kpc[0]], [self.centre_kpc[1]]
        r = profile["radius_kpc"].values
        oh, err = profile["oh"].values, profile["oh_err"].values
        r_top = float(np.nanmax(profile["r_out_kpc"].values)) if r.size else 1.0
        lo = np.nanmin(oh - err) if r.size else 8.0
        hi = np.nanmax(oh + err) if r.size else 8.6
        fit = info["fit"]
        rr = np.array([0.0, r_top])
        with ui["profile_fig"].hold_sync():
            sx, sy = ui["scales"]
            sx.min, sx.max = 0.0, r_top
            sy.min, sy.max = float(lo - 0.05), float(hi + 0.05)
            ui["points"].x, ui["points"].y = (r, oh) if r.size else ([np.nan], [np.nan])
            ui["errors"].x = np.array([[v, v] for v in r]) if r.size else [[np.nan, np.nan]]
            ui["errors"].y = (np.array([[o - e, o + e] for o, e in zip(oh, err, strict=True)])
                              if r.size else [[np.nan, np.nan]])
            central, grad = fit.get("central_oh", np.nan), fit.get("gradient_dex_per_kpc", np.nan)
            ui["paper"].x, ui["paper"].y = rr, central + grad * rr
            fw = self.forward if self.method == "forward" else None
            if fw is not None:
                ui["forward"].x = rr
                ui["forward"].y = fw["central_oh"] + fw["gradient_dex_per_kpc"] * rr
            else:
                ui["forward"].x, ui["forward"].y = [np.nan], [np.nan]
            if self.global_oh is not None and np.isfinite(self.global_oh):
                ui["global"].x, ui["global"].y = rr, [self.global_oh] * 2
            hw = info.get("psf_hwhm_size_kpc", np.nan)
            ui["hwhm"].x, ui["hwhm"].y = [hw, hw], [float(lo - 0.05), float(hi + 0.05)]
        res = self.residuals().values
        span = finite_range(res, symmetric=True)
        ui["residual"].set_image(res, vrange=span, cmap="RdBu_r")
        planar = self.planar()
        x_a, y_a = self._arrow(planar)
        with ui["arrow"].hold_sync():
            ui["arrow"].x, ui["arrow"].y = x_a, y_a
        ui["info"].value = self._summary_html(info, planar)

    def _summary_html(self, info: dict[str, Any], planar: dict[str, Any]) -> str:
        rows = [
            ("paper's gradient (annuli)", f"{fmt(info.get('gradient_dex_per_kpc'), '.4f')} ± "
             f"{fmt(info.get('gradient_err'), '.4f')} dex/kpc ({self.fit_method})"),
            ("central 12+log(O/H)", f"{fmt(info.get('central_oh'), '.3f')} ± "
             f"{fmt(info.get('central_oh_err'), '.3f')}"),
            ("resolved", f"{info.get('resolved')} (r_max = {fmt(info.get('r_max_kpc'), '.2f')} "
             "kpc)"),
            ("planar gradient (2-D)", f"{fmt(planar.get('gradient_dex_per_kpc'), '.4f')} ± "
             f"{fmt(planar.get('gradient_err'), '.4f')} dex/kpc towards "
             f"{fmt(planar.get('direction_deg'), '.0f')}°"),
        ]
        if self.method == "forward" and self.forward is not None:
            fw = self.forward
            rows.insert(1, ("forward-model gradient", f"{fmt(fw.get('gradient_dex_per_kpc'), '.4f')}"
                            f" ± {fmt(fw.get('gradient_err'), '.4f')} dex/kpc"))
        html = "".join(f"<tr><td style='padding:2px 10px'>{k}</td><td><b>{v}</b></td></tr>"
                       for k, v in rows)
        msg = info.get("message") or ""
        return f"<table style='font-size:12px'>{html}</table><small>{msg}</small>"

    @traitlets.observe("centre_kpc", "step_fraction", "shape", "method", "fit_method")
    def _on_change(self, change) -> None:
        self._redraw()

    # ------------------------------------------------------------------ static twin
    def static_figure(self):
        """Matplotlib twin: map with annuli and centre, profile with fit(s), residual map."""
        import matplotlib.pyplot as plt

        profile, info = self._measure()
        fig, (ax_m, ax_p, ax_r) = plt.subplots(1, 3, figsize=(15, 4.6))
        xs, ys = self.metallicity["xs"].values, self.metallicity["ys"].values
        dx, dy = xs[1] - xs[0], ys[1] - ys[0]
        extent = [xs[0] - dx / 2, xs[-1] + dx / 2, ys[0] - dy / 2, ys[-1] + dy / 2]
        oh = self.metallicity["oh"].values
        lo, hi = finite_range(oh)
        im = ax_m.imshow(oh, origin="lower", extent=extent, vmin=lo, vmax=hi,
                         cmap=plt.get_cmap("RdYlBu_r").with_extremes(bad=MASKED_COLOUR))
        for ex, ey in self.annuli():
            ax_m.plot(ex, ey, color="k", lw=0.8)
        ax_m.plot(*self.centre_kpc, "k+", ms=12, mew=2)
        ax_m.set_xlim(extent[:2])
        ax_m.set_ylim(extent[2:])
        fig.colorbar(im, ax=ax_m, label="12+log(O/H)")
        ax_m.set_xlabel("x [kpc]")
        ax_m.set_ylabel("y [kpc]")
        r = profile["radius_kpc"].values
        ax_p.errorbar(r, profile["oh"].values, profile["oh_err"].values, fmt="ko", ms=4)
        r_top = float(np.nanmax(profile["r_out_kpc"].values)) if r.size else 1.0
        rr = np.array([0.0, r_top])
        fit = info["fit"]
        ax_p.plot(rr, fit.get("central_oh", np.nan) + fit.get("gradient_dex_per_kpc", np.nan) * rr,
                  color="#1f77b4", label=f"paper: {fmt(info.get('gradient_dex_per_kpc'), '.3f')}"
                  f" ± {fmt(info.get('gradient_err'), '.3f')} dex/kpc")
        if self.method == "forward" and self.forward is not None:
            fw = self.forward
            ax_p.plot(rr, fw["central_oh"] + fw["gradient_dex_per_kpc"] * rr, "--",
                      color="#d62728", label=f"forward: {fmt(fw['gradient_dex_per_kpc'], '.3f')}"
                      f" ± {fmt(fw.get('gradient_err'), '.3f')} dex/kpc")
        if self.global_oh is not None and np.isfinite(self.global_oh):
            ax_p.axhline(self.global_oh, color="0.6", ls=":", label="global")
        ax_p.axvline(info.get("psf_hwhm_size_kpc", np.nan), color="#2ca02c", ls="-.",
                     label="PSF HWHM")
        ax_p.set_xlabel("radius [kpc]")
        ax_p.set_ylabel("12+log(O/H)")
        ax_p.legend(fontsize=8)
        ax_p.set_title(f"{info.get('resolved')}", fontsize=10)
        res = self.residuals().values
        lo, hi = finite_range(res, symmetric=True)
        im = ax_r.imshow(res, origin="lower", extent=extent, vmin=lo, vmax=hi,
                         cmap=plt.get_cmap("RdBu_r").with_extremes(bad=MASKED_COLOUR))
        x_a, y_a = self._arrow(self.planar())
        ax_r.plot(x_a, y_a, color="k", lw=2)
        fig.colorbar(im, ax=ax_r, label="residual [dex]")
        ax_r.set_xlabel("x [kpc]")
        ax_r.set_title("residuals and planar gradient", fontsize=10)
        fig.tight_layout()
        return fig

"""Metallicity explorer: map, calibration curves with a pixel's ratios, its posterior, BPT.

A thin :class:`traitlets.HasTraits` over the package: the map is
:func:`klever_nb.metallicity.metallicity_map`, the pixel's posterior is
:func:`~klever_nb.metallicity.posterior_grid` (exact, on the package's grid) with
:func:`~klever_nb.metallicity.posterior_emcee` samples overlaid, the curves are
``klever_nb.calibrations.get_calibration(d).log_ratio`` and the BPT diagram is
:func:`klever_nb.bpt.bpt_classify` with the Kewley+01 / Kauffmann+03 lines. Code twins::

    ex = MetallicityExplorer(line_maps, redshift=2.2)
    ex.diagnostics = ["R3", "N2"]      # the check boxes (the map is recomputed)
    ex.dust_correction = False         # the dust toggle
    ex.select(12, 12)                  # a click on the map
    ex.pixel_posterior()               # what the posterior panel shows

References
----------
K20 §3.3–3.4, eq. (1); FACTS.md §1–2.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import traitlets
import xarray as xr

from klever_nb.errors import ConfigError
from klever_nb.widgets._common import (
    MASKED_COLOUR,
    ExplorerBase,
    ImageMap,
    finite_range,
    fmt,
    html_table,
    set_points,
)

#: Colours of the diagnostics' curves (matplotlib tab10).
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22")
#: emcee settings of the single-pixel run shown in the posterior panel.
EMCEE_KWARGS = {"nwalkers": 32, "nsteps": 1500, "seed": 0}


def _spatial(ds: xr.Dataset | xr.DataArray) -> tuple[str, str]:
    dims = [d for d in ds.dims if d not in ("line", "diagnostic")]
    if len(dims) != 2:
        raise ConfigError(f"MetallicityExplorer: maps need two spatial dims, got {dims}")
    return dims[0], dims[1]


def _available_diagnostics(maps: xr.Dataset) -> list[str]:
    from klever_nb import ratios

    present = {str(v) for v in maps["line"].values}
    out = []
    for name in ratios.DIAGNOSTICS:
        d = ratios.get_diagnostic(name)
        if set(d.required_lines) <= present:
            out.append(name)
    return out


class MetallicityExplorer(ExplorerBase):
    """Metallicity map with the clicked pixel's calibration ratios, posterior and BPT position.

    Parameters
    ----------
    line_maps : xarray.Dataset
        Line maps on ``(line, y, x)`` (image plane) or ``(line, ys, xs)`` (source plane).
    redshift : float, optional
        Used by the package to choose the default diagnostics.
    diagnostics : sequence of str, optional
        Initial diagnostics (default :func:`klever_nb.metallicity.choose_diagnostics`).
    dust_correction : bool
        True: the package default (dust-sensitive diagnostics corrected, K20 §3.4);
        False: no dust correction.
    show_emcee : bool
        Overlay emcee samples of the selected pixel (a short run, ~1 s).
    metallicity_kwargs : dict, optional
        Extra keywords of :func:`klever_nb.metallicity.metallicity_map`.

    Examples
    --------
    >>> from klever_nb import fitting, mock
    >>> galaxy = mock.make_mock(mock.demo_specs()[1])             # doctest: +SKIP
    >>> maps, _ = fitting.fit_galaxy(galaxy.cubes, redshift=2.2)  # doctest: +SKIP
    >>> ex = MetallicityExplorer(maps, redshift=2.2)              # doctest: +SKIP
    >>> ex.select(12, 12); ex.pixel_posterior()["oh"]             # doctest: +SKIP
    """

    diagnostics = traitlets.List(traitlets.Unicode())
    dust_correction = traitlets.Bool(True)
    show_emcee = traitlets.Bool(True)
    selected_pixel = traitlets.Tuple(traitlets.Int(), traitlets.Int(), default_value=(0, 0))
    last_map_seconds = traitlets.Float(0.0)

    def __init__(self, line_maps: xr.Dataset, *, redshift: float | None = None,
                 diagnostics=None, dust_correction: bool = True, show_emcee: bool = True,
                 selected_pixel: tuple[int, int] | None = None,
                 metallicity_kwargs: dict | None = None):
        from klever_nb import metallicity

        super().__init__()
        self.line_maps = line_maps
        self.redshift = redshift
        self.dims = _spatial(line_maps["flux"])
        self.available = _available_diagnostics(line_maps)
        if not self.available:
            raise ConfigError("MetallicityExplorer: the line maps hold no complete diagnostic")
        self._kwargs = dict(metallicity_kwargs or {})
        self._maps_cache: dict[tuple, xr.Dataset] = {}
        self._pixel_cache: dict[tuple, dict] = {}
        self._ui: dict[str, Any] | None = None
        self._bpt: xr.Dataset | None = None
        if diagnostics is None:
            diagnostics = metallicity.choose_diagnostics(line_maps, redshift=redshift)
        unknown = [d for d in diagnostics if d not in self.available]
        if unknown:
            raise ConfigError(f"MetallicityExplorer: diagnostics {unknown} need lines the maps "
                              f"do not have; available: {', '.join(self.available)}")
        with self.hold_trait_notifications():
            self.diagnostics = list(diagnostics)
            self.dust_correction = bool(dust_correction)
            self.show_emcee = bool(show_emcee)
        if selected_pixel is not None:
            self.selected_pixel = tuple(int(v) for v in selected_pixel)

    @traitlets.default("selected_pixel")
    def _central_finite_pixel(self) -> tuple[int, int]:
        """The first access computes the map: the default pixel is the finite one nearest
        the middle of the map."""
        oh = self.metallicity["oh"].values
        finite = np.argwhere(np.isfinite(oh))
        if finite.size:
            centre = np.array(oh.shape) / 2
            return tuple(int(v) for v in finite[np.argmin(((finite - centre) ** 2).sum(1))])
        return (oh.shape[0] // 2, oh.shape[1] // 2)

    @property
    def bpt(self) -> xr.Dataset:
        """:func:`klever_nb.bpt.bpt_classify` of the line maps (computed on first use)."""
        if self._bpt is None:
            from klever_nb import bpt

            self._bpt = bpt.bpt_classify(self.line_maps)
        return self._bpt

    # ------------------------------------------------------------------ package calls
    @traitlets.validate("diagnostics")
    def _valid_diagnostics(self, proposal):
        value = [str(d) for d in proposal["value"]]
        bad = [d for d in value if d not in self.available]
        if bad:
            raise traitlets.TraitError(f"diagnostics {bad} not available "
                                       f"({', '.join(self.available)})")
        return [d for d in self.available if d in value]  # package order, no duplicates

    @property
    def metallicity(self) -> xr.Dataset:
        """:func:`klever_nb.metallicity.metallicity_map` for the current choices."""
        from klever_nb import metallicity

        key = (tuple(self.diagnostics), self.dust_correction)
        if key not in self._maps_cache:
            t0 = time.perf_counter()
            if self.diagnostics:
                result = metallicity.metallicity_map(
                    self.line_maps, diagnostics=list(self.diagnostics), redshift=self.redshift,
                    dust_correction=None if self.dust_correction else False, **self._kwargs)
            else:  # nothing chosen: an empty map
                nan = np.full(tuple(self.line_maps.sizes[d] for d in self.dims), np.nan)
                result = xr.Dataset({v: (self.dims, nan) for v in ("oh", "oh_lo", "oh_hi")},
                                    coords={d: self.line_maps[d] for d in self.dims})
                result.attrs["diagnostics_used"] = ""
            self.last_map_seconds = time.perf_counter() - t0
            self._maps_cache[key] = result
        return self._maps_cache[key]

    @property
    def diagnostics_used(self) -> list[str]:
        used = self.metallicity.attrs.get("diagnostics_used", "")
        return [d for d in (used.split(",") if isinstance(used, str) else used) if d]

    def pixel_ratios(self) -> dict[str, tuple[float, float]]:
        """The selected pixel's observed log ratios and errors (as the package used them)."""
        m = self.metallicity
        if "log_ratio" not in m:
            return {}
        y, x = self.selected_pixel
        sel = {self.dims[0]: y, self.dims[1]: x}
        lr = m["log_ratio"].isel(sel)
        le = m["log_ratio_err"].isel(sel)
        return {str(d): (float(lr.sel(diagnostic=d)), float(le.sel(diagnostic=d)))
                for d in m["diagnostic"].values}

    def pixel_posterior(self) -> dict[str, Any]:
        """The selected pixel's posterior: ``grid``, ``density`` (exact, package grid),
        ``oh``/``oh_lo``/``oh_hi`` from the map, and ``samples`` (emcee) when shown."""
        from klever_nb import metallicity

        diags = self.diagnostics_used
        y, x = self.selected_pixel
        key = (tuple(diags), self.dust_correction, y, x, self.show_emcee)
        if key in self._pixel_cache:
            return self._pixel_cache[key]
        m = self.metallicity
        sel = {self.dims[0]: y, self.dims[1]: x}
        out: dict[str, Any] = {"oh": float(m["oh"].isel(sel)), "oh_lo": float(m["oh_lo"].isel(sel)),
                               "oh_hi": float(m["oh_hi"].isel(sel)), "grid": np.array([]),
                               "density": np.array([]), "samples": None}
        ratios = self.pixel_ratios()
        if diags and ratios:
            obs = np.array([[ratios[d][0] for d in diags]])
            err = np.array([[ratios[d][1] for d in diags]])
            # the map's own calibration set and grid step: the posterior its summary came from
            cal_set = m.attrs.get("calibration_set", "C20")
            step = {"step": float(m.attrs["grid_step"])} if "grid_step" in m.attrs else {}
            grid = metallicity.make_grid(diags, calibration_set=cal_set, **step)
            out["grid"] = grid
            out["density"] = metallicity.posterior_grid(obs, err, diags, calibration_set=cal_set,
                                                        grid=grid)[0]
            if self.show_emcee and np.isfinite(out["density"]).any():
                res = metallicity.posterior_emcee(obs, err, diags, calibration_set=cal_set,
                                                  return_samples=True, **EMCEE_KWARGS)
                out["samples"] = np.asarray(res["samples"][0])
                out["emcee"] = {k: float(np.asarray(res[k]).ravel()[0])
                                for k in ("oh", "oh_lo", "oh_hi", "tau") if k in res}
                out["emcee"]["converged"] = bool(np.asarray(res["converged"]).ravel()[0])
        self._pixel_cache[key] = out
        return out

    def select(self, y: int, x: int) -> None:
        """Select pixel (y, x) as a click on the map does."""
        ny, nx = (self.line_maps.sizes[d] for d in self.dims)
        if not (0 <= y < ny and 0 <= x < nx):
            raise ConfigError(f"select({y}, {x}): outside the {ny}x{nx} map")
        self.selected_pixel = (int(y), int(x))

    def calibration_curves(self, n: int = 200) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """log R(12+log O/H) of each chosen diagnostic over its validity range."""
        from klever_nb.calibrations import get_calibration

        cal_set = self.metallicity.attrs.get("calibration_set", "C20")
        out = {}
        for d in self.diagnostics:
            cal = get_calibration(d, set_name=cal_set)
            oh = np.linspace(cal.oh_min, cal.oh_max, n)
            out[d] = (oh, np.asarray(cal.log_ratio(oh), dtype=float))
        return out

    # ------------------------------------------------------------------ widget
    def _coords(self) -> tuple[np.ndarray, np.ndarray]:
        ydim, xdim = self.dims
        return (np.asarray(self.line_maps[ydim].values, float),
                np.asarray(self.line_maps[xdim].values, float))

    def _build_ui(self) -> None:
        import bqplot as bq
        import ipywidgets as w

        from klever_nb import bpt

        ycoord, xcoord = self._coords()
        unit = "kpc" if self.dims[1] == "xs" else "pix"
        image = ImageMap((ycoord.size, xcoord.size), title="12+log(O/H)", width="400px",
                         height="360px", x_label=f"{self.dims[1]} [{unit}]",
                         y_label=f"{self.dims[0]} [{unit}]", css_class="klever-oh-map",
                         x_coords=xcoord, y_coords=ycoord)
        image.on_click(self.select)
        # calibration curves
        cx, cy = bq.LinearScale(), bq.LinearScale()
        curves = bq.Lines(x=[[7.6, 8.9]], y=[[0, 0]], scales={"x": cx, "y": cy}, colors=list(COLOURS),
                          stroke_width=2, display_legend=True)
        observed = bq.Lines(x=[[7.6, 8.9]], y=[[0, 0]], scales={"x": cx, "y": cy},
                            colors=list(COLOURS), line_style="dashed", stroke_width=1.5)
        band = bq.Lines(x=[[7.6, 8.9]], y=[[0, 0]], scales={"x": cx, "y": cy},
                        colors=list(COLOURS), line_style="dotted", stroke_width=1, opacities=[0.7])
        oh_line = bq.Lines(x=[8.0, 8.0], y=[-2, 2], scales={"x": cx, "y": cy}, colors=["black"],
                           stroke_width=1)
        cal_fig = bq.Figure(marks=[curves, band, observed, oh_line],
                            axes=[bq.Axis(scale=cx, label="12+log(O/H)"),
                                  bq.Axis(scale=cy, side="left", label="log R")],
                            title="calibrations (C20) and the pixel's ratios",
                            legend_location="bottom-left",
                            fig_margin={"top": 40, "bottom": 45, "left": 55, "right": 15},
                            layout={"width": "420px", "height": "360px"})
        cal_fig.add_class("klever-calibrations")
        # posterior
        px, py = bq.LinearScale(), bq.LinearScale(min=0.0)
        density = bq.Lines(x=[7.6, 8.9], y=[0, 0], scales={"x": px, "y": py}, colors=["black"],
                           stroke_width=2, labels=["grid (exact)"], display_legend=True)
        hist = bq.Lines(x=[7.6, 8.9], y=[0, 0], scales={"x": px, "y": py}, colors=["#1f77b4"],
                        interpolation="step-after", stroke_width=1.5, labels=["emcee"],
                        display_legend=True)
        quantiles = bq.Lines(x=[[8, 8]], y=[[0, 1]], scales={"x": px, "y": py},
                             colors=["#d62728"], line_style="dashed", stroke_width=1)
        post_fig = bq.Figure(marks=[hist, density, quantiles],
                             axes=[bq.Axis(scale=px, label="12+log(O/H)"),
                                   bq.Axis(scale=py, side="left", label="posterior density")],
                             title="posterior of the pixel", legend_location="top-right",
                             fig_margin={"top": 40, "bottom": 45, "left": 55, "right": 15},
                             layout={"width": "400px", "height": "320px"})
        post_fig.add_class("klever-posterior")
        # BPT
        bx, by = bq.LinearScale(min=-2.0, max=0.6), bq.LinearScale(min=-1.2, max=1.5)
        n2, o3 = self.bpt["log_n2"].values.ravel(), self.bpt["log_o3"].values.ravel()
        ok = np.isfinite(n2) & np.isfinite(o3)
        cloud = bq.Scatter(x=n2[ok] if ok.any() else [np.nan], y=o3[ok] if ok.any() else [np.nan],
                           scales={"x": bx, "y": by}, colors=["#999999"], default_size=12,
                           default_opacities=[0.6])
        xk = np.linspace(-2.0, 0.45, 100)
        xa = np.linspace(-2.0, 0.0, 100)
        kewley = bq.Lines(x=xk, y=bpt.kewley01_n2(xk), scales={"x": bx, "y": by},
                          colors=["#d62728"], labels=["Kewley+01"], display_legend=True)
        kauffmann = bq.Lines(x=xa, y=bpt.kauffmann03_n2(xa), scales={"x": bx, "y": by},
                             colors=["#1f77b4"], line_style="dashed", labels=["Kauffmann+03"],
                             display_legend=True)
        here = bq.Scatter(x=[np.nan], y=[np.nan], scales={"x": bx, "y": by}, colors=["red"],
                          default_size=90, marker="diamond")
        bpt_fig = bq.Figure(marks=[cloud, kewley, kauffmann, here],
                            axes=[bq.Axis(scale=bx, label="log [NII]6584/Hα"),
                                  bq.Axis(scale=by, side="left", label="log [OIII]5007/Hβ")],
                            title="[NII] BPT", legend_location="bottom-left",
                            fig_margin={"top": 40, "bottom": 45, "left": 55, "right": 15},
                            layout={"width": "400px", "height": "320px"})
        bpt_fig.add_class("klever-bpt")
        # controls
        boxes = {d: w.Checkbox(value=d in self.diagnostics, description=d, indent=False,
                               layout={"width": "70px"}) for d in self.available}
        for d, box in boxes.items():
            box.observe(lambda change, d=d: self._toggle(d, change["new"]), names="value")
        dust = w.Checkbox(description="dust correction (K20 §3.4)", indent=False)
        emcee = w.Checkbox(description="overlay emcee", indent=False)
        traitlets.link((self, "dust_correction"), (dust, "value"))
        traitlets.link((self, "show_emcee"), (emcee, "value"))
        table = w.HTML()
        table.add_class("klever-pixel-table")
        box = w.VBox([w.HBox([w.Label("diagnostics:"), *boxes.values()]), w.HBox([dust, emcee]),
                      w.HBox([image.figure, cal_fig]), w.HBox([post_fig, bpt_fig]), table])
        box.add_class("klever-metallicity")
        self._ui = {"box": box, "image": image, "curves": curves, "observed": observed,
                    "band": band, "oh_line": oh_line, "cal_scales": (cx, cy),
                    "density": density, "hist": hist, "quantiles": quantiles, "bpt_here": here,
                    "table": table, "cal_fig": cal_fig,
                    "controls": {"diagnostics": boxes, "dust": dust, "emcee": emcee}}
        self._redraw_all()

    def _toggle(self, diagnostic: str, on: bool) -> None:
        chosen = set(self.diagnostics)
        chosen.add(diagnostic) if on else chosen.discard(diagnostic)
        self.diagnostics = [d for d in self.available if d in chosen]

    @property
    def marks(self) -> dict[str, Any]:
        self.widget  # noqa: B018
        keys = ("curves", "observed", "band", "oh_line", "density", "hist", "quantiles",
                "bpt_here")
        return {k: self._ui[k] for k in keys} | {"image": self._ui["image"].mark}

    def _redraw_map(self) -> None:
        if self._ui is None:
            return
        oh = self.metallicity["oh"].values
        self._ui["image"].set_image(oh, vrange=finite_range(oh), cmap="RdYlBu_r")
        self._ui["image"].figure.title = ("12+log(O/H) from " + (", ".join(self.diagnostics_used)
                                                                 or "no diagnostic"))

    def _redraw_pixel(self) -> None:
        if self._ui is None:
            return
        ui = self._ui
        y, x = self.selected_pixel
        ui["image"].set_marker(y, x)
        curves = self.calibration_curves()
        ratios = self.pixel_ratios()
        names = list(curves)
        post = self.pixel_posterior()
        lo, hi = 7.6, 8.9
        if names:
            lo = min(c[0][0] for c in curves.values())
            hi = max(c[0][-1] for c in curves.values())
            ys = np.concatenate([c[1] for c in curves.values()])
            obs = [ratios.get(d, (np.nan, np.nan)) for d in names]
            vals = [v for v, _ in obs if np.isfinite(v)]
            ymin, ymax = float(np.min([*ys, *vals])), float(np.max([*ys, *vals]))
            pad = 0.05 * (ymax - ymin)
            with ui["cal_fig"].hold_sync():
                ui["cal_scales"][1].min, ui["cal_scales"][1].max = ymin - pad, ymax + pad
                ui["cal_scales"][0].min, ui["cal_scales"][0].max = float(lo), float(hi)
                ui["curves"].x = np.array([c[0] for c in curves.values()])
                ui["curves"].y = np.array([c[1] for c in curves.values()])
                ui["curves"].labels = names
                ui["curves"].colors = list(COLOURS[:len(names)])
                ui["observed"].x = np.array([[lo, hi]] * len(names))
                ui["observed"].y = np.array([[v, v] for v, _ in obs])
                ui["observed"].colors = list(COLOURS[:len(names)])
                ui["band"].x = np.array([[lo, hi, np.nan, lo, hi]] * len(names))
                ui["band"].y = np.array([[v - e, v - e, np.nan, v + e, v + e] for v, e in obs])
                ui["band"].colors = list(COLOURS[:len(names)])
                ui["oh_line"].x = [post["oh"], post["oh"]]
                ui["oh_line"].y = [ymin - pad, ymax + pad]
        grid, dens = post["grid"], post["density"]
        zoom = self._posterior_range(post)
        if zoom is not None:
            ui["density"].scales["x"].min, ui["density"].scales["x"].max = zoom
        with ui["density"].hold_sync():
            ui["density"].x = grid if grid.size else [lo, hi]
            ui["density"].y = np.nan_to_num(dens) if grid.size else [0.0, 0.0]
        samples = post["samples"]
        if samples is not None and grid.size:
            edges = np.linspace(grid[0], grid[-1], 61)
            counts, _ = np.histogram(samples, bins=edges, density=True)
            hx, hy = edges, np.append(counts, counts[-1])
        else:
            hx, hy = [lo, hi], [0.0, 0.0]
        with ui["hist"].hold_sync():
            ui["hist"].x, ui["hist"].y = hx, hy
        top = float(np.nanmax([np.nanmax(dens) if dens.size and np.isfinite(dens).any() else 1.0,
                               np.max(hy)]))
        q = [post["oh_lo"], post["oh"], post["oh_hi"]]
        with ui["quantiles"].hold_sync():
            ui["quantiles"].x = np.array([[v, v] for v in q])
            ui["quantiles"].y = np.array([[0.0, top]] * 3)
        n2 = float(self.bpt["log_n2"].values[y, x])
        o3 = float(self.bpt["log_o3"].values[y, x])
        set_points(ui["bpt_here"], [n2], [o3])
        rows = [[d, fmt(ratios.get(d, (np.nan,))[0], ".3f"),
                 fmt(ratios.get(d, (np.nan, np.nan))[1], ".3f")] for d in names]
        em = post.get("emcee", {})
        summary = (f"pixel ({y}, {x}): 12+log(O/H) = {fmt(post['oh'], '.3f')} "
                   f"[{fmt(post['oh_lo'], '.3f')}, {fmt(post['oh_hi'], '.3f')}] (grid)")
        if em:
            summary += (f"; emcee {fmt(em['oh'], '.3f')} [{fmt(em['oh_lo'], '.3f')}, "
                        f"{fmt(em['oh_hi'], '.3f')}], τ = {fmt(em.get('tau'), '.1f')}, "
                        f"{'converged' if em['converged'] else 'NOT converged'}")
        ui["table"].value = (f"<div style='font-size:12px'>{summary}</div>"
                             + html_table(["diagnostic", "log R", "σ [dex]"], rows))

    @staticmethod
    def _posterior_range(post: dict[str, Any]) -> tuple[float, float] | None:
        """Where the posterior density exceeds 1e-3 of its peak, padded (None if empty)."""
        dens = post["density"]
        if not dens.size or not np.isfinite(dens).any():
            return None
        keep = np.flatnonzero(np.nan_to_num(dens) > 1e-3 * np.nanmax(dens))
        lo, hi = post["grid"][keep[0]], post["grid"][keep[-1]]
        pad = max(0.1 * (hi - lo), 0.02)
        return float(max(lo - pad, post["grid"][0])), float(min(hi + pad, post["grid"][-1]))

    def _redraw_all(self) -> None:
        self._redraw_map()
        self._redraw_pixel()

    @traitlets.observe("diagnostics", "dust_correction")
    def _on_choice(self, change) -> None:
        if self._ui is not None:
            for d, box in self._ui["controls"]["diagnostics"].items():
                box.value = d in self.diagnostics
        self._redraw_all()

    @traitlets.observe("selected_pixel", "show_emcee")
    def _on_pixel(self, change) -> None:
        self._redraw_pixel()

    # ------------------------------------------------------------------ static twin
    def static_figure(self):
        """Matplotlib twin: map, calibrations with the pixel's ratios, posterior, BPT."""
        import matplotlib.pyplot as plt

        from klever_nb import bpt

        fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
        ax_map, ax_cal, ax_post, ax_bpt = axes.ravel()
        oh = self.metallicity["oh"].values
        lo, hi = finite_range(oh)
        ycoord, xcoord = self._coords()
        dx = xcoord[1] - xcoord[0] if xcoord.size > 1 else 1.0
        dy = ycoord[1] - ycoord[0] if ycoord.size > 1 else 1.0
        im = ax_map.imshow(oh, origin="lower", cmap=plt.get_cmap("RdYlBu_r").with_extremes(
            bad=MASKED_COLOUR), vmin=lo, vmax=hi, interpolation="nearest",
            extent=[xcoord[0] - dx / 2, xcoord[-1] + dx / 2, ycoord[0] - dy / 2,
                    ycoord[-1] + dy / 2])
        y, x = self.selected_pixel
        ax_map.plot(xcoord[x], ycoord[y], "s", mfc="none", mec="k", ms=9, mew=2)
        fig.colorbar(im, ax=ax_map, label="12+log(O/H)")
        ax_map.set_title("from " + (", ".join(self.diagnostics_used) or "no diagnostic"),
                         fontsize=10)
        ratios = self.pixel_ratios()
        for i, (d, (ohs, lr)) in enumerate(self.calibration_curves().items()):
            c = COLOURS[i % len(COLOURS)]
            ax_cal.plot(ohs, lr, color=c, label=d)
            v, e = ratios.get(d, (np.nan, np.nan))
            if np.isfinite(v):
                ax_cal.axhspan(v - e, v + e, color=c, alpha=0.2)
                ax_cal.axhline(v, color=c, ls="--", lw=1)
        post = self.pixel_posterior()
        if np.isfinite(post["oh"]):
            ax_cal.axvline(post["oh"], color="k", lw=1)
        ax_cal.set_xlabel("12+log(O/H)")
        ax_cal.set_ylabel("log R")
        ax_cal.legend(fontsize=8)
        if post["grid"].size:
            ax_post.plot(post["grid"], post["density"], color="k", label="grid (exact)")
            if post["samples"] is not None:
                ax_post.hist(post["samples"], bins=60, range=(post["grid"][0], post["grid"][-1]),
                             density=True, histtype="step", color="#1f77b4", label="emcee")
            for v in (post["oh_lo"], post["oh"], post["oh_hi"]):
                ax_post.axvline(v, color="#d62728", ls="--", lw=1)
            ax_post.set_xlim(*(self._posterior_range(post) or (7.6, 8.9)))
            ax_post.legend(fontsize=8)
        ax_post.set_xlabel("12+log(O/H)")
        ax_post.set_title(f"pixel ({y}, {x})", fontsize=10)
        n2, o3 = self.bpt["log_n2"].values, self.bpt["log_o3"].values
        ax_bpt.scatter(n2, o3, s=6, color="0.6")
        xk = np.linspace(-2.0, 0.45, 100)
        xa = np.linspace(-2.0, 0.0, 100)
        ax_bpt.plot(xk, bpt.kewley01_n2(xk), color="#d62728", label="Kewley+01")
        ax_bpt.plot(xa, bpt.kauffmann03_n2(xa), color="#1f77b4", ls="--", label="Kauffmann+03")
        ax_bpt.plot(n2[y, x], o3[y, x], "D", color="red", ms=8)
        ax_bpt.set_xlim(-2.0, 0.6)
        ax_bpt.set_ylim(-1.2, 1.5)
        ax_bpt.set_xlabel("log [NII]6584/Hα")
        ax_bpt.set_ylabel("log [OIII]5007/Hβ")
        ax_bpt.legend(fontsize=8)
        fig.tight_layout()
        return fig

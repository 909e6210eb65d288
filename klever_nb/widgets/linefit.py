"""Click-a-spaxel line-fit explorer: a map of any line's flux/velocity/sigma/SNR linked to the
spaxel's spectrum, noise, OH-sky mask and fitted model, and a per-line table.

The explorer is a thin :class:`traitlets.HasTraits` over the package: fits come
from :func:`klever_nb.fitting.fit_cube` (with ``return_model=True``), smoothing
from :func:`klever_nb.spectra.smooth_cube`, the sky mask from
:func:`klever_nb.fitting.fit_sky_mask` (the mask the fit used). Every control has a code twin::

    ex = LineFitExplorer(galaxy.cubes)
    ex.line = "NII_6584"; ex.quantity = "snr"   # the dropdown and the toggle buttons
    ex.select(12, 10)                           # a click on the map
    ex.snr_threshold = 5.0                      # the SNR slider (masks, no refit)
    ex.smooth_fwhm = 0.2                        # the smoothing slider (refits one band)
    ex.static_figure()                          # the matplotlib twin of what is shown

Only what a change needs is recomputed: the SNR threshold and the quantity only
redraw; a new smoothing refits only the band of the current line (other bands
are refitted when one of their lines is chosen); fits are cached per
(band, smoothing).

References
----------
K20 §3.1 (fitting, 0.4" smoothing, SNR > 3); PITFALLS.md features 1 and 8.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import numpy as np
import traitlets
import xarray as xr

from klever_nb import constants
from klever_nb.errors import ConfigError
from klever_nb.widgets._common import (
    DIVERGING,
    MASKED_COLOUR,
    SEQUENTIAL,
    ExplorerBase,
    ImageMap,
    finite_range,
    fmt,
    html_table,
)

QUANTITIES = ("flux", "velocity", "sigma", "snr")
_QUANTITY_LABEL = {"flux": "flux", "velocity": "velocity [km/s]", "sigma": "σ [km/s]",
                   "snr": "SNR"}
#: Half-width (km/s) of the spectrum window drawn around the current line's kinematic group.
WINDOW_HALF_KMS = 3000.0
#: Number of (band, smoothing) fits kept in memory.
CACHE_SIZE = 6


def _as_tree(cubes: xr.DataTree | xr.Dataset) -> dict[str, xr.Dataset]:
    if isinstance(cubes, xr.Dataset):
        return {str(cubes.attrs.get("band", "cube")): cubes}
    if isinstance(cubes, xr.DataTree):
        out = {name: node.to_dataset() for name, node in cubes.children.items()}
        if not out:
            raise ConfigError("LineFitExplorer: the DataTree has no band children (/YJ, /H, /K)")
        return out
    raise ConfigError("LineFitExplorer: cubes must be an xarray Dataset (one cube) or a "
                      "DataTree with one child per band")


def _fit_settings(fit_kwargs: dict):
    """The :class:`~klever_nb.fitting.FitSettings` the widget fits with (``fit_kwargs`` may
    hold a ``settings`` object and/or FitSettings fields)."""
    import dataclasses

    from klever_nb import fitting

    options = dict(fit_kwargs)
    settings = options.pop("settings", None) or fitting.FitSettings()
    fields = {f.name for f in dataclasses.fields(fitting.FitSettings)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(f"LineFitExplorer: fit_kwargs {unknown} are not FitSettings fields "
                          f"({sorted(fields)})")
    return dataclasses.replace(settings, **options) if options else settings


def _fit_with_model(cube: xr.Dataset, *, redshift: float, lines: tuple[str, ...],
                    fit_kwargs: dict) -> tuple[xr.Dataset, np.ndarray | None]:
    """Call the package's fitter; return the line maps and the model cube (wave, y, x)."""
    from klever_nb import fitting

    result = fitting.fit_cube(cube, redshift=redshift, lines=lines, return_model=True,
                              settings=_fit_settings(fit_kwargs))
    model = result.get("model")
    if model is not None:
        maps = result.drop_vars("model")
        model = np.asarray(model.transpose("wave", "y", "x").values, dtype=float)
    else:
        maps = result
    return maps, model


class LineFitExplorer(ExplorerBase):
    """Map + linked spectrum + per-line table of a galaxy's (or one cube's) line fits.

    Parameters
    ----------
    cubes : xarray.DataTree or xarray.Dataset
        The galaxy's cubes (one child per band) or a single cube (DESIGN.md data model).
    redshift : float, optional
        Source redshift (default: ``attrs["redshift"]`` of the tree or cube).
    lines : sequence of str, optional
        Lines to fit (default: ``constants.PAPER_LINES`` that fall inside the bands).
    line, quantity : str
        Initial map: a line name and one of ``flux``, ``velocity``, ``sigma``, ``snr``.
    smooth_fwhm : float
        Spatial Gaussian smoothing FWHM in arcsec before fitting (K20 §3.1: 0.4").
    snr_threshold : float
        Pixels with SNR <= threshold (or a failed fit) are masked on the map.
    selected_spaxel : tuple of int, optional
        Initial (y, x); default the peak of the first fitted line's SNR.
    fit_kwargs : dict, optional
        :class:`klever_nb.fitting.FitSettings` fields (or ``settings=FitSettings(...)``)
        for :func:`klever_nb.fitting.fit_cube`.

    Examples
    --------
    >>> from klever_nb import mock
    >>> galaxy = mock.make_mock(mock.demo_specs()[0])
    >>> ex = LineFitExplorer(galaxy.cubes, smooth_fwhm=0.0)   # doctest: +SKIP
    >>> ex.select(12, 12); ex.spectrum["flux"].shape          # doctest: +SKIP
    """

    line = traitlets.Unicode()
    quantity = traitlets.Enum(QUANTITIES, default_value="flux")
    selected_spaxel = traitlets.Tuple(traitlets.Int(), traitlets.Int(), default_value=(0, 0))
    smooth_fwhm = traitlets.Float(constants.SMOOTH_FWHM_ARCSEC, min=0.0)
    snr_threshold = traitlets.Float(constants.DETECTION_SNR, min=0.0)
    #: Seconds the last refit took (0 when the last change needed no refit).
    last_refit_seconds = traitlets.Float(0.0)

    def __init__(self, cubes: xr.DataTree | xr.Dataset, *, redshift: float | None = None,
                 lines=None, line: str | None = None, quantity: str = "flux",
                 smooth_fwhm: float = constants.SMOOTH_FWHM_ARCSEC,
                 snr_threshold: float = constants.DETECTION_SNR,
                 selected_spaxel: tuple[int, int] | None = None,
                 fit_kwargs: dict | None = None):
        super().__init__()
        self._cubes = _as_tree(cubes)
        attrs = cubes.attrs if isinstance(cubes, xr.Dataset) else {
            **next(iter(self._cubes.values())).attrs, **cubes.attrs}
        if redshift is None:
            if "redshift" not in attrs:
                raise ConfigError("LineFitExplorer: give redshift= (the cubes carry no "
                                  "attrs['redshift'])")
            redshift = float(attrs["redshift"])
        self.redshift = float(redshift)
        self.name = str(attrs.get("name", attrs.get("object", "")))
        self._fit_kwargs = dict(fit_kwargs or {})
        wanted = tuple(lines) if lines is not None else None
        self.band_lines: dict[str, tuple[str, ...]] = {}
        for band, cube in self._cubes.items():
            wave = cube["wave"].values
            chosen = constants.lines_in_range(
                float(np.nanmin(wave)), float(np.nanmax(wave)), self.redshift,
                wanted if wanted is not None else constants.PAPER_LINES)
            if chosen:
                self.band_lines[band] = chosen
        if not self.band_lines:
            raise ConfigError(f"LineFitExplorer: no line of {wanted or 'PAPER_LINES'} falls "
                              f"inside the cubes at z = {self.redshift}")
        self.line_band = {ln: band for band, names in self.band_lines.items() for ln in names}
        self._cache: OrderedDict[tuple[str, float], dict[str, Any]] = OrderedDict()
        self._ui: dict[str, Any] | None = None
        first = line or ("Halpha" if "Halpha" in self.line_band else next(iter(self.line_band)))
        if first not in self.line_band:
            raise ConfigError(f"LineFitExplorer: line {first!r} is not fitted; choose one of "
                              f"{', '.join(self.line_band)}")
        with self.hold_trait_notifications():
            self.smooth_fwhm = float(smooth_fwhm)
            self.snr_threshold = float(snr_threshold)
            self.quantity = quantity
            self.line = first
        if selected_spaxel is not None:
            self.selected_spaxel = tuple(int(v) for v in selected_spaxel)

    @traitlets.default("selected_spaxel")
    def _peak_snr_spaxel(self) -> tuple[int, int]:
        """The first access fits: the default spaxel is the current line's SNR peak."""
        snr = self.maps["snr"].sel(line=self.line).values
        if np.isfinite(snr).any():
            return tuple(int(i) for i in np.unravel_index(np.nanargmax(snr), snr.shape))
        return (snr.shape[0] // 2, snr.shape[1] // 2)

    # ------------------------------------------------------------------ state -> fits
    @property
    def band(self) -> str:
        """Band holding the current line."""
        return self.line_band[self.line]

    @property
    def shape(self) -> tuple[int, int]:
        cube = self._cubes[self.band]
        return int(cube.sizes["y"]), int(cube.sizes["x"])

    def _fit_entry(self, band: str, *, force: bool = False) -> dict[str, Any]:
        key = (band, round(float(self.smooth_fwhm), 6))
        if not force and key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        t0 = time.perf_counter()
        cube = self._cubes[band]
        if self.smooth_fwhm > 0:
            from klever_nb import spectra

            cube = spectra.smooth_cube(cube, fwhm_arcsec=float(self.smooth_fwhm))
        maps, model = _fit_with_model(cube, redshift=self.redshift,
                                      lines=self.band_lines[band], fit_kwargs=self._fit_kwargs)
        from klever_nb import fitting

        # the very mask the fit used (one function for both)
        mask = fitting.fit_sky_mask(cube, _fit_settings(self._fit_kwargs))
        entry = {"cube": cube, "maps": maps, "model": model, "sky_mask": mask,
                 "seconds": time.perf_counter() - t0}
        self._remember(self._cache, key, entry, CACHE_SIZE)
        self.last_refit_seconds = entry["seconds"]
        return entry

    @property
    def maps(self) -> xr.Dataset:
        """Line maps (package output) of the current band at the current smoothing."""
        return self._fit_entry(self.band)["maps"]

    @property
    def cube(self) -> xr.Dataset:
        """The cube that was fitted (smoothed when ``smooth_fwhm > 0``) for the current band."""
        return self._fit_entry(self.band)["cube"]

    def refit(self) -> float:
        """Refit the current band at the current smoothing (ignoring the cache); redraw.

        Returns the seconds the fit took.
        """
        entry = self._fit_entry(self.band, force=True)
        self._redraw_all()
        return entry["seconds"]

    def select(self, y: int, x: int) -> None:
        """Select spaxel (row ``y``, column ``x``), as a click on the map does."""
        ny, nx = self.shape
        if not (0 <= y < ny and 0 <= x < nx):
            raise ConfigError(f"select({y}, {x}): spaxel outside the {ny}x{nx} map")
        self.selected_spaxel = (int(y), int(x))

    # ------------------------------------------------------------------ what is shown
    def masked_pixels(self) -> np.ndarray:
        """Boolean (y, x): True where the map hides the pixel (SNR <= threshold or failed fit)."""
        maps = self.maps.sel(line=self.line)
        snr = maps["snr"].values
        ok = np.isfinite(snr) & (snr > self.snr_threshold)
        if "fit_ok" in maps:
            ok &= maps["fit_ok"].values.astype(bool)
        return ~ok

    def map_image(self) -> np.ndarray:
        """The (y, x) image on the map: the current quantity, NaN where masked."""
        values = self.maps[self.quantity].sel(line=self.line).values.astype(float)
        return np.where(self.masked_pixels(), np.nan, values)

    def _window(self) -> np.ndarray:
        group = constants.LINES[self.line].group
        centres = [constants.LINES[n].wave_vac * (1 + self.redshift) / 1e4
                   for n in self.band_lines[self.band] if constants.LINES[n].group == group]
        half = WINDOW_HALF_KMS / constants.C_KMS
        wave = self.cube["wave"].values
        return (wave >= min(centres) * (1 - half)) & (wave <= max(centres) * (1 + half))

    def line_centres_um(self) -> dict[str, float]:
        """Observed wavelength (µm, at the systemic redshift) of each line of the band."""
        return {n: constants.LINES[n].wave_vac * (1 + self.redshift) / 1e4
                for n in self.band_lines[self.band]}

    @property
    def spectrum(self) -> xr.Dataset:
        """The selected spaxel's spectrum as drawn: ``flux``, ``noise``, ``model``, ``sky_mask``
        on the wavelength window around the current line's kinematic group."""
        entry = self._fit_entry(self.band)
        y, x = self.selected_spaxel
        sel = self._window()
        cube = entry["cube"]
        model = (entry["model"][sel, y, x] if entry["model"] is not None
                 else np.full(int(sel.sum()), np.nan))
        return xr.Dataset(
            {"flux": ("wave", cube["flux"].values[sel, y, x]),
             "noise": ("wave", cube["noise"].values[sel, y, x]),
             "model": ("wave", np.asarray(model, dtype=float)),
             "sky_mask": ("wave", entry["sky_mask"][sel])},
            coords={"wave": cube["wave"].values[sel]},
            attrs={"y": y, "x": x, "band": self.band, "line": self.line})

    def line_table(self) -> list[dict[str, Any]]:
        """Per-line fit results of the selected spaxel (current band)."""
        y, x = self.selected_spaxel
        maps = self.maps.isel(y=y, x=x)
        rows = []
        for name in maps["line"].values:
            m = maps.sel(line=name)
            snr = float(m["snr"])
            rows.append({"line": str(name), "flux": float(m["flux"]),
                         "flux_err": float(m["flux_err"]), "snr": snr,
                         "velocity": float(m["velocity"]), "sigma": float(m["sigma"]),
                         "detected": bool(np.isfinite(snr) and snr > self.snr_threshold)})
        return rows

    # ------------------------------------------------------------------ widget
    def _build_ui(self) -> None:
        import bqplot as bq
        import ipywidgets as w

        options = [(f"{constants.LINES[n].label} ({b})", n)
                   for b, names in self.band_lines.items() for n in names]
        line_dd = w.Dropdown(options=options, description="line", layout={"width": "240px"})
        qty = w.ToggleButtons(options=list(QUANTITIES), description="map",
                              style={"button_width": "70px"})
        smooth = w.FloatSlider(min=0.0, max=1.0, step=0.1, description="smooth FWHM [\"]",
                               continuous_update=False, readout_format=".1f",
                               style={"description_width": "initial"})
        snr = w.FloatSlider(min=0.0, max=15.0, step=0.5, description="SNR threshold",
                            continuous_update=False, readout_format=".1f",
                            style={"description_width": "initial"})
        for control, trait in ((line_dd, "line"), (qty, "quantity"), (smooth, "smooth_fwhm"),
                               (snr, "snr_threshold")):
            traitlets.link((self, trait), (control, "value"))  # the control takes our value
        status = w.HTML()
        traitlets.dlink((self, "status"), (status, "value"))
        ny, nx = self.shape
        image = ImageMap((ny, nx), title="", css_class="klever-map")
        image.on_click(self.select)

        scale_x = bq.LinearScale()
        scale_y = bq.LinearScale()
        sc = {"x": scale_x, "y": scale_y}
        sky_mark = bq.Lines(x=[0.0, 1.0], y=[0.0, 0.0], scales=sc, fill="bottom",
                            colors=["#9ecae1"], fill_colors=["#9ecae1"], fill_opacities=[0.5],
                            opacities=[0.0], interpolation="step-after", labels=["OH sky mask"])
        noise_mark = bq.Lines(x=[0.0, 1.0], y=[0.0, 0.0], scales=sc, colors=["#888888"],
                              labels=["noise"], stroke_width=1)
        data_mark = bq.Lines(x=[0.0, 1.0], y=[0.0, 0.0], scales=sc, colors=["black"],
                             labels=["data"], stroke_width=1.2, interpolation="step-before")
        model_mark = bq.Lines(x=[0.0, 1.0], y=[0.0, 0.0], scales=sc, colors=["#d62728"],
                              labels=["model"], stroke_width=2)
        centres_mark = bq.Lines(x=[[0.0, 0.0]], y=[[0.0, 1.0]], scales=sc, colors=["#2ca02c"],
                                line_style="dotted", stroke_width=1, labels=["lines at z"])
        spec_fig = bq.Figure(
            marks=[sky_mark, centres_mark, noise_mark, data_mark, model_mark],
            axes=[bq.Axis(scale=scale_x, label="observed wavelength [µm]", tick_format=".4f",
                          num_ticks=5),
                  bq.Axis(scale=scale_y, side="left", label="flux", label_offset="45px")],
            legend_location="top-left", padding_y=0,
            fig_margin={"top": 40, "bottom": 45, "left": 60, "right": 20},
            layout={"width": "560px", "height": "400px"})
        for mark in (noise_mark, data_mark, model_mark):
            mark.display_legend = True
        spec_fig.add_class("klever-spectrum")
        table = w.HTML()
        table.add_class("klever-line-table")
        controls = w.VBox([w.HBox([line_dd, qty]), w.HBox([smooth, snr]), status])
        box = w.VBox([controls, w.HBox([image.figure, spec_fig]), table],
                     layout={"width": "100%"})
        box.add_class("klever-linefit")
        self._ui = {"box": box, "image": image, "spec_fig": spec_fig, "scale_x": scale_x,
                    "scale_y": scale_y, "data": data_mark, "noise": noise_mark,
                    "model": model_mark, "sky": sky_mark, "centres": centres_mark,
                    "table": table,
                    "controls": {"line": line_dd, "quantity": qty, "smooth": smooth,
                                 "snr": snr}}
        self._redraw_all()

    @property
    def marks(self) -> dict[str, Any]:
        """The bqplot marks (``image``, ``marker``, ``data``, ``noise``, ``model``, ``sky``)."""
        self.widget  # noqa: B018 - builds the UI
        ui = self._ui
        return {"image": ui["image"].mark, "marker": ui["image"].marker,
                "data": ui["data"], "noise": ui["noise"], "model": ui["model"],
                "sky": ui["sky"]}

    def _redraw_map(self) -> None:
        if self._ui is None:
            return
        image = self.map_image()
        if self.quantity == "velocity":
            rng, cmap = finite_range(image, symmetric=True), DIVERGING[1]
        else:
            rng, cmap = finite_range(image), SEQUENTIAL[1]
        ui = self._ui
        ui["image"].set_image(image, vrange=rng, cmap=cmap)
        units = self.maps["flux"].attrs.get("units", "") if self.quantity == "flux" else ""
        ui["image"].figure.title = f"{constants.LINES[self.line].label} {_QUANTITY_LABEL[self.quantity]}"
        ui["image"].figure.title += f" [{units}]" if units else ""

    def _redraw_spectrum(self) -> None:
        if self._ui is None:
            return
        ui = self._ui
        spec = self.spectrum
        wave = spec["wave"].values
        flux, noise, model = spec["flux"].values, spec["noise"].values, spec["model"].values
        finite = np.concatenate([flux[np.isfinite(flux)], model[np.isfinite(model)],
                                 noise[np.isfinite(noise)]])
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        pad = 0.08 * (hi - lo if hi > lo else 1.0)
        lo, hi = lo - pad, hi + pad
        sky_y = np.where(spec["sky_mask"].values, hi, lo)
        with ui["spec_fig"].hold_sync():
            ui["scale_x"].min, ui["scale_x"].max = float(wave.min()), float(wave.max())
            ui["scale_y"].min, ui["scale_y"].max = lo, hi
            for key, values in (("sky", sky_y), ("noise", noise), ("data", flux),
                                ("model", model)):
                with ui[key].hold_sync():
                    ui[key].x = wave
                    ui[key].y = values
            centres = [c for c in self.line_centres_um().values()
                       if wave.min() <= c <= wave.max()]
            with ui["centres"].hold_sync():
                ui["centres"].x = np.array([[c, c] for c in centres] or [[np.nan, np.nan]])
                ui["centres"].y = np.array([[lo, hi]] * max(len(centres), 1))
            y, x = self.selected_spaxel
            ui["spec_fig"].title = f"spaxel (y={y}, x={x}) · band {self.band}"
            ui["spec_fig"].axes[1].label = f"flux [{self.cube['flux'].attrs.get('units', '')}]"
        ui["image"].set_marker(y, x)

    def _redraw_table(self) -> None:
        if self._ui is None:
            return
        units = self.maps["flux"].attrs.get("units", "")
        rows, highlight = [], None
        for i, r in enumerate(self.line_table()):
            if r["line"] == self.line:
                highlight = i
            rows.append([constants.LINES[r["line"]].label,
                         f"{fmt(r['flux'])} ± {fmt(r['flux_err'], '.2g')}", fmt(r["snr"], ".1f"),
                         fmt(r["velocity"], ".0f"), fmt(r["sigma"], ".0f"),
                         "yes" if r["detected"] else "no"])
        header = ["line", f"flux [{units}]", "SNR", "v [km/s]", "σ [km/s]",
                  f"SNR > {self.snr_threshold:g}"]
        self._ui["table"].value = html_table(header, rows, highlight=highlight)

    def _redraw_all(self) -> None:
        self._redraw_map()
        self._redraw_spectrum()
        self._redraw_table()
        self._set_status()

    def _set_status(self) -> None:
        if self._ui is None:
            return  # nothing shown yet: no fit just for the status line
        entry = self._fit_entry(self.band)
        n_masked = int(self.masked_pixels().sum())
        ny, nx = self.shape
        self.status = (f"<small>{self.name} z = {self.redshift:g} · band {self.band} fitted in "
                       f"{entry['seconds']:.2f} s (smoothing {self.smooth_fwhm:g}\") · "
                       f"{n_masked}/{ny * nx} pixels masked (SNR ≤ {self.snr_threshold:g} or "
                       "failed fit)</small>")

    # ------------------------------------------------------------------ observers
    @traitlets.observe("line")
    def _on_line(self, change) -> None:
        self.last_refit_seconds = 0.0
        self._redraw_all()

    @traitlets.observe("quantity")
    def _on_quantity(self, change) -> None:
        self._redraw_map()

    @traitlets.observe("snr_threshold")
    def _on_snr(self, change) -> None:
        self.last_refit_seconds = 0.0
        self._redraw_map()
        self._redraw_table()
        self._set_status()

    @traitlets.observe("smooth_fwhm")
    def _on_smooth(self, change) -> None:
        self._redraw_all()

    @traitlets.observe("selected_spaxel")
    def _on_spaxel(self, change) -> None:
        self._redraw_spectrum()
        self._redraw_table()

    # ------------------------------------------------------------------ static twin
    def static_figure(self):
        """A matplotlib figure of what the widget shows (map, spectrum, per-line table)."""
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(11, 5.6))
        grid = fig.add_gridspec(2, 2, width_ratios=[1, 1.4], height_ratios=[3, 1.25])
        ax_map = fig.add_subplot(grid[0, 0])
        ax_spec = fig.add_subplot(grid[0, 1])
        ax_tab = fig.add_subplot(grid[1, :])
        image = self.map_image()
        if self.quantity == "velocity":
            lo, hi = finite_range(image, symmetric=True)
            cmap = DIVERGING[1]
        else:
            (lo, hi), cmap = finite_range(image), SEQUENTIAL[1]
        cmap_obj = plt.get_cmap(cmap).with_extremes(bad=MASKED_COLOUR)
        im = ax_map.imshow(image, origin="lower", cmap=cmap_obj, vmin=lo, vmax=hi,
                           interpolation="nearest")
        y, x = self.selected_spaxel
        ax_map.plot([x], [y], marker="s", mfc="none", mec="red", ms=10, mew=2)
        units = self.maps["flux"].attrs.get("units", "") if self.quantity == "flux" else ""
        ax_map.set_title(f"{constants.LINES[self.line].label} {_QUANTITY_LABEL[self.quantity]}",
                         fontsize=10)
        fig.colorbar(im, ax=ax_map, label=units)
        ax_map.set_xlabel("x [pix]")
        ax_map.set_ylabel("y [pix]")
        spec = self.spectrum
        wave = spec["wave"].values
        ax_spec.step(wave, spec["flux"].values, where="mid", color="k", lw=0.8, label="data")
        ax_spec.plot(wave, spec["noise"].values, color="0.55", lw=0.8, label="noise")
        ax_spec.plot(wave, spec["model"].values, color="#d62728", lw=1.6, label="model")
        ax_spec.fill_between(wave, 0, 1, where=spec["sky_mask"].values, step="mid",
                             transform=ax_spec.get_xaxis_transform(), color="#9ecae1",
                             alpha=0.5, label="OH sky mask")
        for centre in self.line_centres_um().values():
            if wave.min() <= centre <= wave.max():
                ax_spec.axvline(centre, color="#2ca02c", ls=":", lw=0.8)
        ax_spec.set_xlabel("observed wavelength [µm]")
        ax_spec.set_ylabel("flux")
        ax_spec.set_title(f"spaxel (y={y}, x={x}) · band {self.band}", fontsize=10)
        ax_spec.legend(fontsize=8, loc="upper right")
        ax_tab.axis("off")
        rows = [[constants.LINES[r["line"]].label, f"{fmt(r['flux'])} ± {fmt(r['flux_err'], '.2g')}",
                 fmt(r["snr"], ".1f"), fmt(r["velocity"], ".0f"), fmt(r["sigma"], ".0f"),
                 "yes" if r["detected"] else "no"] for r in self.line_table()]
        if rows:
            table = ax_tab.table(cellText=rows, colLabels=["line", "flux", "SNR", "v [km/s]",
                                                           "σ [km/s]", "detected"],
                                 loc="center", cellLoc="right")
            table.auto_set_font_size(False)
            table.set_fontsize(8)
        fig.suptitle(f"{self.name} z = {self.redshift:g}, smoothing {self.smooth_fwhm:g}\", "
                     f"SNR > {self.snr_threshold:g}", fontsize=11)
        fig.tight_layout()
        return fig

"""Image plane and source plane side by side: where each pixel lands, caustics, μ, source PSF.

A thin :class:`traitlets.HasTraits` over :mod:`klever_nb.lensing`: the source plane,
magnifications and source-plane PSF come from
:func:`~klever_nb.lensing.reconstruct_source_plane`, the image-plane surface brightness from
:func:`~klever_nb.lensing.rebin_to_lens_grid`, critical curves and caustics from
:func:`~klever_nb.lensing.critical_curves` / :func:`~klever_nb.lensing.caustics`, and the
image ↔ source lookup from :func:`~klever_nb.lensing.ray_lookup` (the reconstruction's own
rays, ``subsample``² per pixel) with :func:`~klever_nb.lensing.landing_pixel` and
:func:`~klever_nb.lensing.feeding_pixels`. Nothing is reconstructed before the explorer is
displayed or asked for a result. Code twins of the controls::

    ex = LensExplorer(line_maps, {"SIE": lens, "SIE, θE + 5%": alt}, redshift=1.4, ...)
    ex.select_image(40, 52)          # a click on the image plane: where does it land?
    ex.select_source(20, 31)         # a click on the source plane: which image pixels feed it?
    ex.source_pixel_arcsec = 0.1     # the source-pixel slider (reconstructs)
    ex.lens_model = "SIE, θE + 5%"   # the lens-model dropdown (reconstructs)

Rays follow the package's convention β = θ − α (DESIGN.md "Input files"); the selected
image pixel's rays are all drawn, and it selects the source pixel most of them land in.

References
----------
K20 §3.2.2–3.2.3, Fig. 4 (magnifications over lens models), Table 4 (source PSF).
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import traitlets
import xarray as xr

from klever_nb import constants
from klever_nb.errors import ConfigError
from klever_nb.widgets._common import (
    MASKED_COLOUR,
    SEQUENTIAL,
    ExplorerBase,
    ImageMap,
    ellipse_outline,
    finite_range,
    fmt,
    set_points,
)

CACHE_SIZE = 4


def _join_paths(paths: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate paths with NaN breaks (one bqplot Lines mark)."""
    if not paths:
        return np.array([np.nan]), np.array([np.nan])
    xs, ys = [], []
    for p in paths:
        xs += [p[:, 0], [np.nan]]
        ys += [p[:, 1], [np.nan]]
    return np.concatenate(xs), np.concatenate(ys)


class LensExplorer(ExplorerBase):
    """Image plane ↔ source plane explorer of one lensed galaxy.

    Parameters
    ----------
    line_maps : xarray.Dataset
        Image-plane line maps on ``(line, y, x)`` (:func:`klever_nb.fitting.fit_galaxy`).
    lenses : xarray.Dataset or mapping of name -> Dataset
        Lens maps (``alpha_x``, ``alpha_y``, optionally ``kappa``, ``gamma``); several
        models are alternatives: the first is the default and all feed the μ_maps spread.
    redshift : float
        Source redshift.
    cube_wcs : str
        Celestial WCS of the IFU maps (``cube.attrs["wcs"]``).
    psf_fwhm_arcsec : float
        Image-plane PSF FWHM.
    z_lens : float, optional
        Lens redshift (default ``attrs["z_lens"]`` of the lens maps).
    line : str
        Line shown (default Halpha).
    source_pixel_arcsec : float, optional
        Source pixel (default the lens pixel, K20 §3.2.3).
    reconstruct_kwargs : dict, optional
        Extra keywords for :func:`klever_nb.lensing.reconstruct_source_plane`
        (default ``forward_iterations=0``: the paper's back-projection only).

    Examples
    --------
    >>> from klever_nb import fitting, mock
    >>> galaxy = mock.make_mock(mock.demo_specs()[0])            # doctest: +SKIP
    >>> maps = fitting.fit_cube(galaxy.cubes["H"].to_dataset(), redshift=1.4)  # doctest: +SKIP
    >>> ex = LensExplorer(maps, galaxy.lens_maps, redshift=1.4,
    ...                   cube_wcs=galaxy.cubes["H"].attrs["wcs"],
    ...                   psf_fwhm_arcsec=0.55)                    # doctest: +SKIP
    >>> ex.select_image(54, 68); ex.selected_source_pixel         # doctest: +SKIP
    """

    line = traitlets.Unicode("Halpha")
    lens_model = traitlets.Unicode()
    source_pixel_arcsec = traitlets.Float(0.05, min=1e-4)
    #: (row, column) of the selected pixel of the image-plane panel (lens grid, cropped).
    selected_image_pixel = traitlets.Tuple(traitlets.Int(), traitlets.Int(), default_value=(0, 0))
    #: (row, column) of the selected source pixel; (-1, -1) when the image pixel lands outside.
    selected_source_pixel = traitlets.Tuple(traitlets.Int(), traitlets.Int(),
                                            default_value=(-1, -1))
    last_reconstruction_seconds = traitlets.Float(0.0)
    #: Pixels with SNR <= this are drawn grey on both panels (display only; K20 §3.2.3 uses 3).
    snr_min = traitlets.Float(constants.MAGNIFICATION_SNR, min=0.0)

    def __init__(self, line_maps: xr.Dataset, lenses: xr.Dataset | Mapping[str, xr.Dataset], *,
                 redshift: float, cube_wcs: str, psf_fwhm_arcsec: float,
                 z_lens: float | None = None, line: str = "Halpha",
                 source_pixel_arcsec: float | None = None,
                 reconstruct_kwargs: dict | None = None):
        super().__init__()
        if isinstance(lenses, xr.Dataset):
            lenses = {"lens model": lenses}
        if not lenses:
            raise ConfigError("LensExplorer: give at least one lens model")
        self.redshift = float(redshift)
        self.cube_wcs = cube_wcs
        self.psf_fwhm_arcsec = float(psf_fwhm_arcsec)
        self.line_maps = line_maps
        from klever_nb import lensing

        self._lenses = {str(k): lensing.lens_at_source(v, redshift=self.redshift, z_lens=z_lens)
                        for k, v in lenses.items()}
        self._kwargs = {"forward_iterations": 0, **(reconstruct_kwargs or {})}
        lines = [str(v) for v in line_maps["line"].values]
        if line not in lines:
            raise ConfigError(f"LensExplorer: line {line!r} not in the line maps "
                              f"({', '.join(lines)})")
        self._cache: OrderedDict[tuple[str, float], dict[str, Any]] = OrderedDict()
        self._ui: dict[str, Any] | None = None
        first = next(iter(self._lenses))
        pixel = source_pixel_arcsec or float(self._lenses[first].attrs["pixel_scale_arcsec"])
        with self.hold_trait_notifications():
            self.line = line
            self.lens_model = first
            self.source_pixel_arcsec = float(pixel)

    @traitlets.default("selected_image_pixel")
    def _brightest_image_pixel(self) -> tuple[int, int]:
        sb = self._entry()["image_sb"]
        peak = np.nanargmax(np.where(np.isfinite(sb), sb, -np.inf))
        return tuple(int(v) for v in np.unravel_index(peak, sb.shape))

    @traitlets.default("selected_source_pixel")
    def _landing_of_selected(self) -> tuple[int, int]:
        return self.image_to_source(*self.selected_image_pixel)

    # ------------------------------------------------------------------ reconstruction
    @property
    def lens_models(self) -> tuple[str, ...]:
        return tuple(self._lenses)

    def _entry(self) -> dict[str, Any]:
        from klever_nb import lensing

        key = (self.lens_model, round(float(self.source_pixel_arcsec), 6))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        t0 = time.perf_counter()
        lens = self._lenses[self.lens_model]
        alternatives = tuple(v for k, v in self._lenses.items() if k != self.lens_model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            source, summary = lensing.reconstruct_source_plane(
                self.line_maps, lens, redshift=self.redshift, cube_wcs=self.cube_wcs,
                psf_fwhm_arcsec=self.psf_fwhm_arcsec,
                source_pixel_arcsec=float(self.source_pixel_arcsec),
                alternative_lenses=alternatives, **self._kwargs)
        sb = lensing.rebin_to_lens_grid(self.line_maps, lens, cube_wcs=self.cube_wcs,
                                        shift_arcsec=tuple(summary.get("shift_arcsec", (0, 0))))
        # the reconstruction's own rays (subsample^2 per image pixel), beta = theta - alpha
        lookup = lensing.ray_lookup(source, lens, ly=sb["ly"].values, lx=sb["lx"].values)
        psf = lensing.annulus_psf(summary)
        psf["pa_deg_east_of_north"] = float(summary["source_psf_pa_deg_east_of_north"])
        critical = lensing.critical_curves(lens)
        entry = {"source": source, "summary": summary, "sb": sb, "lookup": lookup,
                 "theta_x": lookup["theta_x"].values, "theta_y": lookup["theta_y"].values,
                 "shape": (lookup.sizes["ly"], lookup.sizes["lx"]),
                 "psf": psf, "critical": critical,
                 "caustics": lensing.caustics(lens, critical),
                 "warnings": [str(w.message) for w in caught],
                 "seconds": time.perf_counter() - t0}
        entry["image_sb"] = self._image_values(entry)
        self._remember(self._cache, key, entry, CACHE_SIZE)
        self.last_reconstruction_seconds = entry["seconds"]
        return entry

    def _image_values(self, entry: dict[str, Any]) -> np.ndarray:
        return self._masked(entry["sb"])

    def _masked(self, maps: xr.Dataset) -> np.ndarray:
        flux = maps["flux"].sel(line=self.line).values
        if "snr" in maps:
            flux = np.where(maps["snr"].sel(line=self.line).values > self.snr_min, flux, np.nan)
        return flux

    def source_values(self) -> np.ndarray:
        """The source-plane image drawn: flux of ``line``, NaN where SNR <= ``snr_min``."""
        return self._masked(self.source)

    def _beta_to_kpc(self, bx, by) -> tuple[np.ndarray, np.ndarray]:
        from klever_nb import lensing

        return lensing.source_plane_kpc(self.source, bx, by)

    @property
    def source(self) -> xr.Dataset:
        """Source-plane maps of the current lens model and source pixel (package output)."""
        return self._entry()["source"]

    @property
    def summary(self) -> dict[str, Any]:
        """Magnifications and source-PSF fields of the current reconstruction (package output)."""
        return self._entry()["summary"]

    @property
    def source_psf(self) -> dict[str, Any]:
        """The reconstruction's source-plane PSF (``fwhm_major_kpc``, ``fwhm_minor_kpc``,
        ``theta_deg``, ``pa_deg_east_of_north``): :func:`klever_nb.lensing.annulus_psf` of
        the summary, the PSF the gradient annuli use."""
        return self._entry()["psf"]

    @property
    def rays(self) -> xr.Dataset:
        """:func:`klever_nb.lensing.ray_lookup` of the image panel's pixels (``beta_x``,
        ``beta_y``, ``source_index`` on ``(ly, lx, ray)``)."""
        return self._entry()["lookup"]

    def image_to_source(self, row: int, col: int) -> tuple[int, int]:
        """Source pixel (row, column) where most rays of image pixel (row, col) land;
        (-1, -1) if all land outside (:func:`klever_nb.lensing.landing_pixel`)."""
        from klever_nb import lensing

        return lensing.landing_pixel(self.rays, row, col)

    def source_to_image(self, row: int, col: int) -> np.ndarray:
        """(n, 2) rows and columns of the image pixels with a ray in source pixel (row, col),
        the pixels its value averages: one group per multiple image
        (:func:`klever_nb.lensing.feeding_pixels`)."""
        from klever_nb import lensing

        return lensing.feeding_pixels(self.rays, row, col)

    def select_image(self, row: int, col: int) -> None:
        """Select image-plane pixel (row, col) and the source pixel it lands in."""
        ny, nx = self._entry()["shape"]
        if not (0 <= row < ny and 0 <= col < nx):
            raise ConfigError(f"select_image({row}, {col}): outside the {ny}x{nx} image panel")
        with self.hold_trait_notifications():
            self.selected_image_pixel = (int(row), int(col))
            self.selected_source_pixel = self.image_to_source(int(row), int(col))

    def select_source(self, row: int, col: int) -> None:
        """Select source pixel (row, col) (the image pixels feeding it are highlighted)."""
        ny, nx = (int(self.rays.attrs[k]) for k in ("ny", "nx"))
        if not (0 <= row < ny and 0 <= col < nx):
            raise ConfigError(f"select_source({row}, {col}): outside the {ny}x{nx} "
                              "source grid")
        self.selected_source_pixel = (int(row), int(col))

    # ------------------------------------------------------------------ widget
    def _build_ui(self) -> None:
        import bqplot as bq
        import ipywidgets as w

        entry = self._entry()
        image = ImageMap(entry["shape"], title="image plane",
                         x_label="θx [arcsec]", y_label="θy [arcsec]", css_class="klever-image-plane",
                         x_coords=entry["theta_x"], y_coords=entry["theta_y"])
        source = ImageMap(self.source["flux"].sel(line=self.line).shape, title="source plane",
                          x_label="x [kpc]", y_label="y [kpc]", css_class="klever-source-plane",
                          x_coords=self.source["xs"].values, y_coords=self.source["ys"].values)
        critical = bq.Lines(x=[np.nan], y=[np.nan], scales=image.scales, colors=["#ff7f0e"],
                            stroke_width=1.5, labels=["critical curve"])
        feeding = bq.Scatter(x=[np.nan], y=[np.nan], scales=image.scales, colors=["#e377c2"],
                             marker="circle", default_size=30, labels=["feeds source pixel"])
        caustic = bq.Lines(x=[np.nan], y=[np.nan], scales=source.scales, colors=["#ff7f0e"],
                           stroke_width=1.5, labels=["caustic"])
        psf = bq.Lines(x=[np.nan], y=[np.nan], scales=source.scales, colors=["white"],
                       stroke_width=2, labels=["source-plane PSF (FWHM)"])
        landing = bq.Scatter(x=[np.nan], y=[np.nan], scales=source.scales, colors=["#e377c2"],
                             marker="cross", default_size=80, labels=["ray"])
        image.add_marks(critical, feeding)
        source.add_marks(caustic, psf, landing)
        image.on_click(self.select_image)
        source.on_click(self.select_source)
        model_dd = w.Dropdown(options=list(self._lenses), description="lens model",
                              style={"description_width": "initial"})
        lines = [str(v) for v in self.line_maps["line"].values]
        line_dd = w.Dropdown(options=[(constants.LINES[n].label if n in constants.LINES else n, n)
                                      for n in lines], description="line")
        pixel = w.FloatSlider(min=0.025, max=0.2, step=0.025, readout_format=".3f",
                              description="source pixel [\"]", continuous_update=False,
                              style={"description_width": "initial"})
        for control, trait in ((model_dd, "lens_model"), (line_dd, "line"),
                               (pixel, "source_pixel_arcsec")):
            traitlets.link((self, trait), (control, "value"))
        info = w.HTML()
        info.add_class("klever-lens-summary")
        box = w.VBox([w.HBox([model_dd, line_dd, pixel]),
                      w.HBox([image.figure, source.figure]), info])
        box.add_class("klever-lens")
        self._ui = {"box": box, "image": image, "source": source, "critical": critical,
                    "feeding": feeding, "caustic": caustic, "psf": psf, "landing": landing,
                    "info": info, "controls": {"lens_model": model_dd, "line": line_dd,
                                               "source_pixel": pixel}}
        self._redraw_all()

    @property
    def marks(self) -> dict[str, Any]:
        self.widget  # noqa: B018
        return {k: self._ui[k] for k in ("critical", "feeding", "caustic", "psf", "landing")}

    @property
    def panels(self) -> dict[str, ImageMap]:
        self.widget  # noqa: B018
        return {"image": self._ui["image"], "source": self._ui["source"]}

    def _psf_ellipse(self) -> tuple[np.ndarray, np.ndarray]:
        psf = self.source_psf
        return ellipse_outline(0.0, 0.0, psf["fwhm_major_kpc"] / 2, psf["fwhm_minor_kpc"] / 2,
                               np.radians(psf["theta_deg"]))

    def _redraw_all(self) -> None:
        if self._ui is None:
            return
        entry = self._entry()
        ui = self._ui
        img, src = ui["image"], ui["source"]
        img.set_grid(entry["shape"], x_coords=entry["theta_x"],
                     y_coords=entry["theta_y"])
        entry["image_sb"] = self._image_values(entry)
        img.set_image(entry["image_sb"], vrange=finite_range(entry["image_sb"]))
        source = entry["source"]
        src.set_grid(source["flux"].sel(line=self.line).shape, x_coords=source["xs"].values,
                     y_coords=source["ys"].values)
        values = self.source_values()
        src.set_image(values, vrange=finite_range(values))
        label = constants.LINES[self.line].label if self.line in constants.LINES else self.line
        img.figure.title = f"image plane: {label} (lens grid)"
        src.figure.title = f"source plane: {label} ({self.source_pixel_arcsec:g}\" pixels)"
        cx, cy = _join_paths(entry["critical"])
        with ui["critical"].hold_sync():
            ui["critical"].x, ui["critical"].y = cx, cy
        kx, ky = _join_paths([np.column_stack(self._beta_to_kpc(p[:, 0], p[:, 1]))
                              for p in entry["caustics"]])
        with ui["caustic"].hold_sync():
            ui["caustic"].x, ui["caustic"].y = kx, ky
        ex, ey = self._psf_ellipse()
        with ui["psf"].hold_sync():
            ui["psf"].x, ui["psf"].y = ex, ey
        self._redraw_selection()
        self._redraw_info()

    def _redraw_selection(self) -> None:
        if self._ui is None:
            return
        entry = self._entry()
        ui = self._ui
        row, col = self.selected_image_pixel
        ui["image"].set_marker(row, col)
        rays = entry["lookup"]
        bx, by = self._beta_to_kpc(rays["beta_x"].values[row, col], rays["beta_y"].values[row, col])
        set_points(ui["landing"], bx, by)
        srow, scol = self.selected_source_pixel
        if srow >= 0:
            ui["source"].set_marker(srow, scol)
            feeding = self.source_to_image(srow, scol)
            fx = entry["theta_x"][feeding[:, 1]] if feeding.size else [np.nan]
            fy = entry["theta_y"][feeding[:, 0]] if feeding.size else [np.nan]
        else:
            fx, fy = [np.nan], [np.nan]
        set_points(ui["feeding"], fx, fy)

    def _summary_html(self) -> str:
        s = self.summary
        psf = self.source_psf
        spread = s.get("mu_maps_spread", np.nan)
        rows = [
            ("μ(Hα) = image / source Hα flux (SNR > 3)",
             f"{fmt(s.get('mu_halpha'), '.2f')} ± {fmt(s.get('mu_halpha_err'), '.2f')}"),
            ("μ from κ, γ maps", f"{fmt(s.get('mu_maps'), '.2f')}"
             + (f" ± {fmt(spread, '.2f')} (spread over {len(self._lenses)} models)"
                if np.isfinite(spread) else "")),
            ("source PSF FWHM (major × minor)",
             f"{fmt(psf['fwhm_major_kpc'], '.2f')} × {fmt(psf['fwhm_minor_kpc'], '.2f')} kpc, "
             f"PA {fmt(psf['pa_deg_east_of_north'], '.0f')}° E of N "
             f"(θ {fmt(psf['theta_deg'], '.0f')}° on the source grid)"),
        ]
        srow, scol = self.selected_source_pixel
        if srow >= 0:
            n_img = len(self.source_to_image(srow, scol))
            rows.append(("selected source pixel", f"({srow}, {scol}): fed by {n_img} image "
                         "pixels"))
        html = "".join(f"<tr><td style='padding:2px 10px'>{k}</td><td><b>{v}</b></td></tr>"
                       for k, v in rows)
        warn = ""
        if s.get("near_critical"):
            warn = ("<div style='color:#b35900'>⚠ the galaxy touches a critical curve: "
                    "μ from the maps is unreliable there (max |μ| = "
                    f"{fmt(s.get('mu_maps_max_abs'), '.3g')})</div>")
        return (f"<table style='font-size:12px'>{html}</table>{warn}"
                f"<small>reconstructed in {self._entry()['seconds']:.2f} s</small>")

    def _redraw_info(self) -> None:
        if self._ui is not None:
            self._ui["info"].value = self._summary_html()

    @traitlets.observe("lens_model", "source_pixel_arcsec")
    def _on_reconstruct(self, change) -> None:
        if not self._lenses or not self.lens_model or not self._cache:
            return  # nothing shown or computed yet: the first access reconstructs
        entry = self._entry()
        ny, nx = entry["shape"]
        row, col = self.selected_image_pixel
        row, col = min(row, ny - 1), min(col, nx - 1)
        self.selected_image_pixel = (row, col)
        self.selected_source_pixel = self.image_to_source(row, col)
        self._redraw_all()

    @traitlets.observe("line", "snr_min")
    def _on_line(self, change) -> None:
        self._redraw_all()

    @traitlets.observe("selected_image_pixel", "selected_source_pixel")
    def _on_selection(self, change) -> None:
        self._redraw_selection()
        self._redraw_info()

    # ------------------------------------------------------------------ static twin
    def static_figure(self):
        """Matplotlib twin: image plane with critical curves, source plane with caustics and
        the PSF ellipse, the selected pixel and where it lands, magnifications in the title."""
        import matplotlib.pyplot as plt

        entry = self._entry()
        fig, (ax_i, ax_s) = plt.subplots(1, 2, figsize=(11, 4.8))
        tx, ty = entry["theta_x"], entry["theta_y"]
        img = entry["image_sb"]
        cmap = plt.get_cmap(SEQUENTIAL[1]).with_extremes(bad=MASKED_COLOUR)
        lo, hi = finite_range(img)
        dx, dy = tx[1] - tx[0], ty[1] - ty[0]
        ax_i.imshow(img, origin="lower", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest",
                    extent=[tx[0] - dx / 2, tx[-1] + dx / 2, ty[0] - dy / 2, ty[-1] + dy / 2])
        for p in entry["critical"]:
            ax_i.plot(p[:, 0], p[:, 1], color="#ff7f0e", lw=1)
        ax_i.set_xlim(tx[0] - dx / 2, tx[-1] + dx / 2)
        ax_i.set_ylim(ty[0] - dy / 2, ty[-1] + dy / 2)
        row, col = self.selected_image_pixel
        ax_i.plot(tx[col], ty[row], "s", mfc="none", mec="red", ms=9, mew=2)
        ax_i.set_xlabel("θx [arcsec]")
        ax_i.set_ylabel("θy [arcsec]")
        ax_i.set_title("image plane (critical curves orange)", fontsize=10)
        source = entry["source"]
        xs, ys = source["xs"].values, source["ys"].values
        vals = self.source_values()
        lo, hi = finite_range(vals)
        sx, sy = xs[1] - xs[0], ys[1] - ys[0]
        ax_s.imshow(vals, origin="lower", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest",
                    extent=[xs[0] - sx / 2, xs[-1] + sx / 2, ys[0] - sy / 2, ys[-1] + sy / 2])
        for p in entry["caustics"]:
            kx, ky = self._beta_to_kpc(p[:, 0], p[:, 1])
            ax_s.plot(kx, ky, color="#ff7f0e", lw=1)
        ex, ey = self._psf_ellipse()
        ax_s.plot(ex, ey, color="k", lw=1.5)
        rays = entry["lookup"]
        bx, by = self._beta_to_kpc(rays["beta_x"].values[row, col], rays["beta_y"].values[row, col])
        ax_s.plot(bx, by, "x", color="#e377c2", ms=10, mew=2)
        ax_s.set_xlim(xs[0] - sx / 2, xs[-1] + sx / 2)
        ax_s.set_ylim(ys[0] - sy / 2, ys[-1] + sy / 2)
        ax_s.set_xlabel("x [kpc]")
        ax_s.set_ylabel("y [kpc]")
        ax_s.set_title("source plane (caustics orange, PSF ellipse black)", fontsize=10)
        s = self.summary
        fig.suptitle(f"{self.lens_model}: μ(Hα) = {fmt(s.get('mu_halpha'), '.2f')} ± "
                     f"{fmt(s.get('mu_halpha_err'), '.2f')}, μ_maps = "
                     f"{fmt(s.get('mu_maps'), '.2f')} ± {fmt(s.get('mu_maps_spread'), '.2f')}",
                     fontsize=11)
        fig.tight_layout()
        return fig

"""Shared pieces of the widgets: bqplot image maps, the static fallback, small formatters.

Widgets here hold no science: they call :mod:`klever_nb` stages and only draw.
Every widget is a :class:`traitlets.HasTraits` whose traits are the state a user
changes with a control; the controls are linked to the traits, so a test (or a
script) sets the trait and gets exactly what a click would give (STYLE.md
lessons 9-10, the jdaviz "code twin" lesson).

When no widget front end renders the output (nbconvert, GitHub, a headless
nbclient run without a widget manager) the ``image/png`` of
:meth:`ExplorerBase.static_figure` sits in the same output bundle, so the
notebook still shows a figure (PITFALLS.md feature 8, pitfall 10).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import traitlets

#: Colormaps (matplotlib names) of sequential maps and of velocity maps (blue approaching).
SEQUENTIAL = ("viridis", "viridis")
DIVERGING = ("RdBu_r", "RdBu_r")
#: Colour of masked (NaN) pixels on every map.
MASKED_COLOUR = "#d9d9d9"

WIDGET_VIEW_MIME = "application/vnd.jupyter.widget-view+json"


def finite_range(values: np.ndarray, *, symmetric: bool = False,
                 percentiles: tuple[float, float] = (1.0, 99.0)) -> tuple[float, float]:
    """Robust display range of the finite values (a fixed fallback when there are none)."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return (-1.0, 1.0) if symmetric else (0.0, 1.0)
    lo, hi = np.percentile(finite, percentiles)
    if symmetric:
        half = max(abs(lo), abs(hi), 1e-12)
        return -float(half), float(half)
    if not hi > lo:
        hi = lo + (abs(lo) if lo != 0 else 1.0)
    return float(lo), float(hi)


def pixel_edges(n: int) -> np.ndarray:
    """Edges -0.5 ... n - 0.5 of n pixels centred on their 0-based indices."""
    return np.arange(n + 1, dtype=float) - 0.5


def colormap_hex(name: str, n: int = 11) -> list[str]:
    """``n`` hex colours sampled along a matplotlib colormap (for bqplot colour bars)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps[name]
    return [to_hex(cmap(v)) for v in np.linspace(0.0, 1.0, n)]


def image_png(image: np.ndarray, *, vmin: float, vmax: float, cmap: str,
              bad: str = MASKED_COLOUR) -> bytes:
    """PNG bytes of a 2-D array drawn with a matplotlib colormap, origin lower, NaN = ``bad``."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    rgba = colormaps[cmap].with_extremes(bad=bad)(Normalize(vmin, vmax)(np.ma.masked_invalid(
        np.asarray(image, dtype=float))), bytes=True)
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.fromarray(np.ascontiguousarray(rgba[::-1])).save(buf, format="png")
    return buf.getvalue()


def _regular_centres(values: np.ndarray | None, n: int) -> np.ndarray:
    if values is None:
        return np.arange(n, dtype=float)
    values = np.asarray(values, dtype=float)
    if values.size != n:
        raise ValueError(f"{values.size} coordinates for {n} pixels")
    return values


class ImageMap:
    """A bqplot image with origin lower, a colour bar, a pixel marker and overlay marks.

    The image is drawn in Python with the same matplotlib colormap as the static
    figure (masked/NaN pixels grey) and shown by a bqplot ``Image`` mark. Axes are in
    the units of ``x_coords``/``y_coords`` (regular, increasing pixel centres; default
    0-based pixel indices). ``on_click(callback)`` calls ``callback(row, column)`` with
    the clicked pixel's indices; :meth:`set_marker` draws a pixel; :meth:`add_marks`
    puts overlays (curves, points) on the same scales.
    """

    def __init__(self, shape: tuple[int, int], *, title: str = "", width: str = "430px",
                 height: str = "400px", x_label: str = "x [pix]", y_label: str = "y [pix]",
                 css_class: str | None = None, x_coords=None, y_coords=None):
        import bqplot as bq
        import ipywidgets as w

        self.cmap = SEQUENTIAL[1]
        self.vrange = (0.0, 1.0)
        self.scale_x = bq.LinearScale()
        self.scale_y = bq.LinearScale()
        self.scales = {"x": self.scale_x, "y": self.scale_y}
        self.scale_c = bq.ColorScale(colors=colormap_hex(self.cmap), min=0.0, max=1.0)
        self.png = w.Image(format="png", value=b"")
        self.mark = bq.Image(image=self.png, scales=self.scales, pixelated=True)
        self.marker = bq.Scatter(x=[0.0], y=[0.0], scales=self.scales, marker="square",
                                 colors=["red"], stroke="red", fill=False, default_size=120,
                                 stroke_width=2.5)
        axis_x = bq.Axis(scale=self.scale_x, label=x_label)
        axis_y = bq.Axis(scale=self.scale_y, side="left", label=y_label)
        self.colour_axis = bq.ColorAxis(scale=self.scale_c, side="right", label_offset="45px")
        self.figure = bq.Figure(
            marks=[self.mark, self.marker], axes=[axis_x, axis_y, self.colour_axis],
            title=title, padding_x=0, padding_y=0,
            fig_margin={"top": 40, "bottom": 45, "left": 55, "right": 80},
            layout={"width": width, "height": height})
        if css_class:
            self.figure.add_class(css_class)
        self._callbacks: list[Callable[[int, int], None]] = []
        self.mark.on_element_click(self._on_click)
        self.set_grid(shape, x_coords=x_coords, y_coords=y_coords)

    def set_grid(self, shape: tuple[int, int], *, x_coords=None, y_coords=None) -> None:
        """Set the pixel grid (shape and pixel-centre coordinates) of the image."""
        ny, nx = (int(v) for v in shape)
        self.shape = (ny, nx)
        self.x_coords = _regular_centres(x_coords, nx)
        self.y_coords = _regular_centres(y_coords, ny)
        self.dx = float(self.x_coords[1] - self.x_coords[0]) if nx > 1 else 1.0
        self.dy = float(self.y_coords[1] - self.y_coords[0]) if ny > 1 else 1.0
        x_lo, x_hi = self.x_coords[0] - self.dx / 2, self.x_coords[-1] + self.dx / 2
        y_lo, y_hi = self.y_coords[0] - self.dy / 2, self.y_coords[-1] + self.dy / 2
        self.image = np.full((ny, nx), np.nan)
        with self.figure.hold_sync():
            self.scale_x.min, self.scale_x.max = float(x_lo), float(x_hi)
            self.scale_y.min, self.scale_y.max = float(y_lo), float(y_hi)
            self.mark.x = [float(x_lo), float(x_hi)]
            self.mark.y = [float(y_lo), float(y_hi)]

    def add_marks(self, *marks) -> None:
        """Draw extra marks (made with ``scales=self.scales``) over the image."""
        self.figure.marks = [*self.figure.marks, *marks]

    def _on_click(self, _mark, content) -> None:
        data = content.get("data", {}) if isinstance(content, dict) else {}
        if "click_x" not in data or "click_y" not in data:
            return
        self.click(float(data["click_y"]), float(data["click_x"]))

    def index_of(self, y: float, x: float) -> tuple[int, int]:
        """(row, column) of the pixel containing data coordinates (y, x)."""
        return (int(np.floor((y - self.y_coords[0]) / self.dy + 0.5)),
                int(np.floor((x - self.x_coords[0]) / self.dx + 0.5)))

    def click(self, y: float, x: float) -> None:
        """What a click at data coordinates (y, x) does: select the pixel under it."""
        row, col = self.index_of(y, x)
        ny, nx = self.shape
        if 0 <= row < ny and 0 <= col < nx:
            for callback in self._callbacks:
                callback(row, col)

    def on_click(self, callback: Callable[[int, int], None]) -> None:
        """Call ``callback(row, column)`` when a pixel is clicked in the browser."""
        self._callbacks.append(callback)

    def set_image(self, image: np.ndarray, *, vrange: tuple[float, float] | None = None,
                  cmap: str | None = None) -> None:
        """Show ``image`` (ny, nx) on the current grid; NaN pixels are drawn grey (masked)."""
        import ipywidgets as w

        image = np.asarray(image, dtype=float)
        if image.shape != self.shape:
            raise ValueError(f"image of shape {image.shape} on a {self.shape} grid")
        self.image = image
        self.vrange = vrange if vrange is not None else finite_range(self.image)
        if cmap is not None:
            self.cmap = cmap
        with self.figure.hold_sync():
            self.scale_c.colors = colormap_hex(self.cmap)
            self.scale_c.min, self.scale_c.max = self.vrange
            # bqplot's Image view redraws when the mark's ``image`` widget is replaced, not
            # when that widget's value changes: swap in a new one and close the old one.
            old = self.png
            self.png = w.Image(format="png", value=image_png(
                self.image, vmin=self.vrange[0], vmax=self.vrange[1], cmap=self.cmap))
            self.mark.image = self.png
            old.close()

    def set_marker(self, row: int, col: int) -> None:
        """Draw the marker on pixel (row, column)."""
        with self.marker.hold_sync():
            self.marker.x = [float(self.x_coords[col])]
            self.marker.y = [float(self.y_coords[row])]


def figure_png(fig) -> bytes:
    """PNG bytes of a matplotlib figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return buf.getvalue()


class ExplorerBase(traitlets.HasTraits):
    """Base of the explorers: a ``.widget`` to display and a ``.static_figure()`` fallback.

    Displaying the explorer (last expression of a cell, or ``display(explorer)``)
    sends a bundle holding both the live widget view and a PNG of the static
    figure; a front end with a widget manager shows the widget, any other shows
    the PNG.
    """

    #: Text shown under the controls: what the last action did (and how long it took).
    status = traitlets.Unicode("")

    _ui: dict | None = None
    #: Key of the main map panel in ``_ui`` (see :attr:`image_map`).
    _main_map = "image"

    @property
    def widget(self):
        """The ipywidgets container (built on first use by the subclass's ``_build_ui``).

        Every explorer ends on an export row (a file name and a "save" button calling
        :meth:`savefig`), added here once for all of them.
        """
        if self._ui is None:
            self._build_ui()
            box = self._ui["box"]
            export = self._export_row()
            box.children = (*box.children, export)
            self._ui["export"] = export
        return self._ui["box"]

    #: Default file name of the export row (its extension picks PNG or PDF).
    export_name = traitlets.Unicode("")

    def savefig(self, path, *, dpi: int = 150):
        """Save the current view (the :meth:`static_figure`, same content) as PNG or PDF.

        The format follows the extension of ``path`` (``.png`` or ``.pdf``); the
        bqplot view is not screenshotted (bqplot#963): matplotlib draws the same state.
        Returns the path written.
        """
        from pathlib import Path

        import matplotlib.pyplot as plt

        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".png", ".pdf"):
            raise ValueError(f"{path}: savefig writes .png or .pdf, not {suffix or 'no suffix'!r}")
        fig = self.static_figure()
        try:
            fig.savefig(path, format=suffix[1:], dpi=dpi, bbox_inches="tight")
        finally:
            plt.close(fig)
        return path

    def _export_row(self):
        import ipywidgets as w

        default = self.export_name or f"{type(self).__name__.lower()}.png"
        name = w.Text(value=default, description="save as", tooltip="a .png or .pdf file name",
                      layout={"width": "300px"})
        button = w.Button(description="Save figure", icon="download",
                          tooltip="save the current view as PNG/PDF (matplotlib)",
                          layout={"width": "130px"})
        message = w.HTML("")

        def on_click(_):
            try:
                written = self.savefig(name.value)
                message.value = f"saved <code>{written}</code>"
            except (ValueError, OSError) as err:
                message.value = f"<span style='color:#b00'>{err}</span>"

        button.on_click(on_click)
        row = w.HBox([name, button, message])
        row.add_class("klever-export")
        return row

    def _build_ui(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def static_figure(self):  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def image_map(self) -> ImageMap:
        """The main map panel (``.image`` holds the array drawn, ``.click(y, x)`` clicks it)."""
        self.widget  # noqa: B018
        return self._ui[self._main_map]

    @property
    def controls(self) -> dict[str, Any]:
        """The ipywidgets controls by name (building the widget on first use)."""
        self.widget  # noqa: B018
        return dict(self._ui["controls"])

    @staticmethod
    def _remember(cache, key, entry: dict, size: int) -> dict:
        """Store ``entry`` in an ordered ``cache`` keeping at most ``size`` entries (LRU)."""
        cache[key] = entry
        while len(cache) > size:
            cache.popitem(last=False)
        return entry

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict[str, Any]:
        import matplotlib.pyplot as plt

        bundle = dict(self.widget._repr_mimebundle_(include=include, exclude=exclude) or {})
        fig = self.static_figure()
        try:
            bundle["image/png"] = base64.b64encode(figure_png(fig)).decode("ascii")
        finally:
            plt.close(fig)
        bundle.setdefault("text/plain", f"<{type(self).__name__}>")
        return bundle


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *,
               highlight: int | None = None) -> str:
    """A small HTML table (ipywidgets.HTML value); row ``highlight`` in bold."""
    head = "".join(f"<th style='padding:2px 8px;text-align:right'>{h}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        style = "font-weight:bold;background:#fff3c4" if i == highlight else ""
        cells = "".join(f"<td style='padding:2px 8px;text-align:right'>{c}</td>" for c in row)
        body.append(f"<tr style='{style}'>{cells}</tr>")
    return ("<table class='klever-table' style='border-collapse:collapse;font-size:12px'>"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def fmt(value: float, spec: str = ".3g") -> str:
    """Format a number; NaN as an em dash."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "—" if not np.isfinite(value) else format(value, spec)


def ellipse_outline(xc: float, yc: float, a: float, b: float, theta_rad: float, n: int = 73
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points (x, y) around an ellipse: semi-axes ``a``, ``b``, the ``a`` axis at
    ``theta_rad`` counter-clockwise from +x (the source-grid frame of the PSF's ``theta_deg``
    and of the photutils apertures)."""
    t = np.linspace(0.0, 2.0 * np.pi, n)
    u, v = a * np.cos(t), b * np.sin(t)
    c, s = np.cos(theta_rad), np.sin(theta_rad)
    return xc + u * c - v * s, yc + u * s + v * c


def set_points(mark, x, y) -> None:
    """Put the finite (x, y) pairs on a bqplot Scatter; hide it when there is none.

    (bqplot draws a NaN point in the top-left corner of the figure.)
    """
    x = np.atleast_1d(np.asarray(x, dtype=float))
    y = np.atleast_1d(np.asarray(y, dtype=float))
    ok = np.isfinite(x) & np.isfinite(y)
    with mark.hold_sync():
        if ok.any():
            mark.x, mark.y = x[ok], y[ok]
            mark.visible = True
        else:
            mark.visible = False

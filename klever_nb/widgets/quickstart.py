"""The quickstart's one control: the annulus step of the K20 Fig. 7 panel of the demo galaxy.

A thin explorer over :func:`klever_nb.demo.gradient_panel` (science in the package):
a slider sets the annulus step in units of the source-plane PSF, the panel (maps,
profile, fits, the mock's truth) and the sentence computed from the numbers follow.
"""

from __future__ import annotations

from typing import Any

import traitlets

from klever_nb import demo as demo_module
from klever_nb.widgets._common import ExplorerBase


class QuickstartPanel(ExplorerBase):
    """K20 Fig. 7 panel of a cached demo galaxy with one control (the annulus step).

    Parameters
    ----------
    demo : klever_nb.demo.DemoGalaxy
    step_fraction : float
        Annulus width in units of the source-plane PSF size (K20: 0.5).
    """

    step_fraction = traitlets.Float(0.5)

    def __init__(self, demo: demo_module.DemoGalaxy, *, step_fraction: float = 0.5):
        super().__init__(step_fraction=step_fraction)
        self.demo = demo
        self.export_name = "quickstart_fig7.png"
        self._numbers: dict[str, Any] | None = None

    @property
    def numbers(self) -> dict[str, Any]:
        """Paper-method, forward-model and true gradients (and μ) at the current step."""
        if self._numbers is None or self._numbers["step_fraction"] != self.step_fraction:
            _, self._numbers = demo_module.gradient_numbers(self.demo, self.step_fraction)
        return self._numbers

    @property
    def verdict(self) -> str:
        """How close the measurement is to the truth, and why (from :attr:`numbers`)."""
        return demo_module.verdict(self.numbers)

    def static_figure(self):
        fig, self._numbers = demo_module.gradient_panel(self.demo, self.step_fraction)
        return fig

    def _build_ui(self) -> None:
        import ipywidgets as w

        slider = w.FloatSlider(value=self.step_fraction, min=0.25, max=1.0, step=0.05,
                               description="annulus step (× PSF)", continuous_update=False,
                               readout_format=".2f", style={"description_width": "initial"},
                               layout={"width": "420px"})
        w.link((slider, "value"), (self, "step_fraction"))
        out = w.Output(layout={"min_height": "330px"})
        text = w.HTML(layout={"max_width": "1100px"})
        box = w.VBox([slider, out, text])
        box.add_class("klever-quickstart")
        self._ui = {"box": box, "out": out, "text": text, "controls": {"step": slider}}
        self._redraw()
        self.observe(lambda _change: self._redraw(), names="step_fraction")

    def _redraw(self) -> None:
        import matplotlib.pyplot as plt
        from IPython.display import Image, display

        from klever_nb.widgets._common import figure_png

        out, text = self._ui["out"], self._ui["text"]
        fig = self.static_figure()
        try:  # a PNG, whatever the matplotlib backend (Agg shows only "<Figure ...>")
            png = figure_png(fig)
        finally:
            plt.close(fig)
        with out:
            out.clear_output(wait=True)
            display(Image(data=png, format="png"))
        text.value = f"<p style='line-height:1.4'>{self.verdict}</p>"

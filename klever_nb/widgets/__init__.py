"""Notebook widgets: thin traitlets classes over the package (STYLE.md lesson 9).

Each explorer keeps its state in traits that the controls are linked to, so
scripts and tests drive it exactly as a click does, and ``.static_figure()``
gives the same view as a matplotlib figure (the fallback without a front end).
"""

from klever_nb.widgets.gradients import GradientExplorer
from klever_nb.widgets.lens import LensExplorer
from klever_nb.widgets.linefit import LineFitExplorer
from klever_nb.widgets.metallicity import MetallicityExplorer
from klever_nb.widgets.quickstart import QuickstartPanel

__all__ = ["GradientExplorer", "LensExplorer", "LineFitExplorer", "MetallicityExplorer",
           "QuickstartPanel"]

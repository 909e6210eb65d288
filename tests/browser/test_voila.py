"""Voila in Chromium: explorer.ipynb renders as a dashboard and a click updates the spectrum."""

from __future__ import annotations

import importlib.util

import pytest
from test_lab import (
    MAP_IMAGE,
    SPEC_TITLE,
    assert_clicked_spaxel_drawn,
    assert_no_widget_errors,
    spectrum_title,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("klever_nb.spectra") is None,
                       reason="explorer.ipynb needs klever_nb.spectra (not in the tree yet)"),
]


def test_voila_explorer_renders_and_a_click_updates_the_spectrum(voila_server, page,
                                                                 artifact_dir):
    page.goto(voila_server)  # voila executes the notebook itself on page load
    page.locator(MAP_IMAGE).first.wait_for(state="visible", timeout=120_000)
    page.locator(SPEC_TITLE).first.wait_for(timeout=30_000)
    first = spectrum_title(page)
    assert "spaxel (y=" in first
    assert_clicked_spaxel_drawn(page, 5, 16)
    assert "y=5, x=16" in spectrum_title(page)
    assert_no_widget_errors(page)
    page.screenshot(path=str(artifact_dir / "voila_explorer.png"), full_page=True)

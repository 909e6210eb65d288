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


@pytest.mark.parametrize("size", [(1366, 768), (1920, 1080)], ids=["1366x768", "1920x1080"])
def test_voila_explorer_renders_and_a_click_updates_the_spectrum(voila_server, page,
                                                                 artifact_dir, size):
    import re

    page.set_viewport_size({"width": size[0], "height": size[1]})
    harmless = re.compile(r"ERR_NAME_NOT_RESOLVED|ERR_INTERNET_DISCONNECTED|cdn\.jsdelivr|"
                          r"Failed to load resource: net::|favicon", re.I)
    errors = []
    page.on("console", lambda m: m.type == "error" and not harmless.search(m.text)
            and errors.append(m.text))
    page.goto(voila_server)  # voila executes the notebook itself on page load
    page.locator(MAP_IMAGE).first.wait_for(state="visible", timeout=120_000)
    page.locator(SPEC_TITLE).first.wait_for(timeout=30_000)
    first = spectrum_title(page)
    assert "spaxel (y=" in first
    assert_clicked_spaxel_drawn(page, 5, 16)
    assert "y=5, x=16" in spectrum_title(page)
    assert_no_widget_errors(page)
    # the clicked map and the answering spectrum are on screen together, without scrolling
    for sel in (".klever-map", ".klever-spectrum"):
        box = page.locator(sel).first.bounding_box()
        assert box and box["x"] + box["width"] <= size[0] + 1, (sel, box)
    page.screenshot(path=str(artifact_dir / f"voila_explorer_{size[0]}x{size[1]}.png"))
    # bqplot draws a hidden axis before its figure has a height: 'translate(x,undefined)'
    # (issue 17, not fixed yet); every other console error fails the test
    known = re.compile(r"attribute transform: Trailing garbage, \"translate\(\d+,undefined\)")
    unknown = [text for text in errors if not known.search(text)]
    print(f"voila {size}: {len(errors)} console errors, {len(errors) - len(unknown)} of them "
          "the known bqplot 'translate(x,undefined)'")
    assert not unknown, unknown[:10]

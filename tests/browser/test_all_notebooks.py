"""Every notebook in JupyterLab (Chromium, 1366x768): Run All, widgets render, one control
changes the linked view, zero console errors; a screenshot of each under ``artifacts/lab/``.

The interaction is generic and chosen per notebook (``INTERACTIONS``): a slider handle moved
with the keyboard, or a check box clicked; the test then waits until some drawn view (a bqplot
image or line, or a matplotlib ``<img>`` in an Output) differs from before. Static notebooks
(05, the workshop solutions) are checked for rendered figures only.
"""

from __future__ import annotations

import importlib.util
import re

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

#: Notebooks whose bqplot figures log 'translate(x,undefined)' console errors (a hidden axis
#: drawn before its figure has a height; issue 17): everything else in their test passes, the
#: zero-console-error check does not yet. Kept visible as XFAIL until fixed.
BQPLOT_CONSOLE_ERRORS = {"01_line_fitting.ipynb", "02_lens_reconstruction.ipynb",
                         "04_gradients_and_2d_maps.ipynb"}

VIEWPORT = {"width": 1366, "height": 768}
#: Console messages that are the offline sandbox, not the notebooks (recipe pitfall 7).
HARMLESS = re.compile(r"ERR_NAME_NOT_RESOLVED|ERR_INTERNET_DISCONNECTED|cdn\.jsdelivr|"
                      r"Failed to load resource: net::|favicon", re.I)

#: notebook -> (CSS selector of the control, how to touch it) or None (static notebook)
INTERACTIONS = {
    "00_quickstart.ipynb": (".klever-quickstart .widget-slider .noUi-handle", "arrow"),
    "01_line_fitting.ipynb": (".klever-linefit .widget-slider .noUi-handle", "arrow"),
    "02_lens_reconstruction.ipynb": (".widget-slider .noUi-handle", "arrow"),
    "03_metallicity_mcmc.ipynb": (".widget-checkbox input", "click"),
    "04_gradients_and_2d_maps.ipynb": (".widget-slider .noUi-handle", "arrow"),
    "05_sample_figures.ipynb": None,
    "workshop/solutions/01_fit_a_line_by_hand.ipynb": None,
    "workshop/solutions/02_posterior_by_hand.ipynb": None,
    "workshop/solutions/03_gradient_and_beam_smearing.ipynb": None,
}

#: A fingerprint of every drawn view: bqplot images/lines/dots and matplotlib PNG outputs.
VIEWS_JS = """() => [
  ...Array.from(document.querySelectorAll('.bqplot image')).map(e => e.getAttribute('href')),
  ...Array.from(document.querySelectorAll('.bqplot path.line')).map(e => e.getAttribute('d')),
  ...Array.from(document.querySelectorAll('.jp-OutputArea-output img'))
      .map(e => e.getAttribute('src').slice(-200)),
].join('|')"""


def _run_all(page, base: str, token: str, name: str) -> None:
    page.goto(f"{base}/lab/tree/{name}?token={token}&reset")
    page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(timeout=60_000)
    page.locator("#jp-main-statusbar >> text=Idle").first.wait_for(timeout=60_000)
    page.locator(".lm-MenuBar-item", has_text="Run").first.click()
    page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click()
    # every code cell has an execution count once Run All is done
    page.wait_for_function(
        "() => { const p = Array.from(document.querySelectorAll("
        "'.jp-CodeCell .jp-InputPrompt')).map(e => e.textContent.trim());"
        " return p.length > 0 && p.every(t => /\\[\\d+\\]/.test(t)); }", timeout=180_000)
    page.locator("#jp-main-statusbar >> text=Idle").first.wait_for(timeout=120_000)


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.xfail(
        strict=False, reason="bqplot logs 'translate(x,undefined)' console errors (issue 17)"))
    if name in BQPLOT_CONSOLE_ERRORS else name for name in sorted(INTERACTIONS)])
def test_notebook_runs_renders_and_answers_in_lab(name, lab_server, browser, artifact_dir,
                                                  request):
    if name.startswith("01") and importlib.util.find_spec("klever_nb.spectra") is None:
        pytest.skip("notebook 01 needs klever_nb.spectra")
    base, token = lab_server
    ctx = browser.new_context(viewport=VIEWPORT)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("console", lambda m: m.type == "error" and not HARMLESS.search(m.text)
            and errors.append(m.text))
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    shots = artifact_dir / "lab"
    shots.mkdir(parents=True, exist_ok=True)
    stem = name.replace("/", "__").removesuffix(".ipynb")
    try:
        _run_all(page, base, token, name)
        body = page.locator(".jp-NotebookPanel").first.inner_text()
        assert not re.search(r"model not found|Error displaying widget|Traceback", body), \
            body[:3000]
        action = INTERACTIONS[name]
        if action is None:
            assert page.locator(".jp-OutputArea-output img").count() >= 1, "no figure drawn"
        else:
            selector, how = action
            control = page.locator(f".jp-OutputArea-output {selector}").first
            control.wait_for(state="visible", timeout=60_000)
            control.scroll_into_view_if_needed()
            page.wait_for_timeout(500)
            before = page.evaluate(VIEWS_JS)
            if how == "arrow":
                control.focus()
                page.keyboard.press("ArrowRight")
            else:
                control.click()
            page.wait_for_function(f"b => ({VIEWS_JS})() !== b", arg=before, timeout=60_000)
            page.locator("#jp-main-statusbar >> text=Idle").first.wait_for(timeout=60_000)
            page.wait_for_timeout(800)
        page.screenshot(path=str(shots / f"{stem}.png"))
        print(f"{name}: {len(errors)} console errors")
        assert not errors, errors[:10]
    except Exception:
        page.screenshot(path=str(shots / f"FAILED-{stem}.png"), full_page=True)
        raise
    finally:
        ctx.close()

"""Every notebook runs top to bottom headless (nbclient), within its time and memory budget.

The kernel is ``python3`` with ``store_widget_state=True``: the saved widget state
must hold the bqplot models each notebook promises (the Python-side wiring; the
browser tests in ``tests/browser/`` check what gets rendered). The checked-in
notebooks must equal what ``notebooks/build_notebooks.py`` writes (outputs stripped).

Memory (issue 17, Binder gives 2 GB): a thread samples the RSS of the kernel process
and of its children (psutil) while the notebook runs; each notebook must stay under
``RSS_LIMIT_MB``. Notebooks 00 -> 04 run **in sequence with their kernels kept alive**,
as a student clicking through them in one JupyterLab session would: the sum of the live
kernels must stay under ``SESSION_LIMIT_MB``. The numbers go to
``artifacts/notebook_memory.json``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
ART = Path(os.environ.get("ARTIFACT_DIR", ROOT / "artifacts"))
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
#: Wall-clock budget per notebook (DESIGN.md: under a minute on two cores), with CI margin.
BUDGET_S = 90
#: Peak memory of one notebook's kernel (and its children), issue 17.
RSS_LIMIT_MB = 600
#: Notebooks 00-04 open at once in one session (Binder: 2 GB for everything).
SESSION_LIMIT_MB = 2000
#: Wall-clock budget of the quickstart once the demo galaxy is cached (issue 17).
QUICKSTART_BUDGET_S = 15
#: The Binder scenario: a student opens these one after the other.
SESSION = ("00_quickstart.ipynb", "01_line_fitting.ipynb", "02_lens_reconstruction.ipynb",
           "03_metallicity_mcmc.ipynb", "04_gradients_and_2d_maps.ipynb")

#: notebook -> (modules it needs, widget models its state must hold, extra check cell)
CASES = {
    "00_quickstart.ipynb": (
        ("klever_nb.pipeline",),
        {"FloatSliderModel", "OutputModel", "HTMLModel", "ButtonModel"},
        "before = panel.verdict\n"
        "panel.step_fraction = 0.3   # the slider's code twin\n"
        "assert panel.numbers['step_fraction'] == 0.3 and panel.verdict != before\n"
        "assert 'beam smearing' in before and 'forward model' in before\n"
        "import os; assert os.path.getsize('quickstart_fig7.png') > 10_000\n"
        "print('ok-check')",
    ),
    "01_line_fitting.ipynb": (
        ("klever_nb.fitting", "klever_nb.spectra"),
        {"FigureModel", "ImageModel", "LinesModel", "ScatterModel", "FloatSliderModel",
         "DropdownModel", "ToggleButtonsModel"},
        "explorer.select(5, 7)\n"
        "assert explorer.spectrum.attrs['y'] == 5 and explorer.spectrum.attrs['x'] == 7\n"
        "assert explorer.marks['marker'].x[0] == 7\n"
        "print('ok-check')",
    ),
    "02_lens_reconstruction.ipynb": (
        ("klever_nb.lensing",),
        {"FigureModel", "ImageModel", "LinesModel", "ScatterModel", "FloatSliderModel",
         "DropdownModel"},
        "explorer.select_source(*explorer.selected_source_pixel)\n"
        "assert len(explorer.source_to_image(*explorer.selected_source_pixel)) >= 1\n"
        "print('ok-check')",
    ),
    "03_metallicity_mcmc.ipynb": (
        ("klever_nb.metallicity", "klever_nb.bpt"),
        {"FigureModel", "ImageModel", "LinesModel", "ScatterModel", "CheckboxModel"},
        "explorer.select(11, 12)\n"
        "assert np.isfinite(explorer.pixel_posterior()['density']).any()\n"
        "print('ok-check')",
    ),
    "04_gradients_and_2d_maps.ipynb": (
        ("klever_nb.gradients", "klever_nb.gradients.forward"),
        {"FigureModel", "ImageModel", "LinesModel", "ScatterModel", "FloatSliderModel",
         "ToggleButtonsModel"},
        "explorer.marks['centre'].x = [0.0]\n"
        "assert explorer.centre_kpc[0] == 0.0\n"
        "print('ok-check')",
    ),
    "05_sample_figures.ipynb": (
        ("klever_nb.sample", "sklearn"),
        set(),
        "assert abs(corr['log_mstar'].slope - (-0.013)) < 0.005\n"
        "print('ok-check')",
    ),
    "explorer.ipynb": (
        ("klever_nb.fitting", "klever_nb.spectra"),
        {"FigureModel", "ImageModel", "LinesModel", "ScatterModel", "FloatSliderModel"},
        "explorer.marks['image']._handle_custom_msgs(None, {'event': 'element_click',"
        " 'data': {'click_x': 9.1, 'click_y': 5.8}})\n"
        "assert explorer.selected_spaxel == (6, 9)\n"
        "print('ok-check')",
    ),
}
#: The workshop's solved twins run in CI (the exercises have gaps and are not run).
CASES.update({
    "workshop/solutions/01_fit_a_line_by_hand.ipynb": (
        ("klever_nb.fitting",), set(),
        "assert abs(flux_hand - float(ha.flux)) < 2 * float(ha.flux_err)\nprint('ok-check')"),
    "workshop/solutions/02_posterior_by_hand.ipynb": (
        ("klever_nb.calibrations",), set(),
        "assert abs(oh_med - pkg[0]) < 0.005 and abs(oh_lo - pkg[1]) < 0.005\nprint('ok-check')"),
    "workshop/solutions/03_gradient_and_beam_smearing.ipynb": (
        ("scipy",), set(),
        "assert abs(measured[0] - true_gradient) < 0.002 and measured[-1] > 0.5 * true_gradient\n"
        "print('ok-check')"),
})


def _missing(modules) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def test_notebooks_are_generated_by_build_script():
    sys.path.insert(0, str(NOTEBOOKS))
    try:
        import build_notebooks
    finally:
        sys.path.pop(0)
    assert build_notebooks.main(["--check"]) == 0, "run python notebooks/build_notebooks.py"
    for name in build_notebooks.NOTEBOOKS:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


class RssSampler(threading.Thread):
    """Peak RSS (MB) of a process and its children, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_mb = 0.0
        self._stop_event = threading.Event()

    def current_mb(self) -> float:
        import psutil

        try:
            proc = psutil.Process(self.pid)
            procs = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total / 2**20

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak_mb = max(self.peak_mb, self.current_mb())
            self._stop_event.wait(self.interval)

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        self.peak_mb = max(self.peak_mb, self.current_mb())
        return self.peak_mb


@pytest.fixture(scope="session")
def demo_cache():
    """The demo galaxies built once into the cache (a separate process, as binder/postBuild)."""
    from klever_nb import demo

    return [demo.ensure_demo(i, progress=False) for i in (0, 1)]


def _prepare(name: str) -> nbformat.NotebookNode:
    needs, _models, check = CASES[name]
    missing = _missing(needs)
    if missing:
        pytest.skip(f"{name} needs {', '.join(missing)} (not in the tree yet)")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    if check:
        nb.cells.append(nbformat.v4.new_code_cell(check))
    return nb


def _run(name: str, nb: nbformat.NotebookNode, tmp_path: Path, km=None) -> dict:
    """Execute ``nb`` in a kernel (``km``: kept alive by the caller); time and memory."""
    from jupyter_client import KernelManager
    from nbclient import NotebookClient

    own = km is None
    if own:
        km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(tmp_path))
    sampler = RssSampler(km.provisioner.pid)
    sampler.start()
    client = NotebookClient(nb, km=km, timeout=BUDGET_S, kernel_name="python3",
                            store_widget_state=True,
                            resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.perf_counter()
    try:
        client.execute()  # raises CellExecutionError on the first failing cell
    finally:
        elapsed = time.perf_counter() - t0
        peak = sampler.stop()
        if own:
            km.shutdown_kernel(now=True)
    return {"notebook": name, "seconds": round(elapsed, 1), "peak_rss_mb": round(peak)}


def _check_outputs(name: str, nb: nbformat.NotebookNode) -> None:
    _needs, models, check = CASES[name]
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.get("output_type") == "error"]
    assert not errors, errors
    if check:
        assert "ok-check" in "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    if models:
        views = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                 if WIDGET_VIEW in o.get("data", {})]
        assert views, "no widget was displayed"
        state = nb.metadata["widgets"][WIDGET_STATE]["state"]
        present = {m["model_name"] for m in state.values()}
        assert models <= present, models - present
    # the static fallback travels with every displayed explorer (shown without a widget manager)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_VIEW in data and "Explorer" in data.get("text/plain", ""):
                assert "image/png" in data


def _record(key: str, value) -> None:
    ART.mkdir(parents=True, exist_ok=True)
    path = ART / "notebook_memory.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[key] = value
    path.write_text(json.dumps(data, indent=1))


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(CASES) - set(SESSION)))
def test_notebook_runs_headless_with_its_widgets(name, tmp_path, demo_cache):
    nb = _prepare(name)
    result = _run(name, nb, tmp_path)
    print(result)
    _record(name, result)
    assert result["seconds"] < BUDGET_S, result
    _check_outputs(name, nb)
    assert result["peak_rss_mb"] < RSS_LIMIT_MB, result


@pytest.mark.notebook
@pytest.mark.slow
def test_binder_session_00_to_04_in_one_session(tmp_path, demo_cache):
    """00 -> 04 one after the other, every kernel kept alive (nobody shuts one down)."""
    from jupyter_client import KernelManager

    kernels, results = [], []
    try:
        for name in SESSION:
            nb = _prepare(name)
            km = KernelManager(kernel_name="python3")
            kernels.append(km)
            result = _run(name, nb, tmp_path, km=km)
            _check_outputs(name, nb)
            result["session_total_mb"] = round(sum(
                RssSampler(k.provisioner.pid).current_mb() for k in kernels))
            results.append(result)
            print(result)
    finally:
        for km in kernels:
            km.shutdown_kernel(now=True)
    _record("session_00_to_04", results)
    for result in results:
        assert result["seconds"] < BUDGET_S, result
        assert result["peak_rss_mb"] < RSS_LIMIT_MB, result
    assert results[0]["seconds"] < QUICKSTART_BUDGET_S, results[0]
    # measured 1801 MB once 02 reads the cached demo galaxy (it was 2080 MB with 02 building
    # the mock in its kernel, 594 MB -> 323 MB)
    assert results[-1]["session_total_mb"] < SESSION_LIMIT_MB, results

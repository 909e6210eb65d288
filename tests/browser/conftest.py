"""Fixtures of the real-browser tests: a JupyterLab or Voila server on a free port, Chromium.

Follows the tested recipe in ``shared/recipes/browser-tests`` exactly: Debian's
``/usr/bin/chromium`` launched through Playwright's ``executable_path`` (never
``playwright install``), isolated Jupyter runtime/settings/workspace folders, the
notebook copied to a temporary folder (autosave never touches the checked-in one),
readiness by ``/api/status`` (Lab) or a TCP connect (Voila), clean shutdown.
Screenshots go to ``artifacts/`` (gitignored) at the repository root.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
ART = Path(os.environ.get("ARTIFACT_DIR", ROOT / "artifacts"))


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.browser)
            if not Path(CHROMIUM).exists():
                item.add_marker(pytest.mark.skip(
                    reason=f"Chromium not found at {CHROMIUM}: install it with "
                           "`apt-get install -y chromium` (or set CHROMIUM_PATH)"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 90) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early rc={proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except Exception:
            time.sleep(0.25)
    raise TimeoutError(url)


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 90) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early rc={proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return time.perf_counter() - t0
        except OSError:
            time.sleep(0.25)
    raise TimeoutError(port)


def stop(proc: subprocess.Popen, base: str | None = None, token: str | None = None) -> None:
    """Clean shutdown: POST /api/shutdown (Lab) or SIGTERM (Voila); escalate to SIGKILL."""
    if proc.poll() is None:
        try:
            if base:
                req = urllib.request.Request(f"{base}/api/shutdown", method="POST",
                                             headers={"Authorization": f"token {token}"})
                urllib.request.urlopen(req, timeout=5)
            else:
                proc.terminate()
        except Exception as exc:  # pragma: no cover - diagnostic only
            print("graceful shutdown failed:", exc)
            proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def isolated_env(tmp: Path) -> dict[str, str]:
    """Fresh runtime/settings/workspace folders: every run starts from a clean JupyterLab."""
    news = tmp / "settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True, exist_ok=True)  # suppress the "Jupyter news?" toast
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    env = dict(os.environ)
    env.update(JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"),
               PYTHONUNBUFFERED="1")  # kernels keep the inline backend, as a user has
    return env


@pytest.fixture
def nb_dir(tmp_path: Path) -> Path:
    """A copy of the notebooks folder (JupyterLab autosave never rewrites the checked-in files)."""
    d = tmp_path / "nb"
    shutil.copytree(NOTEBOOKS, d, ignore=shutil.ignore_patterns("*.py", "__pycache__",
                                                                 ".ipynb_checkpoints"))
    return d


@pytest.fixture
def lab_server(tmp_path: Path, nb_dir: Path, request):
    port, token = free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
           "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={nb_dir}", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0:  # containers/CI often run as root; jupyter refuses without this
        cmd.append("--allow-root")
    log = open(tmp_path / "lab.log", "w")
    env = isolated_env(tmp_path)
    backend = getattr(request.module, "MPLBACKEND", None)  # a module may pin the backend
    if backend:
        env["MPLBACKEND"] = backend
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/api/status?token={token}", proc)
        yield base, token
    finally:
        stop(proc, base, token)
        log.close()


@pytest.fixture
def voila_server(tmp_path: Path, nb_dir: Path, request):
    notebook = getattr(request, "param", "explorer.ipynb")
    port = free_port()
    cmd = [sys.executable, "-m", "voila", str(nb_dir / notebook), "--no-browser",
           f"--port={port}", "--Voila.ip=127.0.0.1"]
    log = open(tmp_path / "voila.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=isolated_env(tmp_path))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_port(port, proc)  # GET "/" would already start a kernel
        yield base
    finally:
        stop(proc)  # voila has no token by default; SIGTERM is handled cleanly
        log.close()


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@pytest.fixture
def page(browser, request):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    pg.on("console", lambda m: m.type == "error" and print("[console]", m.text))
    # offline: voila's template pulls font-awesome CSS from cdn.jsdelivr.net -> harmless failures
    pg.on("requestfailed", lambda r: print("[requestfailed]", r.url))
    yield pg
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:  # keep evidence of what the browser showed
        ART.mkdir(parents=True, exist_ok=True)
        pg.screenshot(path=str(ART / f"FAILED-{request.node.name}.png"), full_page=True)
    ctx.close()


@pytest.fixture
def artifact_dir() -> Path:
    """Folder for screenshots (``artifacts/`` at the repository root, gitignored)."""
    ART.mkdir(parents=True, exist_ok=True)
    return ART

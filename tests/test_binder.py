"""The Binder files: executable hooks that install the package and download nothing."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_binder_hooks_are_executable_and_offline():
    for name in ("postBuild", "start"):
        path = ROOT / "binder" / name
        assert os.access(path, os.X_OK), name
        text = path.read_text()
        assert text.startswith("#!/bin/bash")
        assert "http" not in text and "curl" not in text and "wget" not in text
    post_build = (ROOT / "binder" / "postBuild").read_text()
    assert "pip install --no-deps -e ." in post_build
    # the demo galaxies are analysed once at build time: the notebooks only read the cache
    assert "python -m klever_nb.demo" in post_build


def test_every_notebook_named_in_design_exists():
    names = {p.stem for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert {"00_quickstart", "01_line_fitting", "02_lens_reconstruction",
            "03_metallicity_mcmc", "04_gradients_and_2d_maps", "explorer"} <= names

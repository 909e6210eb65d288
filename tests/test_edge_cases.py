"""Provenance, settings mixing, the --sandbox and no eval/pickle of user input (issue 18).

* Every netCDF product carries ``provenance`` (settings, package versions, SHA-256 of each
  input) and ``input_hash``; summary.json the same versions, settings and inputs, and the
  lensing flag ``near_critical``.
* ``klever-nb run`` refuses a products folder made with other settings unless ``--force``.
* Paths in a galaxy TOML are relative to the TOML; with ``--sandbox ROOT`` none may escape
  ROOT (``..``, absolute paths, symbolic links): one line, exit 2.
* No ``eval``/``exec``/``pickle`` anywhere in the package (inputs are FITS, TOML, netCDF).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import xarray as xr

from klever_nb import mock, pipeline
from klever_nb.config import load_galaxy
from klever_nb.errors import ConfigError
from klever_nb.io import mockfiles, read_datatree

ROOT = Path(__file__).resolve().parents[1]


def klever(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "klever_nb.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def galaxy(tmp_path_factory) -> Path:
    """The unlensed demo mock without the (slow) forward-modelled gradient."""
    folder = tmp_path_factory.mktemp("edge")
    toml = mockfiles.write_mock(mock.make_mock(mock.demo_specs()[1]), folder / "in" / "g")
    toml.write_text(toml.read_text() + "\n[analysis]\nforward_gradient = false\n")
    return toml


@pytest.fixture(scope="module")
def products(galaxy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out")
    return pipeline.run_galaxy(galaxy, out, progress=False).parent


# ---------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------
def test_every_product_records_versions_settings_and_input_hashes(products, galaxy):
    summary = json.loads((products / "summary.json").read_text())
    assert summary["versions"]["klever_nb"] and summary["settings"]["forward_gradient"] is False
    inputs = summary["inputs"]
    assert str(galaxy.resolve()) in inputs and all(len(h) == 64 for h in inputs.values())
    assert "near_critical" in summary  # the lensing flag reaches the summary
    for name in ("line_maps.nc", "source_maps.nc", "metallicity.nc"):
        ds = pipeline.read_netcdf(products / name)
        record = ds.attrs["provenance"]
        assert ds.attrs["input_hash"]
        assert record["settings"] == summary["settings"]
        assert record["versions"]["numpy"] and record["inputs"] == inputs
    tree = read_datatree(products / "cubes_aligned.nc")
    assert tree.attrs["provenance"]["inputs"] == inputs


def test_run_refuses_to_mix_settings_unless_forced(products, galaxy, tmp_path):
    """Another smoothing into the same folder: one line naming the setting; --force replaces."""
    changed = tmp_path / "g"
    shutil.copytree(galaxy.parent, changed)
    toml = changed / galaxy.name
    toml.write_text(toml.read_text().replace("forward_gradient = false",
                                             "forward_gradient = false\nsnr_weak = 3.0"))
    before = {p.name: p.stat().st_mtime_ns for p in products.iterdir()}
    result = klever("run", toml, "--out", products.parent)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "other settings" in line and "snr_weak: 2.5 -> 3.0" in line
    assert "--force" in line
    assert {p.name: p.stat().st_mtime_ns for p in products.iterdir()} == before
    with pytest.raises(ConfigError, match="other settings"):
        pipeline.run_galaxy(toml, products.parent, progress=False)


@pytest.mark.slow
def test_force_replaces_products_made_with_other_settings(galaxy, tmp_path):
    out = tmp_path / "out"
    first = pipeline.run_galaxy(galaxy, out, progress=False)
    toml = galaxy.parent / "k20.toml"
    toml.write_text(galaxy.read_text().replace("forward_gradient = false",
                                               "forward_gradient = false\nmethod = \"k20\""))
    try:
        with pytest.raises(ConfigError, match="method"):
            pipeline.run_galaxy(toml, out, progress=False)
        again = pipeline.run_galaxy(toml, out, progress=False, force=True)
    finally:
        toml.unlink()
    assert again == first
    assert json.loads(again.read_text())["settings"]["method"] == "k20"
    assert xr.open_dataset(out / first.parent.name / "metallicity.nc").attrs["provenance"]


# ---------------------------------------------------------------------------
# Sandbox
# ---------------------------------------------------------------------------
def _galaxy_with_cube_path(folder: Path, cube_path: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    toml = folder / "galaxy.toml"
    toml.write_text(f'name = "g"\nredshift = 2.2\n[cubes]\nK = "{cube_path}"\n'
                    "[psf]\nfwhm_arcsec = 0.5\n")
    return toml


def test_paths_resolve_relative_to_the_toml(tmp_path):
    (tmp_path / "root" / "g" / "cubes").mkdir(parents=True)
    (tmp_path / "root" / "g" / "cubes" / "K.fits").write_bytes(b"x")
    toml = _galaxy_with_cube_path(tmp_path / "root" / "g", "cubes/K.fits")
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)  # not the TOML's folder
        cfg = load_galaxy(toml, sandbox=tmp_path / "root")
    finally:
        os.chdir(cwd)
    assert cfg.cubes["K"] == (tmp_path / "root" / "g" / "cubes" / "K.fits").resolve()


@pytest.mark.parametrize("escape", ["dotdot", "absolute", "symlink"])
def test_sandbox_refuses_paths_that_escape_it(tmp_path, escape):
    root = tmp_path / "root"
    outside = tmp_path / "secret.fits"
    outside.write_bytes(b"x")
    (root / "g").mkdir(parents=True)
    if escape == "symlink":
        (root / "g" / "link.fits").symlink_to(outside)
        rel = "link.fits"
    else:
        rel = "../../secret.fits" if escape == "dotdot" else str(outside)
    toml = _galaxy_with_cube_path(root / "g", rel)
    load_galaxy(toml)  # allowed without a sandbox
    with pytest.raises(ConfigError, match="outside the sandbox") as info:
        load_galaxy(toml, sandbox=root)
    assert "\n" not in str(info.value) and "cubes.K" in str(info.value)


def test_cli_run_sandbox_is_one_line_and_writes_nothing(tmp_path):
    root = tmp_path / "root"
    (tmp_path / "secret.fits").write_bytes(b"x")
    toml = _galaxy_with_cube_path(root / "g", "../../secret.fits")
    result = klever("run", toml, "--out", root / "out", "--sandbox", root)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "outside the sandbox" in result.stderr
    assert not (root / "out").exists()


def test_cli_sample_sandbox_checks_every_galaxy(tmp_path):
    root = tmp_path / "root"
    (tmp_path / "secret.fits").write_bytes(b"x")
    _galaxy_with_cube_path(root / "g", "../../secret.fits")
    sample = root / "sample.toml"
    sample.write_text('galaxies = ["g/galaxy.toml"]\n')
    result = klever("sample", sample, "--out", root / "out", "--sandbox", root)
    assert result.returncode == 2, result.stderr
    assert "outside the sandbox" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------
# No eval / pickle of user input
# ---------------------------------------------------------------------------
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "shelve", "marshal", "cloudpickle"}


def test_package_never_evals_or_unpickles():
    problems = []
    for path in sorted((ROOT / "klever_nb").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id in FORBIDDEN_CALLS:
                problems.append(f"{path.name}:{node.lineno} {node.func.id}()")
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                if any(n.split(".")[0] in FORBIDDEN_MODULES for n in names):
                    problems.append(f"{path.name}:{node.lineno} imports {names}")
            if isinstance(node, ast.keyword) and node.arg == "allow_pickle" and \
                    not (isinstance(node.value, ast.Constant) and node.value.value is False):
                problems.append(f"{path.name}:{node.lineno} allow_pickle")
    assert not problems, problems

"""pyproject.toml, environment.yml and binder/environment.yml list the same packages."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# conda-forge names that differ from PyPI names, and PyPI extras that are separate conda packages
CONDA_FOR_PYPI = {"dask[distributed]": {"dask", "distributed"}}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("-", "_")


def _pyproject() -> tuple[set[str], set[str]]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runtime, test = set(), set()
    for req in data["project"]["dependencies"]:
        runtime |= {n.replace("-", "_") for n in CONDA_FOR_PYPI.get(_name(req), {_name(req)})}
    for req in data["project"]["optional-dependencies"]["test"]:
        test.add(_name(req))
    return runtime, test


def _conda(path: Path) -> set[str]:
    """Package names of a conda environment file's dependency list (not its pip section)."""
    names = set()
    in_deps = False
    for line in path.read_text().splitlines():
        if line.startswith("dependencies:"):
            in_deps = True
            continue
        if in_deps and re.match(r"^  - [A-Za-z]", line) and not line.rstrip().endswith(":"):
            names.add(_name(line[4:]))
    return names - {"python", "pip"}


def test_environment_yml_matches_pyproject():
    runtime, test = _pyproject()
    conda = _conda(ROOT / "environment.yml")
    assert conda == runtime | test, (
        f"missing from environment.yml: {sorted((runtime | test) - conda)}; "
        f"not in pyproject.toml: {sorted(conda - runtime - test)}")


def test_binder_environment_has_runtime_and_widget_frontends():
    runtime, _ = _pyproject()
    binder = _conda(ROOT / "binder" / "environment.yml")
    extras = {"voila", "jupyterlab_widgets"}
    assert binder == runtime | extras, (
        f"missing from binder: {sorted((runtime | extras) - binder)}; "
        f"unexpected: {sorted(binder - runtime - extras)}")


def test_version_floors_agree():
    """The same lower bound is written for a package in all three files."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    floors = {}
    for req in data["project"]["dependencies"] + data["project"]["optional-dependencies"]["test"]:
        match = re.search(r">=([\w.]+)", req)
        if match:
            for name in CONDA_FOR_PYPI.get(_name(req), {_name(req)}):
                floors[name.replace("-", "_")] = match.group(1)
    for env in (ROOT / "environment.yml", ROOT / "binder" / "environment.yml"):
        for line in env.read_text().splitlines():
            match = re.match(r"^  - ([A-Za-z_\-]+)>=([\w.]+)", line)
            if match and _name(match.group(1)) in floors:
                assert floors[_name(match.group(1))] == match.group(2), (env.name, line)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^(make \w+)$", readme, flags=re.MULTILINE)
    assert commands[:2] == ["make demo", "make test"], commands
    assert [line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd "))] \
        == ["make test"]

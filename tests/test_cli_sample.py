"""``klever-nb sample``: every problem listed up front, failures reported, the rest complete,
resume after a kill without recomputing finished galaxies, no half-written files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from klever_nb import cli, mock, sample_run
from klever_nb.io import mockfiles

ROOT = Path(__file__).resolve().parents[1]


def _tiny(name: str, seed: int, z: float = 1.4, log_mstar: float = 9.5) -> mock.MockSpec:
    """A small unlensed two-band mock that runs every stage in a few seconds."""
    return mock.MockSpec(name=name, redshift=z, bands=("YJ", "H"), shape=(12, 12),
                         log_mstar=log_mstar, seed=seed, snr_halpha_peak=40.0)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample_inputs")
    for i in range(3):
        toml = mockfiles.write_mock(mock.make_mock(_tiny(f"tiny{i}", seed=10 + i,
                                                    log_mstar=9.2 + 0.3 * i)), root / f"tiny{i}")
        toml.write_text(toml.read_text() + "\n[analysis]\nforward_gradient = false\n")
    return root


def _copy_galaxy(root: Path, src: str, dst: str) -> Path:
    shutil.copytree(root / src, root / dst)
    toml = root / dst / "galaxy.toml"
    toml.write_text(toml.read_text().replace(f'name = "{src}"', f'name = "{dst}"')
                    .replace(f"cubes/{src}_", f"cubes/{dst}_"))
    for cube in (root / dst / "cubes").glob(f"{src}_*"):
        cube.rename(cube.with_name(cube.name.replace(src, dst)))
    return toml


def _sample(root: Path, names: list[str]) -> Path:
    path = root / "sample.toml"
    path.write_text("galaxies = [" + ", ".join(f'"{n}/galaxy.toml"' for n in names) + "]\n")
    return path


def _no_temporaries(out: Path) -> None:
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".") and p.suffix == ".tmp"]
    assert not leftovers, leftovers


def test_missing_cube_and_raising_galaxy_are_reported_and_the_rest_complete(
        inputs, tmp_path, capsys):
    root = tmp_path / "in"
    shutil.copytree(inputs, root)
    missing = _copy_galaxy(root, "tiny0", "nocube")
    (root / "nocube" / "cubes" / "nocube_H.fits").unlink()
    raising = _copy_galaxy(root, "tiny0", "corrupt")
    (root / "corrupt" / "cubes" / "corrupt_H.fits").write_bytes(b"not a FITS file\n" * 100)
    badkey = _copy_galaxy(root, "tiny0", "badkey")
    badkey.write_text("colour = 1\n" + badkey.read_text())
    sample = _sample(root, ["tiny0", "nocube", "corrupt", "tiny1", "badkey"])
    out = tmp_path / "out"

    status = cli.main(["sample", str(sample), "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 1
    # every problem is one line naming the file (and key), all listed
    assert f"{missing}: cubes.H" in err and "file not found" in err
    assert f"{badkey}: unknown key 'colour'" in err
    assert str(raising) in err
    assert len([line for line in err.splitlines() if line.strip()]) == 3

    table = sample_run.read_sample_table(out / "sample.csv")
    status_of = dict(zip(table["name"], table["status"], strict=True))
    assert status_of == {"tiny0": "done", "tiny1": "done", "nocube": "invalid",
                         "corrupt": "failed", "badkey": "invalid"}
    error_of = dict(zip(table["name"], table["error"].fillna(""), strict=True))
    assert "corrupt_H.fits" in error_of["corrupt"]
    assert error_of["tiny0"] == ""
    # every scalar field of summary.json is a column, with the same value
    summary = json.loads((out / "tiny0" / "summary.json").read_text())
    row = table[table["name"] == "tiny0"].iloc[0]
    for key, value in summary.items():
        if isinstance(value, float):
            assert row[key] == pytest.approx(value, rel=1e-12), key
        elif isinstance(value, str) and key != "config_path":
            assert str(row[key]) == value or (value == "" and row[key] != row[key]), key
    assert row["prop_log_mstar"] == pytest.approx(9.2)
    # units in the CSV header and the netCDF attrs
    header = (out / "sample.csv").read_text().splitlines()[1]
    assert "gradient_dex_per_kpc=dex / kpc" in header and "sfr=solMass / yr" in header
    ds = sample_run.read_sample_table(out / "sample.nc")
    assert set(ds["name"]) == set(status_of)
    from klever_nb.io import read_netcdf

    nc = read_netcdf(out / "sample.nc")
    assert nc["gradient_dex_per_kpc"].attrs["units"] == "dex / kpc"
    assert np.isfinite(nc["gradient_dex_per_kpc"].sel(galaxy="tiny1"))
    _no_temporaries(out)


def test_a_rerun_resumes_and_a_changed_input_reruns(inputs, tmp_path, monkeypatch):
    root = tmp_path / "in"
    shutil.copytree(inputs, root)
    sample = _sample(root, ["tiny0", "tiny1"])
    out = tmp_path / "out"
    first = sample_run.run_sample(sample, out)
    assert [r["status"] for r in first.rows] == ["done", "done"]
    # resumed galaxies never reach the pipeline
    from klever_nb import pipeline

    def boom(*args, **kwargs):
        raise AssertionError("a finished galaxy was recomputed")

    monkeypatch.setattr(pipeline, "run_galaxy", boom)
    again = sample_run.run_sample(sample, out)
    assert [r["status"] for r in again.rows] == ["resumed", "resumed"]
    # a changed setting invalidates the marker: the galaxy is run (here: raises, reported)
    toml = root / "tiny1" / "galaxy.toml"
    toml.write_text(toml.read_text().replace("forward_gradient = false",
                                             "forward_gradient = false\nsnr_weak = 3.0"))
    third = sample_run.run_sample(sample, out)
    assert [r["status"] for r in third.rows] == ["resumed", "failed"]
    assert "recomputed" in third.rows[1]["error"]
    table = sample_run.read_sample_table(out)
    assert list(table["status"]) == ["resumed", "failed"]


@pytest.mark.slow
def test_dask_local_cluster_runs_reports_and_closes(inputs, tmp_path):
    root = tmp_path / "in"
    shutil.copytree(inputs, root)
    raising = _copy_galaxy(root, "tiny0", "corrupt")
    (root / "corrupt" / "cubes" / "corrupt_YJ.fits").write_bytes(b"\0" * 2880)
    sample = _sample(root, ["tiny0", "corrupt", "tiny2"])
    out = tmp_path / "out"
    result = sample_run.run_sample(sample, out, scheduler="local", workers=2)
    status = {r["name"]: r["status"] for r in result.rows}
    assert status == {"tiny0": "done", "corrupt": "failed", "tiny2": "done"}
    assert str(raising.parent / "cubes") in result.rows[1]["error"] or \
        "corrupt_YJ.fits" in result.rows[1]["error"]
    again = sample_run.run_sample(sample, out, scheduler="local", workers=2)
    assert [r["status"] for r in again.rows] == ["resumed", "failed", "resumed"]


@pytest.mark.slow
def test_killed_midway_then_rerun_does_not_recompute_finished_galaxies(inputs, tmp_path):
    root = tmp_path / "in"
    shutil.copytree(inputs, root)
    sample = _sample(root, ["tiny0", "tiny1", "tiny2"])
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "klever_nb.cli", "sample", str(sample),
                             "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first_marker = out / "tiny0" / sample_run.DONE_MARKER
    deadline = time.monotonic() + 90
    while not first_marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert first_marker.exists(), proc.communicate()[1].decode()[-2000:]
    proc.send_signal(signal.SIGTERM)  # at once: the second galaxy has just started
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0, "the run finished before the signal; make the mocks larger"
    assert not (out / "tiny2" / sample_run.DONE_MARKER).exists()
    _no_temporaries(out)
    from klever_nb.io import read_netcdf

    for nc in out.rglob("*.nc"):  # every product in place is complete
        read_netcdf(nc) if nc.name != "cubes_aligned.nc" else None
    for js in out.rglob("*.json"):
        json.loads(js.read_text())
    stamp = {p: p.stat().st_mtime_ns for p in (out / "tiny0").iterdir()}
    result = sample_run.run_sample(sample, out)
    assert [r["status"] for r in result.rows] == ["resumed", "done", "done"]
    assert {p: p.stat().st_mtime_ns for p in (out / "tiny0").iterdir()} == stamp
    _no_temporaries(out)

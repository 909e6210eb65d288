"""Fault injection (issue 18): unusable inputs, killed runs, unwritable output folders.

* A cube or band with nothing usable ends ``klever-nb run``/``fit`` with exit 2, one line
  naming the file, HDU and reason, and nothing written.
* A band with usable spaxels but no detected line is a result with a flag and a warning.
* ``klever-nb run`` killed (SIGKILL or SIGTERM) at random times leaves every product on
  disk complete and readable, or absent, loses nothing that was already written, and a
  rerun finishes.
* A read-only or full output folder is one line, exit 2.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from astropy.io import fits

from klever_nb import mock, pipeline
from klever_nb.errors import KleverError
from klever_nb.io import mockfiles

ROOT = Path(__file__).resolve().parents[1]
KLEVER = [sys.executable, "-m", "klever_nb.cli"]
RESULTS = ROOT / "benchmarks" / "results" / "reliability_kills.json"
#: The unlensed demo galaxy: every stage, ~10 s on one core.
SPEC_INDEX = 1


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg", OMP_NUM_THREADS="1",
               NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return env


def klever(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*KLEVER, *map(str, args)], capture_output=True, text=True,
                          env=_env(), cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def galaxy(tmp_path_factory) -> Path:
    """The unlensed demo mock's galaxy.toml (cubes YJ, H, K)."""
    folder = tmp_path_factory.mktemp("mock")
    return mockfiles.write_mock(mock.make_mock(mock.demo_specs()[SPEC_INDEX]), folder / "g")


def _copy(galaxy: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "galaxy"
    shutil.copytree(galaxy.parent, dest)
    return dest / galaxy.name


def _cube(toml: Path, band: str) -> Path:
    return next((toml.parent / "cubes").glob(f"*_{band}.fits"))


# ---------------------------------------------------------------------------
# Nothing usable is not a success
# ---------------------------------------------------------------------------
BREAKS = {
    "noise_zero": ("NOISE", "the noise is zero in every voxel",
                   lambda h: h["NOISE"].data.__setitem__(slice(None), 0.0)),
    "noise_negative": ("NOISE", "zero or negative in every voxel",
                       lambda h: h["NOISE"].data.__imul__(-1.0)),
    "noise_nan": ("NOISE", "NaN or infinite in every voxel",
                  lambda h: h["NOISE"].data.__setitem__(slice(None), np.nan)),
    "flux_nan": ("DATA", "the flux is NaN or infinite in every voxel",
                 lambda h: h["DATA"].data.__setitem__(slice(None), np.nan)),
    "mask_all": ("MASK", "the mask flags every voxel",
                 lambda h: h.append(fits.ImageHDU(np.ones(h["DATA"].data.shape, "i2"),
                                                  name="MASK"))),
}


def _break(cube: Path, how: str) -> tuple[str, str]:
    hdu, reason, edit = BREAKS[how]
    with fits.open(cube, mode="update") as hdul:
        edit(hdul)
    return hdu, reason


@pytest.mark.parametrize("how", sorted(BREAKS))
def test_fit_of_an_unusable_cube_exits_2_naming_file_hdu_and_reason(galaxy, tmp_path, how):
    cube = tmp_path / "cube.fits"
    shutil.copy(_cube(galaxy, "K"), cube)
    hdu, reason = _break(cube, how)
    out = tmp_path / "out"
    result = klever("fit", cube, "--redshift", 2.2, "--out", out)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(cube) in lines[0] and f"HDU '{hdu}'" in lines[0] and reason in lines[0], lines
    assert not out.exists()


def test_run_with_one_unusable_band_exits_2_and_writes_nothing(galaxy, tmp_path):
    """The issue's case: a NOISE extension of zeros in one band of a galaxy."""
    toml = _copy(galaxy, tmp_path)
    cube = _cube(toml, "H")
    _break(cube, "noise_zero")
    out = tmp_path / "out"
    result = klever("run", toml, "--out", out)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert cube.name in line and "HDU 'NOISE'" in line and "noise is zero" in line, line
    assert not out.exists()


def test_band_without_any_detected_line_is_flagged_and_warned(galaxy, tmp_path):
    """K band of pure noise (Halpha, [NII], [SII] at z = 2.2): a result, a flag, a warning."""
    toml = _copy(galaxy, tmp_path)
    with fits.open(_cube(toml, "K"), mode="update") as hdul:
        noise = hdul["NOISE"].data
        hdul["DATA"].data[:] = np.random.default_rng(3).standard_normal(noise.shape) * noise
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary_path = pipeline.run_galaxy(toml, tmp_path / "out", progress=False)
    summary = json.loads(summary_path.read_text())
    assert summary["bands_without_detection"] == ["K"]
    assert "band(s) K" in summary["bands_without_detection_message"]
    assert any("no emission line detected in band(s) K" in str(w.message) for w in caught)
    maps = xr.open_dataset(summary_path.parent / "line_maps.nc")
    k_lines = maps["line"].values[maps["band"].values == "K"]
    assert not bool(maps["integrated_detected"].sel(line=k_lines).any())
    # the other bands are measured as usual
    assert set(summary["lines_detected"]) & {"OIII_5007", "Hbeta"}


# ---------------------------------------------------------------------------
# Unwritable output folders
# ---------------------------------------------------------------------------
def test_output_folder_that_cannot_be_created_is_one_line(galaxy, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = klever("run", galaxy, "--out", blocker / "out")
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "cannot write the products" in line, line


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC, errno.EACCES])
def test_read_only_or_full_folder_is_a_klever_error_and_leaves_no_record(tmp_path, monkeypatch,
                                                                         code):
    """A product write that fails (read-only, disk full) leaves neither product nor record."""
    import tempfile

    from klever_nb.io import products as product_io

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(product_io.tempfile, "mkstemp", refuse)
    result = pipeline.StageResult(xr.Dataset({"a": ("x", [1.0])}), {"k": 1})
    with pytest.raises(KleverError, match=os.strerror(code)) as info:
        pipeline._run_stage(tmp_path, "fit", "h", False, compute=lambda: result,
                            write=lambda r: product_io.write_netcdf(r.data,
                                                                    tmp_path / "a.nc"),
                            read=lambda: None, files=("a.nc",))
    assert "\n" not in str(info.value)
    monkeypatch.setattr(product_io.tempfile, "mkstemp", tempfile.mkstemp)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# Killed runs
# ---------------------------------------------------------------------------
def _valid(path: Path) -> bool:
    """A product opens with its reader (xarray, json, csv, png)."""
    try:
        if path.suffix == ".nc":
            try:
                with xr.open_datatree(path, engine="h5netcdf") as tree:
                    tree.load()
            except (ValueError, KeyError):
                with xr.open_dataset(path, engine="h5netcdf") as ds:
                    ds.load()
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".csv":
            rows = path.read_text().splitlines()
            assert rows[0] == "radius_kpc,oh,oh_err,n_pixels"
            assert all(len(r.split(",")) == 4 for r in rows[1:])
        elif path.suffix == ".png":
            from PIL import Image

            with Image.open(path) as image:
                image.load()
        else:
            return False
    except Exception:  # any reader failure means the product is not valid
        return False
    return True


def _inspect(products: Path) -> tuple[dict[str, bool], list[str]]:
    """{product or stage record: valid?} and the leftover temporary files."""
    state, leftovers = {}, []
    if not products.is_dir():
        return state, leftovers
    for path in sorted(products.iterdir()):
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            leftovers.append(path.name)
        else:
            state[path.name] = _valid(path)
    return state, leftovers


@pytest.mark.slow
def test_killed_run_loses_nothing_and_a_rerun_finishes(galaxy, tmp_path):
    """SIGKILL/SIGTERM at random times of --force reruns (which replace every product):
    every product on disk stays complete and valid, none is lost, a rerun finishes."""
    rng = np.random.default_rng(18)
    out = tmp_path / "out"
    products = out / "mock-unlensed-z2.2"
    kills, lost, invalid, leftovers_seen = [], [], [], set()
    t0 = time.perf_counter()  # one whole run first: the kills then fall across its stages
    first = klever("run", galaxy, "--out", out)
    assert first.returncode == 0, first.stderr
    duration = time.perf_counter() - t0
    valid_before = {name for name, ok in _inspect(products)[0].items() if ok}
    for attempt in range(4):
        sig = (signal.SIGKILL, signal.SIGTERM)[attempt % 2]
        delay = float(rng.uniform(0.15, 0.95)) * duration
        # --force recomputes every stage: kills land while existing products are replaced
        force = ["--force"]
        proc = subprocess.Popen([*KLEVER, "run", str(galaxy), "--out", str(out), *force],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
        time.sleep(delay)
        finished = proc.poll() is not None
        if not finished:
            proc.send_signal(sig)
        proc.wait(timeout=120)
        state, leftovers = _inspect(products)
        leftovers_seen.update(leftovers)
        invalid += [name for name, ok in state.items() if not ok]
        now_valid = {name for name, ok in state.items() if ok}
        lost += sorted(valid_before - now_valid)
        valid_before = now_valid
        kills.append({"signal": signal.Signals(sig).name, "after_s": round(delay, 2),
                      "force": bool(force),
                      "finished_before_kill": finished, "products": sorted(now_valid)})
        # a stage record is written last: its products must all be there and valid
        for stage in ("fit", "lens", "metallicity", "gradient"):
            record = products / f".{stage}.json"
            if record.is_file():
                assert json.loads(record.read_text())["input_hash"]
    rerun = klever("run", galaxy, "--out", out)
    assert rerun.returncode == 0, rerun.stderr
    state, left = _inspect(products)
    assert not left, f"a rerun removes temporary files of killed writers: {left}"
    expected = {"line_maps.nc", "cubes_aligned.nc", "source_maps.nc", "metallicity.nc",
                "profile.csv", "gradient.png", "summary.json"}
    assert expected <= {name for name, ok in state.items() if ok}, state
    summary = json.loads((products / "summary.json").read_text())
    assert np.isfinite(summary["global_oh"])
    report = {"issue": 18, "kills_injected": sum(not k["finished_before_kill"] for k in kills),
              "products_lost": len(lost), "invalid_products_seen": len(invalid),
              "temporary_files_left_by_kills": sorted(leftovers_seen), "kills": kills}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "kills"}))
    assert not lost, lost
    assert not invalid, invalid

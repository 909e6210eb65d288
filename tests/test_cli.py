"""The klever-nb command line: help everywhere, and one-line errors that write nothing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from klever_nb.cli import build_parser, main

COMMANDS = ["demo", "mock", "run", "fit", "combine", "sample", "figures", "lab"]


@pytest.mark.parametrize("command", [[], *[[c] for c in COMMANDS]])
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    assert "usage: klever-nb" in capsys.readouterr().out


def test_parser_has_every_design_command():
    actions = [a for a in build_parser()._actions if a.dest == "command"]
    assert set(actions[0].choices) == set(COMMANDS)


@pytest.fixture(scope="module")
def mock_sample(tmp_path_factory) -> Path:
    from klever_nb.io import mockfiles

    out = tmp_path_factory.mktemp("mock")
    return mockfiles.write_demo_sample(out, seed=1)


def _galaxy_dirs(sample: Path) -> list[Path]:
    return sorted(p.parent for p in sample.parent.rglob("galaxy.toml"))


def _copy_galaxy(sample: Path, tmp_path: Path, *, lensed: bool) -> Path:
    import tomllib

    for folder in _galaxy_dirs(sample):
        cfg = tomllib.loads((folder / "galaxy.toml").read_text())
        if ("lens" in cfg) == lensed:
            dest = tmp_path / folder.name
            shutil.copytree(folder, dest)
            return dest / "galaxy.toml"
    raise AssertionError("mock sample lacks the galaxy kind asked for")


def _assert_one_line_error(capsys, code, out_dir: Path, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    assert not out_dir.exists() or not any(out_dir.rglob("*")), list(out_dir.rglob("*"))
    return err


def test_missing_galaxy_file(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", str(tmp_path / "nope.toml"), "--out", str(out)])
    _assert_one_line_error(capsys, code, out, "nope.toml", "not found")


def test_toml_syntax_error(tmp_path, capsys):
    bad = tmp_path / "galaxy.toml"
    bad.write_text("name = 'x'\nredshift = = 1.4\n")
    out = tmp_path / "out"
    _assert_one_line_error(capsys, main(["run", str(bad), "--out", str(out)]), out,
                           "galaxy.toml", "TOML syntax error")


def test_unknown_key(mock_sample, tmp_path, capsys):
    toml = _copy_galaxy(mock_sample, tmp_path, lensed=False)
    toml.write_text(toml.read_text() + "\nfavourite_colour = \"red\"\n")
    out = tmp_path / "out"
    _assert_one_line_error(capsys, main(["run", str(toml), "--out", str(out)]), out,
                           "favourite_colour")


def _break_cube(toml: Path, how: str) -> Path:
    import tomllib

    cfg = tomllib.loads(toml.read_text())
    band, rel = next(iter(cfg["cubes"].items()))
    cube = toml.parent / rel
    if how == "truncated":
        data = cube.read_bytes()
        cube.write_bytes(data[: len(data) // 3])
    elif how == "missing":
        cube.unlink()
    else:
        with fits.open(cube) as hdul:
            hdul = fits.HDUList([h.copy() for h in hdul])
        for hdu in hdul[1:]:
            if how == "bunit":
                hdu.header["BUNIT"] = "furlongs per fortnight squared"
            elif how == "no_spectral_axis":
                for key in ("CTYPE3", "CRVAL3", "CDELT3", "CRPIX3", "CUNIT3", "CD3_3"):
                    hdu.header.remove(key, ignore_missing=True)
        hdul.writeto(cube, overwrite=True)
    return cube


@pytest.mark.parametrize(
    ("how", "needle"),
    [("missing", "not found"), ("truncated", ""), ("bunit", "BUNIT"),
     ("no_spectral_axis", "")],
)
def test_bad_cubes_give_one_line_and_write_nothing(mock_sample, tmp_path, capsys, how, needle):
    toml = _copy_galaxy(mock_sample, tmp_path, lensed=False)
    cube = _break_cube(toml, how)
    out = tmp_path / "out"
    err = _assert_one_line_error(capsys, main(["run", str(toml), "--out", str(out)]), out,
                                 cube.name)
    assert needle in err


def test_deflection_maps_that_miss_the_cube(mock_sample, tmp_path, capsys):
    toml = _copy_galaxy(mock_sample, tmp_path, lensed=True)
    for name in ("dx.fits", "dy.fits", "kappa.fits", "gamma.fits"):
        path = toml.parent / "lens" / name
        if path.is_file():
            with fits.open(path) as hdul:
                hdul = fits.HDUList([h.copy() for h in hdul])
            hdul[0].header["CRVAL2"] = float(hdul[0].header["CRVAL2"]) + 1.0  # 1 degree away
            hdul.writeto(path, overwrite=True)
    out = tmp_path / "out"
    _assert_one_line_error(capsys, main(["run", str(toml), "--out", str(out)]), out,
                           "overlap")


def test_fit_rejects_negative_redshift(mock_sample, tmp_path, capsys):
    cube = next(mock_sample.parent.rglob("*.fits"))
    out = tmp_path / "out"
    _assert_one_line_error(capsys, main(["fit", str(cube), "--redshift", "-1", "--out",
                                         str(out)]), out, "redshift")


def test_fit_writes_line_maps_and_summary(mock_sample, tmp_path):
    import json
    import tomllib

    toml = _copy_galaxy(mock_sample, tmp_path, lensed=False)
    cfg = tomllib.loads(toml.read_text())
    band, rel = next(iter(cfg["cubes"].items()))
    cube = toml.parent / rel
    out = tmp_path / "fit"
    assert main(["fit", str(cube), "--redshift", str(cfg["redshift"]), "--out", str(out)]) == 0
    summary = json.loads((out / cube.stem / "summary.json").read_text())
    assert summary["lines_fitted"]
    assert (out / cube.stem / "line_maps.nc").is_file()
    assert any(v["detected"] for v in summary["integrated"].values())


def test_console_script_runs(tmp_path):
    exe = Path(sys.executable).parent / "klever-nb"
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    result = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("klever_nb ")
    assert np.isfinite(1.0)

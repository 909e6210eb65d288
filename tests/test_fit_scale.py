"""``klever-nb fit`` at survey scale (issue 20): chunked, lazily read, dask-parallel fits
give the same maps; a cube larger than a memory budget is fitted within it; failures at
scale are one line and leave no partial ``line_maps.nc``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from scipy.special import ndtr

from klever_nb import cli, fitting
from klever_nb.errors import KleverError
from klever_nb.io import open_cube

Z = 1.4
LINES = {"NII_6548": (6549.86, 0.3 / 2.94), "Halpha": (6564.61, 1.0),
         "NII_6584": (6585.27, 0.3), "SII_6717": (6718.29, 0.12), "SII_6731": (6732.67, 0.09)}
FIT_LINES = tuple(LINES)


def write_cube(path: Path, ny: int, nx: int, nw: int = 2048, seed: int = 0) -> Path:
    """KMOS-style H-band DATA/NOISE float32 cube (rotating disc, Hα+[NII]+[SII]), written
    in blocks of channels (bounded memory)."""
    rng = np.random.default_rng(seed)
    wave = np.linspace(1.456, 1.846, nw) * 1e4
    mid = 0.5 * (wave[1:] + wave[:-1])
    edges = np.concatenate([[2 * wave[0] - mid[0]], mid, [2 * wave[-1] - mid[-1]]])
    yy, xx = np.mgrid[0:ny, 0:nx]
    cy, cx = ny / 2 - 0.2, nx / 2 + 0.3
    scale = min(ny, nx) / 20
    vel = (150 * np.tanh((xx - cx) / (3 * scale))).ravel()
    ha = (60 * np.exp(-np.hypot(yy - cy, xx - cx) / (3 * scale))).ravel()
    header = fits.Header({"BUNIT": "1e-20 erg/s/cm2/Angstrom", "CTYPE3": "WAVE",
                          "CUNIT3": "um", "CRVAL3": 1.456, "CDELT3": (1.846 - 1.456) / (nw - 1),
                          "CRPIX3": 1.0, "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN",
                          "CDELT1": -0.2 / 3600, "CDELT2": 0.2 / 3600, "CRVAL1": 150.0,
                          "CRVAL2": 2.0, "CRPIX1": nx / 2, "CRPIX2": ny / 2})
    primary = fits.PrimaryHDU()
    primary.header["INSTRUME"] = "KMOS"
    primary.header["HIERARCH ESO INS GRAT1 NAME"] = "H"
    primary.writeto(path, overwrite=True)
    for name in ("DATA", "NOISE"):
        hdr = fits.ImageHDU(name=name, header=header.copy()).header
        hdr.update(BITPIX=-32, NAXIS=3, NAXIS1=nx, NAXIS2=ny, NAXIS3=nw)
        stream = fits.StreamingHDU(str(path), hdr)
        block = 64
        for c0 in range(0, nw, block):
            c1 = min(nw, c0 + block)
            if name == "NOISE":
                stream.write(np.ones((c1 - c0, ny, nx), dtype=">f4"))
                continue
            plane = np.full((c1 - c0, ny * nx), 0.2)
            for lam_rest, rel in LINES.values():
                lam0 = lam_rest * (1 + Z)
                s = lam0 * np.hypot(60 / 299792.458, 1 / (4045 * 2.3548))
                if edges[c1] < lam0 * 0.997 or edges[c0] > lam0 * 1.003:
                    continue
                mu = lam0 * (1 + vel / 299792.458)
                prof = ndtr((edges[c0 + 1:c1 + 1, None] - mu) / s) - ndtr(
                    (edges[c0:c1, None] - mu) / s)
                plane += rel * ha * s * 2.5066 * prof / np.diff(edges)[c0:c1, None]
            plane += rng.standard_normal(plane.shape)
            stream.write(plane.reshape(c1 - c0, ny, nx).astype(">f4"))
        stream.close()
    return path


@pytest.fixture(scope="module")
def small_cube(tmp_path_factory):
    return write_cube(tmp_path_factory.mktemp("scale") / "cube.fits", 18, 15)


def _fit(cube, **kwargs):
    return fitting.fit_cube(cube, redshift=Z, lines=FIT_LINES,
                            fallback_kinematics={"halpha": (0.0, 60.0)}, **kwargs)


NUMERIC = ("flux", "flux_err", "velocity", "velocity_err", "sigma", "sigma_err", "snr",
           "pair_sum_err", "chi2_red", "continuum_image")


def assert_same_maps(a, b, tol=1e-10):
    for name in NUMERIC:
        x, y = a[name].values, b[name].values
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y), err_msg=name)
        ok = np.isfinite(x)
        np.testing.assert_allclose(y[ok], x[ok], rtol=tol, atol=tol, err_msg=name)
    for name in ("detected", "kinematics_forced", "converged", "fit_ok"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


@pytest.mark.slow
def test_serial_chunked_lazy_and_dask_fits_give_identical_maps(small_cube):
    """The eager cube in one batch, the lazily read cube in chunks of 7 and 50 spaxels,
    and the same on a 2-worker dask LocalCluster: the same maps to 1e-10."""
    from klever_nb.fitting.parallel import dask_mapper

    eager = open_cube(small_cube)
    serial = _fit(eager, chunk_size=10_000)
    lazy = open_cube(small_cube, lazy=True)
    assert int(serial.detected.sel(line="Halpha").sum()) > 30
    for chunk in (7, 50):
        assert_same_maps(serial, _fit(lazy, chunk_size=chunk))
    with dask_mapper("local", workers=2, progress=False) as mapper:
        parallel = _fit(lazy, chunk_size=23, mapper=mapper)
        assert mapper.calls >= 2  # pass 1 and pass 2 (and ratio errors) went to the cluster
    assert_same_maps(serial, parallel)


def test_numpy_path_on_chunks_agrees(small_cube, monkeypatch):
    lazy = open_cube(small_cube, lazy=True).isel(y=slice(4, 12), x=slice(3, 11))
    fast = _fit(lazy, chunk_size=9)
    monkeypatch.setattr(fitting.kernel, "USE_NUMBA", False)
    slow = _fit(lazy, chunk_size=30)
    np.testing.assert_allclose(slow.flux.values, fast.flux.values, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(slow.velocity.values, fast.velocity.values, rtol=1e-6,
                               atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_a_cube_larger_than_the_memory_budget_is_fitted_in_chunks_within_it(tmp_path):
    """(Linux: peak RSS from /proc.) 120x120x2048 float32 DATA+NOISE (236 MB on disk; 472 MB as float64 flux + noise, the
    whole-cube read the fit used to make) fitted by ``klever-nb fit`` in a subprocess: its
    peak RSS stays within the imports' own RSS + 250 MB (less than the float64 cube) and
    within 3x the file."""
    cube = write_cube(tmp_path / "big.fits", 120, 120)
    size_mb = cube.stat().st_size / 2**20
    float64_mb = 2 * 120 * 120 * 2048 * 8 / 2**20
    # VmHWM: the peak RSS of this process's own memory (ru_maxrss of a forked-and-exec'd
    # child starts at the parent's RSS at the fork, here pytest's)
    probe = ("import sys, json\n"
             "sys.argv = sys.argv[1:]\n"
             "if sys.argv[0] == 'imports':\n"
             "    import klever_nb.pipeline, klever_nb.fitting, klever_nb.cli  # noqa\n"
             "    from klever_nb.fitting import vpfit  # noqa\n"
             "else:\n"
             "    from klever_nb.cli import main\n"
             "    rc = main(sys.argv)\n"
             "    assert rc == 0, rc\n"
             "hwm = [line for line in open('/proc/self/status') if line.startswith('VmHWM')]\n"
             "print(json.dumps(int(hwm[0].split()[1]) / 1024))\n")
    env = dict(os.environ)

    def peak(*args):
        out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True,
                             text=True, env=env, timeout=110)
        assert out.returncode == 0, out.stderr[-2000:]
        return float(out.stdout.strip().splitlines()[-1])

    base_mb = peak("imports")
    fit_mb = peak("fit", str(cube), "--redshift", str(Z), "--out", str(tmp_path / "out"),
                  "--lines", ",".join(FIT_LINES))
    budget_mb = base_mb + 250
    assert float64_mb > 250  # the whole cube in float64 would not fit the budget
    print("peak RSS MB: imports", base_mb, "fit", fit_mb, "file", size_mb)
    assert fit_mb <= budget_mb, (fit_mb, base_mb)
    assert fit_mb <= 3 * size_mb, (fit_mb, size_mb)
    summary = json.loads((tmp_path / "out" / "big" / "summary.json").read_text())
    assert set(summary["timings_s"]) == {"open", "fit", "write"}


def test_unreachable_scheduler_is_one_line_and_writes_nothing(small_cube, tmp_path, capsys,
                                                               monkeypatch):
    from klever_nb.fitting import parallel

    monkeypatch.setattr(parallel, "CONNECT_TIMEOUT_S", 2)
    rc = cli.main(["fit", str(small_cube), "--redshift", str(Z), "--out", str(tmp_path),
                   "--scheduler", "tcp://127.0.0.1:9"])
    err = capsys.readouterr().err.strip()
    assert rc == cli.EXIT_USER_ERROR
    assert len(err.splitlines()) == 1 and "no dask scheduler answered" in err
    assert not list(tmp_path.rglob("line_maps.nc"))


def test_workers_without_local_scheduler_is_a_user_error(small_cube, tmp_path, capsys):
    rc = cli.main(["fit", str(small_cube), "--redshift", str(Z), "--out", str(tmp_path),
                   "--workers", "2"])
    assert rc == cli.EXIT_USER_ERROR
    assert "--workers needs --scheduler local" in capsys.readouterr().err


@pytest.mark.slow
def test_a_worker_that_dies_is_one_clear_error_and_nothing_is_written(small_cube, tmp_path):
    """A chunk task that kills its worker process: one KleverError line, no line_maps.nc."""
    from klever_nb import pipeline
    from klever_nb.fitting.parallel import dask_mapper

    def dying(*args):
        os._exit(1)

    with dask_mapper("local", workers=1, progress=False, allowed_failures=0) as mapper:
        def killing_mapper(fn, tasks):  # the chunk tasks sent to the cluster kill the worker
            return mapper(dying, tasks)

        with pytest.raises(KleverError, match="a dask worker died while fitting") as err:
            pipeline.fit_single_cube(small_cube, redshift=Z, out_dir=tmp_path,
                                     lines=FIT_LINES, mapper=killing_mapper)
    assert "\n" not in str(err.value)
    assert not list(tmp_path.rglob("line_maps.nc"))

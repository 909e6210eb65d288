"""End to end on a strongly lensed mock with its counter-image inside the cube (issue 21).

``klever-nb run`` on files written by the mock observatory; the headline numbers of
``summary.json`` (forward-modelled gradient, mu(Halpha), SFR, global O/H) are compared with
the mock's truth within their quoted errors: |recovered - true| < 3 sigma + a small floor
(the floor covers what the quoted error does not claim to include: the calibration spread of
the global O/H, the PSF model of mu). The grid-wide statistics are in
``benchmarks/bench_strong_lensing.py``.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from klever_nb import cli, mock
from klever_nb.io import mockfiles
from klever_nb.lensmodels import ParametricLens

#: |recovered - true| < N_SIGMA * quoted error + floor.
N_SIGMA = 3.0
FLOOR = {"gradient": 0.01,       # dex/kpc
         "mu_fraction": 0.10,    # of the true mu
         "sfr_fraction": 0.10,   # of the true SFR
         "global_oh": 0.05}      # dex


def _spec() -> mock.MockSpec:
    """An SIS double: arc (point mu +5) and counter-image (-3) 1.6" apart, both in the cube."""
    sis = ParametricLens(({"type": "SIS", "theta_e": 0.8, "center_x": 0.05,
                           "center_y": -0.05},))
    return mock.MockSpec(
        name="sl-e2e", redshift=1.45, shape=(24, 24), psf_fwhm_arcsec=0.55,
        halpha_flux=3e-17, scale_length_kpc=1.0, inclination_deg=40.0, pa_deg=125.0,
        centre_offset_arcsec=(0.05 + 0.2 * 0.6, -0.05 + 0.2 * 0.8), central_oh=8.45,
        gradient_dex_per_kpc=-0.05, ebv=0.2, v_max_kms=100.0, sigma_kms=60.0, lens=sis,
        z_lens=0.5, snr_halpha_peak=30.0, seed=21, log_mstar=9.5)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    spec = _spec()
    galaxy = mock.make_mock(spec)
    root = tmp_path_factory.mktemp("strong_lensing")
    toml = mockfiles.write_mock(galaxy, root / "input")
    assert cli.main(["run", str(toml), "--out", str(root / "out")]) in (0, None)
    summary = json.loads((root / "out" / spec.name / "summary.json").read_text())
    return spec, galaxy.truth, summary


def test_the_mock_is_a_double_with_the_counter_image_inside_the_cube():
    spec = _spec()
    half = 0.5 * spec.shape[0] * spec.pixel_scale_arcsec
    images = mock.lensed_images(spec.lens, spec.centre_offset_arcsec, half_size=half + 1)
    assert len(images) == 2
    assert [round(im["mu"], 2) for im in images] == [5.0, -3.0]
    for im in images:
        assert max(abs(im["theta_x"]), abs(im["theta_y"])) < half - spec.psf_fwhm_arcsec
    assert mock.make_mock(spec).truth["mu"] == pytest.approx(8.0, rel=0.1)


def _check(rec, err, true, floor, what):
    assert rec is not None and err is not None, f"{what}: missing from summary.json"
    assert abs(rec - true) < N_SIGMA * err + floor, (
        f"{what}: recovered {rec:.4g} +- {err:.3g}, true {true:.4g} "
        f"(|diff| = {abs(rec - true):.3g} > {N_SIGMA:g} sigma + {floor:.3g})")


@pytest.mark.slow
def test_forward_gradient_matches_the_truth(run):
    spec, truth, summary = run
    _check(summary.get("gradient_forward_dex_per_kpc"), summary.get("gradient_forward_err"),
           truth["gradient_dex_per_kpc"], FLOOR["gradient"], "forward gradient")


@pytest.mark.slow
def test_headline_magnification_matches_the_truth(run):
    spec, truth, summary = run
    _check(summary.get("mu_halpha"), summary.get("mu_halpha_err"), truth["mu"],
           FLOOR["mu_fraction"] * truth["mu"], "mu_halpha")


@pytest.mark.slow
def test_sfr_matches_the_truth(run):
    spec, truth, summary = run
    _check(summary.get("sfr"), summary.get("sfr_err"), truth["sfr"],
           FLOOR["sfr_fraction"] * truth["sfr"], "SFR")


@pytest.mark.slow
def test_global_metallicity_matches_the_truth(run):
    spec, truth, summary = run
    err = summary.get("global_oh_err")
    err = max(err) if isinstance(err, list) else err
    _check(summary.get("global_oh"), err, truth["global_oh"], FLOOR["global_oh"],
           "global 12+log(O/H)")


def test_benchmark_jacobian_source_psf_of_an_sis():
    """The benchmark's source-PSF prediction: FWHM along the radial axis, FWHM / mu_t across."""
    import importlib.util
    from pathlib import Path

    from klever_nb import cosmology

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_strong_lensing.py"
    loader = importlib.util.spec_from_file_location("bench_strong_lensing", path)
    bench = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(bench)
    sis = ParametricLens(({"type": "SIS", "theta_e": 1.0},))
    spec = mock.MockSpec(name="psf", redshift=1.5, shape=(30, 30), lens=sis, z_lens=0.5,
                         centre_offset_arcsec=(0.0, 1.5))  # outside the cut: one image
    kpc = cosmology.kpc_per_arcsec(1.5)
    pred = bench.psf_prediction(spec, 0.6)
    assert len(pred["images"]) == 1 and pred["images"][0]["mu"] == pytest.approx(1 + 1 / 1.5)
    for key in ("brightest_kpc", "stack_kpc", "stack_moments_kpc"):
        assert pred[key] == pytest.approx([0.6 * kpc, 0.6 * kpc / (1 + 1 / 1.5)], rel=1e-3)
    assert pred["stack_theta_deg"] == pytest.approx(90.0, abs=0.1)  # radial = +y here
    double = bench.psf_prediction(dataclasses.replace(spec, centre_offset_arcsec=(0.0, 0.5)),
                                  0.6)
    assert [round(im["mu"], 6) for im in double["images"]] == [3.0, -1.0]
    assert double["brightest_kpc"] == pytest.approx([0.6 * kpc, 0.2 * kpc], rel=1e-3)
    # the round PSF of the mu = -1 counter-image widens the stack's minor axis
    assert 0.2 * kpc < double["stack_kpc"][1] < double["stack_moments_kpc"][1] < 0.6 * kpc

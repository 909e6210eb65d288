"""Galaxy and sample TOML validation: every mistake is one line naming the file and key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from klever_nb.config import AnalysisSettings, load_galaxy, load_sample
from klever_nb.errors import ConfigError

GOOD = """
name = "MACS1149-sp1"
redshift = 1.489
instrument = "KMOS"

[cubes]
YJ = "cubes/yj.fits"
H = "cubes/h.fits"

[psf]
fwhm_arcsec = 0.55

[lens]
deflection_x = "lens/dx.fits"
deflection_y = "lens/dy.fits"
z_lens = 0.542
normalisation = "dls_ds"

[properties]
log_mstar = 9.76

[analysis]
smooth_fwhm_arcsec = 0.4
diagnostics = ["R3", "N2"]
centre = [177.39, 22.40]
"""


def _write(tmp_path: Path, text: str) -> Path:
    for rel in ("cubes/yj.fits", "cubes/h.fits", "lens/dx.fits", "lens/dy.fits"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    path = tmp_path / "galaxy.toml"
    path.write_text(textwrap.dedent(text))
    return path


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_galaxy(_write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message
    assert "galaxy.toml" in message
    return message


def test_good_file_is_parsed_with_paths_relative_to_it(tmp_path):
    cfg = load_galaxy(_write(tmp_path, GOOD))
    assert cfg.name == "MACS1149-sp1" and cfg.redshift == 1.489 and cfg.lensed
    assert cfg.cubes["H"] == (tmp_path / "cubes/h.fits").resolve()
    assert cfg.lens.z_lens == 0.542 and cfg.lens.normalisation == "dls_ds"
    assert cfg.analysis.diagnostics == ("R3", "N2")
    assert cfg.analysis.centre == (177.39, 22.40)
    assert cfg.properties == {"log_mstar": 9.76}


def test_defaults_are_the_papers():
    settings = AnalysisSettings()
    assert settings.smooth_fwhm_arcsec == 0.4  # K20 §3.1
    assert settings.fibre_radius_arcsec == 0.6  # K20 §3.1
    assert (settings.snr_strong, settings.snr_weak) == (5.0, 2.5)  # K20 §4.2
    assert settings.method == "default" and not settings.exclude_agn_pixels  # K20 §3.4


def test_unlensed_galaxy_has_no_lens(tmp_path):
    text = GOOD.split("[lens]")[0] + "[properties]\nlog_mstar = 9.0\n"
    cfg = load_galaxy(_write(tmp_path, text))
    assert not cfg.lensed


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t.replace('name = "MACS1149-sp1"', 'name = "x"\ncolour = "red"'), "colour"),
        (lambda t: t.replace("smooth_fwhm_arcsec = 0.4", "smoothing = 0.4"), "analysis.smoothing"),
        (lambda t: t.replace("redshift = 1.489", 'redshift = "high"'), "redshift must be a number"),
        (lambda t: t.replace("redshift = 1.489", "redshift = 12.0"), "out of range"),
        (lambda t: t.replace('YJ = "cubes/yj.fits"', 'J = "cubes/yj.fits"'), "cubes.J"),
        (lambda t: t.replace('H = "cubes/h.fits"', 'H = "cubes/missing.fits"'), "cubes.H"),
        (lambda t: t.replace("z_lens = 0.542", "z_lens = 2.0"), "lens.z_lens"),
        (lambda t: t.replace('normalisation = "dls_ds"', 'normalisation = "other"'),
         "lens.normalisation"),
        (lambda t: t.replace("fwhm_arcsec = 0.55", "fwhm_arcsec = -1"), "psf.fwhm_arcsec"),
        (lambda t: t.replace('centre = [177.39, 22.40]', 'centre = "middle"'), "analysis.centre"),
        (lambda t: t.replace("[cubes]", "[cubes\n"), "TOML syntax error"),
        (lambda t: t.replace("smooth_fwhm_arcsec = 0.4", 'method = "paper"'), "analysis.method"),
        (lambda t: t.replace("smooth_fwhm_arcsec = 0.4", 'exclude_agn_pixels = "yes"'),
         "analysis.exclude_agn_pixels"),
        (lambda t: t.replace('deflection_y = "lens/dy.fits"\n', ""), "lens.deflection_y"),
    ],
)
def test_each_mistake_gets_one_line_naming_the_key(tmp_path, edit, expected):
    assert expected in _error(tmp_path, edit(GOOD))


def test_missing_galaxy_file():
    with pytest.raises(ConfigError, match="file not found"):
        load_galaxy("/nonexistent/galaxy.toml")


def test_sample_lists_galaxies_and_folders(tmp_path):
    galaxy = _write(tmp_path / "g1", GOOD)
    (tmp_path / "more" / "g2").mkdir(parents=True)
    other = _write(tmp_path / "more" / "g2", GOOD)
    sample = tmp_path / "sample.toml"
    sample.write_text('galaxies = ["g1/galaxy.toml"]\nfolders = ["more"]\n')
    assert load_sample(sample) == [galaxy.resolve(), other.resolve()]
    sample.write_text('galaxies = ["nope/galaxy.toml"]\n')
    with pytest.raises(ConfigError, match="galaxies"):
        load_sample(sample)

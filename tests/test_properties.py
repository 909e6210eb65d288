"""Property-based tests of the readers (issue 18): bad input ends in a correct result or one clear error.

Hypothesis writes random FITS cubes (headers with missing or odd WCS keys, negative or
zero CDELT3, CUNIT3 in Å/nm/µm/m or absent or junk, BUNIT variants, random shapes, NaN
and inf patches, noise that is all zero/negative/NaN, masks that cover everything,
byte-truncated files) and random galaxy TOML files (wrong types, unknown keys, missing,
absolute and ``..`` paths, truncated text). Every case must end in

* a correct result: for cubes, a Dataset whose ``wave`` axis equals the one computed
  here from the header that was written (vacuum µm, increasing) and whose data are the
  written data at those wavelengths; for TOML files, a GalaxyConfig whose paths are the
  TOML folder joined with what was written; or
* one :class:`klever_nb.errors.KleverError` with a one-line message naming the file,

never another exception, a hang or a wrong axis. The outcomes are counted and written
to ``benchmarks/results/reliability_properties.json`` (and printed with ``-s``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from klever_nb.config import load_galaxy  # noqa: E402
from klever_nb.errors import KleverError  # noqa: E402
from klever_nb.io import open_cube  # noqa: E402
from klever_nb.io.cubes import air_to_vacuum  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "reliability_properties.json"

#: Small enough that the file runs in well under a minute on a shared core.
CUBE_EXAMPLES = int(os.environ.get("KLEVER_NB_PROPERTY_EXAMPLES", "150"))
TOML_EXAMPLES = int(os.environ.get("KLEVER_NB_PROPERTY_EXAMPLES", "150"))
SETTINGS = dict(deadline=5000, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

OUTCOMES: dict[str, Counter] = {"open_cube": Counter(), "open_cube_lazy": Counter(),
                                "load_galaxy": Counter()}

# ---------------------------------------------------------------------------
# Cubes
# ---------------------------------------------------------------------------
#: CUNIT3 text -> metres per unit (None: not a length the reader must accept).
UNITS = {"um": 1e-6, "micron": 1e-6, "Angstrom": 1e-10, "nm": 1e-9, "m": 1.0,
         "MHz": None, "furlong-ish": None, "deg": None}
#: Typical CRVAL3 (in the unit) of a near-IR cube.
CRVAL_IN = {"um": 1.5, "micron": 1.5, "Angstrom": 15000.0, "nm": 1500.0, "m": 1.5e-6}
CTYPES = ["WAVE", "AWAV", "WAVE-LOG", "LAMBDA", "LINEAR", "FREQ", "VELO-LSR", "", None]
BUNITS = ["1e-20 erg/s/cm2/Angstrom", "erg/s/cm2/A", "10**(-17) erg s-1 cm-2 AA-1",
          "1e-20 erg/s/cm**2/Angstrom/arcsec**2", "MJy/sr", "Jy", "ADU", "counts", "",
          None, "not a unit", "erg/s/cm2/Hz"]


@st.composite
def cube_cases(draw):
    """A valid cube description (random shape, units, layout), then up to two faults."""
    nwave = draw(st.integers(1, 40))
    ny, nx = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    ctype = draw(st.sampled_from(["WAVE", "AWAV", "WAVE-LOG", "LAMBDA", "LINEAR"]))
    cunit = draw(st.sampled_from(["um", "micron", "Angstrom", "nm", "m", None]))
    unit_for_value = cunit if cunit in CRVAL_IN else draw(st.sampled_from(list(CRVAL_IN)))
    crval = CRVAL_IN[unit_for_value] * draw(st.sampled_from([1.0, 1.37, 0.6]))
    step_rel = draw(st.sampled_from([1e-4, -1e-4, 3e-3, -3e-3]))
    case = dict(nwave=nwave, ny=ny, nx=nx, ctype=ctype, cunit=cunit, crval=crval,
                cdelt=crval * step_rel, step_key=draw(st.sampled_from(["CDELT3", "CD3_3",
                                                                        "PC3_3"])),
                crpix=draw(st.sampled_from([1.0, 0.0, nwave / 2.0, -3.5])),
                bunit=draw(st.sampled_from(BUNITS[:-2])),
                layout=draw(st.sampled_from(["bare", "DATA/NOISE", "DATA/STAT", "SCI/ERR",
                                             "FLUX/IVAR"])),
                noise_mode=draw(st.sampled_from(["ok", "patches"])),
                flux_mode=draw(st.sampled_from(["ok", "nan_patch", "inf_patch"])),
                mask_mode=draw(st.sampled_from([None, "some"])),
                celestial=draw(st.sampled_from(["good", "none", "broken", "cd"])),
                truncate=None, seed=draw(st.integers(0, 2**16)),
                unit_for_value=unit_for_value)
    faults = draw(st.lists(st.sampled_from(sorted(FAULTS)), max_size=2, unique=True))
    for fault in faults:
        key, choices = FAULTS[fault]
        case[key] = draw(st.sampled_from(choices))
        if fault == "crval" and isinstance(case["crval"], float):
            case["cdelt"] = case["crval"] * step_rel if case["crval"] else step_rel
    case["faults"] = faults
    return case


#: Fault name -> (case key, values): what a broken pipeline or a careless edit produces.
FAULTS = {
    "ctype": ("ctype", ["FREQ", "VELO-LSR", "", None, "WAVE-TAB", "wave"]),
    "cunit": ("cunit", ["MHz", "furlong-ish", "", "deg"]),
    "crval": ("crval", [0.0, -1.5, 1e30, "1.5"]),
    "crpix": ("crpix", [True, "one"]),
    "cdelt": ("cdelt", [0.0, "abc"]),
    "no_step": ("step_key", [None]),
    "bunit": ("bunit", ["not a unit", "erg/s/cm2/Hz", "1e-20 W/m2/furlong", "10**(-20 Jy"]),
    "noise": ("noise_mode", ["zero", "negative", "nan"]),
    "flux": ("flux_mode", ["all_nan"]),
    "mask": ("mask_mode", ["all"]),
    "truncate": ("truncate", [0.3, 0.9, 0.999, 10, 0]),
}


def _write_cube(case: dict, path: Path) -> dict:
    """Write the case's FITS file; return the arrays written (before truncation)."""
    rng = np.random.default_rng(case["seed"])
    shape = (case["nwave"], case["ny"], case["nx"])
    flux = rng.normal(5.0, 1.0, shape)
    sigma = rng.uniform(0.5, 1.5, shape)
    if case["flux_mode"] == "nan_patch":
        flux[:, :1, :1] = np.nan
    elif case["flux_mode"] == "inf_patch":
        flux[: max(1, shape[0] // 2), -1:, -1:] = np.inf
    elif case["flux_mode"] == "all_nan":
        flux[:] = np.nan
    noise = sigma.copy()
    if case["noise_mode"] == "zero":
        noise[:] = 0.0
    elif case["noise_mode"] == "negative":
        noise = -noise
    elif case["noise_mode"] == "nan":
        noise[:] = np.nan
    elif case["noise_mode"] == "patches":
        noise[:, :1, :] = 0.0
        noise[:1] = np.nan
    stored = {"DATA/NOISE": noise, "SCI/ERR": noise, "DATA/STAT": np.sign(noise) * noise**2,
              "FLUX/IVAR": np.where(noise > 0, 1.0 / np.where(noise > 0, noise, 1.0)**2,
                                    noise), "bare": None}[case["layout"]]
    mask = None
    if case["mask_mode"] == "some":
        mask = np.zeros(shape, dtype=np.int16)
        mask[:, 0, :] = 1
    elif case["mask_mode"] == "all":
        mask = np.ones(shape, dtype=np.int16)

    header = fits.Header()
    if case["ctype"] is not None:
        header["CTYPE3"] = case["ctype"]
    if case["cunit"] is not None:
        header["CUNIT3"] = case["cunit"]
    header["CRVAL3"] = case["crval"]
    header["CRPIX3"] = case["crpix"]
    if case["step_key"] == "CDELT3":
        header["CDELT3"] = case["cdelt"]
    elif case["step_key"] == "CD3_3":
        header["CD3_3"] = case["cdelt"]
    elif case["step_key"] == "PC3_3":
        header["PC3_3"] = 2.0
        header["CDELT3"] = case["cdelt"] / 2.0
    if case["bunit"] is not None:
        header["BUNIT"] = case["bunit"]
    if case["celestial"] in ("good", "cd"):
        header.update(CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CRVAL1=150.0, CRVAL2=2.0,
                      CRPIX1=1.0, CRPIX2=1.0, CUNIT1="deg", CUNIT2="deg")
        if case["celestial"] == "good":
            header.update(CDELT1=-0.1 / 3600, CDELT2=0.1 / 3600)
        else:
            header.update(CD1_1=-0.1 / 3600, CD2_2=0.1 / 3600, CD1_2=0.0, CD2_1=0.0)
    elif case["celestial"] == "broken":
        header.update(CTYPE1="RA---TAN", CTYPE2="GLAT-XYZ", CRVAL1="oops", CDELT1=0.0)

    name = {"DATA/NOISE": ("DATA", "NOISE"), "DATA/STAT": ("DATA", "STAT"),
            "SCI/ERR": ("SCI", "ERR"), "FLUX/IVAR": ("FLUX", "IVAR"), "bare": (None, None)}
    data_name, noise_name = name[case["layout"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if data_name is None:
            hdus = [fits.PrimaryHDU(flux.astype(np.float32), header=header)]
        else:
            hdus = [fits.PrimaryHDU(),
                    fits.ImageHDU(flux.astype(np.float32), header=header, name=data_name),
                    fits.ImageHDU(stored.astype(np.float32), name=noise_name)]
        if mask is not None:
            hdus.append(fits.ImageHDU(mask, name="MASK" if case["layout"] != "SCI/ERR"
                                      else "DQ"))
        fits.HDUList(hdus).writeto(path, overwrite=True)
    size = path.stat().st_size
    if case["truncate"] is not None:
        keep = (int(case["truncate"]) if case["truncate"] >= 1
                else int(size * case["truncate"]))
        with open(path, "r+b") as handle:
            handle.truncate(keep)
    return {"flux": flux.astype(np.float32).astype(np.float64),
            "noise": None if stored is None else noise.astype(np.float32).astype(np.float64),
            "mask": mask, "truncated": case["truncate"] is not None}


def expected_wave(case: dict) -> tuple[np.ndarray | None, str]:
    """The wavelength axis (vacuum µm, increasing) the header describes, or None + why not."""
    ctype = (case["ctype"] or "").strip().upper()
    if not isinstance(case["cdelt"], float) and case["step_key"] is not None:
        return None, "CDELT3 not a number"
    if not all(isinstance(case[k], float) for k in ("crval", "crpix")):
        return None, "CRVAL3/CRPIX3 not a number"
    if not ctype:
        return None, "no CTYPE3"
    code, _, algo = ctype.partition("-")
    if ctype in ("LAMBDA", "LINEAR"):
        medium = None
    elif code in ("WAVE", "AWAV") and algo in ("", "LOG"):
        medium = "air" if code == "AWAV" else "vacuum"
    else:
        return None, "CTYPE3 not a wavelength"
    cunit = case["cunit"]
    if cunit:
        metres = UNITS[cunit]
        if metres is None:
            return None, "CUNIT3 not a length"
    else:  # the documented rule: > 100 Å, > 1e-3 µm, else m (from |CRVAL3|)
        typical = abs(case["crval"])
        metres = 1e-10 if typical > 100 else (1e-6 if typical > 1e-3 else 1.0)
    step = {"CDELT3": case["cdelt"], "CD3_3": case["cdelt"], "PC3_3": case["cdelt"],
            None: 1.0}[case["step_key"]]
    pix = np.arange(case["nwave"], dtype=np.float64) + 1.0 - case["crpix"]
    if algo == "LOG":
        if case["crval"] <= 0:
            return None, "log axis with CRVAL3 <= 0"
        native = case["crval"] * np.exp(step * pix / case["crval"])
    else:
        native = case["crval"] + step * pix
    wave = native * metres * 1e6
    if not np.all(np.isfinite(wave)) or np.any(wave <= 0):
        return None, "non-positive wavelengths"
    if wave.size > 1 and np.any(np.diff(wave) == 0):
        return None, "constant wavelengths"
    if medium is None:
        medium = "vacuum" if wave.min() >= 1.0 else "air"
    if medium == "air":
        wave = air_to_vacuum(wave)
    return np.sort(wave), ""


def _usable(case: dict, written: dict) -> np.ndarray:
    flux = written["flux"]
    ok = np.isfinite(flux)
    if written["noise"] is not None:
        ok &= np.isfinite(written["noise"]) & (written["noise"] > 0)
    if written["mask"] is not None:
        ok &= written["mask"] == 0
    return ok


def check_cube(case: dict, lazy: bool = False) -> str:
    """Run one case; return the outcome ('result' or 'error'); assert it is a correct one."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cube.fits"
        written = _write_cube(case, path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cube = open_cube(path, lazy=lazy)
                cube.load()
        except KleverError as err:
            message = str(err)
            assert "\n" not in message and str(path) in message, message
            return "error"
        # a Dataset: it must be a correct one
        wave, why = expected_wave(case)
        assert wave is not None, f"read a cube whose header has {why}: {case}"
        got = cube["wave"].values
        np.testing.assert_allclose(got, wave, rtol=1e-9, err_msg=str(case))
        assert cube["flux"].dims == ("wave", "y", "x")
        assert cube["flux"].shape == (case["nwave"], case["ny"], case["nx"])
        flux, noise = cube["flux"].values, cube["noise"].values
        assert not np.isinf(flux).any() and not np.isinf(noise).any()
        assert np.array_equal(np.isnan(flux), np.isnan(noise))
        assert np.all(noise[np.isfinite(noise)] > 0)
        usable = _usable(case, written)
        assert usable.any() or written["noise"] is None, "read a cube with nothing usable"
        # the written data at the returned wavelengths (a negative step reverses the axis)
        order = np.argsort(expected_wave_unsorted(case))
        truth = written["flux"][order]
        finite = np.isfinite(flux)
        if written["noise"] is not None:
            assert np.array_equal(finite, usable[order]), case
        if cube["flux"].attrs.get("units", "") and "Hz" not in str(case["bunit"]) \
                and "Jy" not in str(case["bunit"]):
            np.testing.assert_allclose(flux[finite], truth[finite], rtol=1e-6)
        return "result"


def expected_wave_unsorted(case: dict) -> np.ndarray:
    step = {"CDELT3": case["cdelt"], "CD3_3": case["cdelt"], "PC3_3": case["cdelt"],
            None: 1.0}[case["step_key"]]
    return step * (np.arange(case["nwave"]) + 1.0 - case["crpix"])


@settings(max_examples=CUBE_EXAMPLES, **SETTINGS)
@given(cube_cases())
def test_open_cube_gives_a_correct_dataset_or_one_clear_error(case):
    try:
        outcome = check_cube(case)
    except AssertionError:
        OUTCOMES["open_cube"]["other"] += 1
        raise
    except KleverError:
        raise
    except Exception:
        OUTCOMES["open_cube"]["other"] += 1
        raise
    OUTCOMES["open_cube"][outcome] += 1


@settings(max_examples=max(CUBE_EXAMPLES // 2, 10), **SETTINGS)
@given(cube_cases())
def test_lazy_open_cube_gives_a_correct_dataset_or_one_clear_error(case):
    """The memory-mapped reader of large cubes (``lazy=True``) keeps the same promise."""
    try:
        outcome = check_cube(case, lazy=True)
    except Exception:
        OUTCOMES["open_cube_lazy"]["other"] += 1
        raise
    OUTCOMES["open_cube_lazy"][outcome] += 1


@pytest.mark.parametrize("noise_mode", ["zero", "negative", "nan"])
@pytest.mark.parametrize("layout", ["DATA/NOISE", "DATA/STAT", "FLUX/IVAR"])
def test_cube_without_any_usable_spaxel_is_an_error_naming_the_hdu(tmp_path, noise_mode,
                                                                    layout):
    """Zero, negative or NaN noise everywhere: one line naming file, noise HDU and reason."""
    case = dict(nwave=20, ny=3, nx=4, ctype="WAVE", cunit="um", crval=2.0, cdelt=2e-4,
                step_key="CDELT3", crpix=1.0, bunit="1e-20 erg/s/cm2/Angstrom", layout=layout,
                noise_mode=noise_mode, flux_mode="ok", mask_mode=None, celestial="good",
                truncate=None, seed=1, unit_for_value="um")
    path = tmp_path / "cube.fits"
    _write_cube(case, path)
    noise_hdu = layout.split("/")[1]
    with pytest.raises(KleverError, match=rf"cube.fits, HDU '{noise_hdu}': no usable spaxel"):
        open_cube(path)


def test_mask_covering_every_voxel_is_an_error_naming_the_mask(tmp_path):
    case = dict(nwave=20, ny=3, nx=4, ctype="WAVE", cunit="um", crval=2.0, cdelt=2e-4,
                step_key="CDELT3", crpix=1.0, bunit="1e-20 erg/s/cm2/Angstrom",
                layout="DATA/NOISE", noise_mode="ok", flux_mode="ok", mask_mode="all",
                celestial="good", truncate=None, seed=1, unit_for_value="um")
    path = tmp_path / "cube.fits"
    _write_cube(case, path)
    with pytest.raises(KleverError, match=r"HDU 'MASK': no usable spaxel: the mask flags"):
        open_cube(path)


def test_all_nan_flux_is_an_error_naming_the_data_hdu(tmp_path):
    case = dict(nwave=20, ny=3, nx=4, ctype="WAVE", cunit="um", crval=2.0, cdelt=2e-4,
                step_key="CDELT3", crpix=1.0, bunit="", layout="DATA/NOISE", noise_mode="ok",
                flux_mode="all_nan", mask_mode=None, celestial="good", truncate=None, seed=1,
                unit_for_value="um")
    path = tmp_path / "cube.fits"
    _write_cube(case, path)
    with pytest.raises(KleverError, match=r"HDU 'DATA': no usable spaxel: the flux is NaN"):
        open_cube(path)


# ---------------------------------------------------------------------------
# Galaxy TOML files
# ---------------------------------------------------------------------------
def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


def _toml_text(data: dict) -> str:
    top = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    tables = [f"\n[{k}]\n" + "\n".join(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())
              for k, v in data.items() if isinstance(v, dict)]
    return "\n".join(top) + "\n" + "\n".join(tables) + "\n"


scalars = st.one_of(st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True),
                    st.booleans(), st.text(max_size=8), st.lists(st.integers(), max_size=2))
#: Paths a user may write: relative ones that exist, that do not, absolute and escaping ones.
CUBE_PATHS = ["cubes/H.fits", "./cubes/H.fits", "cubes/../cubes/H.fits", "missing.fits",
              "../outside/H.fits", "/etc/passwd", "cubes", "", "cubes/H.fits\x00"]


#: TOML fault -> how it breaks a valid galaxy file.
TOML_FAULTS = ("name", "redshift", "instrument", "band", "cube_path", "psf", "analysis",
               "lens", "unknown_top", "missing_key", "truncate", "garbage", "binary")


@st.composite
def toml_cases(draw):
    """A valid galaxy file (random bands, paths spelt in several ways), then up to two faults."""
    bands = draw(st.lists(st.sampled_from(["YJ", "H", "K"]), min_size=1, max_size=3,
                          unique=True))
    good_paths = ["cubes/H.fits", "./cubes/H.fits", "cubes/../cubes/H.fits", "../outside/H.fits"]
    data: dict = {"name": draw(st.sampled_from(["g1", "MACS1149-sp1", "é ü"])),
                  "redshift": draw(st.sampled_from([1.4, 2.2, 0.8])), "instrument": "KMOS",
                  "cubes": {b: draw(st.sampled_from(good_paths)) for b in bands},
                  "psf": {"fwhm_arcsec": draw(st.sampled_from([0.5, 0.61]))}}
    if draw(st.booleans()):
        data["analysis"] = {"smooth_fwhm_arcsec": draw(st.sampled_from([0.0, 0.4])),
                            "method": draw(st.sampled_from(["default", "k20"]))}
    faults = draw(st.lists(st.sampled_from(TOML_FAULTS), max_size=2, unique=True))
    mutate, cut = None, draw(st.floats(0.0, 1.0))
    for fault in faults:
        if fault == "name":
            data["name"] = draw(st.one_of(st.just(""), scalars))
        elif fault == "redshift":
            data["redshift"] = draw(st.one_of(st.sampled_from([0.0, -1.0, 30.0, "1.4"]),
                                              scalars))
        elif fault == "instrument":
            data["instrument"] = draw(st.sampled_from(["MUSE", "kmos", "", "SINFONI"]))
        elif fault == "band":
            data["cubes"][draw(st.sampled_from(["J", "Q", "h", ""]))] = "cubes/H.fits"
        elif fault == "cube_path":
            data["cubes"][bands[0]] = draw(st.one_of(st.sampled_from(CUBE_PATHS[3:]), scalars))
        elif fault == "psf":
            data["psf"] = draw(st.sampled_from([{}, {"fwhm_arcsec": 0.0},
                                                {"fwhm_arcsec": -1.0}, {"fwhm": 0.5},
                                                {"fwhm_arcsec": "0.5"}]))
        elif fault == "analysis":
            data["analysis"] = {draw(st.sampled_from(["smooth_fwhm_arcsec", "lines", "centre",
                                                      "method", "typo_key", "diagnostics"])):
                                draw(scalars)}
        elif fault == "lens":
            data["lens"] = {"z_lens": draw(st.sampled_from([0.4, 5.0, "x"])),
                            "deflection_x": draw(st.sampled_from(CUBE_PATHS)),
                            "deflection_y": "cubes/H.fits"}
        elif fault == "unknown_top":
            data["unknown_top"] = 1
        elif fault == "missing_key":
            data.pop(draw(st.sampled_from(["name", "redshift", "cubes", "psf"])), None)
        else:
            mutate = fault
    return data, mutate, cut


def check_toml(data: dict, mutate, cut: float) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "galaxy"
        (folder / "cubes").mkdir(parents=True)
        (folder / "cubes" / "H.fits").write_bytes(b"SIMPLE  =                    T")
        (Path(tmp) / "outside").mkdir()
        (Path(tmp) / "outside" / "H.fits").write_bytes(b"x")
        text = _toml_text(data)
        if mutate == "truncate":
            text = text[: int(len(text) * cut)]
        elif mutate == "garbage":
            text = text.replace("=", "==", 1)
        path = folder / "galaxy.toml"
        if mutate == "binary":
            path.write_bytes(b"\xff\xfe\x00name = 1" + text.encode()[:20])
        else:
            path.write_text(text)
        try:
            cfg = load_galaxy(path)
        except KleverError as err:
            message = str(err)
            assert "\n" not in message and str(path.resolve()) in message, message
            return "error"
        assert cfg.path == path.resolve()
        assert math.isfinite(cfg.redshift) and cfg.redshift > 0
        for band, cube in cfg.cubes.items():
            written = data["cubes"][band] if mutate is None else None
            if written is not None:
                assert cube == (folder / written).resolve(), (band, cube, written)
            assert cube.is_file()
        return "result"


@settings(max_examples=TOML_EXAMPLES, **SETTINGS)
@given(toml_cases())
def test_load_galaxy_gives_a_correct_config_or_one_clear_error(case):
    try:
        outcome = check_toml(*case)
    except KleverError:
        raise
    except Exception:
        OUTCOMES["load_galaxy"]["other"] += 1
        raise
    OUTCOMES["load_galaxy"][outcome] += 1


def test_zz_outcome_table():
    """Print and store the counts (runs last in this file; skipped when run alone)."""
    if not any(OUTCOMES.values()):
        pytest.skip("the property tests did not run in this process")
    table = {name: {"tried": sum(c.values()), "clear_error": c["error"],
                    "correct_result": c["result"], "anything_else": c["other"]}
             for name, c in OUTCOMES.items()}
    lines = [f"{'reader':<15} {'tried':>6} {'error':>6} {'result':>7} {'other':>6}"]
    for name, row in table.items():
        lines.append(f"{name:<15} {row['tried']:>6} {row['clear_error']:>6} "
                     f"{row['correct_result']:>7} {row['anything_else']:>6}")
    print("\n" + "\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"issue": 18, "examples_per_test": CUBE_EXAMPLES,
                                   "outcomes": table}, indent=2) + "\n")
    assert all(row["anything_else"] == 0 for row in table.values())

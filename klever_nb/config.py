"""Galaxy and sample configuration: TOML files parsed with :mod:`tomllib`, validated up front.

Every problem (syntax error, unknown key, wrong type, missing file, a band the
instrument does not have, a redshift out of range) raises :class:`ConfigError`
with one line naming the file and the key. Defaults follow the paper (K20) and
cite their section. The layout is DESIGN.md "Galaxy file (TOML)".
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from klever_nb import constants, sky  # sky: the mask threshold's one definition
from klever_nb.errors import ConfigError

#: ``[analysis] method`` / ``klever-nb run --method``: this package's estimators or the paper's.
METHODS = ("default", "k20")


@dataclass(frozen=True)
class AnalysisSettings:
    """Analysis choices of one galaxy; every default is the paper's.

    Attributes
    ----------
    smooth_fwhm_arcsec : float
        Gaussian smoothing of the cubes before fitting (K20 §3.1: 0.4").
    fibre_radius_arcsec : float
        Pseudo-fibre radius of the integrated spectra (K20 §3.1: 0.6").
    detection_snr : float
        Line detection threshold (K20 §3.1: 3).
    sky_min_relative_amplitude : float
        OH lines brighter than this fraction of the reference OH line are masked: one sky
        brightness in every band (:data:`klever_nb.sky.MASK_MIN_RELATIVE_AMPLITUDE`, K20 §3.1).
    lines : tuple of str or None
        Lines to fit (default: the paper's lines that fall in each band).
    diagnostics : tuple of str or None
        Metallicity diagnostics (default: chosen by redshift and detections, K20 §3.4, §4.2).
    calibration_set : str
        Strong-line calibrations (K20 uses C17/C19 = "C20" here).
    snr_strong, snr_weak : float
        Per-pixel SNR thresholds for Halpha/[OIII] and for other lines (K20 §4.2: 5, 2.5).
    centre : str or tuple
        Gradient centre: "continuum", "halpha" or (ra_deg, dec_deg) (K20 §4.2).
    source_pixel_arcsec : float or None
        Source-plane pixel (default: the lens-map pixel, K20 §3.2.3).
    step_fraction : float
        Annulus step as a fraction of the source-PSF linear size (K20 §4.2).
    metallicity_method : str
        "grid" (exact posterior on a grid) or "emcee" (K20 §3.4).
    forward_gradient : bool
        Also fit the forward-modelled gradient (beyond the paper).
    method : {"default", "k20"}
        ``"default"``: the headline numbers come from the estimators injection–recovery shows
        to be unbiased (forward-modelled μ(Hα); the source PSF of the maps as fitted, seeing
        ⊕ smoothing). ``"k20"``: the paper's choices everywhere (μ(Hα) as image/source Hα
        flux, the source PSF from the seeing alone, no forward-modelled gradient), for users
        who need the paper's numbers. The paper's estimators are in the products either way,
        under their own names (``mu_halpha_k20``, ``mu_maps_k20``).
    exclude_agn_pixels : bool
        Drop pixels on the AGN side of a BPT diagram from the metallicity map. K20 removed one
        AGN galaxy after checking BPT positions and cut no pixels (§3.4), so the default is
        False; the summary always reports how many pixels the cut would remove.
    """

    smooth_fwhm_arcsec: float = constants.SMOOTH_FWHM_ARCSEC
    fibre_radius_arcsec: float = constants.FIBRE_RADIUS_ARCSEC
    detection_snr: float = constants.DETECTION_SNR
    sky_min_relative_amplitude: float = sky.MASK_MIN_RELATIVE_AMPLITUDE
    lines: tuple[str, ...] | None = None
    diagnostics: tuple[str, ...] | None = None
    calibration_set: str = "C20"
    snr_strong: float = constants.METALLICITY_SNR_STRONG
    snr_weak: float = constants.METALLICITY_SNR_WEAK
    centre: str | tuple[float, float] = "continuum"
    source_pixel_arcsec: float | None = None
    step_fraction: float = 0.5
    metallicity_method: str = "grid"
    forward_gradient: bool = True
    method: str = "default"
    exclude_agn_pixels: bool = False


@dataclass(frozen=True)
class LensConfig:
    """The ``[lens]`` table: deflection maps (or a parametric model) and the lens redshift."""

    z_lens: float
    deflection_x: Path | None = None
    deflection_y: Path | None = None
    normalisation: str = "dls_ds"
    deflection_units: str = "arcsec"
    kappa: Path | None = None
    gamma: Path | None = None
    hst_image: Path | None = None
    models: tuple[Path, ...] = ()
    components: tuple[dict, ...] = ()
    grid_pixel_arcsec: float = 0.05
    grid_size_arcsec: float = 12.0


@dataclass(frozen=True)
class GalaxyConfig:
    """One galaxy, as read from its TOML file (paths resolved relative to it)."""

    name: str
    redshift: float
    instrument: str
    cubes: dict[str, Path]
    psf_fwhm_arcsec: float
    path: Path
    lens: LensConfig | None = None
    properties: dict[str, float] = field(default_factory=dict)
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    ifu: int | None = None

    @property
    def lensed(self) -> bool:
        """True when a ``[lens]`` table is present."""
        return self.lens is not None


# ---------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------


def _load_toml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: TOML syntax error: {err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text (TOML) file") from None


def _check_keys(table: dict, allowed: set[str], where: str, path: Path) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{path}: unknown key '{where}{unknown[0]}'; allowed keys: "
                          f"{', '.join(sorted(allowed))}")


def _number(value: Any, key: str, path: Path, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{path}: {key} must be a number, got {value!r}")
    if positive and not value > 0:
        raise ConfigError(f"{path}: {key} must be positive, got {value!r}")
    return float(value)


def _string(value: Any, key: str, path: Path) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}: {key} must be a non-empty string, got {value!r}")
    return value


def _file(value: Any, key: str, path: Path, *, folder: bool = False) -> Path:
    rel = _string(value, key, path)
    resolved = (path.parent / rel).resolve()
    ok = resolved.is_dir() if folder else resolved.is_file()
    if not ok:
        kind = "folder" if folder else "file"
        raise ConfigError(f"{path}: {key} = {rel!r}: {kind} not found ({resolved})")
    return resolved


def _string_list(value: Any, key: str, path: Path) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{path}: {key} must be a list of strings, got {value!r}")
    return tuple(value)


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------

_TOP_KEYS = {"name", "redshift", "instrument", "cubes", "psf", "lens", "properties",
             "analysis", "ifu"}
_LENS_KEYS = {"deflection_x", "deflection_y", "z_lens", "normalisation", "deflection_units",
              "kappa", "gamma", "hst_image", "models", "components", "grid_pixel_arcsec",
              "grid_size_arcsec"}
_ANALYSIS_KEYS = {f.name for f in fields(AnalysisSettings)}


def _parse_analysis(table: Any, path: Path) -> AnalysisSettings:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [analysis] must be a table")
    _check_keys(table, _ANALYSIS_KEYS, "analysis.", path)
    values: dict[str, Any] = {}
    for key, value in table.items():
        name = f"analysis.{key}"
        if key in {"smooth_fwhm_arcsec"}:
            values[key] = _number(value, name, path)
            if values[key] < 0:
                raise ConfigError(f"{path}: {name} must be >= 0 (0 disables smoothing)")
        elif key in {"fibre_radius_arcsec", "source_pixel_arcsec", "step_fraction"}:
            values[key] = _number(value, name, path, positive=True)
        elif key in {"detection_snr", "snr_strong", "snr_weak", "sky_min_relative_amplitude"}:
            values[key] = _number(value, name, path)
        elif key in {"lines", "diagnostics"}:
            values[key] = _string_list(value, name, path)
            if key == "lines":
                bad = [v for v in values[key] if v not in constants.LINES]
                if bad:
                    raise ConfigError(f"{path}: {name}: unknown line {bad[0]!r}; known: "
                                      f"{', '.join(constants.LINES)}")
        elif key == "calibration_set":
            values[key] = _string(value, name, path)
        elif key == "centre":
            if isinstance(value, str) and value in {"continuum", "halpha"}:
                values[key] = value
            elif (isinstance(value, list) and len(value) == 2
                  and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)):
                values[key] = (float(value[0]), float(value[1]))
            else:
                raise ConfigError(f"{path}: {name} must be \"continuum\", \"halpha\" or "
                                  f"[ra_deg, dec_deg], got {value!r}")
        elif key == "metallicity_method":
            if value not in {"grid", "emcee"}:
                raise ConfigError(f"{path}: {name} must be \"grid\" or \"emcee\", got {value!r}")
            values[key] = value
        elif key == "method":
            if value not in METHODS:
                raise ConfigError(f"{path}: {name} must be one of {', '.join(METHODS)}, "
                                  f"got {value!r}")
            values[key] = value
        elif key in {"forward_gradient", "exclude_agn_pixels"}:
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: {name} must be true or false, got {value!r}")
            values[key] = value
    return AnalysisSettings(**values)


def _parse_lens(table: Any, path: Path, redshift: float) -> LensConfig:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [lens] must be a table")
    _check_keys(table, _LENS_KEYS, "lens.", path)
    if "z_lens" not in table:
        raise ConfigError(f"{path}: [lens] needs z_lens (the lens redshift)")
    z_lens = _number(table["z_lens"], "lens.z_lens", path)
    if not 0 < z_lens < redshift:
        raise ConfigError(f"{path}: lens.z_lens = {z_lens} must be between 0 and the galaxy "
                          f"redshift {redshift} (the source must lie behind the lens)")
    values: dict[str, Any] = {"z_lens": z_lens}
    has_maps = "deflection_x" in table or "deflection_y" in table
    if has_maps:
        for key in ("deflection_x", "deflection_y"):
            if key not in table:
                raise ConfigError(f"{path}: [lens] has one deflection map but not lens.{key}")
            values[key] = _file(table[key], f"lens.{key}", path)
    for key in ("kappa", "gamma", "hst_image"):
        if key in table:
            values[key] = _file(table[key], f"lens.{key}", path)
    if "models" in table:
        folders = _string_list(table["models"], "lens.models", path)
        values["models"] = tuple(_file(f, "lens.models", path, folder=True) for f in folders)
    if "normalisation" in table:
        if table["normalisation"] not in {"dls_ds", "source"}:
            raise ConfigError(f"{path}: lens.normalisation must be \"dls_ds\" or \"source\", "
                              f"got {table['normalisation']!r}")
        values["normalisation"] = table["normalisation"]
    if "deflection_units" in table:
        if table["deflection_units"] not in {"arcsec", "pixel"}:
            raise ConfigError(f"{path}: lens.deflection_units must be \"arcsec\" or \"pixel\", "
                              f"got {table['deflection_units']!r}")
        values["deflection_units"] = table["deflection_units"]
    for key in ("grid_pixel_arcsec", "grid_size_arcsec"):
        if key in table:
            values[key] = _number(table[key], f"lens.{key}", path, positive=True)
    if "components" in table:
        comps = table["components"]
        if not isinstance(comps, list) or not all(isinstance(c, dict) for c in comps) or not comps:
            raise ConfigError(f"{path}: lens.components must be an array of tables "
                              "([[lens.components]] with type = \"SIE\" ...)")
        for i, comp in enumerate(comps):
            if comp.get("type") not in {"SIS", "SIE", "EPL", "SHEAR"}:
                raise ConfigError(f"{path}: lens.components[{i}].type must be one of SIS, SIE, "
                                  f"EPL, SHEAR, got {comp.get('type')!r}")
        values["components"] = tuple(dict(c) for c in comps)
    if not has_maps and "components" not in values:
        raise ConfigError(f"{path}: [lens] needs deflection_x and deflection_y maps or "
                          "[[lens.components]] of a parametric model")
    return LensConfig(**values)


def load_galaxy(path: str | Path, *, sandbox: str | Path | None = None) -> GalaxyConfig:
    """Read and validate a galaxy TOML file (DESIGN.md "Galaxy file").

    Parameters
    ----------
    path : str or Path
        The galaxy file; relative paths inside it are relative to its folder.
    sandbox : str or Path, optional
        A folder the galaxy file and every path in it (after resolving ``..`` and symbolic
        links) must lie below (``klever-nb run --sandbox ROOT``, for servers that run
        uploaded files).

    Raises
    ------
    ConfigError
        One line naming the file and key for every problem found.

    Examples
    --------
    >>> from klever_nb import mock                              # doctest: +SKIP
    >>> from klever_nb.io import mockfiles                      # doctest: +SKIP
    >>> toml = mockfiles.write_mock(mock.make_mock(mock.demo_specs()[0]), "/tmp/g")  # doctest: +SKIP
    >>> load_galaxy(toml).redshift                              # doctest: +SKIP
    """
    path = Path(path).resolve()
    data = _load_toml(path)
    _check_keys(data, _TOP_KEYS, "", path)
    for key in ("name", "redshift", "cubes"):
        if key not in data:
            raise ConfigError(f"{path}: missing required key {key!r}")
    name = _string(data["name"], "name", path)
    redshift = _number(data["redshift"], "redshift", path)
    z_lo, z_hi = constants.REDSHIFT_RANGE
    if not z_lo < redshift <= z_hi:
        raise ConfigError(f"{path}: redshift = {redshift} is out of range ({z_lo}, {z_hi}]")
    instrument = _string(data.get("instrument", "KMOS"), "instrument", path)
    if instrument not in constants.INSTRUMENTS:
        raise ConfigError(f"{path}: instrument = {instrument!r} is not one of "
                          f"{', '.join(constants.INSTRUMENTS)}")
    bands = constants.INSTRUMENTS[instrument].bands
    cubes_table = data["cubes"]
    if not isinstance(cubes_table, dict) or not cubes_table:
        raise ConfigError(f"{path}: [cubes] must be a table with at least one band = \"file\"")
    cubes: dict[str, Path] = {}
    for band, rel in cubes_table.items():
        if band not in bands:
            raise ConfigError(f"{path}: cubes.{band}: {instrument} has no band {band!r}; its "
                              f"bands are {', '.join(bands)}")
        cubes[band] = _file(rel, f"cubes.{band}", path)
    psf_table = data.get("psf", {})
    if not isinstance(psf_table, dict):
        raise ConfigError(f"{path}: [psf] must be a table")
    _check_keys(psf_table, {"fwhm_arcsec"}, "psf.", path)
    if "fwhm_arcsec" not in psf_table:
        raise ConfigError(f"{path}: missing psf.fwhm_arcsec (the image-plane PSF FWHM in arcsec)")
    psf = _number(psf_table["fwhm_arcsec"], "psf.fwhm_arcsec", path, positive=True)
    lens = _parse_lens(data["lens"], path, redshift) if "lens" in data else None
    properties = data.get("properties", {})
    if not isinstance(properties, dict):
        raise ConfigError(f"{path}: [properties] must be a table")
    props = {k: _number(v, f"properties.{k}", path) for k, v in properties.items()}
    analysis = _parse_analysis(data.get("analysis", {}), path)
    ifu = data.get("ifu")
    if ifu is not None and (isinstance(ifu, bool) or not isinstance(ifu, int) or ifu < 1):
        raise ConfigError(f"{path}: ifu must be a positive integer, got {ifu!r}")
    cfg = GalaxyConfig(name=name, redshift=redshift, instrument=instrument, cubes=cubes,
                       psf_fwhm_arcsec=psf, path=path, lens=lens, properties=props,
                       analysis=analysis, ifu=ifu)
    if sandbox is not None:
        check_sandbox(cfg, sandbox)
    return cfg


def check_sandbox(cfg: GalaxyConfig, root: str | Path) -> None:
    """Raise :class:`ConfigError` when a path of ``cfg`` (resolved) is not below ``root``."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise ConfigError(f"--sandbox {root}: not a folder")
    named = [("galaxy file", cfg.path)] + [(f"cubes.{b}", p) for b, p in cfg.cubes.items()]
    if cfg.lens is not None:
        named += [(f"lens.{key}", getattr(cfg.lens, key)) for key in
                  ("deflection_x", "deflection_y", "kappa", "gamma", "hst_image")]
        named += [("lens.models", folder) for folder in cfg.lens.models]
    for key, value in named:
        if value is not None and not Path(value).resolve().is_relative_to(root):
            raise ConfigError(f"{cfg.path}: {key} = {str(value)!r} lies outside the sandbox "
                              f"{root}; keep every input below it")


def load_sample(path: str | Path) -> list[Path]:
    """Galaxy TOML paths listed by a sample file (``galaxies = [...]`` or ``folders = [...]``).

    Every listed galaxy file must exist; ``folders`` are searched recursively for
    ``galaxy.toml``. The galaxy files themselves are validated by :func:`load_galaxy`.
    """
    path = Path(path).resolve()
    data = _load_toml(path)
    _check_keys(data, {"galaxies", "folders"}, "", path)
    if not data.get("galaxies") and not data.get("folders"):
        raise ConfigError(f"{path}: a sample file needs galaxies = [...] or folders = [...]")
    out: list[Path] = []
    for rel in _string_list(data.get("galaxies", []), "galaxies", path):
        out.append(_file(rel, "galaxies", path))
    for rel in _string_list(data.get("folders", []), "folders", path):
        folder = _file(rel, "folders", path, folder=True)
        found = sorted(folder.rglob("galaxy.toml"))
        if not found:
            raise ConfigError(f"{path}: folders: no galaxy.toml below {folder}")
        out.extend(found)
    return list(dict.fromkeys(out))

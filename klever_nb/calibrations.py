"""Strong-line metallicity calibrations as data: a registry of named polynomial sets.

Each set is a TOML file (``klever_nb/data/calibrations/*.toml``, or any file a
user passes to :func:`register_calibration_file`) holding, per diagnostic, the
coefficients of log R = sum_n c_n x^n with x = 12+log(O/H) - x_offset, the fit
RMS, the intrinsic dispersion sigma and the validity range (FACTS.md §1).
A user adds a calibration set (e.g. Maiolino+08) without touching the code.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np

from klever_nb.errors import ConfigError


@dataclass(frozen=True)
class Calibration:
    """One diagnostic of one calibration set: log R(x) as a polynomial.

    Attributes
    ----------
    diagnostic : str
        Name of the line ratio (``"R3"``, ``"N2"``...; see
        :data:`klever_nb.ratios.DIAGNOSTICS` for the definitions).
    coefficients : tuple of float
        c_0, c_1, ... of log R = sum c_n x^n.
    x_offset : float
        x = 12+log(O/H) - x_offset (8.69, Asplund+09 solar; FACTS.md §1.1).
    sigma : float
        Intrinsic dispersion in dex, added in quadrature in K20 eq. (1).
    rms : float
        RMS of the polynomial fit in dex.
    oh_min, oh_max : float
        Validity range in 12+log(O/H).
    set_name, reference : str
        Calibration set and bibliographic source.
    """

    diagnostic: str
    coefficients: tuple[float, ...]
    x_offset: float
    sigma: float
    rms: float
    oh_min: float
    oh_max: float
    set_name: str
    reference: str

    def log_ratio(self, oh: np.ndarray | float) -> np.ndarray:
        """log10 R predicted at 12+log(O/H) = ``oh`` (no range check)."""
        x = np.asarray(oh, dtype=float) - self.x_offset
        return np.polynomial.polynomial.polyval(x, self.coefficients)

    def in_range(self, oh: np.ndarray | float) -> np.ndarray:
        """True where ``oh`` lies inside the validity range."""
        oh = np.asarray(oh, dtype=float)
        return (oh >= self.oh_min) & (oh <= self.oh_max)


_REGISTRY: dict[str, dict[str, Calibration]] = {}


def _parse_calibration_file(path: Path) -> dict[str, Calibration]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: calibration file not found") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: TOML syntax error: {err}") from None
    try:
        set_name = str(data["name"])
        x_offset = float(data.get("x_offset", 8.69))
        oh_min, oh_max = float(data["oh_min"]), float(data["oh_max"])
        reference = str(data.get("reference", str(path)))
        out = {}
        for diag, entry in data["diagnostics"].items():
            out[diag] = Calibration(
                diagnostic=diag,
                coefficients=tuple(float(c) for c in entry["coefficients"]),
                x_offset=x_offset,
                sigma=float(entry.get("sigma", 0.0)),
                rms=float(entry.get("rms", 0.0)),
                oh_min=float(entry.get("oh_min", oh_min)),
                oh_max=float(entry.get("oh_max", oh_max)),
                set_name=set_name,
                reference=reference,
            )
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{path}: invalid calibration file ({err!r}); see "
                          "klever_nb/data/calibrations/curti2020.toml for the layout") from None
    return out


def register_calibration_file(path: str | Path) -> str:
    """Load a calibration-set TOML file and register it under its ``name``; return the name."""
    table = _parse_calibration_file(Path(path))
    name = next(iter(table.values())).set_name if table else Path(path).stem
    _REGISTRY[name] = table
    return name


def _load_builtin() -> None:
    if _REGISTRY:
        return
    folder = files("klever_nb") / "data" / "calibrations"
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            register_calibration_file(Path(str(entry)))


def calibration_sets() -> list[str]:
    """Names of the registered calibration sets (built-in: ``C20``, ``C17``, ``M08``)."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_calibration(diagnostic: str, *, set_name: str = "C20") -> Calibration:
    """Return one diagnostic's :class:`Calibration` from a registered set.

    Examples
    --------
    >>> round(float(get_calibration("R3").log_ratio(8.69)), 3)
    -0.277
    """
    _load_builtin()
    if set_name not in _REGISTRY:
        raise ConfigError(f"unknown calibration set {set_name!r}; known: {calibration_sets()}")
    table = _REGISTRY[set_name]
    if diagnostic not in table:
        raise ConfigError(f"calibration set {set_name!r} has no diagnostic {diagnostic!r}; "
                          f"it has {sorted(table)}")
    return table[diagnostic]

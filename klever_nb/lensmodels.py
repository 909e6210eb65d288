"""Analytic galaxy-scale lenses: SIS, SIE, elliptical power law (EPL) and external shear.

Conventions (shared by the whole package)
-----------------------------------------
- Angles in arcsec. ``x`` runs along the image +x (column) axis, ``y`` along the
  +y (row) axis; the source position is beta = theta - alpha(theta) (the
  Frontier Fields convention of the deflection maps, DESIGN.md "Input files").
- Position angles ``pa_deg`` are in degrees, measured from the +x axis towards
  the +y axis (counter-clockwise on an image shown with ``origin="lower"``).
  This is lenstronomy's ``phi`` (``param_util.phi_q2_ellipticity``), *not* the
  astronomical East-of-North angle: with RA increasing to the left (+x = West,
  +y = North), ``pa_deg = 90`` points North and ``pa_deg = 180`` points East.
- ``q`` is the minor/major axis ratio, 0 < q <= 1.
- Einstein radius of the ellipsoids (lenstronomy's "product-average"
  convention): kappa = (theta_e / 2) / sqrt(q x'^2 + y'^2 / q) for the SIE
  (x' along the major axis), i.e. the mean convergence inside the ellipse of
  semi-axes theta_e/sqrt(q) and theta_e*sqrt(q) is exactly 1. For q = 1 the
  SIE is the SIS. The EPL has kappa = (3 - gamma)/2 (theta_e / sqrt(q x'^2 + y'^2/q))^(gamma-1).
- External shear: psi = gamma1 (x^2 - y^2)/2 + gamma2 x y about (center_x, center_y)
  (lenstronomy ``SHEAR``).

The SIS, SIE and shear are evaluated in closed form (Kormann et al. 1994;
Keeton 2001, astro-ph/0102341, eqs. for the singular isothermal ellipsoid);
the EPL uses lenstronomy (Tessore & Metcalf 2015). :meth:`ParametricLens.to_lenstronomy`
gives the equivalent lenstronomy model so that both can be compared (tests do).

References
----------
K20 §3.2 (parametric SIE/power-law + shear models for the Horseshoe and CSWA164);
Keeton 2001; Kormann, Schneider & Bartelmann 1994, A&A 284, 285.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from klever_nb.errors import ConfigError

#: q above which the SIE is evaluated as an SIS (the closed form is 0/0 at q = 1).
_Q_ROUND = 1.0 - 1e-9

#: Allowed keys (required, optional) of each component type.
COMPONENT_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "SIS": (("theta_e",), ("center_x", "center_y")),
    "SIE": (("theta_e", "q", "pa_deg"), ("center_x", "center_y")),
    "EPL": (("theta_e", "gamma", "q", "pa_deg"), ("center_x", "center_y")),
    "SHEAR": (("gamma1", "gamma2"), ("center_x", "center_y")),
}

_ArrayPair = tuple[np.ndarray, np.ndarray]
_Hessian = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


# ---------------------------------------------------------------------------
# Closed forms
# ---------------------------------------------------------------------------


def _rotate(x, y, center_x, center_y, pa_deg):
    """Coordinates in the frame of the major axis (x') and minor axis (y')."""
    phi = np.deg2rad(pa_deg)
    cos, sin = np.cos(phi), np.sin(phi)
    dx = np.asarray(x, dtype=float) - center_x
    dy = np.asarray(y, dtype=float) - center_y
    return cos * dx + sin * dy, -sin * dx + cos * dy, cos, sin


def sis_deflection(x, y, *, theta_e: float, center_x: float = 0.0,
                   center_y: float = 0.0) -> _ArrayPair:
    """Deflection of a singular isothermal sphere: alpha = theta_e * (x, y) / r.

    Parameters
    ----------
    x, y : array_like
        Image-plane positions in arcsec.
    theta_e : float
        Einstein radius in arcsec.
    center_x, center_y : float
        Lens centre in arcsec.

    Returns
    -------
    alpha_x, alpha_y : numpy.ndarray
        Deflection in arcsec (0 at the exact centre, where it is undefined).

    References
    ----------
    Schneider, Ehlers & Falco 1992, §8.1.4.
    """
    dx = np.asarray(x, dtype=float) - center_x
    dy = np.asarray(y, dtype=float) - center_y
    r = np.hypot(dx, dy)
    safe = np.where(r > 0, r, 1.0)
    scale = np.where(r > 0, theta_e / safe, 0.0)
    return scale * dx, scale * dy


def sis_hessian(x, y, *, theta_e: float, center_x: float = 0.0,
                center_y: float = 0.0) -> _Hessian:
    """Second derivatives of the SIS potential (f_xx, f_xy, f_yx, f_yy), 1/arcsec units cancel.

    f_xx = theta_e y^2 / r^3, f_xy = -theta_e x y / r^3, f_yy = theta_e x^2 / r^3;
    at r = 0 the radius is replaced by 1e-12 theta_e (convergence effectively infinite).
    """
    dx = np.asarray(x, dtype=float) - center_x
    dy = np.asarray(y, dtype=float) - center_y
    r = np.maximum(np.hypot(dx, dy), 1e-12 * theta_e)
    r3 = r**3
    f_xy = -theta_e * dx * dy / r3
    return theta_e * dy**2 / r3, f_xy, f_xy, theta_e * dx**2 / r3


def sie_deflection(x, y, *, theta_e: float, q: float, pa_deg: float, center_x: float = 0.0,
                   center_y: float = 0.0) -> _ArrayPair:
    """Deflection of a singular isothermal ellipsoid in closed form.

    In the major-axis frame, with b = theta_e sqrt(q), psi = sqrt(q^2 x'^2 + y'^2)
    and u = sqrt(1 - q^2) (Kormann et al. 1994; Keeton 2001 with s = 0):

        alpha_x' = b/u arctan(u x' / psi),   alpha_y' = b/u arctanh(u y' / psi).

    ``theta_e`` follows lenstronomy's SIE (product-average convention, see the
    module docstring); this function equals ``lenstronomy`` ``SIE`` to < 1e-6.

    Parameters
    ----------
    x, y : array_like
        Image-plane positions in arcsec.
    theta_e : float
        Einstein radius in arcsec (product-average convention).
    q : float
        Axis ratio minor/major, 0 < q <= 1 (q = 1 gives the SIS).
    pa_deg : float
        Major-axis position angle, degrees from +x towards +y.
    center_x, center_y : float
        Lens centre in arcsec.

    Returns
    -------
    alpha_x, alpha_y : numpy.ndarray
        Deflection in arcsec (0 at the exact centre).

    References
    ----------
    Kormann, Schneider & Bartelmann 1994; Keeton 2001 (astro-ph/0102341) §3.
    """
    if q >= _Q_ROUND:
        return sis_deflection(x, y, theta_e=theta_e, center_x=center_x, center_y=center_y)
    xp, yp, cos, sin = _rotate(x, y, center_x, center_y, pa_deg)
    b = theta_e * np.sqrt(q)
    u = np.sqrt(1.0 - q * q)
    psi = np.sqrt(q * q * xp**2 + yp**2)
    safe = np.where(psi > 0, psi, 1.0)
    ax = np.where(psi > 0, b / u * np.arctan(u * xp / safe), 0.0)
    ay = np.where(psi > 0, b / u * np.arctanh(u * yp / safe), 0.0)
    return cos * ax - sin * ay, sin * ax + cos * ay


def sie_hessian(x, y, *, theta_e: float, q: float, pa_deg: float, center_x: float = 0.0,
                center_y: float = 0.0) -> _Hessian:
    """Second derivatives of the SIE potential in closed form.

    In the major-axis frame f_x'x' = b y'^2/(psi r^2), f_x'y' = -b x'y'/(psi r^2),
    f_y'y' = b x'^2/(psi r^2) with r^2 = x'^2 + y'^2, so that f_xx + f_yy = 2 kappa = b/psi;
    rotated back to (x, y).
    """
    if q >= _Q_ROUND:
        return sis_hessian(x, y, theta_e=theta_e, center_x=center_x, center_y=center_y)
    xp, yp, cos, sin = _rotate(x, y, center_x, center_y, pa_deg)
    b = theta_e * np.sqrt(q)
    r2 = np.maximum(xp**2 + yp**2, (1e-12 * theta_e) ** 2)
    psi = np.maximum(np.sqrt(q * q * xp**2 + yp**2), 1e-12 * theta_e * q)
    norm = b / (psi * r2)
    hxx, hxy, hyy = norm * yp**2, -norm * xp * yp, norm * xp**2
    # H = R^T H' R with R the rotation (x, y) -> (x', y').
    f_xx = cos * cos * hxx - 2 * cos * sin * hxy + sin * sin * hyy
    f_yy = sin * sin * hxx + 2 * cos * sin * hxy + cos * cos * hyy
    f_xy = cos * sin * (hxx - hyy) + (cos * cos - sin * sin) * hxy
    return f_xx, f_xy, f_xy, f_yy


def shear_deflection(x, y, *, gamma1: float, gamma2: float, center_x: float = 0.0,
                     center_y: float = 0.0) -> _ArrayPair:
    """Deflection of an external shear: alpha = (g1 x + g2 y, g2 x - g1 y) about the centre."""
    dx = np.asarray(x, dtype=float) - center_x
    dy = np.asarray(y, dtype=float) - center_y
    return gamma1 * dx + gamma2 * dy, gamma2 * dx - gamma1 * dy


def shear_hessian(x, y, *, gamma1: float, gamma2: float, center_x: float = 0.0,
                  center_y: float = 0.0) -> _Hessian:
    """Hessian of the external shear (constant): (g1, g2, g2, -g1)."""
    shape = np.broadcast(np.asarray(x, dtype=float), np.asarray(y, dtype=float)).shape
    g1 = np.full(shape, float(gamma1))
    g2 = np.full(shape, float(gamma2))
    return g1, g2, g2.copy(), -g1


def q_pa_to_e1e2(q: float, pa_deg: float) -> tuple[float, float]:
    """lenstronomy ellipticity (e1, e2) of an axis ratio and position angle (degrees, +x to +y)."""
    from lenstronomy.Util import param_util

    e1, e2 = param_util.phi_q2_ellipticity(np.deg2rad(pa_deg), q)
    return float(e1), float(e2)


def e1e2_to_q_pa(e1: float, e2: float) -> tuple[float, float]:
    """Inverse of :func:`q_pa_to_e1e2`: (q, pa_deg) with pa in [-90, 90)."""
    from lenstronomy.Util import param_util

    phi, q = param_util.ellipticity2phi_q(e1, e2)
    return float(q), float(np.rad2deg(phi))


# ---------------------------------------------------------------------------
# Composite lens
# ---------------------------------------------------------------------------


def _epl_profile():
    from lenstronomy.LensModel.Profiles.epl import EPL

    return EPL()


def _component_kwargs(comp: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in comp.items() if k != "type"}


@dataclass(frozen=True)
class ParametricLens:
    """A lens made of analytic components whose deflections add.

    Parameters
    ----------
    components : tuple of dict
        Each dict has ``type`` (``"SIS"``, ``"SIE"``, ``"EPL"``, ``"SHEAR"``) and
        the keys of :data:`COMPONENT_KEYS`, e.g.
        ``{"type": "SIE", "theta_e": 1.2, "q": 0.7, "pa_deg": 30}`` or
        ``{"type": "SHEAR", "gamma1": 0.05, "gamma2": 0.0}``. Angles in arcsec,
        position angles in degrees from +x towards +y (module docstring).

    Notes
    -----
    The parameters describe the deflection for the redshift of the source being
    modelled; :meth:`scaled` rescales the deflection (e.g. by D_ls/D_s).

    Examples
    --------
    >>> lens = ParametricLens(({"type": "SIS", "theta_e": 1.0},))
    >>> [float(v) for v in lens.ray_shoot(2.0, 0.0)]
    [1.0, 0.0]
    >>> round(float(lens.magnification(2.0, 0.0)), 6)
    2.0

    References
    ----------
    K20 §3.2.1 (SIE/power law + external shear for the galaxy-scale lenses).
    """

    components: tuple[dict, ...]

    def __post_init__(self):
        comps = tuple(dict(c) for c in self.components)
        object.__setattr__(self, "components", comps)
        for i, comp in enumerate(comps):
            _validate_component(comp, f"components[{i}]")

    def __hash__(self) -> int:
        return hash(tuple(tuple(sorted(c.items())) for c in self.components))

    # -- core -------------------------------------------------------------
    def deflection(self, x, y) -> _ArrayPair:
        """Total deflection (alpha_x, alpha_y) in arcsec at image positions (x, y) in arcsec."""
        x = np.asarray(x, dtype=float)
        y = np.asarray(y, dtype=float)
        shape = np.broadcast(x, y).shape
        ax, ay = np.zeros(shape), np.zeros(shape)
        for comp in self.components:
            dx, dy = PROFILES[comp["type"]].deflection(x, y, comp)
            ax = ax + dx
            ay = ay + dy
        return ax, ay

    def hessian(self, x, y) -> _Hessian:
        """Second derivatives of the lensing potential (f_xx, f_xy, f_yx, f_yy), dimensionless."""
        x = np.asarray(x, dtype=float)
        y = np.asarray(y, dtype=float)
        shape = np.broadcast(x, y).shape
        out = [np.zeros(shape) for _ in range(4)]
        for comp in self.components:
            parts = PROFILES[comp["type"]].hessian(x, y, comp)
            out = [o + np.asarray(p, dtype=float) for o, p in zip(out, parts, strict=True)]
        return tuple(out)

    def convergence_shear(self, x, y) -> _ArrayPair:
        """Convergence kappa = (f_xx + f_yy)/2 and shear modulus gamma = |(f_xx - f_yy)/2, f_xy|."""
        f_xx, f_xy, f_yx, f_yy = self.hessian(x, y)
        kappa = 0.5 * (f_xx + f_yy)
        gamma = np.hypot(0.5 * (f_xx - f_yy), 0.5 * (f_xy + f_yx))
        return kappa, gamma

    def magnification(self, x, y) -> np.ndarray:
        """Signed magnification 1 / det(A), A = I - Hessian (negative for saddle-point images)."""
        f_xx, f_xy, f_yx, f_yy = self.hessian(x, y)
        det = (1.0 - f_xx) * (1.0 - f_yy) - f_xy * f_yx
        with np.errstate(divide="ignore"):
            return 1.0 / det

    def ray_shoot(self, x, y) -> _ArrayPair:
        """Source-plane position beta = theta - alpha(theta) (arcsec)."""
        ax, ay = self.deflection(x, y)
        return np.asarray(x, dtype=float) - ax, np.asarray(y, dtype=float) - ay

    # -- helpers ----------------------------------------------------------
    @property
    def center(self) -> tuple[float, float]:
        """Centre of the first mass component (arcsec), (0, 0) for a pure shear."""
        for comp in self.components:
            if comp["type"] != "SHEAR":
                return float(comp.get("center_x", 0.0)), float(comp.get("center_y", 0.0))
        return 0.0, 0.0

    def scaled(self, factor: float) -> ParametricLens:
        """A lens whose deflections are ``factor`` times these (e.g. factor = D_ls/D_s).

        Einstein radii scale as factor (SIS, SIE), as factor^(1/(gamma-1)) (EPL); shears as factor.
        """
        if not factor > 0:
            raise ConfigError(f"deflection scale factor must be positive, got {factor!r}")
        return ParametricLens(tuple(PROFILES[comp["type"]].scaled(comp, factor)
                                    for comp in self.components))

    def to_lenstronomy(self) -> tuple[list[str], list[dict[str, float]]]:
        """Equivalent lenstronomy ``(lens_model_list, kwargs_lens)`` for ``LensModel``.

        Examples
        --------
        >>> from lenstronomy.LensModel.lens_model import LensModel
        >>> lens = ParametricLens(({"type": "SIE", "theta_e": 1.0, "q": 0.8, "pa_deg": 20},))
        >>> names, kwargs = lens.to_lenstronomy()
        >>> ax, _ = LensModel(names).alpha(1.5, 0.3, kwargs)
        >>> bool(abs(ax - lens.deflection(1.5, 0.3)[0]) < 1e-6)
        True
        """
        names = [comp["type"] for comp in self.components]  # lenstronomy uses the same names
        kwargs = [PROFILES[comp["type"]].lenstronomy_kwargs(comp) for comp in self.components]
        return names, kwargs

    def to_config(self) -> dict[str, list[dict[str, Any]]]:
        """The ``{"components": [...]}`` table that :meth:`from_config` reads (TOML-ready)."""
        return {"components": [dict(c) for c in self.components]}

    @classmethod
    def from_config(cls, table: Mapping[str, Any], *, where: str = "lens") -> ParametricLens:
        """Build a lens from a ``[lens]`` table with ``[[lens.components]]`` (validated).

        Keys of ``table`` other than ``components`` (``z_lens``...) are ignored.

        Raises
        ------
        ConfigError
            Naming the offending key, e.g. ``lens.components[0].q must be in (0, 1]``.
        """
        if not isinstance(table, Mapping) or "components" not in table:
            raise ConfigError(f"{where}.components is missing: give [[{where}.components]] "
                              "tables with type = \"SIE\", \"SIS\", \"EPL\" or \"SHEAR\"")
        comps = table["components"]
        if (not isinstance(comps, list | tuple) or not comps
                or not all(isinstance(c, Mapping) for c in comps)):
            raise ConfigError(f"{where}.components must be a non-empty array of tables")
        for i, comp in enumerate(comps):
            _validate_component(comp, f"{where}.components[{i}]")
        return cls(tuple(dict(c) for c in comps))


def _off_centre(x: np.ndarray, y: np.ndarray, comp: Mapping[str, Any]) -> _ArrayPair:
    """Nudge points at the exact centre of a profile by 1e-9 theta_e (lenstronomy's EPL is 0/0)."""
    cx = float(comp.get("center_x", 0.0))
    cy = float(comp.get("center_y", 0.0))
    at_centre = (x == cx) & (y == cy)
    if np.any(at_centre):
        x = np.where(at_centre, x + 1e-9 * float(comp["theta_e"]), x)
    return np.broadcast_to(x, np.broadcast(x, y).shape), np.broadcast_to(y, np.broadcast(x, y).shape)


def _epl_kwargs(comp: Mapping[str, Any]) -> dict[str, float]:
    e1, e2 = q_pa_to_e1e2(float(comp["q"]), float(comp["pa_deg"]))
    return {"theta_E": float(comp["theta_e"]), "gamma": float(comp["gamma"]), "e1": e1, "e2": e2,
            "center_x": float(comp.get("center_x", 0.0)),
            "center_y": float(comp.get("center_y", 0.0))}


def _validate_component(comp: Mapping[str, Any], where: str) -> None:
    kind = comp.get("type")
    if kind not in PROFILES:
        raise ConfigError(f"{where}.type must be one of {', '.join(COMPONENT_KEYS)}, got {kind!r}")
    required, optional = COMPONENT_KEYS[kind]
    allowed = set(required) | set(optional) | {"type"}
    for key in comp:
        if key not in allowed:
            raise ConfigError(f"{where}.{key} is not a parameter of {kind}; allowed: "
                              f"{', '.join(sorted(allowed - {'type'}))}")
    for key in required:
        if key not in comp:
            raise ConfigError(f"{where}.{key} is missing (required for {kind})")
    for key in (*required, *optional):
        if key in comp:
            value = comp[key]
            if (isinstance(value, bool) or not isinstance(value, int | float | np.number)
                    or not np.isfinite(value)):
                raise ConfigError(f"{where}.{key} must be a finite number, got {value!r}")
    if "theta_e" in comp and not comp["theta_e"] > 0:
        raise ConfigError(f"{where}.theta_e must be positive (arcsec), got {comp['theta_e']!r}")
    if "q" in comp and not 0 < comp["q"] <= 1:
        raise ConfigError(f"{where}.q must be in (0, 1] (minor/major axis ratio), "
                          f"got {comp['q']!r}")
    if kind == "EPL" and not 1 < comp["gamma"] < 3:
        raise ConfigError(f"{where}.gamma must be in (1, 3) (2 = isothermal), "
                          f"got {comp['gamma']!r}")


# ---------------------------------------------------------------------------
# The registry: one entry per component type (a new profile is one entry here)
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    """How one component type deflects, bends, rescales and translates to lenstronomy.

    Each callable takes the component dict (``type`` and the keys of
    :data:`COMPONENT_KEYS`); :class:`ParametricLens` dispatches through :data:`PROFILES`
    instead of one ``if type == ...`` chain per method.
    """

    deflection: Callable[[np.ndarray, np.ndarray, Mapping[str, Any]], _ArrayPair]
    hessian: Callable[[np.ndarray, np.ndarray, Mapping[str, Any]], _Hessian]
    scaled: Callable[[Mapping[str, Any], float], dict]
    lenstronomy_kwargs: Callable[[Mapping[str, Any]], dict[str, float]]


def _centre(comp: Mapping[str, Any]) -> dict[str, float]:
    return {"center_x": float(comp.get("center_x", 0.0)),
            "center_y": float(comp.get("center_y", 0.0))}


def _theta_e_scaled(comp: Mapping[str, Any], factor: float) -> dict:
    """SIS, SIE: the Einstein radius scales as the deflection."""
    return dict(comp, theta_e=float(comp["theta_e"]) * factor)


def _epl_scaled(comp: Mapping[str, Any], factor: float) -> dict:
    """EPL: alpha ∝ theta_e^(gamma-1), so theta_e scales as factor^(1/(gamma-1))."""
    return dict(comp, theta_e=float(comp["theta_e"]) * factor ** (1.0 / (comp["gamma"] - 1)))


def _shear_scaled(comp: Mapping[str, Any], factor: float) -> dict:
    return dict(comp, gamma1=float(comp["gamma1"]) * factor,
                gamma2=float(comp["gamma2"]) * factor)


def _sie_lenstronomy(comp: Mapping[str, Any]) -> dict[str, float]:
    e1, e2 = q_pa_to_e1e2(float(comp["q"]), float(comp["pa_deg"]))
    return {"theta_E": float(comp["theta_e"]), "e1": e1, "e2": e2, **_centre(comp)}


#: Component type -> :class:`Profile` (closed forms; EPL through lenstronomy).
PROFILES: dict[str, Profile] = {
    "SIS": Profile(
        deflection=lambda x, y, c: sis_deflection(x, y, **_component_kwargs(c)),
        hessian=lambda x, y, c: sis_hessian(x, y, **_component_kwargs(c)),
        scaled=_theta_e_scaled,
        lenstronomy_kwargs=lambda c: {"theta_E": float(c["theta_e"]), **_centre(c)}),
    "SIE": Profile(
        deflection=lambda x, y, c: sie_deflection(x, y, **_component_kwargs(c)),
        hessian=lambda x, y, c: sie_hessian(x, y, **_component_kwargs(c)),
        scaled=_theta_e_scaled, lenstronomy_kwargs=_sie_lenstronomy),
    "EPL": Profile(
        deflection=lambda x, y, c: _epl_profile().derivatives(*_off_centre(x, y, c),
                                                              **_epl_kwargs(c)),
        hessian=lambda x, y, c: _epl_profile().hessian(*_off_centre(x, y, c), **_epl_kwargs(c)),
        scaled=_epl_scaled, lenstronomy_kwargs=_epl_kwargs),
    "SHEAR": Profile(
        deflection=lambda x, y, c: shear_deflection(x, y, **_component_kwargs(c)),
        hessian=lambda x, y, c: shear_hessian(x, y, **_component_kwargs(c)),
        scaled=_shear_scaled,
        lenstronomy_kwargs=lambda c: {"gamma1": float(c["gamma1"]), "gamma2": float(c["gamma2"]),
                                      "ra_0": float(c.get("center_x", 0.0)),
                                      "dec_0": float(c.get("center_y", 0.0))}),
}

"""Analytic lenses against closed forms, lenstronomy and finite differences (PITFALLS.md §7)."""

from __future__ import annotations

import numpy as np
import pytest
from lenstronomy.LensModel.lens_model import LensModel

from klever_nb.errors import ConfigError
from klever_nb.lensmodels import (
    ParametricLens,
    e1e2_to_q_pa,
    q_pa_to_e1e2,
    shear_deflection,
    sie_deflection,
    sis_deflection,
)


def _grid(n: int, half: float = 3.0):
    """An n x n pixel-centred grid; odd n puts a pixel exactly on the centre."""
    step = 2 * half / n
    offsets = (np.arange(n) - (n - 1) / 2) * step
    return np.meshgrid(offsets, offsets)


SIE_PARAMS = [
    {"theta_e": 1.2, "q": 0.7, "pa_deg": 30.0, "center_x": 0.1, "center_y": -0.2},
    {"theta_e": 0.8, "q": 0.3, "pa_deg": 100.0, "center_x": 0.0, "center_y": 0.0},
    {"theta_e": 2.0, "q": 0.95, "pa_deg": -60.0, "center_x": -0.3, "center_y": 0.25},
]


@pytest.mark.parametrize("n", [31, 32])
def test_sis_deflection_is_theta_e_times_unit_vector(n):
    x, y = _grid(n)
    ax, ay = sis_deflection(x, y, theta_e=1.3, center_x=0.2, center_y=-0.1)
    dx, dy = x - 0.2, y + 0.1
    r = np.hypot(dx, dy)
    ok = r > 0
    np.testing.assert_allclose(ax[ok], 1.3 * dx[ok] / r[ok], atol=1e-12)
    np.testing.assert_allclose(ay[ok], 1.3 * dy[ok] / r[ok], atol=1e-12)
    np.testing.assert_allclose(np.hypot(ax, ay)[ok], 1.3, atol=1e-12)


@pytest.mark.parametrize("n", [31, 32])
def test_sis_matches_lenstronomy(n):
    x, y = _grid(n)
    lens = ParametricLens(({"type": "SIS", "theta_e": 1.1},))
    ax, ay = lens.deflection(x, y)
    bx, by = LensModel(["SIS"]).alpha(x, y, [{"theta_E": 1.1, "center_x": 0.0,
                                               "center_y": 0.0}])
    ok = np.hypot(x, y) > 0
    assert np.max(np.abs(ax - bx)[ok]) < 1e-6
    assert np.max(np.abs(ay - by)[ok]) < 1e-6


@pytest.mark.parametrize("n", [31, 32])
@pytest.mark.parametrize("params", SIE_PARAMS)
def test_sie_closed_form_matches_lenstronomy_sie(n, params):
    x, y = _grid(n)
    ax, ay = sie_deflection(x, y, **params)
    e1, e2 = q_pa_to_e1e2(params["q"], params["pa_deg"])
    kw = {"theta_E": params["theta_e"], "e1": e1, "e2": e2,
          "center_x": params["center_x"], "center_y": params["center_y"]}
    bx, by = LensModel(["SIE"]).alpha(x, y, [kw])
    assert np.max(np.abs(ax - bx)) < 1e-6
    assert np.max(np.abs(ay - by)) < 1e-6


def test_sie_reduces_to_sis_when_round():
    x, y = _grid(32)
    a = sie_deflection(x, y, theta_e=1.0, q=1.0, pa_deg=17.0)
    b = sis_deflection(x, y, theta_e=1.0)
    np.testing.assert_allclose(a, b, atol=1e-12)
    c = sie_deflection(x, y, theta_e=1.0, q=0.999999, pa_deg=17.0)
    np.testing.assert_allclose(c, b, atol=1e-5)


def test_sie_divergence_is_twice_the_stated_convergence():
    """div alpha = 2 kappa with kappa = theta_e / (2 sqrt(q x'^2 + y'^2/q)): the theta_e convention."""
    theta_e, q, pa = 1.2, 0.6, 35.0
    x, y = _grid(40)
    h = 1e-5
    axp, _ = sie_deflection(x + h, y, theta_e=theta_e, q=q, pa_deg=pa)
    axm, _ = sie_deflection(x - h, y, theta_e=theta_e, q=q, pa_deg=pa)
    _, ayp = sie_deflection(x, y + h, theta_e=theta_e, q=q, pa_deg=pa)
    _, aym = sie_deflection(x, y - h, theta_e=theta_e, q=q, pa_deg=pa)
    div = (axp - axm + ayp - aym) / (2 * h)
    phi = np.deg2rad(pa)
    xp = np.cos(phi) * x + np.sin(phi) * y
    yp = -np.sin(phi) * x + np.cos(phi) * y
    kappa = theta_e / (2 * np.sqrt(q * xp**2 + yp**2 / q))
    far = np.hypot(x, y) > 0.2
    np.testing.assert_allclose(div[far], 2 * kappa[far], rtol=1e-6)


def test_shear_deflection_matches_lenstronomy():
    x, y = _grid(21)
    ax, ay = shear_deflection(x, y, gamma1=0.05, gamma2=-0.03, center_x=0.2)
    bx, by = LensModel(["SHEAR"]).alpha(x, y, [{"gamma1": 0.05, "gamma2": -0.03,
                                                 "ra_0": 0.2, "dec_0": 0.0}])
    np.testing.assert_allclose(ax, bx, atol=1e-12)
    np.testing.assert_allclose(ay, by, atol=1e-12)


def test_composite_lens_matches_lenstronomy_model():
    lens = ParametricLens((
        {"type": "SIE", "theta_e": 1.2, "q": 0.7, "pa_deg": 30.0, "center_x": 0.1},
        {"type": "SHEAR", "gamma1": 0.05, "gamma2": 0.02},
        {"type": "EPL", "theta_e": 0.3, "gamma": 2.3, "q": 0.8, "pa_deg": -20.0,
         "center_x": 1.5, "center_y": 0.7},
    ))
    names, kwargs = lens.to_lenstronomy()
    x, y = _grid(32)
    ax, ay = lens.deflection(x, y)
    bx, by = LensModel(names).alpha(x, y, kwargs)
    assert np.max(np.abs(ax - bx)) < 1e-6
    assert np.max(np.abs(ay - by)) < 1e-6


def test_epl_with_isothermal_slope_equals_sie():
    x, y = _grid(32)
    sie = ParametricLens(({"type": "SIE", "theta_e": 1.1, "q": 0.6, "pa_deg": 40.0},))
    epl = ParametricLens(({"type": "EPL", "theta_e": 1.1, "gamma": 2.0, "q": 0.6,
                           "pa_deg": 40.0},))
    np.testing.assert_allclose(sie.deflection(x, y), epl.deflection(x, y), atol=1e-6)


@pytest.mark.parametrize("components", [
    ({"type": "SIS", "theta_e": 1.0, "center_x": 0.05},),
    ({"type": "SIE", "theta_e": 1.2, "q": 0.7, "pa_deg": 30.0},
     {"type": "SHEAR", "gamma1": 0.05, "gamma2": -0.02}),
    ({"type": "SIE", "theta_e": 0.9, "q": 0.4, "pa_deg": 120.0, "center_y": 0.3},),
    ({"type": "EPL", "theta_e": 1.0, "gamma": 1.8, "q": 0.75, "pa_deg": 10.0},),
])
def test_hessian_matches_finite_differences_of_deflection(components):
    lens = ParametricLens(components)
    x, y = _grid(24, half=2.5)
    far = np.hypot(x, y - 0.3) > 0.3
    h = 1e-5
    axp, ayp = lens.deflection(x + h, y)
    axm, aym = lens.deflection(x - h, y)
    bxp, byp = lens.deflection(x, y + h)
    bxm, bym = lens.deflection(x, y - h)
    f_xx, f_xy, f_yx, f_yy = lens.hessian(x, y)
    scale = 1.0 + np.abs(f_xx) + np.abs(f_yy)
    for analytic, numeric in ((f_xx, (axp - axm) / (2 * h)), (f_yx, (ayp - aym) / (2 * h)),
                              (f_xy, (bxp - bxm) / (2 * h)), (f_yy, (byp - bym) / (2 * h))):
        assert np.max((np.abs(analytic - numeric) / scale)[far]) < 1e-5


@pytest.mark.parametrize("beta", [0.2, 0.45, 0.7])
def test_sis_point_source_magnifications_are_analytic(beta):
    theta_e = 1.0
    lens = ParametricLens(({"type": "SIS", "theta_e": theta_e},))
    # Images on the axis through the source: theta = beta + theta_e and beta - theta_e.
    images = np.array([beta + theta_e, beta - theta_e])
    bx, by = lens.ray_shoot(images, np.zeros(2))
    np.testing.assert_allclose(bx, beta, atol=1e-12)
    np.testing.assert_allclose(by, 0.0, atol=1e-12)
    mu = lens.magnification(images, np.zeros(2))
    expected = np.abs(images) / (np.abs(images) - theta_e)
    np.testing.assert_allclose(mu, expected, rtol=1e-10)
    assert mu[0] > 0 > mu[1]  # minimum and saddle point
    np.testing.assert_allclose(np.abs(mu).sum(), 2 * theta_e / beta, rtol=1e-10)


def test_convergence_shear_of_sis_are_equal_and_half_theta_e_over_r():
    lens = ParametricLens(({"type": "SIS", "theta_e": 1.5},))
    x, y = _grid(20)
    kappa, gamma = lens.convergence_shear(x, y)
    r = np.hypot(x, y)
    np.testing.assert_allclose(kappa, 1.5 / (2 * r), rtol=1e-10)
    np.testing.assert_allclose(gamma, 1.5 / (2 * r), rtol=1e-10)


def test_scaled_lens_scales_deflection():
    lens = ParametricLens((
        {"type": "SIE", "theta_e": 1.2, "q": 0.7, "pa_deg": 30.0},
        {"type": "SHEAR", "gamma1": 0.05, "gamma2": 0.02},
        {"type": "EPL", "theta_e": 0.5, "gamma": 2.2, "q": 0.9, "pa_deg": 0.0, "center_x": 1.0},
    ))
    x, y = _grid(16)
    a = np.array(lens.deflection(x, y))
    b = np.array(lens.scaled(0.6).deflection(x, y))
    np.testing.assert_allclose(b, 0.6 * a, atol=1e-9)


def test_position_angle_round_trip_through_lenstronomy_ellipticity():
    for q, pa in ((0.7, 30.0), (0.4, -75.0), (0.9, 10.0)):
        q2, pa2 = e1e2_to_q_pa(*q_pa_to_e1e2(q, pa))
        assert q2 == pytest.approx(q)
        assert pa2 == pytest.approx(pa)


def test_major_axis_along_pa_gives_smaller_deflection_than_minor_axis():
    """For an SIE at pa = 90 (+y), the critical curve is elongated along +y: check the orientation."""
    lens = ParametricLens(({"type": "SIE", "theta_e": 1.0, "q": 0.5, "pa_deg": 90.0},))
    ax, _ = lens.deflection(1.0, 0.0)  # along the minor axis
    _, ay = lens.deflection(0.0, 1.0)  # along the major axis
    assert abs(ax) > abs(ay)


def test_from_config_builds_and_validates():
    table = {"z_lens": 0.5, "components": [
        {"type": "SIE", "theta_e": 1.2, "q": 0.7, "pa_deg": 30, "center_x": 0, "center_y": 0},
        {"type": "SHEAR", "gamma1": 0.05, "gamma2": 0.0}]}
    lens = ParametricLens.from_config(table)
    assert len(lens.components) == 2
    assert ParametricLens.from_config(lens.to_config()) == lens


@pytest.mark.parametrize("component, key", [
    ({"type": "SIE", "theta_e": 1.0, "q": 1.3, "pa_deg": 0.0}, "lens.components[0].q"),
    ({"type": "SIE", "theta_e": 1.0, "pa_deg": 0.0}, "lens.components[0].q"),
    ({"type": "SIS", "theta_e": -1.0}, "lens.components[0].theta_e"),
    ({"type": "SIS", "theta_e": "big"}, "lens.components[0].theta_e"),
    ({"type": "NFW", "theta_e": 1.0}, "lens.components[0].type"),
    ({"type": "SIS", "theta_e": 1.0, "ellipticity": 0.2}, "lens.components[0].ellipticity"),
    ({"type": "EPL", "theta_e": 1.0, "gamma": 3.5, "q": 0.8, "pa_deg": 0}, "components[0].gamma"),
])
def test_from_config_errors_name_the_key(component, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        ParametricLens.from_config({"components": [component]})


def test_from_config_without_components_is_a_config_error():
    with pytest.raises(ConfigError, match="lens.components"):
        ParametricLens.from_config({"z_lens": 0.5})


@pytest.mark.parametrize("q, pa", [(0.7, 30.0), (0.35, -110.0), (1.0, 0.0)])
def test_sie_theta_e_convention_mean_convergence_one_inside_ellipse(q, pa):
    """Gauss: the flux of alpha through the ellipse (theta_e/sqrt(q), theta_e sqrt(q)) is
    2 * (mass inside) = 2 pi theta_e^2, i.e. mean kappa = 1 there (product-average theta_e)."""
    theta_e = 1.3
    t = np.linspace(0, 2 * np.pi, 20001)[:-1]
    dt = t[1] - t[0]
    xp, yp = theta_e / np.sqrt(q) * np.cos(t), theta_e * np.sqrt(q) * np.sin(t)
    dxp, dyp = -theta_e / np.sqrt(q) * np.sin(t), theta_e * np.sqrt(q) * np.cos(t)
    phi = np.deg2rad(pa)
    rot = np.array([[np.cos(phi), -np.sin(phi)], [np.sin(phi), np.cos(phi)]])
    x, y = rot @ np.vstack([xp, yp])
    dx, dy = rot @ np.vstack([dxp, dyp])
    ax, ay = sie_deflection(x + 0.2, y - 0.1, theta_e=theta_e, q=q, pa_deg=pa,
                            center_x=0.2, center_y=-0.1)
    outward_flux = np.sum(ax * dy - ay * dx) * dt
    assert outward_flux == pytest.approx(2 * np.pi * theta_e**2, rel=1e-8)


def test_sis_tangential_critical_curve_is_at_theta_e():
    lens = ParametricLens(({"type": "SIS", "theta_e": 1.37},))
    r = np.linspace(0.5, 2.5, 2001)
    inv_mu = 1.0 / lens.magnification(r, np.zeros_like(r))
    crossing = np.flatnonzero(np.diff(np.sign(inv_mu)))[0]
    root = np.interp(0.0, inv_mu[crossing:crossing + 2], r[crossing:crossing + 2])
    assert root == pytest.approx(1.37, abs=1e-6)


def test_every_component_type_has_one_registry_entry():
    """ParametricLens dispatches through one registry (no per-method type chains)."""
    import inspect

    from klever_nb import lensmodels

    assert set(lensmodels.PROFILES) == set(lensmodels.COMPONENT_KEYS)
    source = inspect.getsource(lensmodels.ParametricLens)
    assert 'kind == "' not in source and "if kind" not in source

"""Strong-lensing grid of mocks (injection-recovery, issue 21): point images, magnification.

See :mod:`klever_nb.mock` for the model and its conventions.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from klever_nb.lensmodels import ParametricLens
from klever_nb.mock.physics import dust_transmission
from klever_nb.mock.render import image_plane_maps
from klever_nb.mock.spec import MockSpec

#: Redshift windows of the strong-lensing grid: K20 §2 targets z in [1.2, 1.65] (Hbeta+[OIII]
#: in YJ, Halpha+[NII]+[SII] in H) and [2, 2.6] ([OII] in YJ, Hbeta+[OIII] in H, Halpha in K),
#: narrowed so that every one of those lines stays inside the KMOS band ranges.
STRONG_LENSING_Z_WINDOWS = ((1.32, 1.62), (2.02, 2.40))
#: Total-magnification range the grid aims at (issue 21: 2 to 30).
STRONG_LENSING_MU_RANGE = (2.0, 30.0)
#: Largest cube of the strong-lensing mocks: 30 x 30 KMOS spaxels (6"), enough for an arc and
#: its counter-image around an Einstein radius of <= 1.3" (KMOS mosaics reach ~ 6-8"); the
#: magnification targeting runs on it.
STRONG_LENSING_SHAPE = (30, 30)
#: Each mock's cube is cropped (square, even side, at least this many spaxels) to the point
#: images of its centre plus :data:`STRONG_LENSING_CUBE_MARGIN_ARCSEC` (the pipeline's cost
#: grows with the spaxels).
STRONG_LENSING_MIN_SIDE = 24
STRONG_LENSING_CUBE_MARGIN_ARCSEC = 0.8


def lensed_images(lens: ParametricLens, beta: tuple[float, float], *, half_size: float,
                  step: float = 0.02, core: float = 0.03) -> list[dict[str, Any]]:
    """Images of a point source at ``beta`` (arcsec) inside the square |theta| <= half_size.

    Local minima of |beta(theta) - beta| on a grid of ``step`` arcsec are refined by Newton
    iterations with the analytic Jacobian A = I - Hessian; images closer than ``core`` to
    the lens centre (the singular core of isothermal lenses, where the third image has
    mu -> 0) are dropped.

    Returns
    -------
    list of dict
        ``theta_x``, ``theta_y`` (arcsec), ``mu`` (signed, 1/det A) and ``jacobian``
        ([[dbx/dx, dbx/dy], [dby/dx, dby/dy]]), brightest first.

    Examples
    --------
    >>> sis = ParametricLens(({"type": "SIS", "theta_e": 1.0},))
    >>> [round(im["mu"], 3) for im in lensed_images(sis, (0.25, 0.0), half_size=3.0)]
    [5.0, -3.0]
    """
    from scipy import ndimage, optimize

    bx0, by0 = (float(v) for v in beta)
    axis = np.arange(-half_size, half_size + 0.5 * step, step)
    xx, yy = np.meshgrid(axis, axis)
    bx, by = lens.ray_shoot(xx, yy)
    d2 = (bx - bx0) ** 2 + (by - by0) ** 2
    minima = (ndimage.minimum_filter(d2, size=3, mode="nearest") == d2) & (d2 < 0.2**2)
    cx, cy = lens.center

    def jacobian(t):
        f_xx, f_xy, f_yx, f_yy = lens.hessian(t[0], t[1])
        return np.array([[1.0 - float(f_xx), -float(f_xy)], [-float(f_yx), 1.0 - float(f_yy)]])

    def residual(t):
        px, py = lens.ray_shoot(t[0], t[1])
        return np.array([float(px) - bx0, float(py) - by0])

    images: list[dict[str, Any]] = []
    for iy, ix in zip(*np.nonzero(minima), strict=True):
        sol = optimize.root(residual, [xx[iy, ix], yy[iy, ix]], jac=jacobian, method="hybr",
                            options={"xtol": 1e-10})
        t = sol.x
        if not sol.success or np.hypot(*residual(t)) > 1e-6 \
                or max(abs(t[0]), abs(t[1])) > half_size or np.hypot(t[0] - cx, t[1] - cy) < core:
            continue
        if any(np.hypot(t[0] - im["theta_x"], t[1] - im["theta_y"]) < 0.25 * step
               for im in images):
            continue
        a = jacobian(t)
        images.append({"theta_x": float(t[0]), "theta_y": float(t[1]),
                       "mu": float(1.0 / np.linalg.det(a)), "jacobian": a.tolist()})
    return sorted(images, key=lambda im: -abs(im["mu"]))


def halpha_magnification(spec: MockSpec) -> float:
    """The mock's true total magnification (``truth["mu"]``) without building the cubes.

    Noiseless image-plane Halpha flux inside the cube (after the PSF) over the source
    Halpha flux, both after dust: the definition of ``truth["mu"]`` (:func:`make_mock`).
    """
    if spec.lens is None:
        return 1.0
    maps, _ = image_plane_maps(spec, lines=("Halpha",), kinematics=False)
    return float(maps["flux"].sum()) / (spec.halpha_flux * dust_transmission("Halpha", spec.ebv))


def _tangential_caustic_radius(lens: ParametricLens, phi: float, theta_e: float,
                               half_size: float) -> float | None:
    """Distance from the lens centre along ``phi`` where the 4-image region ends (bisection)."""
    cx, cy = lens.center

    def count(r):
        return len(lensed_images(lens, (cx + r * math.cos(phi), cy + r * math.sin(phi)),
                                 half_size=half_size))

    lo, hi = 0.002 * theta_e, 0.8 * theta_e
    if count(lo) < 4 or count(hi) >= 4:
        return None
    for _ in range(14):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if count(mid) >= 4 else (lo, mid)
    return 0.5 * (lo + hi)


def strong_lensing_specs(n: int, *, seed: int = 0,
                         shape: tuple[int, int] = STRONG_LENSING_SHAPE) -> list[MockSpec]:
    """A deterministic grid of ``n`` strongly lensed KMOS mocks (issue 21 injection-recovery).

    Galaxy ``i`` depends only on ``(seed, i)``, so the first k galaxies of any grid are the
    same. Even ``i``: an SIS; odd ``i``: an SIE (q 0.6-0.9) plus external shear (0.02-0.08),
    with random lens and shear angles, Einstein radius 0.8-1.3" and the lens centre within
    0.2" of the cube centre. The source disc (random PA, inclination 20-65 deg, scale length
    0.5-1.4 kpc, gradient -0.08 to +0.03 dex/kpc) sits along a random direction from the
    lens centre at the distance whose true Halpha magnification (:func:`halpha_magnification`,
    = ``truth["mu"]``) is closest to a target spread log-uniformly (golden-ratio sequence)
    over :data:`STRONG_LENSING_MU_RANGE` (targets above 12 get a compact disc, 0.4-0.8 kpc, except on the caustic);
    ``i % 10 == 9`` (SIE) is instead centred exactly on the tangential caustic (4 -> 2
    images) and ``i % 10 == 5`` (SIE) half way to it (a quad). Redshifts alternate between the two K20 §2
    windows (:data:`STRONG_LENSING_Z_WINDOWS`; bands YJ, H, K as in :func:`demo_specs`); seeing
    0.45-0.7" (the pipeline's 0.4" smoothing comes on top), Halpha peak SNR 8-40
    (log-uniform; K20's galaxies span this), E(B-V) 0.05-0.4.

    The cube holds every point image of the galaxy centre (:func:`lensed_images`) with
    :data:`STRONG_LENSING_CUBE_MARGIN_ARCSEC` to spare (square, between
    :data:`STRONG_LENSING_MIN_SIDE` and ``shape`` spaxels): the counter-image of a multiply
    imaged source is inside it.

    Examples
    --------
    >>> specs = strong_lensing_specs(2)
    >>> [s.lens.components[0]["type"] for s in specs]
    ['SIS', 'SIE']
    """
    half = 0.5 * max(shape) * 0.2
    golden = 0.5 * (math.sqrt(5.0) - 1.0)
    mu_lo, mu_hi = STRONG_LENSING_MU_RANGE
    specs = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        lens_centre = tuple(float(v) for v in rng.uniform(-0.2, 0.2, 2))
        theta_e = float(rng.uniform(0.8, 1.3))
        cx, cy = lens_centre
        if i % 2 == 0:
            lens = ParametricLens(({"type": "SIS", "theta_e": theta_e, "center_x": cx,
                                    "center_y": cy},))
        else:
            gamma, shear_angle = float(rng.uniform(0.02, 0.08)), float(rng.uniform(0, np.pi))
            lens = ParametricLens((
                {"type": "SIE", "theta_e": theta_e, "q": float(rng.uniform(0.6, 0.9)),
                 "pa_deg": float(rng.uniform(0, 180)), "center_x": cx, "center_y": cy},
                {"type": "SHEAR", "gamma1": gamma * math.cos(2 * shear_angle),
                 "gamma2": gamma * math.sin(2 * shear_angle), "center_x": cx, "center_y": cy}))
        window = STRONG_LENSING_Z_WINDOWS[(i // 2) % 2]
        z = float(rng.uniform(*window))
        base = MockSpec(
            name=f"sl{i:03d}-{'sis' if i % 2 == 0 else 'sie'}", redshift=round(z, 4),
            shape=tuple(shape), psf_fwhm_arcsec=round(float(rng.uniform(0.45, 0.70)), 3),
            halpha_flux=float(10 ** rng.uniform(-17.0, -16.2)),
            scale_length_kpc=float(rng.uniform(0.5, 1.4)),
            inclination_deg=float(rng.uniform(20, 65)), pa_deg=float(rng.uniform(0, 180)),
            central_oh=float(rng.uniform(8.25, 8.55)),
            gradient_dex_per_kpc=round(float(rng.uniform(-0.08, 0.03)), 4),
            ebv=float(rng.uniform(0.05, 0.4)), v_max_kms=float(rng.uniform(60, 160)),
            v_turnover_kpc=float(rng.uniform(0.5, 1.5)), sigma_kms=float(rng.uniform(40, 80)),
            lens=lens, z_lens=round(float(rng.uniform(0.3, 0.6)), 3),
            snr_halpha_peak=round(float(10 ** rng.uniform(math.log10(8), math.log10(40))), 2),
            seed=1000 * seed + i, log_mstar=round(float(rng.uniform(9.0, 10.5)), 2),
            lens_map_size_arcsec=2 * half + 1.6)
        phi = float(rng.uniform(0, 2 * np.pi))
        target = mu_lo * (mu_hi / mu_lo) ** ((0.5 + i * golden) % 1.0)
        compact = float(rng.uniform(0.4, 0.8))
        r_caustic = None
        if i % 10 in (5, 9):
            r_caustic = _tangential_caustic_radius(lens, phi, theta_e, half)
        if r_caustic is not None:
            r = r_caustic * (1.0 if i % 10 == 9 else 0.5)
        else:
            if target > 12.0:  # only compact discs reach mu ~ 30 inside an arcsec-scale ring
                base = replace(base, scale_length_kpc=compact)
            radii = theta_e * np.geomspace(0.02, 1.6, 26)
            mus = [halpha_magnification(replace(base, centre_offset_arcsec=(
                cx + r * math.cos(phi), cy + r * math.sin(phi)))) for r in radii]
            miss = np.abs(np.log(np.asarray(mus) / target))
            miss[np.asarray(mus) > 1.1 * mu_hi] = np.inf  # caustic crossings overshoot
            r = float(radii[int(np.argmin(miss))]) if np.isfinite(miss).any() \
                else float(radii[int(np.argmin(mus))])
        centre = (round(cx + r * math.cos(phi), 5), round(cy + r * math.sin(phi), 5))
        images = lensed_images(lens, centre, half_size=half + 1.0)
        reach = max(max(abs(im["theta_x"]), abs(im["theta_y"])) for im in images)
        side = 2 * int(math.ceil((reach + STRONG_LENSING_CUBE_MARGIN_ARCSEC)
                                 / base.pixel_scale_arcsec))  # half side >= reach + margin
        side = int(np.clip(side, STRONG_LENSING_MIN_SIDE, max(shape)))
        specs.append(replace(base, centre_offset_arcsec=centre, shape=(side, side),
                             lens_map_size_arcsec=0.2 * side + 1.6))
    return specs

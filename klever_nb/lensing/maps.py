"""Lens maps: grids, redshift rescaling, parametric lenses, convergence and shear.

Part of :mod:`klever_nb.lensing` (see the package docstring for the flow).

References: K20 §3.2.1, §3.2.3; FACTS.md §10, §12.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from klever_nb.celestial import WCS_ERRORS, wcs_from_string
from klever_nb.constants import FWHM_PER_SIGMA  # noqa: F401  (the lensing modules take it from here)
from klever_nb.cosmology import dls_over_ds
from klever_nb.errors import ConfigError, InputError

# ---------------------------------------------------------------------------------------------
# Lens maps: redshift rescaling, parametric models, κ and γ
# ---------------------------------------------------------------------------------------------

def _celestial(header: str | None, what: str):
    """WCS from a header string, or an InputError naming ``what`` when there is none."""
    if not header:
        raise InputError(f"{what}: no celestial WCS (attrs['wcs'] is missing or empty); the "
                         "maps cannot be placed on the sky")
    try:
        wcs = wcs_from_string(header)
    except WCS_ERRORS as exc:
        raise InputError(f"{what}: unreadable WCS header ({exc})") from None
    if wcs.naxis != 2 or not wcs.has_celestial:
        raise InputError(f"{what}: the WCS has no celestial (RA/Dec) axes; the maps cannot "
                         "be placed on the sky")
    return wcs


def as_lens_grid(lens: xr.Dataset) -> xr.Dataset:
    """A lens Dataset in this module's layout: dims ``(ly, lx)``, coords ``theta_x``/``theta_y``.

    Also accepts maps on ``(y, x)`` with ``x_arcsec``/``y_arcsec`` coordinates (the layout of
    ``klever_nb.mock.lens_maps``); θ defaults to pixel offsets from the WCS reference pixel.
    """
    if "ly" in lens.dims and "theta_x" in lens.coords:
        return lens
    out = lens
    if "y" in out.dims and "x" in out.dims and "ly" not in out.dims:
        out = out.rename({"y": "ly", "x": "lx"})
    if "theta_x" not in out.coords:
        if "x_arcsec" in out.coords and "y_arcsec" in out.coords:
            out = out.rename({"x_arcsec": "theta_x", "y_arcsec": "theta_y"})
        else:
            p = float(out.attrs["pixel_scale_arcsec"])
            w = wcs_from_string(out.attrs["wcs"])
            out = out.assign_coords(
                theta_x=("lx", (np.arange(out.sizes["lx"]) - (w.wcs.crpix[0] - 1)) * p),
                theta_y=("ly", (np.arange(out.sizes["ly"]) - (w.wcs.crpix[1] - 1)) * p))
    return out.assign_coords(ly=np.arange(out.sizes["ly"]), lx=np.arange(out.sizes["lx"]))


def rescale_lens(lens: xr.Dataset, *, z_lens: float, z_source: float,
                 normalisation: str = "dls_ds") -> xr.Dataset:
    """Put deflection, κ and γ maps at the source redshift.

    Parameters
    ----------
    lens : xarray.Dataset
        ``alpha_x``, ``alpha_y`` and optionally ``kappa``, ``gamma``, ``gamma1``, ``gamma2``.
    z_lens, z_source : float
        Lens and source redshifts.
    normalisation : {"dls_ds", "source"}
        ``dls_ds``: maps for D_ls/D_s = 1, multiplied by D_ls/D_s of the paper's cosmology;
        ``source``: already for this source, returned unchanged.

    Returns
    -------
    xarray.Dataset
        Copy with attrs ``normalisation = "source"``, ``z_lens``, ``z_source``, ``dls_ds``.

    Raises
    ------
    ConfigError
        If ``z_source <= z_lens`` or the normalisation is unknown.

    References
    ----------
    K20 §3.2.3 ("once rescaled to the proper source redshift"); FACTS.md §10.
    """
    if normalisation not in {"dls_ds", "source"}:
        raise ConfigError(f"lens.normalisation must be 'dls_ds' or 'source', got {normalisation!r}")
    if not z_source > z_lens:
        raise ConfigError(f"source redshift {z_source} must be larger than the lens redshift "
                          f"{z_lens} (lens.z_lens): the galaxy must lie behind the lens")
    factor = dls_over_ds(z_lens, z_source) if normalisation == "dls_ds" else 1.0
    lens = as_lens_grid(lens)
    out = lens.copy()
    for name in ("alpha_x", "alpha_y", "kappa", "gamma", "gamma1", "gamma2"):
        if name in out:
            out[name] = lens[name] * factor
            out[name].attrs = dict(lens[name].attrs)
    out.attrs.update(normalisation="source", z_lens=float(z_lens), z_source=float(z_source),
                     dls_ds=float(factor))
    return out


def convergence_shear(lens: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """κ and γ (modulus) of a lens: from its maps if present, else by differentiating α.

    Finite differences (``np.gradient``, second order inside) agree with analytic Hessians to
    ~1e-6 away from critical curves and degrade near them (FACTS.md §12).
    """
    lens = as_lens_grid(lens)
    if "kappa" in lens and "gamma" in lens:
        return lens["kappa"].values, lens["gamma"].values
    p = float(lens.attrs["pixel_scale_arcsec"])
    dax_dy, dax_dx = np.gradient(lens["alpha_x"].values, p)
    day_dy, day_dx = np.gradient(lens["alpha_y"].values, p)
    kappa = 0.5 * (dax_dx + day_dy)
    gamma1 = 0.5 * (dax_dx - day_dy)
    gamma2 = 0.5 * (dax_dy + day_dx)
    return kappa, np.hypot(gamma1, gamma2)


def _default_wcs_header(shape: tuple[int, int], pixel_scale: float,
                        crval: tuple[float, float] = (0.0, 0.0)) -> str:
    """TAN WCS at ``crval`` (deg), north up, east left, reference pixel at the grid centre."""
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [float(crval[0]), float(crval[1])]
    w.wcs.crpix = [(shape[1] - 1) / 2 + 1, (shape[0] - 1) / 2 + 1]
    w.wcs.cdelt = [-pixel_scale / 3600.0, pixel_scale / 3600.0]
    return w.to_header_string()


def lens_from_parametric(model: Any, *, grid_like: xr.Dataset | tuple | None = None,
                         cube_wcs: str | None = None, pixel_scale_arcsec: float | None = None,
                         size_arcsec: float | None = None, normalisation: str = "source",
                         z_lens: float | None = None) -> xr.Dataset:
    """Deflection, κ and γ maps of an analytic lens on a pixel grid.

    Parameters
    ----------
    model : object
        Anything with ``deflection(x, y) -> (alpha_x, alpha_y)`` in arcsec and, optionally,
        ``hessian(x, y) -> (f_xx, f_xy, f_yx, f_yy)`` (``klever_nb.lensmodels.ParametricLens``,
        or a thin wrapper around a lenstronomy ``LensModel``).
    grid_like : xarray.Dataset or tuple
        A lens Dataset whose grid (``theta_x``, ``theta_y``, ``wcs``) is reused, or
        ``(shape, pixel_scale_arcsec, wcs_header_or_None)``; without a WCS a north-up TAN grid
        centred on (0, 0) is made. θ = 0 is the WCS reference pixel.
    cube_wcs, pixel_scale_arcsec, size_arcsec : optional
        Instead of ``grid_like``: a north-up square grid ``size_arcsec`` wide at
        ``pixel_scale_arcsec`` whose centre (θ = 0) is the cube's reference position (CRVAL),
        the frame of the model's ``center_x``/``center_y`` (``[lens] grid_pixel_arcsec``,
        ``grid_size_arcsec``).
    normalisation : {"source", "dls_ds"}
        What the model parameters describe (galaxy-scale models fitted to the data: "source").

    References
    ----------
    K20 §3.2.1 (galaxy lenses: deflection maps computed from the mass model).
    """
    if grid_like is None:
        if cube_wcs is None or pixel_scale_arcsec is None or size_arcsec is None:
            raise ConfigError("lens_from_parametric needs grid_like= or cube_wcs=, "
                              "pixel_scale_arcsec= and size_arcsec=")
        n = max(int(round(size_arcsec / pixel_scale_arcsec)), 2)
        crval = _celestial(cube_wcs, "cube").wcs.crval
        header = _default_wcs_header((n, n), float(pixel_scale_arcsec), crval=tuple(crval))
        grid_like = ((n, n), float(pixel_scale_arcsec), header)
    if isinstance(grid_like, xr.Dataset):
        grid_like = as_lens_grid(grid_like)
        theta_x = grid_like["theta_x"].values
        theta_y = grid_like["theta_y"].values
        header = grid_like.attrs["wcs"]
        scale = float(grid_like.attrs["pixel_scale_arcsec"])
    else:
        shape, scale, header = grid_like
        scale = float(scale)
        header = header or _default_wcs_header(tuple(shape), scale)
        wcs = wcs_from_string(header)
        theta_x = (np.arange(shape[1]) - (wcs.wcs.crpix[0] - 1)) * scale
        theta_y = (np.arange(shape[0]) - (wcs.wcs.crpix[1] - 1)) * scale
    tx, ty = np.meshgrid(theta_x, theta_y)
    ax, ay = model.deflection(tx, ty)
    data_vars = {"alpha_x": (("ly", "lx"), np.asarray(ax, float), {"units": "arcsec"}),
                 "alpha_y": (("ly", "lx"), np.asarray(ay, float), {"units": "arcsec"})}
    if hasattr(model, "hessian"):
        h = model.hessian(tx, ty)
        fxx, fxy, fyy = (h[0], h[1], h[3]) if len(h) == 4 else h
        g1, g2 = 0.5 * (np.asarray(fxx) - fyy), np.asarray(fxy, float)
        data_vars["kappa"] = (("ly", "lx"), 0.5 * (np.asarray(fxx) + fyy), {"units": ""})
        data_vars["gamma"] = (("ly", "lx"), np.hypot(g1, g2), {"units": ""})
        data_vars["gamma1"] = (("ly", "lx"), g1, {"units": ""})
        data_vars["gamma2"] = (("ly", "lx"), g2, {"units": ""})
    coords = {"ly": np.arange(len(theta_y)), "lx": np.arange(len(theta_x)),
              "theta_x": ("lx", theta_x, {"units": "arcsec"}),
              "theta_y": ("ly", theta_y, {"units": "arcsec"})}
    attrs = {"wcs": header, "pixel_scale_arcsec": scale, "normalisation": normalisation,
             "model": repr(model)}
    if z_lens is not None:
        attrs["z_lens"] = float(z_lens)
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def lens_from_components(components: tuple[dict, ...] | list[dict], *, pixel_scale_arcsec: float,
                         size_arcsec: float, wcs: str | None = None,
                         z_lens: float | None = None) -> xr.Dataset:
    """Lens maps of the ``[[lens.components]]`` of a galaxy TOML (SIE/EPL + shear, K20 §3.2.1).

    Uses ``klever_nb.lensmodels.ParametricLens`` (lenstronomy profiles); the grid is
    ``size_arcsec`` wide at ``pixel_scale_arcsec`` around θ = 0 (or the given WCS).
    """
    from klever_nb.lensmodels import ParametricLens  # written in parallel; imported lazily

    n = int(round(size_arcsec / pixel_scale_arcsec))
    model = ParametricLens(components=tuple(components))
    return lens_from_parametric(model, grid_like=((n, n), pixel_scale_arcsec, wcs),
                                normalisation="source", z_lens=z_lens)


def sky_to_source_arcsec(lens: xr.Dataset, ra_deg: float, dec_deg: float) -> tuple[float, float]:
    """Source-plane position β = θ − α(θ) (arcsec, lens frame) of a sky position.

    The sky position goes through the lens maps' celestial WCS (``attrs["wcs"]``) to a
    fractional lens-grid pixel, θ is interpolated from the ``theta_x``/``theta_y``
    coordinates and α bilinearly from the deflection maps (FACTS.md §13: β = θ − α, the
    components along the map's +x and +y pixel axes).

    Raises
    ------
    InputError
        If the position falls outside the lens maps or on a NaN deflection.
    """
    from scipy import ndimage

    grid = as_lens_grid(lens)
    wcs = _celestial(grid.attrs.get("wcs"), "lens maps")
    px, py = (float(v) for v in wcs.world_to_pixel_values(ra_deg, dec_deg))
    ny, nx = grid.sizes["ly"], grid.sizes["lx"]
    if not (0 <= px <= nx - 1 and 0 <= py <= ny - 1):
        raise InputError(f"centre (ra, dec) = ({ra_deg}, {dec_deg}) deg lies outside the lens "
                         "maps; give a centre inside the mapped field")
    theta_x = float(np.interp(px, np.arange(nx), grid["theta_x"].values))
    theta_y = float(np.interp(py, np.arange(ny), grid["theta_y"].values))
    alpha = [float(ndimage.map_coordinates(grid[name].transpose("ly", "lx").values,
                                           [[py], [px]], order=1)[0])
             for name in ("alpha_x", "alpha_y")]
    if not np.all(np.isfinite(alpha)):
        raise InputError(f"centre (ra, dec) = ({ra_deg}, {dec_deg}) deg falls on a NaN "
                         "deflection pixel")
    return theta_x - alpha[0], theta_y - alpha[1]

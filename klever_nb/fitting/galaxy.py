"""Galaxy level: integrated spectra, refined redshift, per-band maps, alignment, merging.

References
----------
K20 §3.1.
"""

from __future__ import annotations

import json

import numpy as np
import xarray as xr

from klever_nb import align as align_mod
from klever_nb import constants
from klever_nb.errors import InputError
from klever_nb.fitting.cube import fit_cube, fit_spectrum
from klever_nb.fitting.model import C_KMS, FitSettings, _check_lines, as_settings


# ---------------------------------------------------------------------------
# Galaxy level: integrated spectra, refined redshift, per-band maps, alignment
# ---------------------------------------------------------------------------
def refine_redshift(integrated_fit: xr.Dataset, *, redshift: float) -> float:
    """Redshift from the integrated Hα centroid (else [OIII]5007); unchanged if neither fits.

    ``z' = (1 + z)(1 + v / c) - 1`` with v the fitted velocity relative to ``redshift``
    (the model's line centre is λ_rest (1 + z)(1 + v/c), so this is exact).

    References
    ----------
    K20 §3.1 (redshift from the integrated spectrum).
    """
    for name in ("Halpha", "OIII_5007"):
        if "line" not in integrated_fit.dims or name not in integrated_fit["line"].values:
            continue
        row = integrated_fit.sel(line=name)
        usable = bool(row["fit_ok"]) and bool(row.get("detected", True))
        if "kinematics_forced" in row:
            usable &= not bool(row["kinematics_forced"])
        v = float(row["velocity"])
        if usable and np.isfinite(v):
            return float((1.0 + redshift) * (1.0 + v / C_KMS) - 1.0)
    return float(redshift)


def _band_lines(cube: xr.Dataset, redshift: float, lines) -> tuple[str, ...]:
    wave = np.asarray(cube.wave.values, dtype=float)
    return constants.lines_in_range(float(wave.min()), float(wave.max()), float(redshift),
                                    tuple(lines) if lines is not None else None)


def _group_kinematics(integrated: xr.Dataset) -> dict:
    out = {}
    for name in integrated["line"].values:
        row = integrated.sel(line=name)
        if bool(row["fit_ok"]) and not bool(row["kinematics_forced"]):
            out[constants.LINES[str(name)].group] = (float(row["velocity"]), float(row["sigma"]))
    return out


def _merge_bands(per_band: dict[str, xr.Dataset]) -> xr.Dataset:
    """Concatenate per-band Datasets along ``line``; a line fitted in two bands keeps the
    band with more fitted spaxels."""
    chosen: dict[str, tuple[str, int]] = {}
    for band, ds in per_band.items():
        for name in ds["line"].values:
            n_ok = int(ds["fit_ok"].sel(line=name).sum())
            if str(name) not in chosen or n_ok > chosen[str(name)][1]:
                chosen[str(name)] = (band, n_ok)
    parts = []
    for band, ds in per_band.items():
        keep = [n for n in ds["line"].values if chosen[str(n)][0] == band]
        if keep:
            parts.append(ds.drop_vars([v for v in ds.data_vars if "line" not in ds[v].dims])
                         .sel(line=keep))
    if not parts:
        return xr.Dataset()
    merged = xr.concat(parts, dim="line", data_vars="all", coords="minimal",
                       compat="override", join="outer", combine_attrs="drop_conflicts")
    for name in merged.data_vars:
        template = parts[0][name]
        if template.dtype == bool and merged[name].dtype != bool:
            merged[name] = merged[name].fillna(False).astype(bool)
        elif template.dtype.kind in "iu" and merged[name].dtype != template.dtype:
            merged[name] = merged[name].fillna(0).astype(template.dtype)
    order = sorted(merged["line"].values, key=lambda n: constants.LINES[str(n)].wave_vac)
    return merged.sel(line=order)


def fit_band(cube: xr.Dataset, *, redshift: float, settings: FitSettings | None = None,
             lines=None, smooth_fwhm_arcsec: float = constants.SMOOTH_FWHM_ARCSEC,
             fibre_radius_arcsec: float = constants.FIBRE_RADIUS_ARCSEC, mapper=None
             ) -> tuple[xr.Dataset, xr.Dataset]:
    """Line maps and integrated fluxes of one band's cube at a fixed redshift (K20 §3.1).

    The one fit path of a band, shared by :func:`fit_galaxy` (``klever-nb run``, after
    the redshift refinement) and :func:`klever_nb.pipeline.fit_single_cube`
    (``klever-nb fit``): the pseudo-fibre spectrum on the emission peak and its fit,
    then the cube (smoothed by ``smooth_fwhm_arcsec`` when > 0) fitted spaxel by
    spaxel with the integrated kinematics as the fallback for weak groups. The same
    cube, redshift, lines and settings give the same maps through either command.

    Returns
    -------
    maps : Dataset on ``(line, y, x)``
        attrs also ``noise_correlation_scaling`` and ``fibre_centre_yx``.
    integrated : Dataset on ``(line,)``
    """
    from klever_nb import spectra

    settings = as_settings(settings)
    names = _band_lines(cube, redshift, _check_lines(lines))
    if not names:
        raise InputError(f"no line of {list(lines) if lines else 'the catalogue'} falls inside "
                         f"band {cube.attrs.get('band', '')!r} at z = {redshift}")
    fibre = spectra.pseudo_fibre_spectrum(cube, radius_arcsec=fibre_radius_arcsec,
                                          redshift=redshift, lines=names)
    integrated = fit_spectrum(fibre, redshift=redshift, settings=settings, lines=names)
    work = cube
    if smooth_fwhm_arcsec and smooth_fwhm_arcsec > 0:
        work = spectra.smooth_cube(cube, fwhm_arcsec=smooth_fwhm_arcsec)
    maps = fit_cube(work, redshift=redshift, settings=settings, lines=names,
                    fallback_kinematics=_group_kinematics(integrated), mapper=mapper)
    maps.attrs["noise_correlation_scaling"] = float(
        work.attrs.get("noise_correlation_scaling", 1.0))
    maps.attrs["fibre_centre_yx"] = list(map(float, fibre.attrs["centre_yx"]))
    maps.attrs["smooth_fwhm_arcsec"] = float(smooth_fwhm_arcsec or 0.0)
    integrated.attrs["fibre_centre_yx"] = maps.attrs["fibre_centre_yx"]
    return maps, integrated


def fit_galaxy(tree: xr.DataTree, *, redshift: float, settings: FitSettings | None = None,
               lines=None, smooth_fwhm_arcsec: float = constants.SMOOTH_FWHM_ARCSEC,
               fibre_radius_arcsec: float = constants.FIBRE_RADIUS_ARCSEC,
               align: bool = True) -> tuple[xr.Dataset, xr.Dataset]:
    """Line maps and integrated fluxes of a galaxy's cubes, bands aligned (K20 §3.1).

    The pseudo-fibre spectrum of each band is fitted at the input redshift; the
    redshift is refined from the integrated Hα (else [OIII]5007) centroid; then every
    band goes through :func:`fit_band` at the refined redshift. The bands' maps are
    placed on the reference band's grid through their celestial WCS
    (``attrs["wcs"]`` of each cube) and the placement is refined by cross-correlation
    (:func:`klever_nb.align.register_bands`), then merged.

    Parameters
    ----------
    tree : xarray.DataTree
        One child per band, each a cube Dataset.
    redshift : float
        Input redshift (the maps' velocities are relative to the refined one).
    settings : FitSettings, optional
        Fit options for every fit (default ``FitSettings()``).
    lines : sequence of str, optional
        Lines to fit (default: every catalogue line inside each band).
    smooth_fwhm_arcsec, fibre_radius_arcsec : float
        K20 §3.1 defaults 0.4″ and 0.6″.
    align : bool
        Register the bands (K20 §3.1).

    Returns
    -------
    line_maps : xarray.Dataset on ``(line, y, x)``
        Also ``band_shift`` on ``(bands, step, axis)``: the WCS placement, the
        cross-correlation refinement and their total (pixels, (dy, dx)).
    integrated : xarray.Dataset on ``(line,)``
        attrs: ``redshift`` (refined), ``redshift_input``, ``redshift_refined``,
        ``alignment_shifts`` (total), ``alignment_wcs_offsets``,
        ``alignment_refinement``, ``alignment_reference``, ``alignment_methods``
        (JSON), per-band ``resolving_power``, fibre centres,
        ``noise_correlation_scaling``.

    References
    ----------
    K20 §3.1.

    Examples
    --------
    >>> import json
    >>> from klever_nb.mock import demo_specs, make_mock
    >>> galaxy = make_mock(demo_specs()[1])
    >>> maps, integrated = fit_galaxy(galaxy.cubes, redshift=galaxy.spec.redshift)
    >>> sorted(json.loads(maps.attrs["alignment_shifts"]))
    ['H', 'K', 'YJ']
    """
    from klever_nb import spectra

    settings = as_settings(settings)
    lines = _check_lines(lines)
    cubes = {name: node.to_dataset() for name, node in tree.children.items()
             if "flux" in node.to_dataset()}
    if not cubes:
        raise InputError("fit_galaxy: the DataTree has no band with a 'flux' cube")
    notes, band_lines = {}, {}
    for band, cube in cubes.items():
        names = _band_lines(cube, redshift, lines)
        if names:
            band_lines[band] = names
        else:
            notes[band] = f"no requested line inside band {band} at z = {redshift}"
    if not band_lines:
        raise InputError(f"fit_galaxy: no line of {list(lines) if lines else 'the catalogue'} "
                         f"falls inside any band at z = {redshift}")
    first = {}
    for b, names in band_lines.items():
        fibre = spectra.pseudo_fibre_spectrum(cubes[b], radius_arcsec=fibre_radius_arcsec,
                                              redshift=redshift, lines=names)
        first[b] = fit_spectrum(fibre, redshift=redshift, settings=settings, lines=names)
    z_ref = redshift
    for b in band_lines:
        z_try = refine_redshift(first[b], redshift=redshift)
        if z_try != redshift:
            z_ref = z_try
            if "Halpha" in first[b]["line"].values:
                break
    integrated, maps = {}, {}
    for band in band_lines:
        names = _band_lines(cubes[band], z_ref, band_lines[band]) or band_lines[band]
        maps[band], integrated[band] = fit_band(
            cubes[band], redshift=z_ref, settings=settings, lines=names,
            smooth_fwhm_arcsec=smooth_fwhm_arcsec, fibre_radius_arcsec=fibre_radius_arcsec)
    placement = _register(maps, cubes, align)
    maps = align_mod.apply_offsets(maps, placement["total"])
    line_maps = _merge_bands(maps)
    integ = _merge_bands(integrated)
    images = [maps[b]["continuum_image"] for b in maps if "continuum_image" in maps[b]]
    if images and "y" in line_maps.dims:
        line_maps["continuum_image"] = xr.concat(images, dim="bands", join="outer").assign_coords(
            bands=[b for b in maps if "continuum_image" in maps[b]])
    if "y" in line_maps.dims:
        line_maps["band_shift"] = _shift_table(placement, list(maps))
    attrs = {
        "redshift": float(z_ref), "redshift_input": float(redshift),
        "redshift_refined": float(z_ref),
        "smooth_fwhm_arcsec": float(smooth_fwhm_arcsec),
        "fibre_radius_arcsec": float(fibre_radius_arcsec),
        "alignment_shifts": _json_shifts(placement["total"]),
        "alignment_wcs_offsets": _json_shifts(placement["wcs"]),
        "alignment_refinement": _json_shifts(placement["refinement"]),
        "alignment_reference": str(placement["reference"] or ""),
        "alignment_methods": json.dumps(placement["methods"]),
        "resolving_power": json.dumps({b: maps[b].attrs.get("resolving_power") for b in maps}),
        "noise_correlation_scaling": json.dumps(
            {b: maps[b].attrs["noise_correlation_scaling"] for b in maps}),
        "fibre_centres_yx": json.dumps({b: maps[b].attrs["fibre_centre_yx"] for b in maps}),
        "bands": json.dumps(list(maps)),
        "notes": json.dumps(notes),
        "flux_units": next(iter(maps.values())).attrs.get("flux_units", ""),
        "fit_settings": repr(settings.describe()),
    }
    line_maps.attrs = dict(attrs)
    integ.attrs = dict(attrs)
    return line_maps, integ


def _register(maps: dict, cubes: dict, align: bool) -> dict:
    """WCS placement + cross-correlation refinement of the bands (or none)."""
    zero = {b: (0.0, 0.0) for b in maps}
    if not align or len(maps) < 2:
        return {"reference": next(iter(maps)), "wcs": zero, "refinement": dict(zero),
                "total": dict(zero), "methods": {}}
    return align_mod.register_bands(
        maps, wcs_by_band={b: cubes[b].attrs.get("wcs") for b in maps})


def _json_shifts(shifts: dict) -> str:
    return json.dumps({b: [float(s[0]), float(s[1])] for b, s in shifts.items()})


def _shift_table(placement: dict, bands: list[str]) -> xr.DataArray:
    steps = ("wcs", "refinement", "total")
    values = np.array([[placement[k][b] for k in steps] for b in bands], dtype=float)
    da = xr.DataArray(values, dims=("bands", "step", "axis"),
                      coords={"bands": bands, "step": list(steps), "axis": ["dy", "dx"]})
    da.attrs.update(units="pixel", long_name=(
        "shift applied to each band's maps: WCS placement on the reference band's grid, "
        "cross-correlation refinement, and their total"))
    return da

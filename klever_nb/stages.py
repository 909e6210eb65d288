"""The science stages of one galaxy, as :func:`klever_nb.pipeline.run_galaxy` chains them.

Each stage takes the previous stages' products and returns a :class:`StageResult` (its
Dataset and its ``summary.json`` fields); none of them touches files (the pipeline reads
the inputs, caches and writes):

===================  ==========================================  ===========================
stage                takes                                       returns (``data``)
===================  ==========================================  ===========================
``_fit_stage``       cubes DataTree, galaxy config               line maps (K20 §3.1)
``_lens_stage``      line maps, lens maps, cubes                 source-plane maps (§3.2)
``_metallicity_...`` line maps, source-plane maps, lens summary  metallicity map (§3.3-3.4)
``_gradient_stage``  metallicity map, source-plane maps, lens    profile (§4.2, §4.5)
===================  ==========================================  ===========================

References
----------
Curti et al. 2020 (K20), MNRAS 492, 821; DESIGN.md "Products"; issue 15 (a thin pipeline).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from klever_nb import constants
from klever_nb.config import GalaxyConfig
from klever_nb.errors import KleverError


@dataclass(frozen=True)
class StageResult:
    """What one stage hands to the next: its product and its summary fields (read-only).

    ``data`` is the stage's Dataset (line maps, source-plane maps, metallicity map, profile)
    or None when a cached stage's product is not needed downstream; ``summary`` holds the
    fields the stage contributes to ``summary.json``.
    """

    data: xr.Dataset | None
    summary: Mapping[str, Any]
    seconds: float = 0.0


# ---------------------------------------------------------------------------
# Summary fields
# ---------------------------------------------------------------------------
def _plain(info: Mapping[str, Any]) -> dict[str, Any]:
    """Summary fields as JSON types (numpy scalars to Python), as they are written."""
    return json.loads(json.dumps(dict(info), default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _band_detection_flags(maps: xr.Dataset | None, cfg: GalaxyConfig) -> dict[str, Any]:
    """Bands with usable spaxels in which no line is detected: a flag and a warning (issue 18).

    A band counts as empty when none of its lines is detected in the pseudo-fibre spectrum
    nor in any spaxel; its maps stay in the products (NaN where nothing was fitted), the
    summary lists it under ``bands_without_detection`` with a message, and a warning is
    raised on every run (also when the stage came from the cache).
    """
    import warnings

    if maps is None or "band" not in maps.coords or "line" not in maps.dims:
        return {}
    empty = []
    for band in dict.fromkeys(str(b) for b in maps["band"].values):
        lines = maps["line"].values[maps["band"].values == band]
        sub = maps.sel(line=lines)
        fibre = bool(sub["integrated_detected"].any()) if "integrated_detected" in sub else False
        spaxels = bool(sub["detected"].any()) if "detected" in sub else False
        if not (fibre or spaxels):
            empty.append(band)
    if not empty:
        return {"bands_without_detection": []}
    message = (f"{cfg.name}: no emission line detected in band(s) {', '.join(empty)} "
               f"(pseudo-fibre and every spaxel below SNR {cfg.analysis.detection_snr}); "
               "their lines are upper limits only")
    warnings.warn(message, UserWarning, stacklevel=2)
    return {"bands_without_detection": empty, "bands_without_detection_message": message}


# ---------------------------------------------------------------------------
# The stages and their helpers
# ---------------------------------------------------------------------------
def _aligned_cubes(tree: xr.DataTree, shifts: dict[str, list[float]]) -> xr.DataTree:
    """Each band's cube moved by the registration shift of its line maps (K20 §3.1)."""
    from klever_nb import align

    children = {}
    for band, node in tree.children.items():
        cube = node.to_dataset()
        children[f"/{band}"] = align.apply_offsets(cube, tuple(shifts.get(band, (0.0, 0.0))))
    return xr.DataTree.from_dict(children)


def _fit_stage(tree: xr.DataTree, cfg: GalaxyConfig) -> StageResult:
    """Line maps of every band (K20 §3.1) and the integrated fluxes' summary fields."""
    from klever_nb import fitting

    s = cfg.analysis
    settings = fitting.FitSettings(detection_snr=s.detection_snr,
                                   sky_min_relative_amplitude=s.sky_min_relative_amplitude)
    options = {"redshift": cfg.redshift, "fibre_radius_arcsec": s.fibre_radius_arcsec,
               "lines": s.lines if s.lines is not None else constants.PAPER_LINES,
               "settings": settings}
    maps, integrated = fitting.fit_galaxy(tree, smooth_fwhm_arcsec=s.smooth_fwhm_arcsec,
                                          **options)
    for name in ("flux", "flux_err", "snr", "detected", "upper_limit", "velocity", "sigma"):
        if name in integrated:
            maps[f"integrated_{name}"] = integrated[name]
    if s.forward_gradient and s.method != "k20" and s.smooth_fwhm_arcsec > 0:
        # The forward model compares with independent pixel errors and the image PSF alone:
        # smoothed maps (correlated noise, extra blur) bias it (measured on the demo mocks:
        # -0.06 instead of -0.02 dex/kpc), so it gets maps fitted without smoothing.
        raw, _ = fitting.fit_galaxy(tree, smooth_fwhm_arcsec=0.0, **options)
        raw = raw.reindex(line=maps["line"])
        for name in ("flux", "flux_err"):
            maps[f"{name}_unsmoothed"] = raw[name]
            maps[f"{name}_unsmoothed"].attrs = dict(raw[name].attrs, description=(
                f"{name} fitted without spatial smoothing (input of the forward-modelled "
                "gradient)"))
    first = next(iter(tree.children.values())).to_dataset()
    for key in ("pixel_scale_arcsec", "wcs"):
        if key in first.attrs:
            maps.attrs.setdefault(key, first.attrs[key])
    for key, value in integrated.attrs.items():  # pseudo-fibre settings and results
        if isinstance(value, str | int | float):
            maps.attrs[f"integrated_{key}"] = value
    return StageResult(maps, _integrated_summary(maps))


def _integrated_summary(maps: xr.Dataset) -> dict:
    out: dict[str, Any] = {}
    if "integrated_flux" in maps and "Halpha" in maps["line"].values:
        unit = maps["flux"].attrs.get("units", "")
        out["halpha_fibre_flux"] = float(maps["integrated_flux"].sel(line="Halpha"))
        out["halpha_fibre_flux_err"] = float(maps["integrated_flux_err"].sel(line="Halpha"))
        out["flux_units"] = unit
    if "redshift_refined" in maps.attrs:
        out["redshift_refined"] = float(maps.attrs["redshift_refined"])
    detected = [str(line) for line in maps["line"].values
                if "integrated_detected" in maps and bool(maps["integrated_detected"].sel(line=line))]
    out["lines_detected"] = detected
    return out


#: Band whose continuum peak centres the annuli (K20 §4.2: the H-band continuum).
CENTRE_CONTINUUM_BAND = "H"
#: Pseudo-line under which the continuum map travels through the source-plane reconstruction.
_CONTINUUM_LINE = "continuum_" + CENTRE_CONTINUUM_BAND
#: The continuum counts as detected when its lightly smoothed peak reaches this SNR.
CONTINUUM_DETECTION_SNR = 5.0


def _continuum_map(tree: xr.DataTree, maps: xr.Dataset) -> xr.Dataset | None:
    """The H-band continuum image as a pseudo-line (flux, flux_err, snr) and its detection.

    ``continuum_image`` is the median of the line-free channels of each spaxel, so its
    1σ is ~1.2533 σ_channel / sqrt(N) (the efficiency of a median of N Gaussian values)
    with σ_channel the spaxel's median noise. Detected: the peak of the map smoothed by a
    1-spaxel Gaussian (whose noise is 1/(2 sqrt(pi)) of one spaxel's) reaches
    ``CONTINUUM_DETECTION_SNR``.
    """
    from scipy.ndimage import gaussian_filter

    band = CENTRE_CONTINUUM_BAND
    if "continuum_image" not in maps or band not in maps["continuum_image"]["bands"].values \
            or band not in tree.children:
        return None
    image = maps["continuum_image"].sel(bands=band).transpose("y", "x")
    noise = tree[band].to_dataset()["noise"].transpose("wave", "y", "x")
    n_channels = np.isfinite(noise).sum("wave")
    sigma = 1.2533 * noise.median("wave") / np.sqrt(n_channels.where(n_channels > 0))
    smoothed_snr = gaussian_filter(np.nan_to_num((image / sigma).values), 1.0) * 2 * np.sqrt(np.pi)
    detected = bool(np.nanmax(smoothed_snr) >= CONTINUUM_DETECTION_SNR)
    out = xr.Dataset({"flux": image.expand_dims(line=[_CONTINUUM_LINE]),
                      "flux_err": sigma.transpose("y", "x").expand_dims(line=[_CONTINUUM_LINE])})
    out["snr"] = out["flux"] / out["flux_err"]
    if "band" in maps.coords:
        out = out.assign_coords(band=("line", [band]))
    out.attrs["detected"] = int(detected)
    out.attrs["peak_snr"] = float(np.nanmax(smoothed_snr))
    return out


def _lens_stage(maps: xr.Dataset, cfg: GalaxyConfig, lens: xr.Dataset | None,
                alternatives: list[xr.Dataset], cube_wcs: str, tree: xr.DataTree) -> StageResult:
    """Source-plane maps (with the H continuum as ``continuum``) and the lensing summary.

    The PSF handed to the reconstruction is the one the fitted maps have: seeing ⊕ the
    spatial smoothing (:func:`klever_nb.lensing.maps_psf_fwhm_arcsec`), except with
    ``method = "k20"``, which keeps the paper's seeing-only PSF.
    """
    from klever_nb import lensing

    s = cfg.analysis
    keep = [v for v in ("flux", "flux_err", "snr", "velocity", "velocity_err", "sigma",
                        "sigma_err") if v in maps]
    line_maps = maps[keep]
    continuum = _continuum_map(tree, maps)
    if continuum is not None:
        line_maps = xr.concat([line_maps, continuum], dim="line", join="outer")
        line_maps.attrs = dict(maps.attrs)
    psf_fwhm = (cfg.psf_fwhm_arcsec if s.method == "k20"
                else lensing.maps_psf_fwhm_arcsec(cfg.psf_fwhm_arcsec, maps))
    if lens is None:
        source, info = lensing.unlensed_source_maps(line_maps, redshift=cfg.redshift,
                                                    psf_fwhm_arcsec=psf_fwhm)
    else:
        shift, hst_info = _hst_registration(maps, lens, cfg, cube_wcs)
        source, info = lensing.reconstruct_source_plane(
            line_maps, lens, redshift=cfg.redshift, cube_wcs=cube_wcs,
            psf_fwhm_arcsec=psf_fwhm, source_pixel_arcsec=s.source_pixel_arcsec,
            alternative_lenses=alternatives, shift_arcsec=shift, method=s.method)
        info.update(hst_info)
    if continuum is not None:
        source["continuum"] = source["flux"].sel(line=_CONTINUUM_LINE, drop=True)
        source["continuum"].attrs = dict(source["flux"].attrs, band=CENTRE_CONTINUUM_BAND,
                                         detected=continuum.attrs["detected"],
                                         peak_snr=continuum.attrs["peak_snr"],
                                         description="line-free continuum (K20 §4.2 centre)")
        source = source.drop_sel(line=_CONTINUUM_LINE)
        info.update(continuum_detected=bool(continuum.attrs["detected"]),
                    continuum_peak_snr=continuum.attrs["peak_snr"])
    info["source_psf_from"] = ("seeing only (K20)" if s.method == "k20" else
                               "seeing and the spatial smoothing of the fitted maps")
    return StageResult(source, _plain(info))


def _hst_registration(maps: xr.Dataset, lens: xr.Dataset, cfg: GalaxyConfig,
                      cube_wcs: str) -> tuple[tuple[float, float], dict]:
    """Read ``[lens] hst_image`` and register the IFU maps on it (K20 §3.2.2)."""
    from klever_nb import lensing
    from klever_nb.io.images import open_image

    if cfg.lens is None or cfg.lens.hst_image is None:
        return (0.0, 0.0), {"hst_registration": "no hst_image given: no shift applied"}
    hst = open_image(cfg.lens.hst_image)
    hst.attrs["source_file"] = cfg.lens.hst_image.name
    return lensing.hst_registration_shift(maps, lens, hst, cube_wcs=cube_wcs,
                                          psf_fwhm_arcsec=cfg.psf_fwhm_arcsec)


def _metallicity_stage(maps: xr.Dataset, source: xr.Dataset, cfg: GalaxyConfig,
                       lensing_info: Mapping[str, Any]) -> StageResult:
    """Dust, metallicity map (source plane), global metallicity and SFR (K20 §3.3-3.4, §4.2)."""
    from klever_nb import dust, metallicity, sfr

    s = cfg.analysis
    integrated = _integrated_dataset(maps)
    diagnostics = metallicity.choose_diagnostics(
        integrated, redshift=cfg.redshift,
        requested=list(s.diagnostics) if s.diagnostics else None)
    # negative E(B-V) -> 0, no Balmer decrement -> 0 +- 0.2 mag; flagged (dust.py)
    dust_info = dust.global_ebv_for_correction(*dust.integrated_balmer_ebv(integrated))
    ebv, ebv_err = dust_info["ebv"], dust_info["ebv_err"]
    metal = metallicity.metallicity_map(
        source, diagnostics=diagnostics, calibration_set=s.calibration_set,
        redshift=cfg.redshift, ebv=ebv, ebv_err=ebv_err, method=s.metallicity_method,
        snr_min_strong=s.snr_strong, snr_min_weak=s.snr_weak,
        exclude_agn=s.exclude_agn_pixels)
    info: dict[str, Any] = metallicity.global_metallicity(
        integrated, redshift=cfg.redshift, diagnostics=diagnostics,
        calibration_set=s.calibration_set, ebv=ebv, ebv_err=ebv_err,
        snr_min_strong=s.detection_snr, snr_min_weak=s.detection_snr)
    info.update({"ebv": ebv, "ebv_err": ebv_err,
                 "agn_like_pixels": int(metal["agn_like"].sum()),
                 "agn_pixels_excluded": int(metal["agn_excluded"].sum())})
    info.update({k: v for k, v in dust_info.items() if k not in ("ebv", "ebv_err")})
    # the headline mu (forward-modelled; the paper's with method = "k20"), as the lens stage set it
    mu = lensing_info.get("mu_halpha", 1.0) if cfg.lensed else 1.0
    mu_err = lensing_info.get("mu_halpha_err", 0.0) if cfg.lensed else 0.0
    info["sfr_mu"] = lensing_info.get("mu_halpha_method", "k20") if cfg.lensed else "unlensed"
    if not np.isfinite(mu):
        mu = lensing_info.get("mu_maps", 1.0)
        mu_err = lensing_info.get("mu_maps_spread", float("nan"))
        info["sfr_mu"] = "mu_maps (no mu_halpha)"
    if "Halpha" in maps["line"].values:
        # K20 §3.3 co-adds the SNR > 5 spaxels; the headline μ is defined on all the Hα in the
        # field, so the default co-adds every spaxel (strong-lensing benchmark: SNR > 5 gave a
        # median SFR bias of -16 %; demo z = 2.2 unlensed: -9 % vs -0.3 % against the truth)
        paper_sum = s.method == "k20"
        total, total_err = sfr.total_halpha(
            maps, snr_min=constants.SFR_SNR if paper_sum else -np.inf)
        info["sfr_halpha_sum"] = (f"spaxels with Halpha SNR > {constants.SFR_SNR:g} (K20 §3.3)"
                                  if paper_sum else "every spaxel of the field")
        rate = sfr.sfr_from_halpha(total, total_err, redshift=cfg.redshift, ebv=ebv,
                                   ebv_err=ebv_err, mu=mu, mu_err=mu_err,
                                   flux_units=maps["flux"].attrs.get("units"))
        info.update({"halpha_flux": rate.get("halpha_flux_cgs", total),
                     "halpha_flux_err": rate.get("halpha_flux_err_cgs", total_err),
                     "sfr": rate["sfr"], "sfr_err": rate["sfr_err"]})
    return StageResult(metal, _plain(info))


def _integrated_dataset(maps: xr.Dataset) -> xr.Dataset:
    names = [n for n in maps.data_vars if n.startswith("integrated_")]
    out = xr.Dataset({n.removeprefix("integrated_"): maps[n] for n in names})
    out["flux"].attrs = dict(maps["flux"].attrs)
    return out


def _gradient_stage(metal: xr.Dataset, source: xr.Dataset, maps: xr.Dataset,
                    cfg: GalaxyConfig, lens: xr.Dataset | None, lensing_info: Mapping[str, Any],
                    metal_info: Mapping[str, Any]) -> StageResult:
    """The paper's gradient (K20 §4.2), 2-D statistics (§4.5) and the forward-modelled one."""
    from klever_nb import gradients, lensing

    psf = lensing.annulus_psf(lensing_info)
    centre, centre_used = gradients.gradient_centre(
        source, rule=cfg.analysis.centre if isinstance(cfg.analysis.centre, str) else "continuum",
        user_centre_kpc=_user_centre_kpc(cfg, source, lens))
    profile, info = gradients.measure_gradient(
        metal, psf=psf, centre_kpc=centre, step_fraction=cfg.analysis.step_fraction,
        line_maps=source)
    info["centre_used"] = centre_used
    fit = info.pop("fit", {})
    if np.isfinite(info.get("gradient_dex_per_kpc", np.nan)):
        selected, _ = gradients.gradient_pixels(metal)
        info.update(_two_d_statistics(selected, fit or info, psf, centre))
        if cfg.analysis.forward_gradient and cfg.analysis.method != "k20":
            info.update(_forward_gradient(maps, source, cfg, lens, lensing_info, metal_info))
    return StageResult(profile, _plain(info))


def _user_centre_kpc(cfg: GalaxyConfig, source: xr.Dataset,
                     lens: xr.Dataset | None) -> tuple[float, float] | None:
    """``[analysis] centre = [ra_deg, dec_deg]`` on the source grid (kpc), else None.

    Lensed: β of the sky position through the deflection maps
    (:func:`klever_nb.lensing.sky_to_source_arcsec`); unlensed: the cube pixel of the sky
    position (β is the image position there). ``xs``/``ys`` are β minus the grid centre
    ``centre_beta_arcsec``, times kpc/arcsec.
    """
    from klever_nb import lensing
    from klever_nb.celestial import wcs_from_string

    if isinstance(cfg.analysis.centre, str):
        return None
    ra, dec = cfg.analysis.centre
    if lens is not None:
        beta = lensing.sky_to_source_arcsec(lens, ra, dec)
    else:
        wcs = wcs_from_string(source.attrs.get("wcs", ""))
        px, py = (float(v) for v in wcs.world_to_pixel_values(ra, dec))
        pix = float(source.attrs["pixel_scale_arcsec"])
        beta = (px * pix, py * pix)
    cx, cy = source.attrs["centre_beta_arcsec"]
    scale = float(source.attrs["kpc_per_arcsec"])
    return (beta[0] - cx) * scale, (beta[1] - cy) * scale


def _forward_gradient(maps: xr.Dataset, source: xr.Dataset, cfg: GalaxyConfig,
                      lens: xr.Dataset | None, lensing_info: Mapping[str, Any],
                      metal_info: Mapping[str, Any]) -> dict:
    """The forward-modelled gradient (beyond K20): source model -> lens -> PSF -> IFU pixels."""
    from klever_nb.cosmology import kpc_per_arcsec
    from klever_nb.gradients import forward as forward_gradient

    if "flux_unsmoothed" in maps:
        image = xr.Dataset({"flux": maps["flux_unsmoothed"],
                            "flux_err": maps["flux_err_unsmoothed"]}, attrs=maps.attrs)
    else:
        image = maps[["flux", "flux_err"]]
    ifu_shape = (image.sizes["y"], image.sizes["x"])
    pix = float(maps.attrs["pixel_scale_arcsec"])
    if lens is not None:
        # the IFU maps sit where the HST registration (K20 §3.2.2) put them for the source maps
        shift = tuple(lensing_info.get("shift_arcsec", (0.0, 0.0)))
        operator, grid = forward_gradient.lens_forward_from_lensing(
            lens, source_maps=source, psf_fwhm_arcsec=cfg.psf_fwhm_arcsec,
            ifu_wcs=maps.attrs.get("wcs", ""), ifu_shape=ifu_shape, shift_arcsec=shift)
    else:
        scale = kpc_per_arcsec(cfg.redshift)
        cx, cy = source.attrs.get("centre_beta_arcsec", [0.0, 0.0])
        centre = ((0.5 * (ifu_shape[1] - 1)) * pix - cx, (0.5 * (ifu_shape[0] - 1)) * pix - cy)
        identity = forward_gradient.AffineLens(
            kpc_per_arcsec=scale, source_centre_kpc=(centre[0] * scale, centre[1] * scale))
        grid = (source["ys"].values, source["xs"].values)
        operator = forward_gradient.affine_forward(
            identity, source_ys_kpc=grid[0], source_xs_kpc=grid[1], ifu_shape=ifu_shape,
            pixel_scale_arcsec=pix, psf_fwhm_arcsec=cfg.psf_fwhm_arcsec)
    usable = [d for d in metal_info.get("diagnostics", []) if d in constants.FORWARD_DIAGNOSTICS]
    if not usable:
        return {"gradient_forward_message": "no diagnostic the forward model handles "
                f"({', '.join(constants.FORWARD_DIAGNOSTICS)}) was chosen for this galaxy"}
    try:
        # The image-plane fit sees any residual misregistration of the bands (the K20 §3.1
        # alignment on a faint continuum or an arc can be off by ~0.7 spaxel: the
        # Hbeta+[OIII] band of the z = 1.4 demo mock gave -0.018 instead of -0.040 dex/kpc),
        # so every band is registered on the model (through the lens: also the Halpha band).
        register = ("none" if "band" not in image.coords
                    else "absolute" if lens is not None else "relative")
        result = forward_gradient.fit_forward_gradient(
            image, lens_forward=operator, source_grid_kpc=grid, redshift=cfg.redshift,
            diagnostics=usable, calibration_set=cfg.analysis.calibration_set,
            radius="deprojected", nsteps=800, register_bands=register)
    except KleverError as err:
        return {"gradient_forward_message": str(err)}
    out = {"gradient_forward_dex_per_kpc": result.get("gradient_dex_per_kpc"),
           "gradient_forward_err": result.get("gradient_err"),
           "central_forward_oh": result.get("central_oh"),
           "gradient_forward_converged": bool(result.get("converged", False)),
           "gradient_forward_diagnostics": usable}
    if result.get("band_shifts_pix"):
        out["gradient_forward_band_shifts_pix"] = {
            band: [float(v) for v in shift] for band, shift in result["band_shifts_pix"].items()}
        out["gradient_forward_band_shifts_err_pix"] = {
            band: [float(v) for v in err]
            for band, err in result.get("band_shifts_err_pix", {}).items()}
    return out


def _two_d_statistics(metal: xr.Dataset, info: dict, psf: dict,
                      centre: tuple[float, float]) -> dict:
    """§4.5: planar fit (steepest gradient) and the non-axisymmetry test of the residuals."""
    from klever_nb import gradients

    out: dict[str, Any] = {}
    try:
        plane = gradients.planar_fit(metal, psf=psf, centre_kpc=centre)
        asym = gradients.non_axisymmetry(metal, fit=info, psf=psf, centre_kpc=centre)
    except KleverError as err:
        return {"map_2d_message": str(err)}
    for key, value in plane.items():
        if isinstance(value, int | float | np.floating | np.integer):
            out[f"planar_{key}"] = float(value)
    for key, value in asym.items():
        if isinstance(value, int | float | np.floating | np.integer | bool | np.bool_):
            out[f"non_axisymmetry_{key}"] = (bool(value) if isinstance(value, bool | np.bool_)
                                             else float(value))
    return out

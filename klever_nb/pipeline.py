"""Run the stages of one galaxy (or a sample) from input files to products.

This is the only place (with :mod:`klever_nb.io` and :mod:`klever_nb.cli`) that
touches files. Inputs are validated before anything is written; each product is
written atomically; a rerun skips a stage whose inputs (files, settings, code
version) did not change, identified by a hash kept in the product's attrs.

Products in ``OUT/<name>/`` (DESIGN.md "Products"): ``cubes_aligned.nc``,
``line_maps.nc``, ``source_maps.nc``, ``metallicity.nc``, ``profile.csv``,
``gradient.png``, ``summary.json``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import xarray as xr

from klever_nb import __version__, constants
from klever_nb.config import METHODS, GalaxyConfig, load_galaxy
from klever_nb.errors import ConfigError, InputError, KleverError
from klever_nb.io import read_netcdf, write_json, write_netcdf, write_text
from klever_nb.io.cubes import open_cube


# ---------------------------------------------------------------------------
# Hashes: a stage reruns only when what it depends on changed
# ---------------------------------------------------------------------------
def _file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hash(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def galaxy_input_files(cfg: GalaxyConfig) -> list[Path]:
    """Every file a galaxy's products depend on: its TOML, cubes and lens maps."""
    files = [cfg.path, *cfg.cubes.values()]
    if cfg.lens is not None:
        files += [p for p in (cfg.lens.deflection_x, cfg.lens.deflection_y, cfg.lens.kappa,
                              cfg.lens.gamma, cfg.lens.hst_image) if p is not None]
        for folder in cfg.lens.models:
            files += sorted(folder.glob("*.fits"))
    return files


def galaxy_hash(cfg: GalaxyConfig) -> str:
    """Content hash of a galaxy: package version, analysis settings (with the method) and the
    SHA-256 of every input file. Stage hashes derive from it; ``klever-nb sample`` uses it
    as the resume marker."""
    return _hash(__version__, asdict(cfg.analysis),
                 [(str(p), _file_fingerprint(p)) for p in galaxy_input_files(cfg)])


def _versions() -> dict[str, str]:
    import astropy
    import scipy

    return {"klever_nb": __version__, "numpy": np.__version__, "scipy": scipy.__version__,
            "astropy": astropy.__version__, "xarray": xr.__version__}


# ---------------------------------------------------------------------------
# Reading a galaxy's inputs (all checks happen here, before anything is written)
# ---------------------------------------------------------------------------
def read_galaxy_cubes(cfg: GalaxyConfig) -> xr.DataTree:
    """Read every band's cube of a galaxy into a DataTree (``/YJ``, ``/H``, ``/K``)."""
    children = {}
    for band, path in cfg.cubes.items():
        cube = open_cube(path, band=band, instrument=cfg.instrument, ifu=cfg.ifu)
        cube.attrs["redshift"] = cfg.redshift
        children[f"/{band}"] = cube
    return xr.DataTree.from_dict(children)


def read_lens(cfg: GalaxyConfig, cube_wcs: str,
              cube_shape: tuple[int, int] | None = None) -> tuple[xr.Dataset, list[xr.Dataset]]:
    """Deflection (and kappa/gamma) maps for the source redshift, plus alternative models."""
    from klever_nb import lensing
    from klever_nb.io.images import open_lens_maps

    if cfg.lens is None:
        raise ConfigError(f"{cfg.path}: read_lens needs a [lens] table (the galaxy is unlensed)")
    lens_cfg = cfg.lens
    if lens_cfg.deflection_x is not None:
        raw = open_lens_maps(deflection_x=lens_cfg.deflection_x,
                             deflection_y=lens_cfg.deflection_y, kappa=lens_cfg.kappa,
                             gamma=lens_cfg.gamma, deflection_units=lens_cfg.deflection_units)
        lens = lensing.rescale_lens(raw, z_lens=lens_cfg.z_lens, z_source=cfg.redshift,
                                    normalisation=lens_cfg.normalisation)
    else:
        from klever_nb.lensmodels import ParametricLens

        model = ParametricLens.from_config({"components": list(lens_cfg.components)})
        lens = lensing.lens_from_parametric(
            model, cube_wcs=cube_wcs, pixel_scale_arcsec=lens_cfg.grid_pixel_arcsec,
            size_arcsec=lens_cfg.grid_size_arcsec)
    alternatives = []
    for folder in lens_cfg.models:
        dx, dy = folder / "dx.fits", folder / "dy.fits"
        if not (dx.is_file() and dy.is_file()):
            raise InputError(f"{folder}: lens.models folder needs dx.fits and dy.fits "
                             "(and optionally kappa.fits, gamma.fits)")
        kappa = folder / "kappa.fits" if (folder / "kappa.fits").is_file() else None
        gamma = folder / "gamma.fits" if (folder / "gamma.fits").is_file() else None
        alt = open_lens_maps(deflection_x=dx, deflection_y=dy, kappa=kappa, gamma=gamma,
                             deflection_units=lens_cfg.deflection_units)
        alternatives.append(lensing.rescale_lens(alt, z_lens=lens_cfg.z_lens,
                                                 z_source=cfg.redshift,
                                                 normalisation=lens_cfg.normalisation))
    lensing.check_overlap(lens, cube_wcs=cube_wcs, cube_shape=cube_shape,
                          source=str(lens_cfg.deflection_x or "lens"))
    return lens, alternatives


# ---------------------------------------------------------------------------
# One galaxy
# ---------------------------------------------------------------------------
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


#: Exceptions that make a cached product unusable (it is then recomputed, never trusted).
_UNREADABLE = (OSError, ValueError, KeyError, RuntimeError)


def _run_stage(products: Path, stage: str, stage_hash: str, force: bool, *,
               compute: Callable[[], StageResult], write: Callable[[StageResult], None],
               read: Callable[[], xr.Dataset | None], files: tuple[str, ...]) -> StageResult:
    """The one caching mechanism of every stage.

    A stage's files are written first (each atomically), then its record
    ``.<stage>.json`` (input hash, summary fields). The stage is up to date when the record
    holds ``stage_hash`` and every file exists and reads back; a run killed between the
    files and the record leaves no valid record, so the stage is recomputed.
    """
    start = time.perf_counter()
    record_path = products / f".{stage}.json"
    if not force and record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
            if record.get("input_hash") == stage_hash and \
                    all((products / name).is_file() for name in files):
                return StageResult(read(), MappingProxyType(record["summary"]),
                                   time.perf_counter() - start)
        except _UNREADABLE:
            pass  # an unreadable record or product is recomputed
    result = compute()
    with _writing(products):
        write(result)
        write_json({"input_hash": stage_hash, "klever_nb_version": __version__,
                    "summary": dict(result.summary)}, record_path)
    return StageResult(result.data, MappingProxyType(dict(result.summary)),
                       time.perf_counter() - start)


@contextlib.contextmanager
def _writing(products: Path):
    """Turn a failed product write (read-only folder, disk full, quota) into one line.

    The atomic writes leave no partial file behind, so the folder holds only complete
    products and the run can be repeated once the cause is fixed (issue 18).
    """
    try:
        yield
    except OSError as err:
        if err.errno not in _WRITE_ERRNOS:
            raise
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise KleverError(f"{products}: cannot write the products ({reason}); free space or "
                          "choose a writable --out folder, then rerun (finished stages are "
                          "kept)") from None


#: errno values of a product write that are the user's to fix (not a bug).
_WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                 errno.ENOTDIR, errno.EEXIST, errno.EFBIG}


def _write_dataset(ds: xr.Dataset, path: Path, stage_hash: str) -> None:
    from klever_nb import provenance

    ds = ds.copy()
    ds.attrs.update(input_hash=stage_hash, klever_nb_version=__version__)
    record = provenance.read_record(path.parent)  # settings, versions, input SHA-256s
    if record is not None:
        ds.attrs["provenance"] = record
    write_netcdf(ds, path)


def run_galaxy(config_path: str | Path, out_dir: str | Path, *, force: bool = False,
               progress: bool | None = None, method: str | None = None,
               sandbox: str | Path | None = None) -> Path:
    """Run every stage on one galaxy; return the path of its ``summary.json``.

    Parameters
    ----------
    config_path : str or Path
        Galaxy TOML file (DESIGN.md).
    out_dir : str or Path
        Products go to ``out_dir/<name>/``.
    force : bool
        Recompute every stage even when its product is up to date, and replace products
        made with other settings (without it such a folder is refused, issue 18).
    progress : bool or None
        Show a progress bar (default: only on a terminal).
    method : {"default", "k20"}, optional
        Overrides ``[analysis] method`` (``klever-nb run --method``): ``"k20"`` reproduces
        the paper's estimators everywhere.
    sandbox : str or Path, optional
        Every path of the galaxy file must lie below this folder (``--sandbox``).
    """
    from dataclasses import replace

    from tqdm.auto import tqdm

    cfg = load_galaxy(config_path, sandbox=sandbox)
    if method is not None:
        if method not in METHODS:
            raise ConfigError(f"method: must be one of {', '.join(METHODS)}, got {method!r}")
        cfg = replace(cfg, analysis=replace(cfg.analysis, method=method))
    settings = cfg.analysis
    start = time.perf_counter()
    tree = read_galaxy_cubes(cfg)
    first = next(iter(tree.children.values())).to_dataset()
    cube_wcs = first.attrs.get("wcs", "")
    cube_shape = (first.sizes["y"], first.sizes["x"])
    lens, alternatives = (read_lens(cfg, cube_wcs, cube_shape) if cfg.lensed else (None, []))

    products = Path(out_dir) / cfg.name
    with _writing(products):
        products.mkdir(parents=True, exist_ok=True)
    from klever_nb import provenance

    record = provenance.record(asdict(settings), [(str(p), _file_fingerprint(p))
                                                  for p in galaxy_input_files(cfg)])
    provenance.check_settings(products, record, force=force)  # no mixing unless --force
    with _writing(products):
        write_json(record, products / provenance.RECORD_NAME)
        for tmp in products.glob(".*.tmp"):  # left by a killed writer (atomic_path)
            tmp.unlink(missing_ok=True)
    base_hash = galaxy_hash(cfg)
    stages = ["line fitting", "source plane", "metallicity", "gradient"]
    bar = tqdm(total=len(stages), desc=cfg.name, disable=(None if progress is None
                                                          else not progress), leave=False)

    def stage_hash(stage: str) -> str:
        return _hash(base_hash, stage)

    def write_fit(result: StageResult) -> None:
        _write_dataset(result.data, products / "line_maps.nc", stage_hash("fit"))
        shifts = json.loads(result.data.attrs.get("alignment_shifts", "{}"))
        aligned = _aligned_cubes(tree, shifts)
        aligned.attrs.update(input_hash=stage_hash("fit"), provenance=record)
        write_netcdf(aligned, products / "cubes_aligned.nc")

    fit = _run_stage(products, "fit", stage_hash("fit"), force,
                     compute=lambda: _fit_stage(tree, cfg), write=write_fit,
                     read=lambda: read_netcdf(products / "line_maps.nc"),
                     files=("line_maps.nc", "cubes_aligned.nc"))
    bar.update()
    lensed = _run_stage(
        products, "lens", stage_hash("lens"), force,
        compute=lambda: _lens_stage(fit.data, cfg, lens, alternatives, cube_wcs, tree),
        write=lambda r: _write_dataset(r.data, products / "source_maps.nc", stage_hash("lens")),
        read=lambda: read_netcdf(products / "source_maps.nc"), files=("source_maps.nc",))
    bar.update()
    metal = _run_stage(
        products, "metallicity", stage_hash("metallicity"), force,
        compute=lambda: _metallicity_stage(fit.data, lensed.data, cfg, lensed.summary),
        write=lambda r: _write_dataset(r.data, products / "metallicity.nc",
                                       stage_hash("metallicity")),
        read=lambda: read_netcdf(products / "metallicity.nc"), files=("metallicity.nc",))
    bar.update()
    gradient = _run_stage(
        products, "gradient", stage_hash("gradient"), force,
        compute=lambda: _gradient_stage(metal.data, lensed.data, fit.data, cfg, lens,
                                        lensed.summary, metal.summary),
        write=lambda r: _write_gradient_products(
            r, products, figure=lambda: _gradient_figure(r, metal, lensed, cfg)),
        read=lambda: None, files=("profile.csv", "gradient.png"))
    bar.update()
    bar.close()

    summary: dict[str, Any] = {"name": cfg.name, "redshift": cfg.redshift,
                               "lensed": cfg.lensed, "instrument": cfg.instrument,
                               "config_path": str(cfg.path)}
    for result in (fit, lensed, metal, gradient):
        summary.update(result.summary)
    summary.update(_band_detection_flags(fit.data, cfg))
    summary["properties"] = cfg.properties
    summary["settings"] = asdict(settings)
    summary["versions"] = _versions()
    summary["inputs"] = record["inputs"]  # SHA-256 of every input file
    # wall time per stage (a stage reused from its products counts its reading only)
    summary["timings_s"] = {"total": time.perf_counter() - start, "fit": fit.seconds,
                            "source_plane": lensed.seconds, "metallicity": metal.seconds,
                            "gradient": gradient.seconds}
    with _writing(products):
        return write_json(summary, products / "summary.json")


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


def _write_gradient_products(result: StageResult, products: Path, *,
                             figure: Callable[[], Any]) -> None:
    """``profile.csv`` (radius_kpc, oh, oh_err, n_pixels; DESIGN.md) and ``gradient.png``."""
    import matplotlib.pyplot as plt

    from klever_nb.io import atomic_path

    profile = result.data
    lines = ["radius_kpc,oh,oh_err,n_pixels"]
    for r, oh, err, n in zip(profile["radius_kpc"].values, profile["oh"].values,
                             profile["oh_err"].values, profile["n_pixels"].values, strict=True):
        lines.append(f"{r:.4f},{oh:.4f},{err:.4f},{n:.2f}")
    write_text("\n".join(lines) + "\n", products / "profile.csv")
    fig = figure()
    with atomic_path(products / "gradient.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _gradient_figure(gradient: StageResult, metal: StageResult, lensed: StageResult,
                     cfg: GalaxyConfig):
    """K20 Fig. 7 for this galaxy, from the stages' results."""
    from klever_nb import figures, lensing

    info, metal_info = gradient.summary, metal.summary
    forward = ({"gradient_dex_per_kpc": info["gradient_forward_dex_per_kpc"],
                "gradient_err": info["gradient_forward_err"],
                "central_oh": info.get("central_forward_oh", np.nan)}
               if "gradient_forward_dex_per_kpc" in info else None)
    return figures.gradient_figure(
        metal.data, gradient.data, dict(info), psf=lensing.annulus_psf(lensed.summary),
        line_maps=lensed.data, global_oh=metal_info.get("global_oh"),
        global_oh_err=(tuple(metal_info["global_oh_err"]) if "global_oh_err" in metal_info
                       else None), forward=forward, title=cfg.name)


def _plain(info: Mapping[str, Any]) -> dict[str, Any]:
    """Summary fields as JSON types (numpy scalars to Python), as they are written."""
    return json.loads(json.dumps(dict(info), default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


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


# ---------------------------------------------------------------------------
# One cube (klever-nb fit) and a sample
# ---------------------------------------------------------------------------
def fit_single_cube(cube_path: str | Path, *, redshift: float, out_dir: str | Path,
                    lines: tuple[str, ...] | None = None, noise_kind: str | None = None,
                    wavelength_medium: str | None = None, resolving_power: float | None = None,
                    smooth_fwhm_arcsec: float = 0.0, ifu: int | None = None,
                    settings=None,
                    fibre_radius_arcsec: float = constants.FIBRE_RADIUS_ARCSEC,
                    mapper=None) -> Path:
    """Fit the emission lines of any one IFU cube; write ``OUT/<stem>/line_maps.nc`` + summary.

    The band goes through :func:`klever_nb.fitting.fit_band`, the same function
    ``klever-nb run`` uses for every band after refining the redshift: the same cube,
    ``redshift`` (give ``run``'s refined one), lines, smoothing and ``settings``
    (:class:`klever_nb.fitting.FitSettings`; ``resolving_power`` overrides its R)
    give the same maps, before ``run``'s band registration shift.

    The cube is memory-mapped and read in chunks of spaxels (``open_cube(lazy=True)``);
    ``mapper`` (:func:`klever_nb.fitting.parallel.dask_mapper`) fits the chunks on a dask
    cluster, with the same maps. ``summary.json`` has ``timings_s`` per step.

    Returns the product folder.
    """
    import dataclasses

    from klever_nb import fitting
    from klever_nb.errors import ConfigError

    if not np.isfinite(redshift) or redshift < 0:
        raise ConfigError(f"--redshift must be a number >= 0, got {redshift}")
    if lines is not None:
        unknown = [name for name in lines if name not in constants.LINES]
        if unknown:
            raise ConfigError(f"--lines: unknown line {unknown[0]!r}; known: "
                              f"{', '.join(constants.LINES)}")
    settings = settings if settings is not None else fitting.FitSettings()
    if resolving_power is not None:
        settings = dataclasses.replace(settings, resolving_power=float(resolving_power))
    import time

    timings = {}
    t0 = time.perf_counter()
    cube_path = Path(cube_path)
    cube = open_cube(cube_path, noise_kind=noise_kind, wavelength_medium=wavelength_medium,
                     ifu=ifu, lazy=True)
    timings["open"] = time.perf_counter() - t0
    wave = cube["wave"].values
    in_cube = constants.lines_in_range(float(wave.min()), float(wave.max()), redshift,
                                       tuple(lines) if lines else None)
    if not in_cube:
        raise InputError(f"{cube_path}: no line of {'--lines' if lines else 'the catalogue'} "
                         f"falls inside {wave.min():.4f}-{wave.max():.4f} um at z = {redshift}")
    t0 = time.perf_counter()
    maps, integrated = fitting.fit_band(cube, redshift=redshift, settings=settings,
                                        lines=in_cube, smooth_fwhm_arcsec=smooth_fwhm_arcsec,
                                        fibre_radius_arcsec=fibre_radius_arcsec, mapper=mapper)
    timings["fit"] = time.perf_counter() - t0
    for name in ("flux", "flux_err", "snr", "detected", "upper_limit"):
        if name in integrated:
            maps[f"integrated_{name}"] = integrated[name]
    maps.attrs["source_file"] = str(cube_path.resolve())
    maps.attrs["klever_nb_version"] = __version__
    products = Path(out_dir) / cube_path.stem
    t0 = time.perf_counter()
    write_netcdf(maps, products / "line_maps.nc")
    timings["write"] = time.perf_counter() - t0
    flux_units = maps["flux"].attrs.get("units", "")
    summary = {
        "cube": str(cube_path.resolve()), "redshift": redshift,
        "lines_fitted": list(in_cube),
        "integrated": {str(line): {
            "flux": float(integrated["flux"].sel(line=line)),
            "flux_err": float(integrated["flux_err"].sel(line=line)),
            "snr": float(integrated["snr"].sel(line=line)),
            "detected": bool(integrated["detected"].sel(line=line)),
            "upper_limit": float(integrated["upper_limit"].sel(line=line)),
        } for line in integrated["line"].values},
        "flux_units": flux_units,
        "settings": {"noise_kind": noise_kind, "wavelength_medium": wavelength_medium,
                     "resolving_power": resolving_power if resolving_power is not None
                     else cube.attrs.get("resolving_power"),
                     "smooth_fwhm_arcsec": smooth_fwhm_arcsec, "ifu": ifu,
                     "fibre_radius_arcsec": fibre_radius_arcsec,
                     "fit": {k: (list(v) if isinstance(v, tuple) else v)
                             for k, v in settings.describe().items()}},
        "cube_attrs": {k: v for k, v in cube.attrs.items() if k != "wcs"},
        "versions": _versions(),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    write_json(summary, products / "summary.json")
    return products


def run_sample(sample_path: str | Path, out_dir: str | Path, *, force: bool = False,
               scheduler: str | None = None, workers: int = 2,
               progress: bool | None = None) -> dict[str, Path]:
    """Run every galaxy of a sample file; return ``{name: summary.json path}``.

    With ``scheduler=None`` galaxies run one after the other in this process; with
    ``"local"`` on a local ``dask.distributed`` cluster of ``workers`` processes, or on the
    scheduler at the given address. Every galaxy is validated first; finished galaxies are
    skipped on a rerun (content-hash done-marker); ``out_dir/sample.csv`` and ``sample.nc``
    are written. See :func:`klever_nb.sample_run.run_sample`, which also returns the
    per-galaxy status; this wrapper raises :class:`KleverError` naming every galaxy that
    was invalid or failed, after the others finished.
    """
    from klever_nb import sample_run

    result = sample_run.run_sample(sample_path, out_dir, force=force, scheduler=scheduler,
                                   workers=workers, progress=progress)
    if result.failed:
        names = "; ".join(f"{r['name']}: {r['error']}" for r in result.failed)
        raise KleverError(f"{len(result.failed)} of {len(result.rows)} galaxies failed "
                          f"(table: {result.csv}): {names}")
    return result.summaries

"""Image plane and cubes of the mocks: ray tracing, PSF, rebinning, spectra, noise, lens maps.

See :mod:`klever_nb.mock` for the model and its conventions.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import numpy as np
import xarray as xr
from scipy import signal, special

from klever_nb import constants, cosmology, sky
from klever_nb.errors import ConfigError
from klever_nb.mock.physics import _line_sb, disc_model, dust_transmission
from klever_nb.mock.spec import (
    _FWHM_PER_SIGMA,
    CONTINUUM_EW_HALPHA_REST,
    CONTINUUM_SLOPE,
    FLUX_UNIT_CGS,
    FLUX_UNITS,
    MOCK_LINES,
    NOISE_FLOOR,
    NOISE_SKY,
    MockSpec,
)

# ---------------------------------------------------------------------------
# Image plane: ray tracing, PSF, rebinning
# ---------------------------------------------------------------------------


def _gaussian_kernel(fwhm: float, pixel: float) -> np.ndarray:
    """Pixel-integrated, unit-sum 2-D Gaussian kernel."""
    sigma = fwhm / _FWHM_PER_SIGMA
    half = int(math.ceil(5.0 * sigma / pixel))
    edges = (np.arange(-half, half + 2) - 0.5) * pixel
    one = np.diff(special.ndtr(edges / sigma))
    kernel = np.outer(one, one)
    return kernel / kernel.sum()


def _fine_grid(spec: MockSpec) -> dict[str, Any]:
    ny, nx = spec.shape
    p = spec.pixel_scale_arcsec
    n_sub = spec.subsample
    pad = int(math.ceil(2.5 * spec.psf_fwhm_arcsec / p)) + 1
    d = p / n_sub
    fy, fx = (ny + 2 * pad) * n_sub, (nx + 2 * pad) * n_sub
    x = -(nx / 2 + pad) * p + (np.arange(fx) + 0.5) * d
    y = -(ny / 2 + pad) * p + (np.arange(fy) + 0.5) * d
    xx, yy = np.meshgrid(x, y)
    return {"x": xx, "y": yy, "pixel": d, "pad": pad, "n_sub": n_sub}


def _crop_rebin(maps: np.ndarray, spec: MockSpec, pad: int) -> np.ndarray:
    """Sum fine pixels into spaxels (flux-conserving) after removing the padding."""
    ny, nx = spec.shape
    n = spec.subsample
    core = maps[..., pad * n:(pad + ny) * n, pad * n:(pad + nx) * n]
    lead = core.shape[:-2]
    return core.reshape(*lead, ny, n, nx, n).sum(axis=(-3, -1))


def image_plane_maps(spec: MockSpec, *, lines: tuple[str, ...] | None = None,
                     kinematics: bool = True, deflection=None
                     ) -> tuple[xr.Dataset, dict[str, Any]]:
    """Noiseless image-plane line maps on the spaxel grid (after lensing and PSF).

    This is the mock's forward model (source disc -> lens -> PSF -> spaxels); a
    forward-modelling fit can call it with trial specs (``dataclasses.replace``).

    Parameters
    ----------
    spec : MockSpec
    lines : tuple of str, optional
        Lines to compute (default: every line of :data:`MOCK_LINES`).
    kinematics : bool
        Also compute the flux-weighted velocity and dispersion maps (3x the PSF
        convolutions); without them ``velocity`` is 0 and ``sigma`` is ``spec.sigma_kms``.
    deflection : callable, optional
        ``deflection(x, y) -> (alpha_x, alpha_y)`` in arcsec for the source redshift,
        overriding ``spec.lens`` (e.g. an interpolator of real deflection maps).

    Returns
    -------
    maps : xarray.Dataset
        ``flux`` (line, y, x) in erg/s/cm2 per spaxel (after dust), ``velocity`` and
        ``sigma`` (km/s; flux-weighted first moment and kinematic dispersion including
        beam smearing, without the instrument), ``continuum_weight`` (y, x): the
        PSF-convolved Halpha map used to shape the continuum.
    info : dict
        Fine-grid fluxes before PSF (``fine_flux`` per line) for the truth.

    References
    ----------
    K20 §3.2 (lensing), §3.1 (PSF); FACTS.md §12 (ray sub-sampling).
    """
    grid = _fine_grid(spec)
    names = tuple(MOCK_LINES) if lines is None else tuple(lines)
    unknown = [name for name in names if name not in MOCK_LINES]
    if unknown:
        raise ConfigError(f"image_plane_maps: lines has {unknown[0]!r}; known: "
                          f"{', '.join(MOCK_LINES)}")
    theta_x = grid["x"] + spec.cube_offset_arcsec[0]
    theta_y = grid["y"] + spec.cube_offset_arcsec[1]
    if deflection is not None:
        ax, ay = deflection(theta_x, theta_y)
        beta_x, beta_y = theta_x - ax, theta_y - ay
    elif spec.lens is not None:
        beta_x, beta_y = spec.lens.ray_shoot(theta_x, theta_y)
    else:
        beta_x, beta_y = theta_x, theta_y
    disc = disc_model(spec, beta_x, beta_y)
    area = grid["pixel"] ** 2
    flux = _line_sb(spec, disc, names) * area               # (line, fy, fx), erg/s/cm2
    v = disc["velocity"]
    stack = np.concatenate([flux, flux * v, flux * v * v]) if kinematics else flux
    kernel = _gaussian_kernel(spec.psf_fwhm_arcsec, grid["pixel"])
    conv = signal.fftconvolve(stack, kernel[None], mode="same", axes=(-2, -1))
    binned = _crop_rebin(conv, spec, grid["pad"])
    n = len(names)
    f = binned[:n]
    if kinematics:
        fv, fvv = binned[n:2 * n], binned[2 * n:]
        positive = f > 1e-40
        safe = np.where(positive, f, 1.0)
        mean_v = np.where(positive, fv / safe, 0.0)
        var_v = np.clip(np.where(positive, fvv / safe, 0.0) - mean_v**2, 0.0, None)
    else:
        mean_v = np.zeros_like(f)
        var_v = np.zeros_like(f)
    sigma = np.sqrt(spec.sigma_kms**2 + var_v)
    f = np.clip(f, 0.0, None)  # FFT round-off
    ny, nx = spec.shape
    coords = {"line": list(names), "y": np.arange(ny), "x": np.arange(nx)}
    maps = xr.Dataset(
        {
            "flux": (("line", "y", "x"), f, {"units": "erg / (s cm2)",
                                             "long_name": "line flux per spaxel (noiseless)"}),
            "velocity": (("line", "y", "x"), mean_v, {"units": "km / s"}),
            "sigma": (("line", "y", "x"), sigma,
                      {"units": "km / s", "long_name": "kinematic dispersion (no instrument)"}),
        },
        coords=coords,
        attrs={"pixel_scale_arcsec": spec.pixel_scale_arcsec, "redshift": spec.redshift},
    )
    info = {"fine_flux": dict(zip(names, flux.sum(axis=(-2, -1)), strict=True))}
    return maps, info


# ---------------------------------------------------------------------------
# Spectra and noise
# ---------------------------------------------------------------------------


def band_wavelengths(instrument: str, band: str) -> np.ndarray:
    """Channel centres (micron, vacuum) of a band: ``n_spectral_pixels`` over its range."""
    inst = constants.INSTRUMENTS[instrument]
    b = inst.bands[band]
    return np.linspace(b.wave_min, b.wave_max, inst.n_spectral_pixels)


@cache
def noise_shape(instrument: str, band: str) -> np.ndarray:
    """sqrt(NOISE_FLOOR + NOISE_SKY * sky(lambda)) on the band grid (read-only).

    The sky is the observed SINFONI K-band sky (``sky.observed_sky_k``) where it
    covers the grid, otherwise the OH line-list model ``sky.sky_spectrum``.

    References
    ----------
    FACTS.md §9; Rousselot et al. 2000.
    """
    wave = band_wavelengths(instrument, band)
    b = constants.INSTRUMENTS[instrument].bands[band]
    model = sky.sky_spectrum(wave, resolving_power=b.resolving_power)
    obs_wave, obs_flux = sky.observed_sky_k()
    covered = (wave >= obs_wave.min()) & (wave <= obs_wave.max())
    if covered.any():
        model = model.copy()
        model[covered] = np.interp(wave[covered], obs_wave, obs_flux)
    shape = np.sqrt(NOISE_FLOOR + NOISE_SKY * model)
    shape.setflags(write=False)
    return shape


def _add_lines(cube: np.ndarray, wave: np.ndarray, flux: np.ndarray, centre: np.ndarray,
               sigma: np.ndarray) -> None:
    """Add Gaussian lines integrated over channel edges (erf differences) to ``cube`` in place.

    ``flux`` (y, x) in erg/s/cm2, ``centre``/``sigma`` (y, x) in micron; the cube is in
    FLUX_UNITS per Angstrom, so sum(cube) * dlambda_A * 1e-20 gives back ``flux``.
    """
    step = wave[1] - wave[0]
    edges = np.concatenate([wave - 0.5 * step, [wave[-1] + 0.5 * step]])
    lo = float(np.min(centre - 8.0 * sigma))
    hi = float(np.max(centre + 8.0 * sigma))
    k0 = max(int(np.searchsorted(edges, lo)) - 1, 0)
    k1 = min(int(np.searchsorted(edges, hi)) + 1, wave.size)
    if k1 <= k0:
        return
    cdf = special.ndtr((edges[k0:k1 + 1, None, None] - centre) / sigma)
    cube[k0:k1] += np.diff(cdf, axis=0) * (flux / (step * 1e4 * FLUX_UNIT_CGS))


def celestial_header(*, ra_deg: float, dec_deg: float, shape: tuple[int, int],
                     pixel_arcsec: float):
    """TAN celestial header with a CD matrix (RA increasing to the left), centred on the image.

    CRPIX is the image centre ((n + 1) / 2, 1-based), so that pixel offsets from the centre
    times ``pixel_arcsec`` are the arcsec offsets used throughout (+x = West, +y = North).
    """
    from astropy.io import fits

    ny, nx = shape
    scale = pixel_arcsec / 3600.0
    header = fits.Header()
    header["WCSAXES"] = 2
    header["CTYPE1"] = "RA---TAN"
    header["CTYPE2"] = "DEC--TAN"
    header["CUNIT1"] = "deg"
    header["CUNIT2"] = "deg"
    header["CRPIX1"] = (nx + 1) / 2.0
    header["CRPIX2"] = (ny + 1) / 2.0
    header["CRVAL1"] = float(ra_deg)
    header["CRVAL2"] = float(dec_deg)
    header["CD1_1"] = -scale
    header["CD1_2"] = 0.0
    header["CD2_1"] = 0.0
    header["CD2_2"] = scale
    header["RADESYS"] = "ICRS"
    return header


def _celestial_wcs_string(spec: MockSpec) -> str:
    return celestial_header(ra_deg=spec.ra_deg, dec_deg=spec.dec_deg, shape=spec.shape,
                            pixel_arcsec=spec.pixel_scale_arcsec).tostring()


def _lens_wcs_string(spec: MockSpec, n: int) -> str:
    return celestial_header(ra_deg=spec.ra_deg, dec_deg=spec.dec_deg, shape=(n, n),
                            pixel_arcsec=spec.lens_fine_pixel_arcsec).tostring()


def _reference_line(spec: MockSpec, maps: xr.Dataset) -> tuple[str, str] | None:
    """(line, band) whose peak SNR ``snr_halpha_peak`` sets: Halpha, else the brightest line."""
    observed = [(name, band) for band in spec.bands for name in _band_lines(spec, band)]
    if not observed:
        return None
    for name, band in observed:
        if name == "Halpha":
            return name, band
    return max(observed, key=lambda nb: float(maps["flux"].sel(line=nb[0]).sum()))


def _sigma0(spec: MockSpec, maps: xr.Dataset) -> float:
    """Noise scale sigma0 (FLUX_UNITS) that gives the reference line SNR = ``snr_halpha_peak``.

    The SNR is that of optimal (profile-weighted) extraction of the line in its brightest
    spaxel with the actual sky-shaped noise at its wavelength:
    SNR = F / (dlambda sigma0) sqrt(sum_i p_i^2 / s_i^2), p_i the fraction of the line in
    channel i and s_i the noise shape. The reference line is Halpha when a band covers it,
    otherwise the brightest observed line.
    """
    ref = _reference_line(spec, maps)
    if ref is None:  # no line in any band: a continuum-only mock, scale from Halpha anyway
        ref = ("Halpha", spec.bands[0])
    name, band_name = ref
    band = constants.INSTRUMENTS[spec.instrument].bands[band_name]
    wave = band_wavelengths(spec.instrument, band_name)
    step_um = wave[1] - wave[0]
    flux = maps["flux"].sel(line=name).values
    iy, ix = np.unravel_index(np.argmax(flux), flux.shape)
    rest = constants.LINES[name].wave_vac * (1 + spec.redshift) / 1e4
    centre = rest * (1 + float(maps["velocity"].sel(line=name).values[iy, ix]) / constants.C_KMS)
    sig_v = float(maps["sigma"].sel(line=name).values[iy, ix])
    sig_um = math.hypot(centre * sig_v / constants.C_KMS,
                        centre / (band.resolving_power * _FWHM_PER_SIGMA))
    edges = np.concatenate([wave - 0.5 * step_um, [wave[-1] + 0.5 * step_um]])
    frac = np.diff(special.ndtr((edges - centre) / sig_um))
    shape = noise_shape(spec.instrument, band_name)
    weight = math.sqrt(float(np.sum(frac**2 / shape**2)))
    if weight == 0.0:  # line outside the grid
        weight = 1.0 / float(np.median(shape))
    return float(flux[iy, ix]) * weight / (spec.snr_halpha_peak * step_um * 1e4 * FLUX_UNIT_CGS)


def _band_lines(spec: MockSpec, band: str) -> tuple[str, ...]:
    b = constants.INSTRUMENTS[spec.instrument].bands[band]
    return constants.lines_in_range(b.wave_min, b.wave_max, spec.redshift, MOCK_LINES)


def _band_cubes(spec: MockSpec, maps: xr.Dataset, sigma0: float, rng: np.random.Generator
                ) -> tuple[dict[str, xr.Dataset], dict[str, xr.Dataset]]:
    ny, nx = spec.shape
    header = _celestial_wcs_string(spec)
    ha_obs = constants.LINES["Halpha"].wave_vac * (1 + spec.redshift) / 1e4
    cont_map = (maps["flux"].sel(line="Halpha").values
                / (CONTINUUM_EW_HALPHA_REST * (1 + spec.redshift)) / FLUX_UNIT_CGS)
    observed, noiseless = {}, {}
    dead = np.zeros(ny * nx, dtype=bool)
    if spec.nan_spaxels:
        dead[rng.choice(ny * nx, size=spec.nan_spaxels, replace=False)] = True
    dead = dead.reshape(ny, nx)
    for band_name in spec.bands:
        band = constants.INSTRUMENTS[spec.instrument].bands[band_name]
        wave = band_wavelengths(spec.instrument, band_name)
        lines = np.zeros((wave.size, ny, nx))
        for name in _band_lines(spec, band_name):
            rest = constants.LINES[name].wave_vac * (1 + spec.redshift) / 1e4
            v = maps["velocity"].sel(line=name).values
            centre = rest * (1.0 + v / constants.C_KMS)
            sig_kin = centre * maps["sigma"].sel(line=name).values / constants.C_KMS
            sig_ins = centre / (band.resolving_power * _FWHM_PER_SIGMA)
            _add_lines(lines, wave, maps["flux"].sel(line=name).values, centre,
                       np.hypot(sig_kin, sig_ins))
        slope = 1.0 + CONTINUUM_SLOPE * (wave - ha_obs) / ha_obs
        continuum = slope[:, None, None] * cont_map[None]
        clean = lines + continuum
        noise_1d = sigma0 * noise_shape(spec.instrument, band_name)
        noise = np.broadcast_to(noise_1d[:, None, None], clean.shape).copy()
        noise_clean = noise
        data = clean + rng.standard_normal(clean.shape) * noise
        if spec.noiseless:
            data = clean.copy()
        if dead.any():
            data[:, dead] = np.nan
            noise = noise.copy()
            noise[:, dead] = np.nan
        attrs = {"band": band_name, "instrument": spec.instrument,
                 "resolving_power": float(band.resolving_power),
                 "pixel_scale_arcsec": float(spec.pixel_scale_arcsec), "wcs": header,
                 "redshift": float(spec.redshift), "object": spec.name}
        coords = {"wave": ("wave", wave, {"units": "um", "medium": "vacuum"}),
                  "y": np.arange(ny), "x": np.arange(nx)}
        units = {"units": FLUX_UNITS}
        observed[band_name] = xr.Dataset(
            {"flux": (("wave", "y", "x"), data, units),
             "noise": (("wave", "y", "x"), noise, units)}, coords=coords, attrs=attrs)
        noiseless[band_name] = xr.Dataset(
            {"flux": (("wave", "y", "x"), clean, units),
             "noise": (("wave", "y", "x"), noise_clean, units),
             "continuum": (("wave", "y", "x"), continuum, units)},
            coords=coords, attrs={**attrs, "noiseless": "true"})
    return observed, noiseless


# ---------------------------------------------------------------------------
# Lens maps and the HST-like continuum image
# ---------------------------------------------------------------------------


def lens_maps(spec: MockSpec) -> xr.Dataset | None:
    """Deflection, convergence and shear maps on the fine lens grid, ``dls_ds`` normalisation.

    alpha, kappa and gamma for the source redshift are divided by D_ls/D_s(z_lens, z)
    (Frontier Fields convention, DESIGN.md; ``klever_nb.cosmology.dls_over_ds``).
    """
    if spec.lens is None:
        return None
    n = max(int(round(spec.lens_map_size_arcsec / spec.lens_fine_pixel_arcsec)), 2)
    offsets = (np.arange(n) - (n - 1) / 2.0) * spec.lens_fine_pixel_arcsec
    xx, yy = np.meshgrid(offsets, offsets)
    factor = cosmology.dls_over_ds(spec.z_lens, spec.redshift)
    ax, ay = spec.lens.deflection(xx, yy)
    kappa, gamma = spec.lens.convergence_shear(xx, yy)
    arcsec = {"units": "arcsec"}
    hst = hst_continuum_image(spec, offsets)
    return xr.Dataset(
        {"alpha_x": (("y", "x"), ax / factor, arcsec),
         "alpha_y": (("y", "x"), ay / factor, arcsec),
         "kappa": (("y", "x"), kappa / factor, {"units": ""}),
         "gamma": (("y", "x"), gamma / factor, {"units": ""}),
         "hst_image": (("y", "x"), hst, {"units": "erg / (s cm2 Angstrom arcsec2)",
                                         "long_name": "HST-like lensed continuum image"})},
        coords={"y": np.arange(n), "x": np.arange(n),
                "x_arcsec": ("x", offsets, arcsec), "y_arcsec": ("y", offsets, arcsec)},
        attrs={"wcs": _lens_wcs_string(spec, n),
               "normalisation": "dls_ds", "dls_ds": factor, "z_lens": float(spec.z_lens),
               "z_source": float(spec.redshift),
               "pixel_scale_arcsec": float(spec.lens_fine_pixel_arcsec)},
    )


def hst_continuum_image(spec: MockSpec, offsets: np.ndarray, *, n_sub: int = 3) -> np.ndarray:
    """Noiseless HST-like continuum image of the lensed galaxy on a square grid.

    The continuum follows the (dust-attenuated) Halpha disc with the cube's continuum
    level at the observed Halpha wavelength, ray-traced with ``n_sub`` x ``n_sub`` rays per
    pixel and convolved with a Gaussian PSF of ``hst_psf_fwhm_arcsec``; surface brightness in
    erg/s/cm2/A/arcsec2. ``offsets`` are the pixel centres (arcsec) along x and y.
    """
    step = float(offsets[1] - offsets[0])
    sub = (np.arange(offsets.size * n_sub) + 0.5) * step / n_sub + offsets[0] - 0.5 * step
    xx, yy = np.meshgrid(sub, sub)
    bx, by = spec.lens.ray_shoot(xx, yy) if spec.lens is not None else (xx, yy)
    sb = disc_model(spec, bx, by)["sb"] * dust_transmission("Halpha", spec.ebv)
    sb = sb / (CONTINUUM_EW_HALPHA_REST * (1 + spec.redshift))
    kernel = _gaussian_kernel(spec.hst_psf_fwhm_arcsec, step / n_sub)
    sb = signal.fftconvolve(sb, kernel, mode="same")
    n = offsets.size
    return np.clip(sb.reshape(n, n_sub, n, n_sub).mean(axis=(1, 3)), 0.0, None)

"""Mock per-exposure KMOS files with known offsets, for :func:`klever_nb.io.combine_exposures`.

Used by the tests and the notebooks (issue 19); re-exported by :mod:`klever_nb.io.combine`.
The files say ``ORIGIN = 'klever_nb.io.combine mock'`` (unchanged since they were written
there).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from klever_nb.constants import FWHM_PER_SIGMA

__all__ = ["write_mock_exposures"]


def _pixel_integrated_gaussian(n: int, centre: float, sigma: float) -> np.ndarray:
    from scipy.special import erf

    edges = np.arange(n + 1) - 0.5
    cdf = 0.5 * (1.0 + erf((edges - centre) / (np.sqrt(2.0) * sigma)))
    return np.diff(cdf)


def write_mock_exposures(out_dir, *, n_exposures: int = 6, seed: int = 0, science_ifu: int = 7,
                         star_ifu: int = 3, n_spaxels: int = 14, n_wave: int = 60,
                         pixel_scale: float = 0.2, noise_sigma: float = 1.0,
                         line_flux: float = 4000.0, star_flux: float = 4.0e4,
                         psf_fwhm: float = 0.55, cosmic_fraction: float = 1e-3,
                         rotation_offsets: bool = False, noise_free: bool = False) -> dict:
    """Write KMOS-like per-exposure files with known offsets (star IFU + science IFU).

    Each exposure is a SCI_RECONSTRUCTED-like file: empty primary, ``IFU.<n>.DATA`` and
    ``IFU.<n>.NOISE`` for n = 1..24, empty except the star IFU (a point source, flat
    spectrum) and the science IFU (a Gaussian galaxy, σ = 0.3″, with one emission line at
    2.2 µm and a flat continuum), both blurred by a Gaussian PSF and integrated over the
    pixels. Every exposure has a random true offset of 0.05-0.3″ (same for both IFUs of
    the detector). The header WCS records the true offsets, unless ``rotation_offsets``:
    then the header knows only a commanded dither and the true position adds an
    untracked offset of the IFU arms, R·δθ with R = 150″ and δθ = ±(0.06-0.12)°
    (0.16-0.31″), the differential rotation of K20 §2.2. Gaussian noise of
    ``noise_sigma`` (also the NOISE extension) and cosmic rays (+30-300σ) in a fraction
    ``cosmic_fraction`` of voxels, unless ``noise_free``.

    Returns
    -------
    dict
        ``paths``, ``true_shift`` (n, 2) arcsec (x, y) relative to the first exposure,
        ``header_shift`` (what the WCS implies), ``line_flux``, ``truth`` (noise-free
        science cube of the first exposure, (wave, y, x)), ``line_truth`` (its line-only
        part), ``cosmic_rays`` (list of (exposure, wave, y, x)), ``wave``.
    """
    from klever_nb.io.products import atomic_path

    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wave = 2.19 + 2.64e-4 * np.arange(n_wave)
    line_centre, line_sigma = float(wave[n_wave // 2]), 2.0 * 2.64e-4
    line_profile = np.exp(-0.5 * ((wave - line_centre) / line_sigma) ** 2)
    line_profile /= line_profile.sum()
    psf_sigma = psf_fwhm / FWHM_PER_SIGMA / pixel_scale
    gal_sigma = np.hypot(0.3 / pixel_scale, psf_sigma)
    radius = rng.uniform(0.05, 0.3, n_exposures)
    angle = rng.uniform(0, 2 * np.pi, n_exposures)
    true = np.column_stack([radius * np.cos(angle), radius * np.sin(angle)])  # arcsec
    if rotation_offsets:
        dtheta = np.radians(rng.uniform(0.06, 0.12, n_exposures)
                            * rng.choice([-1.0, 1.0], n_exposures))
        phi = rng.uniform(0, 2 * np.pi)
        untracked = 150.0 * dtheta[:, None] * np.array([-np.sin(phi), np.cos(phi)])[None]
        header_offsets, true = true, true + untracked
    else:
        header_offsets = true
    centre = (n_spaxels - 1) / 2.0
    paths, truth, line_truth, cosmics = [], None, None, []
    for i in range(n_exposures):
        pos = centre + true[i] / pixel_scale
        sci_line = line_flux * line_profile[:, None, None] * (
            _pixel_integrated_gaussian(n_spaxels, pos[1], gal_sigma)[None, :, None]
            * _pixel_integrated_gaussian(n_spaxels, pos[0], gal_sigma)[None, None, :])
        continuum = 3.0 * (_pixel_integrated_gaussian(n_spaxels, pos[1], gal_sigma)[:, None]
                           * _pixel_integrated_gaussian(n_spaxels, pos[0], gal_sigma)[None, :])
        science = sci_line + continuum[None] * np.ones(n_wave)[:, None, None]
        star = star_flux / n_wave * np.ones(n_wave)[:, None, None] * (
            _pixel_integrated_gaussian(n_spaxels, pos[1], psf_sigma)[None, :, None]
            * _pixel_integrated_gaussian(n_spaxels, pos[0], psf_sigma)[None, None, :])
        if i == 0:
            truth, line_truth = science.copy(), sci_line.copy()
        if not noise_free:
            science = science + rng.normal(0, noise_sigma, science.shape)
            star = star + rng.normal(0, noise_sigma, star.shape)
            hit = rng.random(science.shape) < cosmic_fraction
            science[hit] += rng.uniform(30, 300, hit.sum()) * noise_sigma
            cosmics += [(i, *idx) for idx in zip(*np.nonzero(hit), strict=True)]
        primary = fits.PrimaryHDU()
        primary.header["INSTRUME"] = "KMOS"
        primary.header["HIERARCH ESO INS GRAT1 ID"] = "K"
        primary.header["ORIGIN"] = "klever_nb.io.combine mock"
        hdus = [primary]
        for n in range(1, 25):
            cube = {science_ifu: science, star_ifu: star}.get(n)
            ra = 150.0 + (0.0 if n == science_ifu else 0.02 * n)
            for kind in ("DATA", "NOISE"):
                if cube is None:
                    hdus.append(fits.ImageHDU(name=f"IFU.{n}.{kind}"))
                    continue
                h = fits.Header()
                h["CTYPE1"], h["CTYPE2"], h["CTYPE3"] = "RA---TAN", "DEC--TAN", "WAVE"
                h["CUNIT1"], h["CUNIT2"], h["CUNIT3"] = "deg", "deg", "um"
                h["CRVAL1"], h["CRVAL2"] = ra, 2.0
                h["CRPIX1"] = centre + 1 + header_offsets[i, 0] / pixel_scale
                h["CRPIX2"] = centre + 1 + header_offsets[i, 1] / pixel_scale
                h["CD1_1"], h["CD2_2"] = -pixel_scale / 3600.0, pixel_scale / 3600.0
                h["CD1_2"] = h["CD2_1"] = 0.0
                h["CD1_3"] = h["CD2_3"] = h["CD3_1"] = h["CD3_2"] = 0.0
                h["CRVAL3"], h["CRPIX3"], h["CD3_3"] = float(wave[0]), 1.0, 2.64e-4
                h["BUNIT"] = "1e-20 erg/s/cm2/Angstrom"
                values = cube if kind == "DATA" else np.full(cube.shape, noise_sigma)
                hdus.append(fits.ImageHDU(values.astype(np.float32), header=h,
                                          name=f"IFU.{n}.{kind}"))
        path = out / f"exposure_{i:02d}.fits"
        with atomic_path(path) as tmp:
            fits.HDUList(hdus).writeto(tmp, overwrite=True)
        paths.append(path)
    return {"paths": paths, "true_shift": -(true - true[0]),
            "header_shift": -(header_offsets - header_offsets[0]), "line_flux": line_flux,
            "truth": truth, "line_truth": line_truth, "cosmic_rays": cosmics, "wave": wave,
            "pixel_scale": pixel_scale}

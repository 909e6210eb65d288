"""Near-infrared OH sky lines: the shipped vacuum line list, sky masks and sky spectra.

The line list is Rousselot et al. (2000) in vacuum as packaged by PypeIt
(``data/oh_lines_vacuum.csv``; FACTS.md §9). ``data/vlt_sinfoni_K.fits`` is an
observed SINFONI K-band sky (vacuum; ``../shared/data/sky/README.md``; BSD-3,
PypeIt). K20 §3.1 masks "the brightest sky lines"; the threshold is a parameter.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

import numpy as np

#: Default: mask OH lines brighter than this fraction of the brightest line in the band.
MASK_MIN_RELATIVE_AMPLITUDE = 0.05
#: Default half-width of a masked window, in units of the instrumental FWHM (lambda/R).
MASK_HALF_WIDTH_FWHM = 1.0


@lru_cache(maxsize=1)
def load_oh_lines() -> tuple[np.ndarray, np.ndarray]:
    """Vacuum OH line wavelengths (micron) and relative amplitudes, sorted by wavelength.

    Returns
    -------
    wave_um, amplitude : numpy.ndarray
        Read-only arrays.

    References
    ----------
    Rousselot et al. 2000, A&A 354, 1134; FACTS.md §9.
    """
    path = files("klever_nb") / "data" / "oh_lines_vacuum.csv"
    table = np.genfromtxt(str(path), delimiter=",", comments="#", skip_header=6,
                          usecols=(0, 1), dtype=float)
    wave_um = table[:, 0] / 1e4
    amplitude = table[:, 1]
    wave_um.setflags(write=False)
    amplitude.setflags(write=False)
    return wave_um, amplitude


def bright_oh_lines(wave_min_um: float, wave_max_um: float, *,
                    min_relative_amplitude: float = MASK_MIN_RELATIVE_AMPLITUDE) -> np.ndarray:
    """Wavelengths (micron) of the OH lines in a range brighter than a fraction of the brightest.

    Parameters
    ----------
    wave_min_um, wave_max_um : float
        Range in micron (vacuum).
    min_relative_amplitude : float
        Keep lines with amplitude >= this fraction of the brightest line in the range.
    """
    wave_um, amplitude = load_oh_lines()
    inside = (wave_um >= wave_min_um) & (wave_um <= wave_max_um)
    if not inside.any():
        return np.empty(0)
    amp = amplitude[inside]
    return wave_um[inside][amp >= min_relative_amplitude * amp.max()]


def sky_mask(wave_um: np.ndarray, *, resolving_power: float,
             min_relative_amplitude: float = MASK_MIN_RELATIVE_AMPLITUDE,
             half_width_fwhm: float = MASK_HALF_WIDTH_FWHM) -> np.ndarray:
    """Boolean mask (True = masked) of the channels at the brightest OH lines.

    A channel is masked when it lies within ``half_width_fwhm * lambda / R`` of a
    bright OH line (K20 §3.1: "the spectra were totally masked at the position of
    the brightest sky lines").

    Parameters
    ----------
    wave_um : array_like
        Observed vacuum wavelengths in micron (1-D, increasing).
    resolving_power : float
        Instrumental R = lambda/FWHM; sets the width of each masked window.
    min_relative_amplitude : float
        Brightness threshold, see :func:`bright_oh_lines`.
    half_width_fwhm : float
        Half-width of each window in units of the instrumental FWHM.

    Returns
    -------
    numpy.ndarray of bool, same shape as ``wave_um``.

    Examples
    --------
    >>> import numpy as np
    >>> wave = np.linspace(1.92, 2.46, 2048)
    >>> bool(0.05 < sky_mask(wave, resolving_power=4227).mean() < 0.5)
    True
    """
    wave_um = np.asarray(wave_um, dtype=float)
    lines = bright_oh_lines(wave_um.min(), wave_um.max(),
                            min_relative_amplitude=min_relative_amplitude)
    if lines.size == 0:
        return np.zeros(wave_um.shape, dtype=bool)
    half_width = half_width_fwhm * lines / resolving_power
    idx = np.searchsorted(lines, wave_um)
    lo = np.clip(idx - 1, 0, lines.size - 1)
    hi = np.clip(idx, 0, lines.size - 1)
    near_lo = np.abs(wave_um - lines[lo]) <= half_width[lo]
    near_hi = np.abs(wave_um - lines[hi]) <= half_width[hi]
    return near_lo | near_hi


def sky_spectrum(wave_um: np.ndarray, *, resolving_power: float,
                 continuum: float = 0.01) -> np.ndarray:
    """Model OH sky spectrum: every listed line as a Gaussian of the instrument's width.

    Normalised so that the brightest line in the range peaks at 1; ``continuum``
    is a flat inter-line level in the same units. Used for sky-shaped noise in
    :mod:`klever_nb.mock` (variance = a + b * sky).
    """
    wave_um = np.asarray(wave_um, dtype=float)
    lines, amplitude = load_oh_lines()
    pad = 5 * wave_um.max() / resolving_power
    inside = (lines >= wave_um.min() - pad) & (lines <= wave_um.max() + pad)
    spectrum = np.full(wave_um.shape, float(continuum))
    if not inside.any():
        return spectrum
    lines, amplitude = lines[inside], amplitude[inside]
    sigma = lines / resolving_power / 2.3548200450309493
    profile = np.zeros_like(wave_um)
    for centre, amp, sig in zip(lines, amplitude, sigma, strict=True):
        near = np.abs(wave_um - centre) < 6 * sig
        profile[near] += amp * np.exp(-0.5 * ((wave_um[near] - centre) / sig) ** 2)
    return spectrum + profile / profile.max()


@lru_cache(maxsize=1)
def observed_sky_k() -> tuple[np.ndarray, np.ndarray]:
    """The observed SINFONI K-band night sky: vacuum wavelength (micron), flux normalised to peak 1.

    Source: PypeIt ``vlt_sinfoni_K.fits`` (BSD-3), ``../shared/data/sky/README.md``.
    """
    from astropy.io import fits

    path = files("klever_nb") / "data" / "vlt_sinfoni_K.fits"
    with fits.open(str(path)) as hdul:
        table = hdul[1].data
        wave_um = np.asarray(table["wave"], dtype=float) / 1e4
        flux = np.asarray(table["flux"], dtype=float)
    flux = np.clip(flux - np.nanpercentile(flux, 5), 0, None)
    return wave_um, flux / flux.max()

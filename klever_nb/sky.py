"""Near-infrared OH sky lines: the shipped vacuum line list, sky masks and sky spectra.

The line list is Rousselot et al. (2000) in vacuum as packaged by PypeIt
(``data/oh_lines_vacuum.csv``; FACTS.md §9). ``data/vlt_sinfoni_K.fits`` is an
observed SINFONI K-band sky (vacuum; ``../shared/data/sky/README.md``; BSD-3,
PypeIt). K20 §3.1 masks "the brightest sky lines"; the threshold is a parameter,
a fraction of one reference brightness on the common amplitude scale
(:func:`list_scale_factors`), so that it means the same sky brightness in every band.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

import numpy as np

from klever_nb import constants

#: Default threshold: mask OH lines brighter than this fraction of :func:`reference_amplitude`,
#: the brightest near-infrared OH line on the common amplitude scale: one absolute sky
#: brightness in every band. Before, the fraction was of each band's own brightest line
#: (120 in KMOS YJ against 937 in H), so "5 %" was an 8x fainter line in YJ than in H.
#: KMOS YJ/H/K masked channel fractions: 4.3 % / 16 % / 6.4 % (band-relative rule:
#: 17.5 % / 16 % / 12 %; 0.02 would give 11 % / 20 % / 11 %). Same value as the
#: ``[analysis] sky_min_relative_amplitude`` default, so ``fit`` and ``run`` agree.
MASK_MIN_RELATIVE_AMPLITUDE = 0.05
#: Default half-width of a masked window, in units of the instrumental FWHM (lambda/R).
MASK_HALF_WIDTH_FWHM = 1.0
#: The per-band lists of the shipped file, from blue to red (each on its own scale).
_SOURCE_ORDER = ("MOSFIRE_Y", "MOSFIRE_J", "MOSFIRE_H", "MOSFIRE_K")
#: The list whose scale is the common one.
_SCALE_REFERENCE = "MOSFIRE_H"
#: Lines of two lists within this many Angstrom are the same OH line (overlap matching).
_MATCH_TOLERANCE_AA = 1.0


@lru_cache(maxsize=1)
def _oh_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw file: vacuum wavelength (Angstrom), amplitude on its own list's scale, list name."""
    path = files("klever_nb") / "data" / "oh_lines_vacuum.csv"
    table = np.genfromtxt(str(path), delimiter=",", comments="#", skip_header=6,
                          dtype=None, encoding="utf-8")
    wave = np.array([row[0] for row in table], dtype=float)
    amplitude = np.array([row[1] for row in table], dtype=float)
    source = np.array([str(row[2]) for row in table])
    return wave, amplitude, source


@lru_cache(maxsize=1)
def list_scale_factors() -> dict[str, float]:
    """Factor that puts each source list's amplitudes on the common (MOSFIRE_H) scale.

    Adjacent lists overlap in wavelength; OH lines present in both (within 1 Å,
    mutual nearest) give the ratio of their scales (median over the matched lines),
    chained from the reference list outwards. Measured on the shipped file: J/Y
    1.02, H/J 1.09, K/H 1.02 (9, 9 and 2 matched lines): the lists are nearly on one
    scale already (all derive from Rousselot et al. 2000 intensities).
    """
    wave, amp, source = _oh_table()
    ratio_next = {}
    for blue, red in zip(_SOURCE_ORDER[:-1], _SOURCE_ORDER[1:], strict=True):
        wb, ab = wave[source == blue], amp[source == blue]
        wr, ar = wave[source == red], amp[source == red]
        ratios = []
        for w, a in zip(wr, ar, strict=True):
            i = int(np.argmin(np.abs(wb - w)))
            j = int(np.argmin(np.abs(wr - wb[i])))
            if abs(wb[i] - w) <= _MATCH_TOLERANCE_AA and wr[j] == w and ab[i] > 0:
                ratios.append(a / ab[i])
        ratio_next[blue] = float(np.median(ratios)) if ratios else 1.0  # red / blue
    factors = {_SCALE_REFERENCE: 1.0}
    ref = _SOURCE_ORDER.index(_SCALE_REFERENCE)
    for k in range(ref - 1, -1, -1):  # bluer lists: amp_ref-scale = amp * (red/blue)
        factors[_SOURCE_ORDER[k]] = factors[_SOURCE_ORDER[k + 1]] * ratio_next[_SOURCE_ORDER[k]]
    for k in range(ref + 1, len(_SOURCE_ORDER)):
        factors[_SOURCE_ORDER[k]] = factors[_SOURCE_ORDER[k - 1]] / ratio_next[_SOURCE_ORDER[k - 1]]
    return factors


@lru_cache(maxsize=1)
def load_oh_lines() -> tuple[np.ndarray, np.ndarray]:
    """Vacuum OH line wavelengths (micron) and amplitudes on one common scale, by wavelength.

    The shipped file merges four per-band lists with their own amplitude scales; the
    amplitudes returned here are multiplied by :func:`list_scale_factors` (common
    scale: the MOSFIRE H list's).

    Returns
    -------
    wave_um, amplitude : numpy.ndarray
        Read-only arrays.

    References
    ----------
    Rousselot et al. 2000, A&A 354, 1134; FACTS.md §9.
    """
    wave, amp, source = _oh_table()
    factors = list_scale_factors()
    scale = np.array([factors.get(str(src), 1.0) for src in source])
    order = np.argsort(wave, kind="stable")
    wave_um = wave[order] / 1e4
    amplitude = (amp * scale)[order]
    wave_um.setflags(write=False)
    amplitude.setflags(write=False)
    return wave_um, amplitude


def reference_amplitude() -> float:
    """The brightest OH line of the whole list on the common scale (threshold unit)."""
    return float(load_oh_lines()[1].max())


def bright_oh_lines(wave_min_um: float, wave_max_um: float, *,
                    min_relative_amplitude: float = MASK_MIN_RELATIVE_AMPLITUDE) -> np.ndarray:
    """Wavelengths (micron) of the OH lines in a range brighter than one absolute threshold.

    Parameters
    ----------
    wave_min_um, wave_max_um : float
        Range in micron (vacuum).
    min_relative_amplitude : float
        Keep lines with amplitude >= this fraction of :func:`reference_amplitude` (the
        brightest near-IR OH line, common scale): the same sky brightness in every band.
    """
    wave_um, amplitude = load_oh_lines()
    inside = (wave_um >= wave_min_um) & (wave_um <= wave_max_um)
    if not inside.any():
        return np.empty(0)
    amp = amplitude[inside]
    return wave_um[inside][amp >= min_relative_amplitude * reference_amplitude()]


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
    sigma = lines / resolving_power / constants.FWHM_PER_SIGMA
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

"""The shipped OH line list is vacuum, and the sky mask covers the real sky's bright lines."""

from __future__ import annotations

import numpy as np
from scipy.signal import find_peaks

from klever_nb import sky
from klever_nb.io.cubes import vacuum_to_air


def _bright_observed_peaks(n: int = 25) -> np.ndarray:
    wave, flux = sky.observed_sky_k()
    peaks, props = find_peaks(flux, height=0.05, distance=3)
    order = np.argsort(props["peak_heights"])[::-1][:n]
    return np.sort(wave[peaks[order]])


def test_oh_list_is_sorted_vacuum_micron():
    wave, amplitude = sky.load_oh_lines()
    assert np.all(np.diff(wave) > 0) and np.all(amplitude > 0)
    assert 0.8 < wave.min() and wave.max() < 2.51


def test_observed_sky_peaks_sit_on_the_vacuum_list_not_the_air_one():
    """README of data/sky: the observed SINFONI peaks match Rousselot+00 in vacuum."""
    lines, _ = sky.load_oh_lines()
    peaks = _bright_observed_peaks()
    to_vacuum = np.abs(peaks[:, None] - lines[None, :]).min(axis=1) * 1e4  # Angstrom
    to_air = np.abs(peaks[:, None] - vacuum_to_air(lines)[None, :]).min(axis=1) * 1e4
    assert np.median(to_vacuum) < 1.0
    assert np.median(to_air) > 3.0


def test_mask_covers_the_observed_bright_sky_lines():
    wave, _ = sky.observed_sky_k()
    mask = sky.sky_mask(wave, resolving_power=4227.0)
    peaks = _bright_observed_peaks(15)
    covered = mask[np.searchsorted(wave, peaks).clip(0, wave.size - 1)]
    # measured: 13 of the 15 brightest observed peaks; the two missed are blends at
    # 2.436 and 2.450 um, where the K band ends and the list's amplitudes are uncertain
    assert covered.mean() >= 0.85
    assert 0.03 < mask.mean() < 0.4  # masks lines, not the band


def test_mask_width_follows_resolving_power_and_threshold():
    wave = np.linspace(1.456, 1.846, 2048)
    wide = sky.sky_mask(wave, resolving_power=2000.0)
    narrow = sky.sky_mask(wave, resolving_power=8000.0)
    assert wide.sum() > narrow.sum() and np.all(wide[narrow])
    strict = sky.sky_mask(wave, resolving_power=4045.0, min_relative_amplitude=0.5)
    loose = sky.sky_mask(wave, resolving_power=4045.0, min_relative_amplitude=0.01)
    assert strict.sum() < loose.sum()


def test_no_oh_lines_outside_the_list_range():
    assert not sky.sky_mask(np.linspace(0.5, 0.6, 100), resolving_power=3000.0).any()


def test_model_sky_spectrum_peaks_at_bright_lines():
    wave = np.linspace(1.92, 2.46, 2048)
    spectrum = sky.sky_spectrum(wave, resolving_power=4227.0)
    assert spectrum.max() == np.float64(1.0 + 0.01)
    mask = sky.sky_mask(wave, resolving_power=4227.0)
    assert np.median(spectrum[mask]) > 5 * np.median(spectrum[~mask])

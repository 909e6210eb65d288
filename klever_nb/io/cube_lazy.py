"""Lazy (memory-mapped, section-by-section) reading of IFU cubes larger than memory.

``open_cube(path, lazy=True)`` (:mod:`klever_nb.io.cubes`) wraps a :class:`_CubeSource` in
xarray lazily indexed arrays: each section asked for is read from the file (``os.pread`` of
plain images, astropy sections of compressed or scaled ones) and converted exactly as the
eager read converts the whole cube (masks, noise kind and unit, bad voxels, f_nu factors,
wavelength order). Whole-file-compressed cubes cannot be memory-mapped; they are read whole
within :func:`memory_budget_bytes`.

References
----------
DESIGN.md "Input files"; issue 18 (no usable spaxel is an error).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from astropy.io import fits
from scipy.ndimage import median_filter

from klever_nb.errors import ConfigError
from klever_nb.io.cube_header import (
    _hdu_name,
    _input_error,
    _is_cube,
    _noise_to_sigma,
    _noise_unit_scale,
)

if TYPE_CHECKING:
    from klever_nb.io.cubes import _Layout

__all__ = ["MEMORY_BUDGET_ENV", "memory_budget_bytes"]

#: Environment variable that sets the memory budget (MB) of whole-cube reads.
MEMORY_BUDGET_ENV = "KLEVER_NB_MEMORY_BUDGET_MB"


def memory_budget_bytes() -> float:
    """Bytes a whole-cube read may use: ``$KLEVER_NB_MEMORY_BUDGET_MB``, else half the
    available memory (psutil), else unlimited."""
    env = os.environ.get(MEMORY_BUDGET_ENV)
    if env:
        try:
            return float(env) * 2**20
        except ValueError:
            raise ConfigError(f"{MEMORY_BUDGET_ENV}={env!r} is not a number of MB") from None
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return float("inf")
    return 0.5 * float(psutil.virtual_memory().available)


def _file_compression(path: Path) -> str | None:
    """'gzip', 'bzip2' or 'zip' for a whole-file-compressed FITS (cannot be memory-mapped)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:3] == b"BZh":
        return "bzip2"
    if head[:2] == b"PK":
        return "zip"
    return None


def _hdu_shape(hdu) -> tuple[int, int, int]:
    header = hdu.header
    if isinstance(hdu, fits.CompImageHDU) and "ZNAXIS1" in header:
        return tuple(int(header[f"ZNAXIS{i}"]) for i in (3, 2, 1))
    return tuple(int(header[f"NAXIS{i}"]) for i in (3, 2, 1))


def _check_fits_in_memory(path, hdul, layout: _Layout, compression: str) -> None:
    """A whole-file-compressed cube is read at once: refuse it when it exceeds the budget."""
    if not _is_cube(hdul[layout.data]):
        return
    n_voxels = int(np.prod(_hdu_shape(hdul[layout.data])))
    need = n_voxels * 8 * 3  # float64 flux and noise, and the file's own copy
    budget = memory_budget_bytes()
    if need > budget:
        raise _input_error(path, None, None,
                           f"{compression}-compressed FITS cannot be memory-mapped or read in "
                           f"chunks, and reading it whole needs ~{need / 2**30:.1f} GB (budget "
                           f"{budget / 2**30:.1f} GB)",
                           f"decompress it first (e.g. gunzip) so that it is read in chunks, or "
                           f"raise {MEMORY_BUDGET_ENV}")


def _any_usable(source, channels: int = 64) -> bool:
    """Whether a lazily read cube has any voxel with finite flux and noise > 0 (stops at the
    first slab of ``channels`` channels that has one, so a normal cube costs one slab)."""
    n_wave = source.shape[0]
    for lo in range(0, n_wave, channels):
        key = (slice(lo, min(lo + channels, n_wave)), slice(None), slice(None))
        if np.isfinite(source.read(key, "noise")).any():
            return True
    return False


def _as_slice(key, n: int):
    """(slice to read, index into what was read or None, whether to drop the axis)."""
    if isinstance(key, int | np.integer):
        k = int(key) % n
        return slice(k, k + 1), None, True
    if isinstance(key, slice):
        return key, None, False
    idx = np.asarray(key, dtype=np.int64) % n
    if idx.size == 0:
        return slice(0, 0), None, False
    lo, hi = int(idx.min()), int(idx.max()) + 1
    return slice(lo, hi), idx - lo, False


class _CubeSource:
    """Reads sections of a cube's data (+ noise, mask) HDUs and converts them as
    :func:`open_cube` does for the whole cube (masks, noise kind and units, bad voxels,
    f_nu factors, wavelength order), so that only the sections asked for are in memory.

    Picklable (the file is re-opened where it is used, e.g. on a dask worker).
    """

    def __init__(self, path, data: int, noise: int | None, kind: str | None, mask: int | None,
                 shape, noise_scale: float, factors, sigma_channel=None):
        self.path = str(path)
        self.data, self.noise, self.kind, self.mask = data, noise, kind, mask
        self.shape = tuple(shape)
        self.noise_scale = float(noise_scale)
        self.factors = factors
        self.sigma_channel = sigma_channel
        self.reverse = False
        self._hdul = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_hdul"] = None
        state["_fd"] = None
        return state

    def _open(self):
        if self._hdul is None:
            self._hdul = fits.open(self.path, memmap=True, lazy_load_hdus=True)
        return self._hdul

    def close(self) -> None:
        if self._hdul is not None:
            self._hdul.close()
            self._hdul = None
        if self.__dict__.get("_fd") is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except OSError:  # already closed, or the interpreter is shutting down
            pass

    _DTYPES = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}

    def _plain(self, index: int):
        """(data offset, dtype, shape) of a plain (uncompressed, unscaled) image HDU, else None.

        Such HDUs are read with ``os.pread`` of the rows asked for: unlike a memory map, the
        file's pages then never count in this process's resident memory."""
        cache = self.__dict__.setdefault("_plain_cache", {})
        if index not in cache:
            hdul = self._open()
            hdu = hdul[index]
            header = hdu.header
            info = None
            if (not isinstance(hdu, fits.CompImageHDU) and "BSCALE" not in header
                    and "BZERO" not in header and header.get("BITPIX") in self._DTYPES):
                naxis = int(header.get("NAXIS", 0))
                shape = tuple(int(header[f"NAXIS{i}"]) for i in range(naxis, 0, -1))
                info = (int(hdul.fileinfo(index)["datLoc"]),
                        np.dtype(self._DTYPES[header["BITPIX"]]), shape)
            cache[index] = info
        return cache[index]

    def _pread(self, info, planes, ys: slice, xs) -> np.ndarray:
        offset, dtype, shape = info
        if self.__dict__.get("_fd") is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        ny, nx = shape[-2:]
        y0, y1, step = ys.indices(ny)
        y1 = max(y0, y1) if step > 0 else y1
        rows = slice(y0, y1) if step > 0 else slice(y1 + 1, y0 + 1)
        n_rows = max(rows.stop - rows.start, 0)
        per_plane = ny * nx * dtype.itemsize
        out = np.empty((len(planes), n_rows, nx), dtype=dtype)
        nbytes = n_rows * nx * dtype.itemsize
        for k, plane in enumerate(planes):
            start = offset + int(plane) * per_plane + rows.start * nx * dtype.itemsize
            buf = os.pread(self._fd, nbytes, start)
            if len(buf) != nbytes:
                raise _input_error(self.path, None, None, "file is shorter than its header "
                                   "says (truncated)", "re-download or re-write the file")
            out[k] = np.frombuffer(buf, dtype=dtype).reshape(n_rows, nx)
        sub = slice(None, None, step) if step > 0 else slice(None, None, step)
        if step != 1:
            out = out[:, sub] if step > 0 else out[:, ::-1][:, ::-step]
        return out[:, :, xs]

    def _array(self, index: int):
        """The HDU's memory map (plain images), else its section reader (compressed or
        scaled integers: astropy decompresses/scales only the tiles asked for)."""
        hdu = self._open()[index]
        header = hdu.header
        if isinstance(hdu, fits.CompImageHDU) or "BSCALE" in header or "BZERO" in header:
            return hdu.section
        return hdu.data

    def _section(self, index: int, wave_idx, ys, xs) -> np.ndarray:
        info = self._plain(index)
        if info is not None and len(info[2]) == 3:
            return np.asarray(self._pread(info, wave_idx, ys, xs), dtype=np.float64)
        array = self._array(index)
        lo, hi = int(wave_idx.min()), int(wave_idx.max()) + 1
        if hi - lo == wave_idx.size:  # sorted and unique: a contiguous run of channels
            block = array[lo:hi, ys, xs]
        elif isinstance(array, np.ndarray):
            block = array[wave_idx, ys, xs]  # only these planes' rows are touched
        else:
            block = np.stack([array[int(i), ys, xs] for i in wave_idx])
        return np.asarray(block, dtype=np.float64)

    def read(self, key, which: str) -> np.ndarray:
        """Section ``key`` (outer indexing on (wave, y, x), increasing wavelength)."""
        n_wave, ny, nx = self.shape
        wave_idx = np.arange(n_wave)[key[0]]
        drop_w = np.ndim(wave_idx) == 0
        wave_idx = np.atleast_1d(wave_idx)
        ys, ysub, drop_y = _as_slice(key[1], ny)
        xs, xsub, drop_x = _as_slice(key[2], nx)
        shape_out = (wave_idx.size, len(range(*ys.indices(ny))), len(range(*xs.indices(nx))))
        if wave_idx.size == 0 or 0 in shape_out:
            out = np.zeros(shape_out)
        else:
            file_idx = n_wave - 1 - wave_idx if self.reverse else wave_idx
            order = np.argsort(file_idx, kind="stable")
            sorted_idx = file_idx[order]
            flux = self._section(self.data, sorted_idx, ys, xs)
            if self.mask is not None:
                mhdu = self._open()[self.mask]
                if mhdu.header.get("NAXIS", 0) == 3:
                    mvals = np.asarray(self._section(self.mask, sorted_idx, ys, xs))
                else:
                    mvals = np.asarray(self._array(self.mask)[ys, xs], dtype=np.float64)[None]
                name = mhdu.name.strip().upper()
                bad = mvals == 0 if name.endswith("FIELDMAP") else mvals != 0
                flux[np.broadcast_to(bad, flux.shape)] = np.nan
            if self.noise is None:
                noise = np.broadcast_to(self.sigma_channel[sorted_idx][:, None, None],
                                        flux.shape).copy()
            else:
                noise = _noise_to_sigma(self._section(self.noise, sorted_idx, ys, xs),
                                        self.kind)
                noise *= self.noise_scale
            bad = ~np.isfinite(flux) | ~np.isfinite(noise) | (noise <= 0)
            flux[bad] = np.nan
            noise[bad] = np.nan
            if self.factors is not None:
                flux *= self.factors[sorted_idx][:, None, None]
                noise *= self.factors[sorted_idx][:, None, None]
            out = flux if which == "flux" else noise
            inverse = np.empty_like(order)
            inverse[order] = np.arange(order.size)
            out = out[inverse]
        if ysub is not None:
            out = out[:, ysub]
        if xsub is not None:
            out = out[:, :, xsub]
        index = tuple(0 if drop else slice(None) for drop in (drop_w, drop_y, drop_x))
        return out[index]


def _estimate_noise_chunked(source: _CubeSource, smooth_channels: int = 5) -> np.ndarray:
    """:func:`estimate_noise` (the same numbers) from blocks of channels of the file."""
    n_wave, ny, nx = source.shape
    block = max(8, int(2**24 // max(ny * nx, 1)))
    sigma = np.full(n_wave, np.nan)
    key_all = (slice(None), slice(None))
    for c0 in range(2, max(n_wave - 2, 2), block):
        c1 = min(n_wave - 2, c0 + block)
        flux = source.read((np.arange(c0 - 2, c1 + 2),) + key_all, "flux").reshape(
            c1 - c0 + 4, -1)
        second = 2.0 * flux[2:-2] - flux[:-4] - flux[4:]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            centre = np.nanmedian(second, axis=1, keepdims=True)
            sigma[c0:c1] = 1.482602 * np.nanmedian(np.abs(second - centre), axis=1) / np.sqrt(6)
    good = np.isfinite(sigma) & (sigma > 0)
    if not good.any():
        return np.full(n_wave, np.nan)
    index = np.arange(n_wave)
    sigma = np.interp(index, index[good], sigma[good])
    return median_filter(sigma, size=max(1, int(smooth_channels)), mode="nearest")


def _lazy_source(path, hdul, layout: _Layout, shape, flux_unit, noise_kind, factors):
    """The section reader of a cube, its noise HDU name, kind, attrs and estimate method."""
    if layout.mask is not None:
        mask_hdu = hdul[layout.mask]
        mshape = tuple(int(mask_hdu.header.get(f"NAXIS{i}", 0))
                       for i in range(int(mask_hdu.header.get("NAXIS", 0)), 0, -1))
        if mshape != tuple(shape) and mshape != tuple(shape[1:]):
            raise _input_error(path, _hdu_name(hdul, layout.mask), "NAXIS",
                               f"mask shape {mshape} does not match the cube {tuple(shape)}",
                               "give a mask of the cube's shape")
    if layout.noise is None:
        source = _CubeSource(path, layout.data, None, None, layout.mask, shape, 1.0, factors,
                             sigma_channel=np.ones(shape[0]))
        source.sigma_channel = _estimate_noise_chunked(source)
        method = ("estimated per channel: 1.4826*MAD over spaxels of "
                  "(2f_i - f_(i-2) - f_(i+2))/sqrt(6), running median over 5 channels "
                  "(DER_SNR, Stoehr et al. 2008)")
        return source, "", "none", {}, method
    noise_hdu = hdul[layout.noise]
    noise_name = _hdu_name(hdul, layout.noise)
    kind = noise_kind or layout.noise_kind
    if not _is_cube(noise_hdu) or _hdu_shape(noise_hdu) != tuple(shape):
        found = _hdu_shape(noise_hdu) if _is_cube(noise_hdu) else None
        raise _input_error(path, noise_name, "NAXIS", f"noise shape {found} differs from "
                           f"the data shape {tuple(shape)}", "give a noise cube of the same shape")
    scale = _noise_unit_scale(noise_hdu.header, flux_unit, kind)
    source = _CubeSource(path, layout.data, layout.noise, kind, layout.mask, shape, scale,
                         factors)
    attrs = {"units_original": str(noise_hdu.header.get("BUNIT", "") or "")}
    return source, noise_name, kind, attrs, ""

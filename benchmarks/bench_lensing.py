"""Benchmark of the lensing stage (issue 5): prints one JSON object.

1. De-lensing a 600×600 surface-brightness map (0.05" lens pixels, SIS lens) onto a 200×200
   source grid: ``klever_nb.lensing.delens`` (ray tracing + np.bincount, whole function incl.
   image bookkeeping), its kernel alone, the cost of one more map with cached indices, against
   a per-pixel Python loop (``delens_reference``) and ``scipy.interpolate.griddata``.
2. Forward model of a 200×200 source through the same lens onto a 60×60 IFU grid (0.2",
   0.5" PSF): ``forward_model`` (operator construction + apply), a cached ``LensingOperator``
   apply, against a straightforward reference (RegularGridInterpolator, fftconvolve, a loop
   over spaxels).

Targets (issue 5): de-lensing <= 50 ms, forward model <= 100 ms.
Run: ``python benchmarks/bench_lensing.py``.
"""

from __future__ import annotations

import json
import time
import tracemalloc

import numpy as np
import xarray as xr
from astropy.wcs import WCS
from scipy import interpolate, signal

from klever_nb import lensing as L
from klever_nb.lensmodels import ParametricLens

P = 0.05
N = 600
N_SRC = 200
PS = 0.05


def _header(scale: float, crpix: float) -> str:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [crpix, crpix]
    w.wcs.cdelt = [-scale / 3600, scale / 3600]
    return w.to_header_string()


def best_of(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> dict:
    sis = ParametricLens(({"type": "SIS", "theta_e": 1.5},))
    lens = L.lens_from_parametric(sis, grid_like=((N, N), P, _header(P, (N + 1) / 2)))
    lens.attrs["z_source"] = 1.5
    tx, ty = np.meshgrid(lens["theta_x"], lens["theta_y"])
    ax, ay = lens["alpha_x"].values, lens["alpha_y"].values
    centre = (0.4, 0.2)
    sb = 100 * np.exp(-np.hypot(tx - ax - centre[0], ty - ay - centre[1]) / 0.8)
    maps = xr.Dataset({"flux": (("line", "ly", "lx"), sb[None])},
                      coords={"line": ["Halpha"], "ly": lens["ly"], "lx": lens["lx"],
                              "theta_x": lens["theta_x"], "theta_y": lens["theta_y"]})
    half = (N_SRC // 2) * PS  # a pixel is centred on the galaxy: 201 x 201 pixels
    kw = dict(source_pixel_arcsec=PS, kpc_per_arcsec=8.0, centre=centre, source_extent=half,
              errors="independent")
    out = L.delens(maps, lens, **kw)
    n_src = [out.sizes["ys"], out.sizes["xs"]]
    t_delens = best_of(lambda: L.delens(maps, lens, **kw))
    grid = L.source_grid_of(out)

    def kernel():
        bx, by = L._trace_rays(lens, lens["ly"].values, lens["lx"].values, 1)
        idx = grid.index(bx, by).ravel()
        return L._bin_mean(idx, sb.ravel(), grid.n)

    t_kernel = best_of(kernel)
    bx, by = L._trace_rays(lens, lens["ly"].values, lens["lx"].values, 1)
    idx = grid.index(bx, by).ravel()
    t_more_map = best_of(lambda: L._bin_mean(idx, sb.ravel(), grid.n))
    t0 = time.perf_counter()
    slow = L.delens_reference(maps, lens, grid, line="Halpha")
    t_loop = time.perf_counter() - t0
    fast = out["flux"].sel(line="Halpha").values
    same = bool(np.array_equal(np.isnan(fast), np.isnan(slow))
                and np.allclose(fast, slow, rtol=1e-12, equal_nan=True))
    inside = idx >= 0
    t0 = time.perf_counter()
    gx, gy = np.meshgrid(grid.beta_x, grid.beta_y)
    interpolate.griddata((bx.ravel()[inside], by.ravel()[inside]), sb.ravel()[inside], (gx, gy),
                         method="linear")
    t_griddata = time.perf_counter() - t0

    # forward model
    source = out["flux"].sel(line="Halpha").fillna(0.0)
    n_ifu, p_ifu, psf = 60, 0.2, 0.5
    ifu = _header(p_ifu, (n_ifu + 1) / 2)
    fwd = L.forward_model(source, lens, psf_fwhm_arcsec=psf, ifu_wcs=ifu,
                          ifu_shape=(n_ifu, n_ifu), subsample=2)
    t_forward = best_of(lambda: L.forward_model(source, lens, psf_fwhm_arcsec=psf, ifu_wcs=ifu,
                                                ifu_shape=(n_ifu, n_ifu), subsample=2))
    op = L.LensingOperator(lens, grid, psf_fwhm_arcsec=psf, ifu_wcs=ifu, ifu_shape=(n_ifu, n_ifu),
                           subsample=2)
    src_values = source.values
    t_apply = best_of(lambda: op.forward(src_values))
    t_adjoint = best_of(lambda: op.adjoint(fwd.values))

    def reference_forward():
        k = int(round(p_ifu / P))
        first = N // 2 - n_ifu * k // 2
        pad = int(np.ceil(3 * psf / P)) + 1
        sl = slice(first - pad, first + n_ifu * k + pad)
        off = np.array([-0.25, 0.25])
        interp = interpolate.RegularGridInterpolator((grid.beta_y, grid.beta_x), src_values,
                                                     bounds_error=False, fill_value=0.0)
        acc = np.zeros((sl.stop - sl.start,) * 2)
        for oy in off:
            for ox in off:
                fy = ty[sl, sl] + oy * P
                fx = tx[sl, sl] + ox * P
                ayi = interpolate.RegularGridInterpolator(
                    (lens["theta_y"].values, lens["theta_x"].values), ay, bounds_error=False,
                    fill_value=None)((fy, fx))
                axi = interpolate.RegularGridInterpolator(
                    (lens["theta_y"].values, lens["theta_x"].values), ax, bounds_error=False,
                    fill_value=None)((fy, fx))
                acc += interp((fy - ayi, fx - axi)) / 4
        sigma = psf / 2.3548 / P
        r = np.arange(-int(4 * sigma + 0.5), int(4 * sigma + 0.5) + 1)
        g = np.exp(-0.5 * (r / sigma) ** 2)
        kern = np.outer(g, g) / np.outer(g, g).sum()
        conv = signal.fftconvolve(acc, kern, mode="same")[pad:-pad, pad:-pad]
        flux = np.zeros((n_ifu, n_ifu))
        for j in range(n_ifu):  # the straightforward loop over spaxels
            for i in range(n_ifu):
                flux[j, i] = conv[j * k:(j + 1) * k, i * k:(i + 1) * k].sum() * P * P
        return flux

    t0 = time.perf_counter()
    ref = reference_forward()
    t_forward_ref = time.perf_counter() - t0
    bright = ref > 0.01 * ref.max()
    forward_max_rel_diff = float(np.max(np.abs(fwd.values[bright] / ref[bright] - 1)))

    tracemalloc.start()
    L.delens(maps, lens, **kw)
    _, peak_delens = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    tracemalloc.start()
    L.forward_model(source, lens, psf_fwhm_arcsec=psf, ifu_wcs=ifu, ifu_shape=(n_ifu, n_ifu))
    _, peak_forward = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    ms = 1e3
    return {
        "benchmark": "lensing",
        "delens": {
            "image_pixels": N * N, "source_grid": n_src,
            "filled_source_fraction": float(np.isfinite(fast).mean()),
            "delens_ms": round(t_delens * ms, 2),
            "kernel_trace_plus_bincount_ms": round(t_kernel * ms, 2),
            "one_more_map_cached_indices_ms": round(t_more_map * ms, 3),
            "reference_python_loop_ms": round(t_loop * ms, 1),
            "reference_griddata_linear_ms": round(t_griddata * ms, 1),
            "speedup_vs_loop": round(t_loop / t_delens, 1),
            "speedup_vs_griddata": round(t_griddata / t_delens, 1),
            "equals_loop": same,
            "target_ms": 50, "meets_target": t_delens <= 0.050,
            "peak_memory_mb": round(peak_delens / 2**20, 1),
        },
        "forward": {
            "source_grid": n_src, "ifu_grid": [n_ifu, n_ifu], "psf_fwhm_arcsec": psf,
            "forward_model_ms": round(t_forward * ms, 2),
            "cached_operator_forward_ms": round(t_apply * ms, 2),
            "cached_operator_adjoint_ms": round(t_adjoint * ms, 2),
            "reference_ms": round(t_forward_ref * ms, 1),
            "speedup_vs_reference": round(t_forward_ref / t_forward, 1),
            "max_rel_diff_vs_reference_bright_spaxels": forward_max_rel_diff,
            "target_ms": 100, "meets_target": t_forward <= 0.100,
            "peak_memory_mb": round(peak_forward / 2**20, 1),
        },
        "numpy": np.__version__,
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))

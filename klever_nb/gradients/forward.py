"""A forward-modelled metallicity gradient fitted in the image plane (beyond K20).

Part of :mod:`klever_nb.gradients`; the linear operators live in
:mod:`klever_nb.gradients.forward_operators` and are re-exported here.

The paper measures gradients on back-projected source-plane maps (K20 §4.2), whose
pixels are smeared by the distorted source-plane PSF, which flattens gradients. Here the
gradient is fitted where the noise is independent, in the IFU pixels of the observed line
maps: a source-plane model (exponential Halpha disc + linear metallicity gradient + line
ratios from the calibrations) is lensed, PSF-convolved and rebinned by a *linear* operator
and compared with the observed line maps; emcee samples the seven non-linear parameters
while the line amplitudes are solved in closed form.

Model (source plane, coordinates in kpc)
----------------------------------------
* Halpha surface brightness Sigma(x, y) = exp(-R / h), R the elliptical radius about
  (x0, y0) with axis ratio q and major-axis angle theta (``theta_deg``: source-grid frame,
  from +xs towards +ys; not a sky PA).
* 12+log(O/H) = central + gradient x r, with r the *projected* distance from (x0, y0)
  (``radius="projected"``, as the paper's annuli) or the deprojected disc radius R
  (``radius="deprojected"``).
* Each line is Sigma x 10^{log R_cal(oh)} (numerators) or Sigma (Halpha, Hbeta
  denominators), e.g. [NII]/Halpha from N2 and [OIII]/Hbeta from R3
  (:func:`klever_nb.calibrations.get_calibration`); Hbeta = Halpha / 2.87 up to the
  free amplitudes below (dust that is uniform over the galaxy drops out).

Likelihood
----------
The noise of the IFU line maps is Gaussian and independent between pixels (``flux_err``).
Every observed line map o has its own amplitude c_o, solved in closed form (a profile
likelihood over the amplitudes). The calibrations' intrinsic dispersion sigma_cal is a
*galaxy-level* offset of each diagnostic, not pixel noise: with
``calibration_scatter="offset"`` (default) the offset delta_d = log10(c_num / c_den) of each
diagnostic gets a Gaussian prior N(0, sigma_cal^2) (this sets the absolute metallicity scale);
with ``"none"`` numerator and denominator share one amplitude (delta_d = 0, the
calibrations taken as exact). Treating sigma_cal as independent per-pixel scatter would wash
out exactly the spatial information the gradient comes from, so it is not offered.

Band registration
-----------------
Lines from different bands (Hbeta+[OIII] in YJ and Halpha+[NII] in H at z ~ 1.4) come from
separately registered cubes. A residual shift of one band moves one ratio map against the
disc, which the image-plane fit reads as a gradient change (the z = 1.4 demo mock: -0.018
instead of -0.040 dex/kpc with YJ off by ~0.7 spaxel). ``register_bands`` finds each band's
shift at the maximum posterior (the model images of its lines moved by a cubic shift) and then
samples the shifts with the disc (two parameters per band after :data:`PARAMETERS`), so their
uncertainty is in the gradient's error. On SIS two-image mocks (30 x 30 spaxels, Halpha peak
SNR 25, 20 realisations) the shifts are known to ~0.045 spaxel and this changes the gradient
error by < 1 %: with Gaussian pixel noise of the quoted size the errors are already honest
(pull std 0.74, bias -0.003 +- 0.002 dex/kpc). The larger scatter seen after full cube fits
comes from the line maps (faint [OIII]/Hbeta fluxes biased low), not from this model.

References
----------
K20 §4.2 (the smearing the paper's annuli partially correct), FACTS.md §1 (calibrations),
§12 (speed); emcee (Foreman-Mackey et al. 2013).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import xarray as xr
from scipy import sparse
from threadpoolctl import threadpool_limits

from klever_nb.calibrations import get_calibration
from klever_nb.constants import FORWARD_DIAGNOSTICS, FWHM_PER_SIGMA
from klever_nb.errors import ConfigError, InputError
from klever_nb.gradients.forward_operators import (
    AffineLens,
    LinearForward,
    _pixel_response,
    affine_delens,
    affine_forward,
    affine_render,
    lens_forward_from_lensing,
    linear_operator,
)
from klever_nb.gradients.profile import DIAGNOSTIC_LINES

__all__ = [
    "PARAMETERS", "ForwardModel", "fit_forward_gradient", "shift_matrix",
    # the linear operators (klever_nb.gradients.forward_operators)
    "LinearForward", "linear_operator", "lens_forward_from_lensing", "AffineLens",
    "affine_render", "affine_forward", "affine_delens",
]

PARAMETERS = ("centre_x_kpc", "centre_y_kpc", "log10_scale_length_kpc", "axis_ratio", "theta_deg",
              "central_oh", "gradient_dex_per_kpc")


# ---------------------------------------------------------------------------
# The forward model and its likelihood
# ---------------------------------------------------------------------------
def _ifu_psf_matrix(ifu_shape: tuple[int, int], fwhm_pix: float) -> np.ndarray:
    """Dense Gaussian blur of an IFU image (point at each pixel centre, pixel-integrated)."""
    mats = []
    for n in ifu_shape:
        _, resp = _pixel_response(n, n, 0, 1, fwhm_pix / FWHM_PER_SIGMA)
        mats.append(resp)
    return np.kron(mats[0], mats[1])


def _ellipticity_to_shape(e1: np.ndarray, e2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(axis ratio, PA rad) from e = (1 - q)/(1 + q) (cos 2PA, sin 2PA)."""
    e = np.hypot(e1, e2)
    return (1 - e) / (1 + e), 0.5 * np.arctan2(e2, e1)


def _shift_matrix_1d(n: int, shift: float) -> np.ndarray:
    """(n, n) cubic-convolution (Keys, a = -0.5) matrix: ``out[i] = in(i - shift)``, edges
    clamped (as ``scipy.ndimage.shift``'s sign convention)."""
    pos = np.arange(n) - shift
    base = np.floor(pos).astype(int)
    frac = pos - base
    out = np.zeros((n, n))
    for off in (-1, 0, 1, 2):
        dist = np.abs(frac - off)
        w = np.where(dist <= 1, 1.5 * dist**3 - 2.5 * dist**2 + 1,
                     np.where(dist < 2, -0.5 * dist**3 + 2.5 * dist**2 - 4 * dist + 2, 0.0))
        np.add.at(out, (np.arange(n), np.clip(base + off, 0, n - 1)), w)
    return out


def _shift_matrices_1d(n: int, shifts: np.ndarray) -> np.ndarray:
    """(m, n, n) stack of :func:`_shift_matrix_1d` for m shifts at once."""
    shifts = np.asarray(shifts, float).reshape(-1)
    pos = np.arange(n)[None] - shifts[:, None]
    base = np.floor(pos).astype(int)
    frac = pos - base
    out = np.zeros((shifts.size, n, n))
    walker = np.repeat(np.arange(shifts.size), n)
    row = np.tile(np.arange(n), shifts.size)
    for off in (-1, 0, 1, 2):
        dist = np.abs(frac - off)
        w = np.where(dist <= 1, 1.5 * dist**3 - 2.5 * dist**2 + 1,
                     np.where(dist < 2, -0.5 * dist**3 + 2.5 * dist**2 - 4 * dist + 2, 0.0))
        np.add.at(out, (walker, row, np.clip(base + off, 0, n - 1).reshape(-1)), w.reshape(-1))
    return out


def shift_matrix(ifu_shape: tuple[int, int], shift_yx: tuple[float, float]) -> sparse.csr_matrix:
    """Sparse matrix moving a flattened IFU image by ``shift_yx`` = (dy, dx) pixels (cubic)."""
    sy = _shift_matrix_1d(ifu_shape[0], float(shift_yx[0]))
    sx = _shift_matrix_1d(ifu_shape[1], float(shift_yx[1]))
    return sparse.kron(sparse.csr_matrix(sy), sparse.csr_matrix(sx), format="csr")


def _used_rows(matrix: Any, ifu_shape: tuple[int, int], shift: tuple[float, float],
               pixels: np.ndarray) -> Any:
    """Operator rows of the used IFU pixels, the model image first moved by ``shift``."""
    if shift != (0.0, 0.0):
        rows = shift_matrix(ifu_shape, shift)[pixels] @ matrix
    else:
        rows = matrix[pixels]
    if sparse.issparse(rows):
        rows = rows.tocsr()
        if rows.nnz > 0.25 * rows.shape[0] * rows.shape[1]:
            rows = rows.toarray()  # dense BLAS wins above ~25 % fill
    return rows if sparse.issparse(rows) else np.asarray(rows)


def _observable_shifts(observables: list[tuple[str, tuple[str, ...], int]],
                       line_shifts_pix: dict[str, tuple[float, float]] | None
                       ) -> list[tuple[float, float]]:
    """Registration shift of every observable (its lines must share one, i.e. one band)."""
    shifts = {} if line_shifts_pix is None else dict(line_shifts_pix)
    out = []
    for name, lines, _ in observables:
        found = {tuple(float(v) for v in shifts.get(n, (0.0, 0.0))) for n in lines}
        if len(found) > 1:
            raise ConfigError(f"line_shifts_pix: the lines of {name} ({', '.join(lines)}) are "
                              "summed, so they need one registration shift")
        out.append(found.pop())
    return out


class ForwardModel:
    """Source-plane disc + gradient -> IFU line maps, with a vectorised log posterior.

    Built by :func:`fit_forward_gradient`; kept public so that notebooks can show model and
    residual maps (:meth:`model_maps`) for any parameter vector (:data:`PARAMETERS`, with
    (e1, e2) = (1 - q)/(1 + q) (cos 2 PA, sin 2 PA) in place of q and PA).
    """

    def __init__(self, line_maps: xr.Dataset, operator: LinearForward, *,
                 source_ys_kpc: np.ndarray, source_xs_kpc: np.ndarray,
                 diagnostics: Sequence[str], calibration_set: str = "C20",
                 calibration_scatter: str = "offset", radius: str = "projected",
                 line_shifts_pix: dict[str, tuple[float, float]] | None = None,
                 sampled_bands: Sequence[str] = (), max_shift_pix: float = 2.0) -> None:
        if calibration_scatter not in ("offset", "none"):
            raise ConfigError("calibration_scatter: must be 'offset' or 'none', got "
                              f"{calibration_scatter!r}")
        if radius not in ("projected", "deprojected"):
            raise ConfigError(f"radius: must be 'projected' or 'deprojected', got {radius!r}")
        self.ys, self.xs = np.asarray(source_ys_kpc, float), np.asarray(source_xs_kpc, float)
        if operator.source_shape != (self.ys.size, self.xs.size):
            raise ConfigError(f"lens_forward works on a {operator.source_shape} source grid but "
                              f"source_grid_kpc is {(self.ys.size, self.xs.size)}")
        self.diagnostics = list(diagnostics)
        self.calibrations = [get_calibration(d, set_name=calibration_set) for d in self.diagnostics]
        self.calibration_scatter = calibration_scatter
        self.radius = radius
        lines = set(np.asarray(line_maps["line"]).astype(str))
        self.observables: list[tuple[str, tuple[str, ...], int]] = []  # (name, lines, template)
        self.ratio_pairs: list[tuple[int, int, float]] = []  # (numerator obs, den obs, sigma)
        den_index: dict[str, int] = {}
        for k, (d, cal) in enumerate(zip(self.diagnostics, self.calibrations, strict=True)):
            if d not in FORWARD_DIAGNOSTICS:
                raise ConfigError(f"diagnostics: the forward model handles ratios to a Balmer "
                                  f"line {FORWARD_DIAGNOSTICS}, not {d!r}")
            num, den = DIAGNOSTIC_LINES[d]
            missing = (set(num) | set(den)) - lines
            if missing:
                raise InputError(f"line maps: diagnostic {d} needs lines {sorted(missing)}")
            if den[0] not in den_index:
                den_index[den[0]] = len(self.observables)
                self.observables.append((den[0], den, 0))
            self.ratio_pairs.append((len(self.observables), den_index[den[0]], cal.sigma))
            self.observables.append(("+".join(num), num, 1 + k))
        ny, nx = operator.ifu_shape
        flux = line_maps["flux"].transpose("line", ...).values
        ferr = line_maps["flux_err"].transpose("line", ...).values
        if flux.shape[1:] != (ny, nx):
            raise InputError(f"line maps are {flux.shape[1:]} pixels but lens_forward gives "
                             f"{(ny, nx)}")
        names = list(np.asarray(line_maps["line"]).astype(str))
        data, weight = [], []
        for _, obs_lines, _ in self.observables:
            idx = [names.index(n) for n in obs_lines]
            f = flux[idx].sum(axis=0).reshape(-1)
            v = (ferr[idx] ** 2).sum(axis=0).reshape(-1)
            ok = np.isfinite(f) & np.isfinite(v) & (v > 0)
            data.append(np.where(ok, f, 0.0))
            weight.append(np.where(ok, 1.0 / np.where(ok, v, 1.0), 0.0))
        data, weight = np.array(data), np.array(weight)
        used = weight.sum(axis=0) > 0
        if not used.any():
            raise InputError("line maps: no pixel with a finite flux and a positive flux_err")
        self.pixels = np.flatnonzero(used)
        self.data, self.weight = data[:, used], weight[:, used]
        self.line_shifts_pix = _observable_shifts(self.observables, line_shifts_pix)
        self.observable_bands = None  # band of each observable, from line_maps["band"]
        if "band" in line_maps.coords and line_maps["band"].dims == ("line",):
            band_of = dict(zip(names, (str(b) for b in np.asarray(line_maps["band"])),
                               strict=True))
            self.observable_bands = [band_of[lines[0]] for _, lines, _ in self.observables]
        self._matrix = operator.matrix
        # bands whose registration shifts (dy, dx) are parameters 7, 8 (first band), 9, 10, ...
        self.sampled_bands = list(sampled_bands)
        if self.sampled_bands:
            if self.observable_bands is None:
                raise InputError("line maps: sampling the band shifts needs a 'band' "
                                 "coordinate on 'line'")
            if line_shifts_pix:
                raise ConfigError("line_shifts_pix and sampled_bands: give one of them")
            self._shift_slot = [self.sampled_bands.index(b) if b in self.sampled_bands
                                else -1 for b in self.observable_bands]
        groups: dict[tuple[float, float], list[tuple[int, int]]] = {}
        for k, ((_, _, t), shift) in enumerate(zip(self.observables, self.line_shifts_pix,
                                                   strict=True)):
            groups.setdefault(shift, []).append((k, t))
        # (rows of the IFU pixels used, [(observable, template)]) per registration shift
        self._row_groups = [(_used_rows(operator.matrix, (ny, nx), shift, self.pixels), members)
                            for shift, members in groups.items()]
        self.ifu_shape = (ny, nx)
        self.n_data = int((self.weight > 0).sum())
        yy, xx = np.meshgrid(self.ys, self.xs, indexing="ij")
        self._x, self._y = xx.reshape(-1), yy.reshape(-1)
        pix = abs(self.xs[1] - self.xs[0])
        extent = max(np.ptp(self.xs), np.ptp(self.ys))
        self.bounds = np.array([
            [self.xs.min() + 0.1 * np.ptp(self.xs), self.xs.max() - 0.1 * np.ptp(self.xs)],
            [self.ys.min() + 0.1 * np.ptp(self.ys), self.ys.max() - 0.1 * np.ptp(self.ys)],
            [np.log10(0.5 * pix), np.log10(0.5 * extent)],
            [-0.75, 0.75], [-0.75, 0.75],
            [min(c.oh_min for c in self.calibrations), max(c.oh_max for c in self.calibrations)],
            [-1.0, 1.0]]
            + [[-max_shift_pix, max_shift_pix]] * (2 * len(self.sampled_bands)))
        self.ndim = self.bounds.shape[0]

    # -- model ------------------------------------------------------------------
    def templates(self, theta: np.ndarray) -> np.ndarray:
        """Source-plane templates (n_walkers, 1 + n_diagnostics, n_source_pixels)."""
        theta = np.atleast_2d(theta)
        x0, y0, log_h, e1, e2, oh0, grad = (theta[:, k:k + 1] for k in range(7))
        q, pa = _ellipticity_to_shape(e1, e2)
        dx, dy = self._x[None] - x0, self._y[None] - y0
        u = dx * np.cos(pa) + dy * np.sin(pa)
        v = -dx * np.sin(pa) + dy * np.cos(pa)
        r_disc = np.sqrt(u**2 + (v / q) ** 2)
        sigma = np.exp(-r_disc / 10**log_h)
        sigma /= sigma.sum(axis=1, keepdims=True)
        r = np.hypot(dx, dy) if self.radius == "projected" else r_disc
        oh = np.clip(oh0 + grad * r, 7.0, 9.3)
        out = [sigma]
        out.extend(sigma * 10 ** cal.log_ratio(oh) for cal in self.calibrations)
        return np.stack(out, axis=1)

    def _images(self, theta: np.ndarray) -> np.ndarray:
        """IFU-plane images (n_walkers, n_observables, n_used_pixels) of the templates, each
        through the operator of its observable (moved by its band's registration shift)."""
        theta = np.atleast_2d(theta)
        tmpl = self.templates(theta)
        nw, _, ns = tmpl.shape
        out = np.empty((nw, len(self.observables), self.pixels.size))
        if self.sampled_bands:
            return self._shifted_images(theta, tmpl, out)
        for rows, members in self._row_groups:
            used = sorted({t for _, t in members})
            flat = tmpl[:, used].reshape(nw * len(used), ns)
            images = (rows @ flat.T).T if sparse.issparse(rows) else flat @ rows.T
            images = np.asarray(images).reshape(nw, len(used), -1)
            for k, t in members:
                out[:, k] = images[:, used.index(t)]
        return out

    def _shifted_images(self, theta, tmpl, out):
        """IFU images when the band shifts are parameters: the full model image of every
        template, then each band's cubic shift (separable, per walker), then the used pixels."""
        nw, nt, ns = tmpl.shape
        ny, nx = self.ifu_shape
        flat = tmpl.reshape(nw * nt, ns)
        full = self._matrix @ flat.T if sparse.issparse(self._matrix) else self._matrix @ flat.T
        full = np.asarray(full).T.reshape(nw, nt, ny, nx)
        moved = {}
        for slot in sorted(set(self._shift_slot)):
            if slot < 0:
                moved[slot] = full.reshape(nw, nt, -1)[:, :, self.pixels]
                continue
            sy = _shift_matrices_1d(ny, theta[:, 7 + 2 * slot])
            sx = _shift_matrices_1d(nx, theta[:, 8 + 2 * slot])
            img = np.einsum("wij,wtjk,wlk->wtil", sy, full, sx, optimize=True)
            moved[slot] = img.reshape(nw, nt, -1)[:, :, self.pixels]
        for k, ((_, _, t), slot) in enumerate(zip(self.observables, self._shift_slot,
                                                  strict=True)):
            out[:, k] = moved[slot][:, t]
        return out

    def _amplitudes(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Closed-form amplitudes per observable: (sum w d t, sum w t^2, chi2 constant)."""
        sdt = np.stack([(images[:, k] * (w * d)).sum(-1) for k, (w, d)
                        in enumerate(zip(self.weight, self.data, strict=True))], axis=1)
        stt = np.stack([(images[:, k] ** 2 * w).sum(-1) for k, w
                        in enumerate(self.weight)], axis=1)
        sdd = (self.weight * self.data**2).sum(-1)
        return sdt, stt, sdd

    def band_shifts(self, theta: np.ndarray, *, fixed_band: str | None = None,
                    max_shift_pix: float = 2.0) -> dict[str, tuple[float, float]]:
        """Registration shift (dy, dx) in pixels of every band's maps for the model ``theta``.

        The model images of a band's observables are moved together; the shift minimising
        their chi^2 (own amplitudes, profiled) is searched on a 0.25-pixel grid within
        ``max_shift_pix`` and refined (Nelder-Mead). ``fixed_band`` stays at (0, 0): needed
        without a lens (a shift of every band is then the same as moving the disc centre);
        through a lens the absolute registration of each band is constrained too.
        Needs ``line_maps["band"]`` (the ``band`` coordinate of the line maps).
        """
        from scipy.optimize import minimize

        if self.observable_bands is None:
            raise InputError("line maps: registering the bands needs a 'band' coordinate on "
                             "'line' (the band each line was measured in)")
        tmpl = self.templates(np.atleast_2d(theta)[:1])[0]
        full = np.asarray(self._matrix @ tmpl.T).T  # (n_templates, ny * nx)
        groups: dict[str, list[tuple[int, int]]] = {}
        for k, ((_, _, t), band) in enumerate(zip(self.observables, self.observable_bands,
                                                  strict=True)):
            groups.setdefault(band, []).append((k, t))
        out: dict[str, tuple[float, float]] = {}
        for band, members in groups.items():
            if band == fixed_band:
                out[band] = (0.0, 0.0)
                continue

            def chi2(shift, members=members):
                move = shift_matrix(self.ifu_shape, tuple(shift))[self.pixels]
                total = 0.0
                for k, t in members:
                    m, w, d = move @ full[t], self.weight[k], self.data[k]
                    total += np.sum(w * d * d) - np.sum(w * d * m) ** 2 / max(
                        np.sum(w * m * m), 1e-300)
                return total

            steps = np.arange(-max_shift_pix, max_shift_pix + 1e-9, 0.25)
            _, dy, dx = min((chi2((a, b)), a, b) for a in steps for b in steps)
            res = minimize(chi2, [dy, dx], method="Nelder-Mead",
                           options={"xatol": 1e-3, "fatol": 1e-3})
            best = np.clip(res.x, -max_shift_pix, max_shift_pix)
            out[band] = (float(best[0]), float(best[1]))
        return out

    def log_likelihood(self, theta: np.ndarray, *, return_amplitudes: bool = False):
        """Profile log likelihood over the line amplitudes, vectorised over walkers."""
        out = self.log_likelihood_from_images(self._images(theta))
        return out if return_amplitudes else out[0]

    def log_likelihood_from_images(self, images: np.ndarray):
        """(log L, amplitudes (n_walkers, n_observables), chi^2) from IFU-plane templates."""
        sdt, stt, sdd = self._amplitudes(images)
        stt = np.maximum(stt, 1e-300)
        if self.calibration_scatter == "offset":
            amp = sdt / stt
            chi2 = np.sum(sdd[None] - sdt**2 / stt, axis=1)
            penalty = np.zeros(amp.shape[0])
            for num, den, sig in self.ratio_pairs:
                ratio = amp[:, num] / amp[:, den]
                delta = np.log10(np.where(ratio > 0, ratio, 1e-30))
                penalty += (delta / max(sig, 1e-3)) ** 2
            logl = -0.5 * (chi2 + penalty)
        else:
            groups: dict[int, list[int]] = {}
            for num, den, _ in self.ratio_pairs:
                groups.setdefault(den, [den]).append(num)
            amp = np.zeros_like(sdt)
            chi2 = np.sum(sdd) * np.ones(sdt.shape[0])
            for members in groups.values():
                a = sdt[:, members].sum(1) / stt[:, members].sum(1)
                chi2 -= sdt[:, members].sum(1) ** 2 / stt[:, members].sum(1)
                amp[:, members] = a[:, None]
            logl = -0.5 * chi2
        return logl, amp, chi2

    def log_prob(self, theta: np.ndarray) -> np.ndarray:
        """Log posterior (flat priors inside :attr:`bounds`), vectorised over walkers."""
        theta = np.atleast_2d(theta)
        inside = np.all((theta >= self.bounds[:, 0]) & (theta <= self.bounds[:, 1]), axis=1)
        inside &= np.hypot(theta[:, 3], theta[:, 4]) < 0.75
        out = np.full(theta.shape[0], -np.inf)
        if inside.any():
            out[inside] = self.log_likelihood(theta[inside])
        return out

    def model_maps(self, theta: np.ndarray) -> xr.Dataset:
        """Best-amplitude model of every observable on the IFU grid (NaN where unused)."""
        theta = np.atleast_2d(theta)[:1]
        _, amp, _ = self.log_likelihood(theta, return_amplitudes=True)
        images = self._images(theta)[0]
        out = np.full((len(self.observables), np.prod(self.ifu_shape)), np.nan)
        for k in range(len(self.observables)):
            out[k, self.pixels] = amp[0, k] * images[k]
        return xr.Dataset(
            {"model": (("observable", "y", "x"), out.reshape(-1, *self.ifu_shape))},
            coords={"observable": [o[0] for o in self.observables]})

    # -- starting point ---------------------------------------------------------
    def residuals(self, theta: np.ndarray) -> np.ndarray:
        """Normalised residuals (n_walkers, n_residuals) with -0.5 sum r^2 = log likelihood.

        sqrt(w) (d - c t) per pixel of every observable at the best amplitudes c, then one
        delta_d / sigma_cal,d per diagnostic (``"offset"`` mode).
        """
        theta = np.atleast_2d(theta)
        images = self._images(theta)
        _, amp, _ = self.log_likelihood_from_images(images)
        parts = []
        for k, (w, d) in enumerate(zip(self.weight, self.data, strict=True)):
            parts.append(np.sqrt(w)[None] * (d[None] - amp[:, k:k + 1] * images[:, k]))
        if self.calibration_scatter == "offset":
            for num, den, sig in self.ratio_pairs:
                ratio = amp[:, num] / amp[:, den]
                delta = np.log10(np.where(ratio > 0, ratio, 1e-30))
                parts.append((delta / max(sig, 1e-3))[:, None])
        return np.concatenate(parts, axis=1)

    def initial_guess(self, *, n_starts: int = 2) -> np.ndarray:
        """Maximum posterior: a grid in (scale length, central O/H, gradient); bounded least
        squares (trust region, batched finite-difference Jacobian), 20 evaluations from the
        best grid point of each central O/H, then to convergence from the ``n_starts``
        best (the calibrations are not monotonic, so the likelihood has several local
        maxima, e.g. on the two branches of R3)."""
        with threadpool_limits(limits=1, user_api="blas"):
            return self._initial_guess(n_starts)

    def refine(self, start: np.ndarray, *, max_nfev: int = 200) -> np.ndarray:
        """Maximum posterior by bounded least squares from ``start`` (no grid search)."""
        with threadpool_limits(limits=1, user_api="blas"):
            return self._least_squares(start, max_nfev)[1]

    def _least_squares(self, start: np.ndarray, max_nfev: int) -> tuple[float, np.ndarray]:
        from scipy.optimize import least_squares

        lower = self.bounds[:, 0].copy()
        upper = self.bounds[:, 1].copy()
        lower[3:5], upper[3:5] = -0.53, 0.53  # keeps |e| < 0.75 (q > 0.14)
        steps = 1e-5 * np.maximum(upper - lower, 1.0)

        def fun(p: np.ndarray) -> np.ndarray:
            return self.residuals(p)[0]

        def jac(p: np.ndarray) -> np.ndarray:
            batch = np.vstack([p, p + np.diag(steps)])
            r = self.residuals(batch)
            return ((r[1:] - r[0]) / steps[:, None]).T

        start = np.clip(np.asarray(start, float), lower + 1e-9, upper - 1e-9)
        res = least_squares(fun, start, jac=jac, bounds=(lower, upper), method="trf",
                            x_scale="jac", max_nfev=max_nfev)
        return res.cost, res.x

    def _initial_guess(self, n_starts: int) -> np.ndarray:
        extent = max(np.ptp(self.xs), np.ptp(self.ys))
        base = np.array([np.mean(self.xs), np.mean(self.ys), np.log10(extent / 10), 0.0, 0.0,
                         8.4, 0.0])
        lo, hi = self.bounds[5]
        trials = []
        for log_h in np.log10(extent * np.array([0.04, 0.08, 0.16])):
            for oh0 in np.linspace(lo + 0.05, hi - 0.05, 9):
                for grad in (-0.15, -0.05, 0.0, 0.05, 0.15):
                    trial = base.copy()
                    trial[2], trial[5], trial[6] = log_h, oh0, grad
                    trials.append(trial)
        trials = np.array(trials)
        values = self.log_prob(trials)
        # the best grid point of every central O/H, so that both branches of the
        # double-valued calibrations are explored
        starts = []
        for oh0 in np.unique(trials[:, 5]):
            sel = np.flatnonzero(trials[:, 5] == oh0)
            starts.append(trials[sel[np.argmax(values[sel])]])

        def solve(start: np.ndarray, max_nfev: int):
            return self._least_squares(start, max_nfev)

        rough = sorted((solve(start, 20) for start in starts), key=lambda item: item[0])
        refined = [solve(x, 200) for _, x in rough[:n_starts]]
        return min(refined, key=lambda item: item[0])[1]


_STEPS = np.array([0.02, 0.02, 0.01, 0.01, 0.01, 0.01, 0.002])


def _laplace_covariance(log_prob: Callable, best: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Inverse of minus the finite-difference Hessian of ``log_prob`` at ``best``.

    All 1 + 2n + 2n(n-1) points go to the vectorised ``log_prob`` in one call; falls back to
    diag(steps^2) when the Hessian is not negative definite.
    """
    n = best.size
    eye = np.diag(steps)
    points = [best]
    points += [best + s * eye[i] for i in range(n) for s in (1, -1)]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    points += [best + si * eye[i] + sj * eye[j] for i, j in pairs
               for si, sj in ((1, 1), (1, -1), (-1, 1), (-1, -1))]
    values = log_prob(np.array(points))
    f0 = values[0]
    fp, fm = values[1:1 + 2 * n:2], values[2:2 + 2 * n:2]
    hess = np.diag((fp - 2 * f0 + fm) / steps**2)
    cross = values[1 + 2 * n:].reshape(-1, 4)
    for (i, j), (pp, pm, mp, mm) in zip(pairs, cross, strict=True):
        hess[i, j] = hess[j, i] = (pp - pm - mp + mm) / (4 * steps[i] * steps[j])
    if not np.all(np.isfinite(hess)):
        return np.diag(steps**2)
    try:
        cov = np.linalg.inv(-hess)
        np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        return np.diag(steps**2)
    return cov


def fit_forward_gradient(line_maps_image: xr.Dataset, *,
                         lens_forward: Callable[[np.ndarray], np.ndarray],
                         source_grid_kpc: tuple[np.ndarray, np.ndarray],
                         psf_fwhm_arcsec: float | None = None, redshift: float | None = None,
                         diagnostics: Sequence[str] = ("N2", "R3"),
                         calibration_set: str = "C20", calibration_scatter: str = "offset",
                         radius: str = "projected", nwalkers: int = 32, nsteps: int = 1500,
                         burn: int | None = None, seed: int = 0,
                         line_shifts_pix: dict[str, tuple[float, float]] | None = None,
                         register_bands: str = "none") -> dict:
    """Fit central metallicity and gradient to image-plane line maps through the lens.

    Parameters
    ----------
    line_maps_image : Dataset
        Observed line maps on ``(line, y, x)`` with ``flux`` and ``flux_err`` (independent
        Gaussian 1 sigma per IFU pixel); NaN pixels are ignored. Every pixel is used, also
        faint ones: no SNR cut is needed in the image plane.
    lens_forward : callable
        ``lens_forward(source_image[ny_s, nx_s]) -> ifu_image[ny, nx]``: lens, PSF and
        rebinning, linear in the source image (a :class:`LinearForward`, e.g. from
        :func:`affine_forward` or :func:`lens_forward_from_lensing`, or any callable, which
        is probed once into a matrix, one call per source pixel).
    source_grid_kpc : (ys_kpc, xs_kpc)
        The source grid of ``lens_forward`` (kpc from the galaxy centre).
    psf_fwhm_arcsec : float, optional
        If given, the IFU-plane model is further blurred by this Gaussian (pixel scale from
        ``line_maps_image.attrs["pixel_scale_arcsec"]``); leave None when ``lens_forward``
        already contains the PSF (recommended: blurring after rebinning is approximate).
    redshift : float, optional
        Stored in the result.
    diagnostics : list of str
        Any of ``N2``, ``R3``, ``S2``, ``R2``.
    calibration_set, calibration_scatter, radius
        See the module docstring.
    nwalkers, nsteps, burn, seed
        emcee settings (``burn`` default ``nsteps // 3``); walkers start from the Laplace
        approximation at the maximum posterior and move with differential-evolution
        proposals (autocorrelation times about half those of the stretch move here).
    line_shifts_pix : dict, optional
        Registration shift (dy, dx) in IFU pixels of the observed map of a line relative to
        ``lens_forward``'s IFU grid (the residual misalignment of its band, e.g. from
        :func:`band_line_shifts`); the model image of that line is moved by it (cubic).
        Lines summed into one observable must share it. Default: no shift.
    register_bands : {"none", "relative", "absolute"}
        Fit the registration shift of every band (``line_maps_image["band"]``) at the
        maximum posterior (:meth:`ForwardModel.band_shifts`, rounds of shifts then disc),
        then sample the shifts together with the disc (their uncertainty propagates into the
        gradient error; ``nwalkers`` is raised to 2 x parameters + 2 if needed). The image-plane fit sees any residual
        misalignment of the bands (K20 §3.1 aligns them on a continuum peak, which on a
        faint continuum or an arc can be off by ~0.7 spaxel): it displaces one ratio map
        relative to the disc and biases the gradient (the z = 1.4 demo mock: -0.018 instead
        of -0.040 dex/kpc). ``"relative"`` keeps the band of the first Balmer line fixed
        (use without a lens, where a common shift is the disc centre); ``"absolute"`` also
        registers it on the lens model (lensed galaxies). Replaces ``line_shifts_pix``.

    Returns
    -------
    dict
        ``gradient_dex_per_kpc``, ``gradient_err``, ``central_oh``, ``central_oh_err``
        (posterior medians and half 16-84 ranges), ``parameters`` (median and error of each
        of :data:`PARAMETERS`), ``calibration_offsets_dex`` (at the best fit), ``chi2``,
        ``n_data``, ``converged``, ``acceptance``, ``tau_max``, ``message``,
        ``band_shifts_pix`` and ``band_shifts_err_pix`` (posterior median and half 16-84
        range of each sampled band's (dy, dx)), ``samples``
        (flat chain of (central_oh, gradient)) and ``map`` (maximum-posterior vector).

    References
    ----------
    Beyond K20 (§4.2 describes the PSF smearing this avoids); emcee.
    """
    with threadpool_limits(limits=1, user_api="blas"):  # small matrices: threads only hurt
        return _fit_forward_gradient(
            line_maps_image, lens_forward=lens_forward, source_grid_kpc=source_grid_kpc,
            psf_fwhm_arcsec=psf_fwhm_arcsec, redshift=redshift, diagnostics=diagnostics,
            calibration_set=calibration_set, calibration_scatter=calibration_scatter,
            radius=radius, nwalkers=nwalkers, nsteps=nsteps, burn=burn, seed=seed,
            line_shifts_pix=line_shifts_pix, register_bands=register_bands)


def _fit_forward_gradient(line_maps_image, *, lens_forward, source_grid_kpc, psf_fwhm_arcsec,
                          redshift, diagnostics, calibration_set, calibration_scatter, radius,
                          nwalkers, nsteps, burn, seed, line_shifts_pix, register_bands) -> dict:
    import emcee

    if nwalkers < 2 * len(PARAMETERS) or nsteps < 10:
        raise ConfigError(f"nwalkers={nwalkers}, nsteps={nsteps}: emcee needs nwalkers >= "
                          f"{2 * len(PARAMETERS)} (twice the parameters) and nsteps >= 10")
    ys, xs = (np.asarray(c, float) for c in source_grid_kpc)
    operator = linear_operator(lens_forward, (ys.size, xs.size))
    if psf_fwhm_arcsec is not None:
        scale = line_maps_image.attrs.get("pixel_scale_arcsec")
        if scale is None:
            raise InputError("line maps: attrs['pixel_scale_arcsec'] is needed with "
                             "psf_fwhm_arcsec")
        blur = _ifu_psf_matrix(operator.ifu_shape, psf_fwhm_arcsec / float(scale))
        operator = LinearForward(blur @ operator.matrix, operator.source_shape,
                                 operator.ifu_shape)
    if register_bands not in ("none", "relative", "absolute"):
        raise ConfigError("register_bands: must be 'none', 'relative' or 'absolute', got "
                          f"{register_bands!r}")
    if register_bands != "none" and line_shifts_pix:
        raise ConfigError("line_shifts_pix and register_bands: give one of them")

    def build(shifts):
        return ForwardModel(line_maps_image, operator, source_ys_kpc=ys, source_xs_kpc=xs,
                            diagnostics=diagnostics, calibration_set=calibration_set,
                            calibration_scatter=calibration_scatter, radius=radius,
                            line_shifts_pix=shifts)

    model = build(line_shifts_pix)
    best = model.initial_guess()
    band_shifts: dict[str, tuple[float, float]] = {}
    if register_bands != "none":
        fixed = model.observable_bands[0] if model.observable_bands and \
            register_bands == "relative" else None
        bands = dict(zip(np.asarray(line_maps_image["line"]).astype(str),
                         np.asarray(line_maps_image["band"]).astype(str), strict=True))
        # alternate shifts and disc (the disc centre takes up part of a shift, so this
        # converges geometrically; ~0.5 per round without a lens), then a full search
        for _ in range(8):
            previous = band_shifts
            band_shifts = model.band_shifts(best, fixed_band=fixed)
            model = build({line: band_shifts[b] for line, b in bands.items()
                           if b in band_shifts})
            best = model.refine(best)
            if previous and max(np.hypot(band_shifts[b][0] - previous[b][0],
                                         band_shifts[b][1] - previous[b][1])
                                for b in band_shifts) < 0.01:
                break
        full = model.initial_guess()
        if model.log_prob(full)[0] >= model.log_prob(best)[0]:
            best = full
        # The shifts found above are only maximum-posterior values: sample them with the
        # disc (absolute, through the lens: the band shifts trade off against the gradient;
        # fixing them understated its error, see the module docstring).
        sampled = [b for b in dict.fromkeys(model.observable_bands) if b != fixed]
        if sampled:
            model = ForwardModel(line_maps_image, operator, source_ys_kpc=ys, source_xs_kpc=xs,
                                 diagnostics=diagnostics, calibration_set=calibration_set,
                                 calibration_scatter=calibration_scatter, radius=radius,
                                 sampled_bands=sampled)
            best = np.concatenate([best[:7]] + [np.asarray(band_shifts[b], float)
                                                for b in sampled])
    ndim = model.ndim
    nwalkers = max(nwalkers, 2 * ndim + 2)
    steps = np.concatenate([_STEPS, np.full(ndim - 7, 0.02)])
    rng = np.random.default_rng(seed)
    cov = _laplace_covariance(model.log_prob, best, steps)
    start = rng.multivariate_normal(best, cov, size=nwalkers, method="eigh")
    for k in range(ndim):
        start[:, k] = np.clip(start[:, k], *model.bounds[k])
    ell = np.hypot(start[:, 3], start[:, 4])
    start[:, 3:5] *= np.minimum(1.0, 0.7 / np.maximum(ell, 1e-12))[:, None]
    moves = [(emcee.moves.DEMove(), 0.8), (emcee.moves.DESnookerMove(), 0.2)]
    sampler = emcee.EnsembleSampler(nwalkers, ndim, model.log_prob, vectorize=True,
                                    moves=moves)
    sampler.random_state = np.random.RandomState(seed).get_state()
    sampler.run_mcmc(start, nsteps, progress=False)
    burn = nsteps // 3 if burn is None else burn
    chain = sampler.get_chain(discard=burn, flat=True)
    tau = sampler.get_autocorr_time(discard=burn, tol=0, quiet=True)
    acceptance = float(np.mean(sampler.acceptance_fraction))
    tau_key = float(np.max(tau[5:7]))
    n_eff = nwalkers * (nsteps - burn) / tau_key if np.isfinite(tau_key) else 0.0
    converged = bool((nsteps - burn) > 15 * tau_key and n_eff >= 400
                     and 0.1 < acceptance < 0.9)
    p16, p50, p84 = np.percentile(chain, [16, 50, 84], axis=0)
    q_chain, pa_chain = _ellipticity_to_shape(chain[:, 3], chain[:, 4])
    params = {name: (float(p50[k]), float(0.5 * (p84[k] - p16[k])))
              for k, name in enumerate(PARAMETERS) if k not in (3, 4)}
    band_shift_err: dict[str, tuple[float, float]] = {}
    for j, band in enumerate(model.sampled_bands):
        band_shifts[band] = (float(p50[7 + 2 * j]), float(p50[8 + 2 * j]))
        band_shift_err[band] = (float(0.5 * (p84[7 + 2 * j] - p16[7 + 2 * j])),
                                float(0.5 * (p84[8 + 2 * j] - p16[8 + 2 * j])))
    params["axis_ratio"] = (float(np.median(q_chain)), float(np.std(q_chain)))
    params["theta_deg"] = (float(np.rad2deg(np.median(pa_chain)) % 180), np.nan)
    lp = sampler.get_log_prob(flat=True)
    if lp.max() > model.log_prob(best)[0]:
        best = sampler.get_chain(flat=True)[np.argmax(lp)]
    _, amp, chi2 = model.log_likelihood(best, return_amplitudes=True)
    offsets = {d: float(np.log10(max(amp[0, n] / amp[0, m], 1e-30)))
               for d, (n, m, _) in zip(model.diagnostics, model.ratio_pairs, strict=True)}
    message = "" if converged else (f"emcee: {nsteps - burn} kept steps, autocorrelation time "
                                    f"{tau_key:.0f}, {n_eff:.0f} effective samples, acceptance "
                                    f"{acceptance:.2f}: run longer (needs > 15 tau and >= 400)")
    return {"gradient_dex_per_kpc": params["gradient_dex_per_kpc"][0],
            "gradient_err": params["gradient_dex_per_kpc"][1],
            "central_oh": params["central_oh"][0], "central_oh_err": params["central_oh"][1],
            "parameters": params, "calibration_offsets_dex": offsets,
            "chi2": float(chi2[0]), "n_data": model.n_data, "converged": converged,
            "acceptance": acceptance, "tau_max": tau_key, "n_effective": n_eff, "message": message,
            "samples": chain[:, 5:7], "map": best, "radius": radius, "redshift": redshift,
            "diagnostics": list(diagnostics), "calibration_scatter": calibration_scatter,
            "band_shifts_pix": band_shifts, "band_shifts_err_pix": band_shift_err,
            "model": model}

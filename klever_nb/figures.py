"""Static matplotlib versions of the paper's figures, built from products only.

Each function takes the xarray products (and summary dicts) of the stages and returns a
:class:`matplotlib.figure.Figure`; nothing is computed here that a stage does not expose.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

from klever_nb.gradients import psf_axes, psf_hwhm_size_kpc


def _pcolor(ax, da: xr.DataArray, **kwargs):
    da = da.transpose("ys", "xs")
    return ax.pcolormesh(np.asarray(da["xs"]), np.asarray(da["ys"]), np.asarray(da),
                         shading="nearest", **kwargs)


def gradient_figure(metallicity: xr.Dataset, profile: xr.Dataset, summary: Mapping[str, Any],
                    *, psf: Mapping[str, float], line_maps: xr.Dataset | None = None,
                    global_oh: float | None = None,
                    global_oh_err: float | tuple[float, float] | None = None,
                    forward: Mapping[str, Any] | None = None, title: str | None = None,
                    fig: Any = None) -> Any:
    """The paper's Fig. 7 for one galaxy: Halpha, metallicity map with annuli, profile + fit.

    Parameters
    ----------
    metallicity : Dataset
        Source-plane ``oh`` map on ``(ys, xs)`` in kpc.
    profile, summary : Dataset, dict
        From :func:`klever_nb.gradients.measure_gradient` (``summary["fit"]`` or the summary
        itself provides ``central_oh`` and ``gradient_dex_per_kpc``).
    psf : dict
        Source PSF (drawn shaded in the map, its HWHM size as a blue line in the profile).
    line_maps : Dataset, optional
        Source-plane line maps; the normalised Halpha map is the first panel when given.
    global_oh, global_oh_err : float, optional
        Integrated metallicity (lime line) and its error (green band): symmetric or (lo, hi).
    forward : dict, optional
        :func:`klever_nb.gradients.forward.fit_forward_gradient` result, drawn dashed.
    title : str, optional
    fig : matplotlib Figure, optional

    Returns
    -------
    matplotlib.figure.Figure

    References
    ----------
    K20 Fig. 7 and §4.2.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Ellipse

    show_halpha = line_maps is not None and "Halpha" in np.asarray(line_maps["line"]).astype(str)
    n_panels = 3 if show_halpha else 2
    if fig is None:
        fig = plt.figure(figsize=(4.2 * n_panels, 3.8))
    axes = fig.subplots(1, n_panels)
    panel = 0
    centre = (profile.attrs.get("centre_x_kpc", 0.0), profile.attrs.get("centre_y_kpc", 0.0))
    if show_halpha:
        ha = line_maps["flux"].sel(line="Halpha")
        ha = ha / float(np.nanmax(ha))
        mesh = _pcolor(axes[0], ha, cmap="magma", vmin=0, vmax=1)
        fig.colorbar(mesh, ax=axes[0], label=r"H$\alpha$ / peak")
        axes[0].set_title(r"source-plane H$\alpha$")
        panel = 1
    ax = axes[panel]
    mesh = _pcolor(ax, metallicity["oh"], cmap="viridis")
    fig.colorbar(mesh, ax=ax, label="12+log(O/H)")
    q = profile.attrs.get("axis_ratio", 1.0)
    pa = profile.attrs.get("theta_deg", 0.0)
    size = profile.attrs.get("size", "geometric")
    for r_out in np.asarray(profile["r_out_kpc"]):
        a = r_out / np.sqrt(q) if size == "geometric" else r_out
        ax.add_patch(Ellipse(centre, 2 * a, 2 * a * q, angle=pa, fill=False, color="k", lw=0.8))
    fwhm_a, fwhm_b, psf_pa = psf_axes(psf)
    xs, ys = np.asarray(metallicity["xs"]), np.asarray(metallicity["ys"])
    corner = (xs.min() + 0.6 * fwhm_a, ys.min() + 0.6 * fwhm_a)
    ax.add_patch(Ellipse(corner, fwhm_a, fwhm_b, angle=psf_pa, color="k", alpha=0.4))
    ax.set_aspect("equal")
    ax.set_title("metallicity, annuli and PSF")
    for a in axes[:panel + 1]:
        a.set_xlabel("x [kpc]")
        a.set_ylabel("y [kpc]")
    ax = axes[panel + 1]
    fit = summary.get("fit", summary)
    ax.errorbar(profile["radius_kpc"], profile["oh"], yerr=profile["oh_err"], fmt="o",
                color="k", capsize=2, label="annuli")
    r_line = np.linspace(0, float(max(profile["r_out_kpc"].max(), 2 * psf_hwhm_size_kpc(psf)))
                         if profile.sizes["annulus"] else 2 * psf_hwhm_size_kpc(psf), 50)
    if np.isfinite(fit.get("gradient_dex_per_kpc", np.nan)):
        grad, err = fit["gradient_dex_per_kpc"], fit.get("gradient_err", np.nan)
        ax.plot(r_line, fit["central_oh"] + grad * r_line, color="red",
                label=f"{grad:+.3f} ± {err:.3f} dex/kpc")
    if forward is not None and np.isfinite(forward.get("gradient_dex_per_kpc", np.nan)):
        g, e = forward["gradient_dex_per_kpc"], forward["gradient_err"]
        ax.plot(r_line, forward["central_oh"] + g * r_line, color="tab:blue", ls="--",
                label=f"forward {g:+.3f} ± {e:.3f}")
    ax.axvline(psf_hwhm_size_kpc(psf), color="blue", lw=1.0, label="PSF HWHM size")
    if global_oh is not None:
        ax.axhline(global_oh, color="lime", lw=1.5, label="global")
        if global_oh_err is not None:
            lo, hi = (global_oh_err, global_oh_err) if np.isscalar(global_oh_err) \
                else global_oh_err
            ax.axhspan(global_oh - lo, global_oh + hi, color="green", alpha=0.2)
    ax.set_xlabel("radius [kpc]")
    ax.set_ylabel("12+log(O/H)")
    resolved = summary.get("resolved", "")
    ax.set_title(f"profile ({resolved})" if resolved else "profile")
    ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# The paper's sample figures (K20 Figs 4-11), one function each (issue 16).
from klever_nb.sample_figures import (  # noqa: E402
    fig4_mu_spread,
    fig5_bpt,
    fig6_sfr_mass_mzr,
    fig7_galaxy,
    fig8_gradient_vs_redshift,
    fig9_gradient_vs_ssfr_mass,
    fig10_gradient_vs_dsfms,
    fig11_maps_residuals,
    write_figures,
)

__all__ = ["gradient_figure", "fig4_mu_spread", "fig5_bpt", "fig6_sfr_mass_mzr", "fig7_galaxy",
           "fig8_gradient_vs_redshift", "fig9_gradient_vs_ssfr_mass", "fig10_gradient_vs_dsfms",
           "fig11_maps_residuals", "write_figures"]

"""Write the notebooks of ``notebooks/`` from the cell lists below (outputs stripped).

The notebooks are generated so that they stay reviewable as Python and never
carry stale outputs: edit this file, then run

    python notebooks/build_notebooks.py            # rewrites every notebook
    python notebooks/build_notebooks.py --check    # exit 1 if a notebook is out of date

Each notebook tells a story and holds no logic (STYLE.md lesson 10): a cell
either explains (markdown), calls the package, or shows. Everything runs on
the embedded mock data (``klever_nb.mock``) in under a minute on two cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

KERNEL = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


def md(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(text.strip("\n"))


def code(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell(text.strip("\n"))


# ---------------------------------------------------------------------------
# 00 quickstart
# ---------------------------------------------------------------------------
PAPER = ("[Curti et al. 2020, MNRAS 492, 821 (K20)](https://doi.org/10.1093/mnras/stz3379) "
         "(DOI 10.1093/mnras/stz3379)")

#: The Binder note every notebook ends on (issue 17: one kernel at a time).
SHUTDOWN = md("""
---
**Before the next notebook**: *Kernel → Shut Down Kernel* (or close the tab and choose
"shut down"). JupyterLab keeps every kernel alive, and on Binder (2 GB) a few idle kernels
are enough to run out of memory. The demo galaxies are cached on disk
(`klever_nb.demo`), so reopening a notebook costs seconds, not a rerun.
""")

QUICKSTART = [
    md(r"""
# klever_nb quickstart: a metallicity gradient and how far to trust it

This notebook reproduces, on a **mock** lensed galaxy whose true answer is known, the measurement
at the heart of PAPER_LINK: the radial gradient of the gas-phase metallicity 12 + log(O/H) of a
z ≈ 1.4 galaxy magnified by a foreground lens, from KMOS near-infrared integral-field cubes.

**Terms used below**

* **R3, N2, S2, O3O2**: strong-line ratios, R3 = [OIII]λ5007/Hβ, N2 = [NII]λ6584/Hα,
  S2 = [SII]λλ6717,6731/Hα, O3O2 = [OIII]λ5007/[OII]λλ3727,3729.
* **C20**: the calibrations of these ratios against metallicity by Curti et al. 2020a
  (polynomials in x = 12 + log(O/H) − 8.69 with an intrinsic scatter σ_R each).
* **μ(Hα)**: the magnification, lensed over intrinsic Hα flux.
* **Resolution class** (K20 §4.2): *resolved* if metallicities reach at least twice the PSF
  size √(HWHM_x · HWHM_y) in the source plane, *marginal* between one and two, else *unresolved*.

The metallicity of each pixel is the posterior of K20 eq. (1) (ratios in log), with a flat prior:

$$
\chi^2(x) = \sum_i \frac{\left(R^{\rm obs}_i - R^{\rm exp}_i(x)\right)^2}
                        {\sigma^2_{{\rm obs},i} + \sigma^2_{R_i}},
\qquad P(x \mid R^{\rm obs}) \propto e^{-\chi^2(x)/2},
$$

where $R^{\rm obs}_i$ is an observed ratio, $R^{\rm exp}_i(x)$ the C20 calibration at
metallicity $x$, σ_obs its measurement error and σ_R the calibration's scatter.
""".replace("PAPER_LINK", PAPER)),
    md("""
## 1. The demo galaxy (analysed once, then read from disk)

`klever_nb.demo.demo_galaxy()` writes the mock's KMOS cubes, lens maps and galaxy TOML, and runs
the whole pipeline (`klever-nb run galaxy.toml`: line fitting → source plane → dust and
metallicity → gradient) **once**, in a separate process, into a cache folder that every notebook
shares. The first time takes 30–60 s (a progress bar shows the stages); afterwards a few seconds.
"""),
    code("""
from klever_nb import demo
from klever_nb.widgets import QuickstartPanel

galaxy = demo.demo_galaxy(0)          # lensed, z = 1.4, known truth
print("products in", galaxy.products)
{key: galaxy.summary[key] for key in ("redshift", "mu_halpha", "global_oh", "resolved")}
"""),
    md("""
## 2. The K20 Fig. 7 panel, with the truth

Left to right: the source-plane Hα map, the metallicity map with the elliptical annuli (shaped
like the source-plane PSF, grey ellipse) and the radial profile: annuli (black), the paper's
straight-line fit (red), the forward model (blue dashed), the PSF size (blue vertical line), the
integrated metallicity (lime) and the **mock's true gradient (green dotted)**.

**Touch the slider**: it sets the annulus width in units of the PSF (K20 use 0.5). Narrower
annuli do not beat the PSF: neighbouring annuli share the same blurred pixels.
The sentence under the figure is computed from the numbers shown.
"""),
    code("""
panel = QuickstartPanel(galaxy)
panel
"""),
    md("""
The same from code (every control has a code twin), and the figure saved for a paper:
"""),
    code("""
print(panel.verdict)
panel.savefig("quickstart_fig7.png")
"""),
    md("""
**Next**: `01_line_fitting` (how the line maps are made), `02_lens_reconstruction` (the source
plane and μ), `03_metallicity_mcmc` (eq. (1) pixel by pixel), `04_gradients_and_2d_maps`
(annuli, beam smearing and the forward model), and the exercises in `workshop/`.
"""),
    SHUTDOWN,
]


# ---------------------------------------------------------------------------
# 01 line fitting
# ---------------------------------------------------------------------------
LINE_FITTING = [
    md("""
# Emission-line fitting of whole cubes (K20 §3.1)

Every spaxel of a band is fitted at once: one Gaussian per line plus a linear continuum,
tied kinematics within a group (Hα+[NII]+[SII]; Hβ+[OIII]; [OII]; [SIII]), fixed doublet ratios,
[SII]6717/6731 bounded, inverse-noise weights and the bright OH sky lines masked.
This notebook fits a mock galaxy, explores the fits spaxel by spaxel, and then fits a cube
read from a FITS file ("bring your own cube").
"""),
    code("""
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from klever_nb import demo, fitting
from klever_nb.io import open_cube
from klever_nb.widgets import LineFitExplorer

galaxy = demo.demo_galaxy(0)     # the cached demo galaxy (see 00_quickstart)
galaxy.cubes
"""),
    md("""
## 1. Fit one band

`fit_cube` returns the line maps: a Dataset on `(line, y, x)` with `flux`, `flux_err`,
`velocity`, `sigma`, `snr`, `detected`, `fit_ok`, ...
"""),
    code("""
redshift = galaxy.redshift
h_band = galaxy.cubes["H"].to_dataset()
maps = fitting.fit_cube(h_band, redshift=redshift)
maps[["flux", "flux_err", "velocity", "sigma", "snr"]]
"""),
    md("""
## 2. Explore the fits

Click a spaxel on the map to see its spectrum (black), noise (grey), the masked OH sky channels
(blue bands) and the fitted model (red), and the table of its lines. Choose the line and the
quantity (flux, velocity, σ, SNR); the **SNR threshold** slider masks pixels (no refit); the
**smoothing** slider smooths the cube (0.4″ in the paper) and refits the band.
Without a widget front end the same view is shown as a static figure.
"""),
    code("""
explorer = LineFitExplorer(galaxy.cubes, line="Halpha", quantity="flux")
explorer
"""),
    md("""
Every control has a code twin: setting the state from Python does what the click does.
"""),
    code("""
explorer.select(12, 10)          # a click on spaxel (y=12, x=10)
explorer.quantity = "velocity"   # the map toggle
explorer.snr_threshold = 5.0     # the SNR slider
print(f"{explorer.masked_pixels().sum()} pixels masked at SNR <= 5")
explorer.line_table()[:3]
"""),
    code("""
fig = explorer.static_figure()   # the matplotlib twin, e.g. for a paper or a PDF export
"""),
    md("""
## 3. Bring your own cube

`klever_nb.io.open_cube` reads KMOS, SINFONI, MUSE, JWST NIRSpec/MIRI, IRAF-style and MaNGA
cubes into the same Dataset (wavelengths in vacuum µm, noise as 1σ, masks as NaN).
Here we read the demo galaxy's H-band FITS file (KMOS layout) as a user would read their
own cube.
"""),
    code("""
fits_dir = Path(tempfile.mkdtemp(prefix="klever_byoc_"))
cube_path = galaxy.cube_paths["H"]
cube = open_cube(cube_path)
cube
"""),
    code("""
own_maps = fitting.fit_cube(cube, redshift=redshift, lines=("Halpha", "NII_6584"))
fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
own_maps["flux"].sel(line="Halpha").plot.imshow(ax=axes[0], origin="lower", cmap="viridis",
                                                 robust=True)
own_maps["snr"].sel(line="NII_6584").plot.imshow(ax=axes[1], origin="lower", cmap="viridis")
fig.tight_layout()
"""),
    md("""
The same fit from the command line: `klever-nb fit CUBE.fits --redshift 1.4 --out DIR`.

## 4. From exposures to a cube (K20 §2.2)

Per-exposure KMOS files (`IFU.<n>.DATA/NOISE`) are aligned on the star observed by one IFU of
the same detector and combined by a 3σ-clipped mean. Here: six mock exposures with known
offsets; the table compares the measured shifts with the truth, the map shows how many
exposures feed each spaxel. Command line: `klever-nb combine EXP.fits... --ifu 7
--reference-ifu 3 --out CUBE.fits`.
"""),
    code("""
from klever_nb.io import combine_exposures
from klever_nb.io.combine import write_mock_exposures

exposures = write_mock_exposures(fits_dir / "exposures", n_exposures=6, seed=1)
combined = combine_exposures(exposures["paths"], ifu=7, reference_ifu=3)
for i in range(combined.sizes["exposure"]):
    print(f"exposure {i}: shift ({float(combined.shift_x[i]):+.3f}, "
          f"{float(combined.shift_y[i]):+.3f})\\" ± {float(combined.shift_x_err[i]):.4f}; "
          f"true ({exposures['true_shift'][i, 0]:+.3f}, {exposures['true_shift'][i, 1]:+.3f})")
fig, ax = plt.subplots(figsize=(4, 3.6))
combined["coverage"].plot.imshow(ax=ax, origin="lower", cmap="viridis")
ax.set_title("exposures per spaxel")
"""),
    SHUTDOWN,
]


# ---------------------------------------------------------------------------
# 02 lens reconstruction
# ---------------------------------------------------------------------------
LENS = [
    md("""
# Lens reconstruction: source-plane maps, magnifications and the source-plane PSF (K20 §3.2)

The image-plane line maps are rebinned onto the lens grid (flux conserving), each image pixel is
ray-traced to the source plane with β = θ − α (deflections rescaled to the source redshift), and
each source pixel is the mean of the rays that land in it (lensing conserves surface brightness).
The magnification μ(Hα) is the ratio of image- to source-plane Hα flux; μ from the κ and γ maps and
its spread over alternative lens models give the systematic error (K20 Fig. 4); a point source
lensed, blurred by the PSF and de-lensed gives the source-plane PSF ellipse (K20 Table 4).
"""),
    code("""
import warnings

import matplotlib.pyplot as plt

from klever_nb import demo, lensing, mock
from klever_nb.io import read_netcdf
from klever_nb.lensmodels import ParametricLens
from klever_nb.widgets import LensExplorer

cached = demo.demo_galaxy(0)         # z = 1.4 behind an SIE + shear: fitted once, cached on disk
spec = mock.demo_specs()[0]
line_maps = read_netcdf(cached.products / "line_maps.nc")[["flux", "flux_err", "snr"]]
cube_wcs = line_maps.attrs["wcs"]
lens_maps = mock.lens_maps(spec)     # the mock's deflection maps (D_ls/D_s = 1), no cubes built
psf_fwhm = lensing.maps_psf_fwhm_arcsec(spec.psf_fwhm_arcsec, line_maps)  # seeing + 0.4" smoothing
lens_maps
"""),
    md("""
## 1. One call: `reconstruct_source_plane`

The lens maps of the mock are in the `dls_ds` normalisation (Frontier Fields convention);
`z_lens` in their attrs lets the package rescale them to the source redshift.
"""),
    code("""
with warnings.catch_warnings():
    warnings.simplefilter("ignore", lensing.NearCriticalWarning)
    source, summary = lensing.reconstruct_source_plane(
        line_maps, lens_maps, redshift=spec.redshift, cube_wcs=cube_wcs,
        psf_fwhm_arcsec=psf_fwhm, forward_iterations=0)
print(f"mu(Halpha) = {summary['mu_halpha']:.2f} +- {summary['mu_halpha_err']:.2f} (forward model); "
      f"the paper's mu_halpha_k20 = {summary['mu_halpha_k20']:.2f}, mu_maps_k20 = "
      f"{summary['mu_maps_k20']:.2f}; true mu of the mock = {cached.truth['mu']:.2f}")
print("source PSF FWHM (kpc):", [round(v, 2) for v in summary["source_psf_fwhm_kpc"]],
      "PA", round(summary["source_psf_pa_deg_east_of_north"]), "deg east of north")
"""),
    md("""
The paper's μ(Hα) is lower than the true magnification here: the PSF spreads flux from the
highly magnified pixels next to the critical curve to less magnified ones (see the `Notes` of
`reconstruct_source_plane`; its `forward_iterations` option models the PSF and removes most of that
bias).

## 2. Alternative lens models

Lens models come with uncertainties; K20 take the spread of μ over the models' realisations.
Here two alternatives change the Einstein radius by ±5 %.
"""),
    code("""
grid = lensing.as_lens_grid(lens_maps)
alternatives = {}
for factor in (0.95, 1.05):
    components = [dict(c) for c in spec.lens.components]
    components[0]["theta_e"] *= factor
    alternatives[f"SIE θE × {factor}"] = lensing.lens_from_parametric(
        ParametricLens(tuple(components)), grid_like=grid, normalisation="source")
lenses = {"SIE + shear (mock truth)": lens_maps, **alternatives}
"""),
    md("""
## 3. Explore image and source plane side by side

Click an image pixel: a cross marks where its ray lands in the source plane, and the pink dots show
every image pixel that lands in the same source pixel (all the multiple images of that spot).
Click a source pixel to see which image pixels feed it. The orange lines are the critical curves
(image plane) and caustics (source plane); the white ellipse is the source-plane PSF (FWHM).
Change the source pixel size or the lens model to reconstruct again.
"""),
    code("""
with warnings.catch_warnings():
    warnings.simplefilter("ignore", lensing.NearCriticalWarning)
    explorer = LensExplorer(line_maps, lenses, redshift=spec.redshift, cube_wcs=cube_wcs,
                            psf_fwhm_arcsec=psf_fwhm)
explorer
"""),
    md("""
The code twins of the clicks and controls:
"""),
    code("""
with warnings.catch_warnings():
    warnings.simplefilter("ignore", lensing.NearCriticalWarning)
    explorer.select_image(54, 68)                 # a click on the image plane (on the arc)
    print("lands in source pixel", explorer.selected_source_pixel)
    explorer.source_pixel_arcsec = 0.1            # the source-pixel slider
    explorer.lens_model = "SIE θE × 1.05"         # the lens-model dropdown
print({k: explorer.summary[k] for k in ("mu_halpha", "mu_halpha_err", "mu_maps",
                                         "mu_maps_spread")})
fig = explorer.static_figure()
"""),
    SHUTDOWN,
]


# ---------------------------------------------------------------------------
# 03 metallicity
# ---------------------------------------------------------------------------
METALLICITY = [
    md("""
# Metallicity maps with exact posteriors (K20 §3.3–3.4)

Each pixel's 12+log(O/H) follows from the strong-line ratios through the C20 calibrations and the
χ² of K20 eq. (1), Σ (log R_obs − log R_cal(x))² / (σ_obs² + σ_cal²), with a flat prior over the
calibrations' validity range. The parameter is one-dimensional, so the package computes the
posterior **exactly on a fine grid** for every pixel at once; the paper's emcee sampling is
available too, and the two agree. Dust is corrected with the Balmer decrement where Hβ is good
enough and with the global E(B−V) elsewhere; AGN-like pixels in the BPT diagram are excluded.
"""),
    code("""
import matplotlib.pyplot as plt
import numpy as np

from klever_nb import demo, metallicity
from klever_nb.widgets import MetallicityExplorer

galaxy = demo.demo_galaxy(1)     # cached demo galaxy: unlensed, z = 2.2, [OII] ... [SII]
redshift = galaxy.redshift
line_maps = galaxy.line_maps     # fitted once by the pipeline (fitting.fit_galaxy), from disk
list(line_maps["line"].values)
"""),
    md("""
## 1. One call: `metallicity_map`

The diagnostics are chosen from the detected lines and the redshift (K20 §4.2); the output holds
the posterior median, the 16th/84th percentiles, flags (bimodal, at the edge of the prior, AGN) and
the ratios used.
"""),
    code("""
oh_map = metallicity.metallicity_map(line_maps, redshift=redshift)
print("diagnostics:", oh_map.attrs["diagnostics_used"])
print("median 12+log(O/H) over the map:", round(float(oh_map["oh"].median()), 3),
      "| true central value:", galaxy.truth["central_oh"],
      "| true gradient:", galaxy.truth["gradient_dex_per_kpc"], "dex/kpc")
oh_map[["oh", "oh_lo", "oh_hi", "bimodal", "at_edge"]]
"""),
    md("""
## 2. Explore a pixel

Click a pixel of the map: its observed ratios (dashed, ±1σ dotted) are drawn on the calibration
curves, its exact grid posterior (black) is overlaid with an emcee run (blue histogram), and the
BPT panel marks it among all pixels. The check boxes choose the diagnostics and the toggle switches
the dust correction; the map is recomputed on each change.
"""),
    code("""
explorer = MetallicityExplorer(line_maps, redshift=redshift)
explorer
"""),
    md("""
The code twins:
"""),
    code("""
explorer.diagnostics = ["R3", "N2", "S2"]   # the check boxes
explorer.dust_correction = False            # the dust toggle
explorer.select(12, 11)                     # a click on the map
post = explorer.pixel_posterior()
print(f"grid: {post['oh']:.3f} [{post['oh_lo']:.3f}, {post['oh_hi']:.3f}]; "
      f"emcee: {post['emcee']['oh']:.3f} [{post['emcee']['oh_lo']:.3f}, "
      f"{post['emcee']['oh_hi']:.3f}]")
fig = explorer.static_figure()
"""),
    SHUTDOWN,
]


# ---------------------------------------------------------------------------
# 04 gradients and 2-D maps
# ---------------------------------------------------------------------------
GRADIENTS = [
    md("""
# Metallicity gradients and 2-D maps (K20 §4.2, §4.5, App. A), and a forward-modelled gradient

The paper bins the source-plane metallicity map in elliptical annuli shaped like the source-plane
PSF, in steps of a fraction of the PSF size, and fits a straight line to the profile. The
back-projected maps are smeared by the distorted source-plane PSF, which flattens gradients; the
forward model (beyond the paper) fits the gradient in the image plane instead, where the noise is
independent. The 2-D analysis subtracts the radial model and fits a plane to find the direction of
the steepest gradient.
"""),
    code("""
from klever_nb import demo, gradients
from klever_nb.widgets import GradientExplorer

galaxy = demo.demo_galaxy(0)         # cached: lensed z = 1.4, true gradient -0.04 dex/kpc
oh_map = galaxy.metallicity          # source-plane 12+log(O/H) (metallicity.metallicity_map)
psf = galaxy.psf                     # source-plane PSF (lensing.annulus_psf of the lens stage)
global_oh = galaxy.summary["global_oh"]
psf
"""),
    md("""
## 1. The paper's method: annuli, emcee fit, resolution class, App. A systematics
"""),
    code("""
profile, paper = gradients.measure_gradient(oh_map, psf=psf, step_fraction=0.5)
print(f"gradient = {paper['gradient_dex_per_kpc']:.4f} ± {paper['gradient_err']:.4f} (stat) "
      f"± {paper['gradient_sys_err']:.4f} (sys) dex/kpc; {paper['resolved']}; "
      f"true gradient {galaxy.truth['gradient_dex_per_kpc']} dex/kpc")
profile[["radius_kpc", "oh", "oh_err", "n_pixels"]].to_dataframe()
"""),
    md("""
## 2. Beyond the paper: the forward-modelled gradient

A source-plane disc with a linear gradient and calibration line ratios is lensed, blurred by the
PSF and rebinned to the IFU pixels by the lensing stage's linear operator, and compared with the
observed line maps, whose noise is independent (emcee). The pipeline ran it
(`klever_nb.gradients.forward.fit_forward_gradient`, ~20 s and ~300 MB, so it is read here from
the cached `summary.json` rather than rerun; `pipeline._forward_gradient` shows the call).
"""),
    code("""
s = galaxy.summary
forward = {"gradient_dex_per_kpc": s["gradient_forward_dex_per_kpc"],
           "gradient_err": s["gradient_forward_err"], "central_oh": s["central_forward_oh"],
           "converged": s["gradient_forward_converged"]}
print(f"forward model: {forward['gradient_dex_per_kpc']:.4f} ± {forward['gradient_err']:.4f} "
      f"dex/kpc (converged: {forward['converged']}); paper's method "
      f"{paper['gradient_dex_per_kpc']:.4f} ± {paper['gradient_err']:.4f}; true "
      f"{galaxy.truth['gradient_dex_per_kpc']} dex/kpc")
"""),
    md("""
## 3. Explore: centre, annuli, profile, residuals

Drag the black cross to move the centre; change the step (in units of the PSF size) and the
annulus shape (PSF-shaped as the paper, or circular as in App. A): the profile and the fit update
at once. The toggle overlays the forward-modelled gradient. Below, the residual map (metallicity
minus the radial model) with the arrow of the planar fit (towards increasing metallicity).
"""),
    code("""
explorer = GradientExplorer(oh_map, psf=psf, forward=forward, global_oh=global_oh)
explorer
"""),
    md("""
The code twins:
"""),
    code("""
explorer.centre_kpc = (0.3, -0.2)     # dragging the centre
explorer.step_fraction = 0.35         # the step slider
explorer.shape = "circular"           # the annulus-shape toggle
explorer.method = "forward"           # paper <-> forward model
{k: explorer.summary[k] for k in ("gradient_dex_per_kpc", "gradient_err", "resolved",
                                  "forward_gradient_dex_per_kpc")}
"""),
    code("""
fig = explorer.static_figure()
"""),
    SHUTDOWN,
]


# ---------------------------------------------------------------------------
# 05: the paper's sample figures
# ---------------------------------------------------------------------------
SAMPLE_FIGURES = [
    md("""
# 05 — The paper's sample figures (K20 Figs 4–11)

The KLEVER rows that the paper prints (Tables 2–4, 6 galaxies, transcribed into the package
data) and the literature compilation shipped with klever_nb (Wuyts+16, Carton+18 and the
digitised gradient-vs-redshift sets) go through `klever_nb.sample`: Speagle+14 SFMS and
ΔSFMS, the local MZR, and the robust (Huber) regressions of gradient against sSFR, M* and
ΔSFMS with bootstrap errors and Spearman ρ. Set `RESULTS` to the `--out` folder of
`klever-nb sample` to add your own galaxies (red stars) to every figure and to draw their
Fig. 7 and Fig. 11 panels. Static matplotlib figures (no linked brushing yet).
"""),
    code("""
from pathlib import Path

import matplotlib.pyplot as plt

from klever_nb import figures, sample, sample_figures
from klever_nb.sample_run import read_sample_table

RESULTS = None  # e.g. Path("demo_output/products") after klever-nb sample
run = read_sample_table(RESULTS) if RESULTS is not None else None
k20 = sample.derive(sample.k20_table())
k20[["name", "redshift", "log_mstar", "log_sfr", "log_ssfr", "delta_sfms", "mzr_offset",
     "gradient_dex_per_kpc", "gradient_err"]].round(3)
"""),
    md("""
## Fig. 9 and Fig. 10: the correlations, and the paper's numbers

K20 §4.4: slope 0.013 ± 0.004 dex/kpc per dex of sSFR (ρ = 0.29), −0.013 ± 0.005 per dex of
M* (ρ = −0.25), ρ = 0.20 against ΔSFMS.
"""),
    code("""
cs = sample_figures.correlation_inputs(run)
corr = sample.correlations(cs, n_boot=100)
for key, r in corr.items():
    print(f"{key:10s} slope {r.slope:+.4f} ± {r.slope_err:.4f}  rho {r.spearman_rho:+.2f} "
          f"(p = {r.spearman_p:.1g})  rms {r.rms:.3f}  N = {r.n}")
fig9 = figures.fig9_gradient_vs_ssfr_mass(run, correlations=corr)
fig10 = figures.fig10_gradient_vs_dsfms(run, correlations=corr)
"""),
    md("## Fig. 6 (SFR–M* and MZR), Fig. 8 (gradient vs redshift), Fig. 4 (μ systematics)"),
    code("""
fig6 = figures.fig6_sfr_mass_mzr(run)
fig8 = figures.fig8_gradient_vs_redshift(run)
fig4 = figures.fig4_mu_spread(run)
"""),
    md("## Per-galaxy panels (Figs 5, 7, 11) — only with a results folder"),
    code("""
if RESULTS is not None:
    done = run[run["status"].isin(["done", "resumed"])]
    figures.fig5_bpt(sample_figures.bpt_ratios(RESULTS, done["name"]))
    for name in done["name"][:3]:
        figures.fig7_galaxy(Path(RESULTS) / name)
        figures.fig11_maps_residuals(Path(RESULTS) / name)
else:
    print("set RESULTS to a klever-nb sample folder to draw Figs 5, 7 and 11")
"""),
    SHUTDOWN,
]


# ---------------------------------------------------------------------------
# Voila explorer
# ---------------------------------------------------------------------------
EXPLORER = [
    md("""
# klever_nb explorer: click a spaxel

A mock KMOS galaxy at z = 1.4 (three bands). Choose a line and what to map; click a spaxel to
see its spectrum, the OH sky mask and the fitted model, and the fitted lines.
"""),
    code("""
from klever_nb import demo
from klever_nb.widgets import LineFitExplorer

galaxy = demo.demo_galaxy(0, progress=False)   # cached on disk (klever_nb.demo)
explorer = LineFitExplorer(galaxy.cubes, line="Halpha", quantity="flux")
explorer.widget
"""),
]


# ---------------------------------------------------------------------------
# Workshop: exercises with gaps, and their solved twins, from one source
# ---------------------------------------------------------------------------
def gap(stub: str, solution: str) -> dict:
    """A cell the learner fills: ``stub`` in the exercise, ``solution`` in the solved twin."""
    return {"gap": True, "stub": stub.strip("\n"), "solution": solution.strip("\n")}


def workshop_cells(cells: list, *, solved: bool) -> list:
    out = []
    for cell in cells:
        if isinstance(cell, dict) and cell.get("gap"):
            new = code(cell["solution"] if solved else cell["stub"])
            new.metadata["tags"] = ["solution" if solved else "exercise"]
            out.append(new)
        else:
            out.append(cell)
    return out


def workshop_intro(title: str, goal: str, terms: str) -> dict:
    return md(f"""
# Workshop — {title}

{goal}

Paper: {PAPER}. Cells marked **✎ your turn** have gaps (`...`): fill them and run; the solved
twin of this notebook is in `workshop/solutions/` (both are generated from the same source, so
they never drift apart). The data are the cached demo galaxies of `klever_nb.demo`.

**Terms**: {terms}
""")


WS_LINE = [
    workshop_intro(
        "fit an emission line by hand, then compare with the batched fitter",
        "K20 §3.1 fits every spaxel with Gaussians plus a linear continuum. Here you fit Hα in one "
        "spaxel with `scipy.optimize.curve_fit`, and compare flux, centre and width with "
        "`klever_nb.fitting.fit_cube`, which fits all 576 spaxels at once (tied [NII], OH sky "
        "channels masked, inverse-noise weights).",
        "flux density in 10⁻²⁰ erg s⁻¹ cm⁻² Å⁻¹, wavelengths in vacuum µm; the line flux is the "
        "area of the Gaussian, $F = A\\,\\sigma_\\lambda\\sqrt{2\\pi}$ (×10⁴ Å/µm)."),
    code("""
import matplotlib.pyplot as plt
import numpy as np
from scipy.optimize import curve_fit

from klever_nb import constants, demo, fitting

galaxy = demo.demo_galaxy(0)
cube = galaxy.cubes["H"].to_dataset()
z = galaxy.redshift
halpha_um = constants.LINES["Halpha"].wave_vac / 1e4 * (1 + z)   # observed, µm
snr = galaxy.line_maps["snr"].sel(line="Halpha").values
y, x = np.unravel_index(np.nanargmax(snr), snr.shape)   # the brightest Hα spaxel
window = np.abs(cube.wave.values - halpha_um) < 0.0025     # ±7σ: no [NII] inside
wave = cube.wave.values[window]
flux = cube.flux.values[window, y, x]
noise = cube.noise.values[window, y, x]
good = np.isfinite(flux) & np.isfinite(noise) & (noise > 0)      # masked sky channels are NaN
print(f"Hα expected at {halpha_um:.5f} µm; {good.sum()} usable channels of {window.sum()}")
"""),
    md("## ✎ your turn: the model and the fit\n\nA Gaussian plus a straight line; fit with "
       "`sigma=noise` so the channels are weighted by their noise."),
    gap("""
def model(w, amp, centre, sigma, c0, c1):
    return ...   # a Gaussian of amplitude amp, plus c0 + c1 * (w - halpha_um)

p0 = [np.nanmax(flux), halpha_um, 3e-4, 0.0, 0.0]
params, cov = ...  # curve_fit(...)
""", """
def model(w, amp, centre, sigma, c0, c1):
    return amp * np.exp(-0.5 * ((w - centre) / sigma) ** 2) + c0 + c1 * (w - halpha_um)

p0 = [np.nanmax(flux), halpha_um, 3e-4, 0.0, 0.0]
params, cov = curve_fit(model, wave[good], flux[good], p0=p0, sigma=noise[good],
                        absolute_sigma=True)
"""),
    md("## ✎ your turn: the flux, its error, the velocity"),
    gap("""
amp, centre, sigma = params[:3]
flux_hand = ...        # area of the Gaussian in 1e-20 erg/s/cm2 (wavelengths are in µm)
flux_hand_err = ...    # propagate cov (amp and sigma)
velocity_hand = ...    # km/s relative to z
""", """
amp, centre, sigma = params[:3]
flux_hand = amp * sigma * np.sqrt(2 * np.pi) * 1e4
var = (sigma ** 2 * cov[0, 0] + amp ** 2 * cov[2, 2] + 2 * amp * sigma * cov[0, 2])
flux_hand_err = np.sqrt(var * 2 * np.pi) * 1e4
velocity_hand = (centre / halpha_um - 1) * constants.C_KMS
"""),
    code("""
batched = fitting.fit_cube(cube, redshift=z, lines=("NII_6548", "Halpha", "NII_6584"))
ha = batched.sel(line="Halpha").isel(y=y, x=x)
print(f"by hand : flux {flux_hand:8.1f} ± {flux_hand_err:5.1f}  velocity {velocity_hand:+6.1f} km/s")
print(f"batched : flux {float(ha.flux):8.1f} ± {float(ha.flux_err):5.1f}  velocity "
      f"{float(ha.velocity):+6.1f} km/s")
print(f"difference: {(flux_hand - float(ha.flux)) / float(ha.flux_err):+.2f} σ")
fig, ax = plt.subplots(figsize=(7, 3.2))
ax.step(wave, flux, where="mid", color="k", lw=0.8, label="data")
ax.plot(wave, model(wave, *params), "r", label="by hand")
ax.set_xlabel("observed wavelength [µm]")
ax.set_ylabel("flux density [1e-20 erg/s/cm²/Å]")
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
fig.tight_layout()
"""),
    md("""
**Questions.** Why do the two fluxes differ by less than their error? (Same data, same weights:
only the [NII] lines and the velocity tied between lines differ.) How long would 576 calls of
`curve_fit` take compared with `fit_cube`? Try `%timeit` on both.
"""),
    SHUTDOWN,
]

WS_POSTERIOR = [
    workshop_intro(
        "a metallicity posterior by hand, against the package's eq. (1)",
        "K20 eq. (1) turns observed strong-line ratios into a posterior on 12+log(O/H). You compute "
        "it on a grid for one pixel of the demo galaxy's source-plane map and compare its median "
        "and 16th/84th percentiles with `klever_nb.metallicity.metallicity_map`.",
        "R3 = [OIII]λ5007/Hβ, N2 = [NII]λ6584/Hα (log ratios); C20 = the Curti et al. 2020a "
        "calibrations, each a polynomial $\\log R(x)$ in $x$ = 12+log(O/H) − 8.69 with scatter "
        "$\\sigma_R$; flat prior over their validity range 7.6–8.9."),
    md(r"""
$$\chi^2(x) = \sum_i \frac{\left(\log R^{\rm obs}_i - \log R^{\rm exp}_i(x)\right)^2}
{\sigma^2_{{\rm obs},i} + \sigma^2_{R_i}}, \qquad P(x) \propto e^{-\chi^2(x)/2}$$
"""),
    code("""
import matplotlib.pyplot as plt
import numpy as np

from klever_nb import demo
from klever_nb.calibrations import get_calibration

galaxy = demo.demo_galaxy(0)
m = galaxy.metallicity
pixels = np.argwhere(m["all_diagnostics"].values & np.isfinite(m["oh"].values))
iy, ix = pixels[len(pixels) // 2]
names = [str(d) for d in m["diagnostic"].values]
obs = m["log_ratio"].values[:, iy, ix]
obs_err = m["log_ratio_err"].values[:, iy, ix]
cals = [get_calibration(d, set_name="C20") for d in names]
grid = np.arange(7.6, 8.9 + 5e-4, 0.001)
print(dict(zip(names, np.round(obs, 3))), "±", np.round(obs_err, 3))
"""),
    md("## ✎ your turn: χ², posterior, median and 1σ interval"),
    gap("""
chi2 = ...          # sum over the diagnostics, on `grid` (cal.log_ratio(grid), cal.sigma)
posterior = ...     # normalised so that it integrates to 1 over the grid
cdf = ...
oh_med, oh_lo, oh_hi = ...   # where the cdf crosses 0.5, 0.16, 0.84
""", """
chi2 = sum((o - cal.log_ratio(grid)) ** 2 / (e ** 2 + cal.sigma ** 2)
           for o, e, cal in zip(obs, obs_err, cals))
posterior = np.exp(-0.5 * (chi2 - chi2.min()))
posterior /= np.trapezoid(posterior, grid)
cdf = np.cumsum(posterior) * (grid[1] - grid[0])
cdf /= cdf[-1]
oh_med, oh_lo, oh_hi = np.interp([0.5, 0.16, 0.84], cdf, grid)
"""),
    code("""
pkg = [float(m[v].values[iy, ix]) for v in ("oh", "oh_lo", "oh_hi")]
print(f"by hand : {oh_med:.3f} [{oh_lo:.3f}, {oh_hi:.3f}]")
print(f"package : {pkg[0]:.3f} [{pkg[1]:.3f}, {pkg[2]:.3f}]")
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(grid, posterior, "k", label="posterior (by hand)")
ax.axvline(pkg[0], color="tab:red", label="package median")
ax.axvspan(pkg[1], pkg[2], color="tab:red", alpha=0.2, label="package 16–84 %")
ax.set_xlabel("12 + log(O/H)")
ax.set_ylabel("P(x)")
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
fig.tight_layout()
"""),
    md("""
**Questions.** Drop N2 (keep only R3): why does the posterior become double-peaked? (R3 is not
monotonic in metallicity.) What happens to the interval if you forget σ_R?
"""),
    SHUTDOWN,
]

WS_SMEARING = [
    workshop_intro(
        "measure a gradient and watch beam smearing flatten it",
        "K20 measure gradients on back-projected source-plane maps, blurred by the source-plane "
        "PSF (K20 §4.2, App. A). Here you build a toy disc with a known linear gradient, blur it "
        "with PSFs of growing size as the telescope would (flux-weighted), and measure the "
        "slope. Then compare with the demo galaxy, whose source-plane PSF is ~4 kpc.",
        "gradient = d(12+log O/H)/dr in dex/kpc; PSF FWHM; beam smearing = the mixing of "
        "neighbouring regions by the PSF; resolution class (K20 §4.2): resolved if the profile "
        "reaches twice the PSF size √(HWHM_x HWHM_y)."),
    code("""
import matplotlib.pyplot as plt
import numpy as np
from scipy.ndimage import gaussian_filter

from klever_nb import demo

pix = 0.1                                            # kpc per pixel
yy, xx = np.mgrid[-80:81, -80:81] * pix
r = np.hypot(xx, yy)
halpha = np.exp(-r / 1.2)                            # exponential disc, 1.2 kpc scale length
true_gradient, central = -0.04, 8.45                 # as the demo mock
oh_true = central + true_gradient * r
"""),
    md("## ✎ your turn: blur and measure"),
    gap("""
def observed_oh(fwhm_kpc):
    ...   # blur the Hα-weighted metallicity and Hα itself, return their ratio

def slope(oh_map, r_max=4.0):
    ...   # straight-line fit of oh_map against r for r < r_max (np.polyfit)
""", """
def observed_oh(fwhm_kpc):
    s = fwhm_kpc / 2.3548 / pix
    return gaussian_filter(halpha * oh_true, s) / gaussian_filter(halpha, s)

def slope(oh_map, r_max=4.0):
    inside = r < r_max
    return np.polyfit(r[inside], oh_map[inside], 1)[0]
"""),
    code("""
fwhms = [0.25, 0.5, 1.0, 2.0, 4.0]
measured = [slope(observed_oh(f)) for f in fwhms]
for f, g in zip(fwhms, measured):
    print(f"PSF FWHM {f:4.2f} kpc: measured {g:+.4f} dex/kpc ({g / true_gradient:.0%} of the truth)")
galaxy = demo.demo_galaxy(0)
s = galaxy.summary
psf_kpc = float(np.sqrt(np.prod(s["source_psf_fwhm_kpc"])))
print(f"demo galaxy: source-plane PSF {psf_kpc:.1f} kpc; paper's method "
      f"{s['gradient_dex_per_kpc']:+.3f}, forward model {s['gradient_forward_dex_per_kpc']:+.3f}, "
      f"truth {galaxy.truth['gradient_dex_per_kpc']:+.3f} dex/kpc")
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(fwhms, np.array(measured) / true_gradient, "o-")
ax.axvline(psf_kpc, color="tab:red", ls="--", label="demo galaxy's PSF")
ax.set_xlabel("PSF FWHM [kpc]")
ax.set_ylabel("measured / true gradient")
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
fig.tight_layout()
"""),
    md("""
**Questions.** Why does a PSF much smaller than the disc leave the slope intact? Why does the
forward model (blur the *model* and compare in the image plane) not suffer from this? Try a
steeper Hα profile (scale length 0.6 kpc).
"""),
    SHUTDOWN,
]

WORKSHOP = {"01_fit_a_line_by_hand": WS_LINE, "02_posterior_by_hand": WS_POSTERIOR,
            "03_gradient_and_beam_smearing": WS_SMEARING}


NOTEBOOKS = {
    "00_quickstart.ipynb": QUICKSTART,
    "01_line_fitting.ipynb": LINE_FITTING,
    "02_lens_reconstruction.ipynb": LENS,
    "03_metallicity_mcmc.ipynb": METALLICITY,
    "04_gradients_and_2d_maps.ipynb": GRADIENTS,
    "05_sample_figures.ipynb": SAMPLE_FIGURES,
    "explorer.ipynb": EXPLORER,
    **{f"workshop/{n}.ipynb": workshop_cells(c, solved=False) for n, c in WORKSHOP.items()},
    **{f"workshop/solutions/{n}.ipynb": workshop_cells(c, solved=True)
       for n, c in WORKSHOP.items()},
}


def build(cells: list) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = KERNEL
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(cells):
        cell["id"] = f"cell-{i:02d}"
    nb.cells = cells
    nbformat.validate(nb)
    return nb


def render(name: str) -> str:
    return nbformat.writes(build([nbformat.from_dict(c) for c in NOTEBOOKS[name]]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a notebook differs from what this script writes")
    parser.add_argument("names", nargs="*", help="notebooks to write (default: all)")
    args = parser.parse_args(argv)
    stale = []
    for name in args.names or NOTEBOOKS:
        text = render(name)
        path = HERE / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print("wrote", path)
    if stale:
        print("out of date:", ", ".join(stale), "- run python notebooks/build_notebooks.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``klever-nb`` command line (DESIGN.md "Command line").

User errors (:class:`klever_nb.errors.KleverError`) print one line to stderr and
exit with status 2, never a traceback; an unexpected failure is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import warnings
from pathlib import Path

from klever_nb import __version__
from klever_nb.errors import KleverError

EXIT_USER_ERROR = 2


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="build the embedded mock sample and run every stage on it",
                       description="Write the embedded mock galaxies (a lensed z~1.4 and an "
                       "unlensed z~2.2 galaxy, ...) and run every stage on each.")
    p.add_argument("--out", type=Path, default=Path("demo_output"),
                   help="output folder (default: demo_output)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the mocks (default 0)")
    p.add_argument("--force", action="store_true", help="rerun stages even if up to date")


def _add_mock(sub) -> None:
    p = sub.add_parser("mock", help="write mock galaxies (cubes, lens maps, TOML, truth.json)",
                       description="Write deterministic synthetic KMOS galaxies with known "
                       "truth: FITS cubes, deflection maps, galaxy.toml, truth.json, sample.toml.")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run every stage on one galaxy",
                       description="Fit the lines, reconstruct the source plane, derive the "
                       "metallicity map and the gradient of one galaxy; products go to "
                       "OUT/<name>/.")
    p.add_argument("galaxy", type=Path, help="galaxy TOML file")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="rerun stages even if up to date")
    p.add_argument("--method", choices=["default", "k20"], default=None,
                   help="k20: the paper's estimators everywhere (μ(Hα) image/source flux, "
                   "source PSF from the seeing alone); overrides [analysis] method")
    _add_sandbox(p)


def _add_sandbox(p) -> None:
    p.add_argument("--sandbox", type=Path, default=None, metavar="ROOT",
                   help="refuse any input path (after resolving .. and links) outside ROOT "
                   "(servers that run uploaded galaxy files)")


def _add_fit(sub) -> None:
    p = sub.add_parser("fit", help="fit the emission lines of any one IFU cube",
                       description="Fit the emission lines of one IFU cube (KMOS, SINFONI, "
                       "MUSE, JWST s3d, IRAF-style, MaNGA-style or a bare cube); writes "
                       "OUT/<cube stem>/line_maps.nc and summary.json.")
    p.add_argument("cube", type=Path, help="FITS cube")
    p.add_argument("--redshift", type=float, required=True, help="source redshift (>= 0)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--lines", default=None,
                   help="comma-separated line names (default: every catalogue line in the cube)")
    p.add_argument("--noise-kind", choices=["sigma", "variance", "inverse_variance"],
                   default=None, help="what the noise extension holds (default: from its name)")
    p.add_argument("--wavelength-medium", choices=["air", "vacuum"], default=None,
                   help="medium of the wavelength axis when the header does not say")
    p.add_argument("--resolving-power", type=float, default=None,
                   help="instrumental R (default: known per instrument and band)")
    p.add_argument("--smooth-fwhm", type=float, default=0.0,
                   help="spatial Gaussian smoothing FWHM in arcsec (default 0)")
    p.add_argument("--ifu", type=int, default=None, help="IFU number of a KMOS per-exposure file")
    p.add_argument("--scheduler", default=None,
                   help="fit spatial chunks on dask: 'local' (a local cluster) or a scheduler "
                   "address (default: in this process; the maps are the same)")
    p.add_argument("--workers", type=int, default=None,
                   help="workers of --scheduler local (default 2)")


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="run many galaxies (resumes; dask scheduler optional)",
                       description="Validate every galaxy of a sample TOML file (all problems "
                       "listed at once), run the valid ones (finished galaxies are skipped "
                       "on a rerun), report failures, and write OUT/sample.csv and "
                       "OUT/sample.nc. Exit status 1 when any galaxy is invalid or failed.")
    p.add_argument("sample", type=Path, help="sample TOML file")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--scheduler", default=None,
                   help="dask scheduler address, or 'local' for a local cluster "
                   "(default: run in this process)")
    p.add_argument("--workers", type=int, default=2,
                   help="workers of the local dask cluster (default 2)")
    p.add_argument("--method", choices=["default", "k20"], default=None,
                   help="overrides [analysis] method of every galaxy")
    p.add_argument("--force", action="store_true", help="rerun stages even if up to date")
    _add_sandbox(p)


def _add_figures(sub) -> None:
    p = sub.add_parser("figures", help="draw the paper's figures (PNG + PDF)",
                       description="Draw K20 Figs 4-11 from a sample results folder "
                       "(klever-nb sample --out DIR) and/or the paper's own tables shipped "
                       "with the package; every figure is written as PNG and PDF.")
    p.add_argument("--results", type=Path, default=None,
                   help="results folder of klever-nb sample (default: the paper's tables only)")
    p.add_argument("--out", type=Path, required=True, help="folder for the figures")
    p.add_argument("--no-paper", action="store_true",
                   help="do not draw the paper's tabulated galaxies beside the run's")


def _add_combine(sub) -> None:
    p = sub.add_parser("combine", help="align and combine per-exposure KMOS/SINFONI cubes",
                       description="Align per-exposure cubes on the reference star observed "
                       "on the same KMOS detector (header WCS without --reference-ifu) and "
                       "combine them by a sigma-clipped mean (K20 2.2); writes one cube "
                       "(DATA, NOISE, COVERAGE, EXPOSURES) with the provenance in its header.")
    p.add_argument("exposures", type=Path, nargs="+", help="per-exposure FITS files")
    p.add_argument("--ifu", type=int, default=None,
                   help="science IFU number (KMOS IFU.<n>.DATA); omit for SINFONI cubes")
    p.add_argument("--reference-ifu", type=int, default=None,
                   help="IFU of the reference star on the same detector")
    p.add_argument("--clip-sigma", type=float, default=3.0,
                   help="sigma-clipping threshold (default 3, as K20)")
    p.add_argument("--pixel-scale", type=float, default=None,
                   help="output pixel scale in arcsec (K20: 0.1; default: the input's)")
    p.add_argument("--out", type=Path, required=True, help="output cube (FITS)")


def _add_lab(sub) -> None:
    sub.add_parser("lab", help="open the notebooks in JupyterLab",
                   description="Start JupyterLab in the notebooks folder of this checkout.")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``klever-nb`` (every sub-command has ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="klever-nb",
        description="KMOS/SINFONI cubes of lensed galaxies -> line maps, source plane, "
        "metallicity maps and gradients (Curti et al. 2020).")
    parser.add_argument("--version", action="version", version=f"klever_nb {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_mock, _add_run, _add_fit, _add_sample, _add_figures,
                _add_combine, _add_lab):
        add(sub)
    return parser


def _cmd_demo(args) -> int:
    from klever_nb import pipeline
    from klever_nb.io import mockfiles

    sample = mockfiles.write_demo_sample(args.out / "inputs", seed=args.seed)
    results = pipeline.run_sample(sample, args.out / "products", force=args.force)
    print(f"demo inputs:   {(args.out / 'inputs').resolve()}")
    print(f"demo products: {(args.out / 'products').resolve()}")
    for name, summary_path in results.items():
        print(f"  {name}: {summary_path}")
    return 0


def _cmd_mock(args) -> int:
    from klever_nb.io import mockfiles

    sample = mockfiles.write_demo_sample(args.out, seed=args.seed)
    print(f"mock galaxies written; sample file: {sample}")
    return 0


def _cmd_run(args) -> int:
    from klever_nb import pipeline

    summary_path = pipeline.run_galaxy(args.galaxy, args.out, force=args.force,
                                       method=args.method, sandbox=args.sandbox)
    print(f"products: {summary_path.parent}")
    return 0


def _cmd_fit(args) -> int:
    from klever_nb import pipeline

    lines = tuple(s.strip() for s in args.lines.split(",")) if args.lines else None
    if args.workers is not None and args.scheduler != "local":
        raise KleverError("--workers needs --scheduler local")

    def fit(mapper=None):
        return pipeline.fit_single_cube(
            args.cube, redshift=args.redshift, out_dir=args.out, lines=lines,
            noise_kind=args.noise_kind, wavelength_medium=args.wavelength_medium,
            resolving_power=args.resolving_power, smooth_fwhm_arcsec=args.smooth_fwhm,
            ifu=args.ifu, mapper=mapper)

    if args.scheduler is None:
        out = fit()
    else:
        from klever_nb.fitting.parallel import dask_mapper

        with dask_mapper(args.scheduler, workers=args.workers,
                         progress=sys.stderr.isatty()) as mapper:
            out = fit(mapper)
    print(f"line maps: {out / 'line_maps.nc'}")
    print(f"summary:   {out / 'summary.json'}")
    return 0


def _cmd_sample(args) -> int:
    from klever_nb import sample_run

    if args.workers < 1:
        raise KleverError(f"--workers must be >= 1, got {args.workers}")
    if args.sandbox is not None:  # every galaxy file and its inputs below ROOT
        from klever_nb.config import ConfigError, check_sandbox, load_galaxy, load_sample

        root = args.sandbox.resolve()
        if not args.sample.resolve().is_relative_to(root):
            raise ConfigError(f"{args.sample}: the sample file lies outside the sandbox {root}")
        for galaxy in load_sample(args.sample):
            if not galaxy.is_relative_to(root):
                raise ConfigError(f"{args.sample}: galaxy file {galaxy} lies outside the "
                                  f"sandbox {root}")
            try:
                cfg = load_galaxy(galaxy)
            except ConfigError:
                continue  # an invalid galaxy is reported (and skipped) by the sample run
            check_sandbox(cfg, root)

    def report(line: str) -> None:
        print(f"klever-nb sample: {line}", file=sys.stderr, flush=True)

    result = sample_run.run_sample(args.sample, args.out, force=args.force,
                                   scheduler=args.scheduler, workers=args.workers,
                                   method=args.method, report=report)
    counts = {s: sum(r["status"] == s for r in result.rows) for s in sample_run.STATUSES}
    print(f"{len(result.rows)} galaxies: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    print(f"sample table: {result.csv} and {result.netcdf}")
    return 1 if result.failed else 0


def _cmd_figures(args) -> int:
    from klever_nb import figures

    written = figures.write_figures(args.out, results=args.results, paper=not args.no_paper)
    for path in written:
        print(path)
    return 0


def _cmd_combine(args) -> int:
    from klever_nb.errors import ConfigError
    from klever_nb.io.combine import combine_exposures, write_combined_cube

    if args.out.suffix.lower() not in (".fits", ".fit", ".fts"):
        raise ConfigError(f"--out {args.out}: give a .fits file name")
    if args.out.is_dir():
        raise ConfigError(f"--out {args.out}: is a folder; give the output cube's file name")
    cube = combine_exposures(args.exposures, ifu=args.ifu, reference_ifu=args.reference_ifu,
                             clip_sigma=args.clip_sigma, pixel_scale=args.pixel_scale)
    path = write_combined_cube(cube, args.out)
    print(f"alignment: {cube.attrs['alignment']}; {cube.attrs['n_exposures']} of "
          f"{cube.sizes['exposure']} exposures combined")
    print(f"{'exposure':40s} {'status':8s} {'dx':>8s} {'dy':>8s} {'err_x':>7s} {'err_y':>7s} "
          f"{'clipped':>7s}   (shifts in arcsec along the pixel axes)")
    for i in range(cube.sizes["exposure"]):
        values = [float(cube[v].values[i]) for v in ("shift_x", "shift_y", "shift_x_err",
                                                      "shift_y_err")]
        line = (f"{Path(str(cube['file'].values[i])).name:40s} {cube['status'].values[i]:8s} "
                + " ".join(f"{v:8.4f}" if k < 2 else f"{v:7.4f}" for k, v in enumerate(values))
                + f" {int(cube['n_clipped'].values[i]):7d}")
        if cube["reason"].values[i]:
            line += f"  ({cube['reason'].values[i]})"
        print(line)
    print(f"combined cube: {path}")
    return 0


def _cmd_lab(args) -> int:
    notebooks = Path(__file__).resolve().parents[1] / "notebooks"
    if not notebooks.is_dir():
        raise KleverError(f"{notebooks}: notebooks folder not found (klever-nb lab needs a "
                          "source checkout)")
    return subprocess.call([sys.executable, "-m", "jupyter", "lab", f"--notebook-dir={notebooks}"])


COMMANDS = {"demo": _cmd_demo, "mock": _cmd_mock, "run": _cmd_run, "fit": _cmd_fit,
            "sample": _cmd_sample, "figures": _cmd_figures, "combine": _cmd_combine,
            "lab": _cmd_lab}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``klever-nb``; returns the exit status."""
    args = build_parser().parse_args(argv)

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"klever-nb {args.command}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        if not os.environ.get("KLEVER_NB_SHOW_WARNINGS"):
            warnings.filterwarnings("ignore", category=RuntimeWarning)  # NaN arithmetic
        warnings.showwarning = one_line_warning
        try:
            return COMMANDS[args.command](args)
        except KleverError as err:
            print(f"klever-nb {args.command}: error: {err}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print(f"klever-nb {args.command}: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

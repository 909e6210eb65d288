"""klever_nb.figures: every sample figure from the paper's tables and from a results folder;
klever-nb figures writes PNG + PDF."""

from __future__ import annotations

import json
import shutil

import matplotlib
import pytest

matplotlib.use("Agg")

from klever_nb import cli, figures, mock, sample, sample_run  # noqa: E402
from klever_nb.io import mockfiles


def test_figures_from_the_paper_tables_carry_captions():
    k20 = sample.derive(sample.k20_table())
    for fig in (figures.fig6_sfr_mass_mzr(None), figures.fig8_gradient_vs_redshift(None),
                figures.fig4_mu_spread(k20)):
        text = " ".join(t.get_text() for t in fig.texts)
        assert "K20" in text
        assert fig.axes
    cs = sample.correlation_sample(sample.k20_table())
    corr = sample.correlations(cs, n_boot=20)
    fig9 = figures.fig9_gradient_vs_ssfr_mass(None, correlations=corr)
    assert len(fig9.axes) == 2
    assert "Huber" in " ".join(t.get_text() for t in fig9.texts)
    fig10 = figures.fig10_gradient_vs_dsfms(None, correlations=corr)
    assert len(fig10.axes) == 3


@pytest.mark.slow
def test_klever_nb_figures_from_a_results_folder(tmp_path):
    spec = mock.MockSpec(name="tinyfig", redshift=1.4, bands=("YJ", "H"), shape=(12, 12),
                         log_mstar=9.6, seed=5, snr_halpha_peak=40.0)
    toml = mockfiles.write_mock(mock.make_mock(spec), tmp_path / "in" / "tinyfig")
    toml.write_text(toml.read_text() + "\n[analysis]\nforward_gradient = false\n")
    (tmp_path / "in" / "sample.toml").write_text('galaxies = ["tinyfig/galaxy.toml"]\n')
    results = tmp_path / "results"
    res = sample_run.run_sample(tmp_path / "in" / "sample.toml", results)
    assert res.rows[0]["status"] == "done", res.rows[0]["error"]
    out = tmp_path / "figs"
    assert cli.main(["figures", "--results", str(results), "--out", str(out)]) == 0
    for stem in ("fig04_mu_spread", "fig05_bpt", "fig06_sfr_mass_mzr", "fig07_tinyfig",
                 "fig08_gradient_vs_z", "fig09_gradient_vs_ssfr_mass",
                 "fig10_gradient_vs_dsfms", "fig11_tinyfig"):
        for ext in ("png", "pdf"):
            assert (out / f"{stem}.{ext}").stat().st_size > 1000, stem
    corr = json.loads((out / "correlations.json").read_text())
    assert corr["log_ssfr"]["n"] >= 160
    shutil.rmtree(out)
    # only the run, without the paper's tables
    assert cli.main(["figures", "--results", str(results), "--out", str(out),
                     "--no-paper"]) == 0
    assert cli.main(["figures", "--results", str(tmp_path / "nothing"), "--out",
                     str(out)]) == 2

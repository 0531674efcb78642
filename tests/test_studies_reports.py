"""Report plug-ins (amortlab.studies.reports): a study's ``reports:`` picks them by short name or by ``_target_``;
an unknown name is a readable error; a study without ``reports:`` writes only the generic outputs."""
import json
from pathlib import Path

import pytest

from amortlab.studies.cli import main
from amortlab.studies.reports import REPORTS, build_reports
from amortlab.studies.reports.gaps import GapsReport
from amortlab.studies.spec import SweepError

GENERIC = {"table.csv", "table.md", "study.json", "nll_vs_strength.png"}


class SettingsReport:
    """A report defined outside the package: one line per setting into ``<file>``."""

    name = "settings_list"

    def __init__(self, file: str = "settings.txt", prefix: str = "-"):
        self.file, self.prefix = file, prefix

    def write(self, rows, out_dir: Path) -> dict[str, Path]:
        path = out_dir / self.file
        path.write_text("".join(f"{self.prefix} {r['setting']} {r['n_seeds']}\n" for r in rows))
        return {self.file: path}


def gap_runs(out: Path) -> None:
    """Two settings, one seed, two methods, with the gap metrics: what the old hard-coded gaps and methods reports
    would have fired on."""
    for sid, method, amort in (("a", "amortized", 1.5), ("b", "sa_vae", 3.0)):
        d = out / "runs" / sid / "seed0"
        d.mkdir(parents=True)
        metrics = {"test/nll": 90.0, "test/neg_elbo": 95.0, "test/gap/log_px": -90.0, "test/gap/L_q": -91.2 - amort,
                   "test/gap/approximation": 1.2, "test/gap/amortization": amort, "test/gap/inference": 1.2 + amort}
        axes = {"method": method, "regularizer": "none", "strength": None, "k": 1}
        (d / "results.json").write_text(json.dumps({"status": "ok", "metrics": metrics, "axes": axes}))


def study_file(tmp_path: Path, reports: str | None) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text("name: plug\nsettings:\n  - {id: a, inference: amortized}\n  - {id: b, inference: sa_vae}\n"
                    + (f"reports: {reports}\n" if reports is not None else ""))
    return path


def collect_only(tmp_path: Path, reports: str | None) -> tuple[int, Path]:
    out = tmp_path / "out"
    gap_runs(out)
    rc = main([f"study_file={study_file(tmp_path, reports)}", f"out_dir={out}", "collect_only=true"])
    return rc, out


def files(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if p.is_file()}


def test_reports_by_short_name_and_by_target(tmp_path, capsys):
    rc, out = collect_only(tmp_path, "[gaps, {_target_: tests.test_studies_reports.SettingsReport, file: s.txt, "
                                     "prefix: '*'}]")
    assert rc == 0
    assert files(out) == GENERIC | {"gaps.md", "gaps.png", "s.txt"}  # no methods report: the study did not ask
    assert (out / "s.txt").read_text() == "* a 1\n* b 1\n"
    assert "| Amortization | 1.50 | 3.00 |" in (out / "gaps.md").read_text()
    assert "wrote " in capsys.readouterr().out
    manifest = json.loads((out / "study.json").read_text())
    assert manifest["reports"] == ["gaps", {"_target_": "tests.test_studies_reports.SettingsReport", "file": "s.txt",
                                            "prefix": "*"}]


def test_study_without_reports_writes_only_the_generic_outputs(tmp_path):
    rc, out = collect_only(tmp_path, None)
    assert rc == 0 and files(out) == GENERIC
    assert json.loads((out / "study.json").read_text())["reports"] == []


def test_unknown_report_is_a_readable_error(tmp_path, capsys):
    rc, out = collect_only(tmp_path, "[gaps, gapz]")
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown report 'gapz'" in err and "_target_" in err
    assert "Known reports: bound_vs_k, gaps, methods, nll_vs_time" in err
    assert not (out / "table.md").exists()  # nothing written

    with pytest.raises(SweepError, match="cannot be built.*no_such_module"):
        build_reports([{"_target_": "no_such_module.Report"}])
    with pytest.raises(SweepError, match="neither a report name nor a mapping with _target_"):
        build_reports([{"file": "x"}])
    rc = main([f"study_file={study_file(tmp_path, 'gaps')}", "collect_only=true"])
    assert rc == 2 and "'reports' must be a list" in capsys.readouterr().err


def test_registered_reports_are_built_by_name():
    assert set(REPORTS) == {"gaps", "methods", "bound_vs_k", "nll_vs_time", "sequence"}
    built = build_reports(list(REPORTS))
    assert [r.name for r in built] == list(REPORTS)
    assert isinstance(built[0], GapsReport)
    assert build_reports([]) == []


def test_nll_vs_time_report_names_the_best_on_each_axis_and_the_front(tmp_path):
    """Four settings (two seeds each): the table's means and stds against the per-seed values written here, the
    best-NLL / fastest settings, and the Pareto front computed by hand (c is beaten on both axes by a)."""
    from amortlab.studies.reports.tradeoff import NLLvsTimeReport, pareto
    out = tmp_path / "out"
    per_seed = {"a": ([90.0, 91.0], [0.001, 0.001]), "b": ([88.0, 88.5], [0.010, 0.012]),
                "c": ([92.0, 93.0], [0.002, 0.002]), "d": ([87.0, 87.2], [0.100, 0.100])}
    for sid, (nlls, times) in per_seed.items():
        for seed, (nll, t) in enumerate(zip(nlls, times)):
            d = out / "runs" / sid / f"seed{seed}"
            d.mkdir(parents=True)
            metrics = {"test/nll": nll, "test/infer_seconds": t}
            axes = {"method": "amortized" if sid != "b" else "sa_vae", "regularizer": "none", "strength": None, "k": 1}
            (d / "results.json").write_text(json.dumps({"status": "ok", "metrics": metrics, "axes": axes,
                                                        "config": {"seed": seed}}))
    path = tmp_path / "study.yaml"
    path.write_text("name: t\nseeds: [0, 1]\nsettings:\n" + "".join(f"  - {{id: {s}, inference: amortized}}\n"
                                                                   for s in per_seed)
                    + "metrics: [test/nll, test/infer_seconds]\nreports: [nll_vs_time]\n")
    assert main([f"study_file={path}", f"out_dir={out}", "collect_only=true"]) == 0
    text = (out / "nll_vs_time.md").read_text()
    assert "| a | amortized | 2 | 90.50 ± 0.71 | 1.000 ± 0.000 | yes |" in text
    assert "| c | amortized | 2 | 92.50 ± 0.71 | 2.000 ± 0.000 |  |" in text
    assert "Best NLL: d. Fastest inference: a. Not beaten on both axes: a, b, d." in text
    assert (out / "nll_vs_time.png").stat().st_size > 0
    assert pareto([("x", 1.0, 5.0), ("y", 1.0, 5.0), ("z", 2.0, 4.0)]) == ["x", "y", "z"]  # ties beat nobody
    assert NLLvsTimeReport().write([], out) == {}


def test_sequence_report_gives_per_step_numbers_and_the_elbo_after_each_update(tmp_path):
    """A direct filter and an AVF with 2 updates (two seeds each, 10 steps per sequence): the per-step cells against
    means / stds of the per-seed values written here, the -ELBO per step after each update (per-sequence values / 10)
    and the best / fastest settings."""
    from amortlab.studies.reports.sequence import SequenceReport
    out = tmp_path / "out"
    runs = {"filt": [{"test/nll_per_step": 50.0, "test/neg_elbo_per_step": 52.0, "test/infer_seconds_per_step": 1e-4},
                     {"test/nll_per_step": 51.0, "test/neg_elbo_per_step": 53.0, "test/infer_seconds_per_step": 1e-4}],
            "avf2": [{"test/nll_per_step": 49.0, "test/neg_elbo_per_step": 50.0, "test/infer_seconds_per_step": 3e-4,
                      "test/neg_elbo_step/0": 600.0, "test/neg_elbo_step/1": 510.0, "test/neg_elbo_step/2": 500.0},
                     {"test/nll_per_step": 49.0, "test/neg_elbo_per_step": 50.0, "test/infer_seconds_per_step": 3e-4,
                      "test/neg_elbo_step/0": 620.0, "test/neg_elbo_step/1": 530.0, "test/neg_elbo_step/2": 500.0}]}
    for sid, seeds in runs.items():
        for seed, metrics in enumerate(seeds):
            d = out / "runs" / sid / f"seed{seed}"
            d.mkdir(parents=True)
            axes = {"method": "filtering" if sid == "filt" else "avf", "regularizer": "none", "strength": None, "k": 1}
            (d / "results.json").write_text(json.dumps({"status": "ok", "metrics": {**metrics, "test/steps": 10.0},
                                                        "axes": axes, "config": {"seed": seed}}))
    path = tmp_path / "study.yaml"
    names = sorted({k for seeds in runs.values() for m in seeds for k in m} | {"test/steps"})
    path.write_text("name: t\nseeds: [0, 1]\nsettings:\n  - {id: filt, inference: filtering}\n"
                    "  - {id: avf2, inference: avf}\n" + f"metrics: [{', '.join(names)}]\nreports: [sequence]\n")
    assert main([f"study_file={path}", f"out_dir={out}", "collect_only=true"]) == 0
    text = (out / "sequence.md").read_text()
    assert "| filt | filtering | 2 | 50.50 ± 0.71 | 52.50 ± 0.71 | 0.100 ± 0.000 | – | – | – |" in text
    row = ("| avf2 | avf | 2 | 49.00 ± 0.00 | 50.00 ± 0.00 | 0.300 ± 0.000 | 61.00 ± 1.41 | 52.00 ± 1.41 "
           "| 50.00 ± 0.00 |")
    assert row in text
    assert "Lowest -log p(x) per step: avf2. Fastest inference: filt." in text
    assert (out / "sequence.png").stat().st_size > 0
    assert SequenceReport().write([], out) == {}

"""Studies (amortlab.studies, sweep.py): study expansion, collection into tables/plots, launch planning, the command
line, and a tiny study run end to end through Hydra multirun (one run failing with a NaN loss, one run killing its
process). The report plug-in mechanism is tested in test_studies_reports.py."""
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from amortlab.studies.cli import main
from amortlab.studies.collect import collect
from amortlab.studies.expand import Setting, expand, setting_yaml
from amortlab.studies.launch import launch_command, plan_launches
from amortlab.studies.overrides import override_value
from amortlab.studies.report import write_report
from amortlab.studies.reports import build_reports
from amortlab.studies.spec import SweepError, available_studies, load_study
from tests.conftest import ROOT

TINY_BASE = "[logger=none, trainer.max_epochs=1, importance_samples.test=20, evaluation.val=false]"


def write_study(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def run_sweep(*args: str, check_rc: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(ROOT / "sweep.py"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    if check_rc is not None and proc.returncode != check_rc:
        raise AssertionError(f"sweep.py exited {proc.returncode}, expected {check_rc}:\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {r["setting"]: r for r in csv.DictReader(f)}


def fake_run(out: Path, setting: str, seed: int, *, status="ok", metrics=None, axes=None, error=None) -> Path:
    d = out / "runs" / setting / f"seed{seed}"
    d.mkdir(parents=True)
    if status is not None:
        res = {"status": status, "metrics": metrics or {}, "axes": axes or {}}
        if error:
            res["error"] = error
        (d / "results.json").write_text(json.dumps(res))
    return d


# ---------------------------------------------------------------------------------------------------------------
# units: no training
# ---------------------------------------------------------------------------------------------------------------

def test_collect_groups_seeds_and_counts_failures(tmp_path):
    den = lambda s: {"method": "amortized", "regularizer": "denoising", "strength": s, "k": 8}  # noqa: E731
    none = {"method": "amortized", "regularizer": "none", "strength": None, "k": 8}
    for seed, nll in zip((0, 1, 2), (90.0, 91.0, 95.0)):
        fake_run(tmp_path, "none_k8", seed, metrics={"test/nll": nll, "test/inference_gap": nll / 10}, axes=none)
    fake_run(tmp_path, "denoising_sigma0.2_k8", 0, metrics={"test/nll": 88.5, "test/inference_gap": 5.0},
             axes=den(0.2))
    fake_run(tmp_path, "denoising_sigma0.2_k8", 1, status="failed", error="loss became nan", axes=den(0.2))
    fake_run(tmp_path, "denoising_sigma0.2_k8", 2, status=None)  # crashed: a run dir without results.json
    fake_run(tmp_path, "denoising_sigma0.1_k8", 0, metrics={"test/nll": 89.0, "test/inference_gap": 5.5},
             axes=den(0.1))
    fake_run(tmp_path, "denoising_sigma0.1_k8", 1, metrics={"test/nll": 89.5, "test/inference_gap": 6.0},
             axes=den(0.1))
    fake_run(tmp_path, "denoising_sigma0.1_k1", 0, metrics={"test/nll": 92.0, "test/inference_gap": 7.0},
             axes={**den(0.1), "k": 1})

    rows = collect(tmp_path)
    by = {r["setting"]: r for r in rows}
    assert [r["setting"] for r in rows] == ["denoising_sigma0.1_k1", "none_k8", "denoising_sigma0.1_k8",
                                            "denoising_sigma0.2_k8"]  # by k, unregularized first, strength
    r = by["none_k8"]
    assert (r["n_seeds"], r["n_failed"], r["seeds"]) == (3, 0, [0, 1, 2])
    assert r["test/nll_mean"] == pytest.approx(statistics.fmean([90, 91, 95]))
    assert r["test/nll_std"] == pytest.approx(statistics.stdev([90, 91, 95]))  # n - 1
    assert r["test/nll_std"] == pytest.approx(7 ** 0.5)  # (4 + 1 + 9) / 2
    r = by["denoising_sigma0.2_k8"]
    assert (r["n_seeds"], r["n_failed"]) == (1, 2)
    assert r["test/nll_mean"] == 88.5 and r["test/nll_std"] is None  # one value: no std
    assert (r["regularizer"], r["strength"], r["k"]) == ("denoising", 0.2, 8)
    msgs = {seed: msg for seed, msg, _ in r["failures"]}
    assert "loss became nan" in msgs[1] and "no results.json" in msgs[2]

    # expected pairs: only those settings/seeds are read; a pair that never started counts as failed
    rows = collect(tmp_path, expected={"none_k8": [0, 1], "new_k8": [0]})
    by = {r["setting"]: r for r in rows}
    assert set(by) == {"none_k8", "new_k8"}
    assert by["none_k8"]["n_seeds"] == 2 and by["none_k8"]["test/nll_mean"] == pytest.approx(90.5)
    assert (by["new_k8"]["n_seeds"], by["new_k8"]["n_failed"]) == (0, 1)

    rows = collect(tmp_path)
    written = write_report(tmp_path, rows, ["test/nll", "test/inference_gap"], select_by="test/nll")
    assert {"table.csv", "table.md", "failures.md", "best.md", "nll_vs_strength.png", "gap_vs_strength.png"} <= set(
        written)
    table = read_csv(tmp_path / "table.csv")
    assert table["none_k8"]["n_seeds"] == "3" and table["denoising_sigma0.2_k8"]["n_failed"] == "2"
    assert float(table["none_k8"]["test/nll_std"]) == pytest.approx(statistics.stdev([90, 91, 95]))
    assert table["denoising_sigma0.2_k8"]["test/nll_std"] == ""
    assert table["denoising_sigma0.1_k8"]["strength"] == "0.1" and table["none_k8"]["strength"] == ""
    md = (tmp_path / "table.md").read_text()
    assert f"| none_k8 | amortized | none | – | 8 | 3 | 0 | 92.00 ± {statistics.stdev([90, 91, 95]):.2f} |" in md
    assert "| 88.50 |" in md
    assert "loss became nan" in (tmp_path / "failures.md").read_text()
    best = (tmp_path / "best.md").read_text()
    assert "denoising_sigma0.2_k8" in best and "denoising_sigma0.1_k1" in best and "none_k8" in best
    for png in ("nll_vs_strength.png", "gap_vs_strength.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_gap_study_report(tmp_path):
    """The gaps report: runs with evaluation=gaps get gaps.md (Cremer et al.'s layout, a column per setting) and
    stacked bars."""
    axes = {"method": "amortized", "regularizer": "none", "strength": None, "k": 1}
    for setting, amort in (("ffg", 1.5), ("no_annealing", 3.0)):
        for seed, jitter in ((0, 0.0), (1, 0.2)):
            m = {"test/nll": 90.0, "test/gap/log_px": -90.0, "test/gap/L_qstar_flow": -90.8,
                 "test/gap/L_qstar_ffg": -91.2, "test/gap/L_q": -91.2 - amort - jitter,
                 "test/gap/approximation": 1.2, "test/gap/amortization": amort + jitter,
                 "test/gap/inference": 1.2 + amort + jitter}
            fake_run(tmp_path, setting, seed, metrics=m, axes=axes)
    written = write_report(tmp_path, collect(tmp_path), reports=build_reports(["gaps"]))
    assert {"gaps.md", "gaps.png"} <= set(written)
    md = (tmp_path / "gaps.md").read_text()
    assert "| | ffg | no_annealing |" in md and "| Amortization | 1.60 | 3.10 |" in md and "| L[q*_FFG] | -91.20" in md
    assert (tmp_path / "gaps.png").read_bytes()[:4] == b"\x89PNG"


def test_methods_study_report(tmp_path):
    """The methods and bound_vs_k reports: methods.md (NLL, bounds, time per point) and the bound-vs-K plot."""
    base = {"regularizer": "none", "strength": None, "k": 1}
    runs = {"vae": ({"method": "amortized"}, 95.0, 101.0, None),
            "sa_vae_k10": ({"method": "sa_vae", "K": 10}, 94.0, 99.0, 103.0),
            "sa_vae_k20": ({"method": "sa_vae", "K": 20}, 93.5, 98.0, 103.5),
            "iterative_t5": ({"method": "iterative", "T": 5}, 96.0, 100.0, 120.0)}
    for sid, (axes, nll, elbo, enc) in runs.items():
        m = {"test/nll": nll, "test/neg_elbo": elbo, "test/infer_seconds": 0.002}
        if enc is not None:
            m["test/neg_elbo_encoder"] = enc
        fake_run(tmp_path, sid, 0, metrics=m, axes={**base, **axes})
    rows = collect(tmp_path)
    assert {r["setting"]: r["steps"] for r in rows}["sa_vae_k20"] == ("K", 20)
    written = write_report(tmp_path, rows, reports=build_reports(["methods", "bound_vs_k"]))
    assert {"methods.md", "methods.png", "bound_vs_K.png"} <= set(written)
    md = (tmp_path / "methods.md").read_text()
    assert "| sa_vae_k20 | sa_vae (K=20) | 1 | 93.50 | 98.00 | 103.50 |" in md and "| 2.000 |" in md
    assert "| vae | amortized | 1 | 95.00 | 101.00 | – |" in md
    # one method only: no methods report
    other = tmp_path / "single"
    fake_run(other, "vae", 0, metrics={"test/nll": 90.0}, axes={**base, "method": "amortized"})
    assert "methods.md" not in write_report(other, collect(other), reports=build_reports(["methods"]))


def test_collect_falls_back_to_config_for_axes(tmp_path):
    d = fake_run(tmp_path, "old_k5", 0, metrics={"test/nll": 80.0}, axes=None)
    res = json.loads((d / "results.json").read_text())
    del res["axes"]
    res["config"] = {"importance_samples": {"train": 5},
                     "encoder_regularizer": {"_target_": "amortlab.regularizers.EncoderRegularizer"}}
    (d / "results.json").write_text(json.dumps(res))
    crashed = fake_run(tmp_path, "old_k5", 1, status=None)
    (crashed / ".hydra").mkdir()
    (crashed / ".hydra" / "config.yaml").write_text("importance_samples: {train: 5}\n")
    [row] = collect(tmp_path)
    assert (row["k"], row["regularizer"], row["n_seeds"], row["n_failed"]) == (5, "none", 1, 1)


def test_malformed_records_are_listed_with_their_path_and_skipped(tmp_path):
    """A results.json holding a JSON list, invalid JSON, or status ok with a metric that is not a number: the run is
    listed as a failure naming the file and counts as neither finished nor in the means; the tables are written."""
    from amortlab.studies.layout import run_state

    axes = {"method": "amortized", "regularizer": "none", "strength": None, "k": 1}
    fake_run(tmp_path, "none_k1", 0, metrics={"test/nll": 90.0}, axes=axes)
    fake_run(tmp_path, "none_k1", 1, metrics={"test/nll": "abc"}, axes=axes)
    fake_run(tmp_path, "none_k1", 2, metrics={"test/nll": 96.0, "test/n_points": True}, axes=axes)
    as_list = fake_run(tmp_path, "none_k1", 3, status=None)
    (as_list / "results.json").write_text("[]")
    broken = fake_run(tmp_path, "none_k1", 4, status=None)
    (broken / "results.json").write_text('{"status": "ok", "metr')
    [row] = collect(tmp_path)
    assert (row["n_seeds"], row["seeds"], row["n_failed"]) == (1, [0], 4)
    assert row["test/nll_mean"] == 90.0  # the malformed runs' values are not averaged in
    why = {seed: msg for seed, msg, _ in row["failures"]}
    for seed in (1, 2, 3, 4):
        assert str(tmp_path / "runs" / "none_k1" / f"seed{seed}" / "results.json") in why[seed], why[seed]
    assert "'abc'" in why[1] and "malformed" in why[1] and "test/n_points" in why[2]
    assert "unreadable" in why[3] and "list" in why[3] and "unreadable" in why[4]
    written = write_report(tmp_path, [row])
    assert {"table.md", "table.csv", "failures.md"} <= set(written)
    assert written["failures.md"].read_text().count("results.json") == 4
    states = [run_state(tmp_path / "runs" / "none_k1" / f"seed{s}") for s in range(5)]
    assert states == ["ok", "failed", "failed", "failed", "failed"]  # never counted as finished


def test_expand_settings_grid_and_setting_file(tmp_path):
    study = load_study(study_file=write_study(tmp_path / "s.yaml", """
name: s
grid: {importance_samples: [k1, k8]}
settings:
  - {encoder_regularizer: none}
  - {encoder_regularizer: denoising, encoder_regularizer.alpha: 0.5, encoder_regularizer.sigma: [0.1, 0.2]}
  - {id: wni, encoder_regularizer: weight_norm, encoder_regularizer.H: [5.0], +callbacks.x.step: '${seed}'}
"""))
    settings = expand(study)
    assert [s.id for s in settings] == [
        "none_k1", "none_k8", "denoising_alpha0.5_sigma0.1_k1", "denoising_alpha0.5_sigma0.1_k8",
        "denoising_alpha0.5_sigma0.2_k1", "denoising_alpha0.5_sigma0.2_k8", "wni_H5_k1", "wni_H5_k8"]
    s = settings[5]
    assert s.series == "denoising_alpha0.5" and s.varied == ["encoder_regularizer.sigma"]
    assert s.overrides == {"encoder_regularizer": "denoising", "encoder_regularizer.alpha": 0.5,
                           "encoder_regularizer.sigma": 0.2, "importance_samples": "k8"}
    text = setting_yaml(s, "s", {"tags": ["study:s"]})
    assert text.startswith("# @package _global_\n")
    assert "  - override /encoder_regularizer: denoising\n  - override /importance_samples: k8\n" in text
    assert "encoder_regularizer:\n  alpha: 0.5\n  sigma: 0.2\n" in text and "- study:s" in text
    assert "callbacks:\n  x:\n    step: ${seed}\n" in setting_yaml(settings[-1], "s")

    study["settings"].append({"encoder_regularizer": "none"})
    with pytest.raises(SweepError, match="two settings get the id 'none_k1'"):
        expand(study)


def test_repository_studies_expand():
    names = available_studies()
    assert {"air_table1_mnist", "air_table1_mnist_reduced", "air_strength", "air_reduced", "gaps_reduced",
            "sa_vae_reduced", "sa_vae_omniglot_paper", "methods_reduced"} <= set(names)
    for name in names:
        study = load_study(name)
        settings = expand(study)
        assert len({s.id for s in settings}) == len(settings) > 0
        build_reports(study["reports"], where=name)  # every report the study names exists
        assert study["reports"] == {"gaps_reduced": ["gaps"], "gaps_annealing_reduced": ["gaps"],
                                    "methods_reduced": ["gaps", "methods", "bound_vs_k"],
                                    "sa_vae_reduced": ["methods", "bound_vs_k"],
                                    "sa_vae_omniglot_paper": ["methods", "bound_vs_k"],
                                    "hierarchy_reduced": ["methods"],
                                    "expressive_reduced": ["methods", "nll_vs_time"],
                                    "collapse_reduced": ["methods"], "avf_reduced": ["sequence"],
                                    "avf_music_paper": ["sequence"]}.get(name, []), name
        ks = {s.overrides.get("importance_samples") for s in settings}
        expected = {"air_reduced": {"k1"}, "air_strength": {"k1", "k8", "k64"}, "air_table1_mnist": {"k1", "k8", "k64"},
                    "air_table1_mnist_reduced": {"k1", "k8", "k64"},
                    "burda_table1_mnist2": {"k1", "k5", "k50"}}.get(name, {None})
        assert ks == expected, name


def test_repository_study_settings_build():
    """Every setting of every study in conf/sweep composes with its base and builds its method (no data, no run):
    a key an overlay sets that the chosen method does not take fails here, not hours into a sweep."""
    from amortlab.build import build_module, compose_config

    for name in available_studies():
        study = load_study(name)
        for s in expand(study):
            overrides = [*study.get("base", []), *(f"{k}={override_value(v)}" for k, v in s.overrides.items()),
                         "logger=none", "x_dim=784", "step_dim=88", "data_dir=/nonexistent"]
            module = build_module(compose_config(overrides))
            assert module.k_train >= 1, (name, s.id)


def test_plan_groups_by_seed_set_and_resumes_crashed_runs(tmp_path):
    pairs = [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 1), ("d", 0)]
    ckpt = tmp_path / "runs" / "d" / "seed0" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "last.ckpt").write_bytes(b"")
    launches = plan_launches(pairs, tmp_path)
    assert [(la.settings, la.seeds, la.resume_from) for la in launches] == [
        (["a", "b"], [0, 1], None), (["c"], [1], None), (["d"], [0], str(ckpt / "last.ckpt"))]
    cmd = launch_command(launches[0], tmp_path, ["logger=none"], "basic", [], "st")
    assert "+setting=a,b" in cmd and "seed=0,1" in cmd and "skip_if_done=true" in cmd
    assert "hydra.sweep.subdir=${hydra:runtime.choices.setting}/seed${seed}" in cmd


def test_plan_stacks_settings_that_differ_only_in_one_stackable_value(tmp_path):
    """A sigma grid and an H grid each become one job stacking values x seeds; a setting differing in two keys, one
    whose key is not stackable, a lone value, and a setting with other seeds to run stay seed-stacked jobs."""
    settings = [Setting("none", {"encoder_regularizer": "none"}, "none"),
                *(Setting(f"s{v}", {"encoder_regularizer": "denoising", "encoder_regularizer.sigma": v}, "d")
                  for v in (0.1, 0.4, 0.8)),
                Setting("s0.2a", {"encoder_regularizer": "denoising", "encoder_regularizer.sigma": 0.2,
                                  "encoder_regularizer.alpha": 0.5}, "d"),
                *(Setting(f"h{v}", {"encoder_regularizer": "weight_norm", "encoder_regularizer.H": v}, "w")
                  for v in (1.0, 2.0)),
                Setting("a0.5", {"encoder_regularizer": "denoising", "encoder_regularizer.alpha": 0.5}, "a"),
                Setting("a0.9", {"encoder_regularizer": "denoising", "encoder_regularizer.alpha": 0.9}, "a"),
                Setting("late", {"encoder_regularizer": "denoising", "encoder_regularizer.sigma": 1.6}, "d")]
    den, wni = frozenset({"encoder_regularizer.sigma", "optim.optimizer.lr"}), frozenset(
        {"encoder_regularizer.H", "optim.optimizer.lr"})
    stackable = {s.id: (wni if s.id.startswith("h") else den) for s in settings}
    pairs = [(s.id, seed) for s in settings for seed in ((0, 1) if s.id != "late" else (1,))]
    launches = plan_launches(pairs, tmp_path, True, stackable, settings)
    got = [(la.settings, la.seeds, la.stacked, la.key, la.values) for la in launches]
    assert (["s0.1", "s0.4", "s0.8"], [0, 1], True, "encoder_regularizer.sigma", [0.1, 0.4, 0.8]) in got
    assert (["h1.0", "h2.0"], [0, 1], True, "encoder_regularizer.H", [1.0, 2.0]) in got
    assert (["none", "s0.2a", "a0.5", "a0.9"], [0, 1], True, None, None) in got  # alpha is not stackable
    assert (["late"], [1], False, None, None) in got
    assert sum(len(la.pairs()) for la in launches) == len(pairs)
    cmd = launch_command(launches[[g[0] for g in got].index(["s0.1", "s0.4", "s0.8"])], tmp_path, [], "basic", [],
                         "st")
    assert "+setting=s0.1" in cmd and "stack.values=[0.1,0.4,0.8]" in cmd and "stack.labels=[s0.1,s0.4,s0.8]" in cmd
    assert f"stack.root={tmp_path / 'runs'}" in cmd and "stack.seeds=[0,1]" in cmd


def test_bad_arguments_and_dry_run(tmp_path, capsys):
    assert main(["study=no_such_study"]) == 2
    err = capsys.readouterr().err
    assert "No study 'no_such_study'" in err and "air_strength" in err and "study_file=" in err
    assert main(["study=air_strength", "seed=3"]) == 2
    assert "seeds=[0,1" in capsys.readouterr().err
    assert main(["study=air_strength", "oops"]) == 2
    assert "is not key=value" in capsys.readouterr().err

    study = write_study(tmp_path / "tiny.yaml", f"""
name: tiny
base: {TINY_BASE}
settings: [{{encoder_regularizer: none}}]
""")
    out = tmp_path / "out"
    assert main([f"study_file={study}", f"out_dir={out}", "trainer.no_such_key=1", "dry_run=true"]) == 2
    err = capsys.readouterr().err
    assert "does not compose" in err and "no_such_key" in err
    assert main([f"study_file={study}", f"out_dir={out}", "importance_samples=k5", "grid.importance_samples=[k1]",
                       "dry_run=true"]) == 2
    assert "varied by the study" in capsys.readouterr().err

    assert main([f"study_file={study}", f"out_dir={out}", "seeds=[0,1]", "dry_run=true",
                       "launcher=joblib"]) == 0
    text = capsys.readouterr().out
    assert "2 new -> launching 2" in text and "+setting=none seed=0,1" in text
    assert "hydra/launcher=local_parallel" in text and "- study:tiny" in text
    assert not out.exists()  # a dry run writes nothing


# ---------------------------------------------------------------------------------------------------------------
# end to end: train.py runs through Hydra multirun
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_study_runs_collects_and_skips_finished_runs(tmp_path):
    # seeds 3 and 1000: PoisonAt(step=${seed}) makes the loss NaN at step 3 for seed 3 only (an epoch has 13 steps)
    study = write_study(tmp_path / "tiny.yaml", f"""
name: tiny
base: {TINY_BASE}
seeds: [3, 1000]
settings:
  - {{encoder_regularizer: none}}
  - {{id: poisoned, +callbacks.poison._target_: tests.helpers.PoisonAt, +callbacks.poison.step: '${{seed}}'}}
metrics: [test/nll, test/neg_elbo, test/inference_gap]
""")
    out = tmp_path / "out"
    proc = run_sweep(f"study_file={study}", f"out_dir={out}", check_rc=1)  # 1: a run failed; tables still written
    assert "4 new -> launching 4" in proc.stdout

    runs = {(d.parent.name, d.name): d for d in (out / "runs").glob("*/seed*")}
    assert set(runs) == {("none", "seed3"), ("none", "seed1000"), ("poisoned", "seed3"), ("poisoned", "seed1000")}
    results = {k: json.loads((d / "results.json").read_text()) for k, d in runs.items()}
    assert results[("poisoned", "seed3")]["status"] == "failed"
    assert all(r["status"] == "ok" for k, r in results.items() if k != ("poisoned", "seed3"))
    cfg = results[("none", "seed3")]["config"]
    assert cfg["group"] == "tiny" and "study:tiny" in cfg["tags"] and cfg["name"] == "none-s3"

    table = read_csv(out / "table.csv")
    assert set(table) == {"none", "poisoned"}
    assert (table["none"]["n_seeds"], table["none"]["n_failed"]) == ("2", "0")
    assert (table["poisoned"]["n_seeds"], table["poisoned"]["n_failed"]) == ("1", "1")
    assert table["none"]["regularizer"] == "none" and table["none"]["k"] == "1" and table["none"]["method"]
    for metric in ("test/nll", "test/neg_elbo", "test/inference_gap"):
        vals = [results[("none", s)]["metrics"][metric] for s in ("seed3", "seed1000")]
        assert float(table["none"][f"{metric}_mean"]) == pytest.approx(statistics.fmean(vals), rel=1e-12)
        assert float(table["none"][f"{metric}_std"]) == pytest.approx(statistics.stdev(vals), rel=1e-12)
        assert float(table["poisoned"][f"{metric}_mean"]) == pytest.approx(
            results[("poisoned", "seed1000")]["metrics"][metric], rel=1e-12)
        assert table["poisoned"][f"{metric}_std"] == ""
    md = (out / "table.md").read_text()
    m = results[("poisoned", "seed1000")]["metrics"]["test/nll"]
    assert md.count("\n| ") == 3 and f"| poisoned | amortized | none | – | 1 | 1 | 1 | {m:.2f} |" in md
    assert "nan" in (out / "failures.md").read_text().lower()
    assert (out / "nll_vs_strength.png").is_file() and (out / "gap_vs_strength.png").is_file()

    # again: the finished runs are skipped, the failed one is not retried by default -> nothing launched
    mtimes = {k: (d / "results.json").stat().st_mtime_ns for k, d in runs.items()}
    proc = run_sweep(f"study_file={study}", f"out_dir={out}", check_rc=1)
    assert "3 finished (skipped), 1 failed (skipped" in proc.stdout and "launching 0" in proc.stdout
    assert "train.py -m" not in proc.stdout
    assert {k: (d / "results.json").stat().st_mtime_ns for k, d in runs.items()} == mtimes
    assert read_csv(out / "table.csv") == table

    # retry_failed=true relaunches only the failed run
    proc = run_sweep(f"study_file={study}", f"out_dir={out}", "retry_failed=true", check_rc=1)
    assert "launching 1" in proc.stdout and "+setting=poisoned seed=3 " in proc.stdout
    now = {k: (d / "results.json").stat().st_mtime_ns for k, d in runs.items()}
    assert now[("poisoned", "seed3")] != mtimes[("poisoned", "seed3")]
    assert {k: v for k, v in now.items() if k != ("poisoned", "seed3")} == {
        k: v for k, v in mtimes.items() if k != ("poisoned", "seed3")}


@pytest.mark.slow
def test_a_run_that_kills_its_process_does_not_stop_the_others(tmp_path):
    # KillAt(step=${seed}) exits the process (like an OOM kill) at step 3 for seed 3: the basic launcher's multirun
    # dies with it; sweep.py relaunches the run it never started and counts the killed one as failed
    study = write_study(tmp_path / "crash.yaml", f"""
name: crash
base: {TINY_BASE}
seeds: [3, 1000]
settings:
  - {{encoder_regularizer: none}}
  - {{id: killed, +callbacks.kill._target_: tests.helpers.KillAt, +callbacks.kill.step: '${{seed}}'}}
""")
    out = tmp_path / "out"
    proc = run_sweep(f"study_file={study}", f"out_dir={out}", check_rc=1)
    assert "+setting=killed seed=1000 " in proc.stdout  # the relaunch
    table = read_csv(out / "table.csv")
    assert (table["none"]["n_seeds"], table["none"]["n_failed"]) == ("2", "0")
    assert (table["killed"]["n_seeds"], table["killed"]["n_failed"]) == ("1", "1")
    assert not (out / "runs" / "killed" / "seed3" / "results.json").exists()
    assert "no results.json" in (out / "failures.md").read_text()


def test_a_stacking_study_runs_settings_with_a_wall_clock_budget_one_run_per_seed(tmp_path):
    """stack=true on a study whose experiment sets trainer.max_time (hierarchy_reduced: 3 minutes per run), which a
    stacked run refuses: its stackable settings (amortized, ladder) launch one run per seed, not stack.seeds."""
    proc = run_sweep("study=hierarchy_reduced", "stack=true", "dry_run=true", f"out_dir={tmp_path}", check_rc=0)
    commands = proc.stdout.split("commands:")[1]
    assert "+setting=one_layer,bottom_up,iterative_t5,bottom_up_warmup,top_down_warmup seed=0,1" in commands
    assert "stack." not in commands


def test_a_stacking_study_stacks_the_seeds_of_stackable_settings_only(tmp_path):
    """stack: true -> the amortized setting's seeds run as one stacked job (members in runs/<id>/seed<s>, the same
    files as single runs), a sigma grid's settings x seeds as one job stacking the values too, the SA-VAE setting
    one run per seed; the table counts them all; a rerun skips them all (and sees no stale overrides)."""
    study = write_study(tmp_path / "tiny.yaml", f"""
name: tiny_stack
base: {TINY_BASE}
seeds: [3, 1000]
stack: true
settings:
  - {{encoder_regularizer: none}}
  - {{encoder_regularizer: denoising, encoder_regularizer.sigma: [0.1, 0.4]}}
  - {{inference: sa_vae, inference.refinement.steps: 2}}
metrics: [test/nll]
""")
    out = tmp_path / "out"
    proc = run_sweep(f"study_file={study}", f"out_dir={out}", check_rc=0)
    assert "+setting=none stack.seeds=[3,1000] " in proc.stdout
    assert ("+setting=denoising_sigma0.1 stack.seeds=[3,1000] stack.key=encoder_regularizer.sigma "
            "stack.values=[0.1,0.4] stack.labels=[denoising_sigma0.1,denoising_sigma0.4]") in proc.stdout
    assert "stack.seeds" not in proc.stdout.split("+setting=sa_vae_steps2")[1].split("\n")[0]
    ids = ("none", "denoising_sigma0.1", "denoising_sigma0.4", "sa_vae_steps2")
    for sid in ids:
        for seed in (3, 1000):
            d = out / "runs" / sid / f"seed{seed}"
            r = json.loads((d / "results.json").read_text())
            assert r["status"] == "ok" and r["config"]["seed"] == seed and r["config"]["name"] == f"{sid}-s{seed}"
            assert ("stack" in r) == (sid != "sa_vae_steps2")
            if sid.startswith("denoising"):
                assert r["axes"]["strength"] == r["config"]["encoder_regularizer"]["sigma"] == float(sid[-3:])
                assert r["stack"]["key"] == "encoder_regularizer.sigma" and len(r["stack"]["values"]) == 4
            assert (d / "checkpoints" / "last.ckpt").is_file() and (d / ".hydra" / "overrides.yaml").is_file()
    table = read_csv(out / "table.csv")
    assert all(table[sid]["n_seeds"] == "2" for sid in ids)
    proc = run_sweep(f"study_file={study}", f"out_dir={out}", check_rc=0)
    assert "8 finished (skipped)" in proc.stdout and "launching 0" in proc.stdout and "warning" not in proc.stdout

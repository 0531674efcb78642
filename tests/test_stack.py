"""Issue 17 part 2: N seeds trained as one stacked computation (``stack.seeds``) equal their single runs.

Every comparison is against runs made independently by the ordinary single-run path (``run``), never against a
value the stacked path computed itself: weights and optimiser state after the first steps, the per-epoch validation
score that chose best.ckpt, the final test numbers, the results.json format, each member's logged history, and a
member checkpoint resumed alone.
"""
import csv
import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from amortlab.errors import AmortlabError
from amortlab.build import compose_config, read_checkpoint
from amortlab.run import run
from tests.conftest import ROOT

BASE = ["logger=none", "trainer.max_epochs=2", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2"]
SEEDS = (3, 5)


def _single(tmp, s, *extra):
    d = tmp / f"single{s}"
    run(compose_config([*BASE, *extra, f"seed={s}"], d), d)
    return d


def _stacked(tmp, *extra, seeds=SEEDS):
    d = tmp / "stack"
    out = run(compose_config([*BASE, *extra, f"stack.seeds=[{','.join(map(str, seeds))}]"], d), d)
    return d, out


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _compare_checkpoints(single, member, which):
    a = read_checkpoint(single / "checkpoints" / f"{which}.ckpt")
    b = read_checkpoint(member / "checkpoints" / f"{which}.ckpt")
    assert set(a) == set(b)  # the single-run format, key for key
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    assert _max_diff(a["state_dict"], b["state_dict"]) < 1e-5
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert torch.allclose(sa[i]["exp_avg"], sb[i]["exp_avg"], atol=1e-6)
        assert torch.allclose(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"], atol=1e-8)
    assert torch.equal(a["torch_rng_state"], b["torch_rng_state"])  # the member's noise stream, where its run's is
    assert a["callbacks"].keys() == b["callbacks"].keys()
    for key, state in a["callbacks"].items():
        if state.get("best_model_score") is not None:  # the same per-epoch score chose the same best checkpoint
            assert abs(float(state["best_model_score"]) - float(b["callbacks"][key]["best_model_score"])) < 1e-4


@pytest.mark.parametrize("extra", [
    ["importance_samples.test=20"],
    ["importance_samples=k5", "encoder_regularizer=denoising", "posterior=flow", "test=false"],
    ["encoder_regularizer=weight_norm", "importance_samples=k5", "test=false"],
    ["encoder_regularizer=spectral_norm", "test=false"],
    ["encoder_regularizer=adversarial", "model=cremer_mlp", "annealing=entropy", "test=false"],
    ["model=burda_mlp2", "importance_samples.test=20"],
    ["model=burda_mlp2", "inference=ladder", "importance_samples=k5", "encoder_regularizer=weight_norm", "test=false"],
], ids=["vae", "iwae5-denoising-flow", "wni", "spectral", "adversarial-cremer-annealing", "two-layers",
        "ladder-iwae5-wni"])
def test_stacked_members_equal_their_single_runs(extra, tmp_path):
    singles = {s: _single(tmp_path, s, *extra) for s in SEEDS}
    stack_dir, out = _stacked(tmp_path, *extra)
    assert out["status"] == "ok" and len(out["members"]) == len(SEEDS)
    for s in SEEDS:
        member = stack_dir / f"seed{s}"
        for which in ("best", "last"):
            _compare_checkpoints(singles[s], member, which)
        a = json.loads((singles[s] / "results.json").read_text())
        b = json.loads((member / "results.json").read_text())
        assert set(a) | {"stack"} == set(b) and b["stack"]["seeds"] == list(SEEDS)
        assert a["status"] == b["status"] == "ok" and a["axes"] == b["axes"] and a["tags"] == b["tags"]
        assert a["config"] == {**b["config"], "stack": a["config"]["stack"]} or _same_but_paths(a, b)
        assert a["metrics"].keys() == b["metrics"].keys()
        for k, v in a["metrics"].items():
            if k.endswith("infer_seconds"):  # a wall-clock time, not a number of the model
                continue
            assert v == pytest.approx(b["metrics"][k], rel=1e-5, abs=1e-5), k


def _same_but_paths(a, b) -> bool:
    """Configs equal except where a path names the run's own directory."""
    sa = json.dumps(a["config"], sort_keys=True).replace(a["out_dir"], "<dir>")
    sb = json.dumps(b["config"], sort_keys=True).replace(b["out_dir"], "<dir>")
    return sa == sb


def _logged(run_dir):
    """The rows a run's CSV logger wrote, in order: (epoch, step, {key: value})."""
    (path,) = (run_dir / "csv").glob("version_*/metrics.csv")
    with path.open() as f:
        return [(row.pop("epoch"), int(row.pop("step")), {k: float(v) for k, v in row.items() if v != ""})
                for row in csv.DictReader(f)]


@pytest.mark.parametrize("extra", [[], ["inference.fused_steps=2"]], ids=["lightning-steps", "fused-steps"])
def test_each_member_logs_the_history_of_its_single_run(extra, tmp_path):
    """logger=csv: each member's metrics.csv is its single run's, row for row: the same keys (no per-epoch
    val_epoch/mutual_info, which a single run does not estimate), steps and epochs for the training loss (every
    trainer.log_every_n_steps), the annealing weight, the per-epoch validation and the final evaluation, and the
    same values to float tolerance (wall-clock times aside)."""
    extra = ["trainer.log_every_n_steps=2", "annealing=entropy", "importance_samples.test=5", *extra]
    singles = {s: _single(tmp_path, s, "logger=csv", *extra) for s in SEEDS}
    stack_dir, out = _stacked(tmp_path, "logger=csv", *extra)
    assert out["status"] == "ok"
    for s in SEEDS:
        a, b = _logged(singles[s]), _logged(stack_dir / f"seed{s}")
        assert [(e, step, sorted(v)) for e, step, v in a] == [(e, step, sorted(v)) for e, step, v in b]
        for (_, step, va), (_, _, vb) in zip(a, b):
            for k, v in va.items():
                if not k.endswith("infer_seconds"):
                    assert v == pytest.approx(vb[k], rel=1e-5, abs=1e-5), (step, k)
        logged = {k for *_, v in a for k in v}
        assert {"train/loss", "train/anneal_weight", "val_epoch/nll", "val/nll", "test/nll"} <= logged


def test_a_member_checkpoint_resumes_alone_like_an_uninterrupted_run(tmp_path):
    """Stacked for one epoch, then member 5 resumed as a single run for a second epoch = a single run of two."""
    straight = _single(tmp_path, 5)
    stack_dir, _ = _stacked(tmp_path, "trainer.max_epochs=1", "test=false")
    resumed = tmp_path / "resumed"
    cfg = compose_config([*BASE, "seed=5", f"ckpt_path={stack_dir / 'seed5' / 'checkpoints' / 'last.ckpt'}",
                          "test=false"], resumed)
    run(cfg, resumed)
    a = read_checkpoint(straight / "checkpoints" / "last.ckpt")
    b = read_checkpoint(resumed / "checkpoints" / "last.ckpt")
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    assert _max_diff(a["state_dict"], b["state_dict"]) < 1e-5


@pytest.mark.parametrize("extra, named", [
    (["inference=sa_vae"], "is not stackable"),
    (["ckpt_path=/nonexistent/last.ckpt"], "neither evaluates nor resumes"),
    (["trainer.gradient_clip_val=1.0"], "couples them"),
    (["+trainer.max_time=00:00:01:00"], "wall-clock budget"),
])
def test_what_cannot_stack_is_refused_with_the_fix(extra, named, tmp_path):
    with pytest.raises(AmortlabError, match=named):
        _stacked(tmp_path, *extra)
    for s in SEEDS:
        r = json.loads((tmp_path / "stack" / f"seed{s}" / "results.json").read_text())
        assert r["status"] == "failed" and r["reason"] == "config" and named in r["error"]


def test_a_wall_clock_budget_is_refused_by_train_py_with_the_fix(tmp_path):
    """trainer.max_time (set by experiment=hierarchy_mnist_reduced) would be one budget for all stacked models:
    train.py refuses it before training, naming the fixes, and each member's results.json says why (the run is
    kept small, in case it trains)."""
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path}", "logger=none",
                           "experiment=hierarchy_mnist_reduced", "stack.seeds=[0,1]",
                           "trainer.max_epochs=1", "trainer.limit_train_batches=2", "test=false"],  # small if run
                          cwd=ROOT, env={**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    message = " ".join(proc.stderr.split("amortlab error:")[-1].split())
    for fix in ("trainer.max_time=00:00:03:00", "drop stack.seeds", "stack=false", "trainer.max_time=null",
                "trainer.max_epochs", "trainer.max_steps"):
        assert fix in message
    for s in (0, 1):
        r = json.loads((tmp_path / f"seed{s}" / "results.json").read_text())
        assert r["status"] == "failed" and r["reason"] == "config" and r["error"] == message
        assert not (tmp_path / f"seed{s}" / "checkpoints").exists()


def test_duplicate_seeds_are_refused(tmp_path):
    with pytest.raises(AmortlabError, match="distinct seeds"):
        _stacked(tmp_path, seeds=(1, 1))


class PoisonMember(L.Callback):
    """Test-only callback: at global step ``step`` member ``member``'s first weight becomes NaN (so its loss does)."""

    def __init__(self, member: int, step: int):
        self.member, self.step = member, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters())[self.member].fill_(float("nan"))


@pytest.mark.parametrize("check", ["auto", "deferred"])
def test_a_diverging_member_stops_and_the_others_finish_like_their_single_runs(check, tmp_path):
    """Member 1 (seed 5) turns NaN at step 5 (epoch 2): it is recorded failed / non_finite_loss naming the step, its
    epoch-1 checkpoints stay finite; member 0 (seed 3) trains on and ends with its single run's numbers. With
    ``finite_check=deferred`` (no host read per step) the same, the flag read at the epoch's end."""
    extra = ["importance_samples.test=20", f"inference.finite_check={check}"]
    single = _single(tmp_path, 3, *extra)
    poison = ["+callbacks.poison._target_=tests.test_stack.PoisonMember", "+callbacks.poison.member=1",
              "+callbacks.poison.step=5"]
    stack_dir, out = _stacked(tmp_path, *extra, *poison)
    assert out["status"] == "failed"
    ok, bad = (json.loads((stack_dir / f"seed{s}" / "results.json").read_text()) for s in SEEDS)
    assert bad["status"] == "failed" and bad["reason"] == "non_finite_loss" and "global step 5" in bad["error"]
    last = read_checkpoint(stack_dir / "seed5" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4 and all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert ok["status"] == "ok"
    _compare_checkpoints(single, stack_dir / "seed3", "last")
    a = json.loads((single / "results.json").read_text())["metrics"]
    for k, v in a.items():
        if not k.endswith("infer_seconds"):
            assert v == pytest.approx(ok["metrics"][k], rel=1e-5, abs=1e-5), k


@pytest.mark.parametrize("key, values, extra", [
    ("encoder_regularizer.sigma", ["0.1", "0.4"], ["encoder_regularizer=denoising"]),
    ("encoder_regularizer.H", ["0.5", "2"], ["encoder_regularizer=weight_norm", "importance_samples=k5"]),
    ("optim.optimizer.lr", ["0.001", "0.003"], ["optim=burda"]),
], ids=["denoising-sigma", "wni-H", "lr-burda-schedule"])
def test_members_differing_in_a_setting_equal_their_single_runs(key, values, extra, tmp_path):
    """stack.key / stack.values: members = values x seeds, each equal to the single run made with ``key=value``
    (weights, Adam state, its own learning rate and schedule state, the best score, the final test numbers)."""
    extra = [*extra, "importance_samples.test=20"]
    d = tmp_path / "stack"
    out = run(compose_config([*BASE, *extra, f"stack.seeds=[{','.join(map(str, SEEDS))}]", f"stack.key={key}",
                              f"stack.values=[{','.join(values)}]"], d), d)
    assert out["status"] == "ok" and len(out["members"]) == len(values) * len(SEEDS)
    leaf = key.rsplit(".", 1)[-1]
    for v in values:
        for s in SEEDS:
            single = tmp_path / f"single-{v}-{s}"
            run(compose_config([*BASE, *extra, f"{key}={v}", f"seed={s}"], single), single)
            member = d / f"{leaf}{float(v):g}" / f"seed{s}"
            for which in ("best", "last"):
                _compare_checkpoints(single, member, which)
            a, b = (read_checkpoint(x / "checkpoints" / "last.ckpt") for x in (single, member))
            ga, gb = a["optimizer_states"][0]["param_groups"][0], b["optimizer_states"][0]["param_groups"][0]
            assert ga["lr"] == pytest.approx(gb["lr"], rel=1e-12)
            assert a["lr_schedulers"] == b["lr_schedulers"] or _same_rates(a["lr_schedulers"], b["lr_schedulers"])
            ra, rb = (json.loads((x / "results.json").read_text()) for x in (single, member))
            assert rb["stack"]["key"] == key and rb["config"]["seed"] == s
            assert ra["axes"] == rb["axes"] and ra["tags"] == rb["tags"]  # the member's own strength in its record
            for k, val in ra["metrics"].items():
                if not k.endswith("infer_seconds"):
                    assert val == pytest.approx(rb["metrics"][k], rel=1e-5, abs=1e-5), k


def _same_rates(a, b) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(pytest.approx(x[k], rel=1e-12) == y[k] for k in ("base_lrs", "_last_lr"))
        for x, y in zip(a, b))


@pytest.mark.parametrize("extra, named", [
    (["encoder_regularizer=denoising", "stack.key=encoder_regularizer.alpha", "stack.values=[0.5,1.0]"],
     "can differ in"),
    (["encoder_regularizer=denoising", "stack.key=encoder_regularizer.sigma", "stack.values=[0.0,0.4]"],
     "mixes 0"),
    (["stack.key=optim.optimizer.lr", "stack.values=[0.001,0.001]"], "repeats a value"),
    (["stack.key=optim.optimizer.lr"], "go together"),
], ids=["not-a-stackable-setting", "zero-and-nonzero-sigma", "repeated-value", "key-without-values"])
def test_settings_that_cannot_stack_are_refused_with_the_fix(extra, named, tmp_path):
    with pytest.raises(AmortlabError, match=named):
        _stacked(tmp_path, *extra, "test=false")


def test_last_checkpoint_holds_the_final_weights_whatever_its_cadence(tmp_path):
    """checkpoints/last.ckpt written every 2 epochs of a 3-epoch run still ends with the weights of epoch 3: equal to
    a run that writes every epoch (single and stacked), and a run resumed from it continues like an uninterrupted
    one."""
    cadence = ["trainer.max_epochs=3", "callbacks.checkpoint_last.every_n_epochs=2", "test=false"]
    every = _single(tmp_path / "every", 3, "trainer.max_epochs=3", "test=false")
    sparse = _single(tmp_path / "sparse", 3, *cadence)
    stack_dir, _ = _stacked(tmp_path, *cadence)
    a = read_checkpoint(every / "checkpoints" / "last.ckpt")
    for d in (sparse, stack_dir / "seed3"):
        b = read_checkpoint(d / "checkpoints" / "last.ckpt")
        assert b["global_step"] == a["global_step"] == 12
        assert _max_diff(a["state_dict"], b["state_dict"]) < 1e-6
    straight = _single(tmp_path / "straight", 3, "trainer.max_epochs=4", "test=false")
    resumed = tmp_path / "resumed"
    run(compose_config([*BASE, "seed=3", "trainer.max_epochs=4", "test=false",
                        f"ckpt_path={sparse / 'checkpoints' / 'last.ckpt'}"], resumed), resumed)
    c, d = (read_checkpoint(x / "checkpoints" / "last.ckpt") for x in (straight, resumed))
    assert c["global_step"] == d["global_step"] == 16
    assert _max_diff(c["state_dict"], d["state_dict"]) < 1e-6


def test_stacking_large_steps_on_a_cpu_warns_and_names_the_fix(tmp_path, caplog):
    """Above ~1000 decoder rows per model per step a CPU gains nothing from stacking (README, Benchmarks): the run
    says so and how to run one model per seed; small steps train without the warning."""
    import logging
    caplog.set_level(logging.WARNING, logger="amortlab")
    common = ["trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=0", "test=false",
              "trainer.accelerator=cpu"]
    _stacked(tmp_path / "small", *common)
    assert "stack=false" not in caplog.text
    _stacked(tmp_path / "large", *common, "importance_samples.train=20")
    assert "k x batch = 2000 decoder rows" in caplog.text and "stack=false" in caplog.text

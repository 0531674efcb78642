"""Fused training steps (``inference.fused_steps`` = M, ``amortlab.data.fused``): M optimiser steps per Lightning
training step must train exactly as Lightning's own loop does with one step per batch — the reference here is that
loop (automatic optimisation, its scheduler stepping, its batch counting), not anything the fused path computes.
"""
import csv
import json

import lightning as L
import pytest
import torch

from amortlab.build import compose_config, read_checkpoint
from amortlab.errors import AmortlabError, NonFiniteLossError
from amortlab.run import run

BASE = ["logger=none", "trainer.max_epochs=3", "trainer.limit_train_batches=7", "trainer.limit_val_batches=2",
        "importance_samples.test=20", "evaluation.ckpt=last"]
# everything a step depends on: epoch-fractional annealing, a fresh binarization per epoch, an epoch-wise learning
# rate schedule that changes within the run, and epochs of 7 steps (groups of 3, 3, 1)
HARD = ["annealing=entropy", "annealing.duration=2", "dataset.binarization=dynamic", "optim=burda",
        "optim.lr_scheduler.time_scale=0.001"]


def _train(d, *extra, member: str = ""):
    res = run(compose_config([*BASE, *extra], d), d)
    ckpt = read_checkpoint(d / member / "checkpoints" / "last.ckpt")
    return ckpt, res


def _same_training(a, b):
    (ca, ra), (cb, rb) = a, b
    assert ca["global_step"] == cb["global_step"]
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for k, v in ca["state_dict"].items():
        assert torch.equal(v, cb["state_dict"][k]), k
    sa, sb = ca["optimizer_states"][0]["state"], cb["optimizer_states"][0]["state"]
    for i in sa:  # Adam's moments and step counts
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[i][key], sb[i][key]), (i, key)
    assert [s["last_epoch"] for s in ca["lr_schedulers"]] == [s["last_epoch"] for s in cb["lr_schedulers"]]
    assert ra["metrics"].get("test/nll") == rb["metrics"].get("test/nll")


@pytest.mark.parametrize("extra", [
    HARD,
    [*HARD, "trainer.max_steps=17"],  # stops inside a group
    ["inference=iterative", "inference.iterations=2"],  # another method on the base training step
    ["inference=aggressive"],  # an inner loop of encoder updates before each step
    ["dataset=lgssm", "model=lgssm", "inference=avf", "dataset.n_train=400", "dataset.n_test=100",
     "dataset.batch_size=50", "test=false"],  # a sequence model and its filter
], ids=["amortized", "max_steps", "iterative", "aggressive", "sequence"])
def test_fused_steps_train_exactly_like_lightnings_loop(extra, tmp_path):
    one = _train(tmp_path / "m1", *extra)
    three = _train(tmp_path / "m3", *extra, "inference.fused_steps=3")
    _same_training(one, three)
    assert one[1]["timing"]["steps"] == three[1]["timing"]["steps"] == (17 if "trainer.max_steps=17" in extra else 21)


def test_stacked_members_with_fused_steps_train_like_lightnings_loop(tmp_path):
    seeds = ["stack.seeds=[0,1]", "annealing=entropy", "annealing.duration=2"]
    a = _train(tmp_path / "m1", *seeds, member="seed1")
    b = _train(tmp_path / "m3", *seeds, "inference.fused_steps=3", member="seed1")
    (ca, ra), (cb, rb) = a, b
    for k, v in ca["state_dict"].items():
        assert torch.equal(v, cb["state_dict"][k]), k
    assert ra["members"][1]["metrics"]["test/nll"] == rb["members"][1]["metrics"]["test/nll"]


def test_logged_steps_match_lightnings_loop(tmp_path):
    """The loggers' x-axis counts optimiser steps either way (per-epoch values at the same steps); a fused run logs
    the training loss at every log_every_n_steps-th step."""
    def rows(d, *extra):
        run(compose_config([*BASE, "logger=csv", "trainer.log_every_n_steps=4", *extra], d), d)
        path = next(d.rglob("metrics.csv"))
        with open(path) as f:
            return list(csv.DictReader(f))

    r1, r3 = rows(tmp_path / "m1"), rows(tmp_path / "m3", "inference.fused_steps=3")
    val1, val3 = ([int(r["step"]) for r in rs if r.get("val_epoch/nll")] for rs in (r1, r3))
    assert val1 == val3 and len(val1) == 3
    loss1, loss3 = ([int(r["step"]) for r in rs if r.get("train/loss")] for rs in (r1, r3))
    assert loss1 == loss3 == [3, 7, 11, 15, 19]  # where Lightning writes its per-step values: (step + 1) % 4 == 0


def test_train_loss_is_logged_at_its_step_every_log_every_n_steps(tmp_path):
    """logger=csv, epochs of 7 steps, trainer.log_every_n_steps=10 (longer than an epoch): train/loss is written at
    steps 9 and 19 ((step + 1) % 10 == 0, counted across epochs), each point holding the loss a run logging every
    step (log_every_n_steps=1) logged at that step — with Lightning's own loop and with fused steps."""
    def points(d, *extra):
        run(compose_config([*BASE, "logger=csv", *extra], d), d)
        with open(next(d.rglob("metrics.csv"))) as f:
            return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}

    every = points(tmp_path / "every", "trainer.log_every_n_steps=1")
    assert sorted(every) == list(range(21))  # 3 epochs of 7 optimiser steps
    for extra in ([], ["inference.fused_steps=3"]):
        logged = points(tmp_path / f"n10{len(extra)}", "trainer.log_every_n_steps=10", *extra)
        assert sorted(logged) == [9, 19], (extra, logged)
        for step, value in logged.items():
            assert value == pytest.approx(every[step], rel=1e-6, abs=0), (extra, step, value, every)


class PoisonAt(L.Callback):
    """Test-only: the loss is NaN at global step ``step`` (the prior's weight is NaN then). Registers as the
    module's annealer, the hook a fused step calls before each of its steps."""

    def __init__(self, step: int):
        self.step = step

    def apply(self, pl_module, *_):
        pl_module.prior_weight = float("nan") if pl_module.global_step == self.step else 1.0

    def on_train_start(self, trainer, pl_module):
        pl_module.annealer = self

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.automatic_optimization:
            self.apply(pl_module)


@pytest.mark.parametrize("mode", ["step", "deferred"])
def test_a_non_finite_step_is_caught_as_in_lightnings_loop(mode, tmp_path):
    poison = [f"+callbacks.poison._target_={__name__}.PoisonAt", "+callbacks.poison.step=9",
              f"inference.finite_check={mode}", "trainer.log_every_n_steps=4"]
    out = {}
    for m in (1, 3):
        d = tmp_path / f"m{m}"
        with pytest.raises(NonFiniteLossError) as e:
            run(compose_config([*BASE, *poison, f"inference.fused_steps={m}"], d), d)
        last = read_checkpoint(d / "checkpoints" / "last.ckpt")
        out[m] = (str(e.value), last["global_step"], last["state_dict"])
    # the deferred read comes at the next multiple of 4 steps (Lightning's loop) or the end of that group (fused)
    first = "non-finite at global step 9" if mode == "deferred" else "became nan at global step 9 (epoch 1, batch 2)"
    assert first in out[1][0] and first in out[3][0]
    assert out[1][1] == out[3][1] == 7  # epoch 1's checkpoint, written before the bad step
    assert all(torch.equal(v, out[3][2][k]) for k, v in out[1][2].items())


@pytest.mark.parametrize("extra, named", [
    (["inference.fused_steps=2", "trainer.gradient_clip_val=1.0"], "gradient_clip_val"),
    (["inference.fused_steps=2", "+trainer.val_check_interval=3"], "val_check_interval"),
    (["inference.fused_steps=0"], "must be >= 1"),
])
def test_options_a_fused_step_cannot_honour_are_refused(extra, named, tmp_path):
    with pytest.raises(AmortlabError, match=named):
        run(compose_config([*BASE, *extra], tmp_path), tmp_path)
    assert "fused_steps" in json.loads((tmp_path / "results.json").read_text())["error"]


def test_resuming_across_loop_kinds_is_refused_and_the_checkpoint_kept(tmp_path):
    d = tmp_path / "run"
    run(compose_config([*BASE, "trainer.max_epochs=1"], d), d)
    last = d / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    e = tmp_path / "resumed"
    with pytest.raises(AmortlabError, match="inference.fused_steps: 1 in the checkpoint, 3 now"):
        run(compose_config([*BASE, "inference.fused_steps=3", f"ckpt_path={last}"], e), e)
    assert last.read_bytes() == before


@pytest.mark.slow
def test_fused_ddp_training_equals_lightnings_loop_on_two_processes(tmp_path):
    """Two processes, each taking its share of every epoch's batches: a fused step re-arms DDP's gradient reduction
    for each of its backward passes (manual_backward), so the all-reduced updates are those of Lightning's loop."""
    from tests.test_cli import train

    for m in (1, 3):  # the fused run writes last.ckpt only when training ends (cadence 5 > 2 epochs), on both ranks
        train("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=2",
              "trainer.limit_train_batches=5", "logger=none", "test=false", f"inference.fused_steps={m}",
              *(["callbacks.checkpoint_last.every_n_epochs=5"] if m == 3 else []), run_dir=tmp_path / f"m{m}")
    a, b = (read_checkpoint(tmp_path / f"m{m}" / "checkpoints" / "last.ckpt") for m in (1, 3))
    assert a["global_step"] == b["global_step"] == 10
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())


@pytest.mark.parametrize("steps, extra", [
    (10, []),  # V = 5; M = 3 validated after step 6 (groups 3, 3, 3, 1; Lightning's int(4 x 0.5) = 2 groups)
    (7, HARD),  # V = 3: after steps 3 and 6, not at the epoch's end; everything a step depends on
    (10, ["inference=aggressive"]),  # its phase ends by the validation values: when they come must not move
], ids=["amortized", "hard", "aggressive"])
def test_fused_steps_validate_after_the_same_optimiser_steps(steps, extra, tmp_path):
    """trainer.val_check_interval=0.5: Lightning's own loop validates after every V = int(0.5 N)-th step of an epoch
    of N steps; a fused run validates after the same steps, so best.ckpt, the logged values and (aggressive) the
    phase's end are the same."""
    base = ["logger=csv", "trainer.max_epochs=3", f"trainer.limit_train_batches={steps}", "trainer.limit_val_batches=2",
            "importance_samples.test=20", "evaluation.ckpt=best", "+trainer.val_check_interval=0.5", *extra]
    out = {}
    for m in (1, 3):
        d = tmp_path / f"m{m}"
        res = run(compose_config([*base, f"inference.fused_steps={m}"], d), d)
        with open(next(d.rglob("metrics.csv"))) as f:
            val_steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("val_epoch/nll")]
        out[m] = (read_checkpoint(d / "checkpoints" / "last.ckpt"), res, val_steps,
                  read_checkpoint(d / "checkpoints" / "best.ckpt"))
    v = steps // 2
    # Lightning's loop: after steps V, 2V, ... of each epoch (the logger's step axis: that step's index)
    assert out[1][2] == [e * steps + k * v - 1 for e in range(3) for k in range(1, steps // v + 1)]
    assert out[3][2] == out[1][2]
    _same_training(out[1][:2], out[3][:2])
    best1, best3 = out[1][3], out[3][3]
    assert best1["global_step"] == best3["global_step"]
    assert all(torch.equal(t, best3["state_dict"][k]) for k, t in best1["state_dict"].items())
    if "inference=aggressive" in extra:  # its phase flag, MI record, generator and inner optimiser
        _same_state(out[1][0]["aggressive"], out[3][0]["aggressive"])


def _same_state(a, b, path="aggressive"):
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same_state(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def test_epoch_groups_end_where_lightnings_loop_validates():
    """For every epoch length N, M and fraction f: Lightning's own loop validates after steps V, 2V, ... (V =
    max(1, int(N f)); its rule "(batch_idx + 1) % V == 0"); the fused groups told to validate every g groups end
    exactly there. Validation after every step is refused (nothing to fuse)."""
    from amortlab.data.fused import epoch_groups

    for n in range(2, 40):
        for m in range(2, 9):
            for f in (0.1, 0.25, 0.3, 0.5, 0.7, 0.99):
                v = max(1, int(n * f))
                if v < 2:
                    with pytest.raises(AmortlabError, match="inference.fused_steps=1"):
                        epoch_groups(n, m, f)
                    continue
                sizes, g = epoch_groups(n, m, f)
                ends = [sum(sizes[:i + 1]) for i in range(len(sizes)) if (i + 1) % g == 0]
                assert sum(sizes) == n and min(sizes) >= 1 and g >= 2
                assert ends == [s for s in range(1, n + 1) if s % v == 0], (n, m, f)
    assert epoch_groups(7, 3, None) == ([3, 3, 1], None) == epoch_groups(7, 3, 1.0)

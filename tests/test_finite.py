"""The non-finite training loss guard (``amortlab.finite``): ``finite_check=step`` stops at the bad step before its
update; ``deferred`` (no host sync per step, the GPU default) skips the bad step's update on the device through the
fused optimiser and stops at its next read, naming the step; stacked members the same way, each on its own.

Checked against the parameters and Adam state recorded *before* the bad step (by a test callback), not against
anything the guard computed itself.
"""
import json

import lightning as L
import pytest
import torch

from amortlab.build import compose_config, read_checkpoint
from amortlab.errors import AmortlabError, NonFiniteLossError
from amortlab.run import run

BASE = ["logger=none", "trainer.max_epochs=2", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
        "importance_samples.test=20"]


class NonFiniteOnce(L.Callback):
    """Test-only: the loss is NaN at global step ``step`` only (the prior's weight is NaN for that step); records
    the parameters and the optimiser's step counts before that step and before the next one."""

    def __init__(self, step: int):
        self.step, self.before, self.after = step, None, None
        NonFiniteOnce.instance = self

    def _snapshot(self, pl_module):
        opt = pl_module.optimizers(use_pl_optimizer=False)
        return ([p.detach().clone() for p in pl_module.parameters()],
                [float(opt.state[p]["step"]) if p in opt.state else 0.0 for p in pl_module.parameters()])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.before = self._snapshot(pl_module)
            pl_module.prior_weight = float("nan")
        elif trainer.global_step == self.step + 1 and self.before is not None and self.after is None:
            self.after = self._snapshot(pl_module)
            pl_module.prior_weight = 1.0


def _run(tmp_path, *extra, poison_step=None):
    """Run; the NonFiniteLossError's message (None if it finished) and the poisoning callback (or None)."""
    d = tmp_path / "run"
    poison = [] if poison_step is None else [f"+callbacks.once._target_={__name__}.NonFiniteOnce",
                                             f"+callbacks.once.step={poison_step}"]
    NonFiniteOnce.instance = None
    try:
        run(compose_config([*BASE, *extra, *poison], d), d)
        err = None
    except NonFiniteLossError as e:
        err = str(e)
    return d, err, NonFiniteOnce.instance


def test_deferred_check_skips_the_bad_update_and_stops_at_its_next_read(tmp_path):
    d, err, once = _run(tmp_path, "inference.finite_check=deferred", poison_step=5)
    assert err is not None and "global step 5" in err and "skipped" in err and "stopped at step 8" in err
    (p0, steps0), (p1, steps1) = once.before, once.after
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))  # the bad step changed no parameter ...
    assert steps0 == steps1  # ... and no Adam step count
    r = json.loads((d / "results.json").read_text())
    assert r["status"] == "failed" and r["reason"] == "non_finite_loss"
    last = read_checkpoint(d / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4  # epoch 1's, written before the bad step; none after it
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


class StopAt(L.Callback):
    """Test-only: asks the trainer to stop after global step ``step`` (as an early-stopping rule would)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


@pytest.mark.parametrize("stop", [["trainer.max_steps=7"],
                                  [f"+callbacks.stop._target_={__name__}.StopAt", "+callbacks.stop.step=7"]],
                         ids=["max_steps", "should_stop"])
def test_deferred_check_reads_when_an_epoch_or_the_run_is_cut_short(stop, tmp_path):
    """A run stopped between two cadence reads (step 7 of an epoch of 4 steps; log_every_n_steps 50) with a bad
    step 5 still fails naming it, and last.ckpt keeps epoch 1's weights (the cut epoch's end writes none over them)."""
    d, err, once = _run(tmp_path, "inference.finite_check=deferred", *stop, poison_step=5)
    assert err is not None and "global step 5" in err and "stopped at step 7" in err
    assert json.loads((d / "results.json").read_text())["status"] == "failed"
    assert read_checkpoint(d / "checkpoints" / "last.ckpt")["global_step"] == 4


def test_step_check_stops_at_the_bad_step(tmp_path):
    d, err, once = _run(tmp_path, "inference.finite_check=step", poison_step=5)
    assert err is not None and "global step 5" in err and "nan" in err and once.after is None


def test_auto_is_the_per_step_check_on_the_cpu(tmp_path):
    d, err, _ = _run(tmp_path, poison_step=5)
    assert err is not None and "before that step's update" in err


@pytest.mark.parametrize("extra, named", [
    (["inference.finite_check=sometimes"], "is not one of"),
    (["inference.finite_check=deferred", "optim.optimizer.fused=false"], "fused=true"),
])
def test_bad_finite_check_settings_are_refused_with_the_fix(extra, named, tmp_path):
    with pytest.raises(AmortlabError, match=named):
        _run(tmp_path, *extra)


def test_a_compiled_run_equals_the_eager_run(tmp_path):
    """``inference.compile_mode=default`` (torch.compile of the networks) trains to the eager run's weights."""
    extra = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=0", "test=false"]
    a, b = tmp_path / "eager", tmp_path / "compiled"
    run(compose_config([*BASE, *extra], a), a)
    run(compose_config([*BASE, *extra, "inference.compile_mode=default"], b), b)
    wa, wb = (read_checkpoint(d / "checkpoints" / "last.ckpt")["state_dict"] for d in (a, b))
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5

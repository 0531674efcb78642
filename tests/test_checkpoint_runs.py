"""Resume and evaluate-only runs from checkpoints, with the README's commands (issue 32 rows 1, 6, 7, 8)."""
import shutil
from pathlib import Path

import pytest

from tests.test_cli import results, train

FAST = ["logger=none", "importance_samples.test=20", "evaluation.val=false", "trainer.limit_val_batches=2"]


@pytest.fixture(scope="module")
def k5_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("k5")
    train(*FAST, "importance_samples=k5", "trainer.max_epochs=1", "trainer.limit_train_batches=3", run_dir=run_dir)
    return run_dir


def test_evaluating_a_k5_checkpoint_is_labelled_k5(k5_run, tmp_path):
    """Row 7: name, tags and axes of ``train=false`` come from the checkpoint's run (k = 5), not today's default."""
    train("train=false", f"ckpt_path={k5_run / 'checkpoints' / 'last.ckpt'}", *FAST, run_dir=tmp_path)
    r = results(tmp_path)
    assert r["status"] == "ok"
    assert r["axes"]["k"] == 5 and "k:5" in r["tags"] and "k:1" not in r["tags"]
    assert r["config"]["importance_samples"]["train"] == 5


@pytest.mark.parametrize("override,named", [("model=burda_mlp2", "model."), ("posterior=flow", "model.encoder"),
                                                 ("dataset.threshold=0.4", "dataset.threshold")])
def test_evaluation_refuses_overrides_the_checkpoint_replaces(k5_run, tmp_path, override, named):
    """Row 8: an override of the checkpoint's own groups is refused by name, not silently ignored."""
    proc = train("train=false", f"ckpt_path={k5_run / 'checkpoints' / 'last.ckpt'}", *FAST, override,
                 run_dir=tmp_path, check=False)
    assert proc.returncode != 0
    err = " ".join((proc.stdout + proc.stderr).split())
    assert "train=false evaluates the checkpoint" in err and named in err and "evaluation.other_data=true" in err


def test_evaluation_on_other_data_only_when_asked_and_recorded(k5_run, tmp_path):
    """Row 8: the same model on digits binarized at another threshold, asked for with evaluation.other_data=true:
    evaluated on that data (its test NLL differs from the checkpoint's own data) and recorded."""
    ckpt = k5_run / "checkpoints" / "last.ckpt"
    own, other = tmp_path / "own", tmp_path / "other"
    # the checkpoint's own settings repeated are no change
    train("train=false", f"ckpt_path={ckpt}", *FAST, "dataset=digits", "model=burda_mlp", "posterior=gaussian",
          run_dir=own)
    train("train=false", f"ckpt_path={ckpt}", *FAST, "dataset.threshold=0.2", "evaluation.other_data=true",
          run_dir=other)
    a, b = results(own), results(other)
    assert "other_data" not in a
    assert b["other_data"]["checkpoint_dataset"]["threshold"] == 0.5
    assert b["other_data"]["evaluated_dataset"]["threshold"] == 0.2
    assert b["config"]["dataset"]["threshold"] == 0.2
    assert b["metrics"]["test/nll"] != pytest.approx(a["metrics"]["test/nll"], rel=1e-3)


def test_fit_time_images_and_steps_accumulate_across_resumes(tmp_path):
    """Row 6: 1 epoch, then the README's resume command to 2 epochs: fit seconds at least the first process's, steps
    those of a straight 2-epoch run; resuming a finished run (as after kill -9 in its final evaluation) reports the
    first process's fit seconds and images/s, not 0."""
    common = [*FAST, "trainer.limit_train_batches=12"]
    run, straight, again = tmp_path / "run", tmp_path / "straight", tmp_path / "again"
    train(*common, "trainer.max_epochs=2", run_dir=straight)
    train(*common, "trainer.max_epochs=1", run_dir=run)
    first = results(run)["timing"]
    last = run / "checkpoints" / "last.ckpt"
    shutil.copytree(run, again)
    train(*common, f"ckpt_path={again / 'checkpoints' / 'last.ckpt'}", "trainer.max_epochs=1", run_dir=again)
    redo = results(again)["timing"]  # nothing left to train: the totals of the first process
    assert redo["steps"] == first["steps"] == 12
    assert redo["train_images_per_s"] == pytest.approx(first["train_images_per_s"], rel=0.2)
    assert redo["fit_s"] >= 0.8 * first["fit_s"] > 0
    train(*common, f"ckpt_path={last}", "trainer.max_epochs=2", run_dir=run)  # hydra.run.dir=<run> from train()
    second = results(run)["timing"]
    assert second["steps"] == results(straight)["timing"]["steps"] == 24
    assert second["fit_s"] >= first["fit_s"]
    assert second["train_images_per_s"] is not None


SEQ = ["dataset=lgssm", "model=lgssm", "inference=filtering", "dataset.n_train=300", "dataset.n_val=50",
       "dataset.n_test=50"]


@pytest.mark.parametrize("kind,extra", [
    ("k5", ["importance_samples=k5"]),
    ("reduced_test_k", []),  # importance_samples.test=20 (FAST) on the default k = 1
    ("stacked_member", ["stack.seeds=[0,1]"]),
    ("hierarchical", ["model=burda_mlp2"]),
    ("sequence", SEQ),
])
def test_readme_resume_command_continues_like_an_uninterrupted_run(tmp_path, kind, extra):
    """Row 1: 1 epoch, then README's resume command as printed (``python train.py ckpt_path=<run>/checkpoints/
    last.ckpt hydra.run.dir=<run>``, plus ``trainer.max_epochs=2``) = a straight 2-epoch run: every metric, every
    group (typed ones included) restored from the checkpoint. A stacked member's last.ckpt resumes alone as a
    single run of its seed."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    common = [*FAST, "trainer.limit_train_batches=3", *extra]
    first, straight = tmp_path / "first", tmp_path / "straight"
    train(*common, "trainer.max_epochs=1", run_dir=first)
    run = first / "seed1" if kind == "stacked_member" else first
    single = [o for o in common if not o.startswith("stack.")] + (["seed=1"] if kind == "stacked_member" else [])
    train(*single, "trainer.max_epochs=2", run_dir=straight)
    cmd = [sys.executable, "train.py", f"ckpt_path={run}/checkpoints/last.ckpt", f"hydra.run.dir={run}",
           "trainer.max_epochs=2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = results(straight), results(run)
    assert b["status"] == "ok" and b["timing"]["steps"] == a["timing"]["steps"] == 6
    assert b["config"]["importance_samples"] == a["config"]["importance_samples"]
    rel = 1e-4 if kind == "stacked_member" else 1e-6  # a member equals its single run to float tolerance
    for key, value in a["metrics"].items():
        if isinstance(value, float) and "seconds" not in key:  # wall-clock times differ between any two runs
            assert b["metrics"][key] == pytest.approx(value, rel=rel, abs=rel), key

"""Issue 16: the edges of a run hold — one test per row of the issue's table (CLI runs with tiny budgets).

Bad values stop before anything starts; a batch larger than the training set is refused; a resume restores the run's
own settings and refuses incompatible ones; one live run per directory; Ctrl-C / SIGTERM and failures always leave
results.json; checkpoints never unpickle code; corrupt data files give one message; every epoch leaves a line in
train.log; the per-epoch validation estimate and the final one have different names.
"""
import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch

from tests.conftest import ROOT
from tests.test_cli import _clean_error, results, train

TINY = ["logger=none", "trainer.max_epochs=2", "importance_samples.test=20", "evaluation.val=false"]


def _failed_before_start(run_dir, proc) -> dict:
    err = _clean_error(proc)
    r = results(run_dir)
    assert r["status"] == "failed" and r["reason"] == "config", r
    assert not (run_dir / "wandb").exists() and not (run_dir / "checkpoints").exists()
    return {"err": err, "results": r}


@pytest.mark.parametrize("override, named", [
    ("trainer.max_epochs=abc", "trainer.max_epochs='abc'"),
    ("trainer.max_epochs=-1", "trainer.max_epochs=-1"),
    ("dataset.batch_size=abc", "dataset.batch_size='abc'"),
    ("dataset.batch_size=0", "dataset.batch_size=0"),
    ("importance_samples.train=0", "importance_samples.train=0"),
    ("optim.optimizer.lr=-0.001", "optim.optimizer.lr=-0.001"),
    ("+foo=1", "unknown top-level key(s) ['foo']"),
])
def test_bad_value_stops_before_anything_starts(override, named, tmp_path):
    """One paragraph naming the key, the value and what is allowed; no W&B run, no checkpoint; results.json says
    failed (config)."""
    out = _failed_before_start(tmp_path, train("trainer.max_epochs=2", override, run_dir=tmp_path, check=False))
    assert named in out["err"] and "must be" in out["err"] or "unknown" in out["err"]
    assert named in out["results"]["error"]


def test_batch_larger_than_the_training_set_is_refused(tmp_path):
    out = _failed_before_start(tmp_path, train(*TINY, "dataset.batch_size=5000", run_dir=tmp_path, check=False))
    assert "1258 images" in out["err"] and "dataset.batch_size=5000" in out["err"]


def test_resume_restores_the_runs_settings_and_refuses_incompatible_ones(tmp_path):
    first = tmp_path / "first"
    train(*TINY, "dataset.batch_size=20", "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=2", run_dir=first)
    last = first / "checkpoints" / "last.ckpt"
    # as the README shows it: only ckpt_path and more epochs; the batch size comes back from the checkpoint
    resumed = tmp_path / "resumed"
    proc = train(*TINY, f"ckpt_path={last}", "trainer.max_epochs=2", run_dir=resumed)
    r = results(resumed)
    assert r["status"] == "ok" and r["config"]["dataset"]["batch_size"] == 20
    assert r["config"]["trainer"]["check_val_every_n_epoch"] == 2  # the run's cadence, not today's default
    assert r["config"]["trainer"]["default_root_dir"] == str(resumed)  # this run's paths
    assert r["timing"]["steps"] == 2 * (1258 // 20)
    assert "trainer.max_epochs: 1 -> 2" in (resumed / "train.log").read_text() + proc.stdout
    # an incompatible change is named, not a size-mismatch traceback
    bad = tmp_path / "bad"
    err = _clean_error(train(*TINY, f"ckpt_path={last}", "model.encoder.z_dim=8", run_dir=bad, check=False))
    assert "model.encoder.z_dim: 50 in the checkpoint, 8 now" in err


def test_second_live_run_in_one_directory_is_refused(tmp_path):
    (tmp_path / ".amortlab.lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                                         "started": "now"}))
    err = _clean_error(train(*TINY, run_dir=tmp_path, check=False))
    assert f"pid {os.getpid()}" in err and "hydra.run.dir" in err
    assert not (tmp_path / "checkpoints").exists()
    # a lock left by a dead process is stale: taken over, and released at the end
    (tmp_path / ".amortlab.lock").write_text(json.dumps({"pid": 2**22 + 17, "host": os.uname().nodename}))
    train(*TINY, run_dir=tmp_path)
    assert results(tmp_path)["status"] == "ok" and not (tmp_path / ".amortlab.lock").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_leaves_a_resumable_record(sig, tmp_path):
    run = tmp_path / "run"
    proc = train(*TINY, "trainer.max_epochs=5", "+callbacks.stop._target_=tests.helpers.SignalAt",
                 "+callbacks.stop.step=30", f"+callbacks.stop.sig={int(sig)}", run_dir=run, check=False)
    assert proc.returncode == 130, proc.stderr[-2000:]
    r = results(run)
    assert r["status"] == "interrupted" and "ckpt_path=" in r["error"] and r["metrics"] == {}
    last = run / "checkpoints" / "last.ckpt"
    assert r["checkpoints"]["last"] == str(last) and last.is_file()
    resumed = tmp_path / "resumed"
    train(*TINY, f"ckpt_path={last}", "trainer.max_epochs=3", run_dir=resumed)
    assert results(resumed)["status"] == "ok" and results(resumed)["timing"]["epochs"] == 3


def test_failing_sweep_member_keeps_its_own_wandb_run_and_record(tmp_path):
    """A NaN member then a good member (one Hydra multirun, W&B offline): each has its own results.json and W&B
    run, and the good member's metrics are in its own W&B run only. A config-error member writes its record."""
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", f"hydra.sweep.dir={tmp_path}",
           "hydra.sweep.subdir=${hydra.job.num}", "trainer.max_epochs=2", "importance_samples.test=20",
           "evaluation.val=false", "logger=wandb",
           "+callbacks.poison._target_=tests.helpers.PoisonAt", "+callbacks.poison.step=5,1000000"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0  # Hydra reports the failed member after running the rest
    bad, good = results(tmp_path / "0"), results(tmp_path / "1")
    assert bad["status"] == "failed" and bad["reason"] == "non_finite_loss"
    assert good["status"] == "ok" and "test/nll" in good["metrics"]

    def logged(run_dir) -> bytes:  # the offline run's record (protobuf; metric names appear as plain strings)
        (run,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
        return run.read_bytes()

    assert b"test/nll" not in logged(tmp_path / "0") and b"test/nll" in logged(tmp_path / "1")
    # a member that fails on a config error leaves results.json (sweep.py then skips it unless retry_failed=true)
    from amortlab.studies.layout import run_state

    cfg_err = tmp_path / "cfg"
    train(*TINY, "importance_samples.train=0", run_dir=cfg_err, check=False)
    assert results(cfg_err)["reason"] == "config" and run_state(cfg_err) == "failed"


def test_checkpoint_never_unpickles_code_or_builds_foreign_targets(tmp_path):
    from tests.helpers import Payload

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "amortlab_config": {}, "evil": Payload(str(marker))}, tmp_path / "evil.ckpt")
    err = _clean_error(train("logger=none", "train=false", f"ckpt_path={tmp_path / 'evil.ckpt'}",
                             run_dir=tmp_path / "a", check=False))
    assert "pickled objects" in err and not marker.exists()
    torch.save({"state_dict": {}, "amortlab_config": {"model": {"encoder": {"_target_": "os.system"}}}},
               tmp_path / "foreign.ckpt")
    err = _clean_error(train("logger=none", "train=false", f"ckpt_path={tmp_path / 'foreign.ckpt'}",
                             run_dir=tmp_path / "b", check=False))
    assert "model.encoder: os.system" in err


def test_corrupt_npz_deflate_stream_is_one_message(tmp_path, mnist_dir):
    good = mnist_dir / "binarized_mnist.npz"
    bad = tmp_path / "binarized_mnist.npz"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            zout.writestr(item, zin.read(item.filename))
    data = bytearray(bad.read_bytes())
    start = data.find(b"train.npy") + 200  # inside the first member's compressed stream
    data[start:start + 64] = bytes(64)
    bad.write_bytes(bytes(data))
    err = _clean_error(train(*TINY, "dataset=binarized_mnist", f"data_dir={tmp_path}",
                             "dataset.verify_checksum=false", run_dir=tmp_path / "run", check=False))
    assert "binarized_mnist.npz" in err and "corrupt" in err and "https://" in err


def test_every_epoch_leaves_a_line_and_metric_names_say_what_they_are(tmp_path):
    train("logger=csv", "trainer.max_epochs=3", "importance_samples.test=20", run_dir=tmp_path)
    log = (tmp_path / "train.log").read_text()
    for epoch in (1, 2, 3):
        assert f"epoch {epoch}/3 | train -L_1 " in log
    assert "val_epoch/nll (IWAE-10)" in log and "img/s" in log and "results:" in log
    (metrics_csv,) = tmp_path.glob("csv/*/metrics.csv")
    rows = list(csv.DictReader(metrics_csv.open()))
    per_epoch = [float(r["val_epoch/nll"]) for r in rows if r.get("val_epoch/nll")]
    final = [float(r["val/nll"]) for r in rows if r.get("val/nll")]
    assert len(per_epoch) == 3 and len(final) == 1  # the per-epoch IWAE-10 and the final IWAE-20: two keys
    assert results(tmp_path)["metrics"]["val/nll"] == pytest.approx(final[0], rel=1e-6)


def test_error_advice_is_true():
    """Advice names only fixes that exist: no download for a file without a public URL (the NaN message's advice:
    test_cli.test_nan_loss_stops_with_step_and_keeps_checkpoint)."""
    from amortlab.data.binarized_mnist import NPZ
    from amortlab.data.download import fetch
    from amortlab.errors import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError) as e:
        fetch(NPZ, "/nonexistent-dir", "binarized_mnist", download=True)
    assert "no public URL" in str(e.value) and "download=true" not in str(e.value)


@pytest.fixture(scope="module")
def one_epoch_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained")
    train("logger=none", "trainer.max_epochs=1", "test=false", run_dir=run)
    return run / "checkpoints" / "last.ckpt"


# the decomposition (q* fitted per point) on 100 validation points, then on the 359 test points in batches of 100
GAPS = ["logger=none", "evaluation=gaps", "evaluation.val=true", "trainer.limit_val_batches=1",
        "importance_samples.test=100", "evaluation.estimator.reference_k=100", "evaluation.estimator.qstar.k=10",
        "evaluation.estimator.qstar.max_steps=300", "evaluation.estimator.qstar.select_k=100"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_the_final_evaluation_stops_it_with_a_record(sig, one_epoch_checkpoint, tmp_path):
    """train=false evaluation=gaps: SIGTERM or SIGINT once the test split has started ends the process within
    seconds (exit 130) with status interrupted, the finished validation split's metrics, the split that was running
    and the command that redoes the evaluation."""
    run = tmp_path / "eval"
    overrides = ["train=false", f"ckpt_path={one_epoch_checkpoint}", *GAPS]
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run}", *overrides]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    try:
        for line in proc.stdout:  # the evaluation logs each split's start
            lines.append(line)
            if "final evaluation: test split" in line:
                break
        else:
            raise AssertionError("the test split never started:\n" + "".join(lines[-40:]))
        proc.send_signal(sig)
        t0 = time.monotonic()
        rest, _ = proc.communicate(timeout=60)
        waited = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, "".join(lines[-20:]) + rest[-3000:]
    assert waited < 20, waited
    r = results(run)
    assert r["status"] == "interrupted" and r["reason"] == "interrupted", r.get("error")
    assert r["evaluated"] == ["val"] and r["interrupted_split"] == "test"
    assert r["metrics"]["val/n_points"] == 100 and r["metrics"]["val/nll"] > 0
    assert not any(k.startswith("test/") for k in r["metrics"])
    assert r["redo"] in r["error"] and r["redo"] in rest
    redo = shlex.split(r["redo"])
    assert redo[:2] == ["python", "train.py"] and set(overrides) <= set(redo) and f"hydra.run.dir={run}" in redo


def test_trained_run_interrupted_in_its_evaluation_is_redone_by_its_command(tmp_path):
    """SIGTERM as a trained run's test split starts: status interrupted with the training's timing and the
    validation metrics; the recorded command (a resume from last.ckpt) then evaluates without training more."""
    run = tmp_path / "run"
    proc = train(*TINY, "evaluation.val=true", "+callbacks.stop._target_=tests.helpers.SignalInSplit",
                 "+callbacks.stop.split=test", run_dir=run, check=False)
    assert proc.returncode == 130, proc.stderr[-3000:]
    r = results(run)
    assert r["status"] == "interrupted" and r["evaluated"] == ["val"] and r["interrupted_split"] == "test"
    assert r["timing"]["epochs"] == 2 and "val/nll" in r["metrics"] and "test/nll" not in r["metrics"]
    last = run / "checkpoints" / "last.ckpt"
    redo = shlex.split(r["redo"])
    assert redo[:2] == ["python", "train.py"] and f"ckpt_path={last}" in redo and f"hydra.run.dir={run}" in redo
    redo = [o for o in redo[2:] if not o.startswith(("+callbacks.stop", "hydra.run.dir="))]
    steps = r["timing"]["steps"]
    train(*redo, run_dir=run)
    r = results(run)
    assert r["status"] == "ok" and r["timing"]["steps"] == steps  # no step trained after the two epochs
    assert {"val/nll", "test/nll"} <= set(r["metrics"])

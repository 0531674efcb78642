"""Issue 32 rows 2, 3, 4, 5, 11: records and run directories never lose work (CLI runs with tiny budgets).

An ok results.json is never replaced by a failed attempt; an unwritable run directory or checkpoints/ is one message
before any data loads, and a checkpoint write that fails mid-training stops the run at that step; a second run into
a live run directory leaves the live run's .hydra files untouched; a torch file that is not a checkpoint of this
library is one message naming its keys.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.test_cli import _clean_error, results, train

TINY = ["logger=none", "trainer.max_epochs=1", "importance_samples.test=20", "evaluation.val=false"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    d = tmp_path_factory.mktemp("finished")
    train(*TINY, run_dir=d)
    return d


@pytest.mark.parametrize("what", ["foo", "state_dict"])
def test_torch_file_that_is_not_a_checkpoint_is_one_message_before_the_logger(what, finished, tmp_path):
    """Row 5: a valid torch file without an amortlab config as ckpt_path: one message naming what it holds and what
    a checkpoint holds, before any logger (W&B) starts; the record says config, not bug."""
    weights = torch.load(finished / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    payload = {"foo": 1} if what == "foo" else weights
    path = tmp_path / "file.pt"
    torch.save(payload, path)
    for mode in ("train=true", "train=false"):
        run = tmp_path / mode.replace("=", "-")
        err = _clean_error(train("logger=wandb", "trainer.max_epochs=1", mode, f"ckpt_path={path}", run_dir=run,
                                 check=False))
        first_key = next(iter(payload))
        assert repr(first_key) in err and "'state_dict'" in err and "'amortlab_config'" in err, err
        assert not (run / "wandb").exists() and not (run / "checkpoints").exists()
        r = results(run)
        assert r["status"] == "failed" and r["reason"] == "config" and repr(first_key) in r["error"]


def test_failed_attempt_never_replaces_a_finished_record(tmp_path):
    """Row 2: a failed start-up (a bad resume) and an interrupted rerun into a finished run's directory leave its ok
    results.json and .hydra files byte for byte; each attempt is a line of attempts.jsonl and the output says which
    record is current. A finished rerun replaces it (the old one kept as results.prev-*); its summary names the
    attempts."""
    train(*TINY, run_dir=tmp_path)
    ok = (tmp_path / "results.json").read_bytes()
    hydra = {p.name: p.read_bytes() for p in (tmp_path / ".hydra").iterdir()}
    proc = train(*TINY, f"ckpt_path={tmp_path / 'nope.ckpt'}", run_dir=tmp_path, check=False)
    assert "nope.ckpt" in _clean_error(proc) and "stays the current record" in proc.stderr
    proc = train(*TINY, "trainer.max_epochs=3", "+callbacks.stop._target_=tests.helpers.SignalAt",
                 "+callbacks.stop.step=20", run_dir=tmp_path, check=False)
    assert proc.returncode == 130 and "stays the current record" in proc.stderr
    assert (tmp_path / "results.json").read_bytes() == ok and not list(tmp_path.glob("results.prev-*"))
    assert {p.name: p.read_bytes() for p in (tmp_path / ".hydra").iterdir()} == hydra  # the finished run's config
    attempts = [json.loads(line) for line in (tmp_path / "attempts.jsonl").read_text().splitlines()]
    assert [(a["status"], a["reason"]) for a in attempts] == [("failed", "config"), ("interrupted", "interrupted")]
    assert "nope.ckpt" in attempts[0]["error"] and "ckpt_path=" in attempts[1]["error"]
    proc = train(*TINY, run_dir=tmp_path)
    assert f"attempts that did not finish: {tmp_path / 'attempts.jsonl'}" in proc.stdout + proc.stderr
    assert [p.read_bytes() for p in tmp_path.glob("results.prev-*")] == [ok] and results(tmp_path)["status"] == "ok"


def test_unwritable_checkpoints_is_one_message_before_any_data_loads(tmp_path):
    """Row 3, before the run: checkpoints/ cannot be created (a regular file stands at its path: tests run as root,
    where permission bits do not stop writes). One message naming the path, before the data loads (the record has
    no data section) and before W&B starts."""
    (tmp_path / "checkpoints").write_text("not a directory")
    err = _clean_error(train("logger=wandb", "trainer.max_epochs=1", run_dir=tmp_path, check=False))
    assert f"{tmp_path / 'checkpoints'} cannot be written" in " ".join(err.split()), err
    r = results(tmp_path)
    assert r["status"] == "failed" and r["reason"] == "storage" and "data" not in r
    assert str(tmp_path / "checkpoints") in r["error"] and not (tmp_path / "wandb").exists()


def test_checkpoint_write_failing_mid_training_stops_the_run_there(tmp_path):
    """Row 3, during the run: from step 20 on, files under checkpoints/ cannot be written (PermissionError, as for a
    non-root user; tests.helpers.DenyWritesUnder). Lightning used to drop that error and train to the end. The run
    stops at the first checkpoint write after step 20, the end of an epoch, and the record names that path and step;
    the checkpoint written before stays listed."""
    ckpts = tmp_path / "checkpoints"
    proc = train(*TINY, "trainer.max_epochs=4", "+callbacks.deny._target_=tests.helpers.DenyWritesUnder",
                 f"+callbacks.deny.dir={ckpts}", "+callbacks.deny.step=20", run_dir=tmp_path, check=False)
    err = " ".join(_clean_error(proc).split())
    per_epoch = torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"]  # written before step 20
    assert 0 < per_epoch < 20
    step = -(-20 // per_epoch) * per_epoch  # the end of the epoch holding step 20
    r = results(tmp_path)
    assert r["status"] == "failed" and r["reason"] == "storage", r
    assert any(f"checkpoint {ckpts / name} at epoch {step // per_epoch - 1}, step {step} " in r["error"]
               for name in ("best.ckpt", "last.ckpt")), r["error"]
    assert r["error"] in err and r["checkpoints"]["last"] == str(ckpts / "last.ckpt")
    assert not list(ckpts.glob("*.tmp-*"))


def test_second_run_into_a_live_directory_leaves_its_files_untouched(tmp_path):
    """Row 4: while a run trains, a second train.py into its directory is refused with a message naming the first,
    and the live run's .hydra/config.yaml, hydra.yaml and overrides.yaml and its lock are byte for byte what they
    were (Hydra used to rewrite them before the lock was checked); its train.log only grew by its own lines."""
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path}", *TINY, "trainer.max_epochs=100000"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    live = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        names = [".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", ".amortlab.lock"]
        deadline = time.time() + 120
        while not ((tmp_path / "checkpoints" / "last.ckpt").is_file() and all((tmp_path / n).is_file()
                                                                              for n in names)):
            assert live.poll() is None and time.time() < deadline, live.stderr.read() if live.poll() else "timeout"
            time.sleep(0.2)
        before, log = {n: (tmp_path / n).read_bytes() for n in names}, (tmp_path / "train.log").read_text()
        err = _clean_error(train(*TINY, "trainer.max_epochs=2", run_dir=tmp_path, check=False))
        assert f"pid {live.pid}" in err and "Another run is writing" in err, err
        assert {n: (tmp_path / n).read_bytes() for n in names} == before
        now = (tmp_path / "train.log").read_text()  # the live run goes on appending its epoch lines, only those
        assert now.startswith(log) and all("/100000 |" in line for line in now[len(log):].splitlines())
        assert "max_epochs: 100000" in before[".hydra/config.yaml"].decode()
        assert not (tmp_path / "results.json").exists()
    finally:
        live.send_signal(signal.SIGTERM)
        live.wait(timeout=120)
    r = results(tmp_path)
    assert r["status"] == "interrupted" and r["config"]["trainer"]["max_epochs"] == 100000
    assert not (tmp_path / ".amortlab.lock").exists()


@pytest.mark.parametrize("case", ["new", "existing"])
def test_unwritable_run_directory_is_one_message(case, tmp_path):
    """Row 11: a run directory that cannot be created (its parent is a regular file) or an existing one that cannot
    be written (/sys/kernel: permission bits do not bind root, sysfs does): one message naming the path, no
    traceback (was: PermissionError / ValueError: Unable to configure handler 'file')."""
    if case == "new":
        (tmp_path / "file").write_text("")
        run = tmp_path / "file" / "run"
    else:
        run = Path("/sys/kernel")
        try:
            os.close(tempfile.mkstemp(dir=run)[0])
            pytest.skip(f"{run} is writable here")
        except OSError:
            pass
    err = " ".join(_clean_error(train(*TINY, run_dir=run, check=False)).split())
    assert f"The run directory {run} cannot be written" in err and "hydra.run.dir" in err, err
    assert err.count("amortlab error") == 1

"""Issue 32 rows 2, 3, 4, 5, 11: records and run directories never lose work (CLI runs with tiny budgets).

An ok results.json is never replaced by a failed attempt; an unwritable run directory or checkpoints/ is one message
before any data loads, and a checkpoint write that fails mid-training stops the run at that step; a second run into
a live run directory leaves the live run's .hydra files untouched; a torch file that is not a checkpoint of this
library is one message naming its keys.
"""

import json

import pytest
import torch

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
    results.json byte for byte; each attempt is a line of attempts.jsonl and the output says which record is
    current. A finished rerun replaces it (the old one kept as results.prev-*) and its summary names the attempts."""
    train(*TINY, run_dir=tmp_path)
    ok = (tmp_path / "results.json").read_bytes()
    proc = train(*TINY, f"ckpt_path={tmp_path / 'nope.ckpt'}", run_dir=tmp_path, check=False)
    assert "nope.ckpt" in _clean_error(proc) and "stays the current record" in proc.stderr
    proc = train(*TINY, "trainer.max_epochs=3", "+callbacks.stop._target_=tests.helpers.SignalAt",
                 "+callbacks.stop.step=20", run_dir=tmp_path, check=False)
    assert proc.returncode == 130 and "stays the current record" in proc.stderr
    assert (tmp_path / "results.json").read_bytes() == ok and not list(tmp_path.glob("results.prev-*"))
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

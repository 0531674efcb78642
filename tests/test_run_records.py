"""Issue 32 rows 2, 3, 4, 5, 11: records and run directories never lose work (CLI runs with tiny budgets).

An ok results.json is never replaced by a failed attempt; an unwritable run directory or checkpoints/ is one message
before any data loads, and a checkpoint write that fails mid-training stops the run at that step; a second run into
a live run directory leaves the live run's .hydra files untouched; a torch file that is not a checkpoint of this
library is one message naming its keys.
"""

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

"""End-to-end runs of train.py in subprocesses: outputs, evaluation of checkpoints, resume, DDP, bad input."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

BASE = ["logger=none", "trainer.max_epochs=3", "importance_samples.test=200"]


def train(*overrides: str, run_dir: Path, env: dict | None = None, check: bool = True, timeout: int = 600):
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *overrides]
    e = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", **(env or {})}
    # SIGINT as at a terminal: a job started in the background (`cmd &`, nohup, some CI runners) inherits SIGINT
    # ignored, and Python then never turns Ctrl-C into KeyboardInterrupt
    proc = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("digits")
    train(*BASE, run_dir=run_dir)
    return run_dir


def test_default_run_writes_results_checkpoints_images(digits_run):
    r = results(digits_run)
    assert r["status"] == "ok"
    m = r["metrics"]
    for split in ("val", "test"):
        assert m[f"{split}/nll"] > 0
        assert {f"{split}/neg_elbo", f"{split}/inference_gap"} <= set(m)  # values: see the independent check below
    assert r["data"]["name"] == "digits"
    assert (r["data"]["train_size"], r["data"]["val_size"], r["data"]["test_size"]) == (1258, 180, 359)
    assert r["data"]["binarization"] == "threshold"
    assert 0 < r["data"]["train_pixel_mean"] < 1
    assert r["config"]["importance_samples"]["test"] == 200
    assert {"fit_s", "test_s", "train_images_per_s"} <= set(r["timing"])
    assert r["versions"]["torch"] == torch.__version__
    assert "git_commit" in r
    assert (digits_run / "checkpoints" / "last.ckpt").is_file()
    assert (digits_run / "checkpoints" / "best.ckpt").is_file()
    assert (digits_run / "images" / "samples_final.png").is_file()
    assert (digits_run / "images" / "reconstructions_final.png").is_file()


def test_evaluate_checkpoint_without_training_reproduces_numbers(digits_run, tmp_path):
    """Evaluation noise is seeded per batch, so re-evaluating the same weights gives the same numbers."""
    ckpt = results(digits_run)["checkpoints"]["evaluated"]
    train("train=false", f"ckpt_path={ckpt}", "logger=none", "importance_samples.test=200", run_dir=tmp_path)
    a, b = results(digits_run)["metrics"], results(tmp_path)["metrics"]
    assert b["test/nll"] == pytest.approx(a["test/nll"], abs=1e-9)
    assert b["test/neg_elbo"] == pytest.approx(a["test/neg_elbo"], abs=1e-9)


def test_checkpoint_from_before_the_model_protocol_still_evaluates(digits_run, tmp_path):
    """Checkpoints written before amortlab/models kept the decoder at ``decoder.*`` and had no ``model.generative``
    node: rewritten to that layout, the same weights re-evaluate to the same numbers."""
    ckpt = torch.load(results(digits_run)["checkpoints"]["evaluated"], map_location="cpu", weights_only=True)
    ckpt["state_dict"] = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    assert any(k.startswith("decoder.") for k in ckpt["state_dict"])
    del ckpt["amortlab_config"]["model"]["generative"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    train("train=false", f"ckpt_path={tmp_path / 'old.ckpt'}", "logger=none", "importance_samples.test=200",
          run_dir=tmp_path / "eval")
    a, b = results(digits_run)["metrics"], results(tmp_path / "eval")["metrics"]
    assert b["test/nll"] == pytest.approx(a["test/nll"], abs=1e-9)
    assert b["val/neg_elbo"] == pytest.approx(a["val/neg_elbo"], abs=1e-9)


def gaussian_draws(module, x: torch.Tensor, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """z ~ q(z | x) ``[k, N, Z]`` and log q(z | x) ``[k, N]`` for the MLP Gaussian encoder, written out."""
    mu, logvar = module.encoder.net(x).chunk(2, -1)
    sigma = torch.exp(0.5 * logvar)
    z = mu + sigma * torch.randn(k, *mu.shape, generator=g, dtype=mu.dtype)
    return z, torch.distributions.Normal(mu, sigma).log_prob(z).sum(-1)


def assert_matches_independent_evaluation(run_dir: Path, draws=gaussian_draws, R: int = 2) -> None:
    """The run's test/nll, test/neg_elbo and test/inference_gap against a from-scratch evaluation of the evaluated
    checkpoint's weights on the whole test split, with fresh noise: the same estimators (IWAE-k, ELBO) written out
    here (Bernoulli log-likelihood from the decoder's logits, standard-normal prior; z and log q from ``draws``;
    log-weights summed in float64), within 4 standard errors of the difference of the split means (each estimator's
    noise given x, estimated from R independent k-draw sets per point); the gap must be resolved by that tolerance."""
    import math

    import torch.nn.functional as F
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from amortlab.build import build_module

    r = results(run_dir)
    m, k = r["metrics"], r["config"]["importance_samples"]["test"]
    ckpt = torch.load(r["checkpoints"]["evaluated"], map_location="cpu", weights_only=True)
    cfg = OmegaConf.create(ckpt["amortlab_config"])
    module = build_module(cfg)
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    dm = instantiate(cfg.dataset)
    dm.setup("test")
    x = dm.splits["test"]  # [N, X]
    N = len(x)
    g = torch.Generator().manual_seed(12345)
    lws, rates = [], []
    with torch.no_grad():
        for _ in range(R):  # R independent sets of k draws per point
            z, log_q = draws(module, x, k, g)  # [k, N, Z], [k, N]
            logits = module.decoder.net(z)
            log_px_z = (x * F.logsigmoid(logits) + (1 - x) * F.logsigmoid(-logits)).sum(-1)
            log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
            lws.append(log_px_z.double() + log_pz.double() - log_q.double())
            rates.append(log_q.double() - log_pz.double())
    # the KL term KL(q || p(z)) by Monte Carlo (reported: closed form for a Gaussian q, else KL_SAMPLES draws)
    from amortlab.evaluation.collapse import KL_SAMPLES
    rate = torch.cat(rates)  # [R k, N]
    se_kl = math.sqrt(float(rate.var(0).sum()) * (1 / len(rate) + 1 / KL_SAMPLES)) / N
    assert abs(m["test/kl"] - float(rate.mean())) <= 4 * se_kl + 1e-4, (m["test/kl"], float(rate.mean()), se_kl)
    lw = torch.stack(lws)  # [R, k, N]
    iwae = torch.logsumexp(lw, 1) - math.log(k)  # [R, N]
    lw = lw.reshape(R * k, N)
    nll, neg_elbo = -iwae.mean(0), -lw.mean(0)  # [N]
    # standard errors of (reported split mean - ours), conditional on the points: the reported numbers use one set of
    # k draws per point; ours R sets (IWAE) / R k draws (ELBO)
    se_nll = math.sqrt(float(iwae.var(0).sum()) * (1 + 1 / R)) / N
    se_elbo = math.sqrt(float(lw.var(0).sum()) / k * (1 + 1 / R)) / N
    assert m["test/n_points"] == N
    assert abs(m["test/nll"] - float(nll.mean())) <= 4 * se_nll + 1e-4, (m["test/nll"], float(nll.mean()), se_nll)
    assert abs(m["test/neg_elbo"] - float(neg_elbo.mean())) <= 4 * se_elbo + 1e-4, (m["test/neg_elbo"], se_elbo)
    gap = float((neg_elbo - nll).mean())
    assert abs(m["test/inference_gap"] - gap) <= 4 * (se_nll + se_elbo) + 1e-4, (m["test/inference_gap"], gap)
    assert gap > 8 * (se_nll + se_elbo)  # a real gap, resolved by the tolerance


def test_reported_numbers_match_an_independent_evaluation_of_the_checkpoint(digits_run, one_thread):
    assert_matches_independent_evaluation(digits_run)


def test_wandb_offline_run_is_local_and_tagged(tmp_path):
    proc = train("trainer.max_epochs=1", "importance_samples.test=20", "logger=wandb", run_dir=tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, proc.stdout
    r = results(tmp_path)
    assert "vae" in r["tags"] and "k:1" in r["tags"]


def test_binarized_mnist_limited_batches(mnist_dir, tmp_path):
    train("dataset=binarized_mnist", f"data_dir={mnist_dir}", "logger=none", "trainer.max_epochs=1",
          "trainer.limit_train_batches=20", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
          "importance_samples=k5", "importance_samples.test=100", run_dir=tmp_path)
    r = results(tmp_path)
    assert r["data"]["train_size"] == 50000 and r["data"]["test_size"] == 10000
    assert 100 < r["metrics"]["test/nll"] < 600
    assert r["timing"]["steps"] == 20


def test_resume_after_kill_gives_same_final_metrics(tmp_path):
    common = [*BASE, "trainer.max_epochs=4", "importance_samples=k5", "importance_samples.test=100"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    train(*common, run_dir=full)
    # 12 steps per epoch on digits: die in the middle of epoch 3 (after last.ckpt of epoch 2 was written)
    proc = train(*common, "+callbacks.kill._target_=tests.helpers.KillAt", "+callbacks.kill.step=30",
                 run_dir=killed, check=False)
    assert proc.returncode == 17
    assert not (killed / "results.json").exists()
    train(*common, f"ckpt_path={killed / 'checkpoints' / 'last.ckpt'}", run_dir=killed)
    a, b = results(full)["metrics"], results(killed)["metrics"]
    for key in ("val/nll", "test/nll", "test/neg_elbo"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key


# Wall-clock seconds per point, measured by each process: they differ between any two runs, of one process or two.
TIMING_KEYS = {"infer_seconds", "refine_seconds", "infer_seconds_per_step"}


def assert_same_on_any_world_size(one: dict, two: dict, rel: float = 1e-9) -> None:
    """Every metric of a 2-process run (``two``) equals the 1-process run's (``one``): the same keys, the same
    integers (counts, active units), floats to ``rel`` (float64 sums added in another order: 1e-9); the keys in
    ``TIMING_KEYS`` (last part of the name) need only be present in both."""
    assert set(one) == set(two), sorted(set(one) ^ set(two))
    for key, a in one.items():
        b = two[key]
        if key.rsplit("/", 1)[-1] in TIMING_KEYS:
            continue
        if isinstance(a, int):
            assert b == a, (key, a, b)
        else:
            assert b == pytest.approx(a, rel=rel, abs=1e-12), (key, a, b)


def val_epoch_reference(ckpt_path: str) -> dict:
    """The per-epoch validation values ``val_epoch/...`` of a checkpoint's weights, computed in this process: the
    module's own validation step on every batch of the validation split, then its metrics' ``compute``."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from amortlab.build import build_module

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    cfg = OmegaConf.create(ckpt["amortlab_config"])
    module = build_module(cfg)
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    dm = instantiate(cfg.dataset)
    for i, batch in enumerate(dm.val_dataloader()):
        module.validation_step(batch, i)
    return module.val_metrics.compute("val_epoch")


@pytest.mark.slow
def test_ddp_two_processes_report_every_value_of_one_process(tmp_path):
    """Trained and evaluated on 2 gloo processes, splits of 180 (val), 359 (test) and 150 (train points) in batches of
    100 -- not multiples of 2 x 100, so the ranks hold different numbers of points: every key of results.json's
    metrics equals the 1-process evaluation of the evaluated checkpoint, the counts are the splits' sizes, and every
    per-epoch validation row counts the whole split, the last one equal to its weights' values in one process."""
    import csv

    common = ["logger=csv", "importance_samples.test=50", "evaluation.train_points=150"]
    two, one = tmp_path / "two", tmp_path / "one"
    train(*common, "trainer.max_epochs=10", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
          run_dir=two)
    r = results(two)
    train(*common, "train=false", f"ckpt_path={r['checkpoints']['evaluated']}", run_dir=one)
    a, d = results(one)["metrics"], r["data"]
    assert (a["val/n_points"], a["test/n_points"], a["train/n_points"]) == (d["val_size"], d["test_size"], 150)
    assert (d["val_size"], d["test_size"]) == (180, 359)
    assert 0 < a["test/active_units"] < r["config"]["model"]["encoder"]["z_dim"]  # a count the shares can change
    assert_same_on_any_world_size(a, r["metrics"])

    rows = list(csv.DictReader((two / "csv" / "version_0" / "metrics.csv").open()))
    val_rows = [row for row in rows if row.get("val_epoch/nll")]
    assert len(val_rows) == 10 and all(float(row["val_epoch/n_points"]) == 180 for row in val_rows)
    logged = {k: float(v) for k, v in val_rows[-1].items() if k.startswith("val_epoch/") and v != ""}
    want = val_epoch_reference(r["checkpoints"]["last"])
    ints = {k for k, v in want.items() if isinstance(v, int)}
    assert ints == {"val_epoch/n_points", "val_epoch/active_units"}
    logged = {k: int(v) if k in ints else v for k, v in logged.items()}
    assert_same_on_any_world_size(want, logged, rel=1e-6)  # Lightning logs float32


# --- bad input: one clear paragraph, no traceback, nothing lost --------------------------------------------------

def _clean_error(proc) -> str:
    assert proc.returncode != 0
    err = proc.stderr
    assert "Traceback" not in err, err[-3000:]
    return err


def test_unknown_group_option(tmp_path):
    err = _clean_error(train("dataset=not_a_dataset", run_dir=tmp_path, check=False))
    assert "not_a_dataset" in err and "Available options" in err and "binarized_mnist" in err


def test_wrong_type(tmp_path):
    err = _clean_error(train("seed=abc", run_dir=tmp_path, check=False))
    assert "seed" in err and "abc" in err


def test_unknown_key(tmp_path):
    err = _clean_error(train("dataset.batchsize=10", run_dir=tmp_path, check=False))
    assert "batchsize" in err


def test_missing_dataset_offline(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _clean_error(train("dataset=omniglot", f"data_dir={empty}", run_dir=tmp_path / "run", check=False))
    assert "chardata.mat" in err and str(empty) in err and "http" in err
    assert list(empty.iterdir()) == []


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
    proc = train(*BASE, "+callbacks.poison._target_=tests.helpers.PoisonAt", "+callbacks.poison.step=30",
                 run_dir=tmp_path, check=False)
    err = _clean_error(proc)
    assert "global step 30" in err and "nan" in err.lower()
    assert "annealing=kl" in err and "callbacks=annealing" not in err  # advice that exists: the annealing group
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file()
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 24  # end of epoch 2, before the poisoned step
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    r = results(tmp_path)
    assert r["status"] == "failed" and "global step 30" in r["error"] and r["reason"] == "non_finite_loss"
    assert r["checkpoints"]["last"] == str(last)  # the record lists the checkpoints that exist


def test_existing_results_are_kept(tmp_path):
    train(*BASE, "trainer.max_epochs=1", "importance_samples.test=20", run_dir=tmp_path)
    first = (tmp_path / "results.json").read_text()
    train(*BASE, "trainer.max_epochs=1", "importance_samples.test=20", run_dir=tmp_path)
    kept = list(tmp_path.glob("results.prev-*.json"))
    assert len(kept) == 1 and kept[0].read_text() == first


def test_annealing_none_overrides_an_experiments_schedule(tmp_path):
    """annealing=none after an overlay that set a schedule (as a study setting does) trains without the callback."""
    run = tmp_path / "run"
    train("logger=none", "trainer.max_epochs=1", "importance_samples.test=50", "annealing=none",
          "+annealing.duration=20", run_dir=run)
    assert results(run)["status"] == "ok"


def test_training_points_are_evaluated_like_the_test_points(tmp_path):
    """evaluation.train_points=N: the final estimator on the first N training images (train/... keys, all N even
    with trainer.limit_test_batches) -- the same numbers as evaluating those rows directly with the final weights."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from amortlab.data.loader import Batch
    from amortlab.build import build_module

    train(*BASE, "evaluation.train_points=30", "evaluation.ckpt=last", "dataset.eval_batch_size=20",
          "trainer.limit_test_batches=1", run_dir=tmp_path)
    r = results(tmp_path)
    m = r["metrics"]
    assert m["test/n_points"] == 20 and m["train/n_points"] == 30
    assert r["timing"]["train_eval_s"] > 0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    cfg = OmegaConf.create(ckpt["amortlab_config"])
    module = build_module(cfg)
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    dm = instantiate(cfg.dataset)
    nll = torch.cat([module.evaluate_batch(b, 200, "train")["nll"] for b in dm.eval_dataloader("train", 30)])
    assert m["train/nll"] == pytest.approx(nll.double().mean().item(), rel=1e-6)
    # and not the test images under the training split's seeds
    wrong = torch.cat([module.evaluate_batch(Batch(dm.splits["test"][i:i + 20], i), 200, "train")["nll"]
                       for i in (0, 20)])[:30]
    assert m["train/nll"] != pytest.approx(wrong.double().mean().item(), rel=1e-6)

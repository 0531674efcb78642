"""A run's record: its results.json written however the run ends (finished, interrupted, failed), the final
evaluation, and the summary printed at the end. Shared by a single run and each member of a stacked one.

An ``ok`` results.json is never replaced by an attempt that did not finish (a failed or interrupted resume or rerun
into the same directory): that attempt's record is appended to ``attempts.jsonl`` beside it instead."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from amortlab.errors import AmortlabError, ChecksumError, DatasetNotFoundError, NonFiniteLossError, StorageError
from amortlab.evaluation.final import evaluate
from amortlab.logging import finish_logger, git_commit, versions, write_results

ATTEMPTS = "attempts.jsonl"  # attempts that did not replace an ok results.json, one JSON record per line
log = logging.getLogger("amortlab")


class RunRecord:
    """The run's ``results`` dict, written to results.json (global rank zero) when the run ends however it ends."""

    def __init__(self, out_dir: Path, rank_zero: bool):
        self.out_dir, self.rank_zero = out_dir, rank_zero
        self.results: dict[str, Any] = {"status": "running", "metrics": {}, "out_dir": str(out_dir),
                                        "versions": versions(), "git_commit": git_commit(), "timing": {}}
        self.logger = None
        self.callbacks: dict[str, L.Callback] = {}
        self.logger_status = "success"

    def write(self) -> Path | None:
        """Write results.json (the previous one kept as results.prev-*), or, when this attempt did not finish and
        results.json holds a finished (``ok``) run, append this attempt to attempts.jsonl and keep results.json.
        Returns the path written (None off rank zero)."""
        if not self.rank_zero:
            return None
        path = self.out_dir / "results.json"
        if self.results.get("status") != "ok" and _finished(path):
            attempts = self.out_dir / ATTEMPTS
            with attempts.open("a") as f:
                f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), **self.results}, default=str) + "\n")
            written = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime))
            print(f"amortlab: this attempt ({self.results.get('status')}) is recorded in {attempts}; {path} (status "
                  f"ok, written {written}) stays the current record of {self.out_dir}.", file=sys.stderr, flush=True)
            return attempts
        return write_results(path, self.results)

    def fail(self, e: BaseException) -> None:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            status, reason = "interrupted", "interrupted"
        elif isinstance(e, NonFiniteLossError):
            status, reason = "failed", "non_finite_loss"
        elif isinstance(e, (DatasetNotFoundError, ChecksumError)):
            status, reason = "failed", "data"
        elif isinstance(e, StorageError):
            status, reason = "failed", "storage"
        elif isinstance(e, AmortlabError):
            status, reason = "failed", "config"
        else:
            status, reason = "failed", "bug"
        message = " ".join(str(e).split()) or type(e).__name__
        self.results.update(status=status, reason=reason, error=message if reason != "bug" else
                            f"{type(e).__name__}: {message}")
        if self.callbacks:
            self.results["checkpoints"] = checkpoint_paths(self.callbacks)
        self.logger_status = "failed"
        self.write()

    def close_logger(self) -> None:
        if not self.logger:
            return
        if self.rank_zero:
            finish_logger(self.logger, self.results["metrics"], self.logger_status)
        else:
            self.logger.finalize(self.logger_status)
        self.logger = None


def _finished(path: Path) -> bool:
    """True if ``path`` is a readable results.json of a finished run (status ok)."""
    try:
        return json.loads(path.read_text()).get("status") == "ok"
    except (OSError, ValueError, AttributeError):
        return False


def checkpoint_paths(callbacks: dict[str, L.Callback]) -> dict[str, str | None]:
    """{"best": path, "last": path}: each checkpoint callback's file, by its name without ``checkpoint_``."""
    return {name.removeprefix("checkpoint_"): cb.best_model_path or None for name, cb in callbacks.items()
            if isinstance(cb, ModelCheckpoint)}


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a scheduler's stop, ``kill``) is handled like Ctrl-C (a KeyboardInterrupt at once) during training
    and the final evaluation: Lightning stops cleanly and the run records ``status: interrupted``. Main thread only
    (signal handlers cannot be set elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def final_evaluation(trainer: L.Trainer, module, dm, cfg: DictConfig, timing: dict[str, Any],
                     metrics: dict[str, Any] | None = None, splits: list[str] | None = None) -> dict[str, Any]:
    """The final numbers: the configured estimator with k = importance_samples.test on the validation split
    (``evaluation.val``), the test split and the first ``evaluation.train_points`` training images (``train/...``:
    the same estimator, k and seeds; ``trainer.limit_test_batches`` does not apply there, N says how many).

    Each split's values go into ``metrics`` (returned) and its name onto ``splits`` as soon as the split is done, so
    an interrupted evaluation leaves the finished splits there; a line is logged as each split starts."""
    metrics = {} if metrics is None else metrics
    splits = [] if splits is None else splits
    k, est = module.k_test, module.estimator

    def run_split(split: str, loader) -> None:
        log.info("final evaluation: %s split (%s, IWAE-%d) started", split, est.name, k)
        metrics.update(evaluate(trainer, module, loader, split, k, est))
        splits.append(split)

    t0 = time.perf_counter()
    if cfg.evaluation.val:
        run_split("val", dm.val_dataloader())
    t1 = time.perf_counter()
    timing["val_s"] = round(t1 - t0, 3)
    run_split("test", dm.test_dataloader())
    timing["test_s"] = round(time.perf_counter() - t1, 3)
    n_test = metrics.get("test/n_points", dm.info()["test_size"])  # limit_test_batches aware
    timing["test_images_per_s"] = round(n_test / max(timing["test_s"], 1e-9), 2)
    n_train = int(cfg.evaluation.get("train_points") or 0)
    if n_train:
        t2 = time.perf_counter()
        limit = trainer.limit_test_batches
        trainer.limit_test_batches = 1.0
        try:
            run_split("train", dm.eval_dataloader("train", n_train))
        finally:
            trainer.limit_test_batches = limit
        timing["train_eval_s"] = round(time.perf_counter() - t2, 3)
    return metrics


def summary(results: dict[str, Any], path: Path) -> str:
    m, t, d = results["metrics"], results["timing"], results["data"]
    cfg = results["config"]

    def f(key: str) -> str:
        v = m.get(key)
        return f"{v:10.3f}" if isinstance(v, float) and math.isfinite(v) else f"{'-':>10}"

    k = cfg["importance_samples"]["test"]
    est = results["estimator"]
    name = f"NLL (IWAE-{k})" if est == "iwae" else f"NLL ({est}, IWAE-{k})"
    lines = [
        "",
        f"amortlab | {' '.join(results['tags'])} | data:{d['name']} ({d['train_size']}/{d['val_size']}/"
        f"{d['test_size']}, {d['binarization']})",
        f"{'split':<6}{name + ' [n]':>26}{'-ELBO':>10}{'inf. gap':>10}{'AU':>5}{'KL':>10}{'MI':>10}"
        + (f"{'NLL (IWAE)':>12}" if est != "iwae" else ""),
    ]
    for split in ("val", "test", "train"):
        n = m.get(f"{split}/n_points")
        if split == "train" and n is None:
            continue
        au = m.get(f"{split}/active_units", "-")
        row = (f"{split:<6}{f(split + '/nll') + (f' [{n}]' if n is not None else ''):>26}{f(split + '/neg_elbo')}"
               f"{f(split + '/inference_gap')}{au:>5}{f(split + '/kl')}{f(split + '/mutual_info')}")
        lines.append(row + (f"  {f(split + '/nll_iwae')}" if est != "iwae" else ""))
    layers = sorted((k.rsplit("/", 1)[1] for k in m if k.startswith("test/active_units/")), key=lambda z: int(z[1:]))
    if layers:  # several stochastic layers: AU per layer (z1 nearest the data)
        lines.append("active units per layer (test): " + ", ".join(f"{z} {m[f'test/active_units/{z}']}"
                                                                   for z in layers))
    if "test/nll_per_step" in m:  # sequences: the same numbers per time step, and the AVF updates
        per = [f"{label} {m[key]:.3f}" for key, label in (
            ("test/nll_per_step", "NLL"), ("test/nll_iwae_per_step", "NLL (IWAE)"),
            ("test/neg_elbo_per_step", "-ELBO"), ("test/kl_per_step", "KL"), ("test/nll_kalman_per_step", "exact"))
            if isinstance(m.get(key), float) and math.isfinite(m[key])]
        lines.append(f"per step (test, {m.get('test/steps', 0):.1f} steps per sequence): " + ", ".join(per)
                     + f"; inference {1e3 * m.get('test/infer_seconds_per_step', 0.0):.3f} ms per step")
        upd = sorted((int(k.rsplit("/", 1)[1]), v) for k, v in m.items() if k.startswith("test/neg_elbo_step/"))
        if upd:
            lines.append("-ELBO after each AVF update (test, per sequence): "
                         + ", ".join(f"{i}: {v:.3f}" for i, v in upd))
    lines += [
        f"time: fit {t.get('fit_s', 0):.1f}s ({t.get('train_images_per_s') or 0:.0f} img/s), "
        f"eval val {t.get('val_s', 0):.1f}s + test {t.get('test_s', 0):.1f}s"
        + (f" + train points {t['train_eval_s']:.1f}s" if t.get("train_eval_s") is not None else ""),
        f"results: {path} (the current record"
        + (f"; attempts that did not finish: {Path(path).parent / ATTEMPTS})"
           if (Path(path).parent / ATTEMPTS).is_file() else ")"),
        f"checkpoints: {Path(path).parent / 'checkpoints'}   images: {Path(path).parent / 'images'}",
    ]
    return "\n".join(lines)

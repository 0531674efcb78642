"""What ``train.py`` does with a composed config: build -> fit -> evaluate -> results.json + summary.

Kept out of train.py so tests and sweep.py can call it, and so train.py is only the Hydra entry point.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

from amortlab.callbacks import Throughput
from amortlab.data.download import default_data_dir
from amortlab.errors import AmortlabError, ChecksumError, DatasetNotFoundError, NonFiniteLossError
from amortlab.evaluation.final import evaluate
from amortlab.logging import describe_logger, finish_logger, git_commit, versions, write_results
from amortlab.methods.base import migrate_state_dict
from amortlab.runlock import RunLock
from amortlab.validate import check_config, check_data, check_stored_targets

MODEL_GROUPS = ("dataset", "model", "inference", "encoder_regularizer")  # what a checkpoint's weights depend on
log = logging.getLogger("amortlab")


def _instantiate(node: Any, what: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` whose failures become one readable paragraph naming the config group."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, AmortlabError):
            raise cause from None
        raise AmortlabError(
            f"Could not build '{what}' from its config: {cause}. Check the keys under '{what}' (print the composed "
            f"config with `python train.py --cfg job`) and fix or remove the offending override.") from e


def load_checkpoint_config(ckpt_path: str) -> dict | None:
    """The config a train.py checkpoint stores (tensors and plain values only: ``weights_only=True``); the groups a
    run takes from it are checked by ``check_stored_targets`` before they are used."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise AmortlabError(f"ckpt_path={ckpt_path} does not exist. Point ckpt_path at a checkpoint written by "
                            f"train.py (e.g. <run dir>/checkpoints/last.ckpt or best.ckpt).")
    return read_checkpoint(path).get("amortlab_config")


def read_checkpoint(path: str | Path) -> dict:
    """``torch.load(path, weights_only=True)``: a checkpoint with anything but tensors and plain containers (a
    pickled object that could run code) is refused with one message."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types; all mean the same to a user
        reason = " ".join(str(e).split())[:300]
        raise AmortlabError(f"Cannot read the checkpoint {path} as tensors and plain values ({type(e).__name__}: "
                            f"{reason}). It is corrupt, not a train.py checkpoint, or carries pickled objects, "
                            f"which are never loaded (they could run code). Point ckpt_path at <run dir>/"
                            f"checkpoints/best.ckpt or last.ckpt of a train.py run.") from None


# keys a resumed run may change when the command asks: how long it trains, how it is evaluated and logged
RESUME_COMPATIBLE = ("trainer", "evaluation", "logger", "callbacks", "name", "group", "tags", "test", "train",
                     "ckpt_path", "skip_if_done", "data_dir", "x_dim", "importance_samples.val",
                     "importance_samples.test", "dataset.data_dir", "dataset.eval_batch_size", "dataset.download",
                     "dataset.verify_checksum")
# keys that belong to this invocation (this machine's data, this run directory's paths), never restored
RUN_LOCAL = ("data_dir", "ckpt_path", "train", "test", "skip_if_done", "x_dim", "name", "group", "tags", "logger",
             "callbacks", "dataset.data_dir", "dataset.download", "dataset.verify_checksum", "trainer.default_root_dir")


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: node}


def _covered(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def command_overrides() -> list[str]:
    """The command line's overrides (Hydra's ``overrides.task``); empty outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _set(node: dict, dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    for key in path:
        node = node.setdefault(key, {})
    node[last] = value


def resume_config(cfg: DictConfig, saved: dict[str, Any], overrides: list[str]) -> list[str]:
    """Restore the run's config from its checkpoint into ``cfg`` (in place): every setting the command does not
    mention comes from the checkpoint, not from today's defaults (``RUN_LOCAL`` keys — this machine's data dir, this
    run directory's paths, the logger and callbacks — from the command). A mentioned setting may differ only where
    that is compatible (``RESUME_COMPATIBLE``: more epochs, another evaluation, ...); those changes are returned for
    the log. An incompatible one (another model, batch size, k, optimiser, seed, ...) is refused with the keys
    named."""
    asked = {o.split("=", 1)[0].lstrip("+~").split("@")[0].replace("/", ".") for o in overrides}
    current = OmegaConf.to_container(cfg, resolve=True)
    now, before = _flat(current), _flat(saved)
    differ = [k for k in sorted(set(now) | set(before)) if now.get(k, "<absent>") != before.get(k, "<absent>")]
    refused = [k for k in differ if _covered(k, asked) and not _covered(k, RESUME_COMPATIBLE + RUN_LOCAL)]
    if refused:
        shown = "; ".join(f"{k}: {before.get(k, '<absent>')!r} in the checkpoint, {now.get(k, '<absent>')!r} now"
                          for k in refused[:8])
        raise AmortlabError(f"Resuming from {cfg.ckpt_path} with settings the checkpoint was not trained with ("
                            f"{shown}). A resumed run keeps its model, data, k, optimiser and seed; drop these "
                            f"overrides (they are restored from the checkpoint), or start a new run without "
                            f"ckpt_path.")
    keep = [k for k in differ if _covered(k, RUN_LOCAL) or _covered(k, asked)]  # the command's values
    groups = sorted({k.split(".")[0] for k in differ if k not in keep and k.split(".")[0] in saved
                     and not _covered(k.split(".")[0], RUN_LOCAL)})
    check_stored_targets({g: saved[g] for g in groups}, str(cfg.ckpt_path))
    with open_dict(cfg):
        for group in groups:
            node = saved[group]
            if isinstance(node, dict):
                node = OmegaConf.to_container(OmegaConf.create(node))
                for k in keep:
                    if k.startswith(group + ".") and k in now:
                        _set(node, k[len(group) + 1:], now[k])
                node = OmegaConf.create(node)
            cfg[group] = node
    return [f"{k}: {before.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}" for k in differ
            if _covered(k, asked) and not _covered(k, RUN_LOCAL)]


def prepare_config(cfg: DictConfig) -> DictConfig:
    """Fill derived values: data_dir; for eval-only runs the model-defining groups from the checkpoint; for a
    resumed run its own settings from the checkpoint (``resume_config``)."""
    with open_dict(cfg):
        if cfg.data_dir is None:
            cfg.data_dir = default_data_dir()
    if not cfg.train:
        if not cfg.ckpt_path:
            raise AmortlabError("train=false needs a checkpoint to evaluate: add ckpt_path=<run dir>/checkpoints/"
                                "best.ckpt (or last.ckpt).")
        saved = load_checkpoint_config(cfg.ckpt_path)
        if saved is not None:
            check_stored_targets({g: saved[g] for g in MODEL_GROUPS if g in saved}, str(cfg.ckpt_path))
            with open_dict(cfg):
                for group in MODEL_GROUPS:
                    if group in saved:
                        node = OmegaConf.create(saved[group])
                        if group == "dataset":  # evaluate on this machine's copy of the data
                            node.data_dir = cfg.dataset.data_dir
                            node.seed = cfg.dataset.seed
                        if group == "model" and "generative" not in node:  # written before amortlab/models
                            node.generative = {"_target_": "amortlab.models.FlatLatentModel",
                                               "decoder": "${model.decoder}"}
                        cfg[group] = node
    elif cfg.ckpt_path:
        saved = load_checkpoint_config(cfg.ckpt_path)
        if saved is not None:
            for change in resume_config(cfg, saved, command_overrides()):
                log.info("resuming with a changed setting: %s", change)
    return cfg


def build_module(cfg: DictConfig):
    """The method: ``inference`` instantiated with the generative model (``model.generative``), the estimator
    (``evaluation.estimator``) and the regularizer; refuses incompatible choices before anything is trained."""
    check_config(cfg)
    regularizer = _instantiate(cfg.encoder_regularizer, "encoder_regularizer")
    optim = {
        "optimizer": _instantiate(cfg.optim.optimizer, "optim.optimizer"),
        "lr_scheduler": _instantiate(cfg.optim.lr_scheduler, "optim.lr_scheduler") if cfg.optim.get(
            "lr_scheduler") else None,
        "interval": cfg.optim.get("interval"),
    }
    estimator = _instantiate(cfg.evaluation.estimator, "evaluation.estimator", _convert_="all")
    evaluation = {k: v for k, v in OmegaConf.to_container(cfg.evaluation).items() if k != "estimator"}
    module = _instantiate(cfg.inference, "inference", model=cfg.model.generative, regularizer=regularizer,
                          importance_samples=OmegaConf.to_container(cfg.importance_samples),
                          optim=optim, evaluation=evaluation, estimator=estimator)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    module.check_compatible()
    return module


def run_name(cfg: DictConfig, module) -> str:
    return cfg.name or "-".join([module.tags()[0], cfg.dataset._target_.rsplit(".", 1)[-1].replace(
        "DataModule", "").lower(), f"s{cfg.seed}"])


def build_logger(cfg: DictConfig, module, data_name: str):
    """The configured logger (False for ``logger=none``), after the run's name and tags are filled in (the logger
    yaml interpolates ``${name}``, ``${group}``, ``${tags}`` where it uses them)."""
    if not cfg.logger:
        return False
    with open_dict(cfg):
        cfg.name = run_name(cfg, module)
        cfg.tags = [*module.tags(), f"data:{data_name}", *cfg.tags]
    return _instantiate(cfg.logger, "logger")


def build_callbacks(cfg: DictConfig, validates: bool) -> dict[str, L.Callback]:
    """The ``callbacks`` group, by name; entries that are null or have a null ``_target_`` (annealing=none) are
    skipped, and a checkpoint that monitors a val/ metric is dropped when validation is off."""
    out = {}
    for name, node in (cfg.callbacks or {}).items():
        if not node or not node.get("_target_"):
            continue
        cb = _instantiate(node, f"callbacks.{name}")
        if isinstance(cb, ModelCheckpoint) and str(cb.monitor or "").startswith("val") and not validates:
            continue
        out[name] = cb
    return out


def _checkpoints(callbacks: dict[str, L.Callback]) -> dict[str, str | None]:
    """{"best": path, "last": path}: each checkpoint callback's file, by its name without ``checkpoint_``."""
    return {name.removeprefix("checkpoint_"): cb.best_model_path or None for name, cb in callbacks.items()
            if isinstance(cb, ModelCheckpoint)}


def load_weights(module, ckpt_path: str) -> None:
    """Load a train.py checkpoint's weights into ``module`` (tensors only: ``weights_only=True``)."""
    module.load_state_dict(migrate_state_dict(read_checkpoint(ckpt_path)["state_dict"]))


def quiet_lightning() -> None:
    """Lightning logs through its own handler; stop Hydra's root handler printing each line a second time and
    drop advice that does not apply to in-memory tensor loaders."""
    logging.getLogger("lightning.pytorch").propagate = False
    logging.getLogger("lightning.fabric").propagate = False
    for msg in (".*does not have many workers.*", ".*smaller than the logging interval.*",
                ".*isinstance\\(treespec, LeafSpec\\).*", ".*Checkpoint directory .* exists and is not empty.*",
                ".*overridden `transfer_batch_to_device`.*", ".*anonymous setting has no effect.*"):
        warnings.filterwarnings("ignore", message=msg)


def run(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Train (unless ``train=false``) and evaluate; write ``out_dir/results.json``; return the results dict.

    Every path leaves a record: a finished run ``status: ok``; Ctrl-C / SIGTERM during training ``interrupted``
    (the last checkpoint kept, resumable); any error ``failed`` with its message (``error``) and ``reason`` (config,
    data, non_finite_loss, bug); the logger (W&B run) is closed on every path. A second live run in the same
    directory is refused (``RunLock``).
    """
    if cfg.get("stack") and cfg.stack.seeds:
        from amortlab.stack.run import run_stacked  # N seeds as one stacked computation, one record each

        return run_stacked(cfg, out_dir)
    out_dir = Path(out_dir)
    quiet_lightning()
    if cfg.skip_if_done and (out_dir / "results.json").is_file():
        done = json.loads((out_dir / "results.json").read_text())
        if done.get("status") == "ok":
            print(f"amortlab: {out_dir} already holds a finished run (skip_if_done=true); not running it again.")
            return done
    rank_zero = rank_zero_only.rank == 0
    with RunLock(out_dir, enabled=rank_zero):
        record = RunRecord(out_dir, rank_zero)
        try:
            return _run(cfg, out_dir, record)
        except BaseException as e:
            record.fail(e)
            raise
        finally:
            record.close_logger()


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
        return write_results(self.out_dir / "results.json", self.results) if self.rank_zero else None

    def fail(self, e: BaseException) -> None:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            status, reason = "interrupted", "interrupted"
        elif isinstance(e, NonFiniteLossError):
            status, reason = "failed", "non_finite_loss"
        elif isinstance(e, (DatasetNotFoundError, ChecksumError)):
            status, reason = "failed", "data"
        elif isinstance(e, AmortlabError):
            status, reason = "failed", "config"
        else:
            status, reason = "failed", "bug"
        message = " ".join(str(e).split()) or type(e).__name__
        self.results.update(status=status, reason=reason, error=message if reason != "bug" else
                            f"{type(e).__name__}: {message}")
        if self.callbacks:
            self.results["checkpoints"] = _checkpoints(self.callbacks)
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


def _run(cfg: DictConfig, out_dir: Path, record: RunRecord) -> dict[str, Any]:
    results, timing = record.results, record.results["timing"]
    check_config(cfg)
    cfg = prepare_config(cfg)
    check_config(cfg)  # again: a resumed or re-evaluated run's restored groups
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    dm = _instantiate(cfg.dataset, "dataset")
    dm.setup("fit")
    results["data"] = dm.info()
    check_data(cfg, results["data"]["train_size"])
    with open_dict(cfg):
        cfg.x_dim = dm.x_dim
        if cfg.trainer.get("enable_progress_bar") is None:  # on when a person watches a terminal
            cfg.trainer.enable_progress_bar = sys.stderr.isatty()
    module = build_module(cfg)
    if cfg.train and not cfg.ckpt_path:
        module.init_output_bias(dm.train_mean)
    results.update(config=module.run_config, tags=module.tags(), axes=module.axes(),
                   estimator=module.estimator.name)

    validates = cfg.trainer.get("limit_val_batches") not in (0, 0.0)
    callbacks = record.callbacks = build_callbacks(cfg, validates)
    logger = record.logger = build_logger(cfg, module, dm.name)
    trainer: L.Trainer = _instantiate(cfg.trainer, "trainer", logger=logger, callbacks=list(callbacks.values()))
    if logger:
        logger.log_hyperparams(module.run_config)

    eval_ckpt = cfg.ckpt_path
    if cfg.train:
        t0 = time.perf_counter()
        with sigterm_as_interrupt():
            try:
                trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path)
            except SystemExit:  # Lightning's answer to Ctrl-C: clean up, then exit(1)
                if not trainer.interrupted:
                    raise
        timing["fit_s"] = round(time.perf_counter() - t0, 3)
        throughput = next((c for c in callbacks.values() if isinstance(c, Throughput)), None)
        timing["train_images_per_s"] = round(throughput.images_per_s, 1) if throughput and \
            throughput.images_per_s else None
        timing["epochs"] = trainer.current_epoch
        timing["steps"] = trainer.global_step
        if trainer.interrupted:
            last = _checkpoints(callbacks).get("last")
            results.update(status="interrupted", reason="interrupted", checkpoints=_checkpoints(callbacks),
                           error="Training was interrupted (Ctrl-C or SIGTERM) at epoch "
                                 f"{trainer.current_epoch}, step {trainer.global_step}; not evaluated. "
                                 + (f"Resume with ckpt_path={last}." if last else "No checkpoint was written yet."))
            record.logger_status = "failed"
            record.write()
            print(f"\namortlab: interrupted; {results['error']}", file=sys.stderr, flush=True)
            return results
        best = _checkpoints(callbacks).get("best") or ""
        eval_ckpt = best if (cfg.evaluation.ckpt == "best" and best) else None  # None: the final weights
    results["checkpoints"] = {"evaluated": eval_ckpt or "final weights", **_checkpoints(callbacks)}

    if cfg.test:
        if eval_ckpt:
            load_weights(module, eval_ckpt)
        results["metrics"].update(final_evaluation(trainer, module, dm, cfg, timing))
    results["status"] = "ok"
    if cfg.test and trainer.is_global_zero:
        module.estimator.after_run(module, dm, results["metrics"], out_dir, run_name(cfg, module), logger,
                                   int(cfg.evaluation.seed))
    path = record.write()
    if path is not None:
        text = summary(results, path) + describe_logger(logger)
        if logging.getLogger().handlers:  # Hydra's logging: console and <run dir>/train.log
            log.info(text)
        else:
            print(text, file=sys.stdout, flush=True)
    return results


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a scheduler's stop, ``kill``) is handled like Ctrl-C during training: Lightning stops cleanly and
    the run records ``status: interrupted``. Main thread only (signal handlers cannot be set elsewhere)."""
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


def final_evaluation(trainer: L.Trainer, module, dm, cfg: DictConfig, timing: dict[str, Any]) -> dict[str, Any]:
    """The final numbers: the configured estimator with k = importance_samples.test on the validation split
    (``evaluation.val``), the test split and the first ``evaluation.train_points`` training images (``train/...``:
    the same estimator, k and seeds; ``trainer.limit_test_batches`` does not apply there, N says how many)."""
    metrics: dict[str, Any] = {}
    k, est = module.k_test, module.estimator
    t0 = time.perf_counter()
    if cfg.evaluation.val:
        metrics.update(evaluate(trainer, module, dm.val_dataloader(), "val", k, est))
    t1 = time.perf_counter()
    metrics.update(evaluate(trainer, module, dm.test_dataloader(), "test", k, est))
    timing["val_s"] = round(t1 - t0, 3)
    timing["test_s"] = round(time.perf_counter() - t1, 3)
    n_test = metrics.get("test/n_points", dm.info()["test_size"])  # limit_test_batches aware
    timing["test_images_per_s"] = round(n_test / max(timing["test_s"], 1e-9), 2)
    n_train = int(cfg.evaluation.get("train_points") or 0)
    if n_train:
        t2 = time.perf_counter()
        limit = trainer.limit_test_batches
        trainer.limit_test_batches = 1.0
        try:
            metrics.update(evaluate(trainer, module, dm.eval_dataloader("train", n_train), "train", k, est))
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
        f"{'split':<6}{name + ' [n]':>26}{'-ELBO':>10}{'inf. gap':>10}{'AU':>5}"
        + (f"{'NLL (IWAE)':>12}" if est != "iwae" else ""),
    ]
    for split in ("val", "test", "train"):
        n = m.get(f"{split}/n_points")
        if split == "train" and n is None:
            continue
        au = m.get(f"{split}/active_units", "-")
        row = (f"{split:<6}{f(split + '/nll') + (f' [{n}]' if n is not None else ''):>26}{f(split + '/neg_elbo')}"
               f"{f(split + '/inference_gap')}{au:>5}")
        lines.append(row + (f"  {f(split + '/nll_iwae')}" if est != "iwae" else ""))
    lines += [
        f"time: fit {t.get('fit_s', 0):.1f}s ({t.get('train_images_per_s') or 0:.0f} img/s), "
        f"eval val {t.get('val_s', 0):.1f}s + test {t.get('test_s', 0):.1f}s"
        + (f" + train points {t['train_eval_s']:.1f}s" if t.get("train_eval_s") is not None else ""),
        f"results: {path}",
        f"checkpoints: {Path(path).parent / 'checkpoints'}   images: {Path(path).parent / 'images'}",
    ]
    return "\n".join(lines)


def compose_config(overrides: list[str] | None = None, output_dir: str | Path | None = None) -> DictConfig:
    """Compose ``conf/config.yaml`` with ``overrides`` outside of ``@hydra.main`` (for tests, benchmarks, notebooks).

    Sets the global HydraConfig so ``${hydra:runtime.output_dir}`` resolves (to ``output_dir``).
    """
    import tempfile

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    import amortlab.schemas  # noqa: F401

    conf_dir = str(Path(__file__).resolve().parent.parent / "conf")
    output_dir = str(output_dir or tempfile.mkdtemp(prefix="amortlab-"))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        cfg = compose("config", overrides=[*(overrides or []), f"hydra.run.dir={output_dir}"],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = output_dir
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def build_from_overrides(overrides: list[str] | None = None):
    """(module, datamodule) for the composed config with ``overrides``, the data set up (benchmarks, notebooks)."""
    cfg = compose_config(overrides)
    dm = _instantiate(cfg.dataset, "dataset")
    dm.setup()
    with open_dict(cfg):
        cfg.x_dim = dm.x_dim
    return build_module(cfg), dm

"""What ``train.py`` does with a composed config: resume settings -> build -> fit -> evaluate -> results.json +
summary (``N`` seeds at once go to ``amortlab.stack``).

Kept out of train.py so tests and sweep.py can call it, and so train.py is only the Hydra entry point.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from amortlab.build import (build_callbacks, build_logger, build_module, command_overrides, instantiate_group,
                            load_checkpoint_config, load_weights, quiet_lightning, run_name)
from amortlab.callbacks import Throughput
from amortlab.callbacks.checkpoint import use_checked_checkpoint_io
from amortlab.data.download import default_data_dir
from amortlab.data.fused import fused_fit
from amortlab.errors import AmortlabError
from amortlab.logging import describe_logger
from amortlab.record import RunRecord, checkpoint_paths, final_evaluation, sigterm_as_interrupt, summary
from amortlab.runlock import RunLock, check_writable
from amortlab.validate import check_config, check_data, check_stored_targets

MODEL_GROUPS = ("dataset", "model", "inference", "encoder_regularizer")  # what a checkpoint's weights depend on
log = logging.getLogger("amortlab")


# keys a resumed run may change when the command asks: how long it trains, how it is evaluated and logged
RESUME_COMPATIBLE = ("trainer", "evaluation", "logger", "callbacks", "name", "group", "tags", "test", "train",
                     "ckpt_path", "skip_if_done", "data_dir", "x_dim", "image_shape", "step_dim",
                     "importance_samples.val", "importance_samples.test", "dataset.data_dir",
                     "dataset.eval_batch_size", "dataset.download", "dataset.verify_checksum")
# keys that belong to this invocation (this machine's data, this run directory's paths), never restored
RUN_LOCAL = ("data_dir", "ckpt_path", "train", "test", "skip_if_done", "x_dim", "image_shape", "step_dim", "name",
             "group", "tags", "logger", "callbacks", "dataset.data_dir", "dataset.download", "dataset.verify_checksum",
             "trainer.default_root_dir")
DATA_DERIVED = ("x_dim", "image_shape", "step_dim")  # filled in from the dataset (``_run``), read by ${x_dim} etc.


def _differences(keys: list[str], before: dict, now: dict, label: str) -> str:
    """``key: <checkpoint value> in the checkpoint, <value> <label>`` for the first 8 keys, for one message."""
    return "; ".join(f"{k}: {before.get(k, '<absent>')!r} in the checkpoint, {now.get(k, '<absent>')!r} {label}"
                     for k in keys[:8])


def _asked(overrides: list[str]) -> set[str]:
    """The config keys a command's overrides name (``+a.b=1``, ``~c``, ``group@pkg=x``, ``g/sub=x`` -> a.b, c, ...)."""
    return {o.split("=", 1)[0].lstrip("+~").split("@")[0].replace("/", ".") for o in overrides}


def _as_the_run_resolved(cfg: DictConfig, saved: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` flattened and resolved with the data-derived sizes the checkpoint's run had (they are filled in only
    after the data loads): ``${x_dim}`` inside a group then compares equal to the checkpoint's value."""
    probe = copy.deepcopy(cfg)
    with open_dict(probe):
        for key in DATA_DERIVED:
            if saved.get(key) is not None:
                probe[key] = saved[key]
    return _flat(OmegaConf.to_container(probe, resolve=True))


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: node}


def _covered(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


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
    asked = _asked(overrides)
    now, before = _as_the_run_resolved(cfg, saved), _flat(saved)
    differ = [k for k in sorted(set(now) | set(before)) if now.get(k, "<absent>") != before.get(k, "<absent>")]
    refused = [k for k in differ if _covered(k, asked) and not _covered(k, RESUME_COMPATIBLE + RUN_LOCAL)]
    if refused:
        shown = _differences(refused, before, now, "now")
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
            if isinstance(node, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(cfg, group)):
                for key in node:  # a typed group (importance_samples, evaluation): its fields, not a plain dict
                    cfg[group][key] = node[key]
            else:
                cfg[group] = node
    return [f"{k}: {before.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}" for k in differ
            if _covered(k, asked) and not _covered(k, RUN_LOCAL)]


# dataset keys an evaluation may set without changing the data the model sees
EVALUATION_LOCAL = ("dataset.data_dir", "dataset.seed", "dataset.download", "dataset.verify_checksum",
                    "dataset.eval_batch_size")


def _evaluation_overrides(cfg: DictConfig, saved: dict[str, Any], overrides: list[str]) -> bool:
    """For ``train=false``: refuse a command override of a group the checkpoint replaces (``MODEL_GROUPS``: its
    dataset, model, inference, encoder regularizer) that differs from the checkpoint's value, naming it. The one
    exception is the dataset with ``evaluation.other_data=true``: the checkpoint is then evaluated on the command's
    dataset (same image shape, checked once the data loads); returns whether that is the case."""
    asked = _asked(overrides)
    other_data = bool(cfg.evaluation.get("other_data", False))
    asked = {"model.encoder" if a.split(".")[0] in ("posterior", "encoder_size") else a for a in asked}
    mentioned = [a for a in asked if a.split(".")[0] in MODEL_GROUPS and not _covered(a, EVALUATION_LOCAL)]
    if not mentioned:
        if other_data:
            raise AmortlabError("evaluation.other_data=true evaluates the checkpoint on another dataset, but the "
                                "command names none: add dataset=<name> (or dataset.<key>=<value>), or drop "
                                "evaluation.other_data.")
        return False
    now, before = _as_the_run_resolved(cfg, saved), _flat(saved)
    differ = sorted(k for k in set(now) | set(before) if _covered(k, mentioned) and not _covered(k, EVALUATION_LOCAL)
                    and str(now.get(k, "<absent>")) != str(before.get(k, "<absent>")))
    refused = [k for k in differ if not (other_data and k.split(".")[0] == "dataset")]
    if refused:
        shown = _differences(refused, before, now, "asked")
        raise AmortlabError(f"train=false evaluates the checkpoint {cfg.ckpt_path} with its own dataset, model, "
                            f"inference and encoder regularizer; the command overrides them ({shown}). Drop these "
                            f"overrides; to evaluate the model on another dataset of the same shape, add "
                            f"evaluation.other_data=true.")
    return other_data and any(k.split(".")[0] == "dataset" for k in differ)


def _check_other_data(cfg: DictConfig, dm) -> dict[str, Any]:
    """``evaluation.other_data=true``: the data must have the shape the checkpoint was trained on; returns what is
    recorded in results.json (``other_data``: the checkpoint's dataset and the evaluated one)."""
    saved = load_checkpoint_config(cfg.ckpt_path) or {}
    trained = {k: saved.get(k) for k in DATA_DERIVED}
    now = {"x_dim": dm.x_dim, "image_shape": list(dm.image_shape), "step_dim": getattr(dm, "step_dim", None)}
    if any(trained[k] is not None and trained[k] != now[k] for k in DATA_DERIVED):
        raise AmortlabError(f"evaluation.other_data=true: the checkpoint {cfg.ckpt_path} was trained on data of "
                            f"shape {trained}, the command's dataset ({dm.name}) has {now}; evaluate it on a dataset "
                            f"of the same shape.")
    return {"checkpoint_dataset": saved.get("dataset"),
            "evaluated_dataset": OmegaConf.to_container(cfg.dataset, resolve=True)}


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
            other_data = _evaluation_overrides(cfg, saved, command_overrides())
            with open_dict(cfg):
                if isinstance(saved.get("importance_samples"), dict) and "train" in saved["importance_samples"]:
                    cfg.importance_samples.train = saved["importance_samples"]["train"]  # the run's k: name, axes
                for group in MODEL_GROUPS:
                    if group == "dataset" and other_data:
                        continue  # asked for explicitly (evaluation.other_data=true): the command's data
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


def run(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Train (unless ``train=false``) and evaluate; write ``out_dir/results.json``; return the results dict.

    Every path leaves a record: a finished run ``status: ok``; Ctrl-C / SIGTERM during training ``interrupted``
    (the last checkpoint kept, resumable), during the final evaluation ``interrupted`` with the finished splits'
    metrics and the command that redoes it (``evaluation_interrupted``); any error ``failed`` with its message
    (``error``) and ``reason`` (config, data, storage, non_finite_loss, bug); the logger (W&B run) is closed on every
    path. A second live run in the same directory is refused (``RunLock``).
    """
    rank_zero = rank_zero_only.rank == 0
    if rank_zero:
        check_writable(out_dir)
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
    with RunLock(out_dir, enabled=rank_zero):
        record = RunRecord(out_dir, rank_zero)
        try:
            return _run(cfg, out_dir, record)
        except BaseException as e:
            record.fail(e)
            raise
        finally:
            record.close_logger()


def _run(cfg: DictConfig, out_dir: Path, record: RunRecord) -> dict[str, Any]:
    results, timing = record.results, record.results["timing"]
    if record.rank_zero:  # before any data loads: where the callbacks write (checkpoints/, images/)
        for name, node in (cfg.callbacks or {}).items():
            for key in ("dirpath", "out_dir"):
                if node and isinstance(node, DictConfig) and node.get(key):
                    check_writable(node[key], f"directory callbacks.{name}.{key}")
    check_config(cfg)
    cfg = prepare_config(cfg)
    check_config(cfg)  # again: a resumed or re-evaluated run's restored groups
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    dm = instantiate_group(cfg.dataset, "dataset")
    dm.setup("fit")
    results["data"] = dm.info()
    check_data(cfg, results["data"]["train_size"])
    if not cfg.train and cfg.evaluation.get("other_data"):
        results["other_data"] = _check_other_data(cfg, dm)
    with open_dict(cfg):
        cfg.x_dim = dm.x_dim
        cfg.image_shape = list(dm.image_shape)
        cfg.step_dim = getattr(dm, "step_dim", None)
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
    fit_data, fused = fused_fit(dm, module.fused_steps, cfg.trainer)
    trainer: L.Trainer = instantiate_group(cfg.trainer, "trainer", logger=logger, callbacks=list(callbacks.values()),
                                           **fused)
    use_checked_checkpoint_io(trainer)  # a checkpoint that cannot be written stops the run (Lightning drops it)
    if logger:
        logger.log_hyperparams(module.run_config)

    eval_ckpt = cfg.ckpt_path
    if cfg.train:
        t0 = time.perf_counter()
        with sigterm_as_interrupt():
            try:
                trainer.fit(module, datamodule=fit_data, ckpt_path=cfg.ckpt_path)
            except SystemExit:  # Lightning's answer to Ctrl-C: clean up, then exit(1)
                if not trainer.interrupted:
                    raise
        throughput = next((c for c in callbacks.values() if isinstance(c, Throughput)), None)
        # over every process that trained this run (the checkpoint holds the earlier ones' seconds and images)
        timing["fit_s"] = round(throughput.fit_seconds(since=t0) if throughput else time.perf_counter() - t0, 3)
        timing["train_images_per_s"] = round(throughput.images_per_s, 1) if throughput and \
            throughput.images_per_s else None
        timing["epochs"] = trainer.current_epoch
        timing["steps"] = trainer.global_step
        if trainer.interrupted:
            last = checkpoint_paths(callbacks).get("last")
            results.update(status="interrupted", reason="interrupted", checkpoints=checkpoint_paths(callbacks),
                           error="Training was interrupted (Ctrl-C or SIGTERM) at epoch "
                                 f"{trainer.current_epoch}, step {trainer.global_step}; not evaluated. "
                                 + (f"Resume with ckpt_path={last}." if last else "No checkpoint was written yet."))
            record.logger_status = "failed"
            record.write()
            print(f"\namortlab: interrupted; {results['error']}", file=sys.stderr, flush=True)
            return results
        best = checkpoint_paths(callbacks).get("best") or ""
        eval_ckpt = best if (cfg.evaluation.ckpt == "best" and best) else None  # None: the final weights
    results["checkpoints"] = {"evaluated": eval_ckpt or "final weights", **checkpoint_paths(callbacks)}

    splits: list[str] = []  # the final evaluation's finished splits
    with sigterm_as_interrupt():  # Ctrl-C / SIGTERM: stop at once, record what was evaluated (evaluation_interrupted)
        try:
            if cfg.test:
                if eval_ckpt:
                    load_weights(module, eval_ckpt)
                final_evaluation(trainer, module, dm, cfg, timing, results["metrics"], splits)
            if cfg.test and trainer.is_global_zero:
                module.estimator.after_run(module, dm, results["metrics"], out_dir, run_name(cfg, module), logger,
                                           int(cfg.evaluation.seed))
        except (KeyboardInterrupt, SystemExit) as e:  # SystemExit: Lightning's answer to a KeyboardInterrupt
            if isinstance(e, SystemExit) and not trainer.interrupted:
                raise
            return evaluation_interrupted(cfg, out_dir, record, splits)
    results["status"] = "ok"
    path = record.write()
    if path is not None:
        text = summary(results, path) + describe_logger(logger)
        if logging.getLogger().handlers:  # Hydra's logging: console and <run dir>/train.log
            log.info(text)
        else:
            print(text, file=sys.stdout, flush=True)
    return results


def redo_command(cfg: DictConfig, out_dir: Path, checkpoints: dict[str, str | None]) -> str | None:
    """The command that redoes this run's final evaluation into ``out_dir``: an evaluation-only run
    (``train=false``) again as it was asked; a trained run resumed from its ``last.ckpt`` as the README resumes (its
    training is complete, so it only evaluates), else evaluated from ``best.ckpt`` with ``train=false``. The
    command's other overrides are kept. None when no checkpoint holds the trained weights."""
    kept = [o for o in command_overrides() if o.split("=", 1)[0].lstrip("+~") not in ("train", "ckpt_path")]
    if not cfg.train:
        tail = ["train=false", f"ckpt_path={cfg.ckpt_path}"]
    elif checkpoints.get("last"):
        tail = [f"ckpt_path={checkpoints['last']}"]
    elif checkpoints.get("best"):
        tail = ["train=false", f"ckpt_path={checkpoints['best']}"]
    else:
        return None
    return shlex.join(["python", "train.py", *kept, *tail, f"hydra.run.dir={out_dir}"])


def evaluation_interrupted(cfg: DictConfig, out_dir: Path, record: RunRecord, splits: list[str]) -> dict[str, Any]:
    """Ctrl-C / SIGTERM during the final evaluation: the record says ``status: interrupted``, which splits finished
    (``evaluated``; their metrics are in ``metrics``), which one was running, and ``redo`` (``redo_command``)."""
    results = record.results
    asked = (["val"] if cfg.evaluation.val else []) + ["test"] + (["train"] if cfg.evaluation.get("train_points")
                                                                  else [])
    running = next((s for s in asked if s not in splits), None)
    checkpoints = {**results.get("checkpoints", {}), **checkpoint_paths(record.callbacks)}
    redo = redo_command(cfg, out_dir, checkpoints)
    where = f"in the {running} split" if running else "after the last split (writing its outputs)"
    results.update(status="interrupted", reason="interrupted", evaluated=list(splits), interrupted_split=running,
                   redo=redo, checkpoints=checkpoints,
                   error=f"The final evaluation was interrupted (Ctrl-C or SIGTERM) {where}; finished splits: "
                         f"{', '.join(splits) or 'none'} (their metrics are in this record). "
                         + (f"Redo the evaluation with: {redo}" if redo else
                            "No checkpoint holds the trained weights, so it cannot be redone without training."))
    record.logger_status = "failed"
    record.write()
    print(f"\namortlab: interrupted; {results['error']}", file=sys.stderr, flush=True)
    return results

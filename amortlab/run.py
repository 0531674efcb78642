"""What ``train.py`` does with a composed config: build -> fit -> evaluate -> results.json + summary.

Kept out of train.py so tests and sweep.py can call it, and so train.py is only the Hydra entry point.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import warnings
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

from amortlab.callbacks import Throughput
from amortlab.data.download import default_data_dir
from amortlab.errors import AmortlabError, NonFiniteLossError
from amortlab.evaluation.final import evaluate
from amortlab.logging import finish_logger, git_commit, versions, write_results
from amortlab.methods.base import migrate_state_dict

MODEL_GROUPS = ("dataset", "model", "inference", "encoder_regularizer")  # what a checkpoint's weights depend on


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
    path = Path(ckpt_path)
    if not path.is_file():
        raise AmortlabError(f"ckpt_path={ckpt_path} does not exist. Point ckpt_path at a checkpoint written by "
                            f"train.py (e.g. <run dir>/checkpoints/last.ckpt or best.ckpt).")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt.get("amortlab_config")


def prepare_config(cfg: DictConfig) -> DictConfig:
    """Fill derived values (data_dir, and for eval-only runs the model-defining groups from the checkpoint)."""
    with open_dict(cfg):
        if cfg.data_dir is None:
            cfg.data_dir = default_data_dir()
        if not cfg.train:
            if not cfg.ckpt_path:
                raise AmortlabError("train=false needs a checkpoint to evaluate: add ckpt_path=<run dir>/checkpoints/"
                                    "best.ckpt (or last.ckpt).")
            saved = load_checkpoint_config(cfg.ckpt_path)
            if saved is not None:
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
    return cfg


def build_module(cfg: DictConfig):
    """The method: ``inference`` instantiated with the generative model (``model.generative``), the estimator
    (``evaluation.estimator``) and the regularizer; refuses incompatible choices before anything is trained."""
    check_settings(cfg)
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


def check_settings(cfg: DictConfig) -> None:
    """Refuse run settings that cannot work, before anything is built."""
    if cfg.evaluation.ckpt not in ("best", "last"):
        raise AmortlabError(f"evaluation.ckpt={cfg.evaluation.ckpt!r} is unknown: use 'best' (lowest val/nll) "
                            f"or 'last'.")
    if int(cfg.evaluation.get("train_points") or 0) < 0:
        raise AmortlabError(f"evaluation.train_points={cfg.evaluation.train_points} must be >= 0 (the number of "
                            f"training images to evaluate after the test split; 0 = none).")


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
        if isinstance(cb, ModelCheckpoint) and str(cb.monitor or "").startswith("val/") and not validates:
            continue
        out[name] = cb
    return out


def _checkpoints(callbacks: dict[str, L.Callback]) -> dict[str, str | None]:
    """{"best": path, "last": path}: each checkpoint callback's file, by its name without ``checkpoint_``."""
    return {name.removeprefix("checkpoint_"): cb.best_model_path or None for name, cb in callbacks.items()
            if isinstance(cb, ModelCheckpoint)}


def load_weights(module, ckpt_path: str) -> None:
    """Load a train.py checkpoint's weights into ``module`` (tensors only: ``weights_only=True``)."""
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is reported the same way
        raise AmortlabError(f"Cannot read the checkpoint {ckpt_path} ({type(e).__name__}: {e}). Point ckpt_path at "
                            f"a checkpoint written by train.py (<run dir>/checkpoints/best.ckpt or last.ckpt).") from e
    module.load_state_dict(migrate_state_dict(ckpt["state_dict"]))


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
    """Train (unless ``train=false``) and evaluate; write ``out_dir/results.json``; return the results dict."""
    out_dir = Path(out_dir)
    quiet_lightning()
    if cfg.skip_if_done and (out_dir / "results.json").is_file():
        done = json.loads((out_dir / "results.json").read_text())
        if done.get("status") == "ok":
            print(f"amortlab: {out_dir} already holds a finished run (skip_if_done=true); not running it again.")
            return done
    cfg = prepare_config(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    dm = _instantiate(cfg.dataset, "dataset")
    dm.setup("fit")
    with open_dict(cfg):
        cfg.x_dim = dm.x_dim
    module = build_module(cfg)
    if cfg.train and not cfg.ckpt_path:
        module.init_output_bias(dm.train_mean)

    validates = cfg.trainer.get("limit_val_batches") not in (0, 0.0)
    callbacks = build_callbacks(cfg, validates)
    logger = build_logger(cfg, module, dm.name)
    trainer: L.Trainer = _instantiate(cfg.trainer, "trainer", logger=logger, callbacks=list(callbacks.values()))
    if logger:
        logger.log_hyperparams(module.run_config)

    results: dict[str, Any] = {
        "status": "running", "metrics": {}, "data": dm.info(), "config": module.run_config,
        "versions": versions(), "git_commit": git_commit(), "timing": {}, "out_dir": str(out_dir),
        "tags": module.tags(), "axes": module.axes(), "estimator": module.estimator.name,
    }
    timing = results["timing"]
    eval_ckpt = cfg.ckpt_path
    if cfg.train:
        t0 = time.perf_counter()
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path)
        except NonFiniteLossError as e:
            results.update(status="failed", error=str(e), checkpoints=_checkpoints(callbacks))
            if trainer.is_global_zero:
                write_results(out_dir / "results.json", results)
            raise
        timing["fit_s"] = round(time.perf_counter() - t0, 3)
        throughput = next((c for c in callbacks.values() if isinstance(c, Throughput)), None)
        timing["train_images_per_s"] = round(throughput.images_per_s, 1) if throughput and \
            throughput.images_per_s else None
        timing["epochs"] = trainer.current_epoch
        timing["steps"] = trainer.global_step
        if trainer.interrupted:
            results["status"] = "interrupted"
        best = _checkpoints(callbacks).get("best") or ""
        eval_ckpt = best if (cfg.evaluation.ckpt == "best" and best) else None  # None: the final weights
    results["checkpoints"] = {"evaluated": eval_ckpt or "final weights", **_checkpoints(callbacks)}

    if cfg.test:
        if eval_ckpt:
            load_weights(module, eval_ckpt)
        results["metrics"].update(final_evaluation(trainer, module, dm, cfg, timing))
    if results["status"] == "running":
        results["status"] = "ok"
    if cfg.test and trainer.is_global_zero:
        module.estimator.after_run(module, dm, results["metrics"], out_dir, run_name(cfg, module), logger,
                                   int(cfg.evaluation.seed))
    if trainer.is_global_zero:
        path = write_results(out_dir / "results.json", results)
        print(summary(results, path), file=sys.stdout, flush=True)
    if logger and trainer.is_global_zero:
        finish_logger(logger, results["metrics"])
    elif logger:
        logger.finalize("success")
    return results


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

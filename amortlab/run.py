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

from amortlab.callbacks import ImagePanels, Throughput
from amortlab.data.download import default_data_dir
from amortlab.errors import AmortlabError, NonFiniteLossError
from amortlab.logging import git_commit, versions, write_results

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
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
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
                        cfg[group] = node
    return cfg


def build_module(cfg: DictConfig):
    """The method: ``inference`` instantiated with the model's decoder (and encoder where it names one)."""
    regularizer = _instantiate(cfg.encoder_regularizer, "encoder_regularizer")
    optim = {
        "optimizer": _instantiate(cfg.optim.optimizer, "optim.optimizer"),
        "lr_scheduler": _instantiate(cfg.optim.lr_scheduler, "optim.lr_scheduler") if cfg.optim.get(
            "lr_scheduler") else None,
        "interval": cfg.optim.get("interval", "epoch"),
    }
    module = _instantiate(cfg.inference, "inference", decoder=cfg.model.decoder, regularizer=regularizer,
                          importance_samples=OmegaConf.to_container(cfg.importance_samples),
                          optim=optim, evaluation=OmegaConf.to_container(cfg.evaluation))
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    check_compatible(cfg)
    return module


def check_compatible(cfg: DictConfig) -> None:
    """Refuse combinations that cannot work, before anything is trained."""
    if cfg.evaluation.ckpt not in ("best", "last"):
        raise AmortlabError(f"evaluation.ckpt={cfg.evaluation.ckpt!r} is unknown: use 'best' (lowest val/nll) "
                            f"or 'last'.")
    if int(cfg.evaluation.get("train_points") or 0) < 0:
        raise AmortlabError(f"evaluation.train_points={cfg.evaluation.train_points} must be >= 0 (the number of "
                            f"training images to evaluate after the test split; 0 = none).")
    encoder = str(OmegaConf.select(cfg, "model.encoder._target_", default="") or "")
    if cfg.evaluation.estimator == "iw_svi" and encoder.endswith("FlowEncoder"):
        raise AmortlabError("evaluation=iw_svi refines a Gaussian q per point, but posterior=flow gives a flow q. "
                            "Use evaluation=gaps (per-point q* of both the Gaussian and the flow family) or "
                            "evaluation=iwae with posterior=flow, or posterior=gaussian with evaluation=iw_svi.")
    target = str(OmegaConf.select(cfg, "inference._target_", default="") or "")
    if cfg.evaluation.estimator == "iw_svi" and target.endswith("RecursiveMixtureVAE") and int(
            OmegaConf.select(cfg, "inference.components", default=1)) > 1:
        raise AmortlabError("evaluation=iw_svi refines one Gaussian q per point, but inference=recursive_mixture "
                            "with components > 1 gives a mixture q (IW-SVI would refine only its heaviest "
                            "component). Use evaluation=iwae or evaluation=gaps with the mixture, or "
                            "inference.components=1.")


def run_name(cfg: DictConfig, module) -> str:
    return cfg.name or "-".join([module.tags()[0], cfg.dataset._target_.rsplit(".", 1)[-1].replace(
        "DataModule", "").lower(), f"s{cfg.seed}"])


def build_logger(cfg: DictConfig, module, out_dir: Path, data_name: str):
    if not cfg.logger:
        return False
    tags = [*module.tags(), f"data:{data_name}", *cfg.tags]
    kwargs: dict[str, Any] = {}
    target = cfg.logger.get("_target_", "")
    if target.endswith("make_wandb_logger"):
        kwargs = {"tags": tags, "group": cfg.group or cfg.logger.get("group"), "name": run_name(cfg, module)}
    return _instantiate(cfg.logger, "logger", **kwargs)


def _checkpoints(best_cb, last_cb) -> dict[str, str | None]:
    return {"last": last_cb.best_model_path or None, "best": (best_cb.best_model_path or None) if best_cb else None}


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

    throughput = Throughput()
    validates = cfg.trainer.get("limit_val_batches") not in (0, 0.0)
    # best.ckpt: lowest val/nll. last.ckpt: every epoch (Lightning >= 2.5 refreshes a monitored callback's
    # save_last only when the monitored value improves, which is no use for resuming), written after validation.
    best_cb = ModelCheckpoint(dirpath=out_dir / "checkpoints", filename="best", monitor="val/nll", mode="min",
                              save_top_k=1, enable_version_counter=False) if validates else None
    last_cb = ModelCheckpoint(dirpath=out_dir / "checkpoints", filename="last", monitor=None, save_top_k=1,
                              every_n_epochs=1, save_on_train_epoch_end=True, enable_version_counter=False)
    callbacks = [c for c in (best_cb, last_cb) if c] + [throughput, ImagePanels(str(out_dir / "images"), seed=cfg.seed)]
    if cfg.annealing and cfg.annealing.get("_target_"):  # annealing=none has _target_: null
        callbacks.append(_instantiate(cfg.annealing, "annealing"))
    callbacks += [_instantiate(c, f"callbacks.{name}") for name, c in (cfg.callbacks or {}).items() if c]
    logger = build_logger(cfg, module, out_dir, dm.name)
    trainer: L.Trainer = _instantiate(cfg.trainer, "trainer", logger=logger, callbacks=callbacks)
    if logger and hasattr(logger, "log_hyperparams"):
        logger.log_hyperparams(module.run_config)

    results: dict[str, Any] = {
        "status": "running", "metrics": {}, "data": dm.info(), "config": module.run_config,
        "versions": versions(), "git_commit": git_commit(), "timing": {}, "out_dir": str(out_dir),
        "tags": module.tags(), "axes": module.axes(),
    }
    timing = results["timing"]
    eval_ckpt = cfg.ckpt_path
    if cfg.train:
        t0 = time.perf_counter()
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path)
        except NonFiniteLossError as e:
            results.update(status="failed", error=str(e), checkpoints=_checkpoints(best_cb, last_cb))
            if trainer.is_global_zero:
                write_results(out_dir / "results.json", results)
            raise
        timing["fit_s"] = round(time.perf_counter() - t0, 3)
        timing["train_images_per_s"] = round(throughput.images_per_s, 1) if throughput.images_per_s else None
        timing["epochs"] = trainer.current_epoch
        timing["steps"] = trainer.global_step
        if trainer.interrupted:
            results["status"] = "interrupted"
        best = best_cb.best_model_path if best_cb else ""
        eval_ckpt = best if (cfg.evaluation.ckpt == "best" and best) else None  # None: the final weights
    results["checkpoints"] = {"evaluated": eval_ckpt or "final weights", **_checkpoints(best_cb, last_cb)}

    if cfg.test:
        module.k_val = module.k_test  # the final numbers use the test estimator on both splits
        module.final_evaluation = True
        t0 = time.perf_counter()
        if cfg.evaluation.val:
            trainer.validate(module, datamodule=dm, ckpt_path=eval_ckpt, verbose=False)
            results["metrics"].update(module.eval_results["val"])
        t1 = time.perf_counter()
        trainer.test(module, datamodule=dm, ckpt_path=eval_ckpt, verbose=False)
        results["metrics"].update(module.eval_results["test"])
        timing["val_s"] = round(t1 - t0, 3)
        timing["test_s"] = round(time.perf_counter() - t1, 3)
        n_test = results["metrics"].get("test/n_points", results["data"]["test_size"])  # limit_test_batches aware
        timing["test_images_per_s"] = round(n_test / max(timing["test_s"], 1e-9), 2)
        if cfg.evaluation.get("train_points"):
            t2 = time.perf_counter()
            results["metrics"].update(evaluate_training_points(trainer, module, dm, int(cfg.evaluation.train_points),
                                                               eval_ckpt))
            timing["train_eval_s"] = round(time.perf_counter() - t2, 3)
    if results["status"] == "running":
        results["status"] = "ok"
    if cfg.test and cfg.evaluation.estimator == "gaps" and trainer.is_global_zero:
        from amortlab.evaluation.gaps import gap_table

        name, text = run_name(cfg, module), []
        for split in ("test", "train"):
            n = results["metrics"].get(f"{split}/n_points")
            if n:
                text.append(f"Inference-gap decomposition, {split} split ({n} points, nats)\n\n"
                            + gap_table({name: results["metrics"]}, split))
        (out_dir / "gaps.md").write_text("\n".join(text))
        if module.z_dim == 2:
            draw_posteriors(module, dm, cfg, out_dir / "images" / "posteriors.png", logger)
    if trainer.is_global_zero:
        path = write_results(out_dir / "results.json", results)
        if logger and hasattr(logger, "experiment") and cfg.logger.get("_target_", "").endswith("make_wandb_logger"):
            logger.experiment.summary.update(results["metrics"])
        print(summary(results, path), file=sys.stdout, flush=True)
    if logger and hasattr(logger, "finalize"):
        logger.finalize("success")
    if logger and cfg.logger.get("_target_", "").endswith("make_wandb_logger") and trainer.is_global_zero:
        import wandb
        wandb.finish()
    return results


def draw_posteriors(module, dm, cfg, path: Path, logger, n_points: int = 4) -> None:
    """Cremer et al.'s posterior figure for a 2-D latent model (first ``n_points`` test points): PNG + W&B image."""
    from amortlab.evaluation.posterior_plot import draw_gap_posteriors

    x = next(iter(dm.eval_dataloader("test", n_points))).x.to(module.device)
    g = torch.Generator(device=x.device).manual_seed(int(cfg.evaluation.seed))
    module.eval()
    draw_gap_posteriors(module, x, module.gaps_cfg, path, g)
    if logger is not None and hasattr(logger, "log_image"):
        logger.log_image(key="images/posteriors", images=[str(path)])


def evaluate_training_points(trainer: L.Trainer, module, dm, n: int, ckpt: str | None) -> dict[str, float]:
    """The final evaluation of the first ``n`` training images (keys ``train/...``), beside the test split's:
    the same estimator, k and seeds; ``trainer.limit_test_batches`` does not apply (``n`` says how many)."""
    module.test_split, limit = "train", trainer.limit_test_batches
    trainer.limit_test_batches = 1.0
    try:
        trainer.test(module, dataloaders=dm.eval_dataloader("train", n), ckpt_path=ckpt, verbose=False)
    finally:
        module.test_split, trainer.limit_test_batches = "test", limit
    return module.eval_results["train"]


def summary(results: dict[str, Any], path: Path) -> str:
    m, t, d = results["metrics"], results["timing"], results["data"]
    cfg = results["config"]

    def f(key: str) -> str:
        v = m.get(key)
        return f"{v:10.3f}" if isinstance(v, float) and math.isfinite(v) else f"{'-':>10}"

    k = cfg["importance_samples"]["test"]
    est = cfg["evaluation"]["estimator"]
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

    import amortlab.config  # noqa: F401

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

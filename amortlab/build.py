"""Config -> objects: the method, logger, callbacks and data a run is made of, and train.py checkpoints read back
(tensors only). Shared by a single run (``amortlab.run``) and a stacked one (``amortlab.stack``)."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

from amortlab.errors import AmortlabError
from amortlab.methods.base import migrate_state_dict
from amortlab.validate import check_config


def instantiate_group(node: Any, what: str, **kwargs: Any) -> Any:
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


def command_overrides() -> list[str]:
    """The command line's overrides (Hydra's ``overrides.task``); empty outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


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


def load_checkpoint_config(ckpt_path: str) -> dict | None:
    """The config a train.py checkpoint stores (tensors and plain values only: ``weights_only=True``); the groups a
    run takes from it are checked by ``check_stored_targets`` before they are used."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise AmortlabError(f"ckpt_path={ckpt_path} does not exist. Point ckpt_path at a checkpoint written by "
                            f"train.py (e.g. <run dir>/checkpoints/last.ckpt or best.ckpt).")
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("amortlab_config"), dict) or "state_dict" not in ckpt:
        raise AmortlabError(f"ckpt_path={ckpt_path} is a PyTorch file but not a checkpoint of this library: it holds "
                            f"{describe_contents(ckpt)}. A train.py checkpoint (<run dir>/checkpoints/best.ckpt or "
                            f"last.ckpt) holds 'state_dict' (the weights), 'amortlab_config' (the run's config) and "
                            f"Lightning's training state ('epoch', 'global_step', 'optimizer_states', ...). Point "
                            f"ckpt_path at such a file.")
    return ckpt["amortlab_config"]


def describe_contents(obj: Any) -> str:
    """A short description of a loaded torch file's top level: its keys (at most 8 shown), or its type."""
    if isinstance(obj, dict):
        keys = list(obj)
        shown = ", ".join(repr(k) for k in keys[:8]) + (f", ... ({len(keys)} keys)" if len(keys) > 8 else "")
        tensors = sum(isinstance(v, torch.Tensor) for v in obj.values())
        bare = " (a bare state_dict of tensors?)" if keys and tensors == len(keys) else ""
        return f"a dict with the top-level keys {shown or 'none'}{bare}"
    return f"a {type(obj).__name__}, not a dict"


def load_weights(module, ckpt_path: str) -> None:
    """Load a train.py checkpoint's weights into ``module`` (tensors only: ``weights_only=True``)."""
    module.load_state_dict(migrate_state_dict(read_checkpoint(ckpt_path)["state_dict"]))


def build_module(cfg: DictConfig):
    """The method: ``inference`` instantiated with the generative model (``model.generative``), the estimator
    (``evaluation.estimator``) and the regularizer; refuses incompatible choices before anything is trained."""
    check_config(cfg)
    regularizer = instantiate_group(cfg.encoder_regularizer, "encoder_regularizer")
    optim = {
        "optimizer": instantiate_group(cfg.optim.optimizer, "optim.optimizer"),
        "lr_scheduler": instantiate_group(cfg.optim.lr_scheduler, "optim.lr_scheduler") if cfg.optim.get(
            "lr_scheduler") else None,
        "interval": cfg.optim.get("interval"),
    }
    estimator = instantiate_group(cfg.evaluation.estimator, "evaluation.estimator", _convert_="all")
    evaluation = {k: v for k, v in OmegaConf.to_container(cfg.evaluation).items() if k != "estimator"}
    module = instantiate_group(cfg.inference, "inference", model=cfg.model.generative, regularizer=regularizer,
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
    return instantiate_group(cfg.logger, "logger")


def build_callbacks(cfg: DictConfig, validates: bool) -> dict[str, L.Callback]:
    """The ``callbacks`` group, by name; entries that are null or have a null ``_target_`` (annealing=none) are
    skipped, and a checkpoint that monitors a val/ metric is dropped when validation is off."""
    out = {}
    for name, node in (cfg.callbacks or {}).items():
        if not node or not node.get("_target_"):
            continue
        cb = instantiate_group(node, f"callbacks.{name}")
        if isinstance(cb, ModelCheckpoint) and str(cb.monitor or "").startswith("val") and not validates:
            continue
        out[name] = cb
    return out


def quiet_lightning() -> None:
    """Lightning logs through its own handler; stop Hydra's root handler printing each line a second time and
    drop advice that does not apply to in-memory tensor loaders."""
    logging.getLogger("lightning.pytorch").propagate = False
    logging.getLogger("lightning.fabric").propagate = False
    for msg in (".*does not have many workers.*",
                ".*isinstance\\(treespec, LeafSpec\\).*", ".*Checkpoint directory .* exists and is not empty.*",
                ".*overridden `transfer_batch_to_device`.*", ".*anonymous setting has no effect.*"):
        warnings.filterwarnings("ignore", message=msg)


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
    dm = instantiate_group(cfg.dataset, "dataset")
    dm.setup()
    with open_dict(cfg):
        cfg.x_dim = dm.x_dim
        cfg.image_shape = list(dm.image_shape)
        cfg.step_dim = getattr(dm, "step_dim", None)
    return build_module(cfg), dm

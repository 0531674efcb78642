"""Typed schema of the top-level config (registered in Hydra's ConfigStore as ``base_config``).

Config groups (dataset, model, inference, ...) hold ``_target_`` nodes that are instantiated as they are; the schema
types the keys that train.py itself reads, so a wrong key or type fails at start-up with OmegaConf's message
naming the key (``Value 'abc' of type 'str' could not be converted to Integer ... full_key: seed``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING



@dataclass
class ImportanceSamples:
    """k of the training bound, of the per-epoch validation estimate, and of the final log p(x) estimate."""

    train: int = 1
    val: int = 10
    test: int = 5000


@dataclass
class Evaluation:
    """How the final numbers are computed (the ``evaluation`` group: ``iwae`` [default], ``iw_svi`` or ``gaps``).

    estimator: the log p(x) estimator, built by Hydra (``_target_``; ``amortlab.evaluation.protocol.Estimator``):
        ``iwae`` = IWAE-k from the method's q; ``iw_svi`` = refine each point's q first, then IWAE-k; ``gaps`` = the
        inference-gap decomposition with per-point q*. Its settings and defaults live in its dataclass
        (``SVIConfig``, ``GapsConfig``), which the group's yaml selects as schema.
    rows: decoder rows per evaluation chunk (chunk = rows // batch samples; ~1000 is right for CPUs).
    seed: seed of the evaluation noise (per batch, independent of the world size).
    ckpt: which weights are evaluated after training: ``best`` (lowest per-epoch validation NLL,
        ``val_epoch/nll``) or ``last``.
    val: also run the final estimator on the validation split (results.json ``val/...``).
    train_points: also run it on the first N training images (``train/...``; 0 = off): fitting vs generalisation,
        e.g. the amortization gap on the points the encoder was trained on (Cremer et al.'s gap code uses those).
    other_data: with ``train=false``, evaluate the checkpoint on the command's dataset (same shape) instead of its
        own; recorded in results.json (``other_data``). Without it a dataset override is refused.
    """

    estimator: Any = None
    rows: int = 1000
    seed: int = 0
    ckpt: str = "best"
    val: bool = True
    train_points: int = 0
    other_data: bool = False


@dataclass
class Stack:
    """Several runs of one config trained as one stacked computation (``amortlab.stack``): seeds, and optionally
    the values of one continuous setting (members = values x seeds).

    seeds: e.g. ``[0, 1, 2, 3]``; null (default) = one ordinary run of ``seed``. Each member writes a single run's
        files in its directory and equals that run to float tolerance.
    dir: the member's directory, ``{seed}`` filled in: under the run dir, or with values under ``<root>/<label>``.
    key, values: e.g. ``encoder_regularizer.sigma`` and ``[0.1, 0.2, 0.4]`` (``amortlab.stack.values`` lists the
        keys that can vary: encoder-regularizer strengths, the learning rate).
    labels: one per value, the name of its members' parent directory and run-name prefix (``<label>-s<seed>``);
        default ``<last part of key><value>`` (e.g. ``sigma0.1``).
    root: where the label directories go (default: the run dir).
    """

    seeds: Optional[list[int]] = None
    dir: str = "seed{seed}"
    key: Optional[str] = None
    values: Optional[list[float]] = None
    labels: Optional[list[str]] = None
    root: Optional[str] = None


@dataclass
class Config:
    dataset: Any = MISSING
    model: Any = MISSING
    inference: Any = MISSING
    encoder_regularizer: Any = MISSING
    importance_samples: ImportanceSamples = field(default_factory=ImportanceSamples)
    optim: Any = MISSING
    annealing: Any = None
    trainer: Any = MISSING
    logger: Any = None
    callbacks: Any = field(default_factory=dict)  # name -> Lightning callback node (conf/callbacks/default.yaml)
    evaluation: Evaluation = field(default_factory=Evaluation)
    seed: int = 0
    data_dir: Optional[str] = "${oc.env:AMORTLAB_DATA,null}"  # $AMORTLAB_DATA; null -> ~/.cache/amortlab/data
    train: bool = True  # false: evaluate ckpt_path only
    test: bool = True
    ckpt_path: Optional[str] = None  # resume training from it (train=true) or evaluate it (train=false)
    skip_if_done: bool = False  # return at once if the run dir already holds results.json with status ok (sweeps)
    x_dim: Optional[int] = None  # filled in from the dataset before the model is built
    image_shape: Optional[list[int]] = None  # (C, H, W), filled in from the dataset (convolutional models)
    step_dim: Optional[int] = None  # size X of one time step, filled in from a sequence dataset (sequence models)
    name: Optional[str] = None  # run name (W&B); default: derived from method, dataset, regularizer, k
    group: Optional[str] = None  # W&B group (sweep.py sets it to the study name)
    tags: list[str] = field(default_factory=list)
    stack: Stack = field(default_factory=Stack)  # stack.seeds=[0,1,2,3]: N seeds as one stacked computation


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)


register_configs()

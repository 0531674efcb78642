"""Stacked models that differ in one continuous setting as well as in seed (``stack.key`` / ``stack.values``).

Members are values x seeds (value-major). What a setting may vary, and how the stacked module does it:

- ``encoder_regularizer.<name>`` for a name in the regularizer's ``stackable_settings`` (denoising ``sigma``,
  adversarial ``epsilon``, weight_norm ``H``, spectral_norm ``coeff``): the stacked module's regularizer / encoder
  parametrizations hold the value per model (``EncoderRegularizer.stack_setting``);
- ``optim.optimizer.lr``: the optimiser steps with member 0's rate lr_0 and each model's step is rescaled,

      theta_i <- theta_i + (lr_i / lr_0) * (Adam_step(theta_i; lr_0) - theta_i),

  exact for Adam-type updates (the step is linear in lr; moments and eps do not depend on it) and for schedules
  that multiply every rate by the same factor (constant, Burda's, LambdaLR / StepLR / MultiStepLR / ExponentialLR /
  MultiplicativeLR). Each member's checkpoint records its own rate (optimiser groups and scheduler state).
"""
from __future__ import annotations

import functools

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from amortlab.errors import AmortlabError

LR_KEY = "optim.optimizer.lr"
PROPORTIONAL_SCHEDULES = {"amortlab.optim.burda_schedule", "torch.optim.lr_scheduler.LambdaLR",
                          "torch.optim.lr_scheduler.StepLR", "torch.optim.lr_scheduler.MultiStepLR",
                          "torch.optim.lr_scheduler.ExponentialLR", "torch.optim.lr_scheduler.MultiplicativeLR"}


def stackable_keys(cfg: DictConfig) -> set[str]:
    """The config keys whose values N stacked models of ``cfg`` may differ in."""
    keys = set()
    target = OmegaConf.select(cfg, "encoder_regularizer._target_")
    if target:
        reg = get_class(target)
        keys |= {f"encoder_regularizer.{n}" for n in getattr(reg, "stackable_settings", ())}
    sched = OmegaConf.select(cfg, "optim.lr_scheduler")
    if not sched or sched.get("_target_") in PROPORTIONAL_SCHEDULES:
        keys.add(LR_KEY)
    return keys


def check_values(cfg: DictConfig) -> None:
    """Refuse a ``stack.key`` / ``stack.values`` pair that a stacked fit cannot train exactly."""
    key, values, labels = cfg.stack.get("key"), cfg.stack.get("values"), cfg.stack.get("labels")
    if key is None and values is None:
        if labels:
            raise AmortlabError("stack.labels names the members of stack.values; set stack.key and stack.values too.")
        return
    if key is None or not values:
        raise AmortlabError(f"stack.key and stack.values go together (e.g. stack.key=encoder_regularizer.sigma "
                            f"stack.values=[0.1,0.2,0.4]); got key={key}, values={values}.")
    allowed = stackable_keys(cfg)
    if key not in allowed:
        raise AmortlabError(
            f"stack.key={key}: stacked models can differ in {', '.join(sorted(allowed))} with this config (the "
            f"encoder regularizer's settings, and the learning rate when the schedule scales every rate alike). "
            f"Give other keys one run per value, or vary them in a sweep.py study.")
    vals = [float(v) for v in values]
    if len(set(vals)) != len(vals):
        raise AmortlabError(f"stack.values={vals} repeats a value; give each value once.")
    if key == LR_KEY and min(vals) <= 0:
        raise AmortlabError(f"stack.values={vals}: learning rates must be > 0.")
    if labels is not None and (len(labels) != len(vals) or len(set(labels)) != len(labels)):
        raise AmortlabError(f"stack.labels needs one distinct label per value ({len(vals)}), got {list(labels)}.")


def apply_values(stacked, key: str, values: list[float]) -> None:
    """Make the stacked module use ``values[i]`` of ``key`` for model i (``values`` per member)."""
    v = torch.tensor(values, dtype=torch.float32)
    if key == LR_KEY:
        stacked.lr_scale = torch.tensor(values, dtype=torch.float64) / values[0]
        return
    stacked.regularizer.stack_setting(stacked, key.removeprefix("encoder_regularizer."), v)


def scale_lr_per_model(opt: torch.optim.Optimizer, lr_scale: Tensor) -> None:
    """Make ``opt.step`` scale each stacked model's step by ``lr_scale[i]`` (``[N]``, lr_i / lr_0; module
    docstring). Wraps the instance's ``step`` as it is now (a scheduler's step counter included)."""
    inner = opt.step

    @functools.wraps(inner)  # keeps the scheduler's mark on its step wrapper (torch checks it)
    def step(closure=None):
        params = [p for g in opt.param_groups for p in g["params"]]
        before = [p.detach().clone() for p in params]
        loss = inner(closure)
        with torch.no_grad():
            for p, b in zip(params, before):
                p.copy_(torch.lerp(b, p, lr_scale.to(p).view(-1, *[1] * (p.dim() - 1))))  # b + w (p - b)
        return loss

    opt.step = step


def member_lr_state(ckpt: dict, scale: float) -> None:
    """Member checkpoint ``ckpt`` (sliced from the stacked one, rates of member 0): its own rates, ``scale`` =
    lr_i / lr_0 (in place)."""
    for opt in ckpt.get("optimizer_states", []):
        opt["param_groups"] = [{**g, **{k: g[k] * scale for k in ("lr", "initial_lr") if k in g}}
                               for g in opt["param_groups"]]
    if "lr_schedulers" in ckpt:  # shared with the other members' checkpoints: copied, not changed in place
        ckpt["lr_schedulers"] = [{**s, **{k: [lr * scale for lr in s[k]] for k in ("base_lrs", "_last_lr") if k in s}}
                                 for s in ckpt["lr_schedulers"]]

"""Several optimiser steps per Lightning training step (``inference.fused_steps`` = M).

Lightning's per-step machinery (loops, hooks, the optimisation closure) costs a fixed ~0.3-1 ms on the CPU; at batch
20 a step of the 784-200-200-50 VAE takes ~2-3 ms, so that cost is a third of the time. ``FusedData`` hands the
trainer groups of M consecutive training batches (``StepGroup``) and the method runs the M steps itself
(``ELBOModule.fused_training_step``: zero_grad, backward, optimiser step per batch): the same batches in the same
order, the same noise, the same updates as M Lightning steps — only the per-step bookkeeping is paid once per group.
``trainer.limit_train_batches`` keeps counting steps (it is applied here, not by the trainer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import islice

import lightning as L

from amortlab.data.loader import Batch
from amortlab.errors import AmortlabError


@dataclass
class StepGroup:
    """Up to M consecutive training batches; ``first_step``: the index of ``batches[0]`` among this epoch's steps,
    ``epoch_steps``: the steps in the epoch (what ``trainer.num_training_batches`` is without fusing)."""

    batches: list[Batch]
    first_step: int
    epoch_steps: int

    def to(self, device, non_blocking: bool = False) -> StepGroup:
        return StepGroup([b.to(device, non_blocking=non_blocking) for b in self.batches], self.first_step,
                         self.epoch_steps)


def limited_steps(n: int, limit: int | float | None) -> int:
    """Steps of an epoch of ``n`` batches under ``trainer.limit_train_batches`` (an int: at most that many; a
    float: that fraction, as Lightning counts it)."""
    if limit is None:
        return n
    if isinstance(limit, float):
        return int(n * limit) if limit < 1.0 else n
    return min(n, int(limit))


class FusedLoader:
    """Groups of ``m`` batches of ``loader`` (the last group of an epoch may hold fewer), ``limit`` as above."""

    def __init__(self, loader, m: int, limit: int | float | None = None):
        self.loader, self.m, self.limit = loader, int(m), limit

    def __getattr__(self, name: str):  # data, seed, ...: the wrapped loader's
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    @property
    def epoch_steps(self) -> int:
        return limited_steps(len(self.loader), self.limit)

    def __len__(self) -> int:
        return math.ceil(self.epoch_steps / self.m)

    def __iter__(self):
        steps = self.epoch_steps
        it = iter(self.loader)
        for first in range(0, steps, self.m):
            yield StepGroup(list(islice(it, min(self.m, steps - first))), first, steps)


class FusedData(L.LightningDataModule):
    """``dm`` with its training batches in groups of ``m`` (``FusedLoader``); everything else is ``dm``'s."""

    def __init__(self, dm: L.LightningDataModule, m: int, limit: int | float | None = None):
        super().__init__()
        self.dm, self.m, self.limit = dm, int(m), limit

    def __getattr__(self, name: str):  # batch_size, image_shape, name, ...: the wrapped datamodule's
        if name == "dm":
            raise AttributeError(name)
        return getattr(self.dm, name)

    def setup(self, stage: str | None = None) -> None:
        self.dm.trainer = self.trainer
        self.dm.setup(stage)

    def train_dataloader(self) -> FusedLoader:
        self.dm.trainer = self.trainer
        return FusedLoader(self.dm.train_dataloader(), self.m, self.limit)

    def val_dataloader(self):
        self.dm.trainer = self.trainer
        return self.dm.val_dataloader()


def fused_fit(dm: L.LightningDataModule, fused_steps: int, trainer_cfg) -> tuple[L.LightningDataModule, dict]:
    """The datamodule to fit and the trainer overrides for ``inference.fused_steps`` (``dm`` and ``{}`` for 1).
    Refuses the trainer options a fused step cannot honour, naming the fix."""
    if fused_steps <= 1:
        return dm, {}
    clash = {}
    if trainer_cfg.get("gradient_clip_val"):
        clash["gradient_clip_val"] = trainer_cfg.get("gradient_clip_val")
    if trainer_cfg.get("accumulate_grad_batches") not in (None, 1):
        clash["accumulate_grad_batches"] = trainer_cfg.get("accumulate_grad_batches")
    if isinstance(trainer_cfg.get("val_check_interval"), int):
        clash["val_check_interval"] = trainer_cfg.get("val_check_interval")
    if clash:
        opts = ", ".join(f"trainer.{k}={v}" for k, v in clash.items())
        raise AmortlabError(f"inference.fused_steps={fused_steps} runs the optimiser steps itself, outside "
                            f"Lightning's automatic loop, and cannot honour {opts}; set inference.fused_steps=1 (or "
                            f"drop those trainer options; a fractional val_check_interval works).")
    return FusedData(dm, fused_steps, trainer_cfg.get("limit_train_batches")), {"limit_train_batches": None}

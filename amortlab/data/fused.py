"""Several optimiser steps per Lightning training step (``inference.fused_steps`` = M).

Lightning's per-step machinery (loops, hooks, the optimisation closure) costs a fixed ~0.3-1 ms on the CPU; at batch
20 a step of the 784-200-200-50 VAE takes ~2-3 ms, so that cost is a third of the time. ``FusedData`` hands the
trainer groups of M consecutive training batches (``StepGroup``) and the method runs the M steps itself
(``ELBOModule.fused_training_step``: zero_grad, backward, optimiser step per batch): the same batches in the same
order, the same noise, the same updates as M Lightning steps — only the per-step bookkeeping is paid once per group.
``trainer.limit_train_batches`` keeps counting steps (it is applied here, not by the trainer).

A fractional ``trainer.val_check_interval`` f < 1 is kept in optimiser steps: Lightning's own loop validates after
every V-th step of an epoch, V = max(1, int(N f)) for N steps per epoch (not at the epoch's end unless V divides N).
Groups never straddle those steps (``epoch_groups``), and Lightning is told to validate every g groups, g the groups
of V steps, so validation (and best.ckpt, and whatever reads the validation values) comes after the same optimiser
steps as with M = 1.
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


def _split(n: int, m: int, parts: int | None = None) -> list[int]:
    """``n`` steps in groups of ``m`` (the last one smaller), or in exactly ``parts`` near-equal groups."""
    if parts is None or parts == math.ceil(n / m):
        return [m] * (n // m) + ([n % m] if n % m else [])
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def epoch_groups(steps: int, m: int, val_check_interval: float | None = None) -> tuple[list[int], int | None]:
    """The group sizes of an epoch of ``steps`` optimiser steps, and the ``val_check_interval`` in groups that makes
    Lightning validate after the same steps as its own loop does with ``val_check_interval`` = f (None: f is 1.0 or
    unset; the epoch is simply cut in groups of ``m``).

    With V = max(1, int(steps f)) the epoch is S = steps // V segments of V steps plus a tail of r = steps mod V
    steps; Lightning's loop validates after steps V, 2V, ..., SV. Each segment becomes g = max(2, ceil(V / m)) groups
    (g >= 2 so that Lightning, like with f < 1, saves best.ckpt after validation, not at the epoch's end) and the tail
    at most g - 1 groups (groups of more than ``m`` steps where it must), so Lightning's "every g-th group" falls on
    exactly the segments' ends.
    """
    if val_check_interval is None or float(val_check_interval) >= 1.0:
        return _split(steps, m), None
    v = max(1, int(steps * float(val_check_interval)))
    if v < 2:
        raise AmortlabError(f"trainer.val_check_interval={val_check_interval} validates after every optimiser step "
                            f"({steps} steps per epoch), which leaves nothing to fuse: set inference.fused_steps=1, "
                            f"or a val_check_interval of at least {2 / steps:.3g}.")
    g = max(2, math.ceil(v / m))
    tail = steps % v
    sizes = _split(v, m, g) * (steps // v)
    if tail:
        sizes += _split(tail, m, min(math.ceil(tail / m), g - 1))
    return sizes, g


class FusedLoader:
    """Groups of ``m`` batches of ``loader`` (the last group of an epoch may hold fewer), ``limit`` as above; with a
    fractional ``val_check_interval``, cut at the steps after which Lightning's loop validates (``epoch_groups``;
    ``val_groups``: that interval in groups)."""

    def __init__(self, loader, m: int, limit: int | float | None = None, val_check_interval: float | None = None):
        self.loader, self.m, self.limit = loader, int(m), limit
        self.sizes, self.val_groups = epoch_groups(self.epoch_steps, self.m, val_check_interval)

    def __getattr__(self, name: str):  # data, seed, ...: the wrapped loader's
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    @property
    def epoch_steps(self) -> int:
        return limited_steps(len(self.loader), self.limit)

    def __len__(self) -> int:
        return len(self.sizes)

    def __iter__(self):
        steps, first = self.epoch_steps, 0
        it = iter(self.loader)
        for size in self.sizes:
            yield StepGroup(list(islice(it, size)), first, steps)
            first += size


class FusedData(L.LightningDataModule):
    """``dm`` with its training batches in groups of ``m`` (``FusedLoader``); everything else is ``dm``'s."""

    def __init__(self, dm: L.LightningDataModule, m: int, limit: int | float | None = None,
                 val_check_interval: float | None = None):
        super().__init__()
        self.dm, self.m, self.limit, self.val_check_interval = dm, int(m), limit, val_check_interval

    def __getattr__(self, name: str):  # batch_size, image_shape, name, ...: the wrapped datamodule's
        if name == "dm":
            raise AttributeError(name)
        return getattr(self.dm, name)

    def setup(self, stage: str | None = None) -> None:
        self.dm.trainer = self.trainer
        self.dm.setup(stage)

    def train_dataloader(self) -> FusedLoader:
        self.dm.trainer = self.trainer
        loader = FusedLoader(self.dm.train_dataloader(), self.m, self.limit, self.val_check_interval)
        if loader.val_groups is not None:  # read by Lightning right after this call (fit_loop.setup_data)
            self.trainer.val_check_interval = loader.val_groups
        return loader

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
    vci = trainer_cfg.get("val_check_interval")
    vci = float(vci) if isinstance(vci, float) else None  # a time-based one (a string) stays Lightning's
    return FusedData(dm, fused_steps, trainer_cfg.get("limit_train_batches"), vci), {"limit_train_batches": None}

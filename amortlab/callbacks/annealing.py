"""Warm-up of the training objective (works with every method: it sets the module's annealing weights).

- ``kind="entropy"`` (Cremer et al.): L_lambda = E[log p(x, z) - lambda log q(z | x)],
  lambda = min(1, start + (1 - start) * t / duration); Cremer's MNIST runs use start 0, duration 400 epochs.
- ``kind="kl"`` (SA-VAE): L_beta = E[log p(x | z)] - beta KL(q || p), i.e. beta on both log p(z) and log q;
  SA-VAE anneals beta from 0.1 to 1 over 10 epochs.
``t`` counts epochs (``unit="epoch"``, fractional within an epoch) or optimiser steps (``unit="step"``). The weight
is a function of the trainer's progress only, so a resumed run anneals exactly like an uninterrupted one.
"""
from __future__ import annotations

import lightning as L

from amortlab.errors import AmortlabError


class Annealing(L.Callback):
    def __init__(self, kind: str = "entropy", start: float = 0.0, duration: float = 400, unit: str = "epoch"):
        if kind not in ("entropy", "kl"):
            raise AmortlabError(f"annealing kind {kind!r} is unknown; use 'entropy' (Cremer et al.) or 'kl' (SA-VAE).")
        if unit not in ("epoch", "step"):
            raise AmortlabError(f"annealing unit {unit!r} is unknown; use 'epoch' or 'step'.")
        if duration <= 0 or not 0.0 <= start <= 1.0:
            raise AmortlabError(f"annealing needs duration > 0 and 0 <= start <= 1, got duration={duration}, "
                                f"start={start}.")
        self.kind, self.start, self.duration, self.unit = kind, start, duration, unit

    def weight(self, global_step: int, epoch: int, step_in_epoch: int, epoch_steps: int) -> float:
        t = global_step if self.unit == "step" else epoch + step_in_epoch / max(1, epoch_steps)
        return min(1.0, self.start + (1.0 - self.start) * t / self.duration)

    def apply(self, pl_module, epoch: int, step_in_epoch: int, epoch_steps: int) -> None:
        """Set the module's weights for the optimiser step ``step_in_epoch`` of ``epoch_steps`` (a fused training
        step, ``inference.fused_steps``, calls this before each of its steps)."""
        w = self.weight(pl_module.global_step, epoch, step_in_epoch, epoch_steps)
        pl_module.entropy_weight = w
        pl_module.prior_weight = w if self.kind == "kl" else 1.0

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.annealer = self

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.automatic_optimization:
            self.apply(pl_module, trainer.current_epoch, batch_idx, trainer.num_training_batches)

    def _reset(self, pl_module) -> None:
        pl_module.entropy_weight = pl_module.prior_weight = 1.0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log("train/anneal_weight", pl_module.entropy_weight)
        self._reset(pl_module)  # validation and test always use the true bound

    def on_train_end(self, trainer, pl_module) -> None:
        self._reset(pl_module)
        pl_module.annealer = None

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

    def weight(self, trainer: L.Trainer, batch_idx: int) -> float:
        if self.unit == "step":
            t = trainer.global_step
        else:
            t = trainer.current_epoch + batch_idx / max(1, trainer.num_training_batches)
        return min(1.0, self.start + (1.0 - self.start) * t / self.duration)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        w = self.weight(trainer, batch_idx)
        pl_module.entropy_weight = w
        pl_module.prior_weight = w if self.kind == "kl" else 1.0

    def _reset(self, pl_module) -> None:
        pl_module.entropy_weight = pl_module.prior_weight = 1.0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log("train/anneal_weight", pl_module.entropy_weight)
        self._reset(pl_module)  # validation and test always use the true bound

    def on_train_end(self, trainer, pl_module) -> None:
        self._reset(pl_module)

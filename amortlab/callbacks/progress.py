"""One line per epoch (or per ``every_n_epochs``) on the console and in the run's ``train.log``:

    epoch 12/300 | train -L_k 25.31 | val_epoch/nll (IWAE-10) 24.80 | 21,400 img/s | 0.3 s

-L_k is the mean training loss over the epoch's steps (the annealed bound while annealing runs); the validation
number is the last per-epoch estimate (shown when that epoch validated). Written through the ``amortlab`` logger,
which Hydra sends to the console and to ``<run dir>/train.log``.
"""
from __future__ import annotations

import logging
import time

import lightning as L
import torch

log = logging.getLogger("amortlab")


class EpochLog(L.Callback):
    def __init__(self, every_n_epochs: int = 1):
        self.every = max(1, int(every_n_epochs))
        self._sum: torch.Tensor | None = None
        self._n = 0
        self._t0 = 0.0
        self._step0 = 0
        self._val_s = 0.0
        self._val_t0: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._sum, self._n = None, 0
        self._t0, self._step0, self._val_s = time.perf_counter(), trainer.global_step, 0.0

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_t0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._val_t0 is not None:
            self._val_s += time.perf_counter() - self._val_t0
            self._val_t0 = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        steps = outputs.get("steps", 1) if isinstance(outputs, dict) else 1  # a fused group's mean over its steps
        if loss is not None and steps:  # a device-side sum: no synchronisation per step
            loss = loss.detach() * steps
            self._sum = loss if self._sum is None else self._sum + loss
            self._n += steps

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        if not trainer.is_global_zero or (epoch % self.every and epoch != trainer.max_epochs):
            return
        seconds = time.perf_counter() - self._t0
        train_s = max(seconds - self._val_s, 1e-9)  # images/s of the training steps, validation excluded
        parts = [f"epoch {epoch}/{trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else '?'}"]
        if self._n:
            parts.append(f"train -L_{pl_module.k_train} {float(self._sum) / self._n:.3f}")
        val = trainer.callback_metrics.get("val_epoch/nll")
        if val is not None:
            parts.append(f"val_epoch/nll (IWAE-{pl_module.k_val}) {float(val):.3f}")
        batch = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
        if batch:
            parts.append(f"{(trainer.global_step - self._step0) * batch * trainer.world_size / train_s:,.0f} img/s")
        parts.append(f"{seconds:.1f} s")
        log.info(" | ".join(parts))

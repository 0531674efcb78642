"""Wall-clock throughput of the training loop (validation excluded), for results.json's ``timing``."""
from __future__ import annotations

import time

import lightning as L


class Throughput(L.Callback):
    """Counts training images and the seconds spent in training epochs (not in validation)."""

    def __init__(self):
        self.images = 0
        self.train_s = 0.0
        self._t0: float | None = None
        self._step0: int | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        self._step0 = trainer.global_step

    def _count(self, trainer) -> None:
        # no per-batch hook (it costs throughput): every training batch has the same size (drop_last)
        dm = trainer.datamodule
        batch = getattr(dm, "batch_size", None) if dm is not None else None
        if batch is not None and self._step0 is not None:
            self.images += (trainer.global_step - self._step0) * batch * trainer.world_size
        self._step0 = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self._stop()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.training:
            self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._count(trainer)
        self._stop()

    def _stop(self) -> None:
        if self._t0 is not None:
            self.train_s += time.perf_counter() - self._t0
            self._t0 = None

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.train_s if self.train_s > 0 else None

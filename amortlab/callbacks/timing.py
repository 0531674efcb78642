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

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.images += len(batch.x) * trainer.world_size

    def on_validation_start(self, trainer, pl_module) -> None:
        self._stop()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.training:
            self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._t0 is not None:
            self.train_s += time.perf_counter() - self._t0
            self._t0 = None

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.train_s if self.train_s > 0 else None

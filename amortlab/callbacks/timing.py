"""Wall-clock throughput of the training loop (validation excluded), for results.json's ``timing``."""
from __future__ import annotations

import time

import lightning as L


class Throughput(L.Callback):
    """Counts training images and the seconds spent in training epochs (not in validation), and the wall seconds of
    ``trainer.fit``. All three are saved in checkpoints and restored on resume, so a resumed run reports the totals
    of its whole training: images/s = images / train_s over every process that trained it (work after the last
    checkpoint of a killed process is redone, and counted once)."""

    def __init__(self):
        self.images = 0
        self.train_s = 0.0
        self.fit_s_before = 0.0  # wall seconds of fit in the processes before this one (from the checkpoint)
        self._t0: float | None = None
        self._step0: int | None = None
        self._fit_t0: float | None = None
        self._trainer = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._fit_t0, self._trainer = time.perf_counter(), trainer

    def fit_seconds(self, since: float | None = None) -> float:
        """Wall seconds of fit over all processes: the earlier ones' plus this one's since ``since`` (default: the
        start of this fit)."""
        t0 = since if since is not None else self._fit_t0
        return self.fit_s_before + (time.perf_counter() - t0 if t0 is not None else 0.0)

    def state_dict(self) -> dict:
        now = time.perf_counter()
        images = self.images
        trainer = self._trainer
        if trainer is not None and self._step0 is not None:  # the epoch in progress up to this save
            batch = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
            images += (trainer.global_step - self._step0) * (batch or 0) * trainer.world_size
        return {"images": images, "train_s": self.train_s + (now - self._t0 if self._t0 is not None else 0.0),
                "fit_s": self.fit_seconds()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.images = int(state_dict.get("images", 0))
        self.train_s = float(state_dict.get("train_s", 0.0))
        self.fit_s_before = float(state_dict.get("fit_s", 0.0))

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

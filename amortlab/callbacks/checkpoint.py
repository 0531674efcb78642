"""``checkpoints/last.ckpt`` at a cadence, and always at the end of training.

Lightning's ``ModelCheckpoint(every_n_epochs=N)`` writes at epochs N, 2N, ... only: a run whose length is not a
multiple of N (or that stops at ``trainer.max_steps`` mid-epoch) would leave ``last.ckpt`` up to N - 1 epochs
behind the weights it evaluated. ``LastCheckpoint`` also writes when training ends normally, unless it already
wrote at that step. A non-finite loss never reaches it: the method reads its deferred check at every epoch's end
(``amortlab.finite``), which precedes ``on_train_end``, and an interrupted or failed fit keeps the last cadence
checkpoint (Lightning does not call ``on_train_end`` then).
"""
from __future__ import annotations

import contextlib

import os
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from amortlab.errors import StorageError


class LastCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` without a monitor (``monitor=None``, ``save_top_k=1``) that also saves at the end of
    training (module docstring)."""

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if (self.monitor is not None or trainer.sanity_checking or trainer.global_step == 0
                or self._last_global_step_saved == trainer.global_step):
            return
        self._save_none_monitor_checkpoint(trainer, self._monitor_candidates(trainer))


class CheckedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, except that a failed write stops the run: Lightning's ``_atomic_save`` drops a
    ``PermissionError`` (an unwritable checkpoints/ trained to the end and lost the weights). Local paths are
    written to ``<name>.tmp-<pid>`` beside the target and renamed over it (atomic); any ``OSError`` becomes a
    ``StorageError`` naming the path and the training step. Remote (``scheme://``) paths go to Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path) or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise StorageError(
                f"Could not write the checkpoint {path} at epoch {checkpoint.get('epoch', '?')}, step "
                f"{checkpoint.get('global_step', '?')} ({type(e).__name__}: {e}); training stopped there. Make "
                f"{path.parent} writable (or free disk space) and resume from the last checkpoint written before "
                f"(the record's checkpoints.last), or rerun in a writable directory (hydra.run.dir=...).") from None


def use_checked_checkpoint_io(trainer) -> None:
    """Give ``trainer`` the ``CheckedCheckpointIO`` writer where it uses Lightning's default one."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = CheckedCheckpointIO()

"""``checkpoints/last.ckpt`` at a cadence, and always at the end of training.

Lightning's ``ModelCheckpoint(every_n_epochs=N)`` writes at epochs N, 2N, ... only: a run whose length is not a
multiple of N (or that stops at ``trainer.max_steps`` mid-epoch) would leave ``last.ckpt`` up to N - 1 epochs
behind the weights it evaluated. ``LastCheckpoint`` also writes when training ends normally, unless it already
wrote at that step. A non-finite loss never reaches it: the method reads its deferred check at every epoch's end
(``amortlab.finite``), which precedes ``on_train_end``, and an interrupted or failed fit keeps the last cadence
checkpoint (Lightning does not call ``on_train_end`` then).
"""
from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` without a monitor (``monitor=None``, ``save_top_k=1``) that also saves at the end of
    training (module docstring)."""

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if (self.monitor is not None or trainer.sanity_checking or trainer.global_step == 0
                or self._last_global_step_saved == trainer.global_step):
            return
        self._save_none_monitor_checkpoint(trainer, self._monitor_candidates(trainer))

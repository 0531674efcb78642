"""``checkpoints/last.ckpt`` at a cadence, and always at the end of training.

Lightning's ``ModelCheckpoint(every_n_epochs=N)`` writes at epochs N, 2N, ... only: a run whose length is not a
multiple of N (or that stops at ``trainer.max_steps`` mid-epoch) would leave ``last.ckpt`` up to N - 1 epochs
behind the weights it evaluated. ``LastCheckpoint`` also writes when training ends normally, unless it already
wrote at that step or the module's deferred non-finite check has a pending bad step (``amortlab.finite``): those
weights are not written. An interrupted or failed fit keeps the last cadence checkpoint (Lightning does not call
``on_train_end`` then).
"""
from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


def pending_nonfinite(pl_module) -> bool:
    """Whether the module's deferred finite check holds a non-finite step not yet read (any stacked member)."""
    guard = getattr(pl_module, "finite_guard", None)
    return guard is not None and guard.deferred and bool((guard.first_bad >= 0).any())


class LastCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` without a monitor (``monitor=None``, ``save_top_k=1``) that also saves at the end of
    training (module docstring)."""

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if (self.monitor is not None or trainer.sanity_checking or trainer.global_step == 0
                or self._last_global_step_saved == trainer.global_step):
            return
        # every rank decides alike (saving is collective under DDP): skip if any rank holds a bad step
        if trainer.strategy.reduce_boolean_decision(pending_nonfinite(pl_module), all=False):
            return
        self._save_none_monitor_checkpoint(trainer, self._monitor_candidates(trainer))

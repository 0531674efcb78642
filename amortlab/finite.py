"""The non-finite training loss guard: stop a run whose loss is NaN/inf before that step's update is kept.

Two ways to watch the loss (``inference.finite_check``):

- ``step``: read ``isfinite(loss)`` every step and stop at once, before the update (one host read per step; free on
  the CPU, a synchronisation per step on a GPU);
- ``deferred``: no host read per step. A non-finite step's update is skipped on the device (the fused optimiser's
  ``found_inf`` flag, as mixed-precision loss scaling uses: parameters, moments and step count untouched) and the
  first such step is remembered on the device; the flag is read every ``log_every_n_steps`` steps, at the last
  batch and at the end of every epoch (before that epoch's checkpoints are written, also for an epoch cut short by
  ``max_steps`` or ``should_stop``; training ends after one), and the run stops there naming the step.
  Needs a fused optimiser (``optim.optimizer.fused: true``, the default).
- ``auto`` (default): ``deferred`` on a CUDA device with a fused optimiser, else ``step``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from amortlab.errors import AmortlabError, NonFiniteLossError

MODES = ("auto", "step", "deferred")


FIX = ("Lower the learning rate (optim.optimizer.lr=...), add warm-up (annealing=kl or annealing=entropy), or check "
       "the data for values outside [0, 1]; then resume from last.ckpt (ckpt_path=...) or start again.")


class FiniteGuard:
    """Per-run state of the check; ``mode`` one of ``MODES``."""

    def __init__(self, mode: str = "auto"):
        if mode not in MODES:
            raise AmortlabError(f"inference.finite_check={mode!r} is not one of {', '.join(MODES)} (step: check the "
                                f"training loss every step; deferred: without a host sync, skipping a non-finite "
                                f"step's update on the device; auto: deferred on a GPU).")
        self.mode = mode
        self.deferred = False
        self.optimizer: torch.optim.Optimizer | None = None
        self.first_bad: Tensor | None = None  # on the device: the first non-finite global step, -1 while none
        self.read_step = 0

    def start(self, module, shape: tuple[int, ...] = ()) -> None:
        """Resolve ``auto`` for the module's device and optimiser (``on_train_start``); ``shape`` of the losses
        watched (``(N,)``: one per stacked model)."""
        opt = self.optimizer = _raw_optimizer(module)
        fused = bool(opt is not None and all(g.get("fused") for g in opt.param_groups))
        if self.mode == "deferred" and not fused:
            raise AmortlabError("inference.finite_check=deferred skips a non-finite step's update through the fused "
                                "optimiser's found_inf flag; set optim.optimizer.fused=true, or use "
                                "inference.finite_check=step.")
        self.deferred = self.mode == "deferred" or (self.mode == "auto" and module.device.type == "cuda" and fused)
        self.first_bad = torch.full(shape, -1, dtype=torch.long, device=module.device)
        self.read_step = module.global_step  # the step at which the deferred flag was last read

    def observe(self, module, loss: Tensor, batch_idx: int) -> None:
        """After the loss of a training step is formed (before its backward)."""
        if not self.deferred:
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"The training loss became {loss.item()} at global step {module.global_step} (epoch "
                    f"{module.current_epoch}, batch {batch_idx}); training stopped before that step's update, and "
                    f"the checkpoints written before it (results.json lists them, if any) are intact. {FIX}")
            return
        bad = self.remember(module, loss)
        self.optimizer.found_inf = bad.to(torch.float32)  # the fused step skips this update on the device

    def remember(self, module, loss: Tensor) -> Tensor:
        """Keep, on the device, the global step at which each entry of ``loss`` first became non-finite; returns
        ``~isfinite(loss)`` (no host read)."""
        bad = ~torch.isfinite(loss)
        step = torch.full((), module.global_step, dtype=torch.long, device=loss.device)
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)
        return bad

    def due(self, module, batch_idx: int) -> bool:
        """Whether the deferred flag is read at the end of this training batch (every ``log_every_n_steps`` steps
        and at the epoch's last batch)."""
        if not self.deferred:
            return False
        last = batch_idx + 1 >= module.trainer.num_training_batches
        n = module.log_every_n_steps
        # a fused training step (inference.fused_steps) advances several steps: read when a multiple was crossed
        due = last or module.global_step // n > self.read_step // n
        if due:
            self.read_step = module.global_step
        return due

    def check(self, module, batch_idx: int) -> None:
        """At the end of a training batch: read the device flag at the deferred mode's cadence."""
        if self.due(module, batch_idx):
            self._raise_if_bad(module)

    def read_now(self, module) -> None:
        """Read the deferred flag outside the cadence (each epoch's end, before its checkpoints), so an epoch cut
        short between two reads (``max_steps``, ``should_stop``) still stops at a bad step."""
        if self.deferred:
            self._raise_if_bad(module)

    def _raise_if_bad(self, module) -> None:
        first = int(self.first_bad)
        if first >= 0:
            raise NonFiniteLossError(
                f"The training loss became non-finite at global step {first} (inference.finite_check=deferred: the "
                f"loss is read every {module.log_every_n_steps} steps and at each epoch's end, "
                f"without a host sync per step). That step's update was skipped on the device (as was any later "
                f"non-finite step's), training stopped at step {module.global_step}, and the checkpoints written "
                f"before step {first} (results.json lists them, if any) are intact. {FIX}")


def _raw_optimizer(module) -> torch.optim.Optimizer | None:
    opts = module.optimizers(use_pl_optimizer=False) if module._trainer is not None else None
    if isinstance(opts, list):
        return opts[0] if opts else None
    return opts

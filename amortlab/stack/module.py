"""The stacked method: N models of one method trained as one computation, each exactly as its own run.

``stack_method(members)`` returns a copy of the method whose layers hold all members' weights
(``amortlab.stack.layers``) and whose class adds ``StackedTraining``: per step it minimises

    sum_i -(1/B) sum_b L_k(x_{i,b})        (model i's own batch x_i, its own noise stream)

so each model's gradient is exactly its single run's (parameters are disjoint; Adam is elementwise), and per-epoch
validation keeps one set of exact means per model. Each model's values are logged where its single run logs them
(``self.log`` in the same hooks, under ``amortlab.stack.records.member_key``), so the trainer's ``MemberLogs`` holds
each model's logged history with the single run's keys and steps. Noise: training draws come from each member's
generator (the state its single run's global RNG has when training starts), evaluation draws from the per-batch
seeded generator as in a single run (``amortlab.distributions.noise``).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import cache

import torch
from torch import Tensor, nn

from amortlab.data.loader import Batch
from amortlab.distributions import noise
from amortlab.errors import AmortlabError, NonFiniteLossError
from amortlab.finite import FIX
from amortlab.stack.layers import member_state, stack_modules
from amortlab.stack.records import member_key
from amortlab.stack.values import scale_lr_per_model


class StackedTraining:
    """Mixin placed before the method's class; the attributes are set by ``stack_method``.

    n_stack: N. lr_scale: ``[N]`` lr_i / lr_0 when the members' learning rates differ, else None.
    rng_states: each member's (CPU state, CUDA state or None) at the start of training.
    member_val: one ``SplitMetrics`` per member. alive: members still training (``[N]`` bool; a member whose loss
    becomes non-finite stops, the others go on). diverged: {member: message}. val_results: the last per-epoch
    validation means per member.
    """

    n_stack: int
    lr_scale: Tensor | None
    rng_states: list[tuple[Tensor, Tensor | None]]
    member_val: nn.ModuleList
    diverged: dict[int, str]
    val_results: list[dict[str, float]]

    def batch_mean(self, values: Tensor) -> Tensor:
        return values.reshape(self.n_stack, -1).mean(1)

    def on_train_start(self) -> None:
        self.finite_guard.start(self, (self.n_stack,))
        device = self.device
        self.generators = []
        for cpu_state, cuda_state in self.rng_states:
            g = torch.Generator(device=device)
            g.set_state(cuda_state if device.type == "cuda" and cuda_state is not None else cpu_state)
            self.generators.append(g)

    def member_rng_state(self, i: int) -> Tensor:
        """Member i's noise stream now (stored in its checkpoints as ``torch_rng_state``)."""
        return self.generators[i].get_state() if self.device.type == "cpu" else self.rng_states[i][0]

    def step_loss(self, batch: Batch, batch_idx: int) -> Tensor:
        with noise.stacked(self.n_stack, self.generators):
            losses = self.training_loss(batch.x)  # [N]
        finite = torch.isfinite(losses)
        if self.finite_guard.deferred:  # no host read: each member's first bad step is kept on the device
            self.finite_guard.remember(self, losses)
            self.alive &= finite
        elif not bool(finite.all()):
            self._diverge(losses, finite, batch_idx)
        if self.logs_this_step():
            self.log_train_loss(losses)
        self.last_losses = losses.detach()
        # a diverged member's rows are NaN in its own block only (every layer is per model, every other op per row)
        return torch.where(self.alive, losses, torch.zeros_like(losses)).sum()

    def log_train_loss(self, loss: Tensor) -> None:
        """Each training member's ``train/loss`` (``loss`` ``[N]``), logged as its single run logs its own."""
        self.log_step_values({member_key(i, "train/loss"): loss[i].detach() for i in range(self.n_stack)
                              if i not in self.diverged})

    def on_train_batch_end(self, outputs, batch: Batch, batch_idx: int) -> None:
        """Deferred check (``amortlab.finite``): record the members whose loss turned non-finite since the last
        read; their checkpoints are not written after it (the read precedes each epoch's checkpoints)."""
        if self.finite_guard.due(self, batch_idx):
            self._read_deferred()

    def read_nonfinite_flag(self) -> None:
        """The deferred read at each epoch's end, per member."""
        if self.finite_guard.deferred:
            self._read_deferred()

    def _read_deferred(self) -> None:
        for i, step in enumerate(self.finite_guard.first_bad.tolist()):
            if step >= 0 and i not in self.diverged:
                self.diverged[i] = (
                    f"The training loss became non-finite at global step {step} (read at step {self.global_step}: "
                    f"inference.finite_check=deferred, no host sync per step); this model's results after it are "
                    f"discarded (the other stacked models went on), and its checkpoints written before it are "
                    f"intact. {FIX}")
        if not bool(self.alive.any()):
            raise NonFiniteLossError(next(iter(self.diverged.values())))

    def _diverge(self, losses: Tensor, finite: Tensor, batch_idx: int) -> None:
        for i in torch.nonzero(~finite & self.alive).flatten().tolist():
            self.alive[i] = False
            self.diverged[i] = (
                f"The training loss became {losses[i].item()} at global step {self.global_step} (epoch "
                f"{self.current_epoch}, batch {batch_idx}); this model stopped before that step's update (the other "
                f"stacked models went on), and its checkpoints written before it are intact. {FIX}")
        if not bool(self.alive.any()):
            raise NonFiniteLossError(next(iter(self.diverged.values())))

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        n = self.n_stack
        stacked_batch = Batch(batch.x.repeat(n, 1), batch.first_index)
        with noise.stacked(n, self.generators if hasattr(self, "generators") else []):
            out = self.evaluate_batch(stacked_batch, self.k_val, "val", mutual_info=self.val_mutual_info)
        z_mean = out.pop("z_mean")
        for i, metrics in enumerate(self.member_val):
            metrics.update({k: v.reshape(n, -1)[i] for k, v in out.items()}, z_mean.reshape(n, -1, z_mean.shape[-1])[i])

    def on_validation_epoch_end(self) -> None:
        results = [m.compute("val_epoch") for m in self.member_val]
        if not self.trainer.sanity_checking:
            self.val_results = [{k: float(v) for k, v in r.items()} for r in results]
            self.log_dict({member_key(i, k): v for i, r in enumerate(results) if i not in self.diverged
                           for k, v in r.items()}, sync_dist=False)

    def configure_optimizers(self):
        out = super().configure_optimizers()
        if self.lr_scale is not None:  # members with their own learning rates (amortlab.stack.values)
            scale_lr_per_model(out if isinstance(out, torch.optim.Optimizer) else out["optimizer"], self.lr_scale)
        return out

    def sample_images(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        raise AmortlabError("a stacked module draws no image panels; unstack a member (amortlab.stack) first.")


@cache
def _stacked_class(cls: type) -> type:
    return type(f"Stacked{cls.__name__}", (StackedTraining, cls), {"__module__": __name__})


def capture_rng() -> tuple[Tensor, Tensor | None]:
    """The global RNG state(s) now: what a single run's training noise will start from."""
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def stack_method(members: Sequence, rng_states: Sequence[tuple[Tensor, Tensor | None]]):
    """The stacked module of ``members`` (one method, one architecture; differing in seed, and in a setting that
    ``amortlab.stack.values.apply_values`` then sets per model)."""
    first = members[0]
    if not getattr(type(first), "stackable", False):
        raise AmortlabError(
            f"stack.seeds trains several models as one computation for inference=amortized (VAE / IWAE-k, every "
            f"encoder regularizer, posterior=gaussian|flow, one or several stochastic layers) and inference=ladder; "
            f"{type(first).__name__} (method {first.method_name}) is not "
            f"stackable yet. Drop stack.seeds (one run per seed), or in sweep.py set the study's stack: false.")
    if any(type(m) is not type(first) for m in members):
        raise AmortlabError("stacked models must all use the same method.")
    if first.val_mutual_info:  # its groups of MI_GROUP rows would span the stacked models' blocks
        raise AmortlabError(f"{type(first).__name__} estimates I_q(x; z) in every validation, which stack.seeds does "
                            f"not do per model; drop stack.seeds (one run per seed).")
    stacked = stack_modules(members)
    stacked.__class__ = _stacked_class(type(first))
    n = len(members)
    stacked.n_stack = n
    stacked.eval_rows = first.eval_rows * n  # the same samples per chunk as each single run (same noise stream)
    stacked.rng_states = list(rng_states)
    stacked.member_val = nn.ModuleList(copy.deepcopy(first.val_metrics) for _ in range(n))
    stacked.register_buffer("alive", torch.ones(n, dtype=torch.bool), persistent=False)
    stacked.diverged, stacked.val_results = {}, []
    stacked.lr_scale = None
    return stacked


__all__ = ["StackedTraining", "stack_method", "capture_rng", "member_state"]

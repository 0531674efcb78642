"""Aggressive inference-network training (He, Spokoyny, Neubig & Berg-Kirkpatrick 2019, "Lagging inference networks
and posterior collapse in variational autoencoders", Algorithm 1).

While the *aggressive phase* lasts, each training step is

    inner loop  repeat: phi <- phi + step(grad_phi L(X_j; theta, phi)),  X_1 = the step's batch, X_2, ... fresh
                random training batches,  until the rule below stops it
    outer step  theta <- theta + step(grad_theta L(X_1; theta, phi))            (the encoder is not updated here)

Stopping rule of the inner loop (He et al.'s code): the mean loss over each block of ``check_every`` inner batches is
compared with the previous block's; the loop stops at the first block that is not lower, or after
``max_inner_steps``. The phase ends at the end of the first epoch whose per-epoch validation mutual information
I_q(x; z) (``amortlab.evaluation.collapse``) is lower than the previous epoch's (or at the end of epoch
``max_epochs`` when that is set); from then on every step is exactly the underlying amortized training step
(``AmortizedVAE``: one joint update of theta and phi by the configured optimiser).

L is the scheme's ordinary training loss (k importance samples, the encoder regularizer, annealing weights), with the
model's parameters held constant in the inner loop (``frozen_decoder``) and the encoder's gradient dropped before the
outer step. The inner loop has its own optimiser (the configured one, over the encoder's parameters; its state is
kept across steps and in checkpoints, as He et al.'s separate encoder optimiser).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from amortlab.data.loader import Batch
from amortlab.distributions import require
from amortlab.errors import AmortlabError
from amortlab.methods.amortized import AmortizedVAE

log = logging.getLogger("amortlab")


@dataclass
class InnerStop:
    """He et al.'s inner-loop rule: ``step(loss) -> True`` when the loop must stop after this step (a block of
    ``check_every`` losses whose mean is not below the previous block's, or ``max_steps`` steps)."""

    max_steps: int = 100
    check_every: int = 10

    def __post_init__(self):
        self.steps, self.block, self.previous = 0, [], float("inf")

    def step(self, loss: float) -> bool:
        self.steps += 1
        self.block.append(float(loss))
        if len(self.block) == self.check_every:
            mean = sum(self.block) / len(self.block)
            if mean >= self.previous:
                return True
            self.previous, self.block = mean, []
        return self.steps >= self.max_steps


class AggressiveVAE(AmortizedVAE):
    """``inference=aggressive``: amortized inference with He et al.'s aggressive encoder phase (module docstring).

    Args:
        encoder, decoder: as ``AmortizedVAE``.
        max_inner_steps: cap on encoder updates per training step (He et al.: 100).
        check_every: block length of the inner stopping rule (He et al.: 10).
        max_epochs: end the phase after this epoch at the latest (None: only the mutual-information rule).
    """

    method_name = "aggressive"
    stackable = False
    val_mutual_info = True

    def __init__(self, encoder: nn.Module, decoder: nn.Module | None = None, max_inner_steps: int = 100,
                 check_every: int = 10, max_epochs: int | None = None, **kwargs):
        problems = []
        if max_inner_steps < 1 or check_every < 1:
            problems.append(f"inference.max_inner_steps={max_inner_steps} and inference.check_every={check_every} "
                            f"must be >= 1")
        if max_epochs is not None and max_epochs < 1:
            problems.append(f"inference.max_epochs={max_epochs} must be >= 1 or null")
        if problems:
            raise AmortlabError("inference=aggressive cannot be built: " + "; ".join(problems) + " (defaults in "
                                "conf/inference/aggressive.yaml).")
        super().__init__(encoder, decoder=decoder, **kwargs)
        if max_epochs is None:
            require(type(encoder).family, "log_prob", who="inference=aggressive (its phase ends when the validation "
                    "mutual information I_q(x; z) stops rising, which needs q's density at other points' draws)",
                    fix="Use posterior=gaussian or iaf, or end the phase after a fixed number of epochs with "
                        "inference.max_epochs=N.")
        self.max_inner_steps, self.check_every, self.max_epochs = int(max_inner_steps), int(check_every), max_epochs
        self.aggressive = True
        self.previous_mi: float | None = None
        self.phase_end_epoch: int | None = None
        self.inner_steps_last = 0  # encoder updates of the latest step's inner loop (logged)
        self._inner_opt: torch.optim.Optimizer | None = None
        self._inner_state: dict | None = None
        self._fresh_gen: torch.Generator | None = None
        self.batch_source = None  # the training TensorLoader (the trainer's at the first step; tests set their own)
        self._inner = False

    # --- set-up ---------------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.trainer.world_size > 1:
            raise AmortlabError("inference=aggressive trains on one process: its inner encoder loop draws its own "
                                "batches and steps its own optimiser outside DDP's gradient synchronisation. Use "
                                "trainer=cpu or trainer=gpu (one device).")
        if self.aggressive and self.max_epochs is None and not self.trainer.limit_val_batches:
            raise AmortlabError("inference=aggressive ends its phase by the per-epoch validation mutual information, "
                                "but validation is off (trainer.limit_val_batches=0). Turn it on, or set "
                                "inference.max_epochs=N.")

    def inner_optimizer(self) -> torch.optim.Optimizer:
        if self._inner_opt is None:
            self._inner_opt = self.optim_cfg["optimizer"](list(self.encoder.parameters()))
            if self._inner_state is not None:
                self._inner_opt.load_state_dict(self._inner_state)
                self._inner_state = None
        return self._inner_opt

    def fresh_batch(self, like: Tensor) -> Tensor:
        """A random training batch of ``like``'s size (rows drawn uniformly; dynamically binarized when the loader
        is), from a generator seeded by the loader's seed and the global step."""
        if self.batch_source is None:
            self.batch_source = self.trainer.train_dataloader
        src = self.batch_source
        data = src.data
        if self._fresh_gen is None or self._fresh_gen.device != data.device:
            self._fresh_gen = torch.Generator(device=data.device)
            self._fresh_gen.manual_seed(int(getattr(src, "seed", 0)) * 1_000_003 + 424_242 + self.global_step)
        idx = torch.randint(len(data), (like.shape[0],), generator=self._fresh_gen, device=data.device)
        x = data.index_select(0, idx)
        if getattr(src, "dynamic_binarization", False):
            x = torch.bernoulli(x, generator=self._fresh_gen)
        return x.to(like)

    # --- the two phases -------------------------------------------------------------------------------------------
    def log_weights_at(self, x, z, log_q, annealed: bool = False, frozen_decoder: bool = False) -> Tensor:
        return super().log_weights_at(x, z, log_q, annealed, frozen_decoder or self._inner)

    def inner_loop(self, x: Tensor) -> list[float]:
        """The encoder's updates before one decoder update (module docstring); returns their losses."""
        opt, rule, losses = self.inner_optimizer(), InnerStop(self.max_inner_steps, self.check_every), []
        params = [p for p in self.encoder.parameters() if p.requires_grad]
        self._inner = True
        try:
            batch = x
            while True:
                loss = self.training_loss(batch)
                if not torch.isfinite(loss):
                    self.finite_guard.observe(self, loss, -1)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for p, g in zip(params, grads):
                    p.grad = g
                opt.step()
                for p in params:
                    p.grad = None
                losses.append(loss.item())
                if rule.step(losses[-1]):
                    break
                batch = self.fresh_batch(x)
        finally:
            self._inner = False
        return losses

    def step_loss(self, batch: Batch, batch_idx: int) -> Tensor:
        if self.aggressive:
            self.inner_steps_last = len(self.inner_loop(batch.x))
            if self.global_step % self.log_every_n_steps == 0:
                self.log("train/aggressive_inner_steps", float(self.inner_steps_last), on_step=True, on_epoch=False)
        return super().step_loss(batch, batch_idx)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.aggressive:  # the outer step updates theta only
            for p in self.encoder.parameters():
                p.grad = None

    def after_validation(self, out: dict[str, float]) -> None:
        """End the phase when this epoch's validation I_q(x; z) is below the previous epoch's (He et al.)."""
        mi = out.get("val_epoch/mutual_info")
        if not self.aggressive or mi is None:
            return
        if self.previous_mi is not None and mi < self.previous_mi:
            self._end_phase(f"the validation mutual information fell from {self.previous_mi:.3f} to {mi:.3f} nats")
        self.previous_mi = mi

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.aggressive and self.max_epochs is not None and self.current_epoch + 1 >= self.max_epochs:
            self._end_phase(f"inference.max_epochs={self.max_epochs} reached")
        self.log("train/aggressive", float(self.aggressive), on_step=False, on_epoch=True)

    def _end_phase(self, reason: str) -> None:
        self.aggressive, self.phase_end_epoch = False, self.current_epoch + 1
        log.info("aggressive phase ended after epoch %d (%s); ordinary VAE training from here", self.phase_end_epoch,
                 reason)

    # --- checkpoints ----------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["aggressive"] = {"on": self.aggressive, "previous_mi": self.previous_mi,
                                    "phase_end_epoch": self.phase_end_epoch,
                                    "inner_optimizer": None if self._inner_opt is None else
                                    self._inner_opt.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("aggressive")
        if state is not None:
            self.aggressive, self.previous_mi = state["on"], state["previous_mi"]
            self.phase_end_epoch, self._inner_state = state["phase_end_epoch"], state["inner_optimizer"]

    def tags(self) -> list[str]:
        return ["aggressive", *super().tags()]

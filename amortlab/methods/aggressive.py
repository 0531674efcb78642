"""Aggressive inference-network training (He, Spokoyny, Neubig & Berg-Kirkpatrick 2019, "Lagging inference networks
and posterior collapse in variational autoencoders", Algorithm 1, with the rules of their image experiment's code).

While the *aggressive phase* lasts, each training step is

    inner loop  repeat: phi <- phi - step(clip(grad L(X_j; theta, phi)))_phi,  X_1 = the step's batch, X_2, ...
                fresh training batches,  until the rule below stops it
    outer step  theta <- theta - step(clip(grad L(X_1; theta, phi)))_theta           (the encoder is not updated here)

where clip(g) = g min(1, c / |g|) with |g| the norm of the encoder's and the model's gradients together (``grad_clip``
c = 5; He et al. clip all the VAE's parameters in both steps, so the inner step computes the model's gradient for the
norm only). From the phase's end on, every step is the underlying amortized step (``AmortizedVAE``: one joint update
of theta and phi by the configured optimiser), clipped alike.

Inner loop (``max_inner_steps`` 100, ``check_every`` 10): the mean loss of each block of ``check_every`` inner batches
is compared with the previous block's; the loop stops after the first block whose mean is higher, or after
``max_inner_steps`` updates. Its fresh batches (``inner_batches``) come from shuffled passes over the training set,
each point at most once per pass and a new permutation when fewer than a batch remain (``without_replacement``), or
are drawn uniformly (``with_replacement``). Its optimiser is the configured one over the encoder's parameters, with its
own state (kept across steps and in checkpoints, as He et al.'s separate encoder optimiser); with
``inner_follows_scheduler`` its learning rate is set before each inner loop to the outer optimiser's current one (He
et al. decay both together).

Phase end (``mi_patience`` 5, ``mi_group`` 50): after each validation run the phase's own estimate of I_q(x; z) on the
validation set, ``amortlab.evaluation.collapse.mutual_information`` over groups of ``mi_group`` points (He et al.'s
``calc_mi``: one draw per point, the aggregate posterior of its batch of 50), logged as
``val_epoch/aggressive_mutual_info``. A value below the best so far (initially 0) counts one; any other becomes the
best; the phase ends when the count reaches ``mi_patience``. As in their image code the count runs over the whole
phase (a new best does not reset it); their text code ends the phase at the first value below the previous one. Or
the phase ends after epoch ``max_epochs``.

L is the scheme's ordinary training loss (k importance samples, the encoder regularizer, annealing weights). The
whole state (phase flag, MI record, inner optimiser, the inner batches' permutation and generator) is in checkpoints,
so a resumed run continues exactly as an uninterrupted one.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from amortlab.data.loader import Batch
from amortlab.distributions import require
from amortlab.errors import AmortlabError
from amortlab.evaluation.collapse import mutual_information
from amortlab.methods.amortized import AmortizedVAE

log = logging.getLogger("amortlab")

INNER_BATCHES = ("without_replacement", "with_replacement")
MI_KEY = "val_epoch/aggressive_mutual_info"


@dataclass
class AggressiveConfig:
    """The settings of ``inference=aggressive`` (conf/inference/aggressive.yaml); defaults: He et al.'s image
    experiment (jxhe/vae-lagging-encoder, image.py). The I_q groups lie within each validation batch
    (``dataset.eval_batch_size``; a smaller batch is one group)."""

    max_inner_steps: int = 100               # cap on encoder updates per training step
    check_every: int = 10                    # block length of the inner stopping rule
    max_epochs: int | None = None            # end the phase after this epoch at the latest (None: the MI rule only)
    mi_patience: int = 5                     # validations with I_q below the best so far that end the phase
    mi_group: int = 50                       # points per group of the phase's I_q estimate (He et al.: batch 50)
    grad_clip: float | None = 5.0            # max norm of the encoder's and model's gradients together (None: off)
    inner_batches: str = "without_replacement"  # or with_replacement (uniform draws)
    inner_follows_scheduler: bool = True     # the inner optimiser's lr = the outer one's current lr

    def __post_init__(self) -> None:
        problems = []
        if self.max_inner_steps < 1 or self.check_every < 1:
            problems.append(f"inference.max_inner_steps={self.max_inner_steps} and inference.check_every="
                            f"{self.check_every} must be >= 1")
        if self.max_epochs is not None and self.max_epochs < 1:
            problems.append(f"inference.max_epochs={self.max_epochs} must be >= 1 or null")
        if self.mi_patience < 1 or self.mi_group < 2:
            problems.append(f"inference.mi_patience={self.mi_patience} must be >= 1 and inference.mi_group="
                            f"{self.mi_group} >= 2")
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append(f"inference.grad_clip={self.grad_clip} must be > 0 or null (no clipping)")
        if self.inner_batches not in INNER_BATCHES:
            problems.append(f"inference.inner_batches={self.inner_batches!r} must be one of {list(INNER_BATCHES)}")
        if problems:
            raise AmortlabError("inference=aggressive cannot be built: " + "; ".join(problems) + " (defaults in "
                                "conf/inference/aggressive.yaml).")


@dataclass
class InnerStop:
    """He et al.'s inner-loop rule: ``step(loss) -> True`` when the loop must stop after this step (a block of
    ``check_every`` losses whose mean is above the previous block's, or ``max_steps`` steps)."""

    max_steps: int = 100
    check_every: int = 10

    def __post_init__(self):
        self.steps, self.block, self.previous = 0, [], float("inf")

    def step(self, loss: float) -> bool:
        self.steps += 1
        self.block.append(float(loss))
        if len(self.block) == self.check_every:
            mean = sum(self.block) / len(self.block)
            if mean > self.previous:
                return True
            self.previous, self.block = mean, []
        return self.steps >= self.max_steps


class InnerBatches:
    """Row indices of the inner loop's fresh batches out of ``n`` training points: consecutive slices of a random
    permutation, a new one when fewer than a batch remain (``replacement=False``: each point at most once per pass,
    no repeats within a batch), or uniform draws (``replacement=True``); one seeded generator, whose state, the
    permutation and the position are the ``state_dict``."""

    def __init__(self, n: int, replacement: bool, seed: int, device: torch.device):
        self.n, self.replacement = int(n), replacement
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.perm: Tensor | None = None
        self.pos = 0

    def next(self, size: int) -> Tensor:
        """``size`` indices ``[size]`` on the generator's device."""
        device = self.generator.device
        if self.replacement:
            return torch.randint(self.n, (size,), generator=self.generator, device=device)
        if size > self.n:
            raise AmortlabError(f"inference=aggressive draws batches of {size} without replacement from {self.n} "
                                f"training points; use a smaller dataset.batch_size or inference.inner_batches="
                                f"with_replacement.")
        if self.perm is None or self.pos + size > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.generator, device=device), 0
        self.pos += size
        return self.perm[self.pos - size:self.pos]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "pos": self.pos,
                "perm": None if self.perm is None else self.perm.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.pos = int(state["pos"])
        self.perm = None if state["perm"] is None else state["perm"].to(self.generator.device)


class AggressiveVAE(AmortizedVAE):
    """``inference=aggressive``: amortized inference with He et al.'s aggressive encoder phase (module docstring).

    Args:
        encoder, decoder: as ``AmortizedVAE``.
        max_inner_steps, check_every, max_epochs, mi_patience, mi_group, grad_clip, inner_batches,
        inner_follows_scheduler: ``AggressiveConfig``.
    """

    method_name = "aggressive"
    stackable = False
    val_mutual_info = True

    def __init__(self, encoder: nn.Module, decoder: nn.Module | None = None, max_inner_steps: int = 100,
                 check_every: int = 10, max_epochs: int | None = None, mi_patience: int = 5, mi_group: int = 50,
                 grad_clip: float | None = 5.0, inner_batches: str = "without_replacement",
                 inner_follows_scheduler: bool = True, **kwargs):
        settings = AggressiveConfig(int(max_inner_steps), int(check_every), max_epochs, int(mi_patience),
                                    int(mi_group), None if grad_clip is None else float(grad_clip), inner_batches,
                                    bool(inner_follows_scheduler))
        super().__init__(encoder, decoder=decoder, **kwargs)
        if max_epochs is None:
            require(type(encoder).family, "log_prob", who="inference=aggressive (its phase ends when the validation "
                    "mutual information I_q(x; z) stops rising, which needs q's density at other points' draws)",
                    fix="Use posterior=gaussian or iaf, or end the phase after a fixed number of epochs with "
                        "inference.max_epochs=N.")
        self.settings = settings
        self.aggressive = True
        self.previous_mi: float | None = None  # the latest validation's I_q
        self.best_mi = 0.0
        self.mi_below_best = 0  # validations whose I_q was below the best so far
        self.phase_end_epoch: int | None = None
        self.inner_steps_last = 0  # encoder updates of the latest step's inner loop (logged)
        self._inner_opt: torch.optim.Optimizer | None = None
        self._inner_state: dict | None = None
        self._batches: InnerBatches | None = None
        self._batches_state: dict | None = None
        self._mi_sum, self._mi_n = 0.0, 0
        self.batch_source = None  # the training TensorLoader (the trainer's at the first step; tests set their own)
        self._inner = False

    # --- set-up ---------------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.trainer.world_size > 1:
            raise AmortlabError("inference=aggressive trains on one process: its inner encoder loop draws its own "
                                "batches and steps its own optimiser outside DDP's gradient synchronisation. Use "
                                "trainer=cpu or trainer=gpu (one device).")
        if self.aggressive and self.settings.max_epochs is None and not self.trainer.limit_val_batches:
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

    def outer_lr(self) -> float | None:
        """The current learning rate of the trainer's optimiser group holding the encoder (None outside a fit)."""
        trainer = self._trainer
        if trainer is None:
            return None
        first = next(iter(self.encoder.parameters()))
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                if any(p is first for p in group["params"]):
                    return group["lr"]
        return None

    def fresh_batch(self, like: Tensor) -> Tensor:
        """The inner loop's next training batch, of ``like``'s size (``InnerBatches``; dynamically binarized when
        the loader is, from the same generator)."""
        if self.batch_source is None:
            self.batch_source = self.trainer.train_dataloader
        src = self.batch_source
        data = src.data
        if self._batches is None or self._batches.generator.device != data.device:
            self._batches = InnerBatches(len(data), self.settings.inner_batches == "with_replacement",
                                         int(getattr(src, "seed", 0)) * 1_000_003 + 424_242, data.device)
            if self._batches_state is not None:
                self._batches.load_state_dict(self._batches_state)
                self._batches_state = None
        x = data.index_select(0, self._batches.next(like.shape[0]))
        if getattr(src, "dynamic_binarization", False):
            x = torch.bernoulli(x, generator=self._batches.generator)
        return x.to(like)

    # --- the two phases -------------------------------------------------------------------------------------------
    def log_weights_at(self, x, z, log_q, annealed: bool = False, frozen_decoder: bool = False) -> Tensor:
        return super().log_weights_at(x, z, log_q, annealed, frozen_decoder or self._inner)

    def inner_loop(self, x: Tensor) -> list[float]:
        """The encoder's updates before one decoder update (module docstring); returns their losses."""
        s = self.settings
        opt, rule, losses = self.inner_optimizer(), InnerStop(s.max_inner_steps, s.check_every), []
        lr = self.outer_lr() if s.inner_follows_scheduler else None
        if lr is not None:
            for group in opt.param_groups:
                group["lr"] = lr
        enc = [p for p in self.encoder.parameters() if p.requires_grad]
        # the model's gradient only for the clipping norm (its parameters are held constant otherwise)
        model = [p for p in self.model.parameters() if p.requires_grad] if s.grad_clip is not None else []
        self._inner = not model
        try:
            batch = x
            while True:
                loss = self.training_loss(batch)
                if not torch.isfinite(loss):
                    self.finite_guard.observe(self, loss, -1)
                grads = torch.autograd.grad(loss, enc + model, allow_unused=True)
                for p, g in zip(enc + model, grads):
                    p.grad = g
                if model:
                    torch.nn.utils.clip_grad_norm_([p for p in enc + model if p.grad is not None], s.grad_clip)
                opt.step()
                for p in enc + model:
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
            if self.logs_this_step():
                self.log_step_values({"train/aggressive_inner_steps": float(self.inner_steps_last)})
        return super().step_loss(batch, batch_idx)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.settings.grad_clip is not None:  # every outer step, over all gradients (encoder's included)
            torch.nn.utils.clip_grad_norm_([p for p in self.parameters() if p.grad is not None],
                                           self.settings.grad_clip)
        if self.aggressive:  # the outer step updates theta only
            for p in self.encoder.parameters():
                p.grad = None

    # --- the phase's end ------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._mi_sum, self._mi_n = 0.0, 0

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if self.aggressive:  # the phase's I_q: groups of mi_group points, an independent noise stream
            mi = mutual_information(self.infer(batch.x), self.eval_generator(batch, "val", stream=2),
                                    self.settings.mi_group)
            if mi is not None:
                self._mi_sum += float(mi.double().sum())
                self._mi_n += mi.numel()

    def after_validation(self, out: dict[str, float]) -> None:
        if self.aggressive and self._mi_n:
            mi = self._mi_sum / self._mi_n
            self.log(MI_KEY, mi, sync_dist=False)
            self.observe_mi(mi)

    def observe_mi(self, mi: float) -> None:
        """He et al.'s phase rule on one validation's I_q (module docstring)."""
        if not self.aggressive:
            return
        self.previous_mi = mi
        if mi < self.best_mi:
            self.mi_below_best += 1
            if self.mi_below_best >= self.settings.mi_patience:
                self._end_phase(f"{self.mi_below_best} validations with I_q(x; z) below its best, "
                                f"{self.best_mi:.3f} nats (latest {mi:.3f})")
        else:
            self.best_mi = mi

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        max_epochs = self.settings.max_epochs
        if self.aggressive and max_epochs is not None and self.current_epoch + 1 >= max_epochs:
            self._end_phase(f"inference.max_epochs={max_epochs} reached")
        self.log("train/aggressive", float(self.aggressive), on_step=False, on_epoch=True)

    def _end_phase(self, reason: str) -> None:
        self.aggressive, self.phase_end_epoch = False, self.current_epoch + 1
        log.info("aggressive phase ended after epoch %d (%s); ordinary VAE training from here", self.phase_end_epoch,
                 reason)

    # --- checkpoints ----------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["aggressive"] = {
            "on": self.aggressive, "previous_mi": self.previous_mi, "best_mi": self.best_mi,
            "mi_below_best": self.mi_below_best, "phase_end_epoch": self.phase_end_epoch,
            "inner_optimizer": self._inner_opt.state_dict() if self._inner_opt is not None else self._inner_state,
            "inner_batches": self._batches.state_dict() if self._batches is not None else self._batches_state}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("aggressive")
        if state is not None:
            self.aggressive, self.previous_mi = state["on"], state["previous_mi"]
            self.phase_end_epoch, self._inner_state = state["phase_end_epoch"], state["inner_optimizer"]
            self.best_mi = state.get("best_mi", 0.0 if self.previous_mi is None else self.previous_mi)
            self.mi_below_best = state.get("mi_below_best", 0)
            self._inner_opt, self._batches, self._batches_state = None, None, state.get("inner_batches")

    def tags(self) -> list[str]:
        return ["aggressive", *super().tags()]

"""``ELBOModule``: the one LightningModule every method subclasses.

It holds the generative model p_theta(x, z) (``amortlab.models``; ``decoder=`` is shorthand for the flat N(0, I)
model), the k-sample bound, the training and per-epoch validation steps, the per-batch evaluation and the
optimiser. A method overrides only ``infer(x) -> q`` (how q(z | x) is made) and, where it must, ``bound`` or
``infer_for_eval``. Training minimises

    -(1/B) sum_b L_k(x_b),   L_k(x) = log (1/k) sum_i p(x, z_i) / q(z_i | x),   z_i ~ q(z | x)   (k = 1: ELBO),

with optional annealing weights on log p(z) and log q (see ``objectives.log_weights``). ``evaluate_batch`` reports,
per point: ``nll`` = -log p_hat(x) of the estimator (``amortlab.evaluation.protocol``; IWAE-k by default),
``nll_iwae`` = -IWAE-k and ``neg_elbo`` = -L_1[q] (from the same k samples of the method's evaluation-time q),
``inference_gap`` = neg_elbo - nll, and E_q[z] for ``active_units`` (Burda et al.: units u with Cov_x E_q[z_u] >
0.01). The final evaluation (``amortlab.evaluation.final``) averages them exactly over a split (torchmetrics, so DDP
equals one process). Evaluation noise is seeded per batch from the batch's position in the split, so a number does
not depend on the world size or on what ran before.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from amortlab.config import Evaluation, ImportanceSamples
from amortlab.data.fused import StepGroup
from amortlab.data.loader import Batch
from amortlab.distributions import DiagGaussian
from amortlab.distributions.moments import posterior_mean_estimate
from amortlab.errors import AmortlabError
from amortlab.finite import FiniteGuard
from amortlab.evaluation import chunk_size, iwae_estimate
from amortlab.evaluation.collapse import kl_term, mutual_information
from amortlab.evaluation.iwae import IWAE
from amortlab.evaluation.protocol import EvalBatch, Estimator
from amortlab.metrics import SplitMetrics
from amortlab.models import FlatLatentModel, GenerativeModel, Latent
from amortlab.nets.mlp import MLP
from amortlab.objectives import k_sample_bound, log_weights
from amortlab.regularizers import EncoderRegularizer
from amortlab.settings import build

# nll: from the configured estimator; nll_iwae: IWAE-k from the method's test-time q (always); neg_elbo: -ELBO of that
# q; inference_gap = neg_elbo - nll; neg_elbo_encoder: -ELBO of the encoder's q before a method's test-time refinement
# (refining methods only); neg_elbo_refined: -ELBO of the refined q (a refining method's q, or IW-SVI's when that
# estimator runs); infer_seconds: wall time of the method's inference (encoder + any refinement) per point.
# An estimator adds its own names (``Estimator.metric_names``), a method its diagnostics (``register_eval_metrics``).
EVAL_METRICS = ("nll", "nll_iwae", "neg_elbo", "inference_gap", "neg_elbo_encoder", "neg_elbo_refined",
                "infer_seconds", "kl", "mutual_info")
EVAL_SPLITS = ("val", "test", "train")  # "train": the final evaluation of the first training points (run.py)
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_SPLIT_SEED_OFFSET = {"val": 0, "test": 7_777_777, "train": 3_333_331}


@dataclass
class EvalInference:
    """What a method's evaluation-time inference returns for a batch.

    q: the q the evaluation scores. q_encoder: the encoder's q before a test-time refinement (refining methods; the
    evaluation then reports ``neg_elbo_encoder`` / ``neg_elbo_refined``). metrics: per-point values ``[B]`` under
    names the method registered. after: values ``[B]`` computed after the timed inference (e.g. the ELBO of each
    iterate), so ``infer_seconds`` counts only the inference.
    """

    q: Any
    q_encoder: Any = None
    metrics: dict[str, Tensor] = field(default_factory=dict)
    after: Callable[[], dict[str, Tensor]] | None = None


def migrate_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoints written before the generative-model protocol kept the decoder at ``decoder.*``; it now lives at
    ``model.decoder.*`` (``FlatLatentModel``)."""
    if any(k.startswith("model.") for k in state):
        return state
    return {("model." + k if k.startswith("decoder.") else k): v for k, v in state.items()}


class ELBOModule(L.LightningModule):
    """Base method. Subclasses implement ``infer`` (and declare ``posterior_family`` when it is not the encoder's).

    Args:
        model: the generative model p_theta(x, z) (``amortlab.models.GenerativeModel``).
        decoder: shorthand for ``model=FlatLatentModel(decoder)`` (one N(0, I) latent layer).
        importance_samples: ``ImportanceSamples`` (or its fields): k of the training bound (``train``), of the
            per-epoch validation estimate (``val``) and of the final log p(x) estimate (``test``).
        optim: ``optimizer`` (a partial taking params) and optional ``lr_scheduler`` (a partial taking the optimiser)
            with ``interval`` (epoch/step).
        evaluation: ``Evaluation`` (or its fields); the module reads ``rows`` (decoder rows per evaluation chunk) and
            ``seed`` (evaluation noise seed).
        estimator: the final log p(x) estimator (``amortlab.evaluation.protocol.Estimator``; default IWAE-k).
        regularizer: encoder regularizer (identity by default).
        log_every_n_steps: the deferred non-finite check's cadence (``amortlab.finite``); the training loss is
            logged every ``trainer.log_every_n_steps`` steps (``logs_this_step``).
        finite_check: ``auto`` | ``step`` | ``deferred``: how a non-finite training loss is caught
            (``amortlab.finite``; deferred = no host sync per step, the default on a GPU).
        compile_mode: None (eager, default) or a ``torch.compile`` mode (``default``, ``reduce-overhead`` = CUDA
            graphs on a GPU, ``max-autotune``): every MLP of the method is compiled in place when fitting starts.
        fused_steps: M optimiser steps per Lightning training step (``amortlab.data.fused``; M > 1 takes the
            optimisation out of Lightning's per-step loop; the same updates as M = 1, test-checked).
    """

    method_name = "base"
    stackable = False  # amortlab.stack can train N seeds of this method as one computation (checked per method)
    val_mutual_info = False  # per-epoch validation also estimates I_q(x; z) (the final evaluation always does)

    def __init__(self, model: GenerativeModel | None = None, decoder: nn.Module | None = None,
                 importance_samples: ImportanceSamples | dict | None = None, optim: dict | None = None,
                 evaluation: Evaluation | dict | None = None, estimator: Estimator | None = None,
                 regularizer: EncoderRegularizer | None = None, log_every_n_steps: int = 50,
                 finite_check: str = "auto", compile_mode: str | None = None, fused_steps: int = 1):
        super().__init__()
        if (model is None) == (decoder is None):
            raise AmortlabError(f"{type(self).__name__} needs exactly one of model= (a GenerativeModel) and decoder= "
                                f"(shorthand for a FlatLatentModel of it).")
        self.model = model if model is not None else FlatLatentModel(decoder)
        self.z_dim = self.model.z_dim
        ks = build(ImportanceSamples, importance_samples, "importance_samples")
        self.k_train, self.k_val, self.k_test = int(ks.train), int(ks.val), int(ks.test)
        self.optim_cfg = dict(optim or {})
        ev = dict(evaluation or {}) if not isinstance(evaluation, Evaluation) else {}
        ev.pop("estimator", None)
        ev = evaluation if isinstance(evaluation, Evaluation) else build(Evaluation, ev, "evaluation")
        self.eval_rows, self.eval_seed = int(ev.rows), int(ev.seed)
        self.estimator = estimator if estimator is not None else IWAE()
        self.regularizer = regularizer or EncoderRegularizer()
        self.log_every_n_steps = log_every_n_steps
        self.finite_guard = FiniteGuard(finite_check)
        if compile_mode not in COMPILE_MODES:
            raise AmortlabError(f"inference.compile_mode={compile_mode!r} is not one of null (eager), "
                                f"{', '.join(m for m in COMPILE_MODES if m)} (torch.compile modes).")
        self.compile_mode = compile_mode
        if int(fused_steps) < 1:
            raise AmortlabError(f"inference.fused_steps={fused_steps} must be >= 1 (optimiser steps per Lightning "
                                f"training step; 1 = Lightning's own loop).")
        self.fused_steps = int(fused_steps)
        self.automatic_optimization = self.fused_steps == 1
        self.annealer = None  # the annealing callback, when one runs (its weights are set per fused step)
        # annealing weights on log p(z) and log q(z|x) in the training objective (set by callbacks)
        self.prior_weight = 1.0
        self.entropy_weight = 1.0
        self.method_metric_names: list[str] = []
        self.val_metrics = SplitMetrics(EVAL_METRICS, self.model.latent_dims)  # per-epoch validation (IWAE-k_val)
        self.run_config: dict[str, Any] | None = None  # resolved Hydra config, stored in checkpoints

    @property
    def decoder(self) -> nn.Module:
        """p_theta(x | z) of a ``FlatLatentModel`` (shorthand for ``model.decoder``)."""
        return self.model.decoder

    @property
    def posterior_family(self) -> type:
        """The class of the q that ``infer`` returns (its ``capabilities`` say what a scheme can do with it); by
        default the encoder's declared ``family``."""
        return type(self.encoder).family

    def check_compatible(self) -> None:
        """Refuse, before anything is trained, an estimator that cannot evaluate this method."""
        self.estimator.check(self)

    def register_eval_metrics(self, *names: str) -> None:
        """Per-point evaluation values a method adds (exact means over the split, like the base metrics), e.g.
        ``neg_elbo_iter/3``; ``infer_for_eval`` reports them in ``EvalInference.metrics`` / ``after``."""
        for name in names:
            if name not in self.method_metric_names:
                self.method_metric_names.append(name)
        self.val_metrics.add(*names)

    def eval_metric_names(self, estimator: Estimator | None = None) -> list[str]:
        """Every per-point value an evaluation with ``estimator`` reports."""
        names = [*EVAL_METRICS, *self.method_metric_names]
        return names + [n for n in (estimator.metric_names if estimator else ()) if n not in names]

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets `_current_fx_name` ~20 times per step; nn.Module.__setattr__'s type checks on it cost
        # ~0.1 ms per step (5% of a k=1 MNIST step on CPU), so plain values of that name bypass them.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Lightning's generic collection walk costs ~30 us per step; a Batch already on the device needs none
        if isinstance(batch, Batch):
            return batch if batch.x.device == device else batch.to(device, non_blocking=True)
        if isinstance(batch, StepGroup):
            return batch if batch.batches[0].x.device == device else batch.to(device, non_blocking=True)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # --- what a method defines ----------------------------------------------------------------------------------
    def infer(self, x: Tensor) -> DiagGaussian:
        """q(z | x) for a batch ``x`` ``[B, X]``."""
        raise NotImplementedError

    # --- the bound ------------------------------------------------------------------------------------------------
    def log_weights(self, x: Tensor, q, k: int, generator: torch.Generator | None = None,
                    annealed: bool = False, frozen_decoder: bool = False) -> Tensor:
        """log w_i = log p(x | z_i) + log p(z_i) - log q(z_i | x), z_i ~ q; ``[k, B]``.

        ``annealed`` applies the current annealing weights (training only); ``frozen_decoder`` holds the model's
        parameters constant, the likelihood's and a learned prior's (a term that must train only q's side, e.g. an
        encoder's own bound).
        """
        z, log_q = q.rsample_with_log_prob(k, generator)
        return self.log_weights_at(x, z, log_q, annealed, frozen_decoder)

    def log_weights_at(self, x: Tensor, z: Latent, log_q: Tensor, annealed: bool = False,
                       frozen_decoder: bool = False) -> Tensor:
        """log p(x | z) + log p(z) - log q for given samples z (``[k, B, Z]`` per layer) and their log q ``[k, B]``."""
        log_px_z = self.model.log_likelihood(x, z, frozen=frozen_decoder)
        log_pz = self.model.log_prior(z, frozen=frozen_decoder)
        if annealed:
            return log_weights(log_px_z, log_pz, log_q, self.prior_weight, self.entropy_weight)
        return log_weights(log_px_z, log_pz, log_q)

    def log_joint(self, x: Tensor, z: Latent) -> Tensor:
        """log p(x, z) ``[k, B]`` of the model (``GenerativeModel.log_joint``)."""
        return self.model.log_joint(x, z)

    def bound(self, x: Tensor, k: int, x_enc: Tensor | None = None) -> Tensor:
        """Training objective L_k per example ``[B]``: q from ``x_enc`` (default ``x``), p(x, z) scores ``x``."""
        q = self.infer(x if x_enc is None else x_enc)
        return k_sample_bound(self.log_weights(x, q, k, annealed=True))

    def clean_bound(self, x: Tensor, k: int, x_enc: Tensor | None = None) -> Tensor:
        """L_k(x; q = infer(x_enc)) ``[B]``: the k-sample bound of the method's q, without annealing weights and
        without a method's surrogate terms (whose values can be zero while their gradients are not); what an
        adversarial perturbation of the encoder's input must lower."""
        q = self.infer(x if x_enc is None else x_enc)
        return k_sample_bound(self.log_weights(x, q, k))

    def training_loss(self, x: Tensor) -> Tensor:
        return self.regularizer.training_loss(self, x, self.k_train)

    def batch_mean(self, values: Tensor) -> Tensor:
        """(1/B) sum_b values_b over the batch ``[B]`` (a stacked module, ``amortlab.stack``, averages each model's
        block of rows and returns ``[N]``)."""
        return values.mean()

    # --- steps ----------------------------------------------------------------------------------------------------
    def training_step(self, batch: Batch | StepGroup, batch_idx: int):
        if self.automatic_optimization:
            return self.step_loss(batch, batch_idx)
        return self.fused_training_step(batch, batch_idx)

    def step_loss(self, batch: Batch, batch_idx: int) -> Tensor:
        """The loss one optimiser step minimises, with the non-finite check and the periodic training-loss log."""
        loss = self.training_loss(batch.x)
        self.finite_guard.observe(self, loss, batch_idx)
        if self.logs_this_step():
            self.log_train_loss(loss)
        return loss

    def logs_this_step(self) -> bool:
        """Whether this optimiser step's training values are logged: step s = ``global_step`` (optimiser steps
        before it) with (s + 1) % ``trainer.log_every_n_steps`` == 0, the steps where Lightning's logger connector
        writes its own per-step values (its count runs on across epochs, so short epochs get points too)."""
        if self._trainer is None:  # a step called outside a fit
            return False
        n = self._trainer.log_every_n_steps
        return n > 0 and (self.global_step + 1) % n == 0

    def log_step_values(self, values: dict[str, Tensor | float]) -> None:
        """Write this optimiser step's ``values`` to every logger at x = ``global_step``, the step they were computed
        at (not through ``self.log``, whose cached value Lightning writes at its own cadence, e.g. at a later step
        or once per fused group). One host read per value, at the logging cadence only."""
        if not self.loggers:
            return
        scalars = {k: float(v) for k, v in values.items()}
        for logger in self.loggers:
            logger.log_metrics(scalars, step=self.global_step)

    def log_train_loss(self, loss: Tensor) -> None:
        self.log_step_values({"train/loss": loss.detach()})

    def fused_training_step(self, group: StepGroup, batch_idx: int) -> dict[str, Tensor]:
        """``inference.fused_steps`` > 1: the group's batches as consecutive optimiser steps, each exactly as
        Lightning's automatic loop runs it (annealing weights for that step, loss, zero_grad, backward, step, a
        per-step scheduler); stops at ``trainer.max_steps``. Returns the steps' mean loss and their count (EpochLog
        weights by it)."""
        opt, trainer = self.optimizers(), self.trainer
        per_step = [c for c in trainer.lr_scheduler_configs if c.interval == "step"]
        total, n = None, 0
        for j, batch in enumerate(group.batches):
            if 0 <= trainer.max_steps <= self.global_step:
                break
            if self.annealer is not None:
                self.annealer.apply(self, trainer.current_epoch, group.first_step + j, group.epoch_steps)
            loss = self.step_loss(batch, group.first_step + j)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            for c in per_step:
                if (group.first_step + j + 1) % c.frequency == 0:
                    c.scheduler.step()
            total = loss.detach() if total is None else total + loss.detach()
            n += 1
        if n and group.first_step + n >= group.epoch_steps:  # the epoch's last step: where Lightning's own loop
            for c in trainer.lr_scheduler_configs:           # steps an epoch-wise scheduler (it steps none here)
                if c.interval == "epoch" and (trainer.current_epoch + 1) % c.frequency == 0:
                    c.scheduler.step()
        # loggers' x-axis (Lightning's batch counter, +1 per group) in optimiser steps, as without fusing
        trainer.fit_loop.epoch_loop._batches_that_stepped += max(n - 1, 0)
        return {"loss": total / max(n, 1) if total is not None else None, "steps": n}

    def eval_generator(self, batch: Batch, split: str, stream: int = 0) -> torch.Generator:
        """The evaluation's noise for ``batch`` of ``split``: seeded by the evaluation seed, the split and the
        batch's position in the split (so numbers do not depend on the world size or on what ran before);
        ``stream`` > 0 gives an independent stream for extra diagnostics (the others keep their draws)."""
        g = torch.Generator(device=batch.x.device)
        g.manual_seed((self.eval_seed * 1_000_003 + _SPLIT_SEED_OFFSET[split] + batch.first_index
                       + stream * 10**12) % (2**63))
        return g

    @torch.no_grad()
    def evaluate_batch(self, batch: Batch, k: int, split: str = "test",
                       estimator: Estimator | None = None, mutual_info: bool = True) -> dict[str, Tensor]:
        """Per-example evaluation of one batch, each value ``[B]``.

        ``nll_iwae`` = -IWAE-k from the method's evaluation-time q and ``neg_elbo`` = -ELBO of that q (same
        samples); ``nll`` = -log p_hat(x) of ``estimator`` (None: the IWAE-k estimate, as in per-epoch validation)
        with the estimator's own values; ``inference_gap`` = neg_elbo - nll. ``z_mean`` ``[B, Z]`` is E_q[z] of
        that q and ``z_mean_var`` its Monte Carlo variance (0 where exact), for the active-unit count. Collapse
        diagnostics of that q (``amortlab.evaluation.collapse``): ``kl`` = KL(q || p(z)) and, with ``mutual_info``
        and where q has an exact density, ``mutual_info`` = I_q(x; z).
        """
        x = batch.x
        gen = self.eval_generator(batch, split)
        chunk = chunk_size(k, len(x), self.eval_rows)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        inference = self.infer_for_eval(x, generator=gen)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        seconds = (time.perf_counter() - start) / len(x)
        q = inference.q
        log_px, elbo = iwae_estimate(lambda n: self.log_weights(x, q, n, gen), k, chunk)
        out = {"nll_iwae": -log_px, "neg_elbo": -elbo,
               "infer_seconds": torch.full_like(elbo, seconds, dtype=torch.float64)}
        if inference.q_encoder is not None:  # the method refined the encoder's q at test time
            q_enc = inference.q_encoder
            out["neg_elbo_encoder"] = -iwae_estimate(lambda n: self.log_weights(x, q_enc, n, gen), k, chunk)[1]
            out["neg_elbo_refined"] = -elbo
        out.update(inference.metrics)
        self.apply_estimator(out, estimator, EvalBatch(self, x, q, k, self.eval_rows, gen, log_px))
        if inference.after is not None:
            out.update(inference.after())
        # a fresh generator, so the numbers above keep their noise stream
        out["z_mean"], out["z_mean_var"] = posterior_mean_estimate(q, self.eval_generator(batch, split))
        gen = self.eval_generator(batch, split, stream=1)
        out["kl"] = kl_term(self.model, q, gen)
        if mutual_info and (mi := mutual_information(q, gen)) is not None:
            out["mutual_info"] = mi
        return out

    @staticmethod
    def apply_estimator(out: dict[str, Tensor], estimator: Estimator | None, batch: EvalBatch) -> None:
        """``nll`` = -log p_hat(x) of ``estimator`` on ``batch`` (None: the IWAE-k estimate already drawn) with the
        estimator's own values, and ``inference_gap`` = neg_elbo - nll, into ``out``."""
        log_px = batch.log_px_iwae
        if estimator is not None:
            est = estimator(batch)
            out.update(est.metrics)
            log_px = est.log_px
        out["nll"] = -log_px
        out["inference_gap"] = out["neg_elbo"] - out["nll"]

    def infer_for_eval(self, x: Tensor, generator: torch.Generator | None = None) -> EvalInference:
        """The q used at evaluation time (``EvalInference``); methods that refine q at test time override this (any
        noise they need comes from ``generator``, the evaluation's per-batch seeded one). Runs under
        ``torch.no_grad``; refinement that needs gradients uses ``amortlab.grad.local_grad`` on a detached clone."""
        return EvalInference(self.infer(x))

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Per-epoch validation: IWAE-``k_val`` from the method's q, logged as ``val_epoch/...`` (the final ``val/...``
        numbers are the configured estimator with ``k_test``, after training)."""
        out = self.evaluate_batch(batch, self.k_val, "val", mutual_info=self.val_mutual_info)
        self.val_metrics.update(out, out.pop("z_mean"))

    def on_validation_epoch_end(self) -> None:
        out = self.val_metrics.compute("val_epoch")  # exact float64 means over the split, summed across DDP ranks
        if not self.trainer.sanity_checking:
            self.log_dict(out, sync_dist=False)
            self.after_validation(out)

    def after_validation(self, out: dict[str, float]) -> None:
        """Hook: this epoch's per-epoch validation values ``{"val_epoch/<name>": value}`` (same on every rank)."""

    # --- images ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_images(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Mean images E[x | z], z ~ p(z); ``[n, X]``."""
        return self.model.sample(n, generator)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """E[x | z = a point estimate of q(z | x)]; ``[B, X]``."""
        return self.model.mean(self.infer_for_eval(x).q.mu)

    # --- optimisation ---------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        """The ``optim`` group's optimiser (and scheduler, stepped per ``interval``); the settings live in
        conf/optim/ only."""
        make_opt = self.optim_cfg.get("optimizer")
        if make_opt is None:
            raise AmortlabError(f"{type(self).__name__} was built without an optimiser: pass optim={{'optimizer': "
                                f"functools.partial(torch.optim.Adam, lr=...)}} (train.py builds it from conf/optim/).")
        opt = make_opt(self.parameters())
        make_sched = self.optim_cfg.get("lr_scheduler")
        if not make_sched:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": make_sched(opt),
                                                     "interval": self.optim_cfg["interval"]}}

    def init_output_bias(self, x_mean: Tensor) -> None:
        self.model.init_output_bias(x_mean)

    # --- checkpoints ----------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["amortlab_config"] = self.run_config
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = migrate_state_dict(checkpoint["state_dict"])
        if "torch_rng_state" in checkpoint:
            self._restored_rng_state = checkpoint["torch_rng_state"]

    def on_fit_start(self) -> None:
        if self.compile_mode:  # the networks' forward (and backward) compiled in place; evaluation uses them too
            for m in self.modules():
                if isinstance(m, MLP):
                    m.compile(mode=self.compile_mode)

    def on_train_start(self) -> None:
        # restore the global RNG where the checkpoint left it, so a resumed run continues the same noise stream
        state = self.__dict__.get("_restored_rng_state")
        if state is not None:
            torch.set_rng_state(state)
            self._restored_rng_state = None
        self.finite_guard.start(self)
        if not self.automatic_optimization and any(c.reduce_on_plateau for c in self.trainer.lr_scheduler_configs):
            raise AmortlabError("inference.fused_steps > 1 does not step a ReduceLROnPlateau scheduler (it needs the "
                                "monitored metric from Lightning's loop); set inference.fused_steps=1.")

    def on_train_batch_end(self, outputs, batch: Batch, batch_idx: int) -> None:
        self.finite_guard.check(self, batch_idx)

    def on_train_epoch_end(self) -> None:
        self.read_nonfinite_flag()  # before the epoch's checkpoints (Lightning calls them after this hook)

    def read_nonfinite_flag(self) -> None:
        """The deferred non-finite check's read at each epoch's end (``FiniteGuard.read_now``)."""
        self.finite_guard.read_now(self)

    def tags(self) -> list[str]:
        return [f"method:{self.method_name}", f"k:{self.k_train}", *self.regularizer.tags()]

    def axes(self) -> dict[str, Any]:
        """The run's coordinates in a study (results.json ``axes``; sweep.py groups and plots by them)."""
        return {"method": self.method_name, "regularizer": self.regularizer.name,
                "strength": self.regularizer.strength, "k": self.k_train}

"""Filtering inference for sequence models: ``inference=filtering`` (a direct filter; ``inference=avf`` subclasses
this module, ``amortlab.methods.avf``).

The filtering posterior q(z_1:T | x_1:T) = prod_t q(z_t | x_<=t, z_<t) is drawn ancestrally (``scan``): at step t the
model predicts p(z_t | z_{t-1}, c_t) = N(mu_p, e^lv_p), the method proposes q(z_t | .) = N(mu_q, e^lv_q) from x_t,
c_t (= summary of x_<t), z_{t-1} and the prediction (``propose``), and z_t ~ q. The k-sample bound over sequences is

    L_k(x) = log (1/k) sum_i prod_t p(x_t | z^i_t, c_t) p(z^i_t | z^i_{t-1}, c_t) / q(z^i_t | .)     (k = 1: the ELBO,
             sum_t E_q[log p(x_t | z_<=t, x_<t)] - KL(q(z_t | .) || p(z_t | z_<t, x_<t)) in its sampled form)

with k independent trajectories (IWAE-k over sequences). Given z_1:T the model scores all steps in one pass.
At evaluation the k trajectories are drawn in filtering passes of ``chunk_size(k, B, evaluation.rows)`` trajectories
(about ``rows`` rows per time step: the passes run step by step, so their number sets the time) and scored in groups
of about ``rows`` rows over all steps.

Evaluation (``evaluate_batch``), per sequence: ``nll`` (the estimator's: IWAE-k, or SMC with ``evaluation=smc``),
``nll_iwae``, ``neg_elbo``, ``kl`` = sum_t KL(q(z_t | .) || p(z_t | .)) (closed form per step, averaged over
``kl_samples`` trajectories), ``steps`` (present steps), ``infer_seconds`` (one filtering pass per sequence), and the
per-step ratios sum over the split / total present steps: ``nll_per_step``, ``nll_iwae_per_step``,
``neg_elbo_per_step``, ``kl_per_step``, ``infer_seconds_per_step``. On a linear-Gaussian model also ``nll_kalman``
(the exact -log p(x) by Kalman filtering) and ``nll_kalman_per_step``.

Active units measure use of the code, not its dynamics: unit u is active if A_u > 0.01, A_u the variance across
sequences of E_q[z_{t,u}] at each step t, pooled over steps (``amortlab.metrics.ActiveUnits``; padding excluded).
E_q[z_t] (the filtering q's marginal at t) is the mean over ``KL_SAMPLES`` trajectories of the proposal means
mu_q,t (Rao-Blackwellised: E_q[z_t] = E_q[mu_q,t]); its Monte Carlo variance (sample variance over the trajectories
/ their number) is subtracted in the count.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from amortlab.distributions.capabilities import Capabilities
from amortlab.errors import AmortlabError
from amortlab.evaluation import chunk_size, iwae_estimate
from amortlab.evaluation.protocol import EvalBatch, Estimator
from amortlab.methods.base import ELBOModule
from amortlab.models.sequence import gaussian_kl, gaussian_log_prob, split_rows
from amortlab.nets.sequence import FilterEncoder
from amortlab.objectives import log_weights
from amortlab.regularizers import EncoderRegularizer

KL_SAMPLES = 8  # trajectories behind the per-sequence KL and E_q[z_t] of the evaluation
PER_STEP = ("nll", "nll_iwae", "neg_elbo", "kl", "infer_seconds")


@dataclass
class Trace:
    """One ancestral draw of k trajectories: z ``[k, B, T, Z]``, log q(z_t | .) ``[k, B, T]`` and the proposal's and
    prior's parameters ``[k, B, T, Z]``; ``infos``: what the method's ``propose`` returned per step."""

    z: Tensor
    log_q: Tensor
    mu_q: Tensor
    lv_q: Tensor
    mu_p: Tensor
    lv_p: Tensor
    infos: list[Any] = field(default_factory=list)


class SequencePosterior:
    """q(z_1:T | x_1:T) of a batch of data rows ``[B, T * (X + 1)]`` (module docstring); ``x`` ``[B, T, X]``,
    ``mask`` ``[B, T]`` and the model's ``context`` c ``[B, T, H]`` are computed once; ``trace`` is the last draw."""

    capabilities = Capabilities()  # none of the per-point static refinements apply to a sequence posterior

    def __init__(self, method: SequenceELBOModule, x_rows: Tensor):
        self.method = method
        self.x, self.mask = split_rows(x_rows, method.model.step_dim)
        self.context = method.model.context(self.x)
        self.trace: Trace | None = None

    def rsample_with_log_prob(self, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(z ``[k, B, T, Z]``, log q(z_1:T | x) ``[k, B]``; padding steps excluded)."""
        self.trace = self.method.scan(self.x, self.mask, self.context, k, generator)
        return self.trace.z, (self.trace.log_q * self.mask).sum(-1)

    def rsample(self, k: int = 1, generator: torch.Generator | None = None) -> Tensor:
        return self.rsample_with_log_prob(k, generator)[0]


class SequenceELBOModule(ELBOModule):
    """Base of the sequence methods (module docstring). A method defines ``prepare`` (per-step features of the data,
    computed once per batch) and ``propose`` (q(z_t | .) at one step)."""

    method_name = "sequence"
    posterior_family = SequencePosterior

    def __init__(self, model, **kwargs):
        if not getattr(model, "sequential", False):
            raise AmortlabError(f"inference={self.method_name} needs a sequence model (model=srnn or model=lgssm with "
                                f"a sequence dataset: dataset=moving_mnist, lgssm, jsb_chorales, ...), not "
                                f"{type(model).__name__}.")
        super().__init__(model=model, **kwargs)
        if type(self.regularizer) is not EncoderRegularizer:
            raise AmortlabError(f"encoder_regularizer={self.regularizer.name} is not supported with sequence models "
                                f"yet (its perturbations would touch the padding flags of the data rows); use "
                                f"encoder_regularizer=none.")
        self.register_buffer("x_center", torch.zeros(self.model.step_dim))
        self.eval_ratios = {f"{n}_per_step": (n, "steps") for n in PER_STEP}
        names = ["steps"]
        if hasattr(self.model, "kalman_log_likelihood"):
            names.append("nll_kalman")
            self.eval_ratios["nll_kalman_per_step"] = ("nll_kalman", "steps")
        self.register_eval_metrics(*names)
        self.val_metrics.ratios = dict(self.eval_ratios)

    # --- what a method defines -------------------------------------------------------------------------------------
    def prepare(self, x: Tensor, c: Tensor) -> Any:
        """Per-step features of x ``[B, T, X]`` and c ``[B, T, H]`` the proposals read (one call per batch)."""
        return None

    def propose(self, t: int, prep: Any, x_t: Tensor, c_t: Tensor, z_prev: Tensor, mu_p: Tensor, lv_p: Tensor,
                generator: torch.Generator | None) -> tuple[Tensor, Tensor, Any]:
        """(mu_q, lv_q ``[k, B, Z]``, info) of q(z_t | x_<=t, z_<t) at step ``t``."""
        raise NotImplementedError

    # --- drawing q -------------------------------------------------------------------------------------------------
    def sample_step(self, t: int, prep: Any, x_t: Tensor, c_t: Tensor, z_prev: Tensor, mu_p: Tensor, lv_p: Tensor,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, tuple]:
        """z_t ~ q(z_t | .) ``[k, B, Z]`` and log q ``[k, B]`` (plus (mu_q, lv_q, info)): the proposal of the
        sequential Monte Carlo estimator (``amortlab.evaluation.smc``) and of ``scan``."""
        mu_q, lv_q, info = self.propose(t, prep, x_t, c_t, z_prev, mu_p, lv_p, generator)
        eps = torch.randn(mu_q.shape, generator=generator, device=mu_q.device, dtype=mu_q.dtype)
        z = mu_q + torch.exp(0.5 * lv_q) * eps
        return z, gaussian_log_prob(z, mu_q, lv_q), (mu_q, lv_q, info)

    def scan(self, x: Tensor, mask: Tensor, c: Tensor, k: int, generator: torch.Generator | None = None) -> Trace:
        """k trajectories z_1:T ~ q, drawn step by step (``Trace``)."""
        model = self.model
        prep = self.prepare(x, c)
        z_prev = x.new_zeros(k, x.shape[0], model.z_dim)
        cols: dict[str, list[Tensor]] = {n: [] for n in ("z", "log_q", "mu_q", "lv_q", "mu_p", "lv_p")}
        infos = []
        for t in range(x.shape[1]):
            mu_p, lv_p = model.prior(z_prev, c[:, t], first=t == 0)
            mu_p, lv_p = mu_p.expand_as(z_prev), lv_p.expand_as(z_prev)
            z, log_q, (mu_q, lv_q, info) = self.sample_step(t, prep, x[:, t], c[:, t], z_prev, mu_p, lv_p, generator)
            for n, v in (("z", z), ("log_q", log_q), ("mu_q", mu_q), ("lv_q", lv_q), ("mu_p", mu_p), ("lv_p", lv_p)):
                cols[n].append(v)
            infos.append(info)
            z_prev = z
        stacked = {n: torch.stack(v, 2) for n, v in cols.items()}
        return Trace(**stacked, infos=infos)

    # --- the bound -------------------------------------------------------------------------------------------------
    def infer(self, x: Tensor) -> SequencePosterior:
        return SequencePosterior(self, x)

    def log_weights(self, x: Tensor, q: SequencePosterior, k: int, generator: torch.Generator | None = None,
                    annealed: bool = False, frozen_decoder: bool = False) -> Tensor:
        """log w_i = sum_t [log p(x_t | z_t, c_t) + log p(z_t | z_{t-1}, c_t) - log q(z_t | .)] ``[k, B]``: the k
        trajectories drawn in one filtering pass (k x B rows per step), then scored over all steps at once; without
        gradients in groups of ``chunk_size(k, B * T, eval_rows)`` trajectories (the scores do not depend on the
        grouping)."""
        z, log_q = q.rsample_with_log_prob(k, generator)
        a, b = (self.prior_weight, self.entropy_weight) if annealed else (1.0, 1.0)
        per = k if torch.is_grad_enabled() else chunk_size(k, q.x.shape[0] * q.x.shape[1], self.eval_rows)
        out = []
        for s in range(0, k, per):
            log_px, log_pz = self.model.log_joint_steps(q.x, q.mask, z[s:s + per], frozen=frozen_decoder,
                                                        context=None if frozen_decoder else q.context)
            out.append(log_weights(log_px.sum(-1), log_pz.sum(-1), log_q[s:s + per], a, b))
        return out[0] if len(out) == 1 else torch.cat(out)

    def log_weights_at(self, *args, **kwargs):
        raise AmortlabError(f"{type(self).__name__} scores sequences through log_weights (the filter draws z_t step by "
                            f"step); per-point static estimators (gaps, AIS, IW-SVI) do not apply to it.")

    # --- evaluation ------------------------------------------------------------------------------------------------
    def check_compatible(self) -> None:
        if self.estimator.name not in ("iwae", "smc"):
            raise AmortlabError(f"evaluation={self.estimator.name} does not apply to sequence models (it refines or "
                                f"anneals a static per-point q); use evaluation=iwae (IWAE-k over sequences) or "
                                f"evaluation=smc (a particle filter with the learned filter as proposal).")
        super().check_compatible()

    def step_metrics(self, q: SequencePosterior, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Per-sequence values ``[B]`` a method adds from ``q``'s last evaluation draw ``q.trace`` (AVF: the ELBO
        after each update step)."""
        return {}

    @torch.no_grad()
    def evaluate_batch(self, batch, k: int, split: str = "test", estimator: Estimator | None = None,
                       mutual_info: bool = True) -> dict[str, Tensor]:
        """Per-sequence evaluation of one batch, each value ``[B]`` (module docstring)."""
        x_rows = batch.x
        gen = self.eval_generator(batch, split)
        if x_rows.is_cuda:
            torch.cuda.synchronize(x_rows.device)
        start = time.perf_counter()
        q = self.infer(x_rows)
        q.rsample_with_log_prob(1, gen)  # one filtering pass: the timed inference
        if x_rows.is_cuda:
            torch.cuda.synchronize(x_rows.device)
        seconds = (time.perf_counter() - start) / len(x_rows)
        steps = q.mask.sum(1).double()
        # trajectories per filtering pass: chunk x B rows per step (the passes are sequential in t, so their count,
        # not the scoring, sets the time; log_weights scores each pass in groups of about eval_rows rows)
        chunk = chunk_size(k, len(x_rows), self.eval_rows)
        log_px, elbo = iwae_estimate(lambda n: self.log_weights(x_rows, q, n, gen), k, chunk)
        out = {"nll_iwae": -log_px, "neg_elbo": -elbo, "steps": steps,
               "infer_seconds": torch.full_like(elbo, seconds, dtype=torch.float64)}
        self.apply_estimator(out, estimator, EvalBatch(self, x_rows, q, k, self.eval_rows, gen, log_px))
        # diagnostics from their own stream, so the numbers above keep their draws
        gen = self.eval_generator(batch, split, stream=1)
        q.rsample_with_log_prob(KL_SAMPLES, gen)
        tr = q.trace
        out["kl"] = (gaussian_kl(tr.mu_q, tr.lv_q, tr.mu_p, tr.lv_p) * q.mask).sum(-1).mean(0)
        out.update(self.step_metrics(q, gen))
        if "nll_kalman" in self.method_metric_names:
            out["nll_kalman"] = -self.model.kalman_log_likelihood(q.x, q.mask)
        # E_q[z_t] [B, T, Z] with its Monte Carlo variance, and the present flags [B, T] (module docstring)
        out["z_mean"], out["z_mean_var"] = tr.mu_q.mean(0), tr.mu_q.var(0) / tr.mu_q.shape[0]
        out["z_present"] = q.mask
        return out

    def reconstruct(self, x: Tensor) -> Tensor:
        raise AmortlabError("Image panels of sequence models are not drawn (callbacks.images skips them).")

    @torch.no_grad()
    def init_output_bias(self, x_mean: Tensor) -> None:
        """Start the emission at the data mean per step dimension (over present steps) and centre the inputs."""
        X = self.model.step_dim
        rows = x_mean.reshape(-1, X + 1)
        present = rows[:, -1]
        step_mean = rows[:, :X].sum(0) / present.sum().clamp_min(1e-8)  # E over present steps
        self.x_center.copy_(step_mean.to(self.x_center))
        self.model.init_output_bias(step_mean)

    def tags(self) -> list[str]:
        return [self.method_name, *super().tags()]


class FilteringVAE(SequenceELBOModule):
    """Direct filtering (``inference=filtering``): q(z_t | x_t, c_t, z_{t-1}) = ``filter`` network
    (``amortlab.nets.sequence.FilterEncoder``), one pass per step; with k > 1 the IWAE-k over sequences."""

    method_name = "filtering"

    def __init__(self, filter: FilterEncoder, **kwargs):
        super().__init__(**kwargs)
        self.filter = filter

    def prepare(self, x: Tensor, c: Tensor) -> Tensor:
        return self.filter.data_features(x - self.x_center, c)  # [B, T, H1]

    def propose(self, t, prep, x_t, c_t, z_prev, mu_p, lv_p, generator):
        mu, lv = self.filter(prep[:, t], z_prev, mu_p)
        return mu, lv, None

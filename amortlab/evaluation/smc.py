"""Sequential Monte Carlo (a particle filter) estimate of log p(x_1:T) for sequence models, ``evaluation=smc``.

K particles per sequence are proposed from the method's learned filter q(z_t | x_<=t, z_<t) (``sample_step``) and
weighted by w_t = p(x_t | z_t, c_t) p(z_t | z_{t-1}, c_t) / q(z_t | .). Weights accumulate, log W_j += log w_t,j;
when the effective sample size ESS = 1 / sum_j Wbar_j^2 (Wbar the normalised weights) falls below
``ess_threshold`` x K, the particles are resampled (systematic resampling, per sequence) and the estimate collects
that epoch's factor:

    log p_hat(x_1:T) = sum_{epochs e} log (1/K) sum_j W^e_j           (the last epoch closes at T)

p_hat is unbiased for p(x_1:T), so E log p_hat <= log p(x) and the estimate tightens as K grows; without resampling
(ess_threshold = 0) it is IWAE-K over whole sequences. Sequences are processed in chunks of max(1, rows // K)
(``evaluation.rows``), so memory stays bounded for any K. Per sequence it also reports ``smc_ess`` (the mean ESS / K
before resampling, over present steps) and ``smc_resamples`` (how many times it resampled).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from amortlab.errors import AmortlabError
from amortlab.evaluation.protocol import Estimate, EvalBatch, Estimator
from amortlab.models.sequence import gaussian_log_prob


@dataclass
class SMCConfig:
    """``evaluation=smc`` (``evaluation.estimator.*``): ``particles`` K (null: importance_samples.test) and the
    resampling threshold ``ess_threshold`` (resample when ESS < threshold x K; 1.0 = at every step, 0 = never)."""

    _target_: str = "amortlab.evaluation.smc.SMC"
    particles: Optional[int] = None
    ess_threshold: float = 0.5


def systematic_resample(log_w: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Ancestor indices ``[K, B]`` from log-weights ``[K, B]`` (one uniform draw per column)."""
    K, B = log_w.shape
    w = torch.softmax(log_w.double(), 0)
    cdf = w.cumsum(0).T.contiguous()  # [B, K]
    cdf[:, -1] = 1.0
    u = (torch.rand(B, 1, generator=generator, device=log_w.device, dtype=torch.float64)
         + torch.arange(K, device=log_w.device, dtype=torch.float64)) / K
    return torch.searchsorted(cdf, u).clamp_max(K - 1).T  # [K, B]


@torch.no_grad()
def smc_log_likelihood(model, sample_step, x: Tensor, mask: Tensor, c: Tensor, particles: int,
                       generator: torch.Generator | None = None, ess_threshold: float = 0.5,
                       prep: Any = None) -> tuple[Tensor, Tensor, Tensor]:
    """(log p_hat(x_1:T) ``[B]`` float64, mean ESS / K ``[B]``, resamples ``[B]``) for x ``[B, T, X]``, mask
    ``[B, T]``, context c ``[B, T, H]``; ``sample_step(t, prep, x_t, c_t, z_prev, mu_p, lv_p, generator) ->
    (z_t, log q, info)`` is the proposal (a method's ``sample_step``, or e.g. the linear-Gaussian model's
    ``optimal_sample_step``)."""
    K, (B, T, _) = int(particles), x.shape
    z_prev = x.new_zeros(K, B, model.z_dim)
    log_W = x.new_zeros(K, B, dtype=torch.float64)
    log_Z = x.new_zeros(B, dtype=torch.float64)
    ess_sum = x.new_zeros(B, dtype=torch.float64)
    resamples = x.new_zeros(B, dtype=torch.float64)
    for t in range(T):
        mu_p, lv_p = model.prior(z_prev, c[:, t], first=t == 0)
        mu_p, lv_p = mu_p.expand_as(z_prev), lv_p.expand_as(z_prev)
        z, log_q, _ = sample_step(t, prep, x[:, t], c[:, t], z_prev, mu_p, lv_p, generator)
        lw = model.log_emission(x[:, t], z, c[:, t]) + gaussian_log_prob(z, mu_p, lv_p) - log_q
        m = mask[:, t].to(torch.float64)
        log_W = log_W + lw.double() * m
        w = torch.softmax(log_W, 0)
        ess = 1.0 / w.pow(2).sum(0)  # [B]
        ess_sum = ess_sum + ess / K * m
        if t < T - 1:
            do = (ess < ess_threshold * K) & (m > 0)
            if bool(do.any()):
                log_Z = log_Z + torch.where(do, torch.logsumexp(log_W, 0) - math.log(K), 0.0)
                anc = systematic_resample(log_W, generator)  # [K, B]
                z = torch.where(do[None, :, None], z.gather(0, anc[..., None].expand_as(z)), z)
                log_W = torch.where(do[None], 0.0, log_W)
                resamples = resamples + do.double()
        z_prev = z
    log_Z = log_Z + torch.logsumexp(log_W, 0) - math.log(K)
    return log_Z, ess_sum / mask.double().sum(1).clamp_min(1), resamples


class SMC(Estimator):
    """Particle-filter estimate with the method's filter as proposal (module docstring; settings ``SMCConfig``)."""

    name = "smc"
    metric_names = ("smc_ess", "smc_resamples")

    def __init__(self, particles: int | None = None, ess_threshold: float = 0.5):
        if particles is not None and int(particles) < 1:
            raise AmortlabError(f"evaluation.estimator.particles={particles} must be >= 1 (or null: "
                                f"importance_samples.test).")
        if not 0.0 <= float(ess_threshold) <= 1.0:
            raise AmortlabError(f"evaluation.estimator.ess_threshold={ess_threshold} must lie in [0, 1] (resample when "
                                f"ESS < threshold x particles; 0.5 is the usual choice).")
        self.particles = None if particles is None else int(particles)
        self.ess_threshold = float(ess_threshold)

    def check(self, module) -> None:
        if not getattr(module.model, "sequential", False) or not hasattr(module, "sample_step"):
            raise AmortlabError(f"evaluation=smc is a particle filter over time steps: it needs a sequence model "
                                f"with a filtering method (model=srnn or lgssm, inference=filtering or avf), not "
                                f"{type(module.model).__name__} with inference={module.method_name}. Use "
                                f"evaluation=iwae for static models.")

    def __call__(self, batch: EvalBatch) -> Estimate:
        m, q = batch.module, batch.q
        K = self.particles or batch.k
        per = max(1, batch.rows // K)
        outs = []
        for s in range(0, q.x.shape[0], per):
            idx = slice(s, s + per)
            prep = m.prepare(q.x[idx], q.context[idx])
            outs.append(smc_log_likelihood(m.model, m.sample_step, q.x[idx], q.mask[idx], q.context[idx], K,
                                           batch.generator, self.ess_threshold, prep))
        log_z, ess, res = (torch.cat(v) for v in zip(*outs))
        return Estimate(log_z, {"smc_ess": ess, "smc_resamples": res})

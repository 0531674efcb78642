"""Importance-weighted SVI (IW-SVI; the AIR paper's evaluation): refine each point's local q, then estimate log p(x).

Starting from the encoder's lambda_0 = (mu, log sigma^2), every point's own lambda is optimised on its IWAE-k bound
with the decoder frozen,

    lambda* = argmax_lambda L_k(x; q_lambda),    L_k = E[log (1/k) sum_i p(x, z_i) / q_lambda(z_i)],

by Adam on the sum over the batch (so each point takes its own, un-averaged step), all points of a batch at once
(one batched optimisation, no Python loop over points). The gradient is the doubly-reparameterised estimator (DReG,
Tucker et al. 2019) of grad L_k, from the surrogate

    sum_i stopgrad(w~_i)^2 log w_i,   log w_i = log p(x, z_i) - log q_{stopgrad(lambda)}(z_i),   z_i = mu + sigma eps_i,

(w~ the normalised weights): unbiased like the plain gradient, but its signal-to-noise ratio does not vanish as k
grows (the plain IWAE gradient of q's parameters does; Rainforth et al. 2018) and it is exactly zero at the true
posterior, so refinement converges instead of random-walking. The step size decays from ``lr`` to
``lr * final_lr_ratio`` along a cosine, so the stochastic iterates settle instead of jittering around the optimum at a
fixed step size. A point keeps lambda* only if it scores at least as well as lambda_0 on a common-random-numbers
estimate of the optimised bound L_k (the mean of ``select_reps`` independent k-sample bounds, the same noise for
both), so the refinement never makes a point's q worse than the encoder's. The large-k IWAE estimate then uses the
refined q. Over several stochastic layers lambda is every layer's (mu, log sigma^2) (a factorised Gaussian over all of
them), started at a layered q's point estimate (``LayeredGaussian.pack``) and kept where it beats that start.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from amortlab.distributions import DiagGaussian, as_factorised, require
from amortlab.evaluation.estimators import chunk_size, iwae_estimate, scored_in_chunks
from amortlab.evaluation.protocol import Estimate, EvalBatch, Estimator
from amortlab.evaluation.qstar import draw_seed
from amortlab.grad import local_grad
from amortlab.objectives import k_sample_bound
from amortlab.settings import build


@dataclass
class SVIConfig:
    """``evaluation=iw_svi`` (``evaluation.estimator.*``): ``steps`` Adam steps at ``lr`` (cosine decay to
    ``lr * final_lr_ratio``) on the IWAE-``k`` bound; a point keeps its refined q only where it beats the encoder's on
    the mean of ``select_reps`` common-random-numbers k-sample bounds (0 = always keep); log sigma^2 is clamped to
    [``logvar_min``, ``logvar_max``]."""

    _target_: str = "amortlab.evaluation.iw_svi.IWSVI"
    steps: int = 100
    lr: float = 0.01
    final_lr_ratio: float = 0.01
    k: int = 10
    select_reps: int = 50
    logvar_min: float = -15.0
    logvar_max: float = 15.0


class IWSVI(Estimator):
    """log p_hat(x) = IWAE-k from each point's refined q (module docstring); reports ``neg_elbo_refined``, the
    -ELBO of the refined q from the same samples. Settings: ``SVIConfig``."""

    name = "iw_svi"
    metric_names = ("neg_elbo_refined",)

    def __init__(self, **settings):
        self.cfg = build(SVIConfig, settings, "evaluation.estimator")

    def check(self, module) -> None:
        require(module.posterior_family, "local_params", who="evaluation=iw_svi (it refines each point's "
                "lambda = (mu, log sigma^2))", fix="Use evaluation=iwae or evaluation=gaps with this q, or a "
                "Gaussian q (posterior=gaussian; inference.components=1 for a recursive mixture).")

    def __call__(self, batch: EvalBatch) -> Estimate:
        m, x, gen = batch.module, batch.x, batch.generator
        q_ref = refine(m, x, batch.q, self.cfg, gen)
        log_px, elbo = iwae_estimate(lambda n: m.log_weights(x, q_ref, n, gen), batch.k,
                                     chunk_size(batch.k, len(x), batch.rows))
        return Estimate(log_px, {"neg_elbo_refined": -elbo})


def refine(model, x: Tensor, q0: DiagGaussian, cfg: SVIConfig,
           generator: torch.Generator | None = None) -> DiagGaussian:
    """Return the refined q for the batch ``x`` ``[B, X]``.

    ``model`` (the method) provides ``log_joint(x, z [k, B, Z]) -> [k, B]`` and ``log_weights(x, q, k, generator)
    -> [k, B]``. The decoder is not updated: gradients are taken with respect to the local parameters only.
    """
    q0 = as_factorised(q0)  # a structured q over several layers: its factorised Gaussian start
    with local_grad():
        x = x.detach().clone()
        mu = q0.mu.detach().clone().requires_grad_(True)
        logvar = q0.logvar.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([mu, logvar], lr=cfg.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.steps), eta_min=cfg.lr * cfg.final_lr_ratio)
        for _ in range(cfg.steps):
            q = DiagGaussian(mu, logvar.clamp(cfg.logvar_min, cfg.logvar_max))
            z = q.mu + torch.exp(0.5 * q.logvar) * q.sample_noise(cfg.k, generator)
            lw = model.log_joint(x, z) - DiagGaussian(q.mu.detach(), q.logvar.detach()).log_prob(z)  # [k, B]
            loss = dreg_surrogate(lw)
            opt.zero_grad(set_to_none=True)
            # gradients w.r.t. the local parameters only: the decoder stays frozen
            mu.grad, logvar.grad = torch.autograd.grad(loss, [mu, logvar])
            opt.step()
            sched.step()
        with torch.no_grad():
            refined = DiagGaussian(mu.detach(), logvar.detach().clamp(cfg.logvar_min, cfg.logvar_max))
            if cfg.select_reps > 0:
                start = DiagGaussian(q0.mu.detach(), q0.logvar.detach())
                seed = draw_seed(generator, x.device)
                before = _crn_bound(model, x, start, cfg.k, cfg.select_reps, seed)
                after = _crn_bound(model, x, refined, cfg.k, cfg.select_reps, seed)
                keep = (after >= before).unsqueeze(-1)
                refined = DiagGaussian(torch.where(keep, refined.mu, start.mu),
                                       torch.where(keep, refined.logvar, start.logvar))
    return refined


def dreg_surrogate(lw: Tensor) -> Tensor:
    """Scalar DReG surrogate loss -sum_{i,b} stopgrad(w~_ib)^2 log w_ib for log-weights ``lw`` ``[k, B]`` formed with
    q's parameters stopped in log q (only the path z(lambda, eps) carries gradient): its gradient is -grad L_k
    summed over the batch (Tucker et al. 2019, eq. 7), w~ the weights normalised over the k samples."""
    return -(torch.softmax(lw.detach(), 0).pow(2) * lw).sum()


def _crn_bound(model, x: Tensor, q: DiagGaussian, k: int, reps: int, seed: int) -> Tensor:
    """Mean of ``reps`` k-sample bounds ``[B]`` from a generator seeded with ``seed`` (common random numbers)."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    lw = scored_in_chunks(model, x, q, k * reps, g)  # [reps * k, B]
    return k_sample_bound(lw.reshape(reps, k, -1).transpose(0, 1)).mean(0)

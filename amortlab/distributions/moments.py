"""Posterior means E_q[z] ``[B, Z]`` of any variational family (for the active-unit count)."""
from __future__ import annotations

import torch
from torch import Tensor

from amortlab.distributions.gaussian import DiagGaussian
from amortlab.distributions.mixture import MixtureGaussian

MC_SAMPLES = 256  # Monte Carlo samples for families without a closed-form mean (the auxiliary flow)


def posterior_mean(q, generator: torch.Generator | None = None, samples: int = MC_SAMPLES) -> Tensor:
    """E_q[z]: mu for a diagonal Gaussian, sum_j w_j mu_j for a mixture, else the mean of ``samples`` draws."""
    if isinstance(q, DiagGaussian):
        return q.mu
    if isinstance(q, MixtureGaussian):
        return (q.log_w.exp().unsqueeze(-1) * q.mus).sum(0)
    with torch.no_grad():
        return q.rsample(samples, generator).mean(0)

"""Moments of any variational family: E_q[z], Var_q[z] ``[B, Z]`` (active units; q*_FFG started at a flow q)."""
from __future__ import annotations

import torch
from torch import Tensor

# Monte Carlo samples for families without closed-form moments (the auxiliary flow). The variance over points of the
# sample means is inflated by E[Var_q z_u] / S <= 0.004 for a unit at the prior: below the active-unit threshold 0.01.
MC_SAMPLES = 256


def sampled_moments(q, generator: torch.Generator | None = None, samples: int = MC_SAMPLES) -> tuple[Tensor, Tensor]:
    """Sample mean and variance of ``samples`` draws of q (no gradient)."""
    with torch.no_grad():
        z = q.rsample(samples, generator)  # [S, B, Z]
    return z.mean(0), z.var(0)


def posterior_mean(q, generator: torch.Generator | None = None, samples: int = MC_SAMPLES) -> Tensor:
    """E_q[z]: ``q.mean()`` where the family declares a closed form (capabilities), else the mean of ``samples``
    draws."""
    if q.capabilities.closed_form_mean:
        return q.mean()
    return sampled_moments(q, generator, samples)[0]

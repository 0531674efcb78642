"""Moments of any variational family: E_q[z], Var_q[z] ``[B, Z]`` (active units; q*_FFG started at a flow q).

E_q[z] is exact where the family has it in closed form (capability ``closed_form_mean``: Gaussians, mixtures). A
family with ``mean_estimate`` (a layered q) estimates it itself, exactly for the layers it can (a layered q's first
layer in sampling order) and Rao-Blackwellised for the rest. Any other family (flows) takes the mean of S draws.
Every estimate comes with its Monte Carlo variance ``[B, Z]`` (0 where exact): the active-unit count
(``amortlab.metrics.ActiveUnits``) subtracts it, because the sample means' variance over points exceeds
Cov_x(E_q[z_u]) by the mean over points of Var(estimate) (≈ Var_q(z_u) / S).
"""
from __future__ import annotations

import torch
from torch import Tensor

MC_SAMPLES = 256  # draws behind E_q[z] of a family without a closed form


def sampled_moments(q, generator: torch.Generator | None = None, samples: int = MC_SAMPLES) -> tuple[Tensor, Tensor]:
    """Sample mean and variance of ``samples`` draws of q (no gradient)."""
    with torch.no_grad():
        z = q.rsample(samples, generator)  # [S, B, Z]
    return z.mean(0), z.var(0)


def posterior_mean_estimate(q, generator: torch.Generator | None = None,
                            samples: int = MC_SAMPLES) -> tuple[Tensor, Tensor]:
    """(m, v) ``[B, Z]`` each: m estimates E_q[z] without bias and v = Var(m) estimated without bias (0 where m is
    exact), no gradient.

    closed_form_mean: m = ``q.mean()``, v = 0. mean_estimate: ``q.mean_estimate(samples, generator)``. Otherwise
    m = (1/S) sum_s z_s and v = s^2 / S, s^2 the unbiased sample variance of the S = ``samples`` draws z_s ~ q.
    """
    caps = q.capabilities
    with torch.no_grad():
        if caps.closed_form_mean:
            m = q.mean()
            return m, torch.zeros_like(m)
        if caps.mean_estimate:
            return q.mean_estimate(samples, generator)
        mean, var = sampled_moments(q, generator, samples)
        return mean, var / samples


def posterior_mean(q, generator: torch.Generator | None = None, samples: int = MC_SAMPLES) -> Tensor:
    """E_q[z] ``[B, Z]``: the mean of ``posterior_mean_estimate`` (exact where the family allows)."""
    return posterior_mean_estimate(q, generator, samples)[0]

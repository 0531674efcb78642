"""The k-sample bound and its pieces. Shapes are samples-first: z ``[k, B, D]``, log-weights ``[k, B]``.

    L_k(x) = E_{z_1..k ~ q}[ log (1/k) sum_i p(x, z_i) / q(z_i | x) ],        L_1 = ELBO,

and L_1 <= L_k <= L_k' <= log p(x) for k <= k' (Burda et al., 2016).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)
LOGVAR_MIN, LOGVAR_MAX = -15.0, 15.0  # the clamp on a learned log sigma^2 (sequence models and their filters)


def log_mean_exp(x: Tensor, dim: int = 0) -> Tensor:
    """log (1/n) sum_i exp(x_i) along ``dim``, max-shifted (``torch.logsumexp``) so it never overflows."""
    return torch.logsumexp(x, dim) - math.log(x.shape[dim])


def bernoulli_log_prob(logits: Tensor, x: Tensor) -> Tensor:
    """log p(x | z) = sum_d [x_d log s(l_d) + (1 - x_d) log s(-l_d)] from logits ``[..., X]``; returns ``[...]``.

    Computed as ``-BCE_with_logits`` (= ``-softplus(-l) x - softplus(l) (1 - x)``), never through clamped
    probabilities. ``x`` broadcasts against ``logits`` (``[B, X]`` against ``[k, B, X]``).
    """
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)


def std_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last dim: ``-(z^2 + log 2pi) / 2``."""
    return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)


def log_weights(log_px_z: Tensor, log_pz: Tensor, log_qz: Tensor,
                prior_weight: float = 1.0, entropy_weight: float = 1.0) -> Tensor:
    """log w = log p(x | z) + a log p(z) - b log q(z | x), all ``[k, B]``.

    a = b = 1 is the plain bound. Entropy annealing (Cremer et al.) uses b = lambda < 1; KL annealing (SA-VAE) uses
    a = b = beta. Either weight below 1 makes the result a training objective, not a bound on log p(x).
    """
    if prior_weight == 1.0 and entropy_weight == 1.0:
        return log_px_z + log_pz - log_qz
    return log_px_z + prior_weight * log_pz - entropy_weight * log_qz


def k_sample_bound(log_w: Tensor) -> Tensor:
    """L_k per example from log-weights ``[k, B]`` -> ``[B]`` (log-mean-exp over samples)."""
    return log_mean_exp(log_w, 0)

"""Posterior-collapse diagnostics of an evaluation-time q, per point ``[B]`` (means over the split in results.json):

    kl           KL(q(z | x) || p(z)) = E_q[log q(z | x) - log p(z)]                  (``<split>/kl``)
    mutual_info  I_q(x; z) = E_x E_q(z|x)[log q(z | x) - log q(z)],
                 q(z) = (1/G) sum_g q(z | x_g)                                        (``<split>/mutual_info``)

``kl`` is the rate term of the ELBO = E_q[log p(x | z)] - kl. Closed form for a diagonal Gaussian q under an N(0, I)
prior, (1/2) sum_d (mu^2 + sigma^2 - 1 - log sigma^2); otherwise ``KL_SAMPLES`` draws of q (a learned hierarchical
prior, a flow, a mixture). For the auxiliary flow (``posterior=flow``) log q~ takes the place of log q, so its value is
the auxiliary bound's rate, KL + E KL(q(v | z) || r(v | z)) >= KL.

``mutual_info`` follows He et al. (2019, "Lagging inference networks"): one draw z_n ~ q(z | x_n) per point and the
aggregate posterior q(z) as the mixture of the q(z | x_g) of the point's group — consecutive groups of ``MI_GROUP``
points of the evaluation batch (batches are the same for any number of processes, so the value is too):

    mi_n = log q(z_n | x_n) - log (1/G) sum_g q(z_n | x_g)       (at most log G = 4.61 nats for G = 100)

``<split>/mutual_info`` is the mean of mi_n over the split. A group is a block of ``MI_GROUP`` consecutive points
inside one evaluation batch (the whole batch if that is smaller); groups never span batches, so the last one of a
batch may be smaller (G = 59 for the last of the 359 digits test points in batches of 100). The value is the mutual
information under the uniform mixture over the point's G group members, not over the whole split: it depends on G.

It needs q's exact density at other points' draws (``capabilities.log_prob``): Gaussian, layered, mixture and IAF q
(the IAF through its Z*T-pass inverse); for the auxiliary flow it is not reported. A family with ``take(idx)`` (the
q of a slice of the batch) is evaluated on G x G pairs, others on G x B.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

KL_SAMPLES = 64
MI_GROUP = 100


def kl_term(model, q, generator: torch.Generator | None = None, samples: int = KL_SAMPLES) -> Tensor:
    """KL(q(z | x) || p(z)) ``[B]`` (module docstring)."""
    if q.capabilities.closed_form_kl and getattr(model, "standard_normal_prior", False):
        return q.kl_to_standard_normal()
    z, log_q = q.rsample_with_log_prob(samples, generator)
    return (log_q - model.log_prior(z)).mean(0)


def mutual_information(q, generator: torch.Generator | None = None, group: int = MI_GROUP) -> Tensor | None:
    """Per-point I_q(x; z) terms ``[B]`` (module docstring), or None where q has no exact density."""
    if not q.capabilities.log_prob:
        return None
    z = q.rsample(1, generator)[0]  # [B, Z]
    out = []
    for start in range(0, z.shape[0], group):
        idx = slice(start, start + group)
        zg = z[idx]
        G = zg.shape[0]
        if z.shape[0] <= group:
            pairs = q.log_prob(zg.unsqueeze(1).expand(G, G, zg.shape[-1]))  # [n, g] = log q(z_n | x_g)
        elif hasattr(q, "take"):  # the group's own q: G x G densities
            pairs = q.take(idx).log_prob(zg.unsqueeze(1).expand(G, G, zg.shape[-1]))
        else:  # densities under the whole batch's q, the group's columns kept
            pairs = q.log_prob(zg.unsqueeze(1).expand(G, z.shape[0], zg.shape[-1]))[:, idx]
        out.append(pairs.diagonal() - (torch.logsumexp(pairs, dim=1) - math.log(G)))
    return torch.cat(out)

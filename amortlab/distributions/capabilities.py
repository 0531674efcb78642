"""What a variational family supports, declared by the family (never guessed from class names or attributes).

Each family class sets ``capabilities: ClassVar[Capabilities]``; an encoder class sets ``family: ClassVar[type]``
(the class of the q it returns) and a method exposes ``posterior_family``. Schemes and estimators that need a
capability call ``require`` at start-up, which names the missing capability and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from amortlab.errors import AmortlabError


@dataclass(frozen=True)
class Capabilities:
    """Capabilities of a posterior family q(z | x).

    local_params: q of a batch is a flat per-point vector lambda ``[B, P]`` (``q.pack()``; ``type(q).unpack(lam)``
        rebuilds q), for per-point refinement (SVI / SA-VAE steps, IW-SVI, iterative updates). For the diagonal
        Gaussian lambda = (mu, log sigma^2).
    path_derivative: ``q.rsample_path_derivative(k, generator) -> (z, log q)`` whose gradient w.r.t. q's parameters
        flows only through z (parameters stopped in log q; Roeder et al. 2017): q* optimisation.
    factorised: q is itself the fully factorised Gaussian of its lambda (``q.pack()`` is q's own parameters, not a
        projection of a structured q): q*_FFG can start exactly at q.
    closed_form_mean: ``q.mean()`` = E_q[z] exactly (otherwise it is estimated from samples).
    mean_estimate: ``q.mean_estimate(samples, generator) -> (m, v)`` ``[B, Z]`` each: an unbiased estimate m of
        E_q[z] better than the plain mean of ``samples`` draws (exact where it can be) and the unbiased estimate v of
        its variance (0 where exact); ``amortlab.distributions.moments``.
    closed_form_kl: ``q.kl_to_standard_normal()`` = KL(q || N(0, I)) exactly.
    log_prob: ``q.log_prob(z)`` is the exact density (a flow with an auxiliary variable has only log q~).
    mixture: a mixture of Gaussians (``mus``, ``logvars``, ``log_w``; stratified draws).
    flow: a normalising flow with per-point versions of its own family (``q.local_copy()``: per-point copies
        starting at q; ``q.local_at(n, init_mu, init_logvar, hidden, steps, ...)``: same shape starting near a
        Gaussian): q*_Flow is fitted in this family (the auxiliary coupling flow, the IAF).
    """

    local_params: bool = False
    path_derivative: bool = False
    factorised: bool = False
    closed_form_mean: bool = False
    mean_estimate: bool = False
    closed_form_kl: bool = False
    log_prob: bool = False
    mixture: bool = False
    flow: bool = False


CAPABILITY_NAMES = tuple(f.name for f in fields(Capabilities))


def require(family: type, *needed: str, who: str, fix: str) -> None:
    """Raise ``AmortlabError`` naming ``who`` and ``fix`` unless ``family`` declares every capability ``needed``."""
    unknown = [n for n in needed if n not in CAPABILITY_NAMES]
    if unknown:
        raise AmortlabError(f"{who} asks for unknown capabilities {unknown}; known: {', '.join(CAPABILITY_NAMES)}.")
    caps = family.capabilities
    missing = [n for n in needed if not getattr(caps, n)]
    if missing:
        raise AmortlabError(f"{who} needs a posterior family with {' and '.join(missing)} (amortlab.distributions."
                            f"capabilities), but the model's q is a {family.__name__}, which does not declare it. "
                            f"{fix}")

"""Annealed importance sampling (AIS, Neal 2001) with HMC transitions: the strong log p(x) reference.

The prior p(z) = N(0, I) is annealed into the unnormalised posterior p(x, z) along the geometric path

    f_t(z) = log N(z; 0, I) + beta_t log p(x | z),    0 = beta_0 < beta_1 < ... < beta_T = 1,

so f_0 is the (normalised) prior and f_T = log p(x, z), whose normaliser is p(x). Each of C independent chains per
datapoint starts at z_0 ~ N(0, I) with log-weight 0 and, for t = 1..T,

    log w += (beta_t - beta_{t-1}) log p(x | z_{t-1})          (= f_t(z_{t-1}) - f_{t-1}(z_{t-1}))
    z_t    ~ K_t(z_{t-1}, .)                                   (one HMC transition leaving exp f_t invariant)

K_t: momentum r ~ N(0, I), ``n_leapfrog`` leapfrog steps of size eps' on H(z, r) = -f_t(z) + |r|^2 / 2, then a
Metropolis accept/reject of the end point per chain and datapoint (min(1, exp(H_0 - H_1)); a non-finite H_1 is
rejected). eps' = eps * U(1 - j, 1 + j) per chain and point (j = ``step_jitter``, Neal 2011): a fixed trajectory
length can be close to a period of the posterior's oscillation and barely move (on the linear-Gaussian tests the
jitter cut the spread of the log-weights by a quarter). Then E[w] = p(x), so

    log p_hat(x) = log (1/C) sum_c w_c

is an unbiased estimate of p(x) (E[p_hat] = p(x)) and log p_hat is a stochastic lower bound on log p(x): by Jensen,
E[log p_hat] <= log p(x) (like IWAE-k, but its gap shrinks with T, not only with C). Log-weights are accumulated in
float64.

Schedules (``AISConfig.schedule``): ``linear`` beta_t = t / T, or ``sigmoid`` (Grosse et al. 2015; Wu et al. 2017)

    beta_t = (sigma(s (2t/T - 1)) - sigma(-s)) / (sigma(s) - sigma(-s)),    s = ``sigmoid_scale``,

which spends more of the T steps near beta = 0 (where log p(x | z) of prior samples is hundreds of nats and the
weight increments are large) and near beta = 1.

Step size: one eps_t per datapoint and transition, shared by its C chains. With ``adapt`` (the default) it is tuned in
a *pilot* run of ``pilot_chains`` chains whose states and weights are discarded: there eps is multiplied by
(1 + adapt_rate) after a transition whose acceptance fraction over the point's chains exceeds ``target_accept`` and by
(1 - adapt_rate) otherwise, clamped to [min_step_size, max_step_size] (as common AIS implementations for VAEs do, e.g.
Wu et al. 2017). The recorded schedule eps_1..eps_T is then frozen and the reported run is textbook AIS with it: every
K_t is fixed before the run starts (independent of its chains), so E[p_hat] = p(x) holds exactly. (Adapting inside the
reported run, from acceptances pooled over the same chains, makes eps_t depend on the chains' past and breaks that
argument.) ``adapt=False`` uses ``init_step_size`` throughout, without a pilot.

Everything is batched: tensors are ``[C, B, Z]`` (chains first, like samples everywhere in amortlab); the only
Python loops are over the T transitions and the leapfrog steps. Gradients of log p(x | z) with respect to z come
from ``torch.autograd.grad`` (never accumulated into the decoder's parameters), under ``amortlab.grad.local_grad``
on cloned inputs, so this runs inside Lightning's test loop as well. Cost: T * n_leapfrog forward+backward passes
of the decoder on C * B rows (plus one).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from amortlab.grad import local_grad

LogLikelihood = Callable[[Tensor, Tensor], Tensor]
SCHEDULES = ("sigmoid", "linear")


@dataclass
class AISConfig:
    """AIS settings. Cost per datapoint ~ n_chains * n_intermediate * n_leapfrog decoder forward+backward passes.

    Defaults: T = 500 intermediate distributions, one HMC transition each with 10 leapfrog steps, and a sigmoid
    schedule (s = 4) follow the usual AIS evaluation of VAE decoders (Wu et al. 2017); 16 chains per point make the
    cost 16 * 500 * 10 = 80k decoder forward+backward passes per point, ~30x the time of IWAE-5000 on the
    784-200-200-50 model on CPU (bench/ais.py), while the log-mean-exp over chains removes most of the remaining
    variance. Published reference numbers use more chains and/or steps: raise them for a final table. The step size
    starts at 0.05 and adapts per point towards an acceptance rate of 0.65 (about optimal for HMC; Neal 2011) by a
    factor 1.02 / 0.98 per transition (it can grow or shrink ~20x within 150 transitions), jittered by +-20%; the
    adaptation runs in a pilot of ``pilot_chains`` chains that is discarded (module docstring), which adds
    pilot_chains / n_chains to the cost.
    """

    n_intermediate: int = 500      # T: number of annealing steps (HMC transitions); beta_0 = 0 ... beta_T = 1
    n_chains: int = 16             # C: independent chains per datapoint
    n_leapfrog: int = 10           # leapfrog steps per HMC transition
    init_step_size: float = 0.05   # initial leapfrog step size (per datapoint)
    target_accept: float = 0.65    # step-size adaptation target (acceptance fraction over a point's chains)
    adapt: bool = True             # tune the step-size schedule in a discarded pilot run (False: fixed step)
    pilot_chains: int = 4          # chains of the pilot run (adapt=True); its states and weights are discarded
    adapt_rate: float = 0.02       # multiplicative step: eps *= 1 + rate (above target) or 1 - rate (below)
    min_step_size: float = 1e-4
    max_step_size: float = 1.0
    step_jitter: float = 0.2       # each transition uses eps * U(1 - jitter, 1 + jitter) (per chain and point)
    schedule: str = "sigmoid"      # "sigmoid" or "linear"
    sigmoid_scale: float = 4.0     # s of the sigmoid schedule (larger: more steps near beta = 0 and 1)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"AISConfig.schedule={self.schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
        if self.n_intermediate < 1 or self.n_chains < 1 or self.n_leapfrog < 1 or self.pilot_chains < 1:
            raise ValueError(f"need n_intermediate, n_chains, n_leapfrog, pilot_chains >= 1, got "
                             f"{self.n_intermediate}, "
                             f"{self.n_chains}, {self.n_leapfrog}, {self.pilot_chains}")
        if not (0 < self.min_step_size <= self.init_step_size <= self.max_step_size):
            raise ValueError(f"need 0 < min_step_size <= init_step_size <= max_step_size, got {self.min_step_size}, "
                             f"{self.init_step_size}, {self.max_step_size}")
        if not (0 < self.target_accept < 1) or not (0 <= self.adapt_rate < 1) or not (0 <= self.step_jitter < 1) \
                or self.sigmoid_scale <= 0:
            raise ValueError("need 0 < target_accept < 1, 0 <= adapt_rate < 1, 0 <= step_jitter < 1 and "
                             "sigmoid_scale > 0")


@dataclass
class AISResult:
    """What one AIS run returns (all per datapoint; ``B`` points, ``C`` chains).

    log_px: ``[B]`` float64, log-mean-exp over chains of the AIS log-weights (the log p(x) estimate).
    log_weights: ``[C, B]`` float64, each chain's AIS log-weight.
    accept_rate: ``[B]`` float64, the point's HMC acceptance rate averaged over transitions and chains.
    step_size: ``[B]`` the final leapfrog step size (of the frozen schedule).
    z: ``[C, B, Z]`` the chains' final states (approximate posterior samples, to be weighted by ``log_weights``).
    """

    log_px: Tensor
    log_weights: Tensor
    accept_rate: Tensor
    step_size: Tensor
    z: Tensor

    @property
    def mean_accept_rate(self) -> float:
        """Acceptance rate averaged over points, chains and transitions."""
        return float(self.accept_rate.mean())


def ais_schedule(n_intermediate: int, schedule: str = "sigmoid", sigmoid_scale: float = 4.0) -> Tensor:
    """Inverse temperatures beta_0 = 0 < ... < beta_T = 1, float64 ``[T + 1]`` (T = ``n_intermediate``)."""
    t = torch.linspace(0.0, 1.0, n_intermediate + 1, dtype=torch.float64)
    if schedule == "linear":
        betas = t
    elif schedule == "sigmoid":
        s = sigmoid_scale
        lo, hi = 1 / (1 + math.exp(s)), 1 / (1 + math.exp(-s))  # sigma(-s), sigma(s)
        betas = (torch.sigmoid(s * (2 * t - 1)) - lo) / (hi - lo)
    else:
        raise ValueError(f"AIS schedule {schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
    betas[0], betas[-1] = 0.0, 1.0  # exact end points despite rounding
    return betas


def ais_log_likelihood(log_likelihood: LogLikelihood, x: Tensor, z_dim: int, cfg: AISConfig | None = None,
                       generator: torch.Generator | None = None) -> Tensor:
    """AIS estimate of log p(x) ``[B]`` (float64) for x ``[B, X]``; see ``run_ais`` (which also returns the
    acceptance rate, the step sizes, the per-chain weights and the final states)."""
    return run_ais(log_likelihood, x, z_dim, cfg, generator).log_px


def run_ais(log_likelihood: LogLikelihood, x: Tensor, z_dim: int, cfg: AISConfig | None = None,
            generator: torch.Generator | None = None) -> AISResult:
    """Run AIS from the prior N(0, I_{z_dim}) to p(z | x) for every point of x ``[B, X]`` at once.

    ``log_likelihood(x [B, X], z [C, B, Z]) -> [C, B]`` is log p(x | z) (e.g. ``decoder.log_prob``); it must be
    differentiable in z. The chains' states and momenta have x's floating dtype (float32 for images) and device;
    ``generator`` (on x's device) makes a run reproducible. Returns an ``AISResult``.
    """
    cfg = cfg or AISConfig()
    betas = ais_schedule(cfg.n_intermediate, cfg.schedule, cfg.sigmoid_scale).tolist()
    with local_grad():
        x = x.detach().clone()
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        eps0 = torch.full((x.shape[0],), cfg.init_step_size, dtype=dtype, device=x.device)
        if cfg.adapt:  # pilot: adapt the step sizes, keep only the schedule they followed
            *_, schedule = _anneal(log_likelihood, x, z_dim, cfg, betas, cfg.pilot_chains, eps0, True, generator)
        else:
            schedule = eps0.expand(cfg.n_intermediate, -1)
        log_w, accept, z, _ = _anneal(log_likelihood, x, z_dim, cfg, betas, cfg.n_chains, schedule, False, generator)
        log_px = torch.logsumexp(log_w, 0) - math.log(cfg.n_chains)
    return AISResult(log_px=log_px, log_weights=log_w, accept_rate=accept, step_size=schedule[-1], z=z.detach())


def _anneal(log_likelihood: LogLikelihood, x: Tensor, z_dim: int, cfg: AISConfig, betas: list[float], chains: int,
            eps: Tensor, adapt: bool, generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One AIS run of ``chains`` chains per point. ``eps``: the step-size schedule ``[T, B]``, or with ``adapt`` the
    initial step sizes ``[B]`` (adapted per transition from the acceptances). Returns the log-weights ``[C, B]``
    (float64), the mean acceptance rate ``[B]``, the final states ``[C, B, Z]`` and the schedule followed ``[T, B]``."""
    B, dev = x.shape[0], x.device
    z = torch.randn(chains, B, z_dim, generator=generator, dtype=eps.dtype, device=dev)
    ll, grad = _log_lik_and_grad(log_likelihood, x, z)
    if not torch.isfinite(ll).all():
        raise ValueError("log p(x | z) is not finite at a prior sample: AIS needs a finite likelihood")
    log_w = torch.zeros(chains, B, dtype=torch.float64, device=dev)
    accept_sum = torch.zeros(B, dtype=torch.float64, device=dev)
    up, down = 1.0 + cfg.adapt_rate, 1.0 - cfg.adapt_rate
    followed = []
    for t in range(1, cfg.n_intermediate + 1):
        eps_t = eps if adapt else eps[t - 1]
        followed.append(eps_t)
        log_w += (betas[t] - betas[t - 1]) * ll.double()
        z, ll, grad, accepted = _hmc_transition(log_likelihood, x, z, ll, grad, betas[t], eps_t, cfg.n_leapfrog,
                                                cfg.step_jitter, generator)
        frac = accepted.double().mean(0)  # [B]
        accept_sum += frac
        if adapt:
            eps = torch.where(frac > cfg.target_accept, eps * up, eps * down).clamp_(cfg.min_step_size,
                                                                                       cfg.max_step_size)
    return log_w, accept_sum / cfg.n_intermediate, z, torch.stack(followed)


def _log_lik_and_grad(log_likelihood: LogLikelihood, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """log p(x | z) ``[C, B]`` and its gradient in z ``[C, B, Z]`` (each point's value depends on its own z only,
    so the gradient of the sum is the per-(chain, point) gradient); nothing is accumulated into parameters."""
    z = z.detach().requires_grad_(True)
    ll = log_likelihood(x, z)
    (grad,) = torch.autograd.grad(ll.sum(), z, create_graph=False)
    return ll.detach(), grad


def _hmc_transition(log_likelihood: LogLikelihood, x: Tensor, z: Tensor, ll: Tensor, grad: Tensor, beta: float,
                    eps: Tensor, n_leapfrog: int, jitter: float, generator: torch.Generator | None
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One HMC transition leaving exp(f) invariant, f(z) = -|z|^2/2 + beta log p(x | z), for all chains and points.

    z ``[C, B, Z]`` with its ll ``[C, B]`` and grad ``[C, B, Z]`` (cached from the previous transition); eps ``[B]``.
    Returns the new (z, ll, grad) and the accept mask ``[C, B]``.
    """
    e = eps[None, :, None]
    if jitter:  # eps * U(1 - jitter, 1 + jitter) per chain and point: state-independent, so K_t stays f_t-invariant
        u = torch.rand(z.shape[:-1] + (1,), generator=generator, dtype=z.dtype, device=z.device)
        e = e * (1 + jitter * (2 * u - 1))
    r0 = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
    r = r0 + 0.5 * e * (beta * grad - z)  # half step of the momentum
    zn, lln, gn = z, ll, grad
    for step in range(n_leapfrog):
        zn = zn + e * r
        lln, gn = _log_lik_and_grad(log_likelihood, x, zn)
        g = beta * gn - zn  # grad f at the new position
        r = r + (e if step < n_leapfrog - 1 else 0.5 * e) * g  # full steps, a half step at the end
    # H = -f(z) + |r|^2 / 2, in float64 (differences of O(100)-nat terms)
    h0 = 0.5 * (z.double().pow(2).sum(-1) + r0.double().pow(2).sum(-1)) - beta * ll.double()
    h1 = 0.5 * (zn.double().pow(2).sum(-1) + r.double().pow(2).sum(-1)) - beta * lln.double()
    log_u = torch.log(torch.rand(h0.shape, generator=generator, dtype=torch.float64, device=z.device))
    accepted = torch.isfinite(h1) & (log_u < h0 - h1)
    a = accepted.unsqueeze(-1)
    return (torch.where(a, zn, z), torch.where(accepted, lln, ll), torch.where(a, gn, grad), accepted)

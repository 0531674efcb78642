"""Mixture of diagonal Gaussians Q(z | x) = sum_j w_j q_j(z | x) (the RecMix posterior), with stratified sampling.

Components ``mus``, ``logvars`` ``[M, B, Z]``; weights ``log_w`` ``[M, B]`` (a ``[M]`` vector broadcasts over B).

    log Q(z) = logsumexp_j (log w_j + log N(z; mu_j, sigma_j^2)),        z ``[k, B, Z]`` -> ``[k, B]``.

Stratified draws (``rsample_with_log_prob(k)``): k draws in all, not k per component. Draw i (0 <= i < k) takes the
component J(u_i) = min{j : w_1 + ... + w_j > u_i} at the stratified uniform u_i = (i + U_i) / k, U_i ~ U(0, 1)
(one per draw and data point), then z_i = mu_J + sigma_J * eps_i. For any f,

    E[(1/k) sum_i f(z_i)] = sum_i int_{i/k}^{(i+1)/k} E_{q_J(u)}[f] du = int_0^1 E_{q_J(u)}[f] du
                          = sum_j w_j E_{q_j}[f],

so with log-weights log w_i = log p(x, z_i) - log Q(z_i) (no per-draw correction):
- f = p(x, z)/Q(z): (1/k) sum_i w_i is unbiased for p(x), hence E[log (1/k) sum_i w_i] <= log p(x) (Jensen) — the
  IWAE-k estimate is still a lower bound, with no more variance than k i.i.d. draws from Q;
- f = log p(x, z) - log Q(z): (1/k) sum_i log w_i is unbiased for the mixture ELBO
  L[Q] = sum_j w_j E_{q_j}[log p(x, z) - log Q(z)] (the number reported as ``neg_elbo`` / ``gap/L_q``).
Both hold for every k >= 1 and for every chunk of draws separately, so ``evaluation/estimators.iwae_estimate`` (which
draws the k samples in chunks) and ``ELBOModule.log_weights`` work unchanged. Where k * w_j is an integer for every j
(e.g. epsilon = 1/2 weights and k a multiple of 2^(M-1)) the allocation is deterministic: n_j = k w_j draws from
component j, and log (1/k) sum_i w_i = log sum_j w_j (1/n_j) sum_{i in j} p(x, z_i)/Q(z_i) is the stratified
(SIWAE) bound. The alternative of k draws per component with the correction log(M w_j) on each log-weight would keep
p(x) unbiased but make the mean log-weight a different quantity than L[Q], so it is not used here.

With M = 1 every method delegates to the single component's ``DiagGaussian`` (same random draws, same arithmetic), so
a one-component mixture is the VAE's q bit for bit. ``mu`` / ``logvar`` are the heaviest component's (a point
estimate for reconstructions, and the Gaussian a per-point refinement starts from: ``evaluation=iw_svi`` and
``evaluation.estimator.qstar.init=encoder``); they are not moments of the mixture.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from amortlab.distributions.capabilities import Capabilities
from amortlab.distributions.gaussian import DiagGaussian
from amortlab.objectives import LOG_2PI


def recursive_mixture_weights(M: int, epsilon: float) -> list[float]:
    """Weights of Q_M from Q_1 = q_1, Q_m = (1 - eps) Q_{m-1} + eps q_m:
    w_1 = (1 - eps)^(M-1), w_m = eps (1 - eps)^(M-m) for m >= 2 (they sum to 1)."""
    return [(1.0 - epsilon) ** (M - 1)] + [epsilon * (1.0 - epsilon) ** (M - m) for m in range(2, M + 1)]


def pairwise_log_prob(z: Tensor, mus: Tensor, logvars: Tensor) -> Tensor:
    """log N(z; mu_j, sigma_j^2) for every component j: z ``[..., B, Z]``, mus/logvars ``[M, B, Z]`` ->
    ``[..., M, B]``."""
    z = z.unsqueeze(-3)  # [..., 1, B, Z]
    return -0.5 * ((z - mus).pow(2) * torch.exp(-logvars) + logvars + LOG_2PI).sum(-1)


@dataclass
class MixtureGaussian:
    """Q = sum_j w_j N(mus[j], diag exp(logvars[j])); ``mus``, ``logvars`` ``[M, B, Z]``, ``log_w`` ``[M]`` or
    ``[M, B]`` (normalised: logsumexp over M is 0)."""

    mus: Tensor
    logvars: Tensor
    log_w: Tensor
    family: ClassVar[str] = "mixture"
    capabilities: ClassVar[Capabilities] = Capabilities(closed_form_mean=True, log_prob=True, mixture=True)

    def __post_init__(self):
        if self.log_w.dim() == 1:
            self.log_w = self.log_w.unsqueeze(-1)
        self.log_w = self.log_w.to(self.mus).expand(self.mus.shape[0], self.mus.shape[1])  # [M, B]

    def take(self, idx) -> MixtureGaussian:
        """The q of points ``idx`` of the batch."""
        return MixtureGaussian(self.mus[:, idx], self.logvars[:, idx], self.log_w[:, idx])

    @classmethod
    def from_components(cls, components: list[DiagGaussian], weights: list[float] | Tensor) -> MixtureGaussian:
        mus = torch.stack([c.mu for c in components])
        logvars = torch.stack([c.logvar for c in components])
        w = torch.as_tensor(weights, dtype=torch.float64)  # log in float64, then q's dtype
        return cls(mus, logvars, torch.log(w).to(mus))

    @property
    def n_components(self) -> int:
        return self.mus.shape[0]

    def component(self, j: int) -> DiagGaussian:
        return DiagGaussian(self.mus[j], self.logvars[j])

    @property
    def weights(self) -> Tensor:
        """w ``[M, B]``."""
        return self.log_w.exp()

    def _heaviest(self, t: Tensor) -> Tensor:
        j = self.log_w.argmax(0)  # [B]
        return t.gather(0, j.view(1, -1, 1).expand(1, *t.shape[1:])).squeeze(0)

    @property
    def mu(self) -> Tensor:
        """Mean ``[B, Z]`` of the heaviest component (ties: the first)."""
        return self._heaviest(self.mus)

    @property
    def logvar(self) -> Tensor:
        """log-variance ``[B, Z]`` of the heaviest component."""
        return self._heaviest(self.logvars)

    def mean(self) -> Tensor:
        """E_Q[z] = sum_j w_j mu_j ``[B, Z]``."""
        return (self.log_w.exp().unsqueeze(-1) * self.mus).sum(0)

    def log_prob(self, z: Tensor) -> Tensor:
        """log Q(z) ``[k, B]`` for z ``[k, B, Z]`` (logsumexp over components)."""
        if self.n_components == 1:
            return self.component(0).log_prob(z)
        return torch.logsumexp(self.log_w + pairwise_log_prob(z, self.mus, self.logvars), dim=-2)

    def sample_noise(self, k: int, generator: torch.Generator | None = None) -> Tensor:
        """eps ~ N(0, I) ``[k, B, Z]``."""
        return torch.randn((k, *self.mus.shape[1:]), device=self.mus.device, dtype=self.mus.dtype,
                           generator=generator)

    def stratified_components(self, k: int, generator: torch.Generator | None = None) -> Tensor:
        """Component index of each of k draws ``[k, B]``: J(u_i), u_i = (i + U_i) / k (see the module docstring)."""
        B = self.mus.shape[1]
        u = (torch.arange(k, device=self.mus.device, dtype=torch.float64).unsqueeze(-1)
             + torch.rand((k, B), device=self.mus.device, dtype=torch.float64, generator=generator)) / k
        cdf = torch.cumsum(self.log_w.detach().double().exp(), 0).T.contiguous()  # [B, M]
        j = torch.searchsorted(cdf, u.T.contiguous(), right=True)  # [B, k]: first j with cdf_j > u
        return j.clamp_(max=self.n_components - 1).T  # rounding: cdf_M may be 1 - 1e-16

    def rsample_with_log_prob(self, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """k stratified reparameterised draws z ``[k, B, Z]`` and log Q(z) ``[k, B]``.

        The draws keep gradients to every component's (mu, log sigma^2) (pathwise, through z and log Q); the weights
        are constants. M = 1: exactly ``DiagGaussian.rsample_with_log_prob``.
        """
        if self.n_components == 1:
            return self.component(0).rsample_with_log_prob(k, generator)
        j = self.stratified_components(k, generator)  # [k, B]
        eps = self.sample_noise(k, generator)
        idx = j.unsqueeze(-1).expand(-1, -1, self.mus.shape[-1])  # [k, B, Z]
        mu = self.mus.gather(0, idx)
        std = torch.exp(0.5 * self.logvars).gather(0, idx)
        z = mu + std * eps
        return z, self.log_prob(z)

    def rsample(self, k: int = 1, generator: torch.Generator | None = None) -> Tensor:
        return self.rsample_with_log_prob(k, generator)[0]

    def detach(self) -> MixtureGaussian:
        return MixtureGaussian(self.mus.detach(), self.logvars.detach(), self.log_w.detach())


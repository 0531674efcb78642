"""Fully factorised Gaussian q(z | x) = N(mu, diag(exp(logvar)))."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from amortlab.distributions import noise
from amortlab.distributions.capabilities import Capabilities
from amortlab.objectives import LOG_2PI


@dataclass
class DiagGaussian:
    """Diagonal Gaussian with ``mu``, ``logvar`` of shape ``[B, D]``."""

    mu: Tensor
    logvar: Tensor
    family: ClassVar[str] = "gaussian"
    capabilities: ClassVar[Capabilities] = Capabilities(local_params=True, path_derivative=True, factorised=True,
                                                        closed_form_mean=True, closed_form_kl=True, log_prob=True)

    def pack(self) -> Tensor:
        """lambda = (mu, log sigma^2) ``[B, 2D]``."""
        return torch.cat([self.mu, self.logvar], dim=-1)

    @classmethod
    def unpack(cls, lam: Tensor) -> DiagGaussian:
        """The q of lambda = (mu, log sigma^2) ``[..., 2D]``."""
        mu, logvar = lam.chunk(2, dim=-1)
        return cls(mu, logvar)

    def take(self, idx) -> DiagGaussian:
        """The q of points ``idx`` of the batch."""
        return DiagGaussian(self.mu[idx], self.logvar[idx])

    def mean(self) -> Tensor:
        """E_q[z] = mu ``[B, D]``."""
        return self.mu

    def sample_noise(self, k: int, generator: torch.Generator | None = None) -> Tensor:
        """eps ~ N(0, I) of shape ``[k, B, D]``."""
        return noise.randn((k, *self.mu.shape), self.mu, generator)

    def rsample_with_log_prob(self, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """z = mu + sigma * eps, ``[k, B, D]``, and log q(z) ``[k, B]``.

        Uses log q(z) = -(eps^2 + logvar + log 2pi)/2 summed over D, which avoids dividing by sigma.
        """
        eps = self.sample_noise(k, generator)
        z = self.mu + torch.exp(0.5 * self.logvar) * eps
        log_q = -0.5 * (eps.pow(2) + self.logvar + LOG_2PI).sum(-1)
        return z, log_q

    def rsample(self, k: int = 1, generator: torch.Generator | None = None) -> Tensor:
        return self.rsample_with_log_prob(k, generator)[0]

    def rsample_path_derivative(self, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """z ``[k, B, D]`` and log q(z) ``[k, B]`` with (mu, logvar) stopped in log q: the gradient w.r.t. them is
        the path derivative (Roeder et al. 2017)."""
        z = self.rsample(k, generator)
        return z, DiagGaussian(self.mu.detach(), self.logvar.detach()).log_prob(z)

    def log_prob(self, z: Tensor) -> Tensor:
        """log N(z; mu, sigma^2) summed over D; ``z`` ``[k, B, D]`` -> ``[k, B]``."""
        return -0.5 * ((z - self.mu).pow(2) * torch.exp(-self.logvar) + self.logvar + LOG_2PI).sum(-1)

    def kl_to_standard_normal(self) -> Tensor:
        """KL(q || N(0, I)) = (1/2) sum_d (mu^2 + sigma^2 - 1 - log sigma^2), ``[B]``."""
        return 0.5 * (self.mu.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(-1)

    def entropy(self) -> Tensor:
        """H[q] = (1/2) sum_d (1 + log 2pi + log sigma^2), ``[B]``."""
        return 0.5 * (1.0 + LOG_2PI + self.logvar).sum(-1)


def as_factorised(q) -> DiagGaussian:
    """The fully factorised Gaussian of q's lambda ``[B, Z]``: q itself when its family is ``factorised``, else
    ``DiagGaussian.unpack(q.pack())`` (a structured q over several layers -> its point-estimate projection)."""
    if type(q).capabilities.factorised:
        return q
    return DiagGaussian.unpack(q.pack())

"""Linear-Gaussian VAE (probabilistic PCA): the model with closed forms that the estimators are tested against.

    p(z) = N(0, I_Z),   p(x | z) = N(W z + b, s^2 I_X)
    =>  p(x) = N(b, W W^T + s^2 I),   p(z | x) = N(S W^T (x - b) / s^2, S),   S = (I + W^T W / s^2)^{-1}.

With orthogonal columns of W the posterior covariance S is diagonal, so the diagonal-Gaussian family holds the exact
posterior and the approximation gap is zero; ``LinearGaussianEncoder`` can then represent it exactly.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from amortlab.distributions import DiagGaussian
from amortlab.objectives import LOG_2PI


class LinearGaussianDecoder(nn.Module):
    """p(x | z) = N(W z + b, s^2 I). ``W`` ``[X, Z]``, ``b`` ``[X]``, ``log_s`` scalar."""

    def __init__(self, x_dim: int, z_dim: int, noise_std: float = 1.0):
        super().__init__()
        self.z_dim = z_dim
        self.W = nn.Parameter(torch.randn(x_dim, z_dim) / math.sqrt(z_dim))
        self.b = nn.Parameter(torch.zeros(x_dim))
        self.log_s = nn.Parameter(torch.tensor(math.log(noise_std)))

    def mean(self, z: Tensor) -> Tensor:
        return z @ self.W.T + self.b

    def init_output_bias(self, x_mean: Tensor) -> None:
        """Kept as initialised: the tests set this model's parameters by hand."""

    def log_prob(self, x: Tensor, z: Tensor) -> Tensor:
        """log N(x; W z + b, s^2 I), x ``[B, X]``, z ``[k, B, Z]`` -> ``[k, B]``."""
        var = torch.exp(2 * self.log_s)
        return -0.5 * (((x - self.mean(z)) ** 2) / var + 2 * self.log_s + LOG_2PI).sum(-1)

    @torch.no_grad()
    def exact_log_marginal(self, x: Tensor) -> Tensor:
        """log p(x) = log N(x; b, W W^T + s^2 I), ``[B]``."""
        X = x.shape[-1]
        cov = self.W @ self.W.T + torch.exp(2 * self.log_s) * torch.eye(X, dtype=x.dtype, device=x.device)
        return torch.distributions.MultivariateNormal(self.b, covariance_matrix=cov).log_prob(x)

    @torch.no_grad()
    def exact_posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean ``[B, Z]`` and covariance ``[Z, Z]`` of p(z | x)."""
        var = torch.exp(2 * self.log_s)
        S = torch.linalg.inv(torch.eye(self.z_dim, dtype=x.dtype, device=x.device) + self.W.T @ self.W / var)
        return (x - self.b) @ self.W @ S / var, S


class LinearGaussianEncoder(nn.Module):
    """q(z | x) = N(A x + c, diag exp(logvar)) with a per-dimension logvar shared by all x."""

    family = DiagGaussian

    def __init__(self, x_dim: int, z_dim: int):
        super().__init__()
        self.z_dim = z_dim
        self.linear = nn.Linear(x_dim, z_dim)
        self.logvar = nn.Parameter(torch.zeros(z_dim))

    @torch.no_grad()
    def set_exact(self, decoder: LinearGaussianDecoder) -> None:
        """Make q the exact posterior of ``decoder`` (exact only when its covariance S is diagonal)."""
        var = torch.exp(2 * decoder.log_s)
        S = torch.linalg.inv(torch.eye(self.z_dim) + decoder.W.T @ decoder.W / var)
        A = S @ decoder.W.T / var  # mean = A (x - b)
        self.linear.weight.copy_(A)
        self.linear.bias.copy_(-A @ decoder.b)
        self.logvar.copy_(torch.log(torch.diagonal(S)))

    def forward(self, x: Tensor) -> DiagGaussian:
        mu = self.linear(x)
        return DiagGaussian(mu, self.logvar.expand_as(mu))

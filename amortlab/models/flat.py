"""One Gaussian latent layer: p(z) = N(0, I_D), p_theta(x | z) = the decoder (Bernoulli MLP, linear Gaussian, ...)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from amortlab.models.base import GenerativeModel
from amortlab.objectives import std_normal_log_prob


class FlatLatentModel(GenerativeModel):
    """p(x, z) = N(z; 0, I) p_theta(x | z), z ``[k, B, D]``.

    Args:
        decoder: exposes ``z_dim``, ``log_prob(x [B, X], z [k, B, D]) -> [k, B]`` and ``mean(z) -> E[x | z]``
            and ``init_output_bias(x_mean)`` (start the output at the data mean; a no-op where it has no meaning).
    """

    standard_normal_prior = True

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder
        self.latent_dims = (int(decoder.z_dim),)

    def log_prior(self, z: Tensor, frozen: bool = False) -> Tensor:
        return std_normal_log_prob(z)

    def prior_residual(self, z: Tensor) -> Tensor:
        return z

    def from_noise(self, eps: Tensor) -> Tensor:
        return eps

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        return self.decoder.log_prob(x, z)

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        p = next(self.decoder.parameters())
        return torch.randn(n, self.z_dim, generator=generator, device=p.device, dtype=p.dtype)

    def mean(self, z: Tensor) -> Tensor:
        return self.decoder.mean(z)

    def init_output_bias(self, x_mean: Tensor) -> None:
        self.decoder.init_output_bias(x_mean)

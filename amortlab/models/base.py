"""The generative-model protocol: p_theta(x, z) = p_theta(z) p_theta(x | z) with a structured latent.

A latent ``z`` is one tensor per stochastic layer (or time step), samples first: ``[k, B, D_l]`` for layer l. A
model with one layer (``FlatLatentModel``) takes and returns a plain tensor ``[k, B, D]``; a model with several takes a
tuple of them. Every density returns ``[k, B]`` (summed over latent and data dimensions):

    log p(x, z) = log p(z) + log p(x | z)                                     (``log_joint``)

``latent_dims`` lists D_l per layer and ``z_dim`` is their sum. ``log_likelihood(..., frozen=True)`` holds theta
constant (gradients reach z, never the model's parameters): the path a term takes that must train only q.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor, nn

Latent = Union[Tensor, tuple[Tensor, ...]]


class GenerativeModel(nn.Module):
    """Base class of p_theta(x, z). Subclasses implement ``log_prior``, ``log_likelihood``, ``sample_latent`` and
    ``mean``; ``latent_dims`` is a tuple of ints."""

    latent_dims: tuple[int, ...] = ()

    @property
    def z_dim(self) -> int:
        """Total latent dimension sum_l D_l."""
        return sum(self.latent_dims)

    @property
    def flat(self) -> bool:
        """One stochastic layer: z is a single tensor ``[k, B, D]`` (schemes with one lambda per point need this)."""
        return len(self.latent_dims) == 1

    def log_prior(self, z: Latent) -> Tensor:
        """log p(z) ``[k, B]``."""
        raise NotImplementedError

    def log_likelihood(self, x: Tensor, z: Latent, frozen: bool = False) -> Tensor:
        """log p(x | z) for x ``[B, X]`` -> ``[k, B]``; ``frozen`` holds theta constant (see module docstring)."""
        if frozen:
            params = {n: p.detach() for n, p in self.named_parameters()}
            return torch.func.functional_call(self, params, (x, z))
        return self.forward(x, z)

    def forward(self, x: Tensor, z: Latent) -> Tensor:
        """log p(x | z) with the model's current parameters (what ``log_likelihood`` evaluates)."""
        raise NotImplementedError

    def log_joint(self, x: Tensor, z: Latent) -> Tensor:
        """log p(x, z) = log p(z) + log p(x | z), ``[k, B]``."""
        return self.log_prior(z) + self.log_likelihood(x, z)

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> Latent:
        """z ~ p(z) for ``n`` draws: ``[n, D]`` per layer."""
        raise NotImplementedError

    def mean(self, z: Latent) -> Tensor:
        """E[x | z] ``[..., X]``."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Mean images E[x | z], z ~ p(z): ``[n, X]``."""
        return self.mean(self.sample_latent(n, generator))

    def init_output_bias(self, x_mean: Tensor) -> None:
        """Start the likelihood at the data mean (a no-op for models without such a bias)."""

"""The generative-model protocol: p_theta(x, z) = p_theta(z) p_theta(x | z) with a structured latent.

A latent ``z`` is one tensor per stochastic layer (or time step), samples first: ``[k, B, D_l]`` for layer l. A
model with one layer (``FlatLatentModel``) takes and returns a plain tensor ``[k, B, D]``; a model with several takes a
tuple of them. Every density returns ``[k, B]`` (summed over latent and data dimensions):

    log p(x, z) = log p(z) + log p(x | z)                                     (``log_joint``)

``latent_dims`` lists D_l per layer and ``z_dim`` is their sum. A model with several layers also takes the layers
concatenated in one tensor ``[k, B, sum_l D_l]`` (the layout of a fully factorised q over all layers); ``split`` gives
the tuple either way. ``log_likelihood(..., frozen=True)`` holds theta
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
    standard_normal_prior: bool = False  # p(z) = N(0, I) (closed-form KL terms of a Gaussian q)

    @property
    def z_dim(self) -> int:
        """Total latent dimension sum_l D_l."""
        return sum(self.latent_dims)

    @property
    def flat(self) -> bool:
        """One stochastic layer: z is a single tensor ``[k, B, D]`` (schemes with one lambda per point need this)."""
        return len(self.latent_dims) == 1

    @property
    def layer_names(self) -> tuple[str, ...]:
        """``z1`` (nearest the data), ``z2``, ...: the names of per-layer results (``active_units/z1``)."""
        return tuple(f"z{i + 1}" for i in range(len(self.latent_dims)))

    def split(self, z: Latent) -> tuple[Tensor, ...]:
        """One tensor per layer ``[..., D_l]`` from a tuple or from the concatenation ``[..., z_dim]``."""
        if isinstance(z, Tensor):
            return tuple(z.split(self.latent_dims, dim=-1))
        return tuple(z)

    def prior_residual(self, z: Latent) -> Tensor:
        """(z_l - E_p[z_l | layers above]) / sd_p per layer, concatenated ``[..., z_dim]`` (z itself for N(0, I)):
        the prediction errors of iterative inference's error encoding."""
        raise NotImplementedError

    def from_noise(self, eps: Tensor) -> Tensor:
        """z = T(eps) ``[..., z_dim]`` (concatenated) with z ~ p(z) for eps ~ N(0, I): the prior's own
        reparameterisation (AIS anneals in eps, where the prior is N(0, I))."""
        raise NotImplementedError

    def log_prior(self, z: Latent, frozen: bool = False) -> Tensor:
        """log p(z) ``[k, B]``; ``frozen`` holds the prior's parameters constant (a learned prior's, e.g. the
        conditionals of a hierarchy)."""
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

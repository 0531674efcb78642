"""MLP encoder q_phi(z | x) and decoder p_theta(x | z) (Burda et al. / Cremer et al. architectures)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from amortlab.distributions import DiagGaussian
from amortlab.activations import activation
from amortlab.objectives import bernoulli_log_prob


class MLP(nn.Sequential):
    """in -> hidden[0] -> ... -> hidden[-1] -> out with ``act`` after every hidden layer (none after the last)."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, act: str = "tanh"):
        dims, layers = [in_dim, *hidden], []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), activation(act)()]
        layers.append(nn.Linear(dims[-1], out_dim))
        super().__init__(*layers)


class GaussianEncoder(nn.Module):
    """x ``[B, X]`` -> q(z | x) = N(mu, diag exp(logvar)), mu and logvar ``[B, Z]`` from one shared trunk."""

    family = DiagGaussian  # the class of q it returns: schemes read its declared capabilities

    def __init__(self, x_dim: int, z_dim: int, hidden: Sequence[int] = (200, 200), activation: str = "tanh"):
        super().__init__()
        self.z_dim = z_dim
        self.net = MLP(x_dim, hidden, 2 * z_dim, activation)

    def forward(self, x: Tensor) -> DiagGaussian:
        mu, logvar = self.net(x).chunk(2, dim=-1)
        return DiagGaussian(mu, logvar)


class BernoulliDecoder(nn.Module):
    """z ``[..., Z]`` -> Bernoulli logits ``[..., X]`` (the mirrored MLP)."""

    def __init__(self, x_dim: int, z_dim: int, hidden: Sequence[int] = (200, 200), activation: str = "tanh"):
        super().__init__()
        self.z_dim = z_dim
        self.net = MLP(z_dim, hidden, x_dim, activation)

    @property
    def output_layer(self) -> nn.Linear:
        return self.net[-1]

    @torch.no_grad()
    def init_output_bias(self, x_mean: Tensor, eps: float = 1e-3) -> None:
        """Set the output bias to logit(mean pixel), so an untrained decoder already predicts the data mean."""
        p = x_mean.clamp(eps, 1 - eps).to(self.output_layer.bias)
        self.output_layer.bias.copy_(torch.log(p) - torch.log1p(-p))

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)

    def log_prob(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x | z) for x ``[B, X]``, z ``[k, B, Z]`` -> ``[k, B]``."""
        return bernoulli_log_prob(self.net(z), x)

    def mean(self, z: Tensor) -> Tensor:
        """E[x | z] = sigmoid(logits)."""
        return torch.sigmoid(self.net(z))

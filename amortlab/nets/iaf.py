"""Amortized IAF posterior: ``IAFEncoder`` (a drop-in replacement for ``GaussianEncoder``; Kingma et al. 2016).

x ``[B, X]`` -> MLP trunk -> (mu, log sigma^2 ``[B, Z]``, context h ``[B, C]``) -> ``IAFPosterior`` with T shared
MADE steps conditioned on h (``amortlab.distributions.iaf``). The encoder regularizers act on the trunk's
``nn.Linear`` layers (x -> mu, sigma, h); the MADE layers are ``MaskedDense`` and are left unconstrained, as the
coupling flow's nets are.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from amortlab.distributions.iaf import (DEFAULT_GATE_BIAS, DEFAULT_IAF_HIDDEN, DEFAULT_IAF_STEPS, IAFFlow,
                                        IAFPosterior)
from amortlab.errors import AmortlabError
from amortlab.nets.mlp import MLP

__all__ = ["IAFEncoder"]


class IAFEncoder(nn.Module):
    """q(z_T | x): Gaussian base and context h(x) from an MLP trunk, then ``iaf_steps`` IAF steps.

    Args:
        x_dim, z_dim, hidden, activation: the trunk, as in ``GaussianEncoder``.
        iaf_steps: T (0: the trunk's Gaussian, exactly).
        iaf_hidden: hidden widths of each step's MADE (>= z_dim - 1 units per layer, so every degree is present).
        context_dim: C, the size of h(x) (0: steps without context).
        iaf_activation: activation inside the MADEs (default: ``activation``).
        gate_bias: initial bias of the gates s_t (sigmoid(1) = 0.73).
    """

    family = IAFPosterior

    def __init__(self, x_dim: int, z_dim: int, hidden: Sequence[int] = (200, 200), activation: str = "tanh",
                 iaf_steps: int = DEFAULT_IAF_STEPS, iaf_hidden: Sequence[int] = DEFAULT_IAF_HIDDEN,
                 context_dim: int = 50, iaf_activation: str | None = None, gate_bias: float = DEFAULT_GATE_BIAS):
        super().__init__()
        iaf_hidden = [int(h) for h in iaf_hidden]
        if iaf_steps < 0 or context_dim < 0 or any(h < 1 for h in iaf_hidden):
            raise AmortlabError(f"posterior=iaf needs iaf_steps >= 0, context_dim >= 0 and positive iaf_hidden widths, "
                                f"got iaf_steps={iaf_steps}, context_dim={context_dim}, iaf_hidden={iaf_hidden} "
                                f"(conf/posterior/iaf.yaml).")
        if iaf_hidden and min(iaf_hidden) < z_dim - 1:
            raise AmortlabError(f"posterior=iaf: every MADE hidden layer needs >= z_dim - 1 = {z_dim - 1} units (one "
                                f"per autoregressive degree), got iaf_hidden={iaf_hidden}; raise "
                                f"model.encoder.iaf_hidden.")
        self.z_dim, self.context_dim = z_dim, int(context_dim)
        self.net = MLP(x_dim, hidden, 2 * z_dim + self.context_dim, activation)
        self.flow = IAFFlow(z_dim, iaf_steps, iaf_hidden, self.context_dim, iaf_activation or activation,
                            gate_bias=gate_bias)

    def forward(self, x: Tensor) -> IAFPosterior:
        mu, logvar, h = self.net(x).split([self.z_dim, self.z_dim, self.context_dim], dim=-1)
        return IAFPosterior(mu, logvar, self.flow, h if self.context_dim else None)

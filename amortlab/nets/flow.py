"""Amortized auxiliary coupling flow posterior: ``FlowEncoder`` (a drop-in replacement for ``GaussianEncoder``).

x ``[B, X]`` -> MLP trunk -> base parameters (mu_z, logvar_z ``[B, Z]``, mu_v, logvar_v ``[B, V]``) and the trunk's last
hidden features h(x) ``[B, H]``; the coupling flow and the reverse model r(v_T | x, z_T) = r(v_T | h(x), z_T) are
global (shared by all x; Cremer et al.'s r conditions on x, see ``amortlab.distributions.flow``). ``forward(x)``
returns an ``AuxFlowPosterior``,
whose ``rsample_with_log_prob`` gives z_T and log q~ for the log-weights. See ``amortlab.distributions.flow``.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from amortlab.distributions.flow import (DEFAULT_FLOW_HIDDEN, DEFAULT_FLOW_STEPS, AuxFlowPosterior, CouplingFlow, Dense,
                                         GaussianReverse)
from amortlab.nets.mlp import MLP

__all__ = ["FlowEncoder", "CouplingFlow", "GaussianReverse", "Dense"]


class FlowEncoder(nn.Module):
    """q~(z_T, v_T | x): Gaussian base from an MLP trunk of x, then ``flow_steps`` global coupling steps.

    Args:
        x_dim, z_dim, hidden, activation: the trunk, as in ``GaussianEncoder`` (``hidden`` = trunk widths).
        v_dim: auxiliary dimension (default ``z_dim``).
        flow_hidden: hidden units of each flow net (a, m: z -> v; b, m': v -> z) and of the reverse model.
        flow_steps: number of coupling steps T.
        flow_activation: activation of the flow / reverse nets (default: ``activation``).
    """

    family = AuxFlowPosterior

    def __init__(self, x_dim: int, z_dim: int, hidden: Sequence[int] = (200, 200), activation: str = "tanh",
                 v_dim: int | None = None, flow_hidden: int | Sequence[int] = DEFAULT_FLOW_HIDDEN,
                 flow_steps: int = DEFAULT_FLOW_STEPS,
                 flow_activation: str | None = None):
        super().__init__()
        self.z_dim = z_dim
        self.v_dim = z_dim if v_dim is None else int(v_dim)
        act = flow_activation or activation
        self.net = MLP(x_dim, hidden, 2 * (z_dim + self.v_dim), activation)
        self.flow = CouplingFlow(z_dim, self.v_dim, flow_hidden, flow_steps, act)
        # r starts at the marginal scale of v_T when v_0 ~ N(0, I): N(0, c^2), c = s(gate_bias)^T
        self.reverse = GaussianReverse(z_dim, self.v_dim, flow_hidden, act,
                                       logvar_bias=2 * self.flow.log_scale_at_init, context_dim=list(hidden)[-1])

    def forward(self, x: Tensor) -> AuxFlowPosterior:
        h = x
        for layer in list(self.net)[:-1]:  # the trunk's last hidden features: r's context c(x)
            h = layer(h)
        mu_z, logvar_z, mu_v, logvar_v = self.net[-1](h).split([self.z_dim, self.z_dim, self.v_dim, self.v_dim],
                                                                dim=-1)
        return AuxFlowPosterior(mu_z, logvar_z, mu_v, logvar_v, self.flow, self.reverse, h)

"""Networks of the sequence methods: an MLP whose first layer is split into a per-step data part (computed for all
time steps at once, before the scan) and a state part (per step, per sample), and the direct filtering encoder."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from torch import Tensor, nn

from amortlab.activations import activation
from amortlab.nets.mlp import MLP
from amortlab.objectives import LOGVAR_MAX, LOGVAR_MIN

class SplitMLP(nn.Module):
    """MLP([d, s]) with d a per-step data input ``[B, T, D]`` and s a state ``[k, B, S]``:
    h_1 = act(W_d d + W_s s + b) (W_d d for all steps in one call: ``data_features``), then ``hidden[1:]`` -> out."""

    def __init__(self, data_dim: int, state_dim: int, hidden: Sequence[int], out_dim: int, act: str = "tanh"):
        super().__init__()
        hidden = list(hidden)
        if not hidden:
            raise ValueError("SplitMLP needs at least one hidden layer")
        self.data_in = nn.Linear(data_dim, hidden[0]) if data_dim else None
        self.state_in = nn.Linear(state_dim, hidden[0], bias=not data_dim)
        self.act = activation(act)()
        self.rest = MLP(hidden[0], hidden[1:], out_dim, act)
        self.width = hidden[0]

    def data_features(self, d: Tensor) -> Tensor | None:
        """W_d d + b ``[..., hidden[0]]`` (None without a data input)."""
        return self.data_in(d) if self.data_in is not None else None

    def forward(self, u: Tensor | None, s: Tensor) -> Tensor:
        """``u`` = data_features of this step ``[B, H1]`` (or None), s ``[k, B, S]`` -> ``[k, B, out]``."""
        h = self.state_in(s)
        return self.rest(self.act(h if u is None else h + u))

class FilterEncoder(nn.Module):
    """Direct filtering encoder q(z_t | x_t, c_t, z_{t-1}) = N(mu, diag exp(lv)) with
    (delta, lv) = MLP([x_t, c_t, z_{t-1}, mu_p]) and mu = mu_p + delta (``residual``; Fraccaro et al.'s
    parameterisation: the filter predicts a correction of the prior's prediction) or mu = delta.
    x_t enters with c_t = summary of x_<t: q never reads x_{>t}."""

    def __init__(self, step_dim: int, context_dim: int, z_dim: int, hidden: Sequence[int] = (128,),
                 activation: str = "tanh", residual: bool = True):
        super().__init__()
        self.z_dim, self.residual = int(z_dim), bool(residual)
        self.net = SplitMLP(step_dim + context_dim, 2 * z_dim, hidden, 2 * z_dim, activation)

    def data_features(self, x: Tensor, c: Tensor) -> Tensor:
        """First-layer features of [x_t, c_t] for every step ``[B, T, H1]``."""

        return self.net.data_features(torch.cat([x, c], -1))

    def forward(self, u: Tensor, z_prev: Tensor, mu_p: Tensor) -> tuple[Tensor, Tensor]:

        delta, lv = self.net(u, torch.cat([z_prev, mu_p], -1)).chunk(2, -1)
        return (mu_p + delta if self.residual else delta), lv.clamp(LOGVAR_MIN, LOGVAR_MAX)

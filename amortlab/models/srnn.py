"""SRNN-style state-space VAE (Fraccaro et al. 2016), ``model=srnn``.

    d_t = GRU(d_{t-1}, x_{t-1})              (d_1 from x_0 = 0: the context c_t = d_t summarises x_<t)
    p(z_t | z_{t-1}, d_t) = N(mu_p, diag exp(lv_p)),   (mu_p, lv_p) = MLP_p([z_{t-1}, d_t])
    p(x_t | z_t, d_t) = Bernoulli(sigmoid(MLP_x([z_t, d_t])))  or  N(mu_x, diag exp(lv_x)) (``emission=gaussian``)

The deterministic chain reads only x, so it runs once per batch (one GRU call) whatever the number of samples;
given z_1:T every term is one batched MLP call over all steps.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from amortlab.errors import AmortlabError
from amortlab.models.sequence import LOGVAR_MAX, LOGVAR_MIN, SequenceModel, gaussian_log_prob
from amortlab.nets.mlp import MLP
from amortlab.objectives import bernoulli_log_prob

EMISSIONS = ("bernoulli", "gaussian")


class SRNN(SequenceModel):
    """Args: step_dim X, z_dim Z, rnn_dim H (GRU state), hidden / activation of the prior and emission MLPs,
    emission ``bernoulli`` | ``gaussian``."""

    def __init__(self, step_dim: int, z_dim: int = 16, rnn_dim: int = 128, hidden: Sequence[int] = (128,),
                 activation: str = "tanh", emission: str = "bernoulli"):
        super().__init__(step_dim, z_dim)
        if emission not in EMISSIONS:
            raise AmortlabError(f"model.emission={emission!r} is not one of {', '.join(EMISSIONS)} (bernoulli for "
                                f"binary frames / piano rolls, gaussian for real-valued steps such as dataset=lgssm).")
        self.emission = emission
        self.rnn_dim = int(rnn_dim)
        self.rnn = nn.GRU(step_dim, rnn_dim, batch_first=True)
        self.prior_net = MLP(z_dim + rnn_dim, list(hidden), 2 * z_dim, activation)
        out = step_dim if emission == "bernoulli" else 2 * step_dim
        self.emission_net = MLP(z_dim + rnn_dim, list(hidden), out, activation)

    def context(self, x: Tensor) -> Tensor:
        shifted = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)  # x_0 = 0, x_1 .. x_{T-1}
        return self.rnn(shifted)[0]

    def prior(self, z_prev: Tensor, c: Tensor, first: bool) -> tuple[Tensor, Tensor]:
        c = c.expand(*z_prev.shape[:-1], -1)
        mu, lv = self.prior_net(torch.cat([z_prev, c], -1)).chunk(2, -1)
        return mu, lv.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def _out(self, z: Tensor, c: Tensor) -> Tensor:
        return self.emission_net(torch.cat([z, c.expand(*z.shape[:-1], -1)], -1))

    def log_emission(self, x: Tensor, z: Tensor, c: Tensor) -> Tensor:
        out = self._out(z, c)
        if self.emission == "bernoulli":
            return bernoulli_log_prob(out, x)
        mu, lv = out.chunk(2, -1)
        return gaussian_log_prob(x, mu, lv.clamp(LOGVAR_MIN, LOGVAR_MAX))

    def emission_mean(self, z: Tensor, c: Tensor) -> Tensor:
        out = self._out(z, c)
        return torch.sigmoid(out) if self.emission == "bernoulli" else out.chunk(2, -1)[0]

    def sample_emission(self, mean: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.bernoulli(mean, generator=generator) if self.emission == "bernoulli" else mean

    @torch.no_grad()
    def init_output_bias(self, x_mean: Tensor, eps: float = 1e-3) -> None:
        """Start the emission at the per-dimension data mean ``[X]`` (Bernoulli: logit of it)."""
        bias = self.emission_net[-1].bias
        if self.emission == "bernoulli":
            p = x_mean.clamp(eps, 1 - eps).to(bias)
            bias.copy_(torch.log(p) - torch.log1p(-p))
        else:
            bias[:self.step_dim].copy_(x_mean.to(bias))

"""Inverse autoregressive flow posterior (Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling 2016).

    z_0 = mu + sigma * eps,  eps ~ N(0, I)                       mu, log sigma^2 ``[B, Z]`` from the encoder
    step t = 1..T:  (m_t, s_t) = AR_t(z_{t-1}, h)                an autoregressive net (MADE) with context h(x)
                    g_t = sigmoid(s_t),  z_t = g_t * z_{t-1} + (1 - g_t) * m_t
    log q(z_T | x) = log N(z_0; mu, sigma^2) - sum_t sum_i log g_t,i

Output i of AR_t depends only on the inputs before i in step t's order (MADE masks, Germain et al. 2015), so each
step's Jacobian is triangular with diagonal g_t and the density is exact; the order is reversed from one step to the
next (Kingma et al.'s alternation). The context h ``[B, C]`` enters every hidden unit and every output directly (it
does not depend on z). Log-gates use ``F.logsigmoid``.

Sampling and log q of a sample cost T passes. ``log_prob(z)`` of a point the flow did not draw inverts each step by
Z passes (z_{t-1,i} = (z_t,i - (1 - g_i) m_i) / g_i in step order; after pass j the first j coordinates are exact),
so it costs Z*T passes: used for densities of foreign samples (the mutual-information estimate, plots), not in
training.

The MADE layers are ``MaskedDense``, shared (the amortized ``IAFEncoder``) or per point (``LocalIAF``, q* in the
IAF family, all points in one batched Adam run), like the coupling flow's ``Dense`` layers.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amortlab.activations import activation
from amortlab.distributions import noise
from amortlab.distributions.capabilities import Capabilities
from amortlab.distributions.flow import Dense, _hidden_list, _init_base
from amortlab.objectives import LOG_2PI

DEFAULT_IAF_HIDDEN = (200,)
DEFAULT_IAF_STEPS = 2
DEFAULT_GATE_BIAS = 1.0  # Kingma et al.: initialise the "forget gate" bias at +1 or +2


class MaskedDense(Dense):
    """``Dense`` (shared or per point) whose weight is multiplied by a fixed 0/1 ``mask`` ``[out, in]``."""

    def __init__(self, mask: Tensor, n_points: int | None = None, dtype=None, device=None,
                 generator: torch.Generator | None = None):
        out_dim, in_dim = mask.shape
        super().__init__(in_dim, out_dim, n_points, dtype, device, generator)
        self.register_buffer("mask", mask.to(dtype=self.weight.dtype, device=self.weight.device))

    def forward(self, x: Tensor) -> Tensor:
        return self._affine(x, self.weight * self.mask)


def made_degrees(z_dim: int, hidden: Sequence[int], reverse: bool) -> list[Tensor]:
    """MADE degrees: inputs 1..Z (reversed: Z..1), each hidden layer's units cycling through 1..Z-1 (0 when Z = 1:
    then no unit sees z)."""
    d_in = torch.arange(1, z_dim + 1)
    if reverse:
        d_in = d_in.flip(0)
    span = max(z_dim - 1, 1)
    return [d_in] + [(torch.arange(h) % span + 1) if z_dim > 1 else torch.zeros(h, dtype=torch.long)
                     for h in hidden]


class MADE(nn.Module):
    """Autoregressive net z ``[k, B, Z]`` (and context h ``[B, C]``) -> (m, s) ``[k, B, Z]`` each, output i a
    function of the inputs before i in the net's order only (degrees: ``made_degrees``).

    Masks: input -> hidden 1: m_j >= d_i; hidden -> hidden: m_j' >= m_j; hidden -> outputs: d_o > m_j. The context
    feeds the first hidden layer and both outputs unmasked. The output layers start small (weights scaled by
    ``init_scale``) with biases m: 0, s: ``gate_bias``, so each step starts near z -> sigmoid(gate_bias) z.
    """

    def __init__(self, z_dim: int, hidden: int | Sequence[int] = DEFAULT_IAF_HIDDEN, context_dim: int = 0,
                 act: str = "elu", reverse: bool = False, n_points: int | None = None,
                 gate_bias: float = DEFAULT_GATE_BIAS, init_scale: float = 1e-2, dtype=None, device=None,
                 generator: torch.Generator | None = None):
        super().__init__()
        hidden = _hidden_list(hidden)
        self.z_dim, self.context_dim, self.reverse = z_dim, int(context_dim), reverse
        degrees = made_degrees(z_dim, hidden, reverse)
        kw = {"n_points": n_points, "dtype": dtype, "device": device, "generator": generator}
        self.hidden_layers = nn.ModuleList(
            MaskedDense((d_out[:, None] >= d_in[None, :]).double(), **kw) for d_in, d_out in zip(degrees, degrees[1:]))
        d_out = torch.cat([degrees[0], degrees[0]])  # [m; s]
        self.out = MaskedDense((d_out[:, None] > degrees[-1][None, :]).double(), **kw)
        self.context_in = Dense(self.context_dim, hidden[0], **kw) if self.context_dim and hidden else None
        self.context_out = Dense(self.context_dim, 2 * z_dim, **kw) if self.context_dim else None
        self.act = activation(act)()
        with torch.no_grad():
            for layer in (self.out, self.context_out):
                if layer is not None:
                    layer.weight.mul_(init_scale)
                    layer.bias.zero_()
            self.out.bias[..., z_dim:] = float(gate_bias)

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.context_dim and context is None:
            raise ValueError(f"this autoregressive net needs the context h(x) [B, {self.context_dim}]")
        h = z
        for i, layer in enumerate(self.hidden_layers):
            h = layer(h)
            if i == 0 and self.context_in is not None:
                h = h + self.context_in(context.unsqueeze(0))
            h = self.act(h)
        out = self.out(h)
        if self.context_out is not None:
            out = out + self.context_out(context.unsqueeze(0))
        m, s = out.chunk(2, dim=-1)
        return m, s


class IAFFlow(nn.Module):
    """T IAF steps (module docstring); ``forward(z0, h) -> (z_T, sum_t sum_i log g_t,i [k, B])``, ``inverse``.

    ``steps`` = 0 is the identity (q is then the encoder's Gaussian). ``n_points``: per-point nets (rows
    ``[k, n_points, .]``). ``log_scale_at_init`` = T log sigmoid(gate_bias): the log factor z is scaled by at
    initialisation.
    """

    def __init__(self, z_dim: int, steps: int = DEFAULT_IAF_STEPS, hidden: int | Sequence[int] = DEFAULT_IAF_HIDDEN,
                 context_dim: int = 0, activation: str = "elu", n_points: int | None = None,
                 gate_bias: float = DEFAULT_GATE_BIAS, init_scale: float = 1e-2, dtype=None, device=None,
                 generator: torch.Generator | None = None):
        super().__init__()
        if steps < 0 or z_dim < 1:
            raise ValueError(f"IAFFlow needs steps >= 0 and z_dim >= 1, got steps={steps}, z_dim={z_dim}")
        self.z_dim, self.steps, self.hidden, self.context_dim = z_dim, int(steps), _hidden_list(hidden), context_dim
        self.activation, self.gate_bias, self.init_scale, self.n_points = activation, gate_bias, init_scale, n_points
        self.nets = nn.ModuleList(
            MADE(z_dim, self.hidden, context_dim, activation, t % 2 == 1, n_points, gate_bias, init_scale, dtype,
                 device, generator) for t in range(self.steps))

    @property
    def log_scale_at_init(self) -> float:
        return self.steps * float(F.logsigmoid(torch.tensor(float(self.gate_bias), dtype=torch.float64)))

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        log_gates = z.new_zeros(z.shape[:-1])
        for net in self.nets:
            m, s = net(z, context)
            g = torch.sigmoid(s)
            z = g * z + (1 - g) * m
            log_gates = log_gates + F.logsigmoid(s).sum(-1)
        return z, log_gates

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """z_T -> (z_0, sum_t sum_i log g_t,i ``[k, B]`` of the forward map): each step undone by Z passes
        (module docstring)."""
        log_gates = z.new_zeros(z.shape[:-1])
        for net in reversed(self.nets):
            y, x = z, torch.zeros_like(z)
            for _ in range(self.z_dim):
                m, s = net(x, context)
                x = (y - (1 - torch.sigmoid(s)) * m) / torch.sigmoid(s)
            z = x
            log_gates = log_gates + F.logsigmoid(s).sum(-1)  # s of the last pass is a function of the exact x_{<i}
        return z, log_gates


@dataclass
class IAFPosterior:
    """q(z_T | x) of a batch: base ``mu``, ``logvar`` ``[B, Z]``, the ``flow`` (``IAFFlow``, shared or per point)
    and its ``context`` h(x) ``[B, C]`` (None without one). Exact ``log_prob``; samples first ``[k, B, Z]``."""

    mu_z: Tensor
    logvar_z: Tensor
    flow: IAFFlow
    context: Tensor | None = None
    family: ClassVar[str] = "iaf"
    capabilities: ClassVar[Capabilities] = Capabilities(log_prob=True, flow=True)

    @property
    def z_dim(self) -> int:
        return self.mu_z.shape[-1]

    def take(self, idx) -> IAFPosterior:
        """The q of points ``idx`` of the batch (shared nets; per-point nets cannot be sliced)."""
        if self.flow.n_points is not None:
            raise ValueError("take() needs shared (amortized) nets")
        return IAFPosterior(self.mu_z[idx], self.logvar_z[idx], self.flow,
                            None if self.context is None else self.context[idx])

    @property
    def mu(self) -> Tensor:
        """A point estimate ``[B, Z]`` for reconstructions: the flow applied to the base mean."""
        return self.flow(self.mu_z.unsqueeze(0), self.context)[0][0]

    def sample_noise(self, k: int, generator: torch.Generator | None = None) -> Tensor:
        return noise.randn((k, *self.mu_z.shape), self.mu_z, generator)

    def transform(self, eps: Tensor) -> tuple[Tensor, Tensor]:
        """Base noise ``[k, B, Z]`` -> (z_T ``[k, B, Z]``, log q(z_T) ``[k, B]``)."""
        z0 = self.mu_z + torch.exp(0.5 * self.logvar_z) * eps
        log_q0 = -0.5 * (eps.pow(2) + self.logvar_z + LOG_2PI).sum(-1)
        z, log_gates = self.flow(z0, self.context)
        return z, log_q0 - log_gates

    def rsample_with_log_prob(self, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        return self.transform(self.sample_noise(k, generator))

    def rsample(self, k: int = 1, generator: torch.Generator | None = None) -> Tensor:
        return self.rsample_with_log_prob(k, generator)[0]

    def log_prob(self, z: Tensor) -> Tensor:
        """Exact log q(z) for any z ``[k, B, Z]`` -> ``[k, B]`` (through the Z*T-pass inverse)."""
        z0, log_gates = self.flow.inverse(z, self.context)
        return -0.5 * ((z0 - self.mu_z).pow(2) * torch.exp(-self.logvar_z) + self.logvar_z + LOG_2PI).sum(-1) \
            - log_gates

    # --- q* in the IAF family (amortlab.evaluation.gaps) ----------------------------------------------------------
    def local_copy(self) -> LocalIAF:
        """A per-point copy: each point starts at exactly this q (its base, a copy of the nets, its own h(x))."""
        return LocalIAF.from_posterior(self)

    def local_at(self, n: int, init_mu: Tensor | None = None, init_logvar: Tensor | None = None,
                 hidden: int | Sequence[int] | None = None, steps: int | None = None, dtype=None, device=None,
                 generator: torch.Generator | None = None) -> LocalIAF:
        """Per-point IAFs of this flow's shape (``hidden`` / ``steps`` overridable), with the points' h(x), starting
        near N(init_mu, exp(init_logvar))."""
        f = self.flow
        return LocalIAF(n, f.z_dim, f.hidden if hidden is None else hidden, f.steps if steps is None else steps,
                        init_mu, init_logvar, f.activation, f.gate_bias, f.init_scale, dtype, device,
                        context=self.context, generator=generator)


class LocalIAF(nn.Module):
    """Per-datapoint IAFs; ``forward() -> IAFPosterior`` for the ``n_points`` points (every parameter has a leading
    ``n_points`` dimension; h(x) is a fixed per-point input).

    Initialisation (exact as ``init_scale`` -> 0): every step starts as z -> c^(1/T) z, c = sigmoid(gate_bias)^T, and
    the base is N(init_mu / c, init_logvar - 2 log c), so q starts at N(init_mu, exp(init_logvar)).
    """

    family = "iaf"

    def __init__(self, n_points: int, z_dim: int, hidden: int | Sequence[int] = DEFAULT_IAF_HIDDEN,
                 steps: int = DEFAULT_IAF_STEPS, init_mu: Tensor | None = None, init_logvar: Tensor | None = None,
                 activation: str = "elu", gate_bias: float = DEFAULT_GATE_BIAS, init_scale: float = 1e-2, dtype=None,
                 device=None, context: Tensor | None = None, generator: torch.Generator | None = None):
        super().__init__()
        self.n_points, self.z_dim = n_points, z_dim
        mu, logvar = _init_base(n_points, z_dim, init_mu, init_logvar, dtype, device)
        kw = {"dtype": mu.dtype, "device": mu.device}
        self.register_buffer("context", None if context is None else context.detach().to(**kw, copy=True))
        self.flow = IAFFlow(z_dim, steps, hidden, 0 if context is None else context.shape[-1], activation, n_points,
                            gate_bias, init_scale, **kw, generator=generator)
        log_c = self.flow.log_scale_at_init
        self.mu_z = nn.Parameter(mu * math.exp(-log_c))
        self.logvar_z = nn.Parameter(logvar - 2 * log_c)

    @classmethod
    def from_posterior(cls, q: IAFPosterior) -> LocalIAF:
        f = q.flow
        if f.n_points is not None:
            raise ValueError("from_posterior takes a posterior with shared (amortized) nets")
        local = cls(q.mu_z.shape[0], f.z_dim, f.hidden, f.steps, q.mu_z.detach(), q.logvar_z.detach(), f.activation,
                    f.gate_bias, f.init_scale, context=q.context)
        with torch.no_grad():
            for (name, p), (name2, src) in zip(local.flow.named_parameters(), f.named_parameters(), strict=True):
                assert name == name2
                p.copy_(src.detach().expand_as(p))
            local.mu_z.copy_(q.mu_z.detach())
            local.logvar_z.copy_(q.logvar_z.detach())
        return local

    def forward(self) -> IAFPosterior:
        return IAFPosterior(self.mu_z, self.logvar_z, self.flow, self.context)

"""Auxiliary-variable coupling flow posterior (Cremer, Li & Duvenaud 2018, after Salimans et al. / Ranganath et al.).

    z_0 ~ N(mu_z, diag sigma_z^2) [B, Z],   v_0 ~ N(mu_v, diag sigma_v^2) [B, V]      (local, the "base")
    step t = 1..T:   v <- v * s(a_t(z)) + m_t(z)        (a_t, m_t: z -> v)
                     z <- z * s(b_t(v)) + m'_t(v)       (b_t, m'_t: v -> z)
    reverse model    r(v_T | x, z_T) = N(v_T; mean(z_T, c(x)), diag exp(logvar(z_T, c(x))))

s = sigmoid. Each half-step is triangular, so log|det J_t| = sum log s(a_t) + sum log s(b_t), with
log s(a) = a - softplus(a) (``F.logsigmoid``; never log of a rounded sigmoid). In the log-weights the quantity

    log q~ = log q(z_0) + log q(v_0) - sum_t log|det J_t| - log r(v_T | z_T)

takes the place of log q(z), so log w = log p(x, z_T) - log q~ and E[w] = p(x): every k-sample bound is still a lower
bound on log p(x) (the auxiliary-variable bound; its gap adds E KL(q(v_T | x, z_T) || r(v_T | x, z_T)) to the usual
one). As in Cremer et al.'s bound, r sees x through a context vector c(x) ``[B, C]`` (the encoder trunk's features):
an r of z_T alone would leave a flow-trained model a permanent E_x KL(q(v_T | z_T, x) || r(v_T | z_T)) that no
amount of training removes. A per-point family (``LocalFlow``) is a function of its one x already; a copy of an
amortized flow (``LocalFlow.from_posterior``) keeps that point's c(x) as a fixed input.

Everything is samples first: z_T ``[k, B, Z]``, log q~ ``[k, B]``.

The flow and reverse nets are small MLPs built from ``Dense`` layers, which are either shared (``n_points=None``:
one weight for every point, as in the amortized ``FlowEncoder``) or per point (``n_points=n``: every weight has a
leading ``n`` dimension and point i's rows only ever meet point i's weights, through one batched ``baddbmm`` per
layer). ``LocalFlow`` / ``LocalGaussian`` hold per-point families for q* (all points in one batched Adam run).
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
from amortlab.distributions.gaussian import DiagGaussian
from amortlab.objectives import LOG_2PI

# the flow family's default shape: the amortized FlowEncoder's, and q*_Flow's unless an encoder flow sets it
DEFAULT_FLOW_HIDDEN = 100
DEFAULT_FLOW_STEPS = 2


# --- layers -------------------------------------------------------------------------------------------------------
class Dense(nn.Module):
    """Affine layer, shared or per point.

    ``n_points=None``: ``weight`` ``[out, in]``, ``bias`` ``[out]``; input ``[..., in]`` (like ``nn.Linear``).
    ``n_points=n``: ``weight`` ``[n, out, in]``, ``bias`` ``[n, out]``; input ``[k, n, in]`` (samples first), row
    ``[:, i]`` is mapped with point i's weights only (``baddbmm`` over the point dimension).
    Initialised like ``nn.Linear`` (U(-1/sqrt(in), 1/sqrt(in)), independently per point; from ``generator`` when
    given, so a per-point family made inside an evaluation is reproducible).
    It is deliberately not an ``nn.Linear``: the encoder regularizers (weight norm, spectral norm) constrain the
    encoder's x -> parameters map, not the global flow nets.
    """

    def __init__(self, in_dim: int, out_dim: int, n_points: int | None = None, dtype=None, device=None,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.in_dim, self.out_dim, self.n_points = in_dim, out_dim, n_points
        lead = () if n_points is None else (n_points,)
        bound = 1.0 / math.sqrt(in_dim)
        kw = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.empty(*lead, out_dim, in_dim, **kw).uniform_(-bound, bound,
                                                                                       generator=generator))
        self.bias = nn.Parameter(torch.empty(*lead, out_dim, **kw).uniform_(-bound, bound, generator=generator))

    def forward(self, x: Tensor) -> Tensor:
        return self._affine(x, self.weight)

    def _affine(self, x: Tensor, weight: Tensor) -> Tensor:
        if self.n_points is None:
            return F.linear(x, weight, self.bias)
        if x.dim() != 3 or x.shape[1] != self.n_points:
            raise ValueError(f"a per-point layer of {self.n_points} points takes input [k, {self.n_points}, "
                             f"{self.in_dim}], got {list(x.shape)}")
        # [n, k, in] @ [n, in, out] + [n, 1, out] -> [n, k, out] -> [k, n, out]
        return torch.baddbmm(self.bias.unsqueeze(1), x.transpose(0, 1), weight.transpose(1, 2)).transpose(0, 1)

    def extra_repr(self) -> str:
        per = "" if self.n_points is None else f", n_points={self.n_points}"
        return f"in={self.in_dim}, out={self.out_dim}{per}"


def _hidden_list(hidden: int | Sequence[int]) -> list[int]:
    return [int(hidden)] if isinstance(hidden, int) else [int(h) for h in hidden]


class SmallMLP(nn.Sequential):
    """in -> hidden... -> out with ``act`` between layers, from ``Dense`` layers (shared or per point).

    The output layer starts small (its weight scaled by ``init_scale``) with bias ``out_bias`` (default 0), so the
    net starts close to the constant ``out_bias`` but every weight receives gradient from the first step.
    """

    def __init__(self, in_dim: int, hidden: int | Sequence[int], out_dim: int, act: str = "tanh",
                 n_points: int | None = None, init_scale: float = 1e-2, out_bias: Tensor | None = None,
                 dtype=None, device=None, generator: torch.Generator | None = None):
        dims, layers = [in_dim, *_hidden_list(hidden)], []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [Dense(a, b, n_points, dtype, device, generator), activation(act)()]
        out = Dense(dims[-1], out_dim, n_points, dtype, device, generator)
        with torch.no_grad():
            out.weight.mul_(init_scale)
            if out_bias is None:
                out.bias.zero_()
            else:
                out.bias.copy_(out_bias)
        layers.append(out)
        super().__init__(*layers)


# --- flow and reverse model ---------------------------------------------------------------------------------------
class CouplingFlow(nn.Module):
    """T coupling steps between z ``[k, B, Z]`` and v ``[k, B, V]``; ``forward(z0, v0) -> (zT, vT, logdet [k, B])``.

    Step t: (a, m) = f_t(z), v <- v * s(a) + m; then (b, m') = g_t(v), z <- z * s(b) + m'. f_t: z -> [gate, shift]
    (2V outputs), g_t: v -> [gate, shift] (2Z), each an MLP with ``hidden`` units. Initialisation: output weights
    scaled by ``init_scale`` (small, not zero), gate bias ``gate_bias``, shift bias 0, so every step starts as
    z -> s(gate_bias) z, v -> s(gate_bias) v, nearly exactly: with the default 2.0 each gate is 0.88 with slope
    s' = 0.10 (a bias of 5 would make the step closer to the identity but the gates ~15x slower to learn).
    ``log_scale_at_init`` = T log s(gate_bias) is the log factor by which z and v are scaled at initialisation.

    ``n_points`` = None: shared nets; an int: per-point nets (input rows ``[k, n_points, .]``).
    """

    def __init__(self, z_dim: int, v_dim: int | None = None, hidden: int | Sequence[int] = 100, steps: int = 2,
                 activation: str = "tanh", n_points: int | None = None, gate_bias: float = 2.0,
                 init_scale: float = 1e-2, dtype=None, device=None, generator: torch.Generator | None = None):
        super().__init__()
        v_dim = z_dim if v_dim is None else int(v_dim)
        if steps < 1 or z_dim < 1 or v_dim < 1:
            raise ValueError(f"CouplingFlow needs steps, z_dim, v_dim >= 1, got {steps}, {z_dim}, {v_dim}")
        self.z_dim, self.v_dim, self.steps, self.n_points = z_dim, v_dim, steps, n_points
        self.hidden, self.activation, self.gate_bias, self.init_scale = hidden, activation, gate_bias, init_scale

        def net(i, o):
            lead = () if n_points is None else (n_points,)
            bias = torch.cat([torch.full((o,), float(gate_bias), dtype=torch.float64),
                              torch.zeros(o, dtype=torch.float64)]).expand(*lead, 2 * o)
            return SmallMLP(i, hidden, 2 * o, activation, n_points, init_scale, bias, dtype, device, generator)

        self.z_to_v = nn.ModuleList([net(z_dim, v_dim) for _ in range(steps)])  # a_t, m_t
        self.v_to_z = nn.ModuleList([net(v_dim, z_dim) for _ in range(steps)])  # b_t, m'_t

    @property
    def log_scale_at_init(self) -> float:
        return self.steps * float(F.logsigmoid(torch.tensor(float(self.gate_bias), dtype=torch.float64)))

    def forward(self, z: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logdet = z.new_zeros(z.shape[:-1])
        for f, g in zip(self.z_to_v, self.v_to_z):
            a, m = f(z).chunk(2, dim=-1)
            v = v * torch.sigmoid(a) + m
            b, m2 = g(v).chunk(2, dim=-1)
            z = z * torch.sigmoid(b) + m2
            logdet = logdet + F.logsigmoid(a).sum(-1) + F.logsigmoid(b).sum(-1)
        return z, v, logdet

    def inverse(self, z: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(z_T, v_T) -> (z_0, v_0, log|det J| of the forward map ``[k, B]``): each step undone in reverse order,
        z <- (z - m'_t(v)) / s(b_t(v)), then v <- (v - m_t(z)) / s(a_t(z))."""
        logdet = z.new_zeros(z.shape[:-1])
        for f, g in zip(reversed(self.z_to_v), reversed(self.v_to_z)):
            b, m2 = g(v).chunk(2, dim=-1)
            z = (z - m2) / torch.sigmoid(b)
            a, m = f(z).chunk(2, dim=-1)
            v = (v - m) / torch.sigmoid(a)
            logdet = logdet + F.logsigmoid(a).sum(-1) + F.logsigmoid(b).sum(-1)
        return z, v, logdet


class _Inverse(nn.Module):
    """``forward`` = ``flow.inverse`` (so ``torch.func.functional_call`` can run the inverse with other weights)."""

    def __init__(self, flow: CouplingFlow):
        super().__init__()
        self.flow = flow

    def forward(self, z: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.flow.inverse(z, v)


class GaussianReverse(nn.Module):
    """r(v | x, z) = N(v; mean(z, c), diag exp(logvar(z, c))) from an MLP of [z, c], c ``[B, C]`` a context vector of x
    (``context_dim`` = C; 0: r(v | z)); ``log_prob(v [k,B,V], z [k,B,Z], c [B,C] | None) -> [k,B]``.

    Starts near the constant N(0, exp(``logvar_bias``)) (output weights scaled by ``init_scale``).
    """

    def __init__(self, z_dim: int, v_dim: int | None = None, hidden: int | Sequence[int] = 100,
                 activation: str = "tanh", n_points: int | None = None, init_scale: float = 1e-2,
                 logvar_bias: float = 0.0, dtype=None, device=None, context_dim: int = 0,
                 generator: torch.Generator | None = None):
        super().__init__()
        v_dim = z_dim if v_dim is None else int(v_dim)
        self.z_dim, self.v_dim, self.n_points, self.context_dim = z_dim, v_dim, n_points, int(context_dim)
        lead = () if n_points is None else (n_points,)
        bias = torch.cat([torch.zeros(v_dim, dtype=torch.float64),
                          torch.full((v_dim,), float(logvar_bias), dtype=torch.float64)]).expand(*lead, 2 * v_dim)
        self.net = SmallMLP(z_dim + self.context_dim, hidden, 2 * v_dim, activation, n_points, init_scale, bias,
                            dtype, device, generator)

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.context_dim:
            if context is None:
                raise ValueError(f"this reverse model r(v | x, z) needs the context c(x) [B, {self.context_dim}]")
            z = torch.cat([z, context.expand(*z.shape[:-1], self.context_dim)], dim=-1)
        mean, logvar = self.net(z).chunk(2, dim=-1)
        return mean, logvar

    def log_prob(self, v: Tensor, z: Tensor, context: Tensor | None = None) -> Tensor:
        mean, logvar = self(z, context)
        return -0.5 * ((v - mean).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


# --- the variational family ---------------------------------------------------------------------------------------
@dataclass
class AuxFlowPosterior:
    """q~(z_T, v_T) for a batch: base ``mu_z``, ``logvar_z`` ``[B, Z]``, ``mu_v``, ``logvar_v`` ``[B, V]``, the
    ``flow`` (``CouplingFlow``, shared or per point), the ``reverse`` model r(v | x, z) and its ``context`` c(x)
    ``[B, C]`` (None for an r of z alone).

    Same interface as ``DiagGaussian`` where the bound needs it: ``rsample_with_log_prob(k, generator)`` returns
    z_T ``[k, B, Z]`` and log q~ ``[k, B]`` (the auxiliary-variable term used in place of log q(z)). There is no
    ``logvar`` and no closed-form ``log_prob(z)`` / KL: the marginal q(z_T) is intractable.
    """

    mu_z: Tensor
    logvar_z: Tensor
    mu_v: Tensor
    logvar_v: Tensor
    flow: CouplingFlow
    reverse: GaussianReverse
    context: Tensor | None = None
    family: ClassVar[str] = "flow"
    capabilities: ClassVar[Capabilities] = Capabilities(path_derivative=True, flow=True)

    @property
    def z_dim(self) -> int:
        return self.mu_z.shape[-1]

    @property
    def v_dim(self) -> int:
        return self.mu_v.shape[-1]

    @property
    def mu(self) -> Tensor:
        """A point estimate of z ``[B, Z]`` for reconstructions: the flow applied to the base means
        (z_0 = mu_z, v_0 = mu_v). At initialisation this is s(gate_bias)^T mu_z (= the given Gaussian's mean for a
        ``LocalFlow`` initialised from one)."""
        z, _, _ = self.flow(self.mu_z.unsqueeze(0), self.mu_v.unsqueeze(0))
        return z[0]

    def sample_noise(self, k: int, generator: torch.Generator | None = None) -> Tensor:
        """Base noise (eps_z, eps_v) ~ N(0, I), concatenated: ``[k, B, Z + V]``."""
        shape = (k, self.mu_z.shape[0], self.z_dim + self.v_dim)
        return noise.randn(shape, self.mu_z, generator)

    def transform(self, eps: Tensor, return_aux: bool = False):
        """Push base noise ``[k, B, Z + V]`` through: (z_T ``[k, B, Z]``, log q~ ``[k, B]``) (and v_T, log|det|
        ``[k, B]``, log r ``[k, B]`` with ``return_aux``). Fixed noise gives common random numbers."""
        ez, ev = eps.split([self.z_dim, self.v_dim], dim=-1)
        z0 = self.mu_z + torch.exp(0.5 * self.logvar_z) * ez
        v0 = self.mu_v + torch.exp(0.5 * self.logvar_v) * ev
        log_q0 = -0.5 * ((ez.pow(2) + self.logvar_z + LOG_2PI).sum(-1) + (ev.pow(2) + self.logvar_v + LOG_2PI).sum(-1))
        z, v, logdet = self.flow(z0, v0)
        log_r = self.reverse.log_prob(v, z, self.context)
        log_q = log_q0 - logdet - log_r
        if return_aux:
            return z, log_q, {"v": v, "logdet": logdet, "log_r": log_r, "log_q0": log_q0}
        return z, log_q

    def rsample_with_log_prob(self, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """z_T ``[k, B, Z]`` (reparameterised) and log q~ ``[k, B]``."""
        return self.transform(self.sample_noise(k, generator))

    def rsample_path_derivative(self, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """z_T ``[k, B, Z]`` and log q~ ``[k, B]`` whose gradient w.r.t. q's own parameters is the path derivative
        only ("sticking the landing", Roeder et al. 2017): the joint density q(z_T, v_T) is evaluated with stopped
        base and flow parameters at the live sample, by inverting the flow,

            log q_stop(z_T, v_T) = log q0_stop(flow_stop^{-1}(z_T, v_T)) - log|det J_stop|,

        while log r(v_T | z_T) keeps its full gradient (r sits on the model side of the auxiliary bound). Same value
        as ``rsample_with_log_prob`` (up to rounding of the inversion); the dropped score term has zero mean, so
        the gradient stays unbiased and vanishes where q~ matches p(z | x) r(v | z).
        """
        eps = self.sample_noise(k, generator)
        ez, ev = eps.split([self.z_dim, self.v_dim], dim=-1)
        z0 = self.mu_z + torch.exp(0.5 * self.logvar_z) * ez
        v0 = self.mu_v + torch.exp(0.5 * self.logvar_v) * ev
        z, v, _ = self.flow(z0, v0)
        stopped = {f"flow.{n}": p.detach() for n, p in self.flow.named_parameters()}
        z0s, v0s, logdet = torch.func.functional_call(_Inverse(self.flow), stopped, (z, v))
        log_q0 = (DiagGaussian(self.mu_z.detach(), self.logvar_z.detach()).log_prob(z0s)
                  + DiagGaussian(self.mu_v.detach(), self.logvar_v.detach()).log_prob(v0s))
        return z, log_q0 - logdet - self.reverse.log_prob(v, z, self.context)

    def rsample(self, k: int = 1, generator: torch.Generator | None = None) -> Tensor:
        return self.rsample_with_log_prob(k, generator)[0]

    def log_prob(self, z: Tensor) -> Tensor:
        raise NotImplementedError("the flow posterior's marginal q(z_T) has no closed form; use "
                                  "rsample_with_log_prob (log q~ of the auxiliary-variable bound) instead")

    # --- q* in the flow family (amortlab.evaluation.gaps) ---------------------------------------------------------
    def local_copy(self) -> LocalFlow:
        """A per-point copy starting at exactly this q (``LocalFlow.from_posterior``)."""
        return LocalFlow.from_posterior(self)

    def local_at(self, n: int, init_mu: Tensor | None = None, init_logvar: Tensor | None = None,
                 hidden: int | Sequence[int] | None = None, steps: int | None = None, dtype=None, device=None,
                 generator: torch.Generator | None = None) -> LocalFlow:
        """Per-point flows of this flow's shape (``hidden`` / ``steps`` overridable) starting near
        N(init_mu, exp(init_logvar)) (``LocalFlow``)."""
        f = self.flow
        return LocalFlow(n, f.z_dim, f.v_dim, f.hidden if hidden is None else hidden, f.steps if steps is None
                         else steps, init_mu, init_logvar, dtype=dtype, device=device, generator=generator)


# --- per-datapoint families for q* ----------------------------------------------------------------------------------
def _init_base(n: int, z_dim: int, init_mu: Tensor | None, init_logvar: Tensor | None, dtype=None,
               device=None) -> tuple[Tensor, Tensor]:
    ref = init_mu if init_mu is not None else init_logvar
    kw = {"dtype": dtype or (ref.dtype if ref is not None else None),
          "device": device or (ref.device if ref is not None else None)}
    mu = torch.zeros(n, z_dim, **kw) if init_mu is None else init_mu.detach().to(**kw, copy=True)
    logvar = torch.zeros(n, z_dim, **kw) if init_logvar is None else init_logvar.detach().to(**kw, copy=True)
    for name, t in (("init_mu", mu), ("init_logvar", logvar)):
        if tuple(t.shape) != (n, z_dim):
            raise ValueError(f"{name} must have shape [{n}, {z_dim}], got {list(t.shape)}")
    return mu, logvar


class LocalGaussian(nn.Module):
    """Per-datapoint diagonal Gaussians: ``mu``, ``logvar`` ``[n_points, Z]``; ``forward() -> DiagGaussian``.

    Starts at the prior N(0, I), or at ``init_mu`` / ``init_logvar`` (e.g. the encoder's q). Parameters are made
    with ``dtype`` / ``device``, else those of ``init_mu`` (or ``init_logvar``), else the defaults.
    """

    family = "gaussian"

    def __init__(self, n_points: int, z_dim: int, init_mu: Tensor | None = None, init_logvar: Tensor | None = None,
                 dtype=None, device=None):
        super().__init__()
        self.n_points, self.z_dim = n_points, z_dim
        mu, logvar = _init_base(n_points, z_dim, init_mu, init_logvar, dtype, device)
        self.mu = nn.Parameter(mu)
        self.logvar = nn.Parameter(logvar)

    def forward(self) -> DiagGaussian:
        return DiagGaussian(self.mu, self.logvar)


class LocalFlow(nn.Module):
    """Per-datapoint auxiliary coupling flows; ``forward() -> AuxFlowPosterior`` for the ``n_points`` points.

    Every parameter has a leading ``n_points`` dimension: the base (``mu_z``, ``logvar_z`` ``[n, Z]``, ``mu_v``,
    ``logvar_v`` ``[n, V]``) and every weight of the flow and reverse nets (``Dense`` per-point layers), so one Adam
    over ``parameters()`` on the sum of the points' bounds optimises each point on its own bound.

    Initialisation (``init_scale`` -> 0 makes it exact): the flow starts as z -> c z, v -> c v with
    c = s(gate_bias)^steps, r(v | z) = N(0, c^2), v_0 ~ N(0, I), and the z base is N(init_mu / c, init_logvar /c^2)
    (default init_mu = 0, init_logvar = 0), so q~ starts at N(init_mu, exp(init_logvar)) — the prior, or the
    encoder's Gaussian — up to the small random output weights (O(init_scale) in each gate and shift).
    """

    family = "flow"

    def __init__(self, n_points: int, z_dim: int, v_dim: int | None = None,
                 hidden: int | Sequence[int] = DEFAULT_FLOW_HIDDEN, steps: int = DEFAULT_FLOW_STEPS,
                 init_mu: Tensor | None = None, init_logvar: Tensor | None = None,
                 activation: str = "tanh", gate_bias: float = 2.0, init_scale: float = 1e-2, dtype=None,
                 device=None, context: Tensor | None = None, generator: torch.Generator | None = None):
        super().__init__()
        v_dim = z_dim if v_dim is None else int(v_dim)
        self.n_points, self.z_dim, self.v_dim = n_points, z_dim, v_dim
        mu, logvar = _init_base(n_points, z_dim, init_mu, init_logvar, dtype, device)
        kw = {"dtype": mu.dtype, "device": mu.device}
        self.flow = CouplingFlow(z_dim, v_dim, hidden, steps, activation, n_points, gate_bias, init_scale, **kw,
                                 generator=generator)
        log_c = self.flow.log_scale_at_init
        # a fixed per-point input of r (the amortized r's context c(x), see ``from_posterior``); not a parameter
        self.register_buffer("context", None if context is None else context.detach().to(**kw, copy=True))
        self.reverse = GaussianReverse(z_dim, v_dim, hidden, activation, n_points, init_scale, 2 * log_c, **kw,
                                       context_dim=0 if context is None else context.shape[-1], generator=generator)
        self.mu_z = nn.Parameter(mu * math.exp(-log_c))
        self.logvar_z = nn.Parameter(logvar - 2 * log_c)
        self.mu_v = nn.Parameter(torch.zeros(n_points, v_dim, **kw))
        self.logvar_v = nn.Parameter(torch.zeros(n_points, v_dim, **kw))

    @classmethod
    def from_posterior(cls, q: AuxFlowPosterior) -> LocalFlow:
        """A per-point copy of an amortized flow posterior: each point starts from its own base parameters, a copy
        of the shared flow and reverse nets, and its own context c(x) as r's fixed input (the q* flow initialised at
        the encoder's q: the same family, the same q~ at the start)."""
        f = q.flow
        if f.n_points is not None:
            raise ValueError("from_posterior takes a posterior with shared (amortized) flow nets")
        n = q.mu_z.shape[0]
        local = cls(n, f.z_dim, f.v_dim, f.hidden, f.steps, init_mu=q.mu_z.detach(), activation=f.activation,
                    gate_bias=f.gate_bias, init_scale=f.init_scale, context=q.context)
        with torch.no_grad():
            for dst, src in ((local.flow, f), (local.reverse, q.reverse)):
                for (name, p), (name2, s) in zip(dst.named_parameters(), src.named_parameters(), strict=True):
                    assert name == name2
                    p.copy_(s.detach().expand_as(p))
            for name in ("mu_z", "logvar_z", "mu_v", "logvar_v"):
                getattr(local, name).copy_(getattr(q, name).detach())
        return local

    def forward(self) -> AuxFlowPosterior:
        return AuxFlowPosterior(self.mu_z, self.logvar_z, self.mu_v, self.logvar_v, self.flow, self.reverse,
                                self.context)

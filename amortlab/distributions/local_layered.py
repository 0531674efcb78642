"""Per-datapoint families of a layered q (``LayeredGaussian``) for q* (``amortlab.evaluation.gaps``, family "layered").

Each family holds parameters with a leading ``n_points`` dimension B (one Adam over ``parameters()`` optimises every
point on its own bound), starts at exactly the encoder's q of every point (same draws for the same noise, same
log q), so L[q*] >= L[q] up to Monte Carlo error, and returns a ``PathLayeredGaussian``: the layered q plus the path
derivative (Roeder et al. 2017) that ``qstar.optimize_local`` uses.

``LocalLayered`` (a q drawn in ``order``, each layer given the one drawn before it; Burda et al.'s bottom-up
q(z_1 | x) q(z_2 | z_1)): with o_0, o_1, ... the sampling order and (mu_l(z_p), logvar_l(z_p)) the encoder's own
conditional of layer l = o_i given the layer p = o_{i-1} drawn before it,

    q*(z_{o_0}) = N(m, diag exp(s))                                  m, s ``[B, D_{o_0}]``, free per point
    q*(z_l | z_p) = N(g_l * mu_l(z_p) + a_l + C_l z_p, diag exp(h_l * logvar_l(z_p) + d_l))
                                            g_l, h_l, a_l, d_l ``[B, D_l]``, C_l ``[B, D_l, D_p]``, per point

i.e. the encoder's conditional network, shared, with per-point scales of its outputs and a per-point
linear-Gaussian term. It contains the encoder's q of every point (m, s = the encoder's q(z_{o_0} | x), g = h = 1,
a = d = C = 0; its start ``LocalLayered(q)``), every fully factorised Gaussian over all layers (g = h = 0, C = 0;
``LocalLayered(q, start=q*_FFG)`` starts there) and every per-point linear-Gaussian conditional. A per-point copy of
the whole conditional network would contain more (its q* could only be higher, so the amortization gap reported
with this family is a lower bound of that one too).

``LocalHeads`` (the ladder, Sønderby et al. 2016): the ladder's q of a point is its bottom-up estimates
(mu^_l, log sigma^2_l) of every layer combined top-down with the generative p(z_l | z_{l+1}) (``top_down``), so the
ladder's own family per point is free per-point estimates ``[B, D_l]`` per layer, started at the encoder's, combined
by the same ``top_down``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from amortlab.distributions.capabilities import Capabilities
from amortlab.distributions.gaussian import DiagGaussian
from amortlab.distributions.layered import LayeredGaussian


class PathLayeredGaussian(LayeredGaussian):
    """A ``LayeredGaussian`` (``live``) with the path derivative: ``stopped`` is the same q built from stopped
    (detached) per-point parameters, so ``rsample_path_derivative`` returns live draws z ``[k, B, Z]`` and
    log q_stop(z) ``[k, B]``, whose gradient w.r.t. the per-point parameters flows through z only."""

    capabilities: ClassVar[Capabilities] = Capabilities(local_params=True, log_prob=True, path_derivative=True)

    def __init__(self, live: LayeredGaussian, stopped: LayeredGaussian):
        super().__init__(live.dims, live.order, live.conditional, live.like)
        self.stopped = stopped

    def rsample_path_derivative(self, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        z = self.rsample(k, generator)
        return z, self.stopped.log_prob(z)


def _fresh(t: Tensor) -> Tensor:
    """A detached copy usable in autograd (an inference-mode tensor cannot be saved for backward)."""
    with torch.inference_mode(False):
        return t.detach().clone()


class LocalLayered(nn.Module):
    """The per-point layered family around the layered q ``q`` of B points (module docstring); ``forward()`` ->
    ``PathLayeredGaussian``. The encoder's conditionals of the layers after the first are ``q.conditional``
    (evaluated afresh on every draw, with the encoder's weights fixed: only the per-point parameters are optimised).
    Starts at q, or at the factorised Gaussian ``start`` (``[B, Z]`` over the layers in layer order, e.g. q*_FFG).
    """

    family = "layered"

    def __init__(self, q: LayeredGaussian, start: DiagGaussian | None = None):
        super().__init__()
        self.dims, self.order, self.base, self.like = q.dims, tuple(q.order), q.conditional, _fresh(q.like)
        first, n = self.order[0], self.like.shape[0]
        later = list(zip(self.order[1:], self.order[:-1]))  # (layer, the layer drawn before it)
        if start is None:
            with torch.no_grad():
                mu, logvar = q.conditional(first, {})
            scale, shift, logvar_shift = 1.0, {c: 0.0 for c, _ in later}, {c: 0.0 for c, _ in later}
        else:
            mus, logvars = start.mu.split(q.dims, -1), start.logvar.split(q.dims, -1)
            mu, logvar = mus[first], logvars[first]
            scale, shift, logvar_shift = 0.0, {c: mus[c] for c, _ in later}, {c: logvars[c] for c, _ in later}
        self.mu, self.logvar = nn.Parameter(_fresh(mu)), nn.Parameter(_fresh(logvar))
        kw = {"dtype": self.mu.dtype, "device": self.mu.device}

        def per_point(c: int, value) -> nn.Parameter:
            return nn.Parameter(_fresh(torch.zeros(n, q.dims[c], **kw) + value))

        self.scale = nn.ParameterList([per_point(c, scale) for c, _ in later])
        self.logvar_scale = nn.ParameterList([per_point(c, scale) for c, _ in later])
        self.shift = nn.ParameterList([per_point(c, shift[c]) for c, _ in later])
        self.logvar_shift = nn.ParameterList([per_point(c, logvar_shift[c]) for c, _ in later])
        self.linear = nn.ParameterList([nn.Parameter(torch.zeros(n, q.dims[c], q.dims[p], **kw)) for c, p in later])

    def _q(self, stop: bool) -> LayeredGaussian:
        def s(t: Tensor) -> Tensor:
            return t.detach() if stop else t

        first, index = self.order[0], {layer: i for i, layer in enumerate(self.order)}

        def conditional(layer: int, done: dict) -> tuple[Tensor, Tensor]:
            if layer == first:
                return s(self.mu), s(self.logvar)
            i = index[layer] - 1
            parent = done[self.order[i]]  # [B, D_p] or [k, B, D_p]
            mu, logvar = self.base(layer, done)
            mu = s(self.scale[i]) * mu + s(self.shift[i]) + torch.einsum("bij,...bj->...bi", s(self.linear[i]), parent)
            return mu, s(self.logvar_scale[i]) * logvar + s(self.logvar_shift[i])

        return LayeredGaussian(self.dims, self.order, conditional, self.like)

    def forward(self) -> PathLayeredGaussian:
        return PathLayeredGaussian(self._q(False), self._q(True))


class LocalHeads(nn.Module):
    """The ladder's per-point family (module docstring): per-point estimates ``mu``, ``logvar`` ``[B, D_l]`` of every
    layer (started at ``heads``, the encoder's), ``forward()`` -> ``top_down(estimates, like)`` with the path
    derivative. ``top_down(heads: list[DiagGaussian], like [B, *]) -> LayeredGaussian`` is the method's own top-down
    combination (``LadderVAE.top_down``)."""

    family = "layered"

    def __init__(self, heads: Sequence[DiagGaussian], top_down: Callable[[list[DiagGaussian], Tensor], LayeredGaussian],
                 like: Tensor):
        super().__init__()
        self.top_down, self.like = top_down, _fresh(like)
        self.mu = nn.ParameterList([nn.Parameter(_fresh(h.mu)) for h in heads])
        self.logvar = nn.ParameterList([nn.Parameter(_fresh(h.logvar)) for h in heads])

    def _q(self, stop: bool) -> LayeredGaussian:
        heads = [DiagGaussian(m.detach(), lv.detach()) if stop else DiagGaussian(m, lv)
                 for m, lv in zip(self.mu, self.logvar)]
        return self.top_down(heads, self.like)

    def forward(self) -> PathLayeredGaussian:
        return PathLayeredGaussian(self._q(False), self._q(True))

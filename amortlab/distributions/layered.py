"""A structured Gaussian q over several stochastic layers: each layer Gaussian given the layers drawn before it.

    q(z_1..z_L | x) = prod_{l in order} N(z_l; mu_l(x, z_prev), diag exp(logvar_l(x, z_prev)))

``order`` is the sampling order: bottom-up (Burda et al.: q(z_1 | x) q(z_2 | z_1)) or top-down (the ladder,
Sønderby et al.: q(z_L | x) ... q(z_1 | z_2, x)). ``conditional(l, done)`` gives layer l's (mu, logvar) from the
layers already in ``done`` (a dict layer -> tensor; ``[B, D]`` point values or ``[k, B, D]`` samples).

Samples are concatenated in layer order, ``[k, B, sum_l D_l]`` (``GenerativeModel.split`` reads them). The noise of
all layers is one draw eps ``[k, B, Z]`` (the same stream as a flat Gaussian of that size) and
log q = sum_l -(eps_l^2 + logvar_l + log 2 pi)/2, exact.

E_q[z] (``mean_estimate``; the active-unit count): the first layer in ``order`` conditions on x only, so its mean is
mu exactly (bottom-up: z_1; the ladder: z_L). A later layer l has E_q[z_l] = E_q[mu_l(z_prev)] (z_prev: the layers
drawn before it), estimated by the mean of mu_l over S joint draws of z_prev (Rao-Blackwellised: its variance
Var_q(mu_l) / S is at most the plain sample mean's Var_q(z_l) / S).

Per-point refinement (SVI, SA-VAE, IW-SVI, iterative ``init=encoder``, q*_FFG) works on a fully factorised Gaussian
over all layers; ``pack()`` gives its lambda = (mu, log sigma^2) ``[B, 2Z]`` at this q's point estimate (each layer's
Gaussian with the layers before it at their means) and ``unpack`` is ``DiagGaussian``'s.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from amortlab.distributions import noise
from amortlab.distributions.capabilities import Capabilities
from amortlab.distributions.gaussian import DiagGaussian
from amortlab.objectives import LOG_2PI

Conditional = Callable[[int, dict], tuple[Tensor, Tensor]]


class LayeredGaussian:
    """q of the module docstring.

    Args:
        dims: (D_1, ..., D_L) in layer order.
        order: the layers (0-based) in sampling order.
        conditional: ``conditional(l, done) -> (mu, logvar)`` ``[..., B, D_l]``.
        like: a ``[B, *]`` tensor giving the batch size, dtype and device of the noise.
    """

    family: ClassVar[str] = "layered_gaussian"
    capabilities: ClassVar[Capabilities] = Capabilities(local_params=True, log_prob=True, mean_estimate=True)
    unpack = DiagGaussian.unpack  # lambda of the factorised Gaussian over all layers -> that DiagGaussian

    def __init__(self, dims: Sequence[int], order: Sequence[int], conditional: Conditional, like: Tensor):
        self.dims, self.order, self.conditional, self.like = tuple(dims), tuple(order), conditional, like
        self._point: tuple[Tensor, Tensor] | None = None

    def _layers(self, z: Tensor) -> dict[int, Tensor]:
        return dict(enumerate(z.split(self.dims, dim=-1)))

    def sample_noise(self, k: int, generator: torch.Generator | None = None) -> Tensor:
        """eps ~ N(0, I) ``[k, B, Z]``."""
        return noise.randn((k, self.like.shape[0], sum(self.dims)), self.like, generator)

    def rsample_with_log_prob(self, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """z ``[k, B, Z]`` drawn layer by layer in ``order`` and log q(z | x) ``[k, B]``."""
        eps = self._layers(self.sample_noise(k, generator))
        done: dict[int, Tensor] = {}
        log_q = 0.0
        for layer in self.order:
            mu, logvar = self.conditional(layer, done)
            done[layer] = mu + torch.exp(0.5 * logvar) * eps[layer]
            log_q = log_q - 0.5 * (eps[layer].pow(2) + logvar + LOG_2PI).sum(-1)
        return torch.cat([done[i] for i in range(len(self.dims))], dim=-1), log_q

    def rsample(self, k: int = 1, generator: torch.Generator | None = None) -> Tensor:
        return self.rsample_with_log_prob(k, generator)[0]

    def mean_estimate(self, samples: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(m, v) ``[B, Z]``: m estimates E_q[z] without bias, v = Var(m) (unbiased; 0 where m is exact), from
        ``samples`` = S >= 2 joint draws (module docstring). A layer whose (mu, logvar) do not depend on a draw
        (``[B, D]``, not ``[S, B, D]``) has m = mu, v = 0; any other has m = (1/S) sum_s mu_l(z_prev^s) and
        v = (sample variance of mu_l(z_prev^s)) / S."""
        if samples < 2:
            raise ValueError(f"mean_estimate needs samples >= 2 (the variance of the estimate), got {samples}")
        with torch.no_grad():
            eps = self._layers(self.sample_noise(samples, generator))
            done: dict[int, Tensor] = {}
            means: dict[int, Tensor] = {}
            variances: dict[int, Tensor] = {}
            for layer in self.order:
                mu, logvar = self.conditional(layer, done)
                if mu.dim() == eps[layer].dim() - 1:  # depends on x only: exact
                    means[layer], variances[layer] = mu, torch.zeros_like(mu)
                else:
                    mu_s = mu.expand_as(eps[layer])
                    means[layer], variances[layer] = mu_s.mean(0), mu_s.var(0) / samples
                done[layer] = mu + torch.exp(0.5 * logvar) * eps[layer]
            n = range(len(self.dims))
            return torch.cat([means[i] for i in n], -1), torch.cat([variances[i] for i in n], -1)

    def log_prob(self, z: Tensor) -> Tensor:
        """log q(z | x) ``[k, B]`` of given samples ``[k, B, Z]``."""
        zs = self._layers(z)
        out = 0.0
        for layer in self.order:
            mu, logvar = self.conditional(layer, zs)
            out = out - 0.5 * ((zs[layer] - mu).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)
        return out

    def _point_estimate(self) -> tuple[Tensor, Tensor]:
        if self._point is None:
            done: dict[int, Tensor] = {}
            logvars: dict[int, Tensor] = {}
            for layer in self.order:
                done[layer], logvars[layer] = self.conditional(layer, done)
            n = range(len(self.dims))
            self._point = torch.cat([done[i] for i in n], -1), torch.cat([logvars[i] for i in n], -1)
        return self._point

    @property
    def mu(self) -> Tensor:
        """Point estimate ``[B, Z]``: each layer's mean with the layers before it at their means."""
        return self._point_estimate()[0]

    def pack(self) -> Tensor:
        """lambda = (mu, log sigma^2) ``[B, 2Z]`` of the factorised Gaussian at the point estimate."""
        return torch.cat(self._point_estimate(), dim=-1)

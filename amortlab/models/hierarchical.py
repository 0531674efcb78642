"""L stochastic layers (Burda et al. 2016's two-layer model; Sønderby et al. 2016): a Gaussian top-down chain.

    p(z_L) = N(0, I),   p(z_l | z_{l+1}) = N(mu_l(z_{l+1}), diag exp(logvar_l(z_{l+1}))),   p(x | z_1) = decoder,
    log p(x, z) = log N(z_L; 0, I) + sum_{l<L} log p(z_l | z_{l+1}) + log p(x | z_1).

Layer 1 is nearest the data. A latent is passed either as one tensor per layer or as their concatenation
``[k, B, D_1 + ... + D_L]`` in layer order (the layout of a fully factorised q over all layers, whose
lambda = (mu, log sigma^2) ``[B, 2 sum D_l]`` the per-point schemes refine); ``split`` turns either into the tuple.

Reparameterisation by the prior (``from_noise``): with eps ~ N(0, I_Z), z_L = eps_L and
z_l = mu_l(z_{l+1}) + sigma_l(z_{l+1}) eps_l is a draw from p(z) (AIS anneals in eps, where the prior is N(0, I)).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from amortlab.distributions import DiagGaussian
from amortlab.errors import AmortlabError
from amortlab.models.base import GenerativeModel, Latent
from amortlab.objectives import std_normal_log_prob


class HierarchicalModel(GenerativeModel):
    """p(x, z_1..z_L) of the module docstring.

    Args:
        decoder: p(x | z_1): ``log_prob(x [B, X], z_1 [k, B, D_1]) -> [k, B]``, ``mean``, ``z_dim`` = D_1,
            ``init_output_bias`` (as for ``FlatLatentModel``).
        conditionals: L - 1 nets, entry l (0-based) maps z_{l+2} ``[..., D_{l+2}]`` to the ``DiagGaussian``
            p(z_{l+1} | z_{l+2}) (e.g. ``GaussianEncoder(x_dim=D_{l+2}, z_dim=D_{l+1})``).
        latent_dims: (D_1, ..., D_L).
    """

    def __init__(self, decoder: nn.Module, conditionals: Sequence[nn.Module], latent_dims: Sequence[int]):
        super().__init__()
        dims = tuple(int(d) for d in latent_dims)
        problems = []
        if len(dims) < 2:
            problems.append(f"latent_dims={list(dims)} has one layer (use FlatLatentModel, model=burda_mlp)")
        if len(conditionals) != len(dims) - 1:
            problems.append(f"{len(conditionals)} conditionals for {len(dims)} layers (needs {len(dims) - 1})")
        if dims and int(decoder.z_dim) != dims[0]:
            problems.append(f"the decoder reads {decoder.z_dim} latent units, latent_dims[0]={dims[0]}")
        for i, c in enumerate(conditionals):
            if i + 1 < len(dims) and int(getattr(c, "z_dim", dims[i])) != dims[i]:
                problems.append(f"conditional {i} gives {c.z_dim} units for layer {i + 1} of {dims[i]}")
        if problems:
            raise AmortlabError("HierarchicalModel cannot be built: " + "; ".join(problems) + ". Fix "
                                "model.generative (see conf/model/burda_mlp2.yaml).")
        self.decoder = decoder
        self.conditionals = nn.ModuleList(conditionals)
        self.latent_dims = dims


    def prior_layer(self, layer: int, z_above: Tensor, frozen: bool = False) -> DiagGaussian:
        """p(z_l | z_{l+1}) for the 0-based ``layer`` < L - 1, parameters ``[..., D_l]`` (``frozen``: the
        conditional's parameters held constant, gradients reach z only)."""
        net = self.conditionals[layer]
        if frozen:
            return torch.func.functional_call(net, {n: p.detach() for n, p in net.named_parameters()}, (z_above,))
        return net(z_above)

    # --- the protocol -----------------------------------------------------------------------------------------
    def log_prior(self, z: Latent, frozen: bool = False) -> Tensor:
        zs = self.split(z)
        out = std_normal_log_prob(zs[-1])
        for layer in range(len(zs) - 1):
            out = out + self.prior_layer(layer, zs[layer + 1], frozen).log_prob(zs[layer])
        return out

    def forward(self, x: Tensor, z: Latent) -> Tensor:
        return self.decoder.log_prob(x, self.split(z)[0])

    def prior_residual(self, z: Latent) -> Tensor:
        """(z_l - mu_l(z_{l+1})) / sigma_l(z_{l+1}) per layer (z_L itself at the top), concatenated ``[..., Z]``."""
        zs = self.split(z)
        out = []
        for layer in range(len(zs) - 1):
            p = self.prior_layer(layer, zs[layer + 1])
            out.append((zs[layer] - p.mu) * torch.exp(-0.5 * p.logvar))
        return torch.cat([*out, zs[-1]], dim=-1)

    def from_noise(self, eps: Tensor) -> Tensor:
        """z = T(eps) ``[..., Z]`` (concatenated), a draw from p(z) for eps ~ N(0, I) (module docstring)."""
        es = eps.split(self.latent_dims, dim=-1)
        zs = [es[-1]]
        for layer in reversed(range(len(es) - 1)):
            p = self.prior_layer(layer, zs[0])
            zs.insert(0, p.mu + torch.exp(0.5 * p.logvar) * es[layer])
        return torch.cat(zs, dim=-1)

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        p = next(self.decoder.parameters())
        return self.from_noise(torch.randn(n, self.z_dim, generator=generator, device=p.device, dtype=p.dtype))

    def mean(self, z: Latent) -> Tensor:
        return self.decoder.mean(self.split(z)[0])

    def init_output_bias(self, x_mean: Tensor) -> None:
        self.decoder.init_output_bias(x_mean)

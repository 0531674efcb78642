"""Inference networks over several stochastic layers.

``BottomUpEncoder``: Burda et al. 2016's two-layer encoder, q(z_1 | x) q(z_2 | z_1) ... drawn bottom-up; layer l's
net maps its input to (mu_l, log sigma^2_l), layer 1 reading x and layer l > 1 a sample of layer l-1.

``LadderEncoder``: the deterministic bottom-up path of the ladder VAE (Sønderby et al. 2016, ``inference=ladder``),

    d_0 = x,   d_l = MLP_l(d_{l-1}),   mu^_l = Linear(d_l),   sigma^2_l = softplus(Linear(d_l)),

with the same hidden sizes per layer as Burda's encoder (``hidden[l]``; d_l is MLP_l's last hidden layer, of size
``hidden[l][-1]``), so layer l+1 reads d_l, not layer l's estimate.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amortlab.activations import activation as activation_class
from amortlab.distributions import DiagGaussian
from amortlab.distributions.layered import LayeredGaussian
from amortlab.errors import AmortlabError
from amortlab.nets.mlp import MLP



def layer_dims(latent_dims: Sequence[int], hidden: Sequence[Sequence[int]]) -> list[int]:
    """(D_1, ..., D_L) as ints, refused unless ``hidden`` holds one list of hidden sizes per layer."""
    dims = [int(d) for d in latent_dims]
    if len(hidden) != len(dims):
        raise AmortlabError(f"model.encoder.hidden has {len(hidden)} lists for {len(dims)} layers "
                            f"(latent_dims={dims}); give one list of hidden sizes per layer.")
    return dims

class BottomUpEncoder(nn.Module):
    """x ``[B, X]`` -> q(z_1 | x) q(z_2 | z_1) ... (a ``LayeredGaussian``, drawn bottom-up).

    Args:
        x_dim: data dimension X.
        latent_dims: (D_1, ..., D_L), layer 1 nearest the data.
        hidden: hidden sizes of each layer's MLP (one list per layer; Burda et al.: [[200, 200], [100, 100]]).
        activation: of every hidden layer.
    """

    family = LayeredGaussian

    def __init__(self, x_dim: int, latent_dims: Sequence[int], hidden: Sequence[Sequence[int]],
                 activation: str = "tanh"):
        super().__init__()
        dims = layer_dims(latent_dims, hidden)
        self.latent_dims, self.z_dim = tuple(dims), sum(dims)
        ins = [int(x_dim), *dims[:-1]]
        self.nets = nn.ModuleList(MLP(i, list(h), 2 * d, activation) for i, h, d in zip(ins, hidden, dims))

    def layer(self, layer: int, inputs: Tensor) -> DiagGaussian:
        """Layer ``layer``'s Gaussian from its input (x for layer 0, a D_{l-1}-vector above)."""
        mu, logvar = self.nets[layer](inputs).chunk(2, dim=-1)
        return DiagGaussian(mu, logvar)

    def forward(self, x: Tensor) -> LayeredGaussian:
        first = self.layer(0, x)

        def conditional(layer: int, done: dict) -> tuple[Tensor, Tensor]:
            q = first if layer == 0 else self.layer(layer, done[layer - 1])
            return q.mu, q.logvar

        return LayeredGaussian(self.latent_dims, range(len(self.latent_dims)), conditional, x)


def log_softplus(a: Tensor) -> Tensor:
    """log softplus(a) = log log(1 + e^a), also where softplus(a) underflows (a < -20: a, error below 1e-9)."""
    return torch.where(a > -20, F.softplus(a.clamp(min=-20)).log(), a)


class LadderEncoder(nn.Module):
    """x ``[B, X]`` -> the bottom-up estimates (mu^_l, sigma^2_l) of every layer (module docstring), each a
    ``DiagGaussian`` ``[B, D_l]`` with logvar = log softplus(Linear(d_l)).

    Args:
        x_dim: data dimension X.
        latent_dims: (D_1, ..., D_L), layer 1 nearest the data.
        hidden: hidden sizes of each MLP_l (one list per layer; Burda et al.'s sizes: [[200, 200], [100, 100]], so
            d_1 has 200 units and d_2 100).
        activation: after every layer of each MLP_l (d_l included).

    Parameters by name: ``paths[l]`` (MLP_l: Linear, activation, ...), ``mean_heads[l]`` and ``var_heads[l]``
    (``nn.Linear`` from d_l to D_l).
    """

    def __init__(self, x_dim: int, latent_dims: Sequence[int], hidden: Sequence[Sequence[int]],
                 activation: str = "tanh"):
        super().__init__()
        dims = layer_dims(latent_dims, hidden)
        self.latent_dims, self.z_dim = tuple(dims), sum(dims)
        act = activation_class(activation)
        paths, widths, width = [], [], int(x_dim)
        for sizes in hidden:
            layers = []
            for h in sizes:
                layers += [nn.Linear(width, int(h)), act()]
                width = int(h)
            paths.append(nn.Sequential(*layers))
            widths.append(width)
        self.paths = nn.ModuleList(paths)
        self.mean_heads = nn.ModuleList(nn.Linear(w, d) for w, d in zip(widths, dims))
        self.var_heads = nn.ModuleList(nn.Linear(w, d) for w, d in zip(widths, dims))

    def bottom_up(self, x: Tensor) -> list[DiagGaussian]:
        """[(mu^_l, log sigma^2_l)] for l = 1..L, ``[B, D_l]`` each."""
        out, d = [], x
        for path, mean, var in zip(self.paths, self.mean_heads, self.var_heads):
            d = path(d)
            out.append(DiagGaussian(mean(d), log_softplus(var(d))))
        return out

    def forward(self, x: Tensor) -> list[DiagGaussian]:
        return self.bottom_up(x)

"""Inference network over several stochastic layers (Burda et al. 2016's two-layer encoder).

Layer l's net maps its input to (mu_l, log sigma^2_l): layer 1 reads x, layer l > 1 reads a D_{l-1}-vector from the
layer below. ``forward(x)`` is Burda et al.'s bottom-up q(z_1 | x) q(z_2 | z_1) ... (each net reads a sample of the
layer below); ``bottom_up(x)`` is the deterministic pass the ladder (``inference=ladder``) combines with the prior
(each net reads the layer below's mean), so both schemes train the same networks with the same parameter count.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from amortlab.distributions import DiagGaussian
from amortlab.distributions.layered import LayeredGaussian
from amortlab.errors import AmortlabError
from amortlab.nets.mlp import MLP


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
        dims = [int(d) for d in latent_dims]
        if len(hidden) != len(dims):
            raise AmortlabError(f"model.encoder.hidden has {len(hidden)} lists for {len(dims)} layers "
                                f"(latent_dims={dims}); give one list of hidden sizes per layer.")
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

    def bottom_up(self, x: Tensor) -> list[DiagGaussian]:
        """The deterministic pass: estimate l from x (l = 0) or from estimate l-1's mean, ``[B, D_l]`` each."""
        out = [self.layer(0, x)]
        for layer in range(1, len(self.latent_dims)):
            out.append(self.layer(layer, out[-1].mu))
        return out

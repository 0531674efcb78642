"""Top-down (ladder) inference over a hierarchy (Sønderby, Raiko, Maaløe, Sønderby & Winther 2016):
``inference=ladder``.

A deterministic bottom-up pass gives an estimate (mu^_l, sigma^2_l) of every layer (``BottomUpEncoder.bottom_up``);
q is then drawn top-down, the top layer from its estimate and every lower layer from the precision-weighted
combination of its estimate with the generative prior given the layer above:

    q(z_L | x) = N(mu^_L, sigma^_L^2),
    q(z_l | z_{l+1}, x) = N(mu_q, sigma_q^2),   sigma_q^-2 = sigma^_l^-2 + sigma_p^-2,
                          mu_q = (mu^_l sigma^_l^-2 + mu_p sigma_p^-2) sigma_q^2,
                          (mu_p, sigma_p^2) of p(z_l | z_{l+1}),

so q and p share the top-down networks (the prior's parameters receive gradient through q as well). With one layer
this is the amortized VAE. Everything else (the k-sample bound, regularizers, evaluation) is the base module's.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from amortlab.distributions import DiagGaussian
from amortlab.distributions.layered import LayeredGaussian
from amortlab.errors import AmortlabError
from amortlab.methods.base import ELBOModule


def precision_weighted(mu_a: Tensor, logvar_a: Tensor, mu_b: Tensor, logvar_b: Tensor) -> tuple[Tensor, Tensor]:
    """The product of N(mu_a, e^logvar_a) and N(mu_b, e^logvar_b), normalised: (mu, logvar), computed as
    logvar = -logaddexp(-logvar_a, -logvar_b) and mu = w mu_a + (1 - w) mu_b, w = sigmoid(logvar_b - logvar_a)."""
    w = torch.sigmoid(logvar_b - logvar_a)
    return w * mu_a + (1.0 - w) * mu_b, -torch.logaddexp(-logvar_a, -logvar_b)


class LadderVAE(ELBOModule):
    """Top-down inference; see the module docstring.

    Args:
        encoder: a ``BottomUpEncoder`` (its ``bottom_up`` pass gives the per-layer estimates).
    """

    method_name = "ladder"
    stackable = True  # per-row computation only, like the amortized VAE

    def __init__(self, encoder: nn.Module, decoder: nn.Module | None = None, **kwargs):
        super().__init__(decoder=decoder, **kwargs)
        if self.model.flat or not hasattr(encoder, "bottom_up") or not hasattr(self.model, "prior_layer"):
            raise AmortlabError(
                f"inference=ladder combines a bottom-up estimate of every stochastic layer with the generative prior "
                f"p(z_l | z_(l+1)); it needs a hierarchical model and its layered encoder (model=burda_mlp2), got a "
                f"model with {len(self.model.latent_dims)} layer(s) and a {type(encoder).__name__}. Use "
                f"model=burda_mlp2, or inference=amortized for a one-layer model (with one layer the ladder is the "
                f"VAE).")
        self.encoder = self.regularizer.wrap_encoder(encoder)

    @property
    def posterior_family(self) -> type:
        return LayeredGaussian

    def heads(self, x: Tensor) -> list[DiagGaussian]:
        """The bottom-up estimates (mu^_l, log sigma^2_l) of every layer, ``[B, D_l]`` each, in layer order."""
        return self.encoder.bottom_up(x)

    def top_down(self, heads: Sequence[DiagGaussian], like: Tensor) -> LayeredGaussian:
        """q drawn top-down from per-layer estimates ``heads`` (``[B, D_l]`` each, layer order; the encoder's, or any
        per-point values, e.g. q* in the ladder's own family) combined with p(z_l | z_{l+1}) (module docstring);
        ``like`` ``[B, *]`` gives the batch size, dtype and device of the noise."""
        top = len(heads) - 1

        def conditional(layer: int, done: dict) -> tuple[Tensor, Tensor]:
            if layer == top:
                return heads[top].mu, heads[top].logvar
            p = self.model.prior_layer(layer, done[layer + 1])
            return precision_weighted(heads[layer].mu, heads[layer].logvar, p.mu, p.logvar)

        return LayeredGaussian(self.model.latent_dims, range(top, -1, -1), conditional, like)

    def infer(self, x: Tensor) -> LayeredGaussian:
        return self.top_down(self.heads(x), x)

    def tags(self) -> list[str]:
        name = "ladder" if self.k_train == 1 else f"ladder_iwae{self.k_train}"
        return [name, *super().tags()]

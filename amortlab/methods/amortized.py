"""Amortized inference: q(z | x) = encoder(x). With k = 1 this is the VAE, with k > 1 the IWAE-k."""
from __future__ import annotations

from torch import Tensor, nn

from amortlab.distributions import DiagGaussian
from amortlab.methods.base import ELBOModule


class AmortizedVAE(ELBOModule):
    """VAE / IWAE-k: one encoder pass gives q; everything else is the base module."""

    method_name = "amortized"
    stackable = True  # N seeds train as one computation (amortlab.stack): q = encoder(x) has no per-method state

    def __init__(self, encoder: nn.Module, decoder: nn.Module | None = None, **kwargs):
        super().__init__(decoder=decoder, **kwargs)
        self.encoder = self.regularizer.wrap_encoder(encoder)

    def infer(self, x: Tensor) -> DiagGaussian:
        return self.encoder(x)

    def tags(self) -> list[str]:
        name = "vae" if self.k_train == 1 else f"iwae{self.k_train}"
        return [name, *super().tags()]

"""The encoder-regularizer seam.

A regularizer restricts the amortization family in one or both of two places:
- structurally, by rewriting the encoder's layers once at build time (``wrap_encoder``; e.g. weight normalisation);
- in the objective, by changing what the encoder sees when the training loss is formed (``training_loss``;
  e.g. denoising: the encoder reads x + eps while p(x, z) still scores the clean x).
The base class is the identity on both: the plain k-sample bound of the method.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from amortlab.methods.base import ELBOModule


class EncoderRegularizer:
    """No regularization (``encoder_regularizer=none``)."""

    name = "none"

    @property
    def strength(self) -> float | None:
        """The regularizer's strength parameter (sigma, H, ...) for tables and plots; None when it has none."""
        return None

    def wrap_encoder(self, encoder: nn.Module) -> nn.Module:
        return encoder

    def training_loss(self, module: "ELBOModule", x: Tensor, k: int) -> Tensor:
        """Scalar loss = -(1/B) sum_b L_k(x_b), the encoder reading the clean x."""
        return -module.bound(x, k).mean()

    def tags(self) -> list[str]:
        return [f"reg:{self.name}"]

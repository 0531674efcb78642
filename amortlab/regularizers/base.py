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

    def training_loss(self, module: ELBOModule, x: Tensor, k: int) -> Tensor:
        """Loss = -(1/B) sum_b L_k(x_b), the encoder reading the clean x (a scalar; ``[N]`` for N stacked models,
        ``ELBOModule.batch_mean``)."""
        return -module.batch_mean(module.bound(x, k))

    def tags(self) -> list[str]:
        return [f"reg:{self.name}"]

    def mixed_input_loss(self, module: ELBOModule, x: Tensor, k: int, alpha: float, x_enc) -> Tensor:
        """alpha * -L_k(x; q = f(x_enc(x))) + (1 - alpha) * -L_k(x; q = f(x)), batch-averaged.

        For regularizers that change only what the encoder reads; p(x, z) always scores the clean x. The clean term
        is formed only when alpha < 1, the perturbed one only when alpha > 0 (alpha = 0 is the plain loss exactly).
        """
        if alpha == 0.0:
            return EncoderRegularizer.training_loss(self, module, x, k)
        perturbed = -module.batch_mean(module.bound(x, k, x_enc=x_enc(x)))
        if alpha == 1.0:
            return perturbed
        return alpha * perturbed + (1.0 - alpha) * EncoderRegularizer.training_loss(self, module, x, k)

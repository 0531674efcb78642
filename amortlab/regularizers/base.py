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

from amortlab.errors import AmortlabError

if TYPE_CHECKING:
    from amortlab.methods.base import ELBOModule


class EncoderRegularizer:
    """No regularization (``encoder_regularizer=none``)."""

    name = "none"
    stackable_settings: tuple[str, ...] = ()  # settings stacked models may differ in (stack.key=encoder_regularizer.X)

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

    def stack_setting(self, module: nn.Module, name: str, values: Tensor) -> None:
        """Make the stacked ``module`` (N models, ``amortlab.stack``; this is its own copy of the regularizer) use
        ``values[i]`` ``[N]`` of the setting ``name`` (one of ``stackable_settings``) for model i."""
        if name not in self.stackable_settings:
            raise AmortlabError(f"encoder_regularizer={self.name} has no setting '{name}' that stacked models can "
                                f"differ in (it has: {', '.join(self.stackable_settings) or 'none'}).")
        self.set_per_model(module, name, values)

    def set_per_model(self, module: nn.Module, name: str, values: Tensor) -> None:
        """``stack_setting`` for a name in ``stackable_settings`` (each regularizer that has some implements it)."""
        raise NotImplementedError

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


def per_model_strength(values: Tensor, what: str) -> float | Tensor:
    """A regularizer strength ``[N]`` for N stacked models: 0.0 when all are 0 (the plain loss, as each single run
    takes it), the tensor when none is. A mix is refused: a zero strength's single run skips the perturbed term
    (drawing no noise for it), which a stacked step that forms it for the others cannot reproduce exactly."""
    zero = values == 0
    if bool(zero.all()):
        return 0.0
    if bool(zero.any()):
        raise AmortlabError(f"stack.values for {what} mixes 0 (the plain loss: the perturbed term is not formed) with "
                            f"non-zero values; a stacked step cannot reproduce both exactly. Train the 0 value as its "
                            f"own run (or stack it with other seeds alone) and stack the non-zero values.")
    return values

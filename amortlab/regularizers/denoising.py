"""Denoising amortized inference (DVAE / DIWAE; Shu et al. 2018, AIR).

    L_alpha(x) = alpha * E_eps[ L_k(x; q = f(x + eps)) ] + (1 - alpha) * L_k(x; q = f(x)),   eps ~ N(0, sigma^2 I)

The noise enters only the encoder's input; p(x, z) always scores the clean x. The optimal denoising encoder is a
kernel regression of posteriors with bandwidth sigma, so larger sigma = smoother encoder. sigma = 0 or alpha = 0 is
the plain loss, bit for bit (the noisy term is not even formed).
"""
from __future__ import annotations

from torch import Tensor

from amortlab.distributions import noise
from amortlab.errors import AmortlabError
from amortlab.regularizers.base import EncoderRegularizer, per_model_strength


class Denoising(EncoderRegularizer):
    name = "denoising"
    stackable_settings = ("sigma",)

    def __init__(self, sigma: float = 0.1, alpha: float = 1.0):
        if sigma < 0 or not 0.0 <= alpha <= 1.0:
            raise AmortlabError(f"encoder_regularizer=denoising needs sigma >= 0 and 0 <= alpha <= 1, got "
                                f"sigma={sigma}, alpha={alpha}.")
        self.sigma, self.alpha = float(sigma), float(alpha)

    @property
    def strength(self) -> float:
        return self.sigma

    def training_loss(self, module, x: Tensor, k: int) -> Tensor:
        if isinstance(self.sigma, float) and self.sigma == 0.0:
            return super().training_loss(module, x, k)
        return self.mixed_input_loss(module, x, k, self.alpha,
                                     lambda x: x + noise.scale(self.sigma, noise.randn(x.shape, x)))

    def set_per_model(self, module, name: str, values: Tensor) -> None:
        """Stacked models with sigma_i each: model i's noise rows are scaled by sigma_i (``noise.scale``)."""
        self.sigma = per_model_strength(values, "encoder_regularizer.sigma")

    def tags(self) -> list[str]:
        return [*super().tags(), f"sigma:{self.sigma:g}", f"alpha:{self.alpha:g}"]

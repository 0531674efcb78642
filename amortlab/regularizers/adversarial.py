"""Adversarial amortized inference (beyond the AIR paper, its stated future work).

The encoder reads an FGSM-style perturbation of x in the direction that most lowers the bound,

    x_adv = x - epsilon * sign(grad_{x_enc} L_k(x; q = f(x_enc)) |_{x_enc = x})        (norm = "linf")
    x_adv = x - epsilon * g / ||g||_2                                                 (norm = "l2")

(L_k the method's clean k-sample bound, ``ELBOModule.clean_bound``: never a method's training surrogate, whose
zero-valued terms have non-zero gradients), while p(x, z) scores the clean x; the loss mixes it with the clean bound
like denoising:
alpha * L_k(x; f(x_adv)) + (1 - alpha) * L_k(x; f(x)). epsilon = 0 or alpha = 0 is the plain loss.
Costs one extra forward/backward per step (the gradient with respect to the encoder input).
"""
from __future__ import annotations

import torch
from torch import Tensor

from amortlab.errors import AmortlabError
from amortlab.distributions import noise
from amortlab.regularizers.base import EncoderRegularizer, per_model_strength


class Adversarial(EncoderRegularizer):
    name = "adversarial"
    stackable_settings = ("epsilon",)

    def __init__(self, epsilon: float = 0.05, norm: str = "linf", alpha: float = 1.0):
        if epsilon < 0 or not 0.0 <= alpha <= 1.0 or norm not in ("linf", "l2"):
            raise AmortlabError(f"encoder_regularizer=adversarial needs epsilon >= 0, 0 <= alpha <= 1 and norm in "
                                f"(linf, l2), got epsilon={epsilon}, alpha={alpha}, norm={norm!r}.")
        self.epsilon, self.norm, self.alpha = float(epsilon), norm, float(alpha)

    @property
    def strength(self) -> float:
        return self.epsilon

    def perturb(self, module, x: Tensor, k: int) -> Tensor:
        x_enc = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(module.clean_bound(x, k, x_enc=x_enc).sum(), x_enc)
        if self.norm == "linf":
            step = grad.sign()
        else:
            step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (grad.dim() - 1))
        return (x - noise.scale(self.epsilon, step)).detach()

    def training_loss(self, module, x: Tensor, k: int) -> Tensor:
        if isinstance(self.epsilon, float) and self.epsilon == 0.0:
            return super().training_loss(module, x, k)
        return self.mixed_input_loss(module, x, k, self.alpha, lambda x: self.perturb(module, x, k))

    def set_per_model(self, module, name: str, values: Tensor) -> None:
        """Stacked models with epsilon_i each: model i's rows step by epsilon_i (``noise.scale``)."""
        self.epsilon = per_model_strength(values, "encoder_regularizer.epsilon")

    def tags(self) -> list[str]:
        return [*super().tags(), f"epsilon:{self.epsilon:g}", f"norm:{self.norm}"]

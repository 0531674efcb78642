"""Weight-normalized inference (WNI; Shu et al. 2018, AIR) and spectral normalisation of the encoder.

WNI: every encoder weight row is reparameterised as

    w_i = v_i / ||v_i|| * s_i,    s_i = min(||v_i||, H / (1 + exp(u_i))),

with v_i, u_i trainable, so ||w_i|| <= H: a Lipschitz-type cap on the encoder. Smaller H = stronger regularizer.
The decoder is untouched.

Spectral norm (beyond the paper): every encoder weight matrix W is used as W / max(1, sigma(W) / coeff), sigma(W)
estimated by power iteration (one step per training forward, persistent vectors), so each layer's spectral norm is
<= coeff (up to the power-iteration estimate) and layers already below the bound are unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from amortlab.errors import AmortlabError
from amortlab.regularizers.base import EncoderRegularizer


class CappedRowNorm(nn.Module):
    """Parametrization v -> w with ``||w_i|| = min(||v_i||, H / (1 + exp(u_i)))`` per output row i."""

    def __init__(self, rows: int, H: float):
        super().__init__()
        self.H = H
        self.u = nn.Parameter(torch.zeros(rows))  # start with the cap at H / 2

    def forward(self, v: Tensor) -> Tensor:
        norm = v.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [..., rows, 1] (leading dims: stacked models)
        cap = self.H * torch.sigmoid(-self.u).unsqueeze(-1)  # H / (1 + e^u)
        return v / norm * torch.minimum(norm, cap)


class SpectralCap(nn.Module):
    """Parametrization W -> W / max(1, sigma(W) / coeff) with a power-iteration estimate of sigma(W)."""

    def __init__(self, weight: Tensor, coeff: float, n_power_iterations: int = 1):
        super().__init__()
        self.coeff, self.n = coeff, n_power_iterations
        out_f, in_f = weight.shape
        self.register_buffer("u", F.normalize(torch.randn(out_f), dim=0))
        self.register_buffer("v", F.normalize(torch.randn(in_f), dim=0))
        with torch.no_grad():
            self._power(weight, 15)

    @torch.no_grad()
    def _power(self, W: Tensor, n: int) -> None:
        # W [..., out, in], u [..., out], v [..., in] (leading dims: stacked models, amortlab.stack)
        for _ in range(n):
            self.v.copy_(F.normalize((W.transpose(-1, -2) @ self.u.unsqueeze(-1)).squeeze(-1), dim=-1))
            self.u.copy_(F.normalize((W @ self.v.unsqueeze(-1)).squeeze(-1), dim=-1))

    def forward(self, W: Tensor) -> Tensor:
        if self.training:
            self._power(W.detach(), self.n)
        # clones: the power iteration updates u, v in place at every forward, and a method may run the encoder
        # several times in one graph (iterative inference)
        u, v = self.u.clone(), self.v.clone()  # a differentiable estimate u^T W v; u, v are constants
        sigma = (u.unsqueeze(-1) * (W @ v.unsqueeze(-1))).sum((-2, -1))
        return W / torch.clamp(sigma / self.coeff, min=1.0)[..., None, None]  # coeff: a float, or [N] stacked


def _encoder_linears(encoder: nn.Module) -> list[nn.Linear]:
    layers = [m for m in encoder.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise AmortlabError("the encoder regularizer found no nn.Linear layers in the encoder to constrain; use it "
                            "with an MLP encoder (model=burda_mlp or cremer_mlp).")
    return layers


class WeightNorm(EncoderRegularizer):
    name = "weight_norm"
    stackable_settings = ("H",)

    def __init__(self, H: float = 5.0):
        if H <= 0:
            raise AmortlabError(f"encoder_regularizer=weight_norm needs H > 0, got H={H}.")
        self.H = float(H)

    @property
    def strength(self) -> float:
        return self.H

    def wrap_encoder(self, encoder: nn.Module) -> nn.Module:
        for layer in _encoder_linears(encoder):
            parametrize.register_parametrization(layer, "weight", CappedRowNorm(layer.out_features, self.H))
        return encoder

    def tags(self) -> list[str]:
        return [*super().tags(), f"H:{self.H:g}"]

    def set_per_model(self, module, name: str, values: Tensor) -> None:
        """Stacked models with H_i each: every stacked encoder row cap holds H ``[N, 1, 1]``."""
        _per_model_buffer(module, CappedRowNorm, "H", values.view(-1, 1, 1))


class SpectralNorm(EncoderRegularizer):
    name = "spectral_norm"
    stackable_settings = ("coeff",)

    def __init__(self, coeff: float = 1.0, n_power_iterations: int = 1):
        if coeff <= 0 or n_power_iterations < 1:
            raise AmortlabError(f"encoder_regularizer=spectral_norm needs coeff > 0 and n_power_iterations >= 1, got "
                                f"coeff={coeff}, n_power_iterations={n_power_iterations}.")
        self.coeff, self.n_power_iterations = float(coeff), int(n_power_iterations)

    @property
    def strength(self) -> float:
        return self.coeff

    def wrap_encoder(self, encoder: nn.Module) -> nn.Module:
        for layer in _encoder_linears(encoder):
            parametrize.register_parametrization(
                layer, "weight", SpectralCap(layer.weight.detach(), self.coeff, self.n_power_iterations))
        return encoder

    def tags(self) -> list[str]:
        return [*super().tags(), f"coeff:{self.coeff:g}"]

    def set_per_model(self, module, name: str, values: Tensor) -> None:
        """Stacked models with coeff_i each: every stacked encoder layer's cap holds coeff ``[N]``."""
        _per_model_buffer(module, SpectralCap, "coeff", values)


def _per_model_buffer(module: nn.Module, kind: type, name: str, value: Tensor) -> None:
    """Replace the float ``name`` of every ``kind`` parametrization in ``module`` by a non-persistent buffer (it
    follows the module to its device; checkpoints keep a single run's keys)."""
    for p in module.modules():
        if isinstance(p, kind):
            delattr(p, name)
            p.register_buffer(name, value.clone(), persistent=False)

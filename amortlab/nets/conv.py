"""Convolutional encoder q(z | x) and decoder p(x | z) for images (``model=conv``; the encoder of ``model=pixelcnn``).

Images arrive flat, x ``[B, C*H*W]`` (the datamodules' layout), and are viewed as ``[B, C, H, W]``; ``image_shape``
(C, H, W) comes from the dataset (``image_shape`` at the top of the config, filled in by train.py), or, when it is
None, a single-channel square image of ``x_dim`` pixels. Both nets halve / double the resolution twice with 4x4
stride-2 convolutions, so H and W must be multiples of 4 (28 x 28 MNIST, OMNIGLOT: 7 x 7 at the bottleneck).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from amortlab.activations import activation as activation_class
from amortlab.distributions import DiagGaussian
from amortlab.errors import AmortlabError
from amortlab.objectives import bernoulli_log_prob


def image_shape_of(x_dim: int, image_shape: Sequence[int] | None) -> tuple[int, int, int]:
    """(C, H, W) given or, for None, (1, s, s) with s^2 = x_dim; a mismatch is a readable error."""
    if image_shape is None:
        side = math.isqrt(int(x_dim))
        if side * side != x_dim:
            raise AmortlabError(f"a convolutional model needs the image shape: x_dim={x_dim} is not a square image; "
                                f"set image_shape=[C,H,W].")
        return 1, side, side
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or math.prod(shape) != x_dim:
        raise AmortlabError(f"image_shape={list(shape)} does not describe x_dim={x_dim} values as (C, H, W).")
    return shape


def _check_divisible(shape: tuple[int, int, int], who: str) -> None:
    if shape[1] % 4 or shape[2] % 4:
        raise AmortlabError(f"{who} halves the image twice: H and W must be multiples of 4, got image_shape="
                            f"{list(shape)}. Use model=burda_mlp for this dataset.")


class ConvEncoder(nn.Module):
    """x -> conv(C->c1, 3x3) -> conv(c1->c1, 4x4 /2) -> conv(c1->c2, 4x4 /2) -> flatten -> hidden -> (mu, logvar).

    Args:
        x_dim, z_dim: data and latent sizes.
        image_shape: (C, H, W) (None: square, one channel).
        channels: (c1, c2).
        hidden: width of the dense layer after the convolutions.
        activation: between all layers.
    """

    family = DiagGaussian

    def __init__(self, x_dim: int, z_dim: int, image_shape: Sequence[int] | None = None,
                 channels: Sequence[int] = (32, 64), hidden: int = 256, activation: str = "elu"):
        super().__init__()
        self.image_shape = image_shape_of(x_dim, image_shape)
        _check_divisible(self.image_shape, "model=conv's encoder")
        C, H, W = self.image_shape
        c1, c2 = (int(c) for c in channels)
        act = activation_class(activation)
        self.z_dim = z_dim
        self.conv = nn.Sequential(nn.Conv2d(C, c1, 3, padding=1), act(), nn.Conv2d(c1, c1, 4, 2, 1), act(),
                                  nn.Conv2d(c1, c2, 4, 2, 1), act(), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(c2 * (H // 4) * (W // 4), hidden), act(), nn.Linear(hidden, 2 * z_dim))

    def forward(self, x: Tensor) -> DiagGaussian:
        lead = x.shape[:-1]
        h = self.conv(x.reshape(-1, *self.image_shape))
        mu, logvar = self.head(h).reshape(*lead, 2 * self.z_dim).chunk(2, dim=-1)
        return DiagGaussian(mu, logvar)


class ConvDecoder(nn.Module):
    """z ``[..., Z]`` -> hidden -> c2 x H/4 x W/4 -> deconv(4x4 x2) -> deconv(4x4 x2) -> conv(3x3) -> Bernoulli logits
    ``[..., X]`` (the encoder mirrored)."""

    def __init__(self, x_dim: int, z_dim: int, image_shape: Sequence[int] | None = None,
                 channels: Sequence[int] = (32, 64), hidden: int = 256, activation: str = "elu"):
        super().__init__()
        self.image_shape = image_shape_of(x_dim, image_shape)
        _check_divisible(self.image_shape, "model=conv's decoder")
        C, H, W = self.image_shape
        c1, c2 = (int(c) for c in channels)
        act = activation_class(activation)
        self.z_dim, self.x_dim = z_dim, x_dim
        self.dense = nn.Sequential(nn.Linear(z_dim, hidden), act(), nn.Linear(hidden, c2 * (H // 4) * (W // 4)),
                                   act(), nn.Unflatten(-1, (c2, H // 4, W // 4)))
        self.deconv = nn.Sequential(nn.ConvTranspose2d(c2, c1, 4, 2, 1), act(), nn.ConvTranspose2d(c1, c1, 4, 2, 1),
                                    act(), nn.Conv2d(c1, C, 3, padding=1), nn.Flatten())
        self.output_bias = nn.Parameter(torch.zeros(x_dim))  # per pixel: an untrained decoder predicts the data mean

    @torch.no_grad()
    def init_output_bias(self, x_mean: Tensor, eps: float = 1e-3) -> None:
        p = x_mean.clamp(eps, 1 - eps).to(self.output_bias)
        self.output_bias.copy_(torch.log(p) - torch.log1p(-p))

    def forward(self, z: Tensor) -> Tensor:
        lead = z.shape[:-1]
        return self.deconv(self.dense(z.reshape(-1, self.z_dim))).reshape(*lead, self.x_dim) + self.output_bias

    def log_prob(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x | z) for x ``[B, X]``, z ``[k, B, Z]`` -> ``[k, B]``."""
        return bernoulli_log_prob(self(z), x)

    def mean(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self(z))

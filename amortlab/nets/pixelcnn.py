"""Autoregressive decoder: a small gated PixelCNN conditioned on z (van den Oord et al. 2016, "Conditional image
generation with PixelCNN decoders"), for binary images (``model=pixelcnn``; SA-VAE's image decoder, Kim et al. 2018).

    p(x | z) = prod_i Bernoulli(x_i; sigmoid(l_i(x_<i, z)))          (raster order, i = row * W + column)

Every logit l_i depends only on the pixels before i, so one pass over the observed image gives all of them and
log p(x | z) exactly. Two stacks remove the blind spot of stacked masked 3x3 convolutions:

- vertical stack: a (k//2 + 1) x k convolution over the rows above and the current row (input padded on top),
  so its features at row r see rows <= r; it reaches the horizontal stack only shifted down one row (rows < r);
- horizontal stack: a 1 x (k//2 + 1) convolution over the current row, left of and at the current column; the
  first layer sees the image shifted right one column (columns < c), so no feature ever sees pixel i itself.

Each layer is gated, h = tanh(a_f + V_f z) * sigmoid(a_g + V_g z), with z entering every layer through a linear map
(a bias map shared by all positions); the horizontal stack is residual after the first layer. The output is two 1x1
convolutions and a per-pixel bias (initialised to the data mean's logit).

Cost: one pass per log p(x | z), but that pass is a network over the whole image for every (sample, point) pair, so
IWAE-k evaluation costs k full passes per point (about 100x an MLP decoder's per sample at the defaults; chunking
over samples, ``evaluation.rows``, bounds the memory). Sampling is ancestral, H*W passes.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amortlab.errors import AmortlabError
from amortlab.nets.conv import image_shape_of
from amortlab.objectives import bernoulli_log_prob


class GatedLayer(nn.Module):
    """One gated layer of both stacks; ``first``: the horizontal input is shifted right (excludes the pixel);
    ``last``: no vertical output (nothing reads it)."""

    def __init__(self, in_ch: int, ch: int, z_dim: int, kernel: int, first: bool, last: bool = False):
        super().__init__()
        self.k, self.first = kernel // 2, first
        self.v_conv = nn.Conv2d(in_ch, 2 * ch, (self.k + 1, 2 * self.k + 1))
        self.h_conv = nn.Conv2d(in_ch, 2 * ch, (1, self.k + 1))
        self.v_to_h = nn.Conv2d(2 * ch, 2 * ch, 1)
        self.h_out = nn.Conv2d(ch, ch, 1)
        self.cond_v = None if last else nn.Linear(z_dim, 2 * ch)
        self.cond_h = nn.Linear(z_dim, 2 * ch)

    @staticmethod
    def _gate(a: Tensor) -> Tensor:
        f, g = a.chunk(2, dim=1)
        return torch.tanh(f) * torch.sigmoid(g)

    def forward(self, v: Tensor, h: Tensor, z: Tensor) -> tuple[Tensor | None, Tensor]:
        k = self.k
        v_pre = self.v_conv(F.pad(v, (k, k, k, 0)))  # rows r-k..r, columns c-k..c+k
        h_in = F.pad(h, (1, 0))[..., :-1] if self.first else h  # first layer: columns < c only
        h_pre = self.h_conv(F.pad(h_in, (k, 0)))  # columns c-k..c of its input
        v_down = F.pad(v_pre, (0, 0, 1, 0))[:, :, :-1]  # rows < r for the horizontal stack
        v_out = None if self.cond_v is None else self._gate(v_pre + self.cond_v(z)[..., None, None])
        h_new = self.h_out(self._gate(h_pre + self.v_to_h(v_down) + self.cond_h(z)[..., None, None]))
        return v_out, (h_new if self.first else h + h_new)


class PixelCNNDecoder(nn.Module):
    """p(x | z) for binary images (module docstring); ``log_prob(x [B, X], z [k, B, Z]) -> [k, B]``.

    Args:
        x_dim, z_dim: data and latent sizes.
        image_shape: (1, H, W) (None: square); one channel (binary images).
        layers: gated layers (SA-VAE's OMNIGLOT decoder: 12).
        channels: feature maps per stack.
        kernel: odd kernel width k (vertical (k//2+1) x k, horizontal 1 x (k//2+1)).
        out_channels: width of the 1x1 output layer.
    """

    autoregressive = True

    def __init__(self, x_dim: int, z_dim: int, image_shape: Sequence[int] | None = None, layers: int = 6,
                 channels: int = 32, kernel: int = 3, out_channels: int = 64):
        super().__init__()
        self.image_shape = image_shape_of(x_dim, image_shape)
        if self.image_shape[0] != 1:
            raise AmortlabError(f"model=pixelcnn models binary images with one channel, got image_shape="
                                f"{list(self.image_shape)}.")
        if layers < 1 or channels < 1 or kernel < 1 or kernel % 2 == 0:
            raise AmortlabError(f"model=pixelcnn needs layers >= 1, channels >= 1 and an odd kernel, got layers="
                                f"{layers}, channels={channels}, kernel={kernel} (conf/model/pixelcnn.yaml).")
        self.z_dim, self.x_dim = z_dim, x_dim
        self.layers = nn.ModuleList(GatedLayer(1 if i == 0 else channels, channels, z_dim, kernel, i == 0,
                                               i == layers - 1) for i in range(layers))
        self.out = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, out_channels, 1), nn.ReLU(),
                                 nn.Conv2d(out_channels, 1, 1), nn.Flatten())
        self.output_bias = nn.Parameter(torch.zeros(x_dim))

    @torch.no_grad()
    def init_output_bias(self, x_mean: Tensor, eps: float = 1e-3) -> None:
        p = x_mean.clamp(eps, 1 - eps).to(self.output_bias)
        self.output_bias.copy_(torch.log(p) - torch.log1p(-p))

    def logits(self, x: Tensor, z: Tensor) -> Tensor:
        """Logits ``[N, X]`` of every pixel given the pixels before it, x ``[N, X]``, z ``[N, Z]``."""
        img = x.reshape(-1, *self.image_shape)
        v = h = img
        for layer in self.layers:
            v, h = layer(v, h, z)
        return self.out(h) + self.output_bias

    def log_prob(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x | z) for x ``[B, X]``, z ``[k, B, Z]`` -> ``[k, B]`` (one pass per (sample, point) pair)."""
        k, B = z.shape[0], z.shape[1]
        xx = x.expand(k, B, self.x_dim).reshape(k * B, self.x_dim)
        return bernoulli_log_prob(self.logits(xx, z.reshape(k * B, self.z_dim)), xx).view(k, B)

    @torch.no_grad()
    def sample(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Ancestral samples x ~ p(x | z) ``[..., X]`` (H*W passes)."""
        lead = z.shape[:-1]
        zz = z.reshape(-1, self.z_dim)
        x = zz.new_zeros(zz.shape[0], self.x_dim)
        for i in range(self.x_dim):
            p = torch.sigmoid(self.logits(x, zz)[:, i])
            x[:, i] = torch.bernoulli(p, generator=generator)
        return x.reshape(*lead, self.x_dim)

    def mean(self, z: Tensor) -> Tensor:
        """For image panels: an ancestral *sample* of p(x | z) (the mean of an autoregressive p(x | z) has no closed
        form)."""
        return self.sample(z)

"""A NONLINEAR VAE with a 2-D latent whose log p(x) is known to ~1e-8 nats by quadrature, for testing estimators.

Model: ``AmortizedVAE`` in float64 with a ``BernoulliDecoder(32, 2, hidden=(16,), activation="tanh")`` whose weights
are hand-set from a fixed seed (first layer N(0, 1.5^2): sharp tanh units in random directions, so each pixel's logit
is a bent function of z) and a ``GaussianEncoder(32, 2, hidden=(64,))`` trained briefly (800 Adam steps on IWAE-8,
fresh x ~ p(x) every step, decoder frozen). The posteriors of 32 pixels are skewed, curved or shouldered: for the 8
test points KL(p(z | x) || N(moments)) = 0.10-0.36 nats on the grid. The diagonal q is reasonable but imperfect:
ELBO gaps 0.6-3.7 nats, IWAE-50 gaps 0.01-0.16, IWAE-5000 within 0.07 per point (mean of 32 runs).

Reference: log p(x) = log int p(x | z) N(z; 0, I) dz by the midpoint rule on an n x n grid over [-extent, extent]^2
(float64, logsumexp). It is independent of the code under test: the decoder's logits come from its MLP, but the
Bernoulli likelihood (x.l - softplus(l)), the prior density and the sum are written here (one logits pass per grid
point, shared by all datapoints).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from amortlab.methods import AmortizedVAE
from amortlab.nets import BernoulliDecoder, GaussianEncoder
from amortlab.objectives import k_sample_bound

X_DIM, Z_DIM, HIDDEN = 32, 2, 16
DECODER_SEED, ENCODER_SEED, DATA_SEED, POINTS_SEED = 1, 1, 101, 202
N_POINTS = 8
EXTENT, N_GRID = 6.0, 400  # reference quadrature: h = 0.03, posterior standard deviations are >= 0.1
NON_GAUSSIAN_KL = 0.05  # nats: KL(p(z | x) || N(moments)) above this marks a visibly non-Gaussian posterior


def make_decoder(seed: int = DECODER_SEED) -> BernoulliDecoder:
    """The hand-set float64 decoder (sharp first layer, moderate output layer)."""
    g = torch.Generator().manual_seed(seed)
    dec = BernoulliDecoder(X_DIM, Z_DIM, hidden=(HIDDEN,), activation="tanh").double()
    first, out = dec.net[0], dec.output_layer

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    with torch.no_grad():
        first.weight.copy_(randn(HIDDEN, Z_DIM) * 1.5)
        first.bias.copy_(randn(HIDDEN) * 0.75)
        out.weight.copy_(randn(X_DIM, HIDDEN) * 1.0)
        out.bias.copy_(randn(X_DIM) * 0.5)
    return dec.requires_grad_(False)


def sample_x(decoder: BernoulliDecoder, n: int, generator: torch.Generator) -> Tensor:
    """x ~ p(x): z ~ N(0, I), x ~ Bernoulli(sigmoid(logits(z))); ``[n, X]`` float64."""
    z = torch.randn(n, Z_DIM, generator=generator, dtype=torch.float64)
    return torch.bernoulli(decoder.mean(z), generator=generator)


def train_encoder(model: AmortizedVAE, steps: int = 800, k: int = 8, batch: int = 128, lr: float = 3e-3,
                  seed: int = DATA_SEED) -> None:
    """Fit the encoder on the IWAE-k bound of fresh x ~ p(x) (decoder frozen; Adam, cosine-decayed learning rate)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.encoder.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        x = sample_x(model.decoder, batch, g)
        loss = -k_sample_bound(model.log_weights(x, model.infer(x), k, g)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.encoder.requires_grad_(False)


def build_model() -> AmortizedVAE:
    """The trained 2-D model (deterministic; the global RNG is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(ENCODER_SEED)
        enc = GaussianEncoder(X_DIM, Z_DIM, hidden=(64,)).double()
    model = AmortizedVAE(enc, decoder=make_decoder(), importance_samples={"train": 8, "val": 100, "test": 5000})
    train_encoder(model)
    return model.eval()


# --- quadrature ---------------------------------------------------------------------------------------------------
@dataclass
class Grid:
    """Midpoint-rule grid and what it gives per datapoint.

    axis: ``[n]`` cell centres -extent + h (i + 1/2); h: cell side; log_px: ``[P]`` log p(x);
    log_post: ``[P, n, n]`` log p(z | x) at z = (axis[i], axis[j]) (normalised: logsumexp + 2 log h = 0).
    """

    axis: Tensor
    h: float
    log_px: Tensor
    log_post: Tensor

    def moments(self) -> tuple[Tensor, Tensor]:
        """Posterior mean ``[P, 2]`` and covariance ``[P, 2, 2]`` from the grid."""
        w = self.log_post.exp() * self.h**2  # cell masses, sum 1
        z = torch.stack(torch.meshgrid(self.axis, self.axis, indexing="ij"), -1)  # [n, n, 2]
        mean = torch.einsum("pij,ija->pa", w, z)
        d = z[None] - mean[:, None, None]
        return mean, torch.einsum("pij,pija,pijb->pab", w, d, d)

    def gaussian_kl(self) -> Tensor:
        """KL(p(z | x) || N(mean, cov)) ``[P]`` with the grid's own moments: 0 iff the posterior is Gaussian
        (on the grid: up to the quadrature error); the moment-matched Gaussian minimises this KL over Gaussians."""
        mean, cov = self.moments()
        z = torch.stack(torch.meshgrid(self.axis, self.axis, indexing="ij"), -1)
        log_g = torch.distributions.MultivariateNormal(mean[:, None, None], cov[:, None, None]).log_prob(z[None])
        w = self.log_post.exp() * self.h**2
        return (w * (self.log_post - log_g)).sum((1, 2))


@torch.no_grad()
def bernoulli_log_joint_grid(decoder: BernoulliDecoder, x: Tensor, axis: Tensor) -> Tensor:
    """log p(x | z) + log N(z; 0, I) at every grid point, ``[P, n, n]``: logits l(z) once per grid point, then
    sum_d x_d l_d - softplus(l_d) for all datapoints by one matrix product."""
    n = len(axis)
    z = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)  # [n*n, 2]
    out = []
    for start in range(0, len(z), 40_000):
        zc = z[start:start + 40_000]
        logits = decoder.net(zc)  # [G, X]
        log_lik = x @ logits.T - F.softplus(logits).sum(-1)  # [P, G]
        log_prior = -0.5 * (zc.pow(2).sum(-1) + 2 * math.log(2 * math.pi))
        out.append(log_lik + log_prior)
    return torch.cat(out, 1).reshape(len(x), n, n)


def quadrature(decoder: BernoulliDecoder, x: Tensor, extent: float = EXTENT, n: int = N_GRID) -> Grid:
    """log p(x) and the grid posterior by the midpoint rule on [-extent, extent]^2 with n x n cells."""
    h = 2 * extent / n
    axis = -extent + h * (torch.arange(n, dtype=torch.float64) + 0.5)
    lj = bernoulli_log_joint_grid(decoder, x.double(), axis)
    log_px = torch.logsumexp(lj.flatten(1), 1) + 2 * math.log(h)
    return Grid(axis=axis, h=h, log_px=log_px, log_post=lj - log_px[:, None, None])


def non_gaussian_points(grid: Grid, threshold: float = NON_GAUSSIAN_KL) -> Tensor:
    """Indices (ascending) of the points whose posterior is visibly non-Gaussian: KL(p || N(moments)) > threshold."""
    return torch.nonzero(grid.gaussian_kl() > threshold).flatten()


@lru_cache(maxsize=1)
def problem() -> tuple[AmortizedVAE, Tensor, Grid]:
    """(model, x ``[8, 32]`` drawn from p(x), reference grid) -- built once per process; do not modify."""
    model = build_model()
    x = sample_x(model.decoder, N_POINTS, torch.Generator().manual_seed(POINTS_SEED))
    return model, x, quadrature(model.decoder, x)

"""Sequential latent-variable models: the protocol of a state-space model with one latent z_t per time step.

    p(x_1:T, z_1:T) = prod_t p(z_t | z_{t-1}, c_t) p(x_t | z_t, c_t),     c_t = context(x_<t)

c_t ``[B, T, H]`` is a deterministic summary of the past observations (SRNN: a GRU over x_<t; a linear-Gaussian
SSM has none, H = 0); z_0 = 0. Data rows hold a sequence as ``[T * (X + 1)]`` values, each step x_t ``[X]``
followed by a present flag (``amortlab.data.sequence``; padding steps have flag 0 and add nothing to any term).

Shapes: a step's functions take any leading dims (samples first: z ``[k, B, Z]``, c ``[B, H]`` broadcast), so
the whole sequence can be scored in one pass once z_1:T is drawn (``log_joint_steps``). The static protocol's
``log_prior(z)`` / ``log_likelihood(x, z)`` are not defined here (p(z_t | ...) depends on x_<t): the sequence methods
(``amortlab.methods.filtering``) score sequences with ``log_joint_steps``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from amortlab.data.sequence import unpack_steps
from amortlab.errors import AmortlabError
from amortlab.models.base import GenerativeModel
from amortlab.objectives import LOG_2PI, LOGVAR_MAX, LOGVAR_MIN

__all__ = ["LOGVAR_MAX", "LOGVAR_MIN", "SequenceModel", "gaussian_kl", "gaussian_log_prob", "split_rows"]


def gaussian_log_prob(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, diag exp(logvar)) summed over the last dim: ``[...]``."""
    return -0.5 * (logvar + (z - mu).pow(2) * torch.exp(-logvar) + LOG_2PI).sum(-1)


def gaussian_kl(mu_q: Tensor, lv_q: Tensor, mu_p: Tensor, lv_p: Tensor) -> Tensor:
    """KL(N(mu_q, e^lv_q) || N(mu_p, e^lv_p)) summed over the last dim (diagonal): ``[...]``."""
    return 0.5 * (lv_p - lv_q + (torch.exp(lv_q) + (mu_q - mu_p).pow(2)) * torch.exp(-lv_p) - 1.0).sum(-1)


def split_rows(x: Tensor, step_dim: int) -> tuple[Tensor, Tensor]:
    """Data rows ``[B, T * (X + 1)]`` -> (x ``[B, T, X]``, present mask ``[B, T]``) (``amortlab.data.sequence``)."""
    return unpack_steps(x, step_dim)


class SequenceModel(GenerativeModel):
    """Base class (module docstring). Subclasses implement ``context``, ``prior``, ``log_emission`` and
    ``emission_mean``; ``step_dim`` is X, ``latent_dims = (Z,)`` the per-step latent size."""

    sequential = True

    def __init__(self, step_dim: int, z_dim: int):
        super().__init__()
        if int(step_dim) < 1 or int(z_dim) < 1:
            raise AmortlabError(f"A sequence model needs step_dim >= 1 and z_dim >= 1, got {step_dim} and {z_dim}: "
                                f"use a sequence dataset (dataset=moving_mnist, lgssm, jsb_chorales, ...), whose "
                                f"step size train.py fills in as step_dim.")
        self.step_dim = int(step_dim)
        self.latent_dims = (int(z_dim),)

    # --- what a model defines -------------------------------------------------------------------------------------
    def context(self, x: Tensor) -> Tensor:
        """c_t = summary of x_<t, ``[B, T, H]`` for x ``[B, T, X]``."""
        return x.new_zeros(*x.shape[:-1], 0)

    def prior(self, z_prev: Tensor, c: Tensor, first: bool) -> tuple[Tensor, Tensor]:
        """(mu, logvar) ``[..., Z]`` of p(z_t | z_{t-1}, c_t); ``first``: t = 1 (z_prev is z_0 = 0)."""
        raise NotImplementedError

    def log_emission(self, x: Tensor, z: Tensor, c: Tensor) -> Tensor:
        """log p(x_t | z_t, c_t) ``[...]`` for x ``[B, X]`` (or ``[B, T, X]``), z ``[k, B, Z]`` (``[k, B, T, Z]``)."""
        raise NotImplementedError

    def emission_mean(self, z: Tensor, c: Tensor) -> Tensor:
        """E[x_t | z_t, c_t] ``[..., X]``."""
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------------------------------
    def prior_steps(self, z: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of every p(z_t | z_{t-1}, c_t) at once for z ``[k, B, T, Z]``: ``[k, B, T, Z]``."""
        mu1, lv1 = self.prior(torch.zeros_like(z[..., 0, :]), c[:, 0], first=True)
        if z.shape[-2] == 1:
            return mu1.unsqueeze(-2), lv1.unsqueeze(-2)
        mu, lv = self.prior(z[..., :-1, :], c[:, 1:].expand(*z.shape[:-2], -1, -1), first=False)
        return torch.cat([mu1.expand_as(z[..., 0, :]).unsqueeze(-2), mu], -2), torch.cat(
            [lv1.expand_as(z[..., 0, :]).unsqueeze(-2), lv], -2)

    def log_joint_steps(self, x: Tensor, mask: Tensor, z: Tensor, frozen: bool = False,
                        context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(log p(x_t | z_t, c_t), log p(z_t | z_{t-1}, c_t)) per step ``[k, B, T]``, padding steps 0, for x
        ``[B, T, X]``, mask ``[B, T]``, z ``[k, B, T, Z]``; ``context``: c of x if already computed; ``frozen``
        holds theta constant (gradients reach z only; the context is then recomputed)."""
        if frozen:
            return self.call_frozen("log_joint_steps", x, mask, z)
        c = self.context(x) if context is None else context
        mu, lv = self.prior_steps(z, c)
        log_pz = gaussian_log_prob(z, mu, lv)
        log_px = self.log_emission(x, z, c.expand(*z.shape[:-1], -1))
        return log_px * mask, log_pz * mask

    def call_frozen(self, name: str, *args):
        """``self.<name>(*args)`` with theta held constant (parameters detached; gradients reach the inputs only)."""
        params = {n: p.detach() for n, p in self.named_parameters()}
        return torch.func.functional_call(self, params, (name, *args))

    def forward(self, name: str, *args):
        """Dispatch to ``self.<name>(*args)`` (what ``call_frozen`` runs through ``torch.func.functional_call``)."""
        return getattr(self, name)(*args)

    def log_prior(self, z, frozen: bool = False) -> Tensor:
        raise AmortlabError(f"{type(self).__name__} is a sequence model: p(z_t | z_<t, x_<t) depends on the data, so "
                            f"it is scored with log_joint_steps by a sequence method (inference=filtering or avf).")

    def log_likelihood(self, x, z, frozen: bool = False) -> Tensor:
        self.log_prior(z)

    def from_noise(self, eps: Tensor) -> Tensor:
        self.log_prior(eps)

    def prior_residual(self, z) -> Tensor:
        self.log_prior(z)

    @torch.no_grad()
    def sample_sequences(self, n: int, steps: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(E[x_t | z_t, c_t] ``[n, T, X]``, z ``[n, T, Z]``): ancestral samples with x_t ~ p(x_t | ...) fed back."""
        p = next(self.parameters())
        x = torch.zeros(n, steps, self.step_dim, device=p.device, dtype=p.dtype)
        z_prev = torch.zeros(n, self.z_dim, device=p.device, dtype=p.dtype)
        means, zs = [], []
        for t in range(steps):
            c = self.context(x)[:, t]  # x_<t are filled in; a recurrent context reads only those
            mu, lv = self.prior(z_prev, c, first=t == 0)
            z = mu + torch.exp(0.5 * lv) * torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            m = self.emission_mean(z, c)
            x[:, t] = self.sample_emission(m, generator)
            means.append(m)
            zs.append(z)
            z_prev = z
        return torch.stack(means, 1), torch.stack(zs, 1)

    def sample_emission(self, mean: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x_t ~ p(x_t | z_t, c_t) given its mean (Bernoulli by default)."""
        return torch.bernoulli(mean, generator=generator)

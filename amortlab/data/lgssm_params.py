"""The parameters of a linear-Gaussian state-space model (LGSSM), shared by ``dataset=lgssm`` (which samples from
them) and ``model=lgssm`` (which starts at them):

    z_1 ~ N(mu0, diag s0^2),   z_t = A z_{t-1} + w_t,  w_t ~ N(0, diag q^2)      (t = 2..T)
    x_t = C z_t + v_t,  v_t ~ N(0, diag r^2)                                     (t = 1..T)

``LGSSMParams.make`` builds them deterministically from a seed: A = rho x (block-diagonal 2x2 rotations by
``angle``; a trailing 1x1 block for odd z_dim), C with N(0, 1/z_dim) entries, q, r and s0 constant.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LGSSMParams:
    """A ``[Z, Z]``, C ``[X, Z]``, q ``[Z]``, r ``[X]``, mu0 ``[Z]``, s0 ``[Z]`` (float64)."""

    A: Tensor
    C: Tensor
    q: Tensor
    r: Tensor
    mu0: Tensor
    s0: Tensor

    @property
    def z_dim(self) -> int:
        return self.A.shape[0]

    @property
    def x_dim(self) -> int:
        return self.C.shape[0]

    @classmethod
    def make(cls, z_dim: int = 2, x_dim: int = 4, seed: int = 0, rho: float = 0.95, angle: float = 0.3,
             q_std: float = 0.3, r_std: float = 0.5, s0: float = 1.0) -> LGSSMParams:
        """The seeded parameters described in the module docstring."""
        g = torch.Generator().manual_seed(seed)
        A = torch.zeros(z_dim, z_dim, dtype=torch.float64)
        c, s = math.cos(angle), math.sin(angle)
        for i in range(0, z_dim - 1, 2):
            A[i:i + 2, i:i + 2] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
        if z_dim % 2:
            A[-1, -1] = 1.0
        C = torch.randn(x_dim, z_dim, generator=g, dtype=torch.float64) / math.sqrt(z_dim)
        return cls(A=rho * A, C=C, q=torch.full((z_dim,), q_std, dtype=torch.float64),
                   r=torch.full((x_dim,), r_std, dtype=torch.float64),
                   mu0=torch.zeros(z_dim, dtype=torch.float64), s0=torch.full((z_dim,), s0, dtype=torch.float64))

    def sample(self, n: int, steps: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(x ``[n, T, X]``, z ``[n, T, Z]``) float64, drawn from the model."""
        zs, xs = [], []
        z = self.mu0 + self.s0 * torch.randn(n, self.z_dim, generator=generator, dtype=torch.float64)
        for t in range(steps):
            if t > 0:
                z = z @ self.A.T + self.q * torch.randn(n, self.z_dim, generator=generator, dtype=torch.float64)
            x = z @ self.C.T + self.r * torch.randn(n, self.x_dim, generator=generator, dtype=torch.float64)
            zs.append(z)
            xs.append(x)
        return torch.stack(xs, 1), torch.stack(zs, 1)

"""Linear-Gaussian state-space model, ``model=lgssm``: the exact reference for every sequence estimator.

    z_1 ~ N(mu0, diag s0^2),  z_t = A z_{t-1} + w_t, w_t ~ N(0, diag q^2);   x_t = C z_t + v_t, v_t ~ N(0, diag r^2)

(parameters: ``amortlab.data.lgssm_params``). Kalman filtering gives log p(x_1:T) exactly,

    predict:  m_t = A m_{t-1},  P_t = A P_{t-1} A^T + Q          (m_1 = mu0, P_1 = diag s0^2)
    update:   S_t = C P_t C^T + R,  K_t = P_t C^T S_t^-1,  m_t <- m_t + K_t (x_t - C m_t),  P_t <- (I - K_t C) P_t
    log p(x_1:T) = sum_t log N(x_t; C m_t, S_t)            (m_t, P_t the predicted moments; ``kalman_log_likelihood``)

and the locally optimal proposal p(z_t | z_{t-1}, x_t) (``optimal_step``): the mean is the prediction plus the gain
times the prediction error, mu = A z_{t-1} + K (x_t - C A z_{t-1}), covariance (I - K C) Q. Its importance weight is
p(x_t | z_{t-1}) = N(x_t; C A z_{t-1}, C Q C^T + R), so SMC with it converges to the Kalman value as particles grow,
and the ELBO of this "Bayes filter" is the optimal filtering bound the tests compare trained filters with.

``learn=false`` (default) holds the parameters at their initial values (e.g. the dataset's true ones): inference
methods are then compared on a known model with an exact log p(x).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from amortlab.data.lgssm_params import LGSSMParams
from amortlab.models.sequence import SequenceModel, gaussian_log_prob


class LinearGaussianSSM(SequenceModel):
    """Args: the ``LGSSMParams.make`` settings (z_dim, x_dim, param_seed, rho, angle, q_std, r_std) and ``learn``."""

    def __init__(self, z_dim: int = 2, x_dim: int = 4, param_seed: int = 0, rho: float = 0.95, angle: float = 0.3,
                 q_std: float = 0.3, r_std: float = 0.5, learn: bool = False):
        super().__init__(x_dim, z_dim)
        p = LGSSMParams.make(z_dim, x_dim, param_seed, rho, angle, q_std, r_std)
        f = torch.get_default_dtype()
        self.A = nn.Parameter(p.A.to(f), requires_grad=learn)
        self.C = nn.Parameter(p.C.to(f), requires_grad=learn)
        self.log_q = nn.Parameter(p.q.log().to(f), requires_grad=learn)
        self.log_r = nn.Parameter(p.r.log().to(f), requires_grad=learn)
        self.mu0 = nn.Parameter(p.mu0.to(f), requires_grad=learn)
        self.log_s0 = nn.Parameter(p.s0.log().to(f), requires_grad=learn)

    def params(self) -> LGSSMParams:
        """The current parameters (float64 copies)."""
        d = lambda t: t.detach().double()  # noqa: E731
        return LGSSMParams(A=d(self.A), C=d(self.C), q=d(self.log_q).exp(), r=d(self.log_r).exp(), mu0=d(self.mu0),
                           s0=d(self.log_s0).exp())

    def prior(self, z_prev: Tensor, c: Tensor, first: bool) -> tuple[Tensor, Tensor]:
        if first:
            return self.mu0.expand_as(z_prev), (2 * self.log_s0).expand_as(z_prev)
        return z_prev @ self.A.T, (2 * self.log_q).expand_as(z_prev)

    def log_emission(self, x: Tensor, z: Tensor, c: Tensor) -> Tensor:
        return gaussian_log_prob(x, z @ self.C.T, (2 * self.log_r).expand(*z.shape[:-1], -1))

    def emission_mean(self, z: Tensor, c: Tensor) -> Tensor:
        return z @ self.C.T

    def sample_emission(self, mean: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return mean + self.log_r.exp() * torch.randn(mean.shape, generator=generator, device=mean.device,
                                                     dtype=mean.dtype)

    @torch.no_grad()
    def kalman_log_likelihood(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Exact log p(x_1:T) ``[B]`` (float64) for x ``[B, T, X]``; steps with mask 0 are predicted, not observed."""
        p = self.params()
        x = x.double()
        B, T, X = x.shape
        Q, R = torch.diag(p.q ** 2), torch.diag(p.r ** 2)
        m = p.mu0.expand(B, -1).clone()
        P = torch.diag(p.s0 ** 2).expand(B, -1, -1).clone()
        total = x.new_zeros(B)
        eye = torch.eye(p.z_dim, dtype=torch.float64, device=x.device)
        for t in range(T):
            if t > 0:
                m = m @ p.A.T
                P = p.A @ P @ p.A.T + Q
            S = p.C @ P @ p.C.T + R
            err = x[:, t] - m @ p.C.T
            L = torch.linalg.cholesky(S)
            sol = torch.cholesky_solve(err.unsqueeze(-1), L).squeeze(-1)
            logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
            ll = -0.5 * ((err * sol).sum(-1) + logdet + X * math.log(2 * math.pi))
            K = P @ p.C.T @ torch.cholesky_inverse(L)  # [B, Z, X]
            m_new = m + (K @ err.unsqueeze(-1)).squeeze(-1)
            P_new = (eye - K @ p.C) @ P
            obs = torch.ones(B, dtype=torch.bool, device=x.device) if mask is None else mask[:, t].bool()
            total = total + torch.where(obs, ll, torch.zeros_like(ll))
            m = torch.where(obs[:, None], m_new, m)
            P = torch.where(obs[:, None, None], P_new, P)
        return total

    def optimal_step(self, x_t: Tensor, z_prev: Tensor, first: bool,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """One draw of the locally optimal proposal p(z_t | z_{t-1}, x_t) for x_t ``[B, X]``, z_prev ``[k, B, Z]``:
        (z_t ``[k, B, Z]``, log q ``[k, B]``, log p(x_t | z_{t-1}) ``[k, B]`` — the incremental weight)."""
        p = self.params()
        dt = z_prev.dtype
        if first:
            m, P = p.mu0.expand(z_prev.shape), torch.diag(p.s0 ** 2)
        else:
            m, P = z_prev.double() @ p.A.T, torch.diag(p.q ** 2)
        S = p.C @ P @ p.C.T + torch.diag(p.r ** 2)
        K = P @ p.C.T @ torch.linalg.inv(S)
        mean = m + (x_t.double() - m @ p.C.T) @ K.T
        cov = (torch.eye(p.z_dim, dtype=torch.float64, device=P.device) - K @ p.C) @ P
        cov = 0.5 * (cov + cov.T)
        Lc = torch.linalg.cholesky(cov)
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float64, device=mean.device)
        z = mean + eps @ Lc.T
        log_q = torch.distributions.MultivariateNormal(mean, scale_tril=Lc).log_prob(z)
        pred = torch.distributions.MultivariateNormal(m @ p.C.T, covariance_matrix=S)
        return z.to(dt), log_q.to(dt), pred.log_prob(x_t.double()).to(dt)

    def optimal_sample_step(self, t: int, prep, x_t: Tensor, c_t: Tensor, z_prev: Tensor, mu_p: Tensor, lv_p: Tensor,
                            generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, None]:
        """``optimal_step`` in the proposal signature of ``amortlab.evaluation.smc.smc_log_likelihood``."""
        z, log_q, _ = self.optimal_step(x_t, z_prev, t == 0, generator)
        return z, log_q, None

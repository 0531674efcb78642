"""Amortized variational filtering (Marino, Cvitkovic & Yue 2018), ``inference=avf``.

At every step t the filter starts at the model's prediction and takes ``steps`` learned iterative updates of
lambda_t = (mu, log sigma^2) ``[k, B, 2Z]`` that read how good the current estimate is for that step's term of the
filtering bound,

    L_t(lambda) = E_{z_t ~ q_lambda}[log p(x_t | z_t, c_t)] - KL(q_lambda(z_t) || p(z_t | z_{t-1}, c_t))
    lambda^0 = (mu_p, lv_p),   (a, delta) = f_phi(x_t - x_bar, e_t(lambda^i), lambda^i),
    lambda^{i+1} = sigmoid(a) * lambda^i + (1 - sigmoid(a)) * delta        (log sigma^2 clamped to [-15, 15])

with the encodings of the static ``inference=iterative`` (first-order: every input detached):

- ``encoding=gradient``: e_t = [log(|grad_lambda L_t| + 1e-5), sign(grad_lambda L_t)], the gradient from
  ``n_grad_samples`` reparameterised draws and the closed-form KL, theta held constant;
- ``encoding=error``: e_t = [x_t - mean_s E[x_t | z_s, c_t], mean_s (mu_p - z_s) / sigma_p] for s = 1..n_grad_samples
  draws z_s ~ q_lambda (the observation's and the state's prediction errors).

z_t is drawn from the final lambda^S and the next step predicts from it.

Training (one backward pass): theta and phi minimise -L_k of the final filter (the bound over sequences of
``amortlab.methods.filtering``); phi also gets (1/S) sum_{i<S} sum_t -L_t(lambda^i_t) (intermediate iterates scored
with theta frozen), so every update learns to improve its step's term.

Evaluation: ``neg_elbo_step/<i>`` (i = 0..S) = -sum_t L_t(lambda^i_t) per sequence along the trajectories of the final
filter (i = 0: the prior's prediction, the bound of the bootstrap filter q = p(z_t | .)), averaged over the
evaluation's ``kl_samples`` trajectories; they should fall with i (the AVF steps improve each step's term).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from amortlab.errors import AmortlabError
from amortlab.grad import local_grad
from amortlab.methods.filtering import SequenceELBOModule, SequencePosterior
from amortlab.models.sequence import LOGVAR_MAX, LOGVAR_MIN, gaussian_kl
from amortlab.nets.sequence import SplitMLP
from amortlab.objectives import k_sample_bound, log_weights

ENCODINGS = ("gradient", "error")


class AVF(SequenceELBOModule):
    """Amortized variational filtering (module docstring).

    Args:
        model: the sequence model. steps: S >= 1 updates per time step. encoding: ``gradient`` | ``error``.
        hidden, activation: the update network. n_grad_samples: draws behind each gradient (or error) input.
    """

    method_name = "avf"

    def __init__(self, steps: int = 1, encoding: str = "gradient", hidden: Sequence[int] = (256,),
                 activation: str = "elu", n_grad_samples: int = 1, **kwargs):
        if int(steps) < 1 or int(n_grad_samples) < 1 or encoding not in ENCODINGS:
            raise AmortlabError(f"inference=avf needs steps >= 1, n_grad_samples >= 1 and encoding in "
                                f"{', '.join(ENCODINGS)} (got inference.steps={steps}, inference.n_grad_samples="
                                f"{n_grad_samples}, inference.encoding={encoding!r}); Marino et al. use 1 to 5 steps.")
        super().__init__(**kwargs)
        self.S, self.n_grad_samples, self.encoding = int(steps), int(n_grad_samples), encoding
        Z, X = self.z_dim, self.model.step_dim
        state = 6 * Z if encoding == "gradient" else X + 3 * Z
        self.update_net = SplitMLP(X, state, list(hidden), 4 * Z, activation)
        self.register_eval_metrics(*[f"neg_elbo_step/{i}" for i in range(self.S + 1)])

    def step_term(self, x_t: Tensor, c_t: Tensor, lam: Tensor, mu_p: Tensor, lv_p: Tensor, n: int,
                  generator: torch.Generator | None, frozen: bool) -> Tensor:
        """L_t(lambda) ``[k, B]`` from ``n`` reparameterised draws and the closed-form KL; ``frozen`` holds theta."""
        mu, lv = lam.chunk(2, -1)
        eps = torch.randn((n, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * lv) * eps  # [n, k, B, Z]
        args = (x_t, z, c_t)
        log_px = self.model.call_frozen("log_emission", *args) if frozen else self.model.log_emission(*args)
        return log_px.mean(0) - gaussian_kl(mu, lv, mu_p, lv_p)

    def encode(self, x_t: Tensor, c_t: Tensor, lam: Tensor, mu_p: Tensor, lv_p: Tensor,
               generator: torch.Generator | None) -> Tensor:
        """The detached state input of an update for lambda ``[k, B, 2Z]`` (module docstring): ``[k, B, 6Z]``
        (gradient) or ``[k, B, X + 3Z]`` (error)."""
        if self.encoding == "gradient":
            with local_grad():
                leaf = lam.clone().requires_grad_(True)
                term = self.step_term(x_t.detach().clone(), c_t.detach().clone(), leaf, mu_p.clone(), lv_p.clone(),
                                      self.n_grad_samples, generator, frozen=True)
                (grad,) = torch.autograd.grad(term.sum(), leaf)  # per sequence and trajectory
            return torch.cat([torch.log(grad.abs() + 1e-5), torch.sign(grad), lam], -1)
        with torch.no_grad():
            mu, lv = lam.chunk(2, -1)
            eps = torch.randn((self.n_grad_samples, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
            z = mu + torch.exp(0.5 * lv) * eps  # [n, k, B, Z]
            eps_x = x_t - self.model.emission_mean(z, c_t).mean(0)
            eps_z = ((mu_p - z) * torch.exp(-0.5 * lv_p)).mean(0)
        return torch.cat([eps_x, eps_z, lam], -1)

    def prepare(self, x: Tensor, c: Tensor) -> Tensor:
        return self.update_net.data_features(x - self.x_center)  # [B, T, H1]

    def propose(self, t, prep, x_t, c_t, z_prev, mu_p, lv_p, generator) -> tuple[Tensor, Tensor, Any]:
        """The S updates from lambda^0 = (mu_p, lv_p); info = (iterates [lambda^0..lambda^S], phi-terms ``[k, B]``
        of the intermediate iterates when training, else None)."""
        lam = torch.cat([mu_p, lv_p], -1).detach()
        lams = [lam]
        training = torch.is_grad_enabled()
        for _ in range(self.S):
            inputs = self.encode(x_t, c_t, lam.detach(), mu_p.detach(), lv_p.detach(), generator)
            a, delta = self.update_net(prep[:, t], inputs).chunk(2, -1)
            g = torch.sigmoid(a)
            lam = g * lam.detach() + (1.0 - g) * delta
            mu, lv = lam.chunk(2, -1)
            lam = torch.cat([mu, lv.clamp(LOGVAR_MIN, LOGVAR_MAX)], -1)
            lams.append(lam)
        phi_terms = None
        if training and self.S > 1:
            phi_terms = torch.stack([self.step_term(x_t, c_t.detach(), lm, mu_p.detach(), lv_p.detach(), 1, generator,
                                                    frozen=True) for lm in lams[1:-1]]).sum(0)
        mu, lv = lams[-1].chunk(2, -1)
        return mu, lv, (lams, phi_terms)

    def bound(self, x: Tensor, k: int, x_enc: Tensor | None = None) -> Tensor:
        """Training surrogate ``[B]``: value L_k of the final filter; phi's gradient also from the intermediate
        iterates' step terms (module docstring)."""
        q: SequencePosterior = self.infer(x)
        z, log_q = q.rsample_with_log_prob(k)
        log_px, log_pz = self.model.log_joint_steps(q.x, q.mask, z, context=q.context)
        final = k_sample_bound(log_weights(log_px.sum(-1), log_pz.sum(-1), log_q, self.prior_weight,
                                           self.entropy_weight))
        terms = [info[1] * q.mask[:, t] for t, info in enumerate(q.trace.infos) if info[1] is not None]
        if not terms:
            return final
        rest = torch.stack(terms).sum(0).mean(0) / self.S  # [B]
        return final + (rest - rest.detach())

    def step_metrics(self, q: SequencePosterior, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``neg_elbo_step/<i>`` ``[B]``: -sum_t L_t(lambda^i_t) along the drawn trajectories (one draw per term)."""
        trace, mask = q.trace, q.mask
        q_sum = [0.0] * (self.S + 1)
        for t, (lams, _) in enumerate(trace.infos):
            x_t, c_t = q.x[:, t], q.context[:, t]
            for i, lam in enumerate(lams):
                term = self.step_term(x_t, c_t, lam, trace.mu_p[:, :, t], trace.lv_p[:, :, t], 1, generator,
                                      frozen=False)
                q_sum[i] = q_sum[i] + term * mask[:, t]
        return {f"neg_elbo_step/{i}": -v.mean(0) for i, v in enumerate(q_sum)}

    def tags(self) -> list[str]:
        return [f"avf{self.S}", *super().tags(), f"steps:{self.S}", f"encoding:{self.encoding}"]

    def axes(self) -> dict[str, Any]:
        return {**super().axes(), "steps": self.S, "encoding": self.encoding}

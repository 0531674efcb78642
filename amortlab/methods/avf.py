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

Training, ``objective`` (one backward pass; annealing weights a on log p(z), b on log q, ``amortlab.callbacks``):

- ``published`` (default; Marino et al. 2018 and their code): the generative model theta minimises the total free
  energy -L_k of the final filter, with q held fixed (its draws z_1:T and log q detached: no gradient reaches phi);
  the update network phi minimises each step's free energy averaged over the iterates,

      F_phi = -(1/S) sum_{i=1..S} sum_t L^{a,b}_t(lambda^i_t),
      L^{a,b}_t(lambda) = E_q[log p(x_t | z_t, c_t)] - a KL(q_lambda || p(z_t | z_{t-1}, c_t)) + (b - a) H(q_lambda)

  with theta held constant and c_t (the recurrent state h_t) and z_{t-1} detached: phi learns to improve the term of
  its own step, not later steps' priors. One reparameterised draw per term, averaged over the k trajectories.
- ``sequence_bound``: theta and phi both minimise -L_k of the final filter (phi's final update also gets the
  gradient of later steps' terms through z_t, e.g. d log p(z_{t+1} | z_t) / dz_t); phi additionally gets
  (1/S) sum_{i<S} sum_t -L^{a,b}_t(lambda^i_t) from the intermediate iterates.

The encodings' gradient uses L^{a,b}_t as well (the gradient of the objective being trained; a = b = 1 at evaluation).

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
from amortlab.objectives import LOG_2PI, k_sample_bound, log_weights

ENCODINGS = ("gradient", "error")
OBJECTIVES = ("published", "sequence_bound")


def gaussian_entropy(lv: Tensor) -> Tensor:
    """H(N(mu, diag e^lv)) = 0.5 sum (1 + log 2 pi + lv) over the last dim: ``[...]``."""
    return 0.5 * (lv + 1.0 + LOG_2PI).sum(-1)


class AVF(SequenceELBOModule):
    """Amortized variational filtering (module docstring).

    Args:
        model: the sequence model. steps: S >= 1 updates per time step. encoding: ``gradient`` | ``error``.
        hidden, activation: the update network. n_grad_samples: draws behind each gradient (or error) input.
        objective: ``published`` (theta on the total free energy, phi on the per-step free energies averaged over
            the iterates) | ``sequence_bound`` (both on the sequence bound, phi also on the intermediate iterates).
    """

    method_name = "avf"

    def __init__(self, steps: int = 1, encoding: str = "gradient", hidden: Sequence[int] = (256,),
                 activation: str = "elu", n_grad_samples: int = 1, objective: str = "published", **kwargs):
        if int(steps) < 1 or int(n_grad_samples) < 1 or encoding not in ENCODINGS:
            raise AmortlabError(f"inference=avf needs steps >= 1, n_grad_samples >= 1 and encoding in "
                                f"{', '.join(ENCODINGS)} (got inference.steps={steps}, inference.n_grad_samples="
                                f"{n_grad_samples}, inference.encoding={encoding!r}); Marino et al. use 1 to 5 steps.")
        if objective not in OBJECTIVES:
            raise AmortlabError(f"inference.objective={objective!r} is not one of {', '.join(OBJECTIVES)}: published "
                                f"(Marino et al.: the update network on each step's free energy, averaged over the "
                                f"updates; the model on the total) or sequence_bound (both on the sequence bound).")
        super().__init__(**kwargs)
        self.S, self.n_grad_samples, self.encoding = int(steps), int(n_grad_samples), encoding
        self.objective = objective
        Z, X = self.z_dim, self.model.step_dim
        state = 6 * Z if encoding == "gradient" else X + 3 * Z
        self.update_net = SplitMLP(X, state, list(hidden), 4 * Z, activation)
        self.register_eval_metrics(*[f"neg_elbo_step/{i}" for i in range(self.S + 1)])

    def step_term(self, x_t: Tensor, c_t: Tensor, lam: Tensor, mu_p: Tensor, lv_p: Tensor, n: int,
                  generator: torch.Generator | None, frozen: bool, annealed: bool = False) -> Tensor:
        """L^{a,b}_t(lambda) ``[k, B]`` (module docstring) from ``n`` reparameterised draws and the closed-form KL and
        entropy; ``annealed`` applies the current annealing weights (a = b = 1 otherwise); ``frozen`` holds theta."""
        mu, lv = lam.chunk(2, -1)
        eps = torch.randn((n, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * lv) * eps  # [n, k, B, Z]
        args = (x_t, z, c_t)
        log_px = self.model.call_frozen("log_emission", *args) if frozen else self.model.log_emission(*args)
        a, b = (self.prior_weight, self.entropy_weight) if annealed else (1.0, 1.0)
        term = log_px.mean(0) - a * gaussian_kl(mu, lv, mu_p, lv_p)
        return term if a == b else term + (b - a) * gaussian_entropy(lv)

    def encode(self, x_t: Tensor, c_t: Tensor, lam: Tensor, mu_p: Tensor, lv_p: Tensor,
               generator: torch.Generator | None) -> Tensor:
        """The detached state input of an update for lambda ``[k, B, 2Z]`` (module docstring): ``[k, B, 6Z]``
        (gradient) or ``[k, B, X + 3Z]`` (error)."""
        if self.encoding == "gradient":
            with local_grad():
                leaf = lam.clone().requires_grad_(True)
                # theta enters as is: autograd.grad below differentiates w.r.t. the leaf only (theta gets nothing)
                term = self.step_term(x_t.detach().clone(), c_t.detach().clone(), leaf, mu_p.clone(), lv_p.clone(),
                                      self.n_grad_samples, generator, frozen=False, annealed=self.training)
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
        """The S updates from lambda^0 = (mu_p, lv_p); info = (iterates [lambda^0..lambda^S], phi's step terms
        ``[k, B]`` when training -- sum_{i=1..S} L^{a,b}_t(lambda^i) (``published``) or sum_{i<S} (``sequence_bound``),
        theta held constant, c_t and z_{t-1} (through mu_p, lv_p) detached -- else None)."""
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
        scored = lams[1:] if self.objective == "published" else lams[1:-1]
        if training and scored:
            phi_terms = torch.stack([self.step_term(x_t, c_t.detach(), lm, mu_p.detach(), lv_p.detach(), 1, generator,
                                                    frozen=True, annealed=True) for lm in scored]).sum(0)
        mu, lv = lams[-1].chunk(2, -1)
        return mu, lv, (lams, phi_terms)

    def training_terms(self, q: SequencePosterior, k: int) -> tuple[Tensor, Tensor]:
        """(L, F) ``[B]`` of one draw of k trajectories from ``q`` (module docstring): L = the annealed L_k of the final
        filter and F = (1/S) sum over the scored iterates and steps of L^{a,b}_t, averaged over the k trajectories.
        ``published``: L with q's draws detached (reaches theta only), F reaches phi only; ``sequence_bound``: L also
        reaches phi. The training surrogate is L + (F - F.detach())."""
        z, log_q = q.rsample_with_log_prob(k)
        if self.objective == "published":
            z, log_q = z.detach(), log_q.detach()
        log_px, log_pz = self.model.log_joint_steps(q.x, q.mask, z, context=q.context)
        total = k_sample_bound(log_weights(log_px.sum(-1), log_pz.sum(-1), log_q, self.prior_weight,
                                           self.entropy_weight))
        terms = [info[1] * q.mask[:, t] for t, info in enumerate(q.trace.infos) if info[1] is not None]
        steps = torch.stack(terms).sum(0).mean(0) / self.S if terms else torch.zeros_like(total)
        return total, steps

    def bound(self, x: Tensor, k: int, x_enc: Tensor | None = None) -> Tensor:
        """Training surrogate ``[B]``: the value of L_k of the final filter (annealed); the gradients of the
        ``objective`` (``training_terms``: L + (F - F.detach()))."""
        total, steps = self.training_terms(self.infer(x), k)
        return total + (steps - steps.detach())

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
        return [f"avf{self.S}", *super().tags(), f"steps:{self.S}", f"encoding:{self.encoding}",
                f"objective:{self.objective}"]

    def axes(self) -> dict[str, Any]:
        return {**super().axes(), "steps": self.S, "encoding": self.encoding, "objective": self.objective}

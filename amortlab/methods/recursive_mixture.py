"""Recursive mixture inference (RecMix; Kim & Pavlovic, NeurIPS 2020): ``inference=recursive_mixture``.

M amortized Gaussian encoders q_1..q_M (copies of the model's ``encoder`` node; copy 1 keeps the built encoder's
initialisation, copies 2..M are re-initialised; each wrapped by the encoder regularizer) form the recursive mixture

    Q_1 = q_1,   Q_m = (1 - eps) Q_{m-1} + eps q_m   =>   Q_M = sum_j w_j q_j,
    w_1 = (1 - eps)^(M-1),   w_m = eps (1 - eps)^(M-m) (m >= 2),   sum_j w_j = 1.

Default eps = 1/2: M = 2 is an even mixture, the newest component (the one trained to cover what the others miss)
holds half the mass, no component falls below 2^-(M-1) (>= 1/16 for M <= 5), and k w_j is an integer for k a
multiple of 2^(M-1), so stratified draws are allocated deterministically. Test time: M encoder passes, no gradient
steps (``infer``).

Training, one summed loss and one backward pass per batch (``bound`` returns its per-example surrogate):

1. Mixture bound, for theta and all components, from k = importance_samples.train reparameterised draws per
   component, z_ij = mu_j + sigma_j eps_ij ``[k, M, B, Z]``, log w_ij = log p(x, z_ij) - log Q(z_ij)
   (log Q by logsumexp over components; annealing weights on log p(z) and log Q):
       k = 1:  sum_j w_j log w_1j            (stratified estimate of L[Q] = sum_j w_j E_{q_j}[log p(x,z) - log Q(z)])
       k > 1:  log sum_j w_j (1/k) sum_i exp(log w_ij)   (stratified IWAE bound; <= log p(x) since its argument is
               unbiased for p(x); M = 1 gives the IWAE-k)
   k = 1 is the ELBO, as for every method here (the one-draw-per-component SIWAE log sum_j w_j w_1j would already be
   an importance-weighted bound). Training costs k * M decoder rows per point; evaluation's k counts all draws.
2. New-component objectives (methods.md §5, the functional-gradient criterion), for m = 2..M, phi_m only:
       ELBO(q_m) + kl_weight * KL(q_m || sg Q_{m-1})
         ~ mean_i [log p_sg(theta)(x, z_im) - log q_m(z_im) + kl_weight (log q_m(z_im) - log sg Q_{m-1}(z_im))],
   reusing the draws z_im of step 1 (gradients reach phi_m through z_im and q_m; theta and the earlier components
   are held constant). The KL is *added*: it rewards a new component for being different from the mixture so far;
   with kl_weight = 1 this is E_{q_m}[log p(x, z) - log Q_{m-1}(z)], the derivative d/d eps L[(1 - eps) Q_{m-1} +
   eps q_m] at eps = 0 up to a constant. q_1 has no such term (it is trained by the mixture bound like the VAE's
   encoder), so M = 1 is the VAE / IWAE-k exactly: same loss, same gradients, same random draws.
   Default kl_weight = 0.01, not 1: the reward is unbounded. For q_m broad in a direction where Q_{m-1} is narrow
   (sigma_Q < 1) and the decoder saturates (tanh/ELU MLP: log p(x | z) flattens far from the data), the KL grows like
   sigma_q^2 / sigma_Q^2 while ELBO(q_m) falls only like sigma_q^2 / 2 (the prior) — and at weight 1 the entropy
   term of ELBO(q_m) cancels altogether. On digits (M = 3, 30 epochs) kl_weight = 1 drove q_2's ELBO to -1e21 and
   0.5 to -135 nats; 0.1 stayed stable there (val ELBO -20.5; kl_weight = 0: -20.7; VAE: -21.1; one seed) but
   diverged on binarized MNIST within 30 epochs (mixture -ELBO 3.7e21); 0.01 did not (study methods_reduced).
The loss is -(mixture bound) - sum_{m>=2} (component objective m), averaged over the batch; its value is the
mixture bound's (train/loss = -L_k[Q]).

Evaluation uses the base estimators unchanged on ``MixtureGaussian`` (k stratified draws in all, exact log Q; see
distributions/mixture.py for why (1/k) sum w stays unbiased for p(x) and the mean log-weight for L[Q]).
``evaluation=gaps`` treats the mixture as a member of the Gaussian (FFG) world: approximation / amortization gaps are
against q*_FFG (a richer mixture can beat q*_FFG, giving a negative amortization gap); q*_FFG starts at the prior, or
at the heaviest component with ``evaluation.estimator.qstar.init=encoder`` (``MixtureGaussian.mu`` / ``logvar``).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from amortlab.distributions import DiagGaussian, MixtureGaussian
from amortlab.distributions.mixture import pairwise_log_prob, recursive_mixture_weights
from amortlab.errors import AmortlabError
from amortlab.methods.base import ELBOModule
from amortlab.objectives import log_mean_exp, log_weights


def _reinitialise(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return module


class RecursiveMixtureVAE(ELBOModule):
    """RecMix with ``components`` = M encoders, mixing step ``epsilon`` and ``kl_weight``; see the module docstring."""

    method_name = "recursive_mixture"

    def __init__(self, encoder: nn.Module, decoder: nn.Module | None = None, components: int = 3,
                 epsilon: float = 0.5, kl_weight: float = 0.01, **kwargs):
        M, epsilon, kl_weight = int(components), float(epsilon), float(kl_weight)
        problems = []
        if M < 1:
            problems.append(f"inference.components={components} (needs M >= 1; M = 1 is the VAE, the paper uses 2..5)")
        if M > 1 and not 0.0 < epsilon < 1.0:
            problems.append(f"inference.epsilon={epsilon} (needs 0 < epsilon < 1, else a component gets weight 0)")
        if kl_weight < 0:
            problems.append(f"inference.kl_weight={kl_weight} (needs >= 0; 0 turns the diversity reward off)")
        if getattr(encoder, "latent_dims", None) and len(encoder.latent_dims) > 1:
            problems.append(f"the model has {len(encoder.latent_dims)} stochastic layers, but the mixture's components "
                            f"are diagonal Gaussians over one layer (use inference=amortized, ladder, iterative or "
                            f"sa_vae with a hierarchical model)")
        elif not issubclass(type(encoder).family, DiagGaussian):
            problems.append(f"the model's encoder gives a {type(encoder).family.__name__} q, but the mixture's "
                            f"components are diagonal Gaussians (use posterior=gaussian; RecMix's bound needs every "
                            f"component's density at the other components' draws, which an IAF gives only through "
                            f"Z*T inverse passes and a coupling flow not at all, so compare RecMix with "
                            f"posterior=iaf as separate settings, as study=expressive_reduced does)")
        if problems:
            raise AmortlabError("inference=recursive_mixture cannot be built: " + "; ".join(problems) + ". Fix "
                                "these values (see conf/inference/recursive_mixture.yaml for the defaults).")
        super().__init__(decoder=decoder, **kwargs)
        if not self.model.flat:
            raise AmortlabError("inference=recursive_mixture mixes Gaussians over one latent layer; this model has "
                                f"{len(self.model.latent_dims)}. Use inference=amortized.")
        self.M, self.epsilon, self.kl_weight = M, epsilon, kl_weight
        encoders = [encoder] + [_reinitialise(copy.deepcopy(encoder)) for _ in range(M - 1)]
        self.encoders = nn.ModuleList([self.regularizer.wrap_encoder(e) for e in encoders])
        # weights as Python floats, made into tensors of q's dtype when used (a float32 buffer cast to float64 would
        # carry float32 rounding into a float64 model)
        self.weights = recursive_mixture_weights(M, epsilon)
        # row r: weights of Q_{r+1} (components 1..r+1; 0 for the rest), the "previous mixture" of q_{r+2}
        self.prev_weights = [recursive_mixture_weights(r + 1, epsilon) + [0.0] * (M - r - 1) for r in range(M - 1)]

    @property
    def posterior_family(self) -> type:
        """A mixture for M > 1; the one Gaussian component for M = 1 (the VAE's q)."""
        return MixtureGaussian if self.M > 1 else DiagGaussian

    def components(self, x: Tensor) -> list[DiagGaussian]:
        return [enc(x) for enc in self.encoders]

    def infer(self, x: Tensor) -> MixtureGaussian | DiagGaussian:
        """Q(z | x) = sum_j w_j q_j(z | x): M encoder passes (M = 1: q_1 itself)."""
        if self.M == 1:
            return self.encoders[0](x)
        return MixtureGaussian.from_components(self.components(x), self.weights)

    def bound(self, x: Tensor, k: int, x_enc: Tensor | None = None) -> Tensor:
        """Training surrogate ``[B]`` (module docstring): value = the stratified mixture bound; gradients = mixture
        bound (theta, all phi) + new-component objectives (phi_m, m >= 2). Components read ``x_enc``, p scores x."""
        if self.M == 1:
            return super().bound(x, k, x_enc)  # the VAE / IWAE-k, bit for bit
        q = self.infer(x if x_enc is None else x_enc)
        M, B, Z = q.mus.shape
        eps = torch.randn((k, M, B, Z), dtype=q.mus.dtype, device=q.mus.device)
        z = q.mus + torch.exp(0.5 * q.logvars) * eps  # [k, M, B, Z]: draw i of component j
        log_qq = pairwise_log_prob(z, q.mus, q.logvars)  # [k, M (drawn from), M (density of), B]
        log_Q = torch.logsumexp(q.log_w + log_qq, dim=2)  # [k, M, B]
        log_pz = self.model.log_prior(z)
        log_px_z = self.model.log_likelihood(x, z.reshape(k * M, B, Z)).reshape(k, M, B)
        lw = log_weights(log_px_z, log_pz, log_Q, self.prior_weight, self.entropy_weight)  # [k, M, B]
        if k == 1:
            mixture = (q.log_w.exp() * lw[0]).sum(0)
        else:
            mixture = torch.logsumexp(q.log_w + log_mean_exp(lw, 0), dim=0)

        # new components m = 2..M: ELBO(q_m) + kl_weight KL(q_m || sg Q_{m-1}), theta and Q_{m-1} held constant
        z_new = z[:, 1:]  # [k, M-1, B, Z]
        log_q_own = torch.diagonal(log_qq, dim1=1, dim2=2).movedim(-1, 1)[:, 1:]  # log q_m(z_im), [k, M-1, B]
        log_qq_sg = pairwise_log_prob(z_new, q.mus.detach(), q.logvars.detach())  # [k, M-1, M, B]
        log_w_prev = torch.tensor(self.prev_weights, dtype=torch.float64).log().to(z)  # [M-1, M], -inf = absent
        log_Q_prev = torch.logsumexp(log_w_prev.unsqueeze(-1) + log_qq_sg, dim=2)  # [k, M-1, B]
        log_px_z_sg = self.model.log_likelihood(x, z_new.reshape(k * (M - 1), B, Z), frozen=True).reshape(
            k, M - 1, B)
        elbo_m = log_weights(log_px_z_sg, log_pz[:, 1:], log_q_own, self.prior_weight, self.entropy_weight)
        new = (elbo_m + self.kl_weight * (log_q_own - log_Q_prev)).mean(0).sum(0)  # [B]
        return mixture + (new - new.detach())

    def tags(self) -> list[str]:
        return [f"recmix{self.M}", *super().tags(), f"M:{self.M}", f"epsilon:{self.epsilon:g}",
                f"kl_weight:{self.kl_weight:g}"]

    def axes(self) -> dict[str, Any]:
        return {**super().axes(), "M": self.M, "epsilon": self.epsilon, "kl_weight": self.kl_weight}

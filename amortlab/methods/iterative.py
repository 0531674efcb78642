"""Iterative amortized inference (Marino, Yue & Mandt, ICML 2018): ``inference=iterative``.

q(z | x) = N(mu, diag exp(logvar)) with lambda = (mu, logvar) ``[B, 2Z]`` refined T times by a learned update network
f_phi (an MLP; ELU by default) that reads the current estimate and how good it is:

    (a, delta) = f_phi(inputs_t),   g = sigmoid(a),   lambda_{t+1} = g * lambda_t + (1 - g) * delta,

log sigma^2 clamped to [-15, 15] after every update. lambda_0 is the prior (0, 0) (``init=prior``, Marino et al.) or
a standard amortized encoder's output (``init=encoder``; the model's ``encoder`` node). Every input is detached
(first-order: nothing is back-propagated through the iterations; lambda_t is detached before it enters update t+1):

- ``encoding=gradient``: [x - x_bar, log(|grad_lambda L| + 1e-5), sign(grad_lambda L), lambda_t] ``[B, X + 6Z]``,
  x_bar the training-data mean (set with the decoder's output bias; 0.5 until then), L the ELBO of q_{lambda_t} from
  ``n_grad_samples`` reparameterised samples; the gradient is per example (of sum_b L_b, not of the batch mean).
- ``encoding=error``: [eps_x, eps_z, lambda_t] ``[B, X + 3Z]`` with, for s = 1..n_grad_samples draws z_s ~ q_{lambda_t},
  eps_x = x - mean_s E[x | z_s] (Bernoulli: x - p; methods.md's (mu_x - x)/sigma_x up to sign, which the linear first
  layer absorbs) and eps_z = mean_s (mu_p - z_s)/sigma_p, per layer with (mu_p, sigma_p) of p(z_l | z_{l+1, s})
  (``GenerativeModel.prior_residual``; -mean_s z_s for one N(0, I) layer). lambda_t is also fed (it is what the gate
  mixes; the errors alone hold it only through one noisy sample).

Hierarchical models (Marino et al. 2018's hierarchical experiments): lambda holds every layer's (mu, log sigma^2),
q = a factorised Gaussian over all layers ``[B, 2 sum_l D_l]``; the gradient of the ELBO w.r.t. it, and the prior's
per-layer prediction errors, carry the structure p(z_l | z_{l+1}) into each layer's update.

Training (one backward pass): phi minimises the mean over iterates of -L_k(lambda_t), t in S = {1..T} ({0..T} with
``init=encoder``, so the encoder is trained on its own bound), L_k the k-sample bound (k = importance_samples.train,
annealing weights applied); the decoder theta is trained on the final iterate only, -L_k(lambda_T). ``bound`` returns
the per-example surrogate whose value is L_k(lambda_T) (so train/loss is -L_k of the final q, like every method) and
whose gradients are exactly these: the t < T terms score z with a theta-frozen copy of the decoder
(``frozen_decoder=True``: gradients still reach phi through z and q), and the final
term reads lambda_T' = sg(lambda_T) + (lambda_T - sg(lambda_T)) / |S| (value lambda_T, phi-gradient scaled by 1/|S|).
With ``encoder_regularizer=denoising`` (or adversarial) the iterations read the perturbed x_enc everywhere (the x input,
the gradient / errors are of the bound at x_enc) while every L_k scores the clean x; weight_norm / spectral_norm wrap
the update network and the encoder.

Evaluation: the same T iterations (gradients enabled locally; noise from a generator seeded per batch), then the
usual IWAE-k / gap estimates from q_{lambda_T}. ``neg_elbo_iter/<t>`` (t = 0..T) are the -ELBOs of the iterates from
``eval_elbo_samples`` samples (they should fall with t; computed outside the timed ``infer_seconds``), and with
``init=encoder`` ``neg_elbo_encoder`` is the encoder's -ELBO.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from amortlab.distributions import DiagGaussian
from amortlab.errors import AmortlabError
from amortlab.evaluation import chunk_size, iwae_estimate
from amortlab.grad import local_grad
from amortlab.methods.base import ELBOModule, EvalInference
from amortlab.nets.mlp import MLP
from amortlab.objectives import k_sample_bound

ENCODINGS = ("gradient", "error")
INITS = ("prior", "encoder")
LOGVAR_MIN, LOGVAR_MAX = -15.0, 15.0


def _q(lam: Tensor) -> DiagGaussian:
    mu, logvar = lam.chunk(2, dim=-1)
    return DiagGaussian(mu, logvar)


class IterativeVAE(ELBOModule):
    """Iterative amortized inference; see the module docstring.

    Args:
        decoder: p_theta(x | z).
        x_dim: data dimension X (input size of the update network).
        encoder: the model's Gaussian encoder; used (and trained) only with ``init=encoder``.
        iterations: T >= 1 updates.
        encoding: ``gradient`` | ``error``.
        init: ``prior`` (lambda_0 = 0) | ``encoder``.
        hidden, activation: the update network's hidden sizes and activation.
        n_grad_samples: samples behind each gradient (or error) input.
        eval_elbo_samples: samples of each per-iteration ELBO estimate at evaluation.
    """

    method_name = "iterative"

    def __init__(self, decoder: nn.Module | None = None, x_dim: int = 0, encoder: nn.Module | None = None,
                 iterations: int = 5,
                 encoding: str = "gradient", init: str = "prior", hidden: Sequence[int] = (512, 512),
                 activation: str = "elu", n_grad_samples: int = 1, eval_elbo_samples: int = 100, **kwargs):
        problems = []
        if int(iterations) < 1:
            problems.append(f"inference.iterations={iterations} (needs T >= 1; Marino et al. use 5)")
        if encoding not in ENCODINGS:
            problems.append(f"inference.encoding={encoding!r} (use gradient or error)")
        if init not in INITS:
            problems.append(f"inference.init={init!r} (use prior or encoder)")
        if init == "encoder" and encoder is None:
            problems.append("inference.init=encoder without an encoder (set inference.encoder=${model.encoder})")
        elif init == "encoder" and not type(encoder).family.capabilities.local_params:
            problems.append(f"inference.init=encoder with a {type(encoder).family.__name__} encoder (lambda_0 needs "
                            f"a Gaussian q: posterior=gaussian, or init=prior)")
        if int(x_dim) < 1:
            problems.append(f"x_dim={x_dim} (the data dimension; train.py fills it in from the dataset)")
        if int(n_grad_samples) < 1 or int(eval_elbo_samples) < 1:
            problems.append(f"inference.n_grad_samples={n_grad_samples} / eval_elbo_samples={eval_elbo_samples} "
                            f"(both need >= 1)")
        if problems:
            raise AmortlabError("inference=iterative cannot be built: " + "; ".join(problems) + ". Fix these values "
                                "(see conf/inference/iterative.yaml for the defaults).")
        super().__init__(decoder=decoder, **kwargs)
        self.T, self.encoding, self.init = int(iterations), encoding, init
        self.n_grad_samples, self.eval_elbo_samples = int(n_grad_samples), int(eval_elbo_samples)
        Z = self.z_dim
        in_dim = x_dim + (6 * Z if encoding == "gradient" else 3 * Z)
        self.update_net = self.regularizer.wrap_encoder(MLP(in_dim, list(hidden), 4 * Z, activation))
        self.encoder = self.regularizer.wrap_encoder(encoder) if init == "encoder" else None
        self.register_buffer("x_center", torch.full((x_dim,), 0.5))
        self.register_eval_metrics(*[f"neg_elbo_iter/{t}" for t in range(self.T + 1)])

    # --- the iterations -------------------------------------------------------------------------------------------
    def _init_lambda(self, x: Tensor) -> Tensor:
        if self.encoder is None:
            return x.new_zeros(len(x), 2 * self.z_dim)
        return self.encoder(x).pack()

    def _inputs(self, x: Tensor, lam: Tensor, generator: torch.Generator | None) -> Tensor:
        """Detached update-network input for the current ``lam`` ``[B, 2Z]`` (x itself stays differentiable)."""
        lam = lam.detach()
        if self.encoding == "gradient":
            with local_grad():
                leaf = lam.clone().requires_grad_(True)
                elbo = self.log_weights(x, _q(leaf), self.n_grad_samples, generator).mean(0)  # [B]
                (grad,) = torch.autograd.grad(elbo.sum(), leaf)  # per example: sum, not mean, over the batch
            return torch.cat([x - self.x_center, torch.log(grad.abs() + 1e-5), torch.sign(grad), lam], dim=-1)
        with torch.no_grad():
            z = _q(lam).rsample(self.n_grad_samples, generator)  # [n, B, Z]
            x_mean = self.model.mean(z).mean(0)
            eps_z = -self.model.prior_residual(z).mean(0)  # (mu_p - z) / sigma_p per layer (-z for N(0, I))
        return torch.cat([x - x_mean, eps_z, lam], dim=-1)

    def iterates(self, x: Tensor, generator: torch.Generator | None = None, track: bool = True) -> list[Tensor]:
        """[lambda_0, ..., lambda_T], each ``[B, 2Z]``; with ``track`` each lambda_t (t >= 1) depends on phi through
        its own update only (and lambda_0 on the encoder)."""
        with torch.set_grad_enabled(track and torch.is_grad_enabled()):
            lam = self._init_lambda(x)
        lams = [lam]
        for _ in range(self.T):
            inputs = self._inputs(x, lam, generator)
            with torch.set_grad_enabled(track and torch.is_grad_enabled()):
                a, delta = self.update_net(inputs).chunk(2, dim=-1)
                g = torch.sigmoid(a)
                lam = g * lam.detach() + (1.0 - g) * delta
                mu, logvar = lam.chunk(2, dim=-1)
                lam = torch.cat([mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)], dim=-1)
            lams.append(lam)
        return lams

    @property
    def posterior_family(self) -> type:
        return DiagGaussian

    def infer(self, x: Tensor) -> DiagGaussian:
        """q_{lambda_T}(z | x) (training graph kept: lambda_T depends on phi)."""
        if x.is_inference():
            with local_grad():
                return _q(self.iterates(x.detach().clone(), track=False)[-1].detach())
        return _q(self.iterates(x)[-1])

    # --- training -------------------------------------------------------------------------------------------------
    def bound(self, x: Tensor, k: int, x_enc: Tensor | None = None) -> Tensor:
        """Training surrogate ``[B]``: value L_k(x; lambda_T); gradients: theta from -L_k(lambda_T) only, phi from
        the mean over t in S of L_k(lambda_t) (module docstring). Draws: the iterations' samples first, then each
        L_k(lambda_t) for t in S in order (t = T last)."""
        lams = self.iterates(x if x_enc is None else x_enc)
        steps = list(range(0 if self.encoder is not None else 1, self.T + 1))
        n = len(steps)
        phi_terms = [k_sample_bound(self.log_weights(x, _q(lams[t]), k, annealed=True, frozen_decoder=True))
                     for t in steps[:-1]]
        lam_T = lams[-1]
        lam_T = lam_T.detach() + (lam_T - lam_T.detach()) / n  # value lambda_T; phi sees 1/|S| of this term
        final = k_sample_bound(self.log_weights(x, _q(lam_T), k, annealed=True))
        if not phi_terms:
            return final
        rest = torch.stack(phi_terms).sum(0) / n
        return final + (rest - rest.detach())

    # --- evaluation -----------------------------------------------------------------------------------------------
    def infer_for_eval(self, x: Tensor, generator: torch.Generator | None = None) -> EvalInference:
        """The T iterations (gradients enabled locally), their noise from ``generator`` (the evaluation's per-batch
        seeded one; a fixed seed when None); with init=encoder the encoder's q is ``q_encoder``. ``after`` reports
        ``neg_elbo_iter/<t>`` ``[B]``: -ELBO of q_{lambda_t}, t = 0..T, each from ``eval_elbo_samples`` samples of
        a generator seeded one above ``generator``'s seed (after the timed inference, so ``infer_seconds`` counts
        only the iterations)."""
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(self.eval_seed)
        seed = (generator.initial_seed() + 1) % (2**63)
        with local_grad():
            lams = [lam.detach() for lam in self.iterates(x.detach().clone(), generator, track=False)]

        def iterate_elbos() -> dict[str, Tensor]:
            gen = torch.Generator(device=x.device).manual_seed(seed)
            n = self.eval_elbo_samples
            chunk = chunk_size(n, len(x), self.eval_rows)
            out = {}
            for t, lam in enumerate(lams):  # one generator, the iterates in order
                q = _q(lam)
                out[f"neg_elbo_iter/{t}"] = -iwae_estimate(lambda m, q=q: self.log_weights(x, q, m, gen), n, chunk)[1]
            return out

        q_encoder = _q(lams[0]) if self.encoder is not None else None
        return EvalInference(_q(lams[-1]), q_encoder=q_encoder, after=iterate_elbos)

    def init_output_bias(self, x_mean: Tensor) -> None:
        super().init_output_bias(x_mean)
        with torch.no_grad():
            self.x_center.copy_(x_mean.to(self.x_center))

    def tags(self) -> list[str]:
        return [f"iterative{self.T}", *super().tags(), f"T:{self.T}", f"encoding:{self.encoding}",
                f"init:{self.init}"]

    def axes(self) -> dict[str, Any]:
        return {**super().axes(), "T": self.T, "encoding": self.encoding, "init": self.init}

"""Semi-amortized inference (Kim, Wiseman, Miller, Sontag & Rush 2018): the encoder's lambda_0 = enc(x) refined by K
steps of SVI (``amortlab.refinement``: momentum SGD on the per-example -L_k, gradients clipped per block).

The four schemes differ only in what each parameter block is trained on (lambda_K = refine(lambda_0)):

    svi         lambda_0 = 0 (the prior; no encoder)      theta on L_k(x; stopgrad lambda_K)
    vae_svi     phi on L_k(x; lambda_0) (decoder frozen)  theta on L_k(x; stopgrad lambda_K)
    vae_svi_kl  phi on -KL(q_lambda_0 || stopgrad q_lambda_K)     theta on L_k(x; stopgrad lambda_K)
    sa_vae      phi and theta on L_k(x; lambda_K(lambda_0(phi), theta)): phi only through the K steps, theta the
                total derivative (direct + through the steps), by the exact reverse pass (Hessian-vector products)

Every scheme reports the refined bound L_k(x; lambda_K) as its training value (the encoder-side terms enter as
``term - stopgrad(term)``: gradient only). Test time runs the same K steps from lambda_0 (noise from the evaluation's
seeded generator); ``neg_elbo_encoder`` / ``neg_elbo_refined`` are the bounds before / after them and
``refine_seconds`` the refinement's wall time per point. With K = 0 every scheme's q is the encoder's and SA-VAE is
the VAE exactly. The encoder regularizers compose: weight norm wraps the encoder; denoising feeds the noisy x to the
encoder only (lambda_0 = enc(x + eps)) while the steps and the bound score the clean x. Over several stochastic
layers lambda holds every layer's (mu, log sigma^2) (a factorised Gaussian over all of them); a layered encoder's q
starts it at its point estimate (``LayeredGaussian.pack``).
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from amortlab.distributions import DiagGaussian, as_factorised, require
from amortlab.errors import AmortlabError
from amortlab.grad import local_grad
from amortlab.methods.base import ELBOModule, EvalInference
from amortlab.objectives import k_sample_bound
from amortlab.refinement import RefinementConfig, SemiAmortizedRefine, gaussian_objective, refine


def _lam(q: DiagGaussian) -> Tensor:
    return q.pack()


def _q(lam: Tensor) -> DiagGaussian:
    return DiagGaussian.unpack(lam)


def _kl(q: DiagGaussian, p: DiagGaussian) -> Tensor:
    """KL(q || p) of diagonal Gaussians ``[B]``
    = (1/2) sum (log s_p^2 - log s_q^2 + (s_q^2 + (m_q - m_p)^2) / s_p^2 - 1)."""
    return 0.5 * (p.logvar - q.logvar + (q.logvar.exp() + (q.mu - p.mu).pow(2)) * torch.exp(-p.logvar) - 1.0).sum(-1)


class SemiAmortizedBase(ELBOModule):
    """Shared machinery: lambda_0, the K refinement steps, test-time refinement. Subclasses set ``bound``.

    Args:
        encoder: Gaussian encoder x -> (mu, log sigma^2) (None for ``svi``).
        refinement: ``RefinementConfig`` fields (K = ``steps``, alpha = ``lr``, gamma = ``momentum``,
            ``max_grad_norm``, ``hvp``).
    """

    method_name = "semi_amortized"
    uses_encoder = True

    def __init__(self, encoder: nn.Module | None = None, refinement: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.refinement = RefinementConfig(**dict(refinement or {}))
        if self.uses_encoder:
            if encoder is None:
                raise AmortlabError(f"inference={self.method_name} needs an encoder (model.encoder).")
            require(type(encoder).family, "local_params", who=f"inference={self.method_name} (it refines lambda = "
                    f"(mu, log sigma^2) per point)", fix="Use posterior=gaussian with this scheme, or "
                    "inference=amortized with posterior=flow.")
            self.encoder = self.regularizer.wrap_encoder(encoder)
        self.register_eval_metrics("refine_seconds")

    @property
    def posterior_family(self) -> type:
        return DiagGaussian

    # --- lambda_0 and the steps -----------------------------------------------------------------------------------
    def infer(self, x: Tensor) -> DiagGaussian:
        """The encoder's q_lambda_0 ``[B, Z]`` (the prior N(0, I) without an encoder). Over several layers lambda
        holds all of them: a layered encoder's q gives the factorised Gaussian at its point estimate (``pack``)."""
        if not self.uses_encoder:
            zeros = x.new_zeros(x.shape[0], self.z_dim)
            return DiagGaussian(zeros, zeros.clone())
        q = self.encoder(x)
        return as_factorised(q)

    def _noise(self, x: Tensor, generator: torch.Generator | None) -> list[Tensor]:
        shape = (self.k_train, x.shape[0], self.z_dim)
        return [torch.randn(shape, dtype=x.dtype, device=x.device, generator=generator)
                for _ in range(self.refinement.steps)]

    def _objective(self, x: Tensor, annealed: bool):
        return gaussian_objective(lambda z, log_q: self.log_weights_at(x, z, log_q, annealed))

    def refine(self, x: Tensor, q0: DiagGaussian, generator: torch.Generator | None = None,
               annealed: bool = False) -> DiagGaussian:
        """q_lambda_K from q0 with lambda_K held constant (no gradient to lambda_0 or theta)."""
        lams = refine(self._objective(x, annealed), _lam(q0).detach(), self._noise(x, generator), self.refinement)
        return _q(lams[-1])

    def refine_differentiable(self, x: Tensor, q0: DiagGaussian) -> DiagGaussian:
        """q_lambda_K whose gradient reaches lambda_0 and the decoder through the K steps (exact reverse pass)."""
        if self.refinement.steps == 0:
            return q0
        params = [p for p in self.model.parameters() if p.requires_grad]
        lam = SemiAmortizedRefine.apply(_lam(q0), self._objective(x, True), self._noise(x, None), self.refinement,
                                        *params)
        return _q(lam)

    def _refined_bound(self, x: Tensor, k: int, q: DiagGaussian) -> Tensor:
        return k_sample_bound(self.log_weights(x, q, k, annealed=True))

    # --- evaluation -----------------------------------------------------------------------------------------------
    def infer_for_eval(self, x: Tensor, generator: torch.Generator | None = None) -> EvalInference:
        """The same K steps from lambda_0 (plain, un-annealed bound), noise from ``generator``; the encoder's q and
        ``refine_seconds`` (wall time of the steps per point) go with the refined q."""
        q0 = self.infer(x)
        start = time.perf_counter()
        with local_grad():
            xc = x.detach().clone()
            q0c = DiagGaussian(q0.mu.detach().clone(), q0.logvar.detach().clone())
            q = self.refine(xc, q0c, generator)
        q = DiagGaussian(q.mu.detach(), q.logvar.detach())
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        seconds = torch.full((x.shape[0],), (time.perf_counter() - start) / x.shape[0], dtype=torch.float64,
                             device=x.device)
        return EvalInference(q, q_encoder=q0, metrics={"refine_seconds": seconds})

    def tags(self) -> list[str]:
        return [self.method_name, f"K:{self.refinement.steps}", *super().tags()]

    def axes(self) -> dict[str, Any]:
        return {**super().axes(), "K": self.refinement.steps}


class SVI(SemiAmortizedBase):
    """``inference=svi``: lambda_0 = 0 for every point, K steps, decoder on L_k(x; stopgrad lambda_K); no encoder."""

    method_name = "svi"
    uses_encoder = False

    def __init__(self, encoder: nn.Module | None = None, **kwargs):
        super().__init__(encoder=None, **kwargs)

    def bound(self, x: Tensor, k: int, x_enc: Tensor | None = None) -> Tensor:
        with torch.no_grad():
            q0 = self.infer(x)
        return self._refined_bound(x, k, self.refine(x, q0, annealed=True))


class VAEPlusSVI(SemiAmortizedBase):
    """``inference=vae_svi``: encoder on its own L_k(x; lambda_0) with the decoder frozen; decoder on
    L_k(x; stopgrad lambda_K)."""

    method_name = "vae_svi"

    def bound(self, x: Tensor, k: int, x_enc: Tensor | None = None) -> Tensor:
        q0 = self.infer(x if x_enc is None else x_enc)
        encoder_term = k_sample_bound(self.log_weights(x, q0, k, annealed=True, frozen_decoder=True))
        refined = self._refined_bound(x, k, self.refine(x, q0, annealed=True))
        return refined + (encoder_term - encoder_term.detach())


class VAEPlusSVIKL(SemiAmortizedBase):
    """``inference=vae_svi_kl``: encoder minimises KL(q_lambda_0 || stopgrad q_lambda_K); decoder on
    L_k(x; stopgrad lambda_K)."""

    method_name = "vae_svi_kl"

    def bound(self, x: Tensor, k: int, x_enc: Tensor | None = None) -> Tensor:
        q0 = self.infer(x if x_enc is None else x_enc)
        qK = self.refine(x, q0, annealed=True)
        kl = _kl(q0, qK)
        return self._refined_bound(x, k, qK) - (kl - kl.detach())


class SAVAE(SemiAmortizedBase):
    """``inference=sa_vae``: L_k(x; lambda_K) with lambda_K = refine(enc(x)) differentiated end to end: the encoder
    only through the K steps, the decoder directly and through them (module docstring of amortlab.refinement)."""

    method_name = "sa_vae"

    def bound(self, x: Tensor, k: int, x_enc: Tensor | None = None) -> Tensor:
        q0 = self.infer(x if x_enc is None else x_enc)
        return self._refined_bound(x, k, self.refine_differentiable(x, q0))

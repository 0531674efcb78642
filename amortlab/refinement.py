"""K steps of SVI on the local variational parameters, and the exact backward pass through them (Kim et al. 2018).

lambda = (mu, log sigma^2) ``[B, 2Z]`` of a diagonal Gaussian q_lambda(z | x). With the decoder theta fixed and
f(lambda) = -sum_b L_k(x_b; lambda_b) (the k-sample bound, the ELBO for k = 1, of every example, *summed* over the
batch), K steps of gradient descent with momentum from lambda_0:

    u_t = clip(grad_lambda f(lambda_t, eps_t)),   v_{t+1} = gamma v_t - u_t,   lambda_{t+1} = lambda_t + alpha v_{t+1},

v_0 = 0, eps_t ``[k, B, Z]`` the reparameterisation noise of step t. Because f is a sum over examples and example b's
bound depends only on lambda_b, each example takes its own step: the step is per example, not divided by the batch
size (the reference implementation averages the loss over the batch, which silently shrinks every example's step by
1/B). ``clip`` rescales, per example and per block (the mu block and the log sigma^2 block separately), a gradient
whose Euclidean norm exceeds ``max_grad_norm`` to that norm.

SA-VAE trains on F(lambda_K, theta) = -L_k(x; lambda_K). Its gradient reaches lambda_0 (hence the encoder phi) only
through the K steps, and theta both directly and through the steps. ``SemiAmortizedRefine`` computes it by the
reverse pass of the unrolled recursion, storing only lambda_t and eps_t (``O(K B Z)`` memory, one decoder graph at
a time), with d = dF/d lambda_K and w = 0 going backwards:

    w <- gamma w + alpha d         (w = dF/dv_{t+1})
    d <- d - (du_t/dlambda_t)^T w, g_theta <- g_theta - (du_t/dtheta)^T w

where (du_t/d.)^T w is a vector-Jacobian product of the clipped gradient, i.e. a Hessian-vector product of f
through the clip's Jacobian: computed exactly by double backward (default), or, for comparison only, by central
finite differences of grad f along (dclip/dh)^T w with step r / |w_b| per example (the reference code's method; fragile
in float32). The same eps_t are reused in the backward pass.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from amortlab.errors import AmortlabError
from amortlab.objectives import LOG_2PI, k_sample_bound
from amortlab.settings import register_schema

HVP_MODES = ("exact", "finite_difference")


@dataclass
class RefinementConfig:
    """K, alpha, gamma, clip of the SVI refinement: Kim et al.'s OMNIGLOT settings (K = 20, alpha = 1, gamma = 0.5,
    clip 5) restated per example. Their code takes the steps on the loss *averaged* over a batch of B = 50, so each
    example's step is alpha / B = 0.02 times its own gradient, and the clip bounds the norm of the whole batch's
    averaged gradient, sqrt(sum_b |g_b|^2) / B <= 5, i.e. |g_b| <= 5 sqrt(50) ~ 35 when the examples' norms are
    equal. Here the step is per example, so the same behaviour is lr = 0.02, max_grad_norm = 35 (measured: with
    lr = 1 per example the steps diverge and the refined bound is worse than the encoder's)."""

    steps: int = 20              # K
    lr: float = 0.02             # alpha per example (= the paper's alpha = 1 on a loss averaged over B = 50)
    momentum: float = 0.5        # gamma
    max_grad_norm: float = 35.0  # per example and per block (mu, log sigma^2); <= 0: no clipping (see above)
    hvp: str = "exact"           # exact (double backward) | finite_difference (comparison only)
    fd_step: float = 1e-5        # finite-difference step r (relative to |w_b|)

    def __post_init__(self) -> None:
        if self.steps < 0 or self.lr <= 0 or not 0.0 <= self.momentum < 1.0 or self.hvp not in HVP_MODES:
            raise AmortlabError(
                f"inference.refinement needs steps >= 0, lr > 0, 0 <= momentum < 1 and hvp in {list(HVP_MODES)}; "
                f"got steps={self.steps}, lr={self.lr}, momentum={self.momentum}, hvp={self.hvp!r}. Fix the "
                f"value, e.g. inference.refinement.steps=20 inference.refinement.hvp=exact.")


register_schema("refinement", "default", RefinementConfig)  # conf/inference/sa_vae.yaml selects it


# f(lambda, eps) -> per-example loss [B]; the decoder's parameters are read from the module inside
Objective = Callable[[Tensor, Tensor], Tensor]


def gaussian_objective(log_weights: Callable[[Tensor, Tensor], Tensor]) -> Objective:
    """f(lambda, eps) = -L_k(lambda) per example ``[B]`` from noise eps ``[k, B, Z]``:
    z = mu + exp(logvar / 2) eps, log q = -(eps^2 + logvar + log 2pi)/2 summed over Z, and the log-weights
    ``log_weights(z [k, B, Z], log_q [k, B]) -> [k, B]`` (log p(x, z) - log q, with any annealing weights)."""

    def f(lam: Tensor, eps: Tensor) -> Tensor:
        mu, logvar = lam.chunk(2, dim=-1)
        z = mu + torch.exp(0.5 * logvar) * eps
        log_q = -0.5 * (eps.pow(2) + logvar + LOG_2PI).sum(-1)
        return -k_sample_bound(log_weights(z, log_q))

    return f


def clip_blocks(g: Tensor, max_norm: float) -> Tensor:
    """Per example, rescale the mu half and the log sigma^2 half of ``g`` ``[B, 2Z]`` to norm <= ``max_norm``:
    h * max_norm / max(|h|, max_norm) (differentiable, the identity below the threshold)."""
    if max_norm <= 0:
        return g
    blocks = g.chunk(2, dim=-1)
    return torch.cat([h * (max_norm / h.norm(dim=-1, keepdim=True).clamp_min(max_norm)) for h in blocks], dim=-1)


def _step_direction(f: Objective, lam: Tensor, eps: Tensor, cfg: RefinementConfig, create_graph: bool) -> Tensor:
    """u = clip(grad_lambda sum_b f_b(lambda, eps)) ``[B, 2Z]``."""
    if not lam.requires_grad:
        lam = lam.requires_grad_(True)
    (h,) = torch.autograd.grad(f(lam, eps).sum(), lam, create_graph=create_graph)
    return clip_blocks(h, cfg.max_grad_norm)


def refine(f: Objective, lam0: Tensor, noise: Sequence[Tensor], cfg: RefinementConfig,
           create_graph: bool = False) -> list[Tensor]:
    """lambda_0 .. lambda_K (``noise[t]`` = eps_t). With ``create_graph`` the list is differentiable (plain autograd
    through the unrolled loop, the memory-hungry reference); otherwise every lambda_t is detached."""
    lams = [lam0 if create_graph else lam0.detach()]
    v = torch.zeros_like(lam0)
    with torch.enable_grad():
        for t in range(cfg.steps):
            lam = lams[-1] if create_graph else lams[-1].detach().requires_grad_(True)
            u = _step_direction(f, lam, noise[t], cfg, create_graph)
            v = cfg.momentum * v - u
            nxt = lam + cfg.lr * v
            lams.append(nxt if create_graph else nxt.detach())
            if not create_graph:
                v = v.detach()
    return lams


def _vjp_exact(f, lam_t, eps, cfg, params, w) -> tuple[Tensor, list[Tensor | None]]:
    """(du_t/dlambda_t)^T w and (du_t/dtheta)^T w by double backward."""
    lam = lam_t.detach().requires_grad_(True)
    u = _step_direction(f, lam, eps, cfg, create_graph=True)
    grads = torch.autograd.grad(u, [lam, *params], grad_outputs=w, allow_unused=True)
    return grads[0], list(grads[1:])


def _vjp_finite_difference(f, lam_t, eps, cfg, params, w) -> tuple[Tensor, list[Tensor | None]]:
    """The same products with the Hessian part by central differences: with w_h = (dclip/dh)^T w (exact) and
    r_b = fd_step / |w_h,b|, grad_{lambda, theta} of
    sum_b [f_b(lambda_b + r_b w_h,b) - f_b(lambda_b - r_b w_h,b)] / (2 r_b)."""
    lam = lam_t.detach().requires_grad_(True)
    (h,) = torch.autograd.grad(f(lam, eps).sum(), lam)
    h = h.detach().requires_grad_(True)
    (w_h,) = torch.autograd.grad(clip_blocks(h, cfg.max_grad_norm), h, grad_outputs=w)
    r = cfg.fd_step / w_h.norm(dim=-1).clamp_min(1e-30)  # [B]
    lam_p = (lam_t.detach() + r[:, None] * w_h).requires_grad_(True)
    lam_m = (lam_t.detach() - r[:, None] * w_h).requires_grad_(True)
    diff = ((f(lam_p, eps) - f(lam_m, eps)) / (2 * r)).sum()
    grads = torch.autograd.grad(diff, [lam_p, lam_m, *params], allow_unused=True)
    # d/dlambda of f(lambda + r w) and f(lambda - r w) both move with lambda
    return grads[0] + grads[1], list(grads[2:])


class SemiAmortizedRefine(torch.autograd.Function):
    """lambda_K = refine(lambda_0) with the exact reverse pass (module docstring). ``apply(lam0, f, noise, cfg,
    *params)``: ``params`` are the decoder parameters f reads (they receive d lambda_K's share of the gradient)."""

    @staticmethod
    def forward(ctx, lam0: Tensor, f: Objective, noise: Sequence[Tensor], cfg: RefinementConfig, *params: Tensor):
        lams = refine(f, lam0, noise, cfg)
        # the parameters are kept as the very objects f reads (not save_for_backward copies), so that the
        # vector-Jacobian products in backward can differentiate f with respect to them
        ctx.f, ctx.noise, ctx.cfg, ctx.lams, ctx.params = f, noise, cfg, lams, params
        return lams[-1].clone()

    @staticmethod
    def backward(ctx, d_lam: Tensor):
        params, cfg = ctx.params, ctx.cfg
        vjp = _vjp_exact if cfg.hvp == "exact" else _vjp_finite_difference
        d = d_lam.clone()
        w = torch.zeros_like(d)
        g_params = [torch.zeros_like(p) for p in params]
        with torch.enable_grad():
            for t in reversed(range(cfg.steps)):
                w = cfg.momentum * w + cfg.lr * d
                d_lam_t, d_params = vjp(ctx.f, ctx.lams[t], ctx.noise[t], cfg, params, -w)
                d = d + d_lam_t
                for acc, g in zip(g_params, d_params):
                    if g is not None:
                        acc.add_(g)
        ctx.lams = ctx.noise = ctx.f = ctx.params = None  # free the stored iterates
        return (d, None, None, None, *g_params)

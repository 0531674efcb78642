"""Inference-gap decomposition (Cremer, Li & Duvenaud 2018) for any trained model and any method.

With the decoder frozen, for each test point x:

    inference gap      log p(x) - L[q]        = approximation gap + amortization gap
    approximation gap  log p(x) - L[q*]       (the family: the best member of it for this x)
    amortization gap   L[q*] - L[q]           (the encoder: how far its q is from that best member)

q is the method's (amortized) q, q* the per-datapoint optimum in the same family as q (``qstar.optimize_local``; the flow q* starts at
q*_FFG when both are computed, since the flow family contains those Gaussians);
both families' q* (FFG and flow) are reported. log p(x) is estimated by the strongest of the available estimators — AIS
(when enabled), IWAE-k with q, q*_FFG or q*_Flow as proposal — decided on the batch (``_reference``), never per
point (a per-point maximum over stochastic estimates would be biased upwards by their noise). All L[.] use ``k`` = 5000 samples
(importance_samples.test). Values are log-likelihoods in nats (negative); gaps are >= 0 up to Monte Carlo error.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from amortlab.evaluation.estimators import chunk_size, iwae_estimate
from amortlab.evaluation.qstar import QStarConfig, optimize_local

FAMILIES = ("ffg", "flow")


@dataclass
class FlowFamilyConfig:
    hidden: int = 50
    steps: int = 2


@dataclass
class GapsConfig:
    families: list[str] = field(default_factory=lambda: ["ffg", "flow"])
    qstar: QStarConfig = field(default_factory=QStarConfig)
    flow: FlowFamilyConfig = field(default_factory=FlowFamilyConfig)
    ais: bool = False  # also run AIS (evaluation.ais settings) as a log p(x) reference


def q_family(q) -> str:
    return "flow" if getattr(q, "family", "gaussian") == "flow" else "ffg"


def local_family(name: str, n: int, z_dim: int, q0, cfg: GapsConfig, like: Tensor) -> torch.nn.Module:
    """A per-point family for ``n`` points (dtype and device of ``like``), at the prior or at the encoder's q (for
    q*_FFG of a flow q: the Gaussian with the flow's sample mean and variance)."""
    from amortlab.distributions.flow import LocalFlow, LocalGaussian
    from amortlab.distributions.moments import sampled_moments

    from_encoder = cfg.qstar.init == "encoder"
    if name == "flow" and from_encoder and q_family(q0) == "flow":
        return LocalFlow.from_posterior(q0)  # the flow encoder's own q as the starting point
    init = {"dtype": like.dtype, "device": like.device}
    if from_encoder and hasattr(q0, "logvar"):
        init.update(init_mu=q0.mu.detach(), init_logvar=q0.logvar.detach())
    elif from_encoder:  # a q without Gaussian parameters (a flow): start at its moment-matched Gaussian
        mean, var = sampled_moments(q0)
        init.update(init_mu=mean, init_logvar=var.clamp_min(1e-8).log())
    if name == "ffg":
        return LocalGaussian(n, z_dim, **init)
    return LocalFlow(n, z_dim, hidden=cfg.flow.hidden, steps=cfg.flow.steps, **init)


def decompose(model, x: Tensor, q, k: int, rows: int, cfg: GapsConfig, generator: torch.Generator | None,
              ais_fn=None) -> dict[str, Tensor]:
    """Per-point gap table for the batch ``x`` ``[B, X]``; every value ``[B]`` (keys without the split prefix)."""
    chunk = chunk_size(k, len(x), rows)

    def bounds(qq):
        return iwae_estimate(lambda n: model.log_weights(x, qq, n, generator), k, chunk)

    log_px_q, L_q = bounds(q)
    out = {"gap/L_q": L_q, "gap/log_px_iwae": log_px_q}
    estimates = [log_px_q]  # candidate log p(x) estimates [B]; the reference is the best on the batch mean
    start_gauss = None
    for name in sorted(cfg.families, key=FAMILIES.index):
        if name not in FAMILIES:
            from amortlab.errors import AmortlabError
            raise AmortlabError(f"evaluation.gaps.families has {name!r}; use a subset of {list(FAMILIES)}.")
        with torch.inference_mode(False):  # evaluation runs under inference mode; q* needs real parameters
            if name == "flow" and start_gauss is not None:
                # the flow family contains the Gaussians: start it at q*_FFG, so L[q*_Flow] >= L[q*_FFG]
                family = local_family(name, len(x), model.z_dim, start_gauss, replace(cfg, qstar=replace(
                    cfg.qstar, init="encoder")), x)
            else:
                family = local_family(name, len(x), model.z_dim, q, cfg, x)
            for p in family.parameters():
                p.data = p.data.clone()
        local, report = optimize_local(model, x, family, cfg.qstar, generator)
        with torch.no_grad():
            q_star = local()
            log_px_star, L_star = bounds(q_star)
            if name == "ffg":
                start_gauss = q_star
        out[f"gap/L_qstar_{name}"] = L_star
        out[f"gap/log_px_iwae_{name}"] = log_px_star
        out[f"gap/qstar_steps_{name}"] = torch.full_like(L_star, report["steps"])
        estimates.append(log_px_star)
    if ais_fn is not None:
        log_px_ais = ais_fn(x).to(L_q)
        out["gap/log_px_ais"] = log_px_ais
        estimates.append(log_px_ais)
    out["gap/log_px"] = log_px = _reference(estimates)
    own = q_family(q)
    if f"gap/L_qstar_{own}" in out:
        L_star = out[f"gap/L_qstar_{own}"]
        out["gap/approximation"] = log_px - L_star
        out["gap/amortization"] = L_star - L_q
    out["gap/inference"] = log_px - L_q
    return out


def _reference(estimates: list[Tensor]) -> Tensor:
    """The log p(x) reference ``[B]`` among candidate estimates listed in increasing order of expected strength
    (IWAE from q, from q*_FFG, from q*_Flow, AIS). Each is a stochastic lower bound (the log of an unbiased estimator
    of p(x)); a per-point maximum would be biased upwards by their noise. The strongest by design is taken unless
    another one's mean over the batch is higher by more than two standard errors of the mean difference (AIS at a
    small budget can be weaker than IWAE-k with a good q*); decided on the batch, the selection bias is at most the
    noise of a batch mean."""
    best = estimates[-1]
    n = best.numel()
    for e in estimates[:-1]:
        d = e - best
        if n > 1 and float(d.mean()) > 2.0 * float(d.std()) / n ** 0.5:
            best = e
    return best


TABLE_ROWS = (("log p̂(x)", "gap/log_px"), ("L[q*_Flow]", "gap/L_qstar_flow"), ("L[q*_FFG]", "gap/L_qstar_ffg"),
              ("L[q]", "gap/L_q"), ("Approximation", "gap/approximation"), ("Amortization", "gap/amortization"),
              ("Inference", "gap/inference"), ("Active units", "active_units"))


def gap_table(columns: dict[str, dict[str, float]], split: str = "test") -> str:
    """Markdown table in the layout of Cremer et al.'s Table 1: one column per model (``{name: metrics}``)."""
    names = list(columns)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key in TABLE_ROWS:
        cells = []
        for name in names:
            v = columns[name].get(f"{split}/{key}")
            if not isinstance(v, (int, float)):
                cells.append("–")
            else:
                cells.append(f"{v:g}" if key == "active_units" else f"{v:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

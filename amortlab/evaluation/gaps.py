"""Inference-gap decomposition (Cremer, Li & Duvenaud 2018) for any trained model and any method.

With the decoder frozen, for each test point x:

    inference gap      log p(x) - L[q]        = approximation gap + amortization gap
    approximation gap  log p(x) - L[q*]       (the family: the best member of it for this x)
    amortization gap   L[q*] - L[q]           (the encoder: how far its q is from that best member)

q is the method's (amortized) q, q* the per-datapoint optimum (``qstar.optimize_local``, stopped per point) in the
family of q; both families' q* are reported:

- q*_FFG starts at the encoder's Gaussian (``qstar.init=encoder``; for a flow, mixture or layered q its
  moment-matched Gaussian) or the prior. Over several stochastic layers it is a factorised Gaussian over all of them.
- q*_Flow is the model's family: for a flow q its own family, width and steps (``posterior=flow``: per-point
  auxiliary coupling flows; ``posterior=iaf``: per-point IAFs with the points' contexts h(x)); for any other q the
  auxiliary coupling flow of ``flow.hidden`` / ``flow.steps`` (default the ``posterior=flow`` encoder's). It starts
  at q*_FFG (both flow families start there as that Gaussian up to small random output weights, so L[q*_Flow] >=
  L[q*_FFG] up to noise) and, for a flow q, also at the encoder's own flow; each point keeps the better of the two
  optimised flows (common-random-numbers ELBO, ``qstar.select_k`` samples), so L[q*_Flow] >= L[q] too.

log p(x) reference (``gap/log_px``), chosen without looking at the reported samples: AIS when it is enabled (alone,
even where IWAE-k from a q* happens to come out higher); otherwise the IWAE-k proposal (q, q*_FFG or q*_Flow) with
the highest batch mean in an independent selection pass of ``reference_k`` samples each, whose own k-sample values
are then reported. (Selecting among correlated estimates by the same values that are reported biases the reference
upwards by their noise.) All L[.] use ``k`` = 5000 samples (importance_samples.test). Values are log-likelihoods in
nats (negative); gaps are >= 0 up to Monte Carlo error. Every draw (per-point flow initialisation, sampled moments,
q* steps, selection, AIS) comes from the per-batch ``generator``, so a checkpoint re-evaluates to the same numbers
on any number of processes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from amortlab.distributions.flow import DEFAULT_FLOW_HIDDEN, DEFAULT_FLOW_STEPS, LocalFlow, LocalGaussian
from amortlab.distributions.moments import sampled_moments
from amortlab.errors import AmortlabError
from amortlab.grad import local_grad
from amortlab.evaluation.ais import AISConfig
from amortlab.evaluation.estimators import chunk_size, iwae_estimate
from amortlab.evaluation.qstar import QStarConfig, crn_elbo, draw_seed, optimize_local

FAMILIES = ("ffg", "flow")
# per-point values of the decomposition (results.json <split>/gap/...): log-likelihoods in nats and the gaps
GAP_METRICS = ("gap/log_px", "gap/log_px_iwae", "gap/log_px_iwae_ffg", "gap/log_px_iwae_flow", "gap/log_px_ais",
               "gap/L_q", "gap/L_qstar_ffg", "gap/L_qstar_flow", "gap/approximation", "gap/amortization",
               "gap/inference", "gap/qstar_steps_ffg", "gap/qstar_steps_flow", "gap/qstar_converged_frac",
               "gap/qstar_converged_frac_ffg", "gap/qstar_converged_frac_flow", "gap/qstar_tail_gain",
               "gap/qstar_tail_gain_ffg", "gap/qstar_tail_gain_flow")


@dataclass
class FlowFamilyConfig:
    """Shape of q*_Flow; None = the encoder's flow for a flow q, else the posterior=flow encoder's default."""

    hidden: Optional[int] = None
    steps: Optional[int] = None


@dataclass
class GapsConfig:
    """``evaluation=gaps`` (``evaluation.estimator.*``): the q* ``families`` to fit (ffg, flow), the q* optimiser
    (``qstar``), q*_Flow's shape (``flow``), ``ais`` (also estimate log p(x) by AIS with ``ais_settings``; it is then
    the log p(x) reference) and ``reference_k`` (samples per proposal in the independent pass that picks the IWAE
    reference when AIS is off)."""

    _target_: str = "amortlab.evaluation.gap_decomposition.GapDecomposition"
    families: list[str] = field(default_factory=lambda: ["ffg", "flow"])
    qstar: QStarConfig = field(default_factory=QStarConfig)
    flow: FlowFamilyConfig = field(default_factory=FlowFamilyConfig)
    ais: bool = False
    ais_settings: AISConfig = field(default_factory=AISConfig)
    reference_k: int = 500

    def __post_init__(self) -> None:
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise AmortlabError(f"evaluation.estimator.families has {unknown}; use a subset of {list(FAMILIES)}.")


def q_family(q) -> str:
    """The q* family a q belongs to: flow for an auxiliary flow, ffg otherwise (a mixture counts as FFG-world)."""
    return "flow" if q.capabilities.flow else "ffg"


def local_family(name: str, n: int, z_dim: int, q0, cfg: GapsConfig, like: Tensor,
                 generator: torch.Generator | None = None, shape_of=None) -> torch.nn.Module:
    """A per-point family for ``n`` points (dtype and device of ``like``), at the prior or (``qstar.init=encoder``)
    at ``q0``'s Gaussian (for a flow, a mixture or a layered q over several stochastic layers: the Gaussian with its
    sample mean and variance; a layered q's own factorised point estimate can sit where the model's conditional
    prior is far narrower than q's marginal spread). q*_Flow is the family of ``shape_of`` (default ``q0``) when that
    is a flow (``local_at``: its shape, its context), else the auxiliary coupling flow of the ``posterior=flow``
    default shape; ``cfg.flow`` overrides hidden / steps."""
    init = {"dtype": like.dtype, "device": like.device}
    if cfg.qstar.init == "encoder" and q0.capabilities.factorised:  # lambda = (mu, log sigma^2) of q itself
        mu, logvar = q0.pack().detach().chunk(2, dim=-1)
        init.update(init_mu=mu, init_logvar=logvar)
    elif cfg.qstar.init == "encoder":  # a flow, a mixture or a layered q: its moment-matched Gaussian
        mean, var = sampled_moments(q0, generator)
        init.update(init_mu=mean, init_logvar=var.clamp_min(1e-8).log())
    if name == "ffg":
        return LocalGaussian(n, z_dim, **init)
    shape_q = q0 if shape_of is None else shape_of
    over = {key: v for key in ("hidden", "steps") if (v := getattr(cfg.flow, key)) is not None}
    if shape_q.capabilities.flow:
        return shape_q.local_at(n, **init, **over, generator=generator)
    shape = {"hidden": DEFAULT_FLOW_HIDDEN, "steps": DEFAULT_FLOW_STEPS, **over}
    return LocalFlow(n, z_dim, **shape, **init, generator=generator)


@dataclass
class QStar:
    """q* of one family for a batch: one or more optimised per-point families (``members``) and, with several, the
    member each point keeps (``choice`` ``[B]``); ``report``: steps, converged ``[B]``, tail_gain ``[B]``."""

    members: list
    choice: Tensor | None
    report: dict

    def log_weights(self, model, x: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
        """``[n, B]`` log-weights, each point's from its own member's q."""
        lws = [model.log_weights(x, m(), n, generator) for m in self.members]
        if self.choice is None:
            return lws[0]
        return torch.stack(lws).gather(0, self.choice.view(1, 1, -1).expand(1, n, -1))[0]

    def rsample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``[n, B, Z]`` samples, each point's from its own member's q (pictures)."""
        zs = [m().rsample(n, generator) for m in self.members]
        if self.choice is None:
            return zs[0]
        return torch.stack(zs).gather(0, self.choice.view(1, 1, -1, 1).expand(1, n, -1, zs[0].shape[-1]))[0]


def _optimise(model, x: Tensor, starts: list, cfg: GapsConfig, generator) -> QStar:
    runs = [optimize_local(model, x, fam, cfg.qstar, generator) for fam in starts]
    members = [fam for fam, _ in runs]
    if len(runs) == 1:
        return QStar(members, None, runs[0][1])
    with torch.no_grad():  # each point keeps its best member on a common-random-numbers ELBO
        seed = draw_seed(generator, x.device)
        scores = torch.stack([crn_elbo(model, x, m(), max(cfg.qstar.select_k, 1), seed) for m in members])
        choice = scores.argmax(0)
    report = {"steps": max(r["steps"] for _, r in runs)}
    for key in ("converged", "tail_gain"):
        report[key] = torch.stack([r[key] for _, r in runs]).gather(0, choice.view(1, -1))[0]
    return QStar(members, choice, report)


def fit_qstar(model, x: Tensor, q, cfg: GapsConfig, generator: torch.Generator | None) -> dict[str, QStar]:
    """q* of each configured family for the batch ``x`` ``[B, X]`` given the method's q (module docstring)."""
    out: dict[str, QStar] = {}
    n, z_dim = len(x), model.z_dim
    for name in sorted(cfg.families, key=FAMILIES.index):
        with local_grad():  # evaluation runs under inference mode; q* needs real parameters
            starts = _starts(name, n, z_dim, model, x, q, cfg, out, generator)
        out[name] = _optimise(model, x, starts, cfg, generator)
    return out


def _starts(name: str, n: int, z_dim: int, model, x: Tensor, q, cfg: GapsConfig, done: dict[str, QStar],
            generator) -> list:
    """The starting families of q* of family ``name`` (module docstring), given the q* already ``done``."""
    if name == "ffg":
        return [local_family("ffg", n, z_dim, q, cfg, x, generator)]
    starts = []
    if "ffg" in done:  # at q*_FFG
        at_ffg = GapsConfig(qstar=QStarConfig(init="encoder"), flow=cfg.flow)
        starts.append(local_family("flow", n, z_dim, done["ffg"].members[0](), at_ffg, x, generator, shape_of=q))
    if q.capabilities.flow:
        starts.append(q.local_copy())  # the encoder's own flow
    return starts or [local_family("flow", n, z_dim, q, cfg, x, generator)]


def reference_log_px(model, x: Tensor, proposals: list[Callable[[int, torch.Generator], Tensor]],
                     estimates: list[Tensor], k_select: int, rows: int,
                     generator: torch.Generator | None) -> tuple[Tensor, int]:
    """The IWAE reference without AIS: (``estimates[j]`` ``[B]``, j) for the proposal j whose log p_hat has the
    highest batch mean in an independent pass of ``k_select`` fresh samples each (``proposals[j](n, generator)``
    returns ``[n, B]`` log-weights); ties go to the later (stronger by design) proposal."""
    sel = torch.Generator(device=x.device).manual_seed(draw_seed(generator, x.device))
    chunk = chunk_size(k_select, len(x), rows)
    means = [float(iwae_estimate(lambda m, p=p: p(m, sel), k_select, chunk)[0].mean()) for p in proposals]
    j = max(range(len(means)), key=lambda i: (means[i], i))
    return estimates[j], j


def decompose(model, x: Tensor, q, k: int, rows: int, cfg: GapsConfig, generator: torch.Generator | None,
              ais_fn=None) -> dict[str, Tensor]:
    """Per-point gap table for the batch ``x`` ``[B, X]``; every value ``[B]`` (keys without the split prefix).

    ``ais_fn(x) -> [B]``: the AIS estimate of log p(x); when given it is the reference ``gap/log_px``."""
    chunk = chunk_size(k, len(x), rows)

    def bounds(sample_lw):
        return iwae_estimate(lambda n: sample_lw(n, generator), k, chunk)

    proposals = [lambda n, g: model.log_weights(x, q, n, g)]
    log_px_q, L_q = bounds(proposals[0])
    out = {"gap/L_q": L_q, "gap/log_px_iwae": log_px_q}
    estimates = [log_px_q]
    for name, qs in fit_qstar(model, x, q, cfg, generator).items():
        with torch.no_grad():
            proposals.append(lambda n, g, qs=qs: qs.log_weights(model, x, n, g))
            log_px_star, L_star = bounds(proposals[-1])
        out[f"gap/L_qstar_{name}"] = L_star
        out[f"gap/log_px_iwae_{name}"] = log_px_star
        out[f"gap/qstar_steps_{name}"] = torch.full_like(L_star, qs.report["steps"])
        out[f"gap/qstar_converged_frac_{name}"] = qs.report["converged"].to(L_star)
        out[f"gap/qstar_tail_gain_{name}"] = qs.report["tail_gain"].to(L_star)
        estimates.append(log_px_star)
    if ais_fn is not None:
        out["gap/log_px_ais"] = log_px = ais_fn(x).to(L_q)
    else:
        log_px, _ = reference_log_px(model, x, proposals, estimates, cfg.reference_k, rows, generator)
    out["gap/log_px"] = log_px
    own = q_family(q)
    if f"gap/L_qstar_{own}" in out:
        L_star = out[f"gap/L_qstar_{own}"]
        out["gap/approximation"] = log_px - L_star
        out["gap/amortization"] = L_star - L_q
        out["gap/qstar_converged_frac"] = out[f"gap/qstar_converged_frac_{own}"]
        out["gap/qstar_tail_gain"] = out[f"gap/qstar_tail_gain_{own}"]
    out["gap/inference"] = log_px - L_q
    return out


TABLE_ROWS = (("log p̂(x)", "gap/log_px"), ("L[q*_Flow]", "gap/L_qstar_flow"), ("L[q*_FFG]", "gap/L_qstar_ffg"),
              ("L[q]", "gap/L_q"), ("Approximation", "gap/approximation"), ("Amortization", "gap/amortization"),
              ("Inference", "gap/inference"), ("q* converged (share of points)", "gap/qstar_converged_frac"),
              ("q* gain over its last steps", "gap/qstar_tail_gain"), ("Active units", "active_units"))


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

"""Inference-gap decomposition (Cremer, Li & Duvenaud 2018) for any trained model and any method.

With the decoder frozen, for each test point x:

    inference gap      log p(x) - L[q]        = approximation gap + amortization gap
    approximation gap  log p(x) - L[q*]       (the family: the best member of it for this x)
    amortization gap   L[q*] - L[q]           (the encoder: how far its q is from that best member)

q is the method's (amortized) q, q* the per-datapoint optimum (``qstar.optimize_local``, stopped per point) in the
family of q; the gaps use the q* of q's own family, and every configured family's q* is reported (``families``):

- q*_FFG: a fully factorised Gaussian (over all stochastic layers of a hierarchy). ``qstar.init``: ``encoder``
  (default) starts at the encoder's q (for a flow, mixture or layered q: its moment-matched Gaussian), ``prior`` at
  N(0, I), ``both`` runs both starts.
- q*_Layered (a q over several stochastic layers only): the layered q's own family with per-point parameters
  (``amortlab.distributions.local_layered``): bottom-up q(z_1 | x) q(z_2 | z_1): per-point Gaussian z_1 and the
  encoder's q(z_2 | z_1) with per-point scales of its outputs and a per-point linear-Gaussian term; the ladder (a
  method with ``heads`` / ``top_down``): per-point bottom-up estimates of every layer combined top-down with
  p(z_l | z_{l+1}) by the ladder's own ``top_down``. Started at exactly the encoder's q; the bottom-up family,
  which holds every factorised Gaussian, also at q*_FFG (so L[q*_Layered] >= L[q*_FFG] up to noise).
- q*_Flow is the model's family: for a flow q its own family, width and steps (``posterior=flow``: per-point
  auxiliary coupling flows; ``posterior=iaf``: per-point IAFs with the points' contexts h(x)); for any other q the
  auxiliary coupling flow of ``flow.hidden`` / ``flow.steps`` (default the ``posterior=flow`` encoder's). It starts
  at q*_FFG (both flow families start there as that Gaussian up to small random output weights, so L[q*_Flow] >=
  L[q*_FFG] up to noise) and, for a flow q, also at the encoder's own flow.

q* is never reported below the encoder's own q when that q is in the family: q* starts there (or, with
``qstar.init=prior``, the encoder's q itself is kept as a candidate), and each point keeps the better of its
candidates (its start and the optimised parameters; several optimised starts) on a common-random-numbers ELBO of
``qstar.select_k`` samples drawn independently of the reported ones (selecting on the reported samples would bias
L[q*] upwards by their noise). ``gap/qstar_is_q_frac``: the share of points whose q* is the encoder's q unchanged.

Reported L[.] use ``k`` = 5000 samples (importance_samples.test), the same noise for every proposal whose draws
have the same shape (q and q*_FFG of a Gaussian q, q and q*_Layered of a layered q): a point whose q* is q has an
amortization gap of exactly 0, and the difference of two bounds has less variance than either. An unconverged q*
(``gap/qstar_converged_frac`` < 1: not every point stopped by its patience rule within ``qstar.max_steps``;
``gap/qstar_tail_gain``: how much the bound still rose over the last ``qstar.patience`` steps, nats) is a lower
bound of the family's best: the amortization gap is then understated and the approximation gap overstated; the
gap table marks it beside every value it affects.

log p(x) reference (``gap/log_px``), chosen without looking at the reported samples: AIS when it is enabled (alone,
even where IWAE-k from a q* happens to come out higher); otherwise the IWAE-k proposal (q or a q*) with the highest
batch mean in an independent selection pass of ``reference_k`` samples each, whose own k-sample values are then
reported. Values are log-likelihoods in nats (negative); gaps are >= 0 up to Monte Carlo error. Every draw
(per-point flow initialisation, sampled moments, q* steps, selection, AIS) comes from the per-batch ``generator``, so
a checkpoint re-evaluates to the same numbers on any number of processes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from amortlab.distributions.flow import DEFAULT_FLOW_HIDDEN, DEFAULT_FLOW_STEPS, LocalFlow, LocalGaussian
from amortlab.distributions.gaussian import DiagGaussian
from amortlab.distributions.local_layered import LocalHeads, LocalLayered
from amortlab.distributions.moments import sampled_moments
from amortlab.errors import AmortlabError
from amortlab.grad import local_grad
from amortlab.evaluation.ais import AISConfig
from amortlab.evaluation.estimators import chunk_size, iwae_estimate
from amortlab.evaluation.qstar import QStarConfig, crn_elbo, draw_seed, optimize_local

FAMILIES = ("ffg", "layered", "flow")
INITS = ("encoder", "prior", "both")
# per-point values of the decomposition (results.json <split>/gap/...): log-likelihoods in nats and the gaps; the
# gaps are followed by the convergence of the q* they use (the q* of q's own family)
GAP_METRICS = ("gap/log_px", "gap/log_px_iwae", "gap/log_px_iwae_ffg", "gap/log_px_iwae_layered",
               "gap/log_px_iwae_flow", "gap/log_px_ais", "gap/L_q", "gap/L_qstar_ffg", "gap/L_qstar_layered",
               "gap/L_qstar_flow", "gap/approximation", "gap/amortization", "gap/qstar_converged_frac",
               "gap/qstar_tail_gain", "gap/qstar_is_q_frac", "gap/inference",
               *(f"gap/{m}_{f}" for f in FAMILIES
                 for m in ("qstar_steps", "qstar_converged_frac", "qstar_tail_gain", "qstar_is_q_frac")))


@dataclass
class FlowFamilyConfig:
    """Shape of q*_Flow; None = the encoder's flow for a flow q, else the posterior=flow encoder's default."""

    hidden: Optional[int] = None
    steps: Optional[int] = None


@dataclass
class GapsConfig:
    """``evaluation=gaps`` (``evaluation.estimator.*``): the q* ``families`` to fit (ffg, layered, flow; layered only
    for a q over several stochastic layers, skipped for any other), the q* optimiser (``qstar``; ``qstar.init``:
    encoder, prior or both), q*_Flow's shape (``flow``), ``ais`` (also estimate log p(x) by AIS with
    ``ais_settings``; it is then the log p(x) reference) and ``reference_k`` (samples per proposal in the independent
    pass that picks the IWAE reference when AIS is off)."""

    _target_: str = "amortlab.evaluation.gap_decomposition.GapDecomposition"
    families: list[str] = field(default_factory=lambda: ["ffg", "layered", "flow"])
    qstar: QStarConfig = field(default_factory=QStarConfig)
    flow: FlowFamilyConfig = field(default_factory=FlowFamilyConfig)
    ais: bool = False
    ais_settings: AISConfig = field(default_factory=AISConfig)
    reference_k: int = 500

    def __post_init__(self) -> None:
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise AmortlabError(f"evaluation.estimator.families has {unknown}; use a subset of {list(FAMILIES)}.")
        if self.qstar.init not in INITS:
            raise AmortlabError(f"evaluation.estimator.qstar.init={self.qstar.init!r} is unknown; use encoder (q* "
                                f"starts at the encoder's q), prior (at N(0, I); the encoder's q stays a candidate "
                                f"where it is in the family) or both (both starts, each point keeps the better).")
        if self.qstar.select_k < 1:
            raise AmortlabError(f"evaluation.estimator.qstar.select_k={self.qstar.select_k}: the gap decomposition "
                                f"keeps a point's optimised q* only where it beats its start on select_k fresh "
                                f"samples (so q* is never reported below the encoder's q); use select_k >= 1 "
                                f"(default 500).")


def q_family(q) -> str:
    """The q* family a q belongs to: flow for an auxiliary flow, layered for a q over several stochastic layers, ffg
    otherwise (a mixture counts as FFG-world)."""
    if q.capabilities.flow:
        return "flow"
    return "layered" if getattr(q, "family", None) == "layered_gaussian" else "ffg"


def local_family(name: str, n: int, z_dim: int, q0, cfg: GapsConfig, like: Tensor,
                 generator: torch.Generator | None = None, shape_of=None, init: str | None = None) -> torch.nn.Module:
    """A per-point family for ``n`` points (dtype and device of ``like``), at the prior (``init`` = prior; default
    ``cfg.qstar.init``) or at ``q0``'s Gaussian (encoder, both; for a flow, a mixture or a layered q over several
    stochastic layers: the Gaussian with its sample mean and variance; a layered q's own factorised point estimate
    can sit where the model's conditional prior is far narrower than q's marginal spread). q*_Flow is the family of
    ``shape_of`` (default ``q0``) when that is a flow (``local_at``: its shape, its context), else the auxiliary
    coupling flow of the ``posterior=flow`` default shape; ``cfg.flow`` overrides hidden / steps."""
    at_encoder = (init or cfg.qstar.init) != "prior"
    init_at = {"dtype": like.dtype, "device": like.device}
    if at_encoder and q0.capabilities.factorised:  # lambda = (mu, log sigma^2) of q itself
        mu, logvar = q0.pack().detach().chunk(2, dim=-1)
        init_at.update(init_mu=mu, init_logvar=logvar)
    elif at_encoder:  # a flow, a mixture or a layered q: its moment-matched Gaussian
        mean, var = sampled_moments(q0, generator)
        init_at.update(init_mu=mean, init_logvar=var.clamp_min(1e-8).log())
    if name == "ffg":
        return LocalGaussian(n, z_dim, **init_at)
    shape_q = q0 if shape_of is None else shape_of
    over = {key: v for key in ("hidden", "steps") if (v := getattr(cfg.flow, key)) is not None}
    if shape_q.capabilities.flow:
        return shape_q.local_at(n, **init_at, **over, generator=generator)
    shape = {"hidden": DEFAULT_FLOW_HIDDEN, "steps": DEFAULT_FLOW_STEPS, **over}
    return LocalFlow(n, z_dim, **shape, **init_at, generator=generator)


def top_down_method(module) -> bool:
    """Whether the method draws its q top-down from per-layer estimates (the ladder): ``module.heads(x)`` ->
    ``[DiagGaussian [B, D_l]]`` and ``module.top_down(heads, like)`` -> its q."""
    return callable(getattr(module, "heads", None)) and callable(getattr(module, "top_down", None))


def layered_local(module, x: Tensor, q) -> torch.nn.Module:
    """The per-point family of a layered q (``amortlab.distributions.local_layered``), starting at exactly q: the
    ladder's (``LocalHeads``, per-point estimates combined by ``module.top_down``) for a top-down method, else
    ``LocalLayered`` around q's own conditionals."""
    if top_down_method(module):
        with torch.no_grad():
            return LocalHeads(module.heads(x), module.top_down, x)
    return LocalLayered(q)


@dataclass
class Start:
    """A candidate q* of one family: a per-point ``family``; ``optimise`` (False: kept as it is, e.g. the encoder's q
    beside an optimisation from the prior); ``is_q``: it starts at exactly the encoder's q."""

    family: torch.nn.Module
    optimise: bool = True
    is_q: bool = False


def _fork(generator: torch.Generator | None, device) -> torch.Generator:
    """A generator seeded from one draw of ``generator``: proposals forked from equally seeded generators draw the
    same noise (common random numbers), whatever each does with it."""
    return torch.Generator(device=device).manual_seed(draw_seed(generator, device))


@dataclass
class QStar:
    """q* of one family for a batch: one or more per-point families (``members``) and, with several, the member each
    point keeps (``choice`` ``[B]``); ``report``: steps, converged ``[B]``, tail_gain ``[B]``, is_q ``[B]``."""

    members: list
    choice: Tensor | None
    report: dict

    def log_weights(self, model, x: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
        """``[n, B]`` log-weights, each point's from its own member's q; every member draws the noise of one
        generator forked from ``generator`` (the noise a single q would draw from that fork)."""
        fork = draw_seed(generator, x.device)
        lws = [model.log_weights(x, m(), n, torch.Generator(device=x.device).manual_seed(fork))
               for m in self.members]
        if self.choice is None:
            return lws[0]
        return torch.stack(lws).gather(0, self.choice.view(1, 1, -1).expand(1, n, -1))[0]

    def rsample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``[n, B, Z]`` samples, each point's from its own member's q (pictures)."""
        zs = [m().rsample(n, generator) for m in self.members]
        if self.choice is None:
            return zs[0]
        return torch.stack(zs).gather(0, self.choice.view(1, 1, -1, 1).expand(1, n, -1, zs[0].shape[-1]))[0]


def _optimise(model, x: Tensor, starts: list[Start], cfg: GapsConfig, generator) -> QStar:
    """Optimise the candidates that ask for it; with several candidates each point keeps the best on a
    common-random-numbers ELBO of ``qstar.select_k`` samples (module docstring). The report's converged / tail_gain
    of a point are those of its best optimised run (a point that keeps an unoptimised candidate reports the run it
    beat)."""
    runs = {i: optimize_local(model, x, s.family, cfg.qstar, generator)[1] for i, s in enumerate(starts)
            if s.optimise}
    members = [s.family for s in starts]
    with torch.no_grad():
        if len(members) > 1:
            seed = draw_seed(generator, x.device)
            scores = torch.stack([crn_elbo(model, x, m(), max(cfg.qstar.select_k, 1), seed) for m in members])
            choice = scores.argmax(0)
        else:
            scores, choice = None, torch.zeros(len(x), dtype=torch.long, device=x.device)
        order = list(runs)
        best_run = torch.tensor(order, device=x.device)[scores[order].argmax(0)] if scores is not None \
            else torch.full_like(choice, order[0])
        run_of = torch.where(torch.tensor([s.optimise for s in starts], device=x.device)[choice], choice, best_run)
        report = {"steps": max(r["steps"] for r in runs.values())}
        for key in ("converged", "tail_gain"):
            per_run = torch.stack([runs[i][key] if i in runs else runs[order[0]][key] for i in range(len(starts))])
            report[key] = per_run.gather(0, run_of.view(1, -1))[0]
        unchanged = torch.stack([(~runs[i]["improved"]) if i in runs else torch.ones_like(choice, dtype=torch.bool)
                                 for i in range(len(starts))])
        is_q = torch.tensor([s.is_q for s in starts], device=x.device)[choice]
        report["is_q"] = (is_q & unchanged.gather(0, choice.view(1, -1))[0]).double()
    return QStar(members, None if len(members) == 1 else choice, report)


def fit_qstar(model, x: Tensor, q, cfg: GapsConfig, generator: torch.Generator | None) -> dict[str, QStar]:
    """q* of each configured family for the batch ``x`` ``[B, X]`` given the method's q (module docstring); the
    layered family only for a layered q."""
    out: dict[str, QStar] = {}
    n, z_dim = len(x), model.z_dim
    for name in sorted(cfg.families, key=FAMILIES.index):
        if name == "layered" and q_family(q) != "layered":
            continue
        with local_grad():  # evaluation runs under inference mode; q* needs real parameters
            starts = _starts(name, n, z_dim, model, x, q, cfg, out, generator)
        out[name] = _optimise(model, x, starts, cfg, generator)
    return out


def _starts(name: str, n: int, z_dim: int, model, x: Tensor, q, cfg: GapsConfig, done: dict[str, QStar],
            generator) -> list[Start]:
    """The candidates of q* of family ``name`` (module docstring), given the q* already ``done``."""
    init = cfg.qstar.init
    if name == "ffg":
        exact = q.capabilities.factorised  # the encoder's q is in the family
        starts = []
        if init in ("encoder", "both"):
            starts.append(Start(local_family("ffg", n, z_dim, q, cfg, x, generator, init="encoder"), is_q=exact))
        if init in ("prior", "both"):
            starts.append(Start(local_family("ffg", n, z_dim, q, cfg, x, generator, init="prior")))
        if init == "prior" and exact:  # the encoder's q itself stays a candidate
            starts.append(Start(local_family("ffg", n, z_dim, q, cfg, x, generator, init="encoder"), optimise=False,
                                is_q=True))
        return starts
    if name == "layered":
        starts = [Start(layered_local(model, x, q), is_q=True)]
        if "ffg" in done and not top_down_method(model):  # the bottom-up family holds q*_FFG: start there too
            starts.append(Start(LocalLayered(q, start=_ffg_point(done["ffg"]))))
        return starts
    starts = []
    if "ffg" in done:  # at q*_FFG
        at_ffg = GapsConfig(qstar=QStarConfig(init="encoder"), flow=cfg.flow)
        starts.append(Start(local_family("flow", n, z_dim, _ffg_point(done["ffg"]), at_ffg, x, generator,
                                         shape_of=q)))
    if q.capabilities.flow:
        starts.append(Start(q.local_copy(), is_q=True))  # the encoder's own flow
    return starts or [Start(local_family("flow", n, z_dim, q, cfg, x, generator))]


def _ffg_point(qs: QStar):
    """q*_FFG as one ``DiagGaussian`` ``[B, Z]`` (each point's kept member)."""
    if qs.choice is None:
        return qs.members[0]()
    mus = torch.stack([m.mu.detach() for m in qs.members])
    logvars = torch.stack([m.logvar.detach() for m in qs.members])
    idx = qs.choice.view(1, -1, 1).expand(1, -1, mus.shape[-1])
    return DiagGaussian(mus.gather(0, idx)[0], logvars.gather(0, idx)[0])


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
    report_seed = draw_seed(generator, x.device)  # every proposal's reported bounds: the same noise stream

    def bounds(sample_lw):
        g = torch.Generator(device=x.device).manual_seed(report_seed)
        return iwae_estimate(lambda n: sample_lw(n, g), k, chunk)

    proposals = [lambda n, g: model.log_weights(x, q, n, _fork(g, x.device))]
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
        out[f"gap/qstar_is_q_frac_{name}"] = qs.report["is_q"].to(L_star)
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
        for key in ("qstar_converged_frac", "qstar_tail_gain", "qstar_is_q_frac"):
            out[f"gap/{key}"] = out[f"gap/{key}_{own}"]
    out["gap/inference"] = log_px - L_q
    return out


# (label, key, the q* family whose convergence the value depends on: "" = q's own family, None = none)
TABLE_ROWS = (("log p̂(x)", "gap/log_px", None), ("L[q*_Flow]", "gap/L_qstar_flow", "_flow"),
              ("L[q*_Layered]", "gap/L_qstar_layered", "_layered"), ("L[q*_FFG]", "gap/L_qstar_ffg", "_ffg"),
              ("L[q]", "gap/L_q", None), ("Approximation", "gap/approximation", ""),
              ("Amortization", "gap/amortization", ""), ("Inference", "gap/inference", None),
              ("q* converged (share of points)", "gap/qstar_converged_frac", None),
              ("q* gain over its last steps", "gap/qstar_tail_gain", None),
              ("q* = the encoder's q (share of points)", "gap/qstar_is_q_frac", None),
              ("Active units", "active_units", None))
UNCONVERGED_NOTE = ("(q* unconverged: not every point's q* stopped by its patience rule within qstar.max_steps; "
                    "'converged' is the share of points that did, 'tail gain' how much the bound still rose over "
                    "the last qstar.patience steps, nats. Such an L[q*] is a lower bound of the family's best: the "
                    "amortization gap beside it is understated, the approximation gap overstated.)")


def unconverged_mark(metrics: dict[str, float], split: str, family: str) -> str:
    """`` (q* unconverged: 40 % converged, tail gain 0.51)`` when the q* of ``family`` (suffix: ``_ffg``, ...;
    ``""`` q's own) did not converge at every point, else ``""``."""
    frac = metrics.get(f"{split}/gap/qstar_converged_frac{family}")
    if not isinstance(frac, (int, float)) or frac >= 1.0:
        return ""
    tail = metrics.get(f"{split}/gap/qstar_tail_gain{family}")
    gain = f", tail gain {tail:.2f}" if isinstance(tail, (int, float)) else ""
    return f" (q* unconverged: {100 * frac:.0f} % converged{gain})"


def gap_table(columns: dict[str, dict[str, float]], split: str = "test") -> str:
    """Markdown table in the layout of Cremer et al.'s Table 1: one column per model (``{name: metrics}``). A value
    that depends on a q* that did not converge at every point carries the mark of ``unconverged_mark`` (and the table
    a note saying what it means)."""
    names = list(columns)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    marked = False
    for label, key, family in TABLE_ROWS:
        cells = []
        for name in names:
            v = columns[name].get(f"{split}/{key}")
            if not isinstance(v, (int, float)):
                cells.append("–")
                continue
            mark = "" if family is None else unconverged_mark(columns[name], split, family)
            marked |= bool(mark)
            cells.append((f"{v:g}" if key == "active_units" else f"{v:.2f}") + mark)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + (f"\n{UNCONVERGED_NOTE}\n" if marked else "")

"""The estimator protocol: what the final evaluation asks of a log p(x) estimator.

An estimator is an object Hydra builds from ``conf/evaluation/<name>.yaml`` (``evaluation.estimator._target_``) and
hands to the method (``ELBOModule(estimator=...)``). Per batch the method first computes, from its evaluation-time q,
the plain IWAE-k estimate ``log_px_iwae`` and the ELBO (reported as ``nll_iwae`` / ``neg_elbo``); the estimator
then returns its log p_hat(x) (reported as ``nll``) and any per-point values of its own (``metric_names``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor


@dataclass
class EvalBatch:
    """One batch of the final evaluation: ``x`` ``[B, X]``, the method's evaluation-time ``q``, ``k`` samples,
    ``rows`` per chunk, the per-batch seeded ``generator`` and the IWAE-k estimate of q already drawn
    (``log_px_iwae`` ``[B]``). ``module`` is the method (``log_weights``, ``model``, ``posterior_family``)."""

    module: Any
    x: Tensor
    q: Any
    k: int
    rows: int
    generator: torch.Generator
    log_px_iwae: Tensor


@dataclass
class Estimate:
    """log p_hat(x) ``[B]`` and the estimator's own per-point values ``[B]`` (keys from ``metric_names``)."""

    log_px: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class Estimator:
    """Base class. ``name`` is the results' label; ``metric_names`` the per-point values it adds (exact means over
    the split, ``<split>/<name>`` in results.json). ``check(module)`` raises ``AmortlabError`` at start-up when the
    estimator cannot run with the method (from the method's declared posterior family and model); ``__call__``
    estimates one batch; ``after_run`` writes files of its own once the run's metrics are final."""

    name: ClassVar[str] = "estimator"
    metric_names: ClassVar[tuple[str, ...]] = ()

    def check(self, module) -> None:
        """Refuse a method it cannot evaluate (default: any method is fine)."""

    def __call__(self, batch: EvalBatch) -> Estimate:
        raise NotImplementedError

    def after_run(self, module, datamodule, metrics: dict[str, float], out_dir: Path, run_name: str,
                  logger, seed: int) -> None:
        """Outputs beside results.json (global rank zero only; default: none)."""

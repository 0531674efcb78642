"""The default estimator: IWAE-k from the method's evaluation-time q (``evaluation=iwae``)."""
from __future__ import annotations

from dataclasses import dataclass

from amortlab.evaluation.protocol import Estimate, EvalBatch, Estimator


@dataclass
class IWAEConfig:
    """``evaluation=iwae``: log p_hat(x) = log (1/k) sum_i p(x, z_i) / q(z_i | x), z_i ~ q (no settings)."""

    _target_: str = "amortlab.evaluation.iwae.IWAE"


class IWAE(Estimator):
    """log p_hat(x) = the IWAE-k estimate the evaluation already drew (the same samples as ``nll_iwae``)."""

    name = "iwae"

    def __call__(self, batch: EvalBatch) -> Estimate:
        return Estimate(batch.log_px_iwae)

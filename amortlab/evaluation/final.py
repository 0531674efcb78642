"""The final evaluation of a trained method on one split, as a Lightning module the Trainer runs.

    results = evaluate(trainer, method, loader, split="test", k=method.k_test, estimator=method.estimator)

wraps the method in ``FinalEvaluation`` (which owns the split's metrics: exact float64 means summed across DDP
ranks, and the active-unit count), runs it through ``trainer.test`` (or ``trainer.validate`` for the validation
split, so ``trainer.limit_val_batches`` applies to it as during training) and returns ``{"<split>/<name>": value}``.
The method itself is not modified: split, k and estimator are arguments.
"""
from __future__ import annotations

from typing import Any

import lightning as L
import torch

from amortlab.data.loader import Batch
from amortlab.evaluation.protocol import Estimator
from amortlab.metrics import SplitMetrics


class FinalEvaluation(L.LightningModule):
    """Evaluates ``method`` on ``split`` with ``k`` samples and ``estimator``; ``results`` after the pass."""

    def __init__(self, method, split: str, k: int, estimator: Estimator):
        super().__init__()
        estimator.check(method)
        self.method, self.split, self.k, self.estimator = method, split, int(k), estimator
        self.split_metrics = SplitMetrics(method.eval_metric_names(estimator), method.model.latent_dims,
                                          getattr(method, "eval_ratios", None))
        self.results: dict[str, Any] = {}

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return self.method.transfer_batch_to_device(batch, device, dataloader_idx)

    def _step(self, batch: Batch) -> None:
        out = self.method.evaluate_batch(batch, self.k, self.split, self.estimator)
        self.split_metrics.update(out, out.pop("z_mean"))

    def _epoch_end(self) -> None:
        self.results = self.split_metrics.compute(self.split)
        self.log_dict(self.results, sync_dist=False)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._step(batch)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._step(batch)

    def on_test_epoch_end(self) -> None:
        self._epoch_end()

    def on_validation_epoch_end(self) -> None:
        self._epoch_end()


def evaluate(trainer: L.Trainer, method, loader, split: str, k: int, estimator: Estimator) -> dict[str, Any]:
    """Run the final evaluation of ``method`` (its current weights) on ``loader`` and return the split's means."""
    wrapper = FinalEvaluation(method, split, k, estimator)
    run = trainer.validate if split == "val" else trainer.test
    run(wrapper, dataloaders=loader, verbose=False)
    return wrapper.results

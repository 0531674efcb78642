"""Exact dataset means for evaluation: float64 sums that DDP reduces by summation."""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class ExactMean(Metric):
    """mean = (sum of all values) / (number of values), accumulated in float64 over batches and ranks.

    Unlike ``MeanMetric``, the states stay float64 when the LightningModule is cast to another precision
    (``module.to(torch.float32)`` by the precision plugin), so means over 10k points are exact to ~1e-12.
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        # out of place: states re-created by reset() may have been cast with the module
        self.total = self.total.double() + values.detach().double().sum()
        self.count = self.count.double() + values.numel()

    def compute(self) -> Tensor:
        return self.total / self.count

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self.total, self.count = self.total.double(), self.count.double()
        return out

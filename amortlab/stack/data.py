"""Training batches of N stacked models: model i's own shuffled batch (its single run's order), stacked model-major
``[N*B, X]``; validation batches are the single run's (the stacked module repeats them per model)."""
from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch

from amortlab.data.base import TensorDataModule, gpu_device
from amortlab.data.loader import Batch, TensorLoader


class StackedLoader:
    """Zip of N training loaders of equal length -> ``Batch(x [N*B, X])`` (block i from loader i)."""

    def __init__(self, loaders: Sequence[TensorLoader]):
        self.loaders = list(loaders)

    def __len__(self) -> int:
        return len(self.loaders[0])

    def __iter__(self):
        for batches in zip(*self.loaders):
            yield Batch(torch.cat([b.x for b in batches]), batches[0].first_index)


class StackedData(L.LightningDataModule):
    """The datamodule of a stacked fit over ``dm``'s splits; ``seeds``: each member's ``dataset.seed``.
    ``batch_size`` is the stacked batch (N * B: what ``Throughput`` counts)."""

    def __init__(self, dm: TensorDataModule, seeds: Sequence[int]):
        super().__init__()
        self.dm, self.seeds = dm, [int(s) for s in seeds]
        self.batch_size = dm.batch_size * len(self.seeds)

    def _epoch(self) -> int | None:
        return self.trainer.current_epoch if self.trainer is not None else None

    def train_dataloader(self) -> StackedLoader:
        device = gpu_device(self.trainer)
        return StackedLoader([self.dm.train_dataloader(seed=s, epoch_source=self._epoch, device=device)
                              for s in self.seeds])

    def val_dataloader(self) -> TensorLoader:
        return self.dm.eval_dataloader("val", device=gpu_device(self.trainer))

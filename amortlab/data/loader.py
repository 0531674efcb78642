"""Batches of an in-memory tensor by index slicing: no Dataset items, no per-item collate.

Sharding is done here (the trainer runs with ``use_distributed_sampler=False``), so that
- training: every epoch's permutation depends only on (seed, epoch); each rank takes a disjoint strided share;
- evaluation: batch b of the whole set is identical for any world size (rank r takes batches r, r+W, ...), and
  ``first_index`` lets estimators seed their noise per batch, so DDP gives the same numbers as one process.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class Batch:
    """A batch of images ``x`` ``[B, X]`` in [0, 1] and the index of its first row in the full split."""

    x: Tensor
    first_index: int

    def to(self, device, non_blocking: bool = False) -> Batch:  # Lightning moves objects that define `to`
        return Batch(self.x.to(device, non_blocking=non_blocking), self.first_index)


class TensorLoader:
    """Iterable of ``Batch`` over rows of ``data`` ``[N, X]`` (float32, C-contiguous).

    ``shuffle``: a fresh permutation per epoch from (seed, epoch). The epoch is read when iteration starts, from
    ``epoch_source()`` if given (the datamodule passes the trainer's epoch, which is already restored when a run
    resumes and Lightning pre-fetches the first batch) or else from ``set_epoch``.
    ``dynamic_binarization``: each batch is resampled as x ~ Bernoulli(data) with a generator seeded from
    (seed, epoch) — reproducible, and different every epoch.
    ``device``: where the rows live (the datamodule passes the trainer's CUDA device: the split is copied there once
    and every batch, permutation and binarization draw is made there — no host-to-device copy per step; the draws
    then come from a generator on that device, so a GPU run's data order differs from a CPU run's).
    """

    def __init__(self, data: Tensor, batch_size: int, shuffle: bool = False, drop_last: bool = False,
                 seed: int = 0, dynamic_binarization: bool = False, epoch_source=None,
                 device: torch.device | str | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data = (data if device is None else data.to(device)).contiguous()
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.dynamic_binarization = dynamic_binarization
        self.epoch = 0
        self.epoch_source = epoch_source

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _num_global_batches(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        rank, world = _rank_world()
        n = self._num_global_batches()
        if self.shuffle:  # training: equal share per rank so collectives stay in step
            return n // world
        return len(range(rank, n, world))

    def __iter__(self):
        rank, world = _rank_world()
        B, n = self.batch_size, self._num_global_batches()
        epoch = self.epoch_source() if self.epoch_source is not None else None
        epoch = self.epoch if epoch is None else epoch
        device = self.data.device
        gen = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + epoch)
        if self.shuffle:
            perm = torch.randperm(len(self.data), generator=gen, device=device)
            batches = range(rank, (n // world) * world, world)
        else:
            perm = None
            batches = range(rank, n, world)
        for b in batches:
            if perm is None:
                x = self.data[b * B:(b + 1) * B]
            else:
                x = self.data.index_select(0, perm[b * B:(b + 1) * B])
            if self.dynamic_binarization:
                x = torch.bernoulli(x, generator=gen)
            yield Batch(x, b * B)

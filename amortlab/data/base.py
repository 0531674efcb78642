"""The one LightningDataModule shape every dataset shares: three in-memory float32 splits ``[N, X]``.

A subclass implements only ``load_splits`` (read the source format into grey values or bits in [0, 1]); this class
does binarization, the validation split where a source has none, batching and the data summary for results.json.

Binarization (``binarization``):
- ``none``: the source is already binary (binarized MNIST, Caltech silhouettes); values are used as they are.
- ``static``: every split is sampled once, x ~ Bernoulli(grey), with a generator seeded by ``binarization_seed``.
- ``threshold``: x = 1[grey >= ``threshold``].
- ``dynamic``: training batches are resampled x ~ Bernoulli(grey) every epoch; val/test are binarized statically
  (seeded) so evaluation numbers are comparable across runs.
"""
from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from amortlab.data.download import default_data_dir
from amortlab.data.loader import TensorLoader
from amortlab.errors import AmortlabError

BINARIZATIONS = ("none", "static", "threshold", "dynamic")


def as_rows(a: np.ndarray) -> Tensor:
    """float32, C-contiguous ``[N, X]`` tensor (contiguous rows make batch gathers ~10x faster)."""
    a = np.asarray(a)
    return torch.from_numpy(np.ascontiguousarray(a.reshape(len(a), -1), dtype=np.float32))


def split_off(data: Tensor, n_holdout: int, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded random split of ``data`` into (rest, holdout of ``n_holdout`` rows); order within each part kept."""
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    hold = perm[:n_holdout].sort().values
    rest = perm[n_holdout:].sort().values
    return data[rest].contiguous(), data[hold].contiguous()


def holdout_validation(dataset: str, train: Tensor, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """(train, val) for sources without a validation split: a seeded hold-out of ``val_size`` training rows."""
    if not 0 < val_size < len(train):
        raise AmortlabError(f"Dataset '{dataset}': dataset.val_size={val_size} must be between 1 and "
                            f"{len(train) - 1} (the number of training images minus one).")
    return split_off(train, val_size, seed)


def gpu_device(trainer) -> torch.device | None:
    """``trainer``'s device when it is a GPU (the data splits then live there); None on CPU or without a trainer."""
    device = trainer.strategy.root_device if trainer is not None else None
    return device if device is not None and device.type == "cuda" else None


class TensorDataModule(L.LightningDataModule):
    """Base datamodule. ``image_shape`` (C, H, W) is a class attribute; ``x_dim`` = C*H*W."""

    name: str = "tensor"
    image_shape: tuple[int, int, int] = (1, 28, 28)
    default_binarization: str = "none"

    def __init__(self, data_dir: str | None = None, batch_size: int = 100, eval_batch_size: int = 100,
                 binarization: str | None = None, threshold: float = 0.5, binarization_seed: int = 0,
                 seed: int = 0, download: bool = False, verify_checksum: bool = True,
                 max_epochs: int | None = None, train_subset: int | None = None):
        super().__init__()
        self.data_dir = data_dir or default_data_dir()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.binarization = binarization or self.default_binarization
        if self.binarization not in BINARIZATIONS:
            raise AmortlabError(
                f"dataset.binarization={self.binarization!r} is not one of {', '.join(BINARIZATIONS)}; pick one of "
                f"those (e.g. dataset.binarization=static).")
        self.threshold = threshold
        self.binarization_seed = binarization_seed
        self.seed = seed
        self.download = download
        self.verify_checksum = verify_checksum
        self.max_epochs = max_epochs  # this dataset's default trainer.max_epochs (the trainer config reads it)
        self.train_subset = train_subset  # use only this many training images (a seeded subset; reduced budgets)
        self.splits: dict[str, Tensor] | None = None
        self._train_grey: Tensor | None = None

    # --- to implement -------------------------------------------------------------------------------------------
    def load_splits(self) -> dict[str, Tensor]:
        """Return ``{"train", "val", "test"}`` float32 ``[N, x_dim]`` tensors with values in [0, 1]."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------------------------
    @property
    def x_dim(self) -> int:
        return math.prod(self.image_shape)

    def _binarize(self, name: str, x: Tensor, offset: int) -> Tensor:
        if self.binarization == "none":
            return x
        if self.binarization == "threshold":
            return (x >= self.threshold).float()
        if name == "train" and self.binarization == "dynamic":
            return x
        gen = torch.Generator().manual_seed(self.binarization_seed * 7919 + offset)
        return torch.bernoulli(x, generator=gen)

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        raw = self.load_splits()
        for name in ("train", "val", "test"):
            x = raw[name]
            if x.ndim != 2 or x.shape[1] != self.x_dim:
                raise AmortlabError(f"Dataset '{self.name}': split {name} has shape {tuple(x.shape)}, expected "
                                    f"[N, {self.x_dim}]; the file is not in the expected format.")
        if self.train_subset is not None:
            if not 0 < self.train_subset <= len(raw["train"]):
                raise AmortlabError(f"dataset.train_subset={self.train_subset} must be between 1 and the "
                                    f"{len(raw['train'])} training images of '{self.name}'.")
            keep = torch.randperm(len(raw["train"]), generator=torch.Generator().manual_seed(self.binarization_seed))
            raw["train"] = raw["train"][keep[:self.train_subset].sort().values]
        self._train_grey = raw["train"]
        self.splits = {name: self._binarize(name, raw[name].contiguous(), i).contiguous()
                       for i, name in enumerate(("train", "val", "test"))}

    @property
    def train_mean(self) -> Tensor:
        """Per-pixel mean of the training data ``[X]`` (grey values under dynamic binarization)."""
        self.setup()
        return self.splits["train"].mean(0)

    def info(self) -> dict[str, Any]:
        self.setup()
        return {
            "name": self.name, "image_shape": list(self.image_shape), "x_dim": self.x_dim,
            "train_size": len(self.splits["train"]), "train_subset": self.train_subset,
            "val_size": len(self.splits["val"]),
            "test_size": len(self.splits["test"]), "binarization": self.binarization,
            "threshold": self.threshold if self.binarization == "threshold" else None,
            "binarization_seed": self.binarization_seed if self.binarization in ("static", "dynamic") else None,
            "train_pixel_mean": round(float(self.splits["train"].mean()), 6),
            "data_dir": str(self.data_dir),
        }

    def train_dataloader(self, seed: int | None = None, epoch_source=None,
                         device: torch.device | None = None) -> TensorLoader:
        """Shuffled training batches; the order (and dynamic binarization) from ``seed`` (default ``dataset.seed``)
        and the epoch (the trainer's, or ``epoch_source()``); on ``device`` (default: the trainer's GPU, if any)."""
        self.setup()
        return TensorLoader(self.splits["train"], self.batch_size, shuffle=True, drop_last=True,
                            seed=self.seed if seed is None else seed,
                            dynamic_binarization=self.binarization == "dynamic",
                            epoch_source=epoch_source or self._trainer_epoch, device=device or self._device())

    def _trainer_epoch(self) -> int | None:
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else None

    def _device(self) -> torch.device | None:
        return gpu_device(getattr(self, "trainer", None))

    def eval_dataloader(self, split: str, n: int | None = None, device: torch.device | None = None) -> TensorLoader:
        """The first ``n`` rows (all if None) of ``split`` in evaluation batches. Training images under dynamic
        binarization are grey values; they are evaluated as one fixed, seeded binarization."""
        self.setup()
        if split not in self.splits:
            raise AmortlabError(f"Split {split!r} is unknown; use one of {', '.join(self.splits)}.")
        x = self.splits[split][:n]
        if split == "train" and self.binarization == "dynamic":
            x = self._binarize("train_eval", x, 3).contiguous()
        return TensorLoader(x, self.eval_batch_size, device=device or self._device())

    def val_dataloader(self) -> TensorLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> TensorLoader:
        return self.eval_dataloader("test")

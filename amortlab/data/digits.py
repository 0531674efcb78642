"""scikit-learn's 8x8 handwritten digits (UCI optdigits test part, 1797 images), shipped inside scikit-learn.

Grey levels 0..16 are scaled to [0, 1] and binarized at ``threshold`` (default 0.5, i.e. level >= 8). Split: a fixed
permutation from ``split_seed`` gives 1258 train / 180 val / 359 test images (70 / 10 / 20 %).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from amortlab.data.base import TensorDataModule, as_rows


class DigitsDataModule(TensorDataModule):
    name = "digits"
    image_shape = (1, 8, 8)
    default_binarization = "threshold"

    def __init__(self, split_seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2, **kwargs: Any):
        super().__init__(**kwargs)
        self.split_seed = split_seed
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction

    def load_splits(self) -> dict[str, Tensor]:
        from sklearn.datasets import load_digits

        x = as_rows(load_digits().data / 16.0)
        n = len(x)
        n_test, n_val = round(n * self.test_fraction), round(n * self.val_fraction)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        test, val, train = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
        return {"train": x[train.sort().values], "val": x[val.sort().values], "test": x[test.sort().values]}

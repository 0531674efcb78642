"""Caltech 101 Silhouettes 28x28 (Marlin et al., 2010), split 1: 4100 train / 2264 val / 2307 test, binary.

``caltech101_silhouettes_28_split1.mat`` holds ``train_data``, ``val_data``, ``test_data`` (``[N, 784]``). In the file
the silhouette (foreground) is 0 and the background 1, and each row is a 28x28 image flattened in column-major
(MATLAB) order. Rows come out with foreground 1 and in the same row-major orientation as MNIST rows, as in the
VampPrior code: ``1 - x.reshape((-1, 28, 28)).reshape((-1, 784), order='F')``. Already binary: binarization ``none``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor

from amortlab.data.base import TensorDataModule, as_rows
from amortlab.data.download import Resource, fetch
from amortlab.data.omniglot import load_mat
from amortlab.errors import AmortlabError

CALTECH = Resource("caltech101_silhouettes_28_split1.mat",
                   "https://people.cs.umass.edu/~marlin/data/caltech101_silhouettes_28_split1.mat", None)
KEYS = {"train": "train_data", "val": "val_data", "test": "test_data"}


class CaltechSilhouettesDataModule(TensorDataModule):
    name = "caltech_silhouettes"
    image_shape = (1, 28, 28)
    default_binarization = "none"
    # Canonical image counts per array; a subclass (or a test) may set None to accept any size.
    source_sizes: dict[str, int] | None = {"train_data": 4100, "val_data": 2264, "test_data": 2307}

    def load_splits(self) -> dict[str, Tensor]:
        path = fetch(CALTECH, self.data_dir, self.name, self.download, self.verify_checksum)
        mat = load_mat(path, tuple(KEYS.values()), self.name, CALTECH.url)
        return {split: as_rows(self.to_rows(key, mat[key], path)) for split, key in KEYS.items()}

    def to_rows(self, key: str, a: np.ndarray, path: Path) -> np.ndarray:
        """Stored rows (column-major images, foreground 0) -> row-major rows with foreground 1."""
        if a.ndim != 2 or a.shape[1] != self.x_dim:
            raise AmortlabError(f"Dataset '{self.name}': array '{key}' in {path} has shape {tuple(a.shape)}, expected "
                                f"[N, {self.x_dim}] (one 28x28 image per row); the file is not "
                                f"{CALTECH.filename}.")
        a = a.astype(np.float32, copy=False)
        if ((a != 0) & (a != 1)).any():
            raise AmortlabError(f"Dataset '{self.name}': array '{key}' in {path} holds values other than 0 and 1; the "
                                f"silhouettes are binary. The file is damaged or a different dataset; download it "
                                f"again from {CALTECH.url}.")
        want = (self.source_sizes or {}).get(key)
        if want is not None and len(a) != want:
            raise AmortlabError(f"Dataset '{self.name}': array '{key}' in {path} has {len(a)} images, but split 1 has "
                                f"{want}; the file is truncated or a different split. Download it again from "
                                f"{CALTECH.url}.")
        return 1.0 - a.reshape((-1, 28, 28)).reshape((-1, 28 * 28), order="F")

"""OMNIGLOT 28x28 as used by Burda et al. (IWAE): ``chardata.mat`` with grey values in [0, 1].

The file holds ``data`` (784 x 24 345, training) and ``testdata`` (784 x 8 070), one image per *column*, each column
the image flattened in MATLAB (column-major) order. Rows come out in the same row-major orientation as MNIST rows
via the IWAE code's own expression ``data.T.reshape((-1, 28, 28)).reshape((-1, 28*28), order='F')``.

There is no official validation split: ``val_size`` images (default 1345) are held out of the training images with a
seeded permutation (``split_seed``). Default binarization is ``static`` (seeded Bernoulli samples of the grey values);
``dynamic`` is the other common choice.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from amortlab.data.base import TensorDataModule, as_rows, holdout_validation
from amortlab.data.download import Resource, fetch
from amortlab.errors import AmortlabError

CHARDATA = Resource("chardata.mat", "https://github.com/yburda/iwae/raw/master/datasets/OMNIGLOT/chardata.mat", None)


def load_mat(path: Path, keys: tuple[str, ...], dataset: str, url: str) -> dict[str, np.ndarray]:
    """The named arrays of a MATLAB (v4-v7.2) file; AmortlabError naming the file if it cannot be read or lacks one."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path, variable_names=list(keys))
    except Exception as e:  # scipy raises ValueError/TypeError/NotImplementedError/OSError... on corrupt files
        raise AmortlabError(f"Dataset '{dataset}': cannot read {path} as a MATLAB .mat file ({type(e).__name__}: "
                            f"{e}). The file is corrupt or in another format: delete it and download it again from "
                            f"{url}.") from e
    missing = [k for k in keys if k not in mat]
    if missing:
        raise AmortlabError(f"Dataset '{dataset}': {path} lacks the arrays {missing} (expected {', '.join(keys)}); it "
                            f"is not the expected file. Download it again from {url}.")
    return {k: np.asarray(mat[k]) for k in keys}


class OmniglotDataModule(TensorDataModule):
    name = "omniglot"
    image_shape = (1, 28, 28)
    default_binarization = "static"
    # Canonical image counts per array in chardata.mat; a subclass (or a test) may set None to accept any size.
    source_sizes: dict[str, int] | None = {"data": 24_345, "testdata": 8_070}

    def __init__(self, val_size: int = 1345, split_seed: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        self.val_size = val_size
        self.split_seed = split_seed

    def load_splits(self) -> dict[str, Tensor]:
        path = fetch(CHARDATA, self.data_dir, self.name, self.download, self.verify_checksum)
        mat = load_mat(path, ("data", "testdata"), self.name, CHARDATA.url)
        rows = {k: self.to_rows(k, a, path) for k, a in mat.items()}
        train = as_rows(rows["data"])
        train, val = holdout_validation(self.name, train, self.val_size, self.split_seed)
        return {"train": train, "val": val, "test": as_rows(rows["testdata"])}

    def to_rows(self, key: str, a: np.ndarray, path: Path) -> np.ndarray:
        """Stored ``[784, N]`` column-major images -> ``[N, 784]`` row-major rows (checked: grey values in [0, 1])."""
        if a.ndim != 2 or a.shape[0] != self.x_dim:
            raise AmortlabError(f"Dataset '{self.name}': array '{key}' in {path} has shape {tuple(a.shape)}, expected "
                                f"[{self.x_dim}, N] (one 28x28 image per column); the file is not Burda et al.'s "
                                f"chardata.mat.")
        a = a.astype(np.float32, copy=False)
        if not np.isfinite(a).all() or a.min(initial=0) < 0 or a.max(initial=0) > 1:
            raise AmortlabError(f"Dataset '{self.name}': array '{key}' in {path} has values outside [0, 1] (range "
                                f"{np.nanmin(a)}..{np.nanmax(a)}); expected grey values in [0, 1].")
        want = (self.source_sizes or {}).get(key)
        if want is not None and a.shape[1] != want:
            raise AmortlabError(f"Dataset '{self.name}': array '{key}' in {path} has {a.shape[1]} images, but the "
                                f"canonical file has {want}; it is truncated or a different version. Download it "
                                f"again from {CHARDATA.url}.")
        # Exactly the IWAE code's reshaping (undoes the column-major flattening of each image).
        return a.T.reshape((-1, 28, 28)).reshape((-1, 28 * 28), order="F")

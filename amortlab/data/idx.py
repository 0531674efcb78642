"""MNIST and Fashion-MNIST from their IDX files (LeCun's format, gzip-compressed or raw).

Only the images are read (``train-images-idx3-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``); the label files are not
needed. Grey values are ``pixel / 255``; default binarization ``static`` (seeded Bernoulli samples); ``threshold`` and
``dynamic`` are the other usual choices. Validation: ``val_size`` (default 10 000) of the 60 000 training images held
out with a seeded permutation (``split_seed``).

IDX layout: two zero bytes, a dtype byte (0x08 = ubyte, ...), a byte with the number of dimensions, then each
dimension as a big-endian uint32, then the data in row-major (C) order, big-endian.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from amortlab.data.base import TensorDataModule, as_rows, holdout_validation
from amortlab.data.download import Resource, fetch
from amortlab.errors import AmortlabError

IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in an IDX file (gzip-compressed or raw); AmortlabError if it is corrupt or truncated."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a cut-off stream an EOFError
        raise AmortlabError(f"IDX file {path} cannot be read ({type(e).__name__}: {e}); it is corrupt or truncated. "
                            f"Delete it and download it again.") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES or raw[3] == 0:
        raise AmortlabError(f"IDX file {path} has magic number {raw[:4].hex() or '(empty file)'}, not an IDX header "
                            f"(00 00, a dtype byte such as 08 for ubyte, the number of dimensions); it is not an IDX "
                            f"file or it is corrupt. Delete it and download it again.")
    dtype, ndim = IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise AmortlabError(f"IDX file {path} is truncated: its header declares {ndim} dimensions but the file has "
                            f"only {len(raw)} bytes. Delete it and download it again.")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = math.prod(dims)
    if len(raw) - header != count * dtype.itemsize:
        what = "truncated" if len(raw) - header < count * dtype.itemsize else "longer than its header says"
        raise AmortlabError(f"IDX file {path} is {what}: the header declares shape {dims} of {dtype.name} "
                            f"({count * dtype.itemsize} bytes of data) but {len(raw) - header} bytes follow. Delete "
                            f"it and download it again.")
    a = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return a.astype(dtype.newbyteorder("="))  # native byte order, writable copy


class MNISTDataModule(TensorDataModule):
    name = "mnist"
    image_shape = (1, 28, 28)
    default_binarization = "static"
    base_url = "https://ossci-datasets.s3.amazonaws.com/mnist/"
    train_images = Resource("train-images-idx3-ubyte.gz", base_url + "train-images-idx3-ubyte.gz",
                            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609")
    test_images = Resource("t10k-images-idx3-ubyte.gz", base_url + "t10k-images-idx3-ubyte.gz",
                           "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6")
    # Canonical image counts; a subclass (or a test) may set None to accept any size.
    source_sizes: dict[str, int] | None = {"train": 60_000, "test": 10_000}

    def __init__(self, val_size: int = 10_000, split_seed: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        self.val_size = val_size
        self.split_seed = split_seed

    def load_splits(self) -> dict[str, Tensor]:
        train = self.read_images("train", self.train_images)
        test = self.read_images("test", self.test_images)
        train, val = holdout_validation(self.name, train, self.val_size, self.split_seed)
        return {"train": train, "val": val, "test": test}

    def read_images(self, split: str, resource: Resource) -> Tensor:
        path = fetch(resource, self.data_dir, self.name, self.download, self.verify_checksum)
        a = read_idx(path)
        if a.ndim != 3 or a.shape[1:] != self.image_shape[1:] or a.dtype != np.uint8:
            raise AmortlabError(f"Dataset '{self.name}': {path} holds a {a.dtype.name} array of shape {a.shape}, "
                                f"expected uint8 [N, 28, 28] images; it is not an IDX image file (a label file?).")
        want = (self.source_sizes or {}).get(split)
        if want is not None and len(a) != want:
            raise AmortlabError(f"Dataset '{self.name}': {path} has {len(a)} images, but the canonical {split} set "
                                f"has {want}; it is a different version. Download it again from {resource.url}.")
        return as_rows(a.astype(np.float32) / 255.0)


class FashionMNISTDataModule(MNISTDataModule):
    name = "fashion_mnist"
    # the project's GitHub copy: https (its S3 website is http only); the checksums below pin the files
    base_url = "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/"
    train_images = Resource("train-images-idx3-ubyte.gz", base_url + "train-images-idx3-ubyte.gz",
                            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84")
    test_images = Resource("t10k-images-idx3-ubyte.gz", base_url + "t10k-images-idx3-ubyte.gz",
                           "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073")

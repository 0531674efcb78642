"""Statically binarized MNIST of Larochelle & Murray (2011): 50 000 train / 10 000 valid / 10 000 test, already binary.

Two on-disk forms are accepted in ``data_dir`` (the ``.npz`` wins when both are present):

- ``binarized_mnist.npz``: arrays ``train``, ``valid``, ``test`` (uint8 0/1, one C-ordered 28x28 image per row), a
  repacked copy of the text files; verified against its sha256. It has no public URL.
- ``binarized_mnist_{train,valid,test}.amat``: the canonical text files (one image per line, 784 space-separated 0/1
  values) from Hugo Larochelle's page. No sha256 is published for them, so the parsed shapes and values are checked
  instead. Parsing the text takes a second or two, so a parsed copy is cached as ``binarized_mnist.amat-cache.npz`` in
  ``data_dir`` (or, where that is not writable, under the user cache dir) and reused while the text files are
  unchanged (same sizes and modification times).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
from torch import Tensor

from amortlab.data.base import TensorDataModule, as_rows
from amortlab.data.download import Resource, fetch
from amortlab.errors import AmortlabError, DatasetNotFoundError

AMAT_URL = "https://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
SPLITS = ("train", "valid", "test")  # names in the source files; "valid" becomes the datamodule's "val"

# The .npz has no public URL of its own: if it is corrupt, delete it and fetch the .amat files from AMAT_URL instead.
NPZ = Resource("binarized_mnist.npz", None,
               "350243cb824d66d022e0c3e87cac231231668817ff03f5f6d7b6533017d56b4b")
AMAT = {s: Resource(f"binarized_mnist_{s}.amat", f"{AMAT_URL}binarized_mnist_{s}.amat", None) for s in SPLITS}
CACHE_FILENAME = "binarized_mnist.amat-cache.npz"
CACHE_VERSION = 1


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "amortlab" / "parsed"


def cache_paths(data_dir: str | os.PathLike) -> list[Path]:
    """Where the parsed ``.amat`` copy may live, in order of preference."""
    key = hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:16]
    return [Path(data_dir) / CACHE_FILENAME, user_cache_dir() / f"binarized_mnist-{key}.amat-cache.npz"]


def amat_signature(paths: dict[str, Path]) -> np.ndarray:
    """(size, mtime_ns) of each text file: the cache is valid only while these are unchanged."""
    return np.array([[os.stat(paths[s]).st_size, os.stat(paths[s]).st_mtime_ns] for s in SPLITS], dtype=np.int64)


def parse_amat(path: Path, dataset: str = "binarized_mnist") -> np.ndarray:
    """One ``.amat`` text file as a uint8 ``[N, 784]`` array; AmortlabError on anything but rows of 784 0/1 values."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": reported below
            a = np.loadtxt(path, dtype=np.float32, ndmin=2)
    except ValueError as e:
        raise AmortlabError(f"Dataset '{dataset}': cannot parse {path} ({e}); expected one image per line of 784 "
                            f"space-separated 0/1 values. The file is corrupt or truncated: delete it and download "
                            f"it again from {AMAT_URL}.") from e
    if a.size == 0:
        raise AmortlabError(f"Dataset '{dataset}': {path} is empty; expected one image per line of 784 space-separated "
                            f"0/1 values. Delete it and download it again from {AMAT_URL}.")
    return a


def atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    """Write a compressed ``.npz`` via a temporary file in the same folder + ``os.replace`` (never a partial file)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class BinarizedMNISTDataModule(TensorDataModule):
    name = "binarized_mnist"
    image_shape = (1, 28, 28)
    default_binarization = "none"
    # Canonical row counts per source split; a subclass (or a test) may set None to accept any size.
    source_sizes: dict[str, int] | None = {"train": 50_000, "valid": 10_000, "test": 10_000}

    def load_splits(self) -> dict[str, Tensor]:
        arrays = self.load_arrays()
        return {"train": as_rows(arrays["train"]), "val": as_rows(arrays["valid"]), "test": as_rows(arrays["test"])}

    # --- sources ------------------------------------------------------------------------------------------------
    def load_arrays(self) -> dict[str, np.ndarray]:
        """``{"train", "valid", "test"}`` uint8 ``[N, 784]`` arrays from the ``.npz`` or the ``.amat`` files."""
        npz = Path(self.data_dir) / NPZ.filename
        if npz.is_file():
            path = fetch(NPZ, self.data_dir, self.name, download=False, check=self.verify_checksum)
            return self.validate(self.read_npz(path, SPLITS), path)
        paths = self.fetch_amat()
        cached = self.read_cache(paths)
        if cached is not None:
            return cached
        arrays = {s: parse_amat(paths[s], self.name) for s in SPLITS}
        arrays = {s: self.validate({s: arrays[s]}, paths[s])[s] for s in SPLITS}
        self.write_cache(paths, arrays)
        return arrays

    def fetch_amat(self) -> dict[str, Path]:
        try:
            return {s: fetch(AMAT[s], self.data_dir, self.name, self.download, self.verify_checksum) for s in SPLITS}
        except DatasetNotFoundError as e:
            # fetch reported the first missing file; name the others too, and the .npz alternative.
            others = [r for r in AMAT.values() if not (Path(self.data_dir) / r.filename).is_file()][1:]
            also = (f" The other Larochelle & Murray text files are missing as well: "
                    f"{', '.join(f'{r.filename} ({r.url})' for r in others)}." if others else "")
            raise DatasetNotFoundError(
                f"{e}{also} Alternatively put the repacked {NPZ.filename} (arrays train/valid/test, uint8 0/1; no "
                f"public URL) at {Path(self.data_dir) / NPZ.filename}.") from None

    def read_npz(self, path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in keys if k not in z.files]
                if missing:
                    raise AmortlabError(
                        f"Dataset '{self.name}': {path} has arrays {sorted(z.files)} but lacks {missing}; expected "
                        f"{', '.join(keys)} (uint8 [N, 784]). It is not a binarized MNIST archive.")
                return {k: z[k] for k in keys}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise AmortlabError(f"Dataset '{self.name}': cannot read {path} as a NumPy .npz archive ({e}). The file is "
                                f"corrupt: delete it (and any stale cache) and use the .amat files from "
                                f"{AMAT_URL}.") from e

    def validate(self, arrays: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
        """Check 784 columns, values in {0, 1} and (if ``source_sizes``) the canonical row counts; return uint8."""
        out = {}
        for split, a in arrays.items():
            if a.ndim != 2 or a.shape[1] != self.x_dim:
                raise AmortlabError(
                    f"Dataset '{self.name}': {split} data in {path} has shape {tuple(a.shape)}, expected "
                    f"[N, {self.x_dim}] (one 28x28 image per row); the file is not binarized MNIST or is damaged.")
            if ((a != 0) & (a != 1)).any():
                bad = np.unique(a[(a != 0) & (a != 1)])[:5]
                raise AmortlabError(
                    f"Dataset '{self.name}': {split} data in {path} holds values other than 0 and 1 (e.g. "
                    f"{bad.tolist()}); binarized MNIST is binary. The file is damaged or a different dataset.")
            want = (self.source_sizes or {}).get(split)
            if want is not None and len(a) != want:
                raise AmortlabError(
                    f"Dataset '{self.name}': {split} data in {path} has {len(a)} images, but the canonical split has "
                    f"{want}; the file is truncated or a different version. Download it again from {AMAT_URL}.")
            out[split] = np.ascontiguousarray(a, dtype=np.uint8)
        return out

    # --- parse cache --------------------------------------------------------------------------------------------
    def read_cache(self, paths: dict[str, Path]) -> dict[str, np.ndarray] | None:
        signature = amat_signature(paths)
        for cache in cache_paths(self.data_dir):
            if not cache.is_file():
                continue
            try:
                with np.load(cache, allow_pickle=False) as z:
                    if int(z["version"]) != CACHE_VERSION or not np.array_equal(z["signature"], signature):
                        continue
                    arrays = {s: z[s] for s in SPLITS}
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
                continue  # unreadable cache: parse the text again and overwrite it
            return self.validate(arrays, cache)
        return None

    def write_cache(self, paths: dict[str, Path], arrays: dict[str, np.ndarray]) -> Path | None:
        extra = {"version": np.array(CACHE_VERSION), "signature": amat_signature(paths)}
        errors = []
        for cache in cache_paths(self.data_dir):
            try:
                if cache.parent != Path(self.data_dir):
                    cache.parent.mkdir(parents=True, exist_ok=True)
                atomic_savez(cache, **arrays, **extra)
                return cache
            except OSError as e:
                errors.append(f"{cache}: {e}")
        warnings.warn(f"Dataset '{self.name}': could not cache the parsed .amat files ({'; '.join(errors)}); they "
                      f"will be parsed again next time.", stacklevel=2)
        return None

"""Locating, verifying and (optionally) downloading dataset files.

Every file a datamodule reads is a ``Resource`` with its canonical URL and sha256. ``fetch`` returns the local path
or raises a one-paragraph error naming the file, the expected path, the URL and the fix. Downloads go to a temporary
file that is checked before it is moved into place, so a broken or corrupt download never leaves a partial file.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from amortlab.errors import ChecksumError, DatasetNotFoundError


@dataclass(frozen=True)
class Resource:
    filename: str
    url: str | None  # None: no public URL (a repacked copy); errors then never suggest downloading it
    sha256: str | None  # None where no canonical checksum is published; then only presence is checked


def sha256sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def default_data_dir() -> str:
    """``$AMORTLAB_DATA`` if set, else the user cache dir ``~/.cache/amortlab/data``."""
    env = os.environ.get("AMORTLAB_DATA")
    if env:
        return env
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "amortlab" / "data")


def verify(path: Path, resource: Resource, dataset: str) -> None:
    if resource.sha256 is None:
        return
    got = sha256sum(path)
    if got != resource.sha256:
        raise ChecksumError(
            f"Dataset '{dataset}': file {path} has sha256 {got}, but the canonical {resource.filename} has "
            f"{resource.sha256}. The file is corrupt or a different version; delete it and "
            + (f"download it again from {resource.url} (or run with dataset.download=true)" if resource.url else
               "replace it with a good copy (this file has no public URL)")
            + ", or set dataset.verify_checksum=false if you deliberately use a modified copy.")


def fetch(resource: Resource, data_dir: str | os.PathLike, dataset: str, download: bool = False,
          check: bool = True, timeout: float = 60.0) -> Path:
    """Path of ``resource`` in ``data_dir``; downloads it first when absent and ``download`` is true."""
    path = Path(data_dir) / resource.filename
    if path.is_file():
        if check:
            verify(path, resource, dataset)
        return path
    if not resource.url:
        raise DatasetNotFoundError(
            f"Dataset '{dataset}' needs {resource.filename}, which is not at {path}; it has no public URL, so put a "
            f"copy there (set data_dir=... or $AMORTLAB_DATA to point elsewhere).")
    if not download:
        raise DatasetNotFoundError(
            f"Dataset '{dataset}' needs {resource.filename}, which is not at {path}. Download it from "
            f"{resource.url} into {Path(data_dir).resolve()} (set data_dir=... or $AMORTLAB_DATA to point elsewhere), "
            f"or run with dataset.download=true on a machine with internet access.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{resource.filename}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(resource.url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out)
        if check:
            verify(Path(tmp), resource, dataset)
        os.replace(tmp, path)
    except ChecksumError:
        raise
    except OSError as e:  # URLError and timeouts are OSErrors
        raise DatasetNotFoundError(
            f"Dataset '{dataset}': downloading {resource.url} to {path} failed ({e}). Check the network, or "
            f"download the file by hand into {Path(data_dir).resolve()}.") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path

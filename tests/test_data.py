"""Dataset parsers, binarization, download and errors.

Every parser is tested on small files written here in the exact on-disk format of the real source (the real files
cannot be fetched on the test machines); the real binarized MNIST is tested from ``$AMORTLAB_DATA`` when present.
"""
from __future__ import annotations

import gzip
import hashlib
import inspect
import os
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from amortlab.data import (BinarizedMNISTDataModule, CaltechSilhouettesDataModule, DigitsDataModule,
                           FashionMNISTDataModule, MNISTDataModule, OmniglotDataModule, TensorDataModule)
from amortlab.data import binarized_mnist as bm
from amortlab.data.caltech import CALTECH
from amortlab.data.download import Resource, fetch, sha256sum
from amortlab.data.idx import read_idx
from amortlab.data.loader import TensorLoader
from amortlab.data.omniglot import CHARDATA
from amortlab.errors import AmortlabError, ChecksumError, DatasetNotFoundError

REPO = Path(__file__).resolve().parents[1]


# --- fixtures: a known asymmetric shape and small files in each on-disk format ----------------------------------------
def letter_l() -> np.ndarray:
    """An upright "L" (28x28, row-major meaning: img[row, col]): vertical bar on the left, foot at the bottom."""
    img = np.zeros((28, 28), dtype=np.uint8)
    img[4:22, 5] = 1  # vertical stroke, column 5
    img[21, 5:15] = 1  # foot, row 21, extending right
    return img


L = letter_l()


def binary_images(n: int, seed: int = 0) -> np.ndarray:
    """``[n, 784]`` uint8 rows (row-major images), row 0 = the "L"."""
    x = (np.random.default_rng(seed).random((n, 784)) < 0.3).astype(np.uint8)
    x[0] = L.ravel()
    return x


def grey_images(n: int, seed: int = 0) -> np.ndarray:
    """``[n, 784]`` float rows in [0, 1] (row-major images), row 0 = the "L" scaled to grey 0.8."""
    x = np.random.default_rng(seed).random((n, 784))
    x[0] = 0.8 * L.ravel()
    return x


def write_amat(d: Path, arrays: dict[str, np.ndarray]) -> None:
    for split, a in arrays.items():
        (d / f"binarized_mnist_{split}.amat").write_text("".join(" ".join(map(str, row)) + "\n" for row in a))


def write_idx(path: Path, a: np.ndarray, gz: bool = True, dtype_byte: int = 0x08) -> bytes:
    raw = struct.pack(">BBBB", 0, 0, dtype_byte, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()
    data = gzip.compress(raw) if gz else raw
    path.write_bytes(data)
    return data


def stored_fortran(rows: np.ndarray) -> np.ndarray:
    """Row-major image rows -> each image flattened column-major (MATLAB order), as stored in the .mat files."""
    return np.stack([r.reshape(28, 28).ravel(order="F") for r in rows])


def write_chardata(d: Path, train: np.ndarray, test: np.ndarray) -> Path:
    from scipy.io import savemat

    path = d / "chardata.mat"
    # Real file: data 784 x N (one column-major image per column), float64 grey values.
    savemat(path, {"data": stored_fortran(train).T.astype(np.float64),
                   "testdata": stored_fortran(test).T.astype(np.float64),
                   "target": np.zeros((50, len(train)))})
    return path


def write_caltech(d: Path, train: np.ndarray, val: np.ndarray, test: np.ndarray) -> Path:
    from scipy.io import savemat

    path = d / "caltech101_silhouettes_28_split1.mat"
    # Real file: N x 784 rows, each a column-major image, silhouette (foreground) = 0, background = 1.
    savemat(path, {f"{k}_data": (1 - stored_fortran(a)).astype(np.float64)
                   for k, a in (("train", train), ("val", val), ("test", test))}
            | {"train_labels": np.ones((len(train), 1))})
    return path


class SmallBMNIST(BinarizedMNISTDataModule):
    source_sizes = None


class SmallOmniglot(OmniglotDataModule):
    source_sizes = None


class SmallCaltech(CaltechSilhouettesDataModule):
    source_sizes = None


class SmallMNIST(MNISTDataModule):
    source_sizes = None


class SmallFashion(FashionMNISTDataModule):
    source_sizes = None


def listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@pytest.fixture
def amat_dir(tmp_path):
    arrays = {"train": binary_images(30, 1), "valid": binary_images(10, 2), "test": binary_images(12, 3)}
    write_amat(tmp_path, arrays)
    return tmp_path, arrays


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    test[0] = L * 255
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test)
    return tmp_path, train, test


@pytest.fixture(autouse=True)
def _private_user_cache(tmp_path_factory, monkeypatch):
    """Keep the parse-cache fallback location inside the test's temp dirs."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))


# --- binarized MNIST -------------------------------------------------------------------------------------------------
def test_amat_parsed_in_order_and_orientation(amat_dir):
    d, arrays = amat_dir
    dm = SmallBMNIST(data_dir=str(d))
    dm.setup()
    assert dm.binarization == "none"
    for split, key in (("train", "train"), ("val", "valid"), ("test", "test")):
        x = dm.splits[split]
        assert x.dtype == torch.float32 and x.is_contiguous() and x.shape == (len(arrays[key]), 784)
        assert torch.equal(x, torch.from_numpy(arrays[key]).float())
    assert torch.equal(dm.splits["train"][0].view(28, 28), torch.from_numpy(L).float())  # upright L
    info = dm.info()
    assert (info["train_size"], info["val_size"], info["test_size"]) == (30, 10, 12)


def test_amat_cache_written_and_reused(amat_dir, monkeypatch):
    d, arrays = amat_dir
    calls = []
    real_parse = bm.parse_amat
    monkeypatch.setattr(bm, "parse_amat", lambda p, ds="": calls.append(p) or real_parse(p, ds))
    SmallBMNIST(data_dir=str(d)).setup()
    assert len(calls) == 3
    cache = d / bm.CACHE_FILENAME
    assert cache.is_file()
    assert not [p for p in listing(d) if p.endswith(".tmp")]  # atomic write left no temp file
    with np.load(cache) as z:
        assert np.array_equal(z["train"], arrays["train"]) and z["train"].dtype == np.uint8

    dm = SmallBMNIST(data_dir=str(d))
    dm.setup()
    assert len(calls) == 3  # reused, not parsed again
    assert torch.equal(dm.splits["val"], torch.from_numpy(arrays["valid"]).float())

    # Changing a text file invalidates the cache.
    new_valid = binary_images(11, 9)
    write_amat(d, {"valid": new_valid})
    os.utime(d / "binarized_mnist_valid.amat", ns=(1, 1))
    dm = SmallBMNIST(data_dir=str(d))
    dm.setup()
    assert len(calls) == 6
    assert torch.equal(dm.splits["val"], torch.from_numpy(new_valid).float())


def test_amat_cache_falls_back_to_user_cache_dir(amat_dir, monkeypatch, tmp_path_factory):
    d, arrays = amat_dir
    real_save = bm.atomic_savez

    def read_only_data_dir(path, **a):
        if path.parent == d:
            raise PermissionError(13, "Permission denied", str(path))
        real_save(path, **a)

    monkeypatch.setattr(bm, "atomic_savez", read_only_data_dir)
    SmallBMNIST(data_dir=str(d)).setup()
    assert not (d / bm.CACHE_FILENAME).exists()
    cache = bm.cache_paths(d)[1]
    assert cache.is_file() and cache.parent == bm.user_cache_dir()
    monkeypatch.setattr(bm, "parse_amat", lambda *a: pytest.fail("cache in user cache dir not reused"))
    dm = SmallBMNIST(data_dir=str(d))
    dm.setup()
    assert torch.equal(dm.splits["test"], torch.from_numpy(arrays["test"]).float())


def test_npz_preferred_over_amat_and_checksum_checked(amat_dir):
    d, _ = amat_dir
    npz = {"train": binary_images(20, 5), "valid": binary_images(6, 6), "test": binary_images(7, 7)}
    np.savez_compressed(d / "binarized_mnist.npz", **npz)
    dm = SmallBMNIST(data_dir=str(d), verify_checksum=False)
    dm.setup()
    assert torch.equal(dm.splits["train"], torch.from_numpy(npz["train"]).float())
    assert not (d / bm.CACHE_FILENAME).exists()  # text files never parsed
    with pytest.raises(ChecksumError, match="binarized_mnist.npz"):
        SmallBMNIST(data_dir=str(d)).setup()  # default verify_checksum=True: a small file is not the real one


def test_npz_missing_key(tmp_path):
    np.savez(tmp_path / "binarized_mnist.npz", train=binary_images(3), test=binary_images(3))
    with pytest.raises(AmortlabError, match="valid"):
        SmallBMNIST(data_dir=str(tmp_path), verify_checksum=False).setup()


@pytest.mark.parametrize("bad", ["value", "columns", "ragged", "text", "empty"])
def test_amat_malformed(amat_dir, bad):
    d, arrays = amat_dir
    path = d / "binarized_mnist_test.amat"
    lines = path.read_text().splitlines()
    if bad == "value":
        lines[3] = lines[3][:-1] + "2"
    elif bad == "columns":
        lines = [" ".join(line.split()[:783]) for line in lines]
    elif bad == "ragged":
        lines[5] = " ".join(lines[5].split()[:700])
    elif bad == "text":
        lines[2] = lines[2].replace("0", "x", 1)
    else:
        lines = []
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(AmortlabError, match="binarized_mnist_test.amat"):
        SmallBMNIST(data_dir=str(d)).setup()
    assert not (d / bm.CACHE_FILENAME).exists()  # nothing bad gets cached


def test_amat_canonical_sizes_enforced(amat_dir):
    d, _ = amat_dir
    with pytest.raises(AmortlabError, match="50000"):
        BinarizedMNISTDataModule(data_dir=str(d)).setup()


def test_binarized_mnist_missing(tmp_path):
    before = listing(tmp_path)
    with pytest.raises(DatasetNotFoundError) as e:
        BinarizedMNISTDataModule(data_dir=str(tmp_path)).setup()
    msg = str(e.value)
    for split in ("train", "valid", "test"):
        assert f"binarized_mnist_{split}.amat" in msg and bm.AMAT[split].url in msg
    assert str(tmp_path / "binarized_mnist_train.amat") in msg
    assert "binarized_mnist.npz" in msg
    assert listing(tmp_path) == before
    missing_dir = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        BinarizedMNISTDataModule(data_dir=str(missing_dir)).setup()
    assert not missing_dir.exists()


def test_binarized_mnist_partly_missing(amat_dir):
    d, _ = amat_dir
    (d / "binarized_mnist_valid.amat").unlink()
    with pytest.raises(DatasetNotFoundError) as e:
        SmallBMNIST(data_dir=str(d)).setup()
    assert str(d / "binarized_mnist_valid.amat") in str(e.value) and bm.AMAT["valid"].url in str(e.value)
    assert "binarized_mnist_test.amat (" not in str(e.value)  # present files are not reported missing
    assert not (d / bm.CACHE_FILENAME).exists()


def test_binarized_mnist_download_from_file_urls(amat_dir, tmp_path_factory, monkeypatch):
    src, arrays = amat_dir
    monkeypatch.setattr(bm, "AMAT", {s: Resource(r.filename, (src / r.filename).as_uri(), None)
                                     for s, r in bm.AMAT.items()})
    dst = tmp_path_factory.mktemp("bm_download")
    dm = SmallBMNIST(data_dir=str(dst), download=True)
    dm.setup()
    assert torch.equal(dm.splits["test"], torch.from_numpy(arrays["test"]).float())
    assert listing(dst) == sorted([bm.CACHE_FILENAME] + [f"binarized_mnist_{s}.amat" for s in bm.SPLITS])


# --- OMNIGLOT --------------------------------------------------------------------------------------------------------
def test_omniglot_orientation_and_split(tmp_path):
    train, test = grey_images(40, 1), grey_images(9, 2)
    write_chardata(tmp_path, train, test)
    dm = SmallOmniglot(data_dir=str(tmp_path), binarization="none", val_size=8, split_seed=3)
    dm.setup()
    assert dm.splits["test"].shape == (9, 784) and dm.splits["test"].dtype == torch.float32
    assert torch.allclose(dm.splits["test"], torch.from_numpy(test).float())
    assert torch.allclose(dm.splits["test"][0].view(28, 28), 0.8 * torch.from_numpy(L).float())  # upright L
    # IWAE's own expression on the stored array gives the same rows.
    from scipy.io import loadmat
    data = loadmat(tmp_path / "chardata.mat")["data"]
    iwae = data.T.reshape((-1, 28, 28)).reshape((-1, 28 * 28), order="F")
    assert np.allclose(iwae, train)
    # Seeded split: val_size rows held out, order kept, reproducible, seed-dependent.
    assert len(dm.splits["train"]) == 32 and len(dm.splits["val"]) == 8
    both = torch.cat([dm.splits["train"], dm.splits["val"]])
    assert torch.allclose(both.sort(0).values, torch.from_numpy(train).float().sort(0).values)
    again = SmallOmniglot(data_dir=str(tmp_path), binarization="none", val_size=8, split_seed=3)
    again.setup()
    assert torch.equal(again.splits["val"], dm.splits["val"])
    other = SmallOmniglot(data_dir=str(tmp_path), binarization="none", val_size=8, split_seed=4)
    other.setup()
    assert not torch.equal(other.splits["val"], dm.splits["val"])


def test_omniglot_defaults_static(tmp_path):
    write_chardata(tmp_path, grey_images(40, 1), grey_images(9, 2))
    dm = SmallOmniglot(data_dir=str(tmp_path), val_size=5)
    dm.setup()
    assert dm.binarization == "static" and dm.info()["binarization_seed"] == 0
    assert all(((x == 0) | (x == 1)).all() for x in dm.splits.values())


def test_omniglot_bad_files(tmp_path):
    from scipy.io import savemat

    savemat(tmp_path / "chardata.mat", {"data": grey_images(10), "testdata": grey_images(4).T})  # not transposed
    with pytest.raises(AmortlabError, match="784, N"):
        SmallOmniglot(data_dir=str(tmp_path), val_size=2).setup()
    savemat(tmp_path / "chardata.mat", {"data": 2 * grey_images(10).T, "testdata": grey_images(4).T})
    with pytest.raises(AmortlabError, match=r"outside \[0, 1\]"):
        SmallOmniglot(data_dir=str(tmp_path), val_size=2).setup()
    savemat(tmp_path / "chardata.mat", {"data": grey_images(10).T})
    with pytest.raises(AmortlabError, match="testdata"):
        SmallOmniglot(data_dir=str(tmp_path), val_size=2).setup()
    write_chardata(tmp_path, grey_images(10), grey_images(4))
    with pytest.raises(AmortlabError, match="val_size"):
        SmallOmniglot(data_dir=str(tmp_path), val_size=10).setup()
    with pytest.raises(AmortlabError, match="24345"):
        OmniglotDataModule(data_dir=str(tmp_path), val_size=2).setup()
    (tmp_path / "chardata.mat").write_bytes(b"this is not a mat file" * 20)
    with pytest.raises(AmortlabError, match="chardata.mat"):
        SmallOmniglot(data_dir=str(tmp_path), val_size=2).setup()


def test_omniglot_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        OmniglotDataModule(data_dir=str(tmp_path)).setup()
    msg = str(e.value)
    assert "chardata.mat" in msg and str(tmp_path / "chardata.mat") in msg and CHARDATA.url in msg
    assert listing(tmp_path) == []


# --- Caltech 101 Silhouettes -----------------------------------------------------------------------------------------
def test_caltech_upright_foreground_one(tmp_path):
    train, val, test = binary_images(15, 1), binary_images(6, 2), binary_images(7, 3)
    path = write_caltech(tmp_path, train, val, test)
    # Stored convention, spelled out: the L is 0 on a background of 1 and flattened column by column.
    from scipy.io import loadmat
    stored = loadmat(path)["train_data"][0]
    assert stored.sum() == 784 - L.sum()
    assert np.array_equal(stored.reshape(28, 28), 1 - L.T)
    dm = SmallCaltech(data_dir=str(tmp_path))
    dm.setup()
    assert dm.binarization == "none"
    out = dm.splits["train"][0].view(28, 28)
    assert torch.equal(out, torch.from_numpy(L).float())  # upright, foreground 1
    assert out[21, 14] == 1 and out[4, 5] == 1 and out[5, 21] == 0  # foot at the bottom right, bar on the left
    for split, a in (("train", train), ("val", val), ("test", test)):
        assert torch.equal(dm.splits[split], torch.from_numpy(a).float())


def test_caltech_bad_files(tmp_path):
    from scipy.io import savemat

    write_caltech(tmp_path, binary_images(15), binary_images(6), binary_images(7))
    with pytest.raises(AmortlabError, match="4100"):
        CaltechSilhouettesDataModule(data_dir=str(tmp_path)).setup()
    savemat(tmp_path / CALTECH.filename, {"train_data": grey_images(5), "val_data": binary_images(3),
                                          "test_data": binary_images(3)})
    with pytest.raises(AmortlabError, match="other than 0 and 1"):
        SmallCaltech(data_dir=str(tmp_path)).setup()
    savemat(tmp_path / CALTECH.filename, {"train_data": binary_images(5).T, "val_data": binary_images(3),
                                          "test_data": binary_images(3)})
    with pytest.raises(AmortlabError, match="N, 784"):
        SmallCaltech(data_dir=str(tmp_path)).setup()


def test_caltech_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        CaltechSilhouettesDataModule(data_dir=str(tmp_path)).setup()
    msg = str(e.value)
    assert CALTECH.filename in msg and str(tmp_path / CALTECH.filename) in msg and CALTECH.url in msg
    assert listing(tmp_path) == []


# --- IDX: MNIST / Fashion-MNIST --------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx(tmp_path, gz):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.idx", a, gz=gz)
    out = read_idx(tmp_path / "a.idx")
    assert out.dtype == np.uint8 and np.array_equal(out, a)
    labels = np.array([3, 1, 4], dtype=np.uint8)
    write_idx(tmp_path / "l.idx", labels, gz=gz)
    assert np.array_equal(read_idx(tmp_path / "l.idx"), labels)
    f = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    (tmp_path / "f.idx").write_bytes(struct.pack(">BBBB2I", 0, 0, 0x0D, 2, 2, 3) + f.astype(">f4").tobytes())
    assert np.array_equal(read_idx(tmp_path / "f.idx"), f)


def test_read_idx_corrupt(tmp_path):
    a = np.arange(100, dtype=np.uint8).reshape(4, 5, 5)
    data = write_idx(tmp_path / "ok.gz", a)
    raw = gzip.decompress(data)
    cases = {
        "bad magic": b"\x08\x03" + raw[2:],
        "bad dtype": raw[:2] + b"\x07" + raw[3:],
        "truncated data": raw[:-7],
        "truncated header": raw[:9],
        "trailing bytes": raw + b"\x00",
        "empty": b"",
    }
    for content in cases.values():
        (tmp_path / "bad").write_bytes(content)
        with pytest.raises(AmortlabError, match="IDX file"):
            read_idx(tmp_path / "bad")
        (tmp_path / "bad.gz").write_bytes(gzip.compress(content))
        with pytest.raises(AmortlabError, match="IDX file"):
            read_idx(tmp_path / "bad.gz")
    (tmp_path / "cut.gz").write_bytes(data[: len(data) // 2])  # truncated gzip stream
    with pytest.raises(AmortlabError, match="corrupt or truncated"):
        read_idx(tmp_path / "cut.gz")
    (tmp_path / "garbled.gz").write_bytes(data[:12] + bytes(200))  # broken deflate data
    with pytest.raises(AmortlabError, match="IDX file"):
        read_idx(tmp_path / "garbled.gz")


@pytest.mark.parametrize("cls", [SmallMNIST, SmallFashion])
def test_idx_datamodule(idx_dir, cls):
    d, train, test = idx_dir
    dm = cls(data_dir=str(d), verify_checksum=False, binarization="none", val_size=10, split_seed=1)
    dm.setup()
    assert (len(dm.splits["train"]), len(dm.splits["val"]), len(dm.splits["test"])) == (30, 10, 12)
    assert torch.equal(dm.splits["test"], torch.from_numpy(test.reshape(12, 784) / np.float32(255)))
    assert torch.equal(dm.splits["test"][0].view(28, 28), torch.from_numpy(L).float())  # upright L, grey = p/255
    both = torch.cat([dm.splits["train"], dm.splits["val"]]) * 255
    assert torch.equal(both.round().sort(0).values, torch.from_numpy(train.reshape(40, 784)).float().sort(0).values)
    assert cls(data_dir=str(d)).binarization == "static"


def test_fashion_shares_body_with_own_resources():
    assert FashionMNISTDataModule.__mro__[1] is MNISTDataModule
    assert set(vars(FashionMNISTDataModule)) - {"__module__", "__doc__", "__qualname__", "__firstlineno__",
                                                "__static_attributes__"} == {
        "name", "base_url", "train_images", "test_images"}
    assert FashionMNISTDataModule.name == "fashion_mnist" and MNISTDataModule.name == "mnist"
    for cls in (MNISTDataModule, FashionMNISTDataModule):
        for r in (cls.train_images, cls.test_images):
            assert r.url.startswith(cls.base_url) and r.url.endswith(r.filename) and len(r.sha256) == 64


def test_idx_datamodule_errors(idx_dir):
    d, train, test = idx_dir
    with pytest.raises(ChecksumError, match="train-images-idx3-ubyte.gz"):
        SmallMNIST(data_dir=str(d), val_size=10).setup()
    with pytest.raises(AmortlabError, match="60000"):
        MNISTDataModule(data_dir=str(d), verify_checksum=False).setup()
    with pytest.raises(AmortlabError, match="val_size"):
        SmallMNIST(data_dir=str(d), verify_checksum=False, val_size=40).setup()
    write_idx(d / "t10k-images-idx3-ubyte.gz", np.arange(12, dtype=np.uint8))  # a label file in its place
    with pytest.raises(AmortlabError, match="28, 28"):
        SmallMNIST(data_dir=str(d), verify_checksum=False, val_size=10).setup()


@pytest.mark.parametrize("cls", [MNISTDataModule, FashionMNISTDataModule])
def test_idx_missing(tmp_path, cls):
    with pytest.raises(DatasetNotFoundError) as e:
        cls(data_dir=str(tmp_path)).setup()
    msg = str(e.value)
    r = cls.train_images
    assert r.filename in msg and str(tmp_path / r.filename) in msg and r.url in msg
    assert listing(tmp_path) == []


# --- binarization modes (shared base behaviour, on grey MNIST-format data) --------------------------------------------
def grey_dm(d, **kw):
    dm = SmallMNIST(data_dir=str(d), verify_checksum=False, val_size=10, **kw)
    dm.setup()
    return dm


def test_binarization_none_and_threshold(idx_dir):
    d, _, test = idx_dir
    grey = torch.from_numpy(test.reshape(12, 784) / np.float32(255))
    assert torch.equal(grey_dm(d, binarization="none").splits["test"], grey)
    thr = grey_dm(d, binarization="threshold", threshold=0.3)
    assert torch.equal(thr.splits["test"], (grey >= 0.3).float())
    assert thr.info()["threshold"] == 0.3


def test_binarization_static_seeded(idx_dir):
    d, _, test = idx_dir
    a, b = grey_dm(d, binarization="static"), grey_dm(d, binarization="static")
    c = grey_dm(d, binarization="static", binarization_seed=1)
    for split in ("train", "val", "test"):
        assert ((a.splits[split] == 0) | (a.splits[split] == 1)).all()
        assert torch.equal(a.splits[split], b.splits[split])
        assert not torch.equal(a.splits[split], c.splits[split])
    grey = test.reshape(12, 784) / 255.0
    assert abs(float(a.splits["test"].mean()) - grey.mean()) < 0.05
    assert not torch.equal(a.splits["train"][: len(a.splits["val"])], a.splits["val"])


def test_binarization_dynamic_resamples_per_epoch(idx_dir):
    d, _, _ = idx_dir
    dm = grey_dm(d, binarization="dynamic", batch_size=10)
    assert not ((dm.splits["train"] == 0) | (dm.splits["train"] == 1)).all()  # training set kept grey
    assert ((dm.splits["val"] == 0) | (dm.splits["val"] == 1)).all()  # evaluation sets static
    assert torch.equal(dm.splits["val"], grey_dm(d, binarization="dynamic").splits["val"])
    assert torch.equal(grey_dm(d, binarization="static").splits["val"], dm.splits["val"])

    # A bare TensorLoader takes its epoch from set_epoch.
    loader = TensorLoader(dm.splits["train"], 10, shuffle=True, drop_last=True, dynamic_binarization=True)

    def epoch(e):
        loader.set_epoch(e)
        return torch.cat([b.x for b in loader])

    e0, e0_again, e1 = epoch(0), epoch(0), epoch(1)
    assert ((e0 == 0) | (e0 == 1)).all() and e0.shape == (30, 784)
    assert torch.equal(e0, e0_again)  # reproducible
    assert not torch.equal(e0, e1)  # resampled (and reshuffled) every epoch

    # The datamodule's training loader follows the trainer's epoch.
    dm_loader = dm.train_dataloader()
    assert dm_loader.dynamic_binarization
    per_epoch = []
    for e in (0, 0, 1):
        dm.trainer = SimpleNamespace(current_epoch=e)
        per_epoch.append(torch.cat([b.x for b in dm_loader]))
    assert ((per_epoch[0] == 0) | (per_epoch[0] == 1)).all()
    assert torch.equal(per_epoch[0], per_epoch[1]) and not torch.equal(per_epoch[0], per_epoch[2])
    assert torch.equal(per_epoch[0], e0)


def test_invalid_binarization():
    with pytest.raises(AmortlabError, match="binarization"):
        SmallMNIST(binarization="stochastic")


# --- download.fetch --------------------------------------------------------------------------------------------------
def test_fetch_file_url(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "blob.bin").write_bytes(b"amortlab" * 1000)
    good = Resource("blob.bin", (src / "blob.bin").as_uri(), hashlib.sha256(b"amortlab" * 1000).hexdigest())
    dst = tmp_path / "dst"
    with pytest.raises(DatasetNotFoundError, match="download"):
        fetch(good, dst, "blob", download=False)
    path = fetch(good, dst, "blob", download=True)
    assert path == dst / "blob.bin" and path.read_bytes() == b"amortlab" * 1000
    assert listing(dst) == ["blob.bin"]
    assert fetch(good, dst, "blob") == path  # present: no download needed

    bad = Resource("other.bin", good.url, "0" * 64)
    with pytest.raises(ChecksumError, match="other.bin"):
        fetch(bad, dst, "blob", download=True)
    assert listing(dst) == ["blob.bin"]  # no partial or temporary file left
    gone = Resource("gone.bin", (src / "gone.bin").as_uri(), None)
    with pytest.raises(DatasetNotFoundError, match="gone.bin"):
        fetch(gone, dst, "blob", download=True)
    assert listing(dst) == ["blob.bin"]


def test_datamodule_download_from_file_urls(idx_dir, tmp_path_factory):
    src, train, test = idx_dir
    dst = tmp_path_factory.mktemp("download")

    class Mirror(SmallMNIST):
        train_images = Resource("train-images-idx3-ubyte.gz", (src / "train-images-idx3-ubyte.gz").as_uri(),
                                sha256sum(src / "train-images-idx3-ubyte.gz"))
        test_images = Resource("t10k-images-idx3-ubyte.gz", (src / "t10k-images-idx3-ubyte.gz").as_uri(),
                               sha256sum(src / "t10k-images-idx3-ubyte.gz"))

    dm = Mirror(data_dir=str(dst), download=True, val_size=10, binarization="none")
    dm.setup()
    assert listing(dst) == ["t10k-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz"]
    assert torch.equal(dm.splits["test"] * 255, torch.from_numpy(test.reshape(12, 784)).float())


# --- Hydra configs ---------------------------------------------------------------------------------------------------
CONFIGS = {"digits": DigitsDataModule, "binarized_mnist": BinarizedMNISTDataModule, "omniglot": OmniglotDataModule,
           "caltech_silhouettes": CaltechSilhouettesDataModule, "mnist": MNISTDataModule,
           "fashion_mnist": FashionMNISTDataModule}


def constructor_args(cls) -> set[str]:
    names = set()
    for c in cls.__mro__:
        if issubclass(c, TensorDataModule) and "__init__" in vars(c):
            names |= {p.name for p in inspect.signature(c.__init__).parameters.values()
                      if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"}
    return names


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dataset_config_instantiates(name, tmp_path):
    from hydra.utils import instantiate

    cfg = OmegaConf.create({"data_dir": str(tmp_path), "seed": 7,
                            "dataset": OmegaConf.load(REPO / "conf" / "dataset" / f"{name}.yaml")})
    keys = set(cfg.dataset) - {"_target_"}
    assert keys <= constructor_args(CONFIGS[name]), keys - constructor_args(CONFIGS[name])
    dm = instantiate(cfg.dataset)  # lazy: reads nothing yet
    assert type(dm) is CONFIGS[name] and dm.name == name
    assert dm.data_dir == str(tmp_path) and dm.seed == 7 and dm.max_epochs > 0
    assert dm.binarization == CONFIGS[name].default_binarization
    bad = OmegaConf.merge(cfg.dataset, {"batchsize": 5})  # a typo must fail, not be swallowed
    with pytest.raises(Exception, match="batchsize"):
        instantiate(bad)


def test_binarized_mnist_config_epochs():
    assert OmegaConf.load(REPO / "conf" / "dataset" / "binarized_mnist.yaml").max_epochs == 3280


# --- the real binarized MNIST ($AMORTLAB_DATA) ------------------------------------------------------------------------
def real_data_dir() -> Path:
    env = os.environ.get("AMORTLAB_DATA")
    if not env:
        pytest.skip("AMORTLAB_DATA is not set; set it to the folder holding binarized_mnist.npz to run this test")
    d = Path(env)
    if not (d / "binarized_mnist.npz").is_file():
        pytest.skip(f"binarized_mnist.npz is not in AMORTLAB_DATA={env}")
    return d


@pytest.fixture(scope="module")
def real_bmnist():
    dm = BinarizedMNISTDataModule(data_dir=str(real_data_dir()))
    dm.setup()
    return dm


def test_real_binarized_mnist(real_bmnist):
    dm = real_bmnist
    assert sha256sum(Path(dm.data_dir) / "binarized_mnist.npz") == bm.NPZ.sha256
    expected = {"train": (50_000, 0.1306), "val": (10_000, 0.1311), "test": (10_000, 0.1325)}
    for split, (n, mean) in expected.items():
        x = dm.splits[split]
        assert x.shape == (n, 784) and x.dtype == torch.float32 and x.is_contiguous()
        assert ((x == 0) | (x == 1)).all()
        assert abs(float(x.mean()) - mean) < 5e-4, (split, float(x.mean()))
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        for _, batch in zip(range(3), loader):
            assert batch.x.dtype == torch.float32 and batch.x.is_contiguous() and batch.x.shape == (100, 784)
    assert dm.info()["train_size"] == 50_000


def test_eval_dataloader_first_rows_and_fixed_binarization_of_dynamic_training_images():
    """Training-point evaluation reads the first n rows; under dynamic binarization (grey training images) it sees
    one fixed binary sample, the same on every call, never the grey values."""
    dm = DigitsDataModule(binarization="dynamic", eval_batch_size=7)
    dm.setup()
    a = torch.cat([b.x for b in dm.eval_dataloader("train", 20)])
    b = torch.cat([b.x for b in dm.eval_dataloader("train", 20)])
    assert a.shape == (20, dm.x_dim) and torch.equal(a, b)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    grey = dm.splits["train"][:20]
    assert not torch.equal(a, grey) and (a - grey).abs().mean() < 0.5  # a Bernoulli sample of those grey rows
    firsts = [batch.first_index for batch in dm.eval_dataloader("train", 20)]
    assert firsts == [0, 7, 14]
    static = DigitsDataModule(binarization="threshold", eval_batch_size=7)
    assert torch.equal(torch.cat([b.x for b in static.eval_dataloader("train", 9)]), static.splits["train"][:9])
    with pytest.raises(AmortlabError, match="unknown"):
        static.eval_dataloader("validation")


def _epoch_rows(loader: TensorLoader, epoch: int) -> list[torch.Tensor]:
    loader.set_epoch(epoch)
    return [b.x for b in loader]


@pytest.mark.parametrize("dynamic", [False, True])
def test_loader_on_a_gpu_keeps_the_split_there_and_draws_there(dynamic):
    """device=cuda: the split is copied once, every batch is made on the GPU (no per-step host-to-device copy), each
    epoch is a permutation of all rows reproducible from (seed, epoch), and a new epoch reorders. The CPU order is
    unchanged by the device argument (device=None and device='cpu' give the same batches)."""
    data = torch.rand(64, 5)
    cpu = [TensorLoader(data, 8, shuffle=True, drop_last=True, seed=3, dynamic_binarization=dynamic, device=d)
           for d in (None, "cpu")]
    for a, b in zip(_epoch_rows(cpu[0], 2), _epoch_rows(cpu[1], 2)):
        assert torch.equal(a, b)
    if not torch.cuda.is_available():
        pytest.skip("the GPU half needs CUDA")
    gpu = TensorLoader(data, 8, shuffle=True, drop_last=True, seed=3, dynamic_binarization=dynamic, device="cuda")
    assert gpu.data.is_cuda
    e1, e1_again, e2 = _epoch_rows(gpu, 1), _epoch_rows(gpu, 1), _epoch_rows(gpu, 2)
    assert all(x.is_cuda for x in e1)
    assert all(torch.equal(a, b) for a, b in zip(e1, e1_again))
    assert not all(torch.equal(a, b) for a, b in zip(e1, e2))
    if not dynamic:  # every row exactly once per epoch
        rows = torch.cat(e1).cpu()
        assert torch.equal(rows[rows[:, 0].argsort()], data[data[:, 0].argsort()])

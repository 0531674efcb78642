import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# W&B must never reach the network from tests.
os.environ["WANDB_MODE"] = "offline" if os.environ.get("WANDB_MODE") not in ("disabled", "offline") else os.environ[
    "WANDB_MODE"]
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")

# Under pytest-xdist (pyproject: -n auto) each worker is one process per core: one intra-op thread each, and the same
# for the train.py / sweep.py subprocesses the tests start, so the workers do not fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def shared_data_dir() -> Path | None:
    d = os.environ.get("AMORTLAB_DATA")
    return Path(d) if d and Path(d).is_dir() else None


@pytest.fixture
def mnist_dir() -> Path:
    d = shared_data_dir()
    if d is None or not (d / "binarized_mnist.npz").is_file():
        pytest.skip("real binarized MNIST not found: set AMORTLAB_DATA to the folder holding binarized_mnist.npz")
    return d


@pytest.fixture
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (and ~10x contention on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

"""Moving MNIST, generated deterministically from the shared statically binarized MNIST (no file of its own).

Every sequence shows ``n_digits`` binary digits moving on a ``canvas`` x ``canvas`` black frame for ``steps`` frames.
Training sequences use digits of binarized MNIST's train split, validation sequences its valid split, test sequences
its test split, so no digit image is shared between the splits. Binarized MNIST is read as ``dataset=binarized_mnist``
reads it (``binarized_mnist.npz`` or the ``.amat`` files in ``data_dir``); when it is absent its usual
DatasetNotFoundError (naming the file) is raised.

Parameters (all are config keys, ``conf/dataset/moving_mnist.yaml``):

- ``canvas`` (32): frame side in pixels; ``digit_size`` (14): 14 = each binary digit max-pooled 2x2 (a pixel is on
  when any of its 4 source pixels is), 28 = the digit as it is; ``canvas >= digit_size``; a digit's corner moves
  over [0, canvas - digit_size] (18 px at the defaults).
- ``n_digits`` (2): digits per sequence; ``steps`` (10): frames per sequence (no padding: all steps present).
- ``n_train`` (5000), ``n_val`` (500), ``n_test`` (500): sequences per split.
- ``generation_seed`` (0): the seed of everything random below. Each split has its own NumPy generator,
  ``np.random.default_rng([generation_seed, offset])`` with the fixed offsets train 0, val 1, test 2, so the same
  settings give everyone the same sequences.

Generation, per split, drawn in this order from that generator (vectorised over sequences):

1. ``digit``: for each sequence and digit, a source image index uniform over the split (with replacement).
2. ``start``: the top-left corner (row, column), each a uniform integer in [0, canvas - digit_size].
3. ``angle`` uniform in [0, 2 pi) and ``speed`` uniform in [1, 3] pixels per frame; the velocity is
   speed * (cos angle, sin angle) in (row, column).

Frame 0 shows the digits at ``start``. Between frames the real-valued position moves by the velocity and bounces off
the walls: a coordinate p that leaves [0, canvas - digit_size] is reflected back (p -> -p below 0, p -> 2 * limit - p
above the limit) and that velocity component flips sign. A digit is drawn with its corner at the rounded position,
so it is never clipped. Digits combine by pixel-wise max, so frames stay binary. Each frame is stored C-ordered
(row-major) as ``canvas * canvas`` values: ``step_dim = canvas**2``; ``frames(rows)`` gives ``[N, steps, canvas,
canvas]`` for plotting. ``trajectories[split]`` keeps ``digit`` ``[N, n_digits]`` (source indices) and ``position``
``[N, steps, n_digits, 2]`` (the drawn integer corners), ``start`` ``[N, n_digits, 2]`` and ``velocity`` ``[N, n_digits,
2]`` (the initial ones) of the last generation, for inspection.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from amortlab.data.base import as_rows
from amortlab.data.binarized_mnist import BinarizedMNISTDataModule
from amortlab.data.sequence import SequenceDataModule, unpack_steps
from amortlab.errors import AmortlabError

SPLIT_OFFSETS = {"train": 0, "val": 1, "test": 2}  # the per-split generator: default_rng([generation_seed, offset])
SOURCE_SPLIT = {"train": "train", "val": "valid", "test": "test"}  # binarized MNIST split each split's digits come from
MIN_SPEED, MAX_SPEED = 1.0, 3.0  # pixels per frame


def digit_images(rows: np.ndarray, digit_size: int) -> np.ndarray:
    """Binary ``[M, 784]`` rows -> uint8 ``[M, digit_size, digit_size]`` (28: as is; 14: 2x2 max-pooled)."""
    img = np.asarray(rows, dtype=np.uint8).reshape(-1, 28, 28)
    if digit_size == 28:
        return img
    return img.reshape(-1, 14, 2, 14, 2).max(axis=(2, 4))


def bounce(pos: np.ndarray, vel: np.ndarray, limit: int) -> None:
    """Reflect coordinates outside [0, limit] back inside, flipping those velocity components (in place)."""
    if limit == 0:
        pos[...] = 0.0
        return
    while True:
        low, high = pos < 0, pos > limit
        if not (low.any() or high.any()):
            return
        pos[low] = -pos[low]
        pos[high] = 2 * limit - pos[high]
        vel[low | high] = -vel[low | high]


def generate(digits: np.ndarray, n: int, steps: int, canvas: int, n_digits: int,
             rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``n`` sequences of uint8 frames ``[n, steps, canvas, canvas]`` from ``digits`` ``[M, S, S]`` (module
    docstring), and their ``trajectories`` (see the module docstring)."""
    size = digits.shape[1]
    limit = canvas - size
    which = rng.integers(0, len(digits), size=(n, n_digits))
    pos = rng.integers(0, limit + 1, size=(n, n_digits, 2)).astype(np.float64)
    angle = rng.uniform(0.0, 2 * np.pi, size=(n, n_digits))
    speed = rng.uniform(MIN_SPEED, MAX_SPEED, size=(n, n_digits))
    vel = speed[..., None] * np.stack([np.cos(angle), np.sin(angle)], -1)
    start = {"start": pos.copy(), "velocity": vel.copy()}

    frames = np.zeros((n, steps, canvas, canvas), dtype=np.uint8)
    corners = np.zeros((n, steps, n_digits, 2), dtype=np.int64)
    seq = np.arange(n)[:, None, None]
    offs = np.arange(size)
    for t in range(steps):
        if t > 0:
            pos += vel
            bounce(pos, vel, limit)
        corner = np.clip(np.rint(pos).astype(np.int64), 0, limit)
        corners[:, t] = corner
        for k in range(n_digits):
            rows = corner[:, k, 0][:, None, None] + offs[None, :, None]
            cols = corner[:, k, 1][:, None, None] + offs[None, None, :]
            frame = frames[:, t]
            frame[seq, rows, cols] = np.maximum(frame[seq, rows, cols], digits[which[:, k]])
    return frames, {"digit": which, "position": corners, **start}


class MovingMNISTDataModule(SequenceDataModule):
    name = "moving_mnist"
    source_module = BinarizedMNISTDataModule  # reads the digits; a test may substitute a subclass for small files

    def __init__(self, canvas: int = 32, digit_size: int = 14, n_digits: int = 2, steps: int = 10,
                 n_train: int = 5000, n_val: int = 500, n_test: int = 500, generation_seed: int = 0,
                 **kwargs: Any):
        super().__init__(**kwargs)
        if digit_size not in (14, 28):
            raise AmortlabError(f"dataset.digit_size={digit_size} is not supported; use 28 (the MNIST digit as it is) "
                                f"or 14 (each digit max-pooled 2x2).")
        if canvas < digit_size:
            raise AmortlabError(f"dataset.canvas={canvas} is smaller than dataset.digit_size={digit_size}; the canvas "
                                f"must hold a whole digit (e.g. canvas=32 for 28-pixel digits).")
        for key, value in (("n_digits", n_digits), ("steps", steps), ("n_train", n_train), ("n_val", n_val),
                           ("n_test", n_test)):
            if int(value) < 1:
                raise AmortlabError(f"dataset.{key}={value} must be a positive integer.")
        self.canvas, self.digit_size, self.n_digits = int(canvas), int(digit_size), int(n_digits)
        self.sizes = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
        self.generation_seed = int(generation_seed)
        self.trajectories: dict[str, dict[str, np.ndarray]] = {}
        self.set_layout(steps, self.canvas * self.canvas)

    def source(self) -> BinarizedMNISTDataModule:
        return self.source_module(data_dir=self.data_dir, download=self.download,
                                  verify_checksum=self.verify_checksum)

    def load_splits(self) -> dict[str, Tensor]:
        arrays = self.source().load_arrays()  # DatasetNotFoundError naming binarized MNIST's files when absent
        out = {}
        for split, offset in SPLIT_OFFSETS.items():
            rng = np.random.default_rng([self.generation_seed, offset])
            digits = digit_images(arrays[SOURCE_SPLIT[split]], self.digit_size)
            frames, self.trajectories[split] = generate(digits, self.sizes[split], self.steps, self.canvas,
                                                        self.n_digits, rng)
            rows = np.ones((len(frames), self.steps, self.step_dim + 1), dtype=np.float32)
            rows[..., :self.step_dim] = frames.reshape(len(frames), self.steps, self.step_dim)
            out[split] = as_rows(rows)
        return out

    def frames(self, x_rows: Tensor) -> Tensor:
        """Rows ``[..., steps * (canvas**2 + 1)]`` -> frames ``[..., steps, canvas, canvas]`` (padding dropped)."""
        values, _ = unpack_steps(x_rows, self.step_dim)
        return values.unflatten(-1, (self.canvas, self.canvas))

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["moving_mnist"] = {"canvas": self.canvas, "digit_size": self.digit_size, "n_digits": self.n_digits,
                               "generation_seed": self.generation_seed, "speed": [MIN_SPEED, MAX_SPEED]}
        return out

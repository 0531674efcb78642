"""Sequence datasets in the one row format every datamodule shares.

Row layout (fixed; models, metrics and plots rely on it exactly). A sequence dataset stores each sequence as ONE
float32 row of ``steps * (step_dim + 1)`` values: for t = 0..steps-1 the block

    [x_t (step_dim values), present_t]

where ``present_t`` is 1.0 for a real step and 0.0 for padding. Padding steps have x_t all zeros and come only after
the real steps, so a sequence of length T_i <= steps is its T_i real steps followed by ``steps - T_i`` zero blocks.
``pack_sequences`` builds such rows, ``unpack_steps`` views them as (values ``[..., steps, step_dim]``, present mask
``[..., steps]``).

``SequenceDataModule`` is the ``TensorDataModule`` for such rows: ``image_shape = (1, steps, step_dim + 1)`` so the
base's ``x_dim`` (= the row width) and shape checks hold; binarization is always ``none`` (the flags must stay 0/1 and
the values are used as they are); ``info()`` adds ``steps``, ``step_dim`` and ``<split>_steps``, the number of present
steps in each split (the denominator of per-step numbers).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from amortlab.data.base import TensorDataModule
from amortlab.errors import AmortlabError


def pack_sequences(seqs: Sequence[np.ndarray | Tensor], steps: int) -> Tensor:
    """``N`` sequences ``[T_i, D]`` -> float32 rows ``[N, steps * (D + 1)]`` in the layout of the module docstring.

    ValueError if the list is empty, a sequence is not 2-D, the D differ, or some T_i is 0 or larger than ``steps``.
    """
    if len(seqs) == 0:
        raise ValueError("pack_sequences: no sequences given (the step dimension D cannot be inferred)")
    seqs = [torch.as_tensor(s, dtype=torch.float32) for s in seqs]
    bad = [i for i, s in enumerate(seqs) if s.ndim != 2]
    if bad:
        raise ValueError(f"pack_sequences: sequence {bad[0]} has shape {tuple(seqs[bad[0]].shape)}, expected [T, D]")
    dim = seqs[0].shape[1]
    bad = [i for i, s in enumerate(seqs) if s.shape[1] != dim]
    if bad:
        raise ValueError(f"pack_sequences: sequence {bad[0]} has {seqs[bad[0]].shape[1]} values per step, sequence 0 "
                         f"has {dim}; all sequences need the same step dimension")
    bad = [i for i, s in enumerate(seqs) if not 0 < len(s) <= steps]
    if bad:
        raise ValueError(f"pack_sequences: sequence {bad[0]} has {len(seqs[bad[0]])} steps; every sequence needs "
                         f"between 1 and steps={steps} steps")
    out = torch.zeros(len(seqs), steps, dim + 1, dtype=torch.float32)
    for i, s in enumerate(seqs):
        out[i, :len(s), :dim] = s
        out[i, :len(s), dim] = 1.0
    return out.reshape(len(seqs), steps * (dim + 1))


def unpack_steps(x: Tensor, step_dim: int) -> tuple[Tensor, Tensor]:
    """Rows ``[..., steps * (step_dim + 1)]`` -> (values ``[..., steps, step_dim]``, present ``[..., steps]``).

    Any leading dimensions; both outputs are views of ``x`` whenever its last dimension is contiguous (no copy).
    The present mask is ``x``'s own 0/1 flag values (float).
    """
    width = x.shape[-1]
    if step_dim < 1 or width % (step_dim + 1):
        raise ValueError(f"unpack_steps: a row of {width} values is not a whole number of steps of "
                         f"step_dim + 1 = {step_dim + 1} values")
    blocks = x.unflatten(-1, (width // (step_dim + 1), step_dim + 1))
    return blocks[..., :step_dim], blocks[..., step_dim]


class SequenceDataModule(TensorDataModule):
    """Base datamodule for sequences; see the module docstring for the row layout.

    Subclasses call ``set_layout(steps, step_dim)`` in ``__init__`` or, when ``steps`` is known only after reading the
    files, inside ``load_splits`` before returning. The rows ``load_splits`` returns must follow the layout.
    """

    is_sequence = True
    default_binarization = "none"

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        if self.binarization != "none":
            raise AmortlabError(
                f"Dataset '{self.name}' is a sequence dataset, which is used as it is: each row holds the steps' "
                f"values followed by 0/1 present flags (padding), and binarizing would corrupt the flags (and, for "
                f"real-valued data, the values); dataset.binarization={self.binarization!r} is not supported. Set "
                f"dataset.binarization=none (the default for this dataset).")
        self.steps: int | None = None
        self.step_dim: int | None = None
        self.image_shape = None  # (1, steps, step_dim + 1) once the layout is known
        self._loading = False

    def set_layout(self, steps: int, step_dim: int) -> None:
        self.steps = int(steps)
        self.step_dim = int(step_dim)
        self.image_shape = (1, self.steps, self.step_dim + 1)

    @property
    def x_dim(self) -> int:
        if self.image_shape is None and not self._loading:  # steps known only after reading the files
            self._loading = True
            try:
                self.setup()
            finally:
                self._loading = False
        if self.image_shape is None:
            raise RuntimeError(f"{type(self).__name__}.load_splits did not call set_layout")
        return super().x_dim

    def unpack(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``unpack_steps`` with this dataset's ``step_dim``."""
        if self.step_dim is None:
            self.setup()
        return unpack_steps(x, self.step_dim)

    def info(self) -> dict[str, Any]:
        out = super().info()
        out.update(steps=self.steps, step_dim=self.step_dim)
        for split in ("train", "val", "test"):
            out[f"{split}_steps"] = int(self.unpack(self.splits[split])[1].sum().item())
        return out

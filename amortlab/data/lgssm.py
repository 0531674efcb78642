"""Sequences sampled from a linear-Gaussian state-space model (LGSSM), whose exact likelihood and posterior are known.

The model is ``LGSSMParams.make(z_dim, x_dim, seed=param_seed, rho, angle, q_std, r_std)`` (see
``amortlab/data/lgssm_params.py``: z_t = A z_{t-1} + w_t, x_t = C z_t + v_t with A = rho x rotations by ``angle``,
noise standard deviations ``q_std`` and ``r_std``). Each split is ``params.sample(n, steps, generator)`` with a
``torch.Generator`` seeded ``3 * data_seed + i`` (i = 0 train, 1 val, 2 test: a different stream per split and per
data_seed); only x is kept, as float32 rows of ``steps`` blocks ``[x_t, 1]`` (no padding: every step present).

Config keys (``conf/dataset/lgssm.yaml``): z_dim (2), x_dim (4) = step_dim, param_seed (0), rho (0.95), angle (0.3),
q_std (0.3), r_std (0.5), steps (20), n_train (2000), n_val (200), n_test (200), data_seed (0). The parameters are
built at construction (attribute ``params``), so a model can start at or compare with them before any data is read;
``info()["lgssm"]`` records the settings.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from amortlab.data.sequence import SequenceDataModule
from amortlab.errors import AmortlabError
from amortlab.data.lgssm_params import LGSSMParams

SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}


class LGSSMDataModule(SequenceDataModule):
    name = "lgssm"

    def __init__(self, z_dim: int = 2, x_dim: int = 4, param_seed: int = 0, rho: float = 0.95, angle: float = 0.3,
                 q_std: float = 0.3, r_std: float = 0.5, steps: int = 20, n_train: int = 2000, n_val: int = 200,
                 n_test: int = 200, data_seed: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        for key, value in (("z_dim", z_dim), ("x_dim", x_dim), ("steps", steps), ("n_train", n_train),
                           ("n_val", n_val), ("n_test", n_test)):
            if int(value) < 1:
                raise AmortlabError(f"dataset.{key}={value} must be a positive integer.")
        self.settings = {"z_dim": int(z_dim), "x_dim": int(x_dim), "param_seed": int(param_seed), "rho": float(rho),
                         "angle": float(angle), "q_std": float(q_std), "r_std": float(r_std),
                         "data_seed": int(data_seed)}
        self.sizes = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
        self.data_seed = int(data_seed)
        self.params = LGSSMParams.make(int(z_dim), int(x_dim), seed=int(param_seed), rho=float(rho),
                                       angle=float(angle), q_std=float(q_std), r_std=float(r_std))
        self.set_layout(steps, int(x_dim))

    def load_splits(self) -> dict[str, Tensor]:
        out = {}
        for split, i in SPLIT_INDEX.items():
            gen = torch.Generator().manual_seed(3 * self.data_seed + i)
            x, _ = self.params.sample(self.sizes[split], self.steps, gen)
            rows = torch.ones(len(x), self.steps, self.step_dim + 1, dtype=torch.float32)
            rows[..., :self.step_dim] = x
            out[split] = rows.reshape(len(x), -1).contiguous()
        return out

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["lgssm"] = dict(self.settings)
        return out

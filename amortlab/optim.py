"""Learning-rate schedules used by the ``optim`` config group."""
from __future__ import annotations

import torch


def burda_factor(epoch: int, stages: int = 8, time_scale: float = 1.0) -> float:
    """Burda et al. (2016): lr = lr0 * 10^(-i/7) during stage i, which lasts 3^i epochs, i = 0..7 (3280 epochs).

    ``time_scale`` multiplies every stage's length (e.g. 0.01 for a reduced-budget run); after the last stage the
    final rate is kept.
    """
    end = 0.0
    for i in range(stages):
        end += max(1.0, 3**i * time_scale)
        if epoch < end:
            return 10 ** (-i / 7)
    return 10 ** (-(stages - 1) / 7)


def burda_schedule(optimizer: torch.optim.Optimizer, stages: int = 8,
                   time_scale: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR stepping per epoch with ``burda_factor``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: burda_factor(e, stages, time_scale))

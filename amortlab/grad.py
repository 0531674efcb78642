"""Gradients inside evaluation: the one helper for code that optimises or differentiates at test time.

Lightning evaluates under ``torch.inference_mode``, where no tensor can join an autograd graph. Per-point
refinement (IW-SVI, q*, SVI / SA-VAE steps, iterative updates) and AIS's HMC need gradients there; they run inside
``local_grad()`` on inputs they ``detach().clone()`` first (an inference tensor cannot be saved for backward).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def local_grad() -> Iterator[None]:
    """Gradients on, also inside ``torch.inference_mode`` / ``torch.no_grad``."""
    with torch.inference_mode(False), torch.enable_grad():
        yield

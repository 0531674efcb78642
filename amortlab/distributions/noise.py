"""Where the random draws of a training step come from: one seam, so that N models trained as one stacked
computation (``amortlab.stack``) each draw exactly the numbers their single run would.

Convention (shared with the stacked layers): the batch axis of a draw is the second to last, ``[..., B, D]``. Under
``stacked(n, generators)`` a draw of shape ``[..., n*B, D]`` is made of n blocks ``[..., B, D]``, block i drawn

- from ``generators[i]`` when the caller passes no generator (training noise: each model's own stream, which is the
  global RNG stream of its single run);
- from a copy of the caller's generator at its current state when it passes one (evaluation noise: every model of a
  single run would draw from an identically seeded generator); the caller's generator then advances by one block.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class _Stack:
    n: int
    generators: Sequence[torch.Generator]


_ACTIVE: ContextVar[_Stack | None] = ContextVar("amortlab_noise_stack", default=None)


@contextlib.contextmanager
def stacked(n: int, generators: Sequence[torch.Generator]) -> Iterator[None]:
    """Draws inside are n per-model blocks along the batch axis (see the module docstring)."""
    token = _ACTIVE.set(_Stack(n, generators))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def randn(shape: Sequence[int], like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """eps ~ N(0, I) of ``shape`` (batch axis second to last) on ``like``'s device and dtype."""
    stack = _ACTIVE.get()
    shape = tuple(int(s) for s in shape)
    kw = {"device": like.device, "dtype": like.dtype}
    if stack is None:
        return torch.randn(shape, generator=generator, **kw)
    if len(shape) < 2 or shape[-2] % stack.n:
        raise ValueError(f"a stacked draw needs a batch axis (second to last) divisible by {stack.n}, got {shape}")
    block = (*shape[:-2], shape[-2] // stack.n, shape[-1])
    if generator is None:
        parts = [torch.randn(block, generator=g, **kw) for g in stack.generators]
    else:
        state, parts = generator.get_state(), []
        for _ in range(stack.n):
            generator.set_state(state)
            parts.append(torch.randn(block, generator=generator, **kw))
    return torch.cat(parts, dim=-2)


def scale(value: float | Tensor, t: Tensor) -> Tensor:
    """``value * t``; under stacking ``value`` may be a tensor ``[N]`` (one setting per stacked model, e.g. each
    model's denoising sigma), then block i of the rows of ``t`` ``[..., N*B, D]`` is scaled by ``value[i]``."""
    if not torch.is_tensor(value):
        return value * t
    n, shape = value.numel(), t.shape
    blocks = t.reshape(*shape[:-2], n, shape[-2] // n, shape[-1])
    return (blocks * value.to(t).view(n, 1, 1)).reshape(shape)

"""Chunked importance-sampling estimate of log p(x) (IWAE-k with large k).

    log p(x) ~= log (1/k) sum_{i=1..k} w_i,   w_i = p(x, z_i) / q(z_i | x),   z_i ~ q(z | x),

accumulated over chunks of samples with a running ``logaddexp`` so memory is O(chunk * B), not O(k * B). The same
log-weights give the amortized ELBO estimate (1/k) sum_i log w_i for free, hence the inference gap
log p(x) - L[q] >= 0 per datapoint (Jensen) without drawing extra samples.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def chunk_size(k: int, batch: int, rows: int = 1000) -> int:
    """Samples per chunk so a chunk holds about ``rows`` decoder rows (``chunk * batch``); 1 <= chunk <= k.

    Around 1000 rows keeps the ``[chunk, B, X]`` temporaries cache-sized and below glibc's mmap threshold; much
    larger chunks ran 2-3x slower on CPU (page faults). On a GPU a larger budget is better (``evaluation.rows``).
    """
    return max(1, min(k, rows // max(1, batch)))


@torch.no_grad()
def iwae_estimate(sample_log_weights: Callable[[int], Tensor], k: int, chunk: int) -> tuple[Tensor, Tensor]:
    """Return (log p_hat(x) ``[B]``, ELBO estimate ``[B]``) from ``k`` importance samples.

    ``sample_log_weights(n)`` draws ``n`` fresh samples and returns their log-weights ``[n, B]``; it is called
    ceil(k / chunk) times (a Python loop per chunk, never per sample). Accumulation is in float64.
    """
    if k < 1 or chunk < 1:
        raise ValueError(f"need k >= 1 and chunk >= 1, got k={k}, chunk={chunk}")
    lse = sum_lw = None
    for start in range(0, k, chunk):
        lw = sample_log_weights(min(chunk, k - start)).double()
        c_lse, c_sum = torch.logsumexp(lw, 0), lw.sum(0)
        if lse is None:
            lse, sum_lw = c_lse, c_sum
        else:
            lse, sum_lw = torch.logaddexp(lse, c_lse), sum_lw + c_sum
    return lse - math.log(k), sum_lw / k


def scored_in_chunks(model, x: Tensor, q, k: int, generator: torch.Generator | None, rows: int | None = None) -> Tensor:
    """``model.log_weights(x, q, k, generator)`` ``[k, B]`` with the same draws, scored ``chunk_size`` samples at a
    time: the k samples (and log q) are drawn in one call, as the unchunked call draws them, then
    ``model.log_weights_at`` runs on about ``rows`` (default ``model.eval_rows``) decoder rows at a time. A
    common-random-numbers estimate with hundreds of samples per point otherwise builds ``[k, B, X]`` temporaries of
    hundreds of MB, about 2x slower per row on CPU."""
    chunk = chunk_size(k, len(x), rows or getattr(model, "eval_rows", 1000))
    if chunk >= k or not hasattr(model, "log_weights_at"):
        return model.log_weights(x, q, k, generator)
    z, log_q = q.rsample_with_log_prob(k, generator)

    def part(t, s: slice):
        return tuple(u[s] for u in t) if isinstance(t, tuple) else t[s]

    return torch.cat([model.log_weights_at(x, part(z, slice(i, i + chunk)), log_q[i:i + chunk])
                      for i in range(0, k, chunk)])

"""Exact dataset means for evaluation: float64 sums that DDP reduces by summation."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_sum


class ExactMean(Metric):
    """mean = (sum of all values) / (number of values), accumulated in float64 over batches and ranks.

    Unlike ``MeanMetric``, the states stay float64 when the LightningModule is cast to another precision
    (``module.to(torch.float32)`` by the precision plugin), so means over 10k points are exact to ~1e-12.
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        # out of place: states re-created by reset() may have been cast with the module
        self.total = self.total.double() + values.detach().double().sum()
        self.count = self.count.double() + values.numel()

    def compute(self) -> Tensor:
        return self.total / self.count

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self.total, self.count = self.total.double(), self.count.double()
        return out


class ActiveUnits(Metric):
    """Active latent units (Burda et al. 2016): A_u = Cov_x(E_{q(z|x)}[z_u]), unit u active if A_u > 0.01.

    ``update(z_mean)`` takes the posterior means ``[B, Z]`` of a batch; float64 sums of z and z^2 per unit are
    reduced over batches and DDP ranks by summation, so the count is that of the whole split on any world size.
    ``compute()`` returns the number of active units; ``variances()`` the per-unit A_u ``[Z]``.
    """

    full_state_update = False
    threshold = 0.01

    def __init__(self, z_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros(z_dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", torch.zeros(z_dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, z_mean: Tensor) -> None:
        m = z_mean.detach().double().reshape(-1, z_mean.shape[-1])
        self.total = self.total.double() + m.sum(0)
        self.total_sq = self.total_sq.double() + m.pow(2).sum(0)
        self.count = self.count.double() + m.shape[0]

    def variances(self) -> Tensor:
        """Unbiased per-unit variance of the posterior means over the points seen, ``[Z]``."""
        n = self.count
        mean = self.total / n
        return ((self.total_sq - n * mean.pow(2)) / (n - 1).clamp_min(1)).clamp_min(0)

    def compute(self) -> Tensor:
        return (self.variances() > self.threshold).sum()

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self.total, self.total_sq, self.count = self.total.double(), self.total_sq.double(), self.count.double()
        return out


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(state: Tensor, group=None) -> list[Tensor]:
    """torchmetrics ``dist_sync_fn``: the float64 sum of ``state`` over the ranks, as a one-element list (which
    ``Metric._sync_dist`` stacks and reduces with the state's ``dim_zero_sum``). Cast first, so that a rank that saw
    no batch (its states the module's default dtype after ``reset``) joins the same collective as the others."""
    total = state.detach().double().clone()
    dist.all_reduce(total, group=group)
    return [total]


@contextmanager
def summed_over_ranks(metrics: Sequence[Metric]) -> Iterator[None]:
    """Inside the block every state of ``metrics`` holds its float64 sum over the DDP ranks (torchmetrics'
    ``sync_context`` with an all-reduce per state); after it, the local states again. One process: unchanged.

    Every rank must enter it with the same metrics in the same order, also a rank that saw no batch of the split (its
    states are zeros of the same shapes). Every state must be a tensor reduced by summation."""
    for m in metrics:
        for name, fx in m._reductions.items():
            if fx is not dim_zero_sum or not isinstance(getattr(m, name), Tensor):
                raise TypeError(f"{type(m).__name__}.{name}: split metrics are summed over DDP ranks; declare the "
                                f"state as a tensor with dist_reduce_fx='sum'")
    with ExitStack() as stack:
        for m in metrics:
            stack.enter_context(m.sync_context(dist_sync_fn=_all_reduce_sum, distributed_available=_distributed))
        yield


def _key(name: str) -> str:
    return name.replace("/", "__")  # ModuleDict keys cannot hold dots or slashes; keep them readable


class SplitMetrics(nn.Module):
    """Exact means over one split of named per-point values ``[B]`` (``ExactMean`` each) and the active-unit count
    of the posterior means ``z_mean`` ``[B, Z]``; ``compute(split)`` returns ``{"<split>/<name>": float}`` (with
    ``<split>/n_points``, and ``<split>/active_units``; with several stochastic layers also
    ``<split>/active_units/z1``, ``.../z2``, ... per layer) and resets.

    ``latent_dims``: (D_1, ..., D_L) of the model's layers (an int: one layer); ``z_mean`` is their concatenation.
    ``ratios``: ``{name: (numerator, denominator)}`` reported as sum(numerator) / sum(denominator) over the split
    (e.g. nats per time step of sequences of different lengths: ``nll_per_step = (nll, steps)``).

    Under DDP every value, ``n_points`` and the active units included, is read from the states summed over all ranks
    (``summed_over_ranks``), so it is that of the whole split on any world size; every rank must call ``compute``.
    """

    def __init__(self, names, latent_dims: int | Sequence[int], ratios: dict[str, tuple[str, str]] | None = None):
        super().__init__()
        self.ratios = dict(ratios or {})
        self.latent_dims = (int(latent_dims),) if isinstance(latent_dims, int) else tuple(int(d) for d in latent_dims)
        self.names: list[str] = []
        self.means = nn.ModuleDict()
        # sync_on_compute=False: the states are summed over ranks once, by compute() below
        self.units = ActiveUnits(sum(self.latent_dims), sync_on_compute=False)
        self.add(*names)

    def add(self, *names: str) -> None:
        for name in names:
            if name not in self.names:
                self.names.append(name)
                self.means[_key(name)] = ExactMean(sync_on_compute=False)

    def update(self, values: dict[str, Tensor], z_mean: Tensor) -> None:
        unknown = sorted(set(values) - set(self.names))
        if unknown:
            raise KeyError(f"evaluation values {unknown} were never registered (a method registers its own with "
                           f"register_eval_metrics; an estimator lists them in metric_names)")
        for name, v in values.items():
            self.means[_key(name)].update(v)
        self.units.update(z_mean)

    def compute(self, split: str) -> dict[str, float | int]:
        metrics = [*self.means.values(), self.units]
        with summed_over_ranks(metrics):  # a value is reported when some rank saw points for it
            out = self._read(split)
        for m in metrics:
            m.reset()
        return out

    def _read(self, split: str) -> dict[str, float | int]:
        out: dict[str, float | int] = {}
        for name, (num, den) in self.ratios.items():
            a, b = self.means[_key(num)], self.means[_key(den)]
            if a.count > 0 and b.count > 0:
                out[f"{split}/{name}"] = float(a.total / b.total)
        for name in self.names:
            metric = self.means[_key(name)]
            if metric.count > 0:
                out[f"{split}/{name}"] = float(metric.total / metric.count)
                if name == "nll":
                    out[f"{split}/n_points"] = int(metric.count)  # < split size with limit_*_batches
        if self.units.count > 0:
            active = self.units.variances() > ActiveUnits.threshold
            out[f"{split}/active_units"] = int(active.sum())
            if len(self.latent_dims) > 1:
                for i, a in enumerate(active.split(self.latent_dims)):
                    out[f"{split}/active_units/z{i + 1}"] = int(a.sum())
        return out

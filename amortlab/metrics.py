"""Exact dataset means for evaluation: float64 sums that DDP reduces by summation."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_sum

# evaluation values that travel with ``z_mean`` to the active-unit count: the Monte Carlo variance of each posterior
# mean (``posterior_mean_estimate``; absent: exact) and, for sequences, the present flags ``[B, T]``
MEAN_VAR, PRESENT = "z_mean_var", "z_present"


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
    """Active latent units (Burda et al. 2016): unit u is active if A_u > 0.01, A_u the variance over data points of
    its posterior mean E_{q(z|x)}[z_u], measured within groups and pooled.

    Static models: one group, A_u = Cov_x(E_q[z_u]) over the split's N points (N - 1 normalised). Sequence models:
    the groups are the time steps t, with the n_t sequences present at t (padding excluded), so the change of E_q[z_t]
    along a sequence (the dynamics) is not counted as activity, only its variation across sequences at a step:

        A_u = sum_t sum_{i present at t} (m_{i,t,u} - mean_i m_{i,t,u})^2 / sum_t (n_t - 1)

    (steps with n_t < 2 add nothing): the pooled within-step variance, the average over steps of the per-step
    variances when every sequence has every step.

    Estimator: m are estimates of E_q[z] (``amortlab.distributions.moments.posterior_mean_estimate``) with Monte
    Carlo variances v (0 where exact). Their within-step sum of squares exceeds the exact means' by
    (n_t - 1)/n_t sum_i Var(m_{i,t}) in expectation, so (n_t - 1)/n_t sum_i v_{i,t} is subtracted: A_u is unbiased for
    the variance of the exact means, whatever the number of draws behind m (clamped at 0).

    ``update(z_mean [B, Z], mc_var [B, Z] | None)`` (static), or ``update(z_mean [B, T, Z], mc_var [B, T, Z] | None,
    present [B, T])`` (sequences; T may differ between batches and ranks). float64 sums per (group, unit) are reduced
    over batches and DDP ranks by summation (groups padded to the largest T first), so A_u is that of the whole split
    on any world size. ``compute()`` returns the number of active units; ``variances()`` A_u ``[Z]``.
    """

    full_state_update = False
    threshold = 0.01
    _STATES = ("total", "total_sq", "total_mc", "count")

    def __init__(self, z_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.z_dim = int(z_dim)
        for name in self._STATES[:3]:  # [groups, Z]; one group until a sequence arrives
            self.add_state(name, torch.zeros(1, self.z_dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(1, dtype=torch.float64), dist_reduce_fx="sum")  # [groups]

    def _grow(self, groups: int) -> None:
        """Zero-pad every state to ``groups`` groups."""
        have = self.count.shape[0]
        if groups > have:
            for name in self._STATES:
                t = getattr(self, name).double()
                setattr(self, name, torch.cat([t, t.new_zeros(groups - have, *t.shape[1:])]))

    def update(self, z_mean: Tensor, mc_var: Tensor | None = None, present: Tensor | None = None) -> None:
        m = z_mean.detach().double()
        v = torch.zeros_like(m) if mc_var is None else mc_var.detach().double().reshape(m.shape)
        if present is None:
            m, v = m.reshape(-1, 1, m.shape[-1]), v.reshape(-1, 1, m.shape[-1])
            w = m.new_ones(m.shape[0], 1)
        else:
            w = present.detach().double().reshape(m.shape[:-1])
        if m.dim() != 3:
            raise ValueError(f"ActiveUnits takes means [B, Z] or, with present flags [B, T], [B, T, Z]; got "
                             f"{list(z_mean.shape)}")
        self._grow(m.shape[1])
        pad = self.count.shape[0] - m.shape[1]  # this batch's steps -> every group (zeros beyond its T)
        wm = w.unsqueeze(-1)
        for name, add in (("total", (wm * m).sum(0)), ("total_sq", (wm * m.pow(2)).sum(0)),
                          ("total_mc", (wm * v).sum(0)), ("count", w.sum(0))):
            add = torch.cat([add, add.new_zeros(pad, *add.shape[1:])])
            # out of place: states re-created by reset() may have been cast with the module
            setattr(self, name, getattr(self, name).double() + add)

    def variances(self) -> Tensor:
        """A_u ``[Z]`` (class docstring)."""
        n = self.count.unsqueeze(-1)  # [groups, 1]
        used = n >= 2
        n1 = n.clamp_min(1)
        within = self.total_sq - self.total.pow(2) / n1 - (n - 1) / n1 * self.total_mc
        dof = ((n - 1) * used).sum()
        return ((within * used).sum(0) / dof.clamp_min(1)).clamp_min(0)

    def compute(self) -> Tensor:
        return (self.variances() > self.threshold).sum()

    def _sync_dist(self, dist_sync_fn=None, process_group=None) -> None:
        # ranks may have seen sequences of different lengths (or none): pad every rank to the largest group count
        groups = torch.tensor([self.count.shape[0]], device=self.count.device)
        dist.all_reduce(groups, op=dist.ReduceOp.MAX, group=process_group or self.process_group)
        self._grow(int(groups))
        if dist_sync_fn is None:
            super()._sync_dist(process_group=process_group)
        else:
            super()._sync_dist(dist_sync_fn, process_group)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        for name in self._STATES:
            setattr(self, name, getattr(self, name).double())
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
    (``ActiveUnits``) of the posterior means ``z_mean`` ``[B, Z]`` (sequences: ``[B, T, Z]``; the values may carry
    their Monte Carlo variances ``z_mean_var`` and the present flags ``z_present`` ``[B, T]``); ``compute(split)``
    returns ``{"<split>/<name>": float}`` (with ``<split>/n_points``, all ranks, and ``<split>/active_units``; with
    several stochastic layers also ``<split>/active_units/z1``, ``.../z2``, ... per layer) and resets.

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
        values = dict(values)
        mc_var, present = values.pop(MEAN_VAR, None), values.pop(PRESENT, None)
        unknown = sorted(set(values) - set(self.names))
        if unknown:
            raise KeyError(f"evaluation values {unknown} were never registered (a method registers its own with "
                           f"register_eval_metrics; an estimator lists them in metric_names)")
        for name, v in values.items():
            self.means[_key(name)].update(v)
        self.units.update(z_mean, mc_var, present)

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
        if self.units.count.sum() > 0:
            active = self.units.variances() > ActiveUnits.threshold
            out[f"{split}/active_units"] = int(active.sum())
            if len(self.latent_dims) > 1:
                for i, a in enumerate(active.split(self.latent_dims)):
                    out[f"{split}/active_units/z{i + 1}"] = int(a.sum())
        return out

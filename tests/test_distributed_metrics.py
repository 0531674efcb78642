"""SplitMetrics on two gloo processes: every value of ``compute`` (means, counts, per-step ratios, active units in
total and per layer) is that of the whole split, against the formulas evaluated here on all points in one tensor.

The splits are sharded as the evaluation loaders shard them (batch b of B points to rank b mod 2), with sizes that are
not multiples of 2 x B, values built so that no rank's own share gives the split's numbers (unit 0 is constant within
each batch, so it varies only across ranks), and one split of a single batch, so rank 1 sees no point of it (after a
reset of states cast to float32 by ``.to(torch.float32)``, as the precision plugin does)."""
import json
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

B = 100
DIMS = (3, 2)                                        # two stochastic layers
SPLITS = {"val": 180, "test": 359, "train": 50}      # train: one batch, rank 1 gets none
WORLD = 2
F64 = torch.float64


def _split(name: str, n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-point values ``{name: [n]}`` and posterior means ``[n, 5]`` of a split, from its own seed."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    batch = torch.arange(n) // B
    steps = (1 + batch % 2 * 4 + torch.randint(0, 3, (n,), generator=g)).to(F64)  # odd batches: longer sequences
    nll = steps * (2.0 + torch.rand(n, generator=g, dtype=F64)) + 5.0 * (batch % 2)
    z = torch.zeros(n, sum(DIMS), dtype=F64)
    z[:, 0] = (batch % 2).to(F64)                      # z1 unit 0: constant within a rank's batches, active overall
    z[:, 1] = 0.01 * torch.randn(n, generator=g, dtype=F64)   # inactive
    z[:, 2] = torch.randn(n, generator=g, dtype=F64)          # active
    z[:, 3] = 0.3 * (batch % 2).to(F64)               # z2 unit 0: A_u ~ 0.0225 > 0.01 overall, 0 per rank
    z[:, 4] = 0.05 * torch.randn(n, generator=g, dtype=F64)   # inactive
    return {"nll": nll, "steps": steps, "kl": nll / 3}, z


def _expected(split: str, n: int) -> dict[str, float | int]:
    values, z = _split(split, n)
    active = z.var(0, unbiased=True) > 0.01
    return {f"{split}/nll": float(values["nll"].mean()), f"{split}/steps": float(values["steps"].mean()),
            f"{split}/kl": float(values["kl"].mean()),
            f"{split}/nll_per_step": float(values["nll"].sum() / values["steps"].sum()),
            f"{split}/n_points": n, f"{split}/active_units": int(active.sum()),
            f"{split}/active_units/z1": int(active[:DIMS[0]].sum()),
            f"{split}/active_units/z2": int(active[DIMS[0]:].sum())}


def _worker(rank: int, init: str, out_dir: str) -> None:
    from amortlab.metrics import SplitMetrics

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        metrics = SplitMetrics(["nll", "steps", "kl"], DIMS, ratios={"nll_per_step": ("nll", "steps")})
        metrics.to(torch.float32)  # as the precision plugin does: reset() then makes float32 zeros
        out = {}
        for split, n in SPLITS.items():
            values, z = _split(split, n)
            for b in range(rank, -(-n // B), WORLD):  # the evaluation loaders' sharding
                rows = slice(b * B, (b + 1) * B)
                metrics.update({k: v[rows] for k, v in values.items()}, z[rows])
            out.update(metrics.compute(split))
            Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_split_metrics_on_two_processes_are_those_of_the_whole_split(tmp_path):
    ctx = mp.start_processes(_worker, args=(f"file://{tmp_path / 'init'}", str(tmp_path)), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline, error = time.monotonic() + 180, None
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                error = "the two processes did not finish (a collective that one rank skipped)"
                break
    except mp.ProcessRaisedException as e:  # the splits written before the failure are still compared
        error = str(e)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    expected = {}
    for split, n in SPLITS.items():
        expected.update(_expected(split, n))
    # the data is built so that a rank's own share gives other numbers than the whole split
    assert expected["val/active_units/z1"] == 2 and expected["val/active_units/z2"] == 1
    for rank in range(WORLD):
        path = tmp_path / f"rank{rank}.json"
        got = json.loads(path.read_text()) if path.is_file() else {}
        for key, want in expected.items():
            if key not in got:
                continue
            if isinstance(want, int):
                assert got[key] == want, (rank, key, got[key], want)
            else:
                assert got[key] == pytest.approx(want, rel=1e-12, abs=0), (rank, key)
        assert error is None, error
        assert set(got) == set(expected), rank

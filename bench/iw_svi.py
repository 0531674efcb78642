#!/usr/bin/env python
"""IW-SVI evaluation cost: one batched optimisation over many test points vs a per-datapoint loop.

    python bench/iw_svi.py                 # 100 points one at a time vs 1000 points per batch, extrapolated to 10k

Both sides run ``amortlab.evaluation.iw_svi.refine`` with the same settings (evaluation=iw_svi defaults) on the
784-200-200-50 model and binarized MNIST test images, in the same process; the per-point loop is what a naive
implementation does (one Adam optimisation per test point). Reports seconds per point, the extrapolated wall time
for the 10 000 test points, and the ratio.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from amortlab.evaluation.iw_svi import refine  # noqa: E402
from amortlab.build import build_from_overrides  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("AMORTLAB_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--loop-points", type=int, default=100)
    p.add_argument("--batch-points", type=int, default=1000)
    p.add_argument("--total", type=int, default=10_000)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    module, dm = build_from_overrides(["dataset=binarized_mnist", f"data_dir={a.data_dir}", "evaluation=iw_svi",
                                       "logger=none"])
    module.eval()
    svi = module.estimator.cfg
    X = dm.splits["test"]

    def run(x: torch.Tensor) -> None:
        with torch.no_grad():
            q0 = module.infer(x)
        refine(module, x, q0, svi, torch.Generator().manual_seed(0))

    run(X[:10])  # warm-up
    t0 = time.perf_counter()
    for i in range(a.loop_points):
        run(X[i:i + 1])
    loop_s = (time.perf_counter() - t0) / a.loop_points
    t0 = time.perf_counter()
    run(X[:a.batch_points])
    batch_s = (time.perf_counter() - t0) / a.batch_points
    print(f"IW-SVI refinement ({svi.steps} Adam steps on IWAE-{svi.k}, DReG, select_reps={svi.select_reps}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'':<32}{'s / point':>12}{f'{a.total} points (s)':>20}")
    print(f"{'per-datapoint loop':<32}{loop_s:>12.4f}{loop_s * a.total:>20.1f}   (measured on {a.loop_points})")
    print(f"{f'batched ({a.batch_points} per batch)':<32}{batch_s:>12.5f}{batch_s * a.total:>20.1f}")
    print(f"speed-up of the batched optimisation: {loop_s / batch_s:.1f}x")


if __name__ == "__main__":
    main()

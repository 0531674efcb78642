#!/usr/bin/env python
"""Per-datapoint q* (gap evaluation): one batched optimisation over many test points vs a per-datapoint loop.

    python bench/qstar.py                         # FFG and flow families, 20 points looped vs 500 batched

Both sides run ``amortlab.evaluation.qstar.optimize_local`` for a fixed number of Adam steps (patience disabled, so
the work per point is identical) with the evaluation=gaps settings otherwise (k = 50 samples per step), on the
784-200-200-50 model and binarized MNIST test images. Reports seconds per point per 1000 steps, the extrapolated
time for the 10 000 test points, and the ratio.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from amortlab.evaluation.gaps import local_family  # noqa: E402
from amortlab.evaluation.qstar import optimize_local  # noqa: E402
from amortlab.build import build_from_overrides  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("AMORTLAB_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--loop-points", type=int, default=20)
    p.add_argument("--batch-points", type=int, default=500)
    p.add_argument("--total", type=int, default=10_000)
    p.add_argument("--families", nargs="*", default=["ffg", "flow"])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    module, dm = build_from_overrides(["dataset=binarized_mnist", f"data_dir={a.data_dir}", "evaluation=gaps",
                                       "logger=none"])
    module.eval()
    gaps = module.estimator.cfg
    cfg = dataclasses.replace(gaps.qstar, max_steps=a.steps, patience=10**9, select_k=0)
    X = dm.splits["test"]

    def run(name: str, x: torch.Tensor) -> None:
        with torch.no_grad():
            q0 = module.infer(x)
        optimize_local(module, x, local_family(name, len(x), module.z_dim, q0, gaps, x), cfg,
                       torch.Generator().manual_seed(0))

    print(f"q* optimisation, {a.steps} Adam steps of k = {cfg.k}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'family':<8}{'per-point loop s/pt':>22}{'batched s/pt':>15}{'ratio':>8}{f'{a.total} pts batched (s)':>24}")
    for name in a.families:
        run(name, X[:4])  # warm-up
        t0 = time.perf_counter()
        for i in range(a.loop_points):
            run(name, X[i:i + 1])
        loop = (time.perf_counter() - t0) / a.loop_points
        t0 = time.perf_counter()
        run(name, X[:a.batch_points])
        batched = (time.perf_counter() - t0) / a.batch_points
        print(f"{name:<8}{loop:>22.4f}{batched:>15.5f}{loop / batched:>8.1f}{batched * a.total:>24.1f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Training step time of the two-stochastic-layer model (model=burda_mlp2) per inference scheme, relative to the
flat VAE (model=burda_mlp) step, in one process; and test-time inference per point.

    python bench/hierarchy.py               # binarized MNIST, batch 50, k = 1; T = 5, K = 10
    python bench/hierarchy.py --quick

Rows: flat VAE (the yardstick), flat VAE k = 5; two layers: bottom-up VAE (Burda), bottom-up IWAE k = 5, top-down
(ladder), iterative (T over all layers), SA-VAE (K steps over all layers). Each is the library's own training loss
(``training_loss``) with backward and Adam, interleaved over ``--reps`` rounds of ``--steps`` steps after warm-up;
medians. Inference ms / point: ``infer_seconds`` of the library's evaluation on ``--eval-n`` test points.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from amortlab.data.loader import Batch  # noqa: E402
from scheme_timing import build_cases, interleaved_medians, parser  # noqa: E402


def cases(T: int, K: int) -> list[tuple[str, list[str]]]:
    flat, two = ["model=burda_mlp"], ["model=burda_mlp2"]
    return [("flat VAE (1 layer)", flat), ("flat IWAE k=5", [*flat, "importance_samples=k5"]),
            ("2 layers bottom-up VAE", two), ("2 layers bottom-up IWAE k=5", [*two, "importance_samples=k5"]),
            ("2 layers top-down (ladder)", [*two, "inference=ladder"]),
            (f"2 layers iterative T={T}", [*two, "inference=iterative", f"inference.iterations={T}"]),
            (f"2 layers SA-VAE K={K}", [*two, "inference=sa_vae", f"inference.refinement.steps={K}"])]


def main() -> None:
    p = parser(__doc__, steps=30, reps=3)
    p.add_argument("--T", type=int, default=5)
    p.add_argument("--K", type=int, default=10)
    p.add_argument("--eval-n", type=int, default=500)
    a = p.parse_args()
    if a.quick:
        a.steps, a.reps, a.eval_n = 10, 2, 200
    steps, modules = build_cases(cases(a.T, a.K), a, warmup=2)
    times = interleaved_medians(steps, a.reps, a.steps)
    infer = {}
    for name, (module, dm) in modules.items():
        module.eval()
        infer[name] = float(module.evaluate_batch(Batch(dm.splits["test"][:a.eval_n], 0), 1)["infer_seconds"].mean())
    base = times["flat VAE (1 layer)"]
    print(f"binarized MNIST, batch {a.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{a.reps} x {a.steps} steps per row (median, interleaved)")
    print(f"{'model / scheme':<34}{'step ms':>10}{'x flat VAE':>12}{'test infer ms/pt':>18}")
    for name in steps:
        t = times[name]
        print(f"{name:<34}{1000 * t:>10.2f}{t / base:>12.2f}{1000 * infer[name]:>18.3f}")


if __name__ == "__main__":
    main()

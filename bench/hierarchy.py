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

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from amortlab.build import build_from_overrides  # noqa: E402
from amortlab.data.loader import Batch  # noqa: E402
from inference_schemes import step_fn  # noqa: E402


def cases(T: int, K: int) -> list[tuple[str, list[str]]]:
    flat, two = ["model=burda_mlp"], ["model=burda_mlp2"]
    return [("flat VAE (1 layer)", flat), ("flat IWAE k=5", [*flat, "importance_samples=k5"]),
            ("2 layers bottom-up VAE", two), ("2 layers bottom-up IWAE k=5", [*two, "importance_samples=k5"]),
            ("2 layers top-down (ladder)", [*two, "inference=ladder"]),
            (f"2 layers iterative T={T}", [*two, "inference=iterative", f"inference.iterations={T}"]),
            (f"2 layers SA-VAE K={K}", [*two, "inference=sa_vae", f"inference.refinement.steps={K}"])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("AMORTLAB_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--T", type=int, default=5)
    p.add_argument("--K", type=int, default=10)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--eval-n", type=int, default=500)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    if a.quick:
        a.steps, a.reps, a.eval_n = 10, 2, 200
    torch.set_num_threads(a.threads)
    steps, modules = {}, {}
    for name, over in cases(a.T, a.K):
        module, dm = build_from_overrides(["dataset=binarized_mnist", f"data_dir={a.data_dir}", "logger=none",
                                           f"dataset.batch_size={a.batch}", *over])
        xs = [dm.splits["train"][i * a.batch:(i + 1) * a.batch] for i in range(20)]
        steps[name], modules[name] = step_fn(module, xs), (module, dm)
        for _ in range(2):
            steps[name]()  # warm-up
    times = {name: [] for name in steps}
    for _ in range(a.reps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step()
            times[name].append((time.perf_counter() - t0) / a.steps)
    infer = {}
    for name, (module, dm) in modules.items():
        module.eval()
        infer[name] = float(module.evaluate_batch(Batch(dm.splits["test"][:a.eval_n], 0), 1)["infer_seconds"].mean())
    base = statistics.median(times["flat VAE (1 layer)"])
    print(f"binarized MNIST, batch {a.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{a.reps} x {a.steps} steps per row (median, interleaved)")
    print(f"{'model / scheme':<34}{'step ms':>10}{'x flat VAE':>12}{'test infer ms/pt':>18}")
    for name in steps:
        t = statistics.median(times[name])
        print(f"{name:<34}{1000 * t:>10.2f}{t / base:>12.2f}{1000 * infer[name]:>18.3f}")


if __name__ == "__main__":
    main()

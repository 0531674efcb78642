#!/usr/bin/env python
"""Cost of the filtering schemes on Moving MNIST (experiment=avf_moving_mnist_reduced: SRNN, 32x32 frames, 10 steps),
in one process: training step time and inference time per time step (one filtering pass, k = 1) of AVF with 1, 2
and 5 updates relative to the direct filter.

    python bench/sequence.py              # batch 50 (training), 100 sequences (inference)
    python bench/sequence.py --quick

Training: the library's ``training_loss`` with backward and Adam, interleaved over ``--reps`` rounds of ``--steps``
steps after warm-up; medians. Inference: ``--reps`` interleaved rounds of one filtering pass over ``--eval-n`` test
sequences under ``torch.no_grad`` (AVF's gradient encodings switch gradients on locally), per sequence step; medians.
The study's own ``test/infer_seconds_per_step`` is measured the same way but inside whatever else runs on the machine.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scheme_timing import build_cases, interleaved_medians, parser  # noqa: E402

CASES = [("direct filter", ["inference=filtering"]), ("AVF, 1 update", ["inference=avf", "inference.steps=1"]),
         ("AVF, 2 updates", ["inference=avf", "inference.steps=2"]),
         ("AVF, 5 updates", ["inference=avf", "inference.steps=5"])]


def main() -> None:
    p = parser(__doc__, steps=5, reps=3)
    p.add_argument("--eval-n", type=int, default=100)
    a = p.parse_args()
    if a.quick:
        a.steps, a.reps, a.eval_n = 2, 2, 20
    steps, modules = build_cases(CASES, a, base=("experiment=avf_moving_mnist_reduced", "dataset.n_train=1000"))
    train = interleaved_medians(steps, a.reps, a.steps)
    infer = {name: [] for name in modules}
    for _ in range(a.reps):
        for name, (module, dm) in modules.items():
            module.eval()
            x = dm.splits["test"][:a.eval_n]
            with torch.no_grad():
                q = module.infer(x)
                t0 = time.perf_counter()
                q = module.infer(x)
                q.rsample_with_log_prob(1)
                infer[name].append((time.perf_counter() - t0) / (len(x) * q.x.shape[1]))
    infer = {name: statistics.median(v) for name, v in infer.items()}
    base_t, base_i = train["direct filter"], infer["direct filter"]
    print(f"Moving MNIST (SRNN, 10 steps of 32x32), torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"training batch {a.batch}, {a.reps} x {a.steps} steps per row (median, interleaved); inference over "
          f"{a.eval_n} sequences")
    print(f"{'scheme':<18}{'train step ms':>14}{'x direct':>10}{'inference us/step':>19}{'x direct':>10}")
    for name in modules:
        print(f"{name:<18}{1e3 * train[name]:>14.1f}{train[name] / base_t:>10.2f}{1e6 * infer[name]:>19.1f}"
              f"{infer[name] / base_i:>10.2f}")


if __name__ == "__main__":
    main()

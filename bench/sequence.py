#!/usr/bin/env python
"""Cost of the filtering schemes on Moving MNIST (experiment=avf_moving_mnist_reduced: SRNN, 32x32 frames, 10 steps),
in one process: training step time, inference time per time step (one filtering pass, k = 1) and the time of the
SMC evaluation per sequence of AVF with 1, 2 and 5 updates relative to the direct filter.

    python bench/sequence.py              # batch 50 (training), 100 sequences (inference), 20 + 10 (SMC evaluation)
    python bench/sequence.py --quick

Training: the library's ``training_loss`` with backward and Adam, interleaved over ``--reps`` rounds of ``--steps``
steps after warm-up; medians. Inference: ``--reps`` interleaved rounds of one filtering pass over ``--eval-n`` test
sequences under ``torch.no_grad`` (AVF's gradient encodings switch gradients on locally), per sequence step; medians.
The study's own ``test/infer_seconds_per_step`` is measured the same way but inside whatever else runs on the machine.

SMC evaluation: the library's ``evaluate_batch`` with ``evaluation=smc`` (one timed filtering pass, IWAE-k over
sequences, SMC with K particles, the KL and per-update diagnostics), seconds per sequence, ``--reps`` interleaved
rounds, medians: on Moving MNIST at the study's k = K = 100 over ``--smc-n`` test sequences, and on the linear-Gaussian
model (``dataset=lgssm model=lgssm``, untrained filters) at k = K = ``--lgssm-k`` over ``--lgssm-n`` sequences of
``--lgssm-steps`` steps (the setting of a slow AVF evaluation: 1 000 particles, 40 steps).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from amortlab.build import build_from_overrides  # noqa: E402
from amortlab.data.loader import Batch  # noqa: E402
from amortlab.evaluation.smc import SMC  # noqa: E402
from scheme_timing import build_cases, interleaved_medians, parser  # noqa: E402

CASES = [("direct filter", ["inference=filtering"]), ("AVF, 1 update", ["inference=avf", "inference.steps=1"]),
         ("AVF, 2 updates", ["inference=avf", "inference.steps=2"]),
         ("AVF, 5 updates", ["inference=avf", "inference.steps=5"])]


def smc_eval_seconds(cases: dict, xs: dict, k: int, reps: int) -> dict[str, float]:
    """Median seconds per sequence of ``evaluate_batch`` with SMC-k (IWAE-k too) over ``xs[name]``, interleaved."""
    times = {name: [] for name in cases}
    for rep in range(reps + 1):  # round 0 warms up (first calls at new shapes)
        for name, module in cases.items():
            module.eval()
            x = xs[name]
            if rep == 0:
                module.evaluate_batch(Batch(x[:2], 0), 4, "test", SMC(particles=4))
                continue
            t0 = time.perf_counter()
            module.evaluate_batch(Batch(x, 0), k, "test", SMC(particles=k))
            times[name].append((time.perf_counter() - t0) / len(x))
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    p = parser(__doc__, steps=5, reps=3)
    p.add_argument("--eval-n", type=int, default=100)
    p.add_argument("--smc-n", type=int, default=20)
    p.add_argument("--lgssm-n", type=int, default=10)
    p.add_argument("--lgssm-k", type=int, default=1000)
    p.add_argument("--lgssm-steps", type=int, default=40)
    a = p.parse_args()
    if a.quick:
        a.steps, a.reps, a.eval_n, a.smc_n, a.lgssm_n, a.lgssm_k = 2, 2, 20, 10, 4, 200
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
    mm = smc_eval_seconds({n: m for n, (m, _) in modules.items()},
                          {n: dm.splits["test"][:a.smc_n] for n, (_, dm) in modules.items()}, 100, a.reps)
    lg_cases, lg_x = {}, {}
    for name, over in CASES:
        module, dm = build_from_overrides(["dataset=lgssm", "model=lgssm", f"dataset.steps={a.lgssm_steps}",
                                           "dataset.n_train=100", f"dataset.n_test={a.lgssm_n}", "logger=none",
                                           "evaluation=smc", *over])
        lg_cases[name], lg_x[name] = module, dm.splits["test"][:a.lgssm_n]
    lg = smc_eval_seconds(lg_cases, lg_x, a.lgssm_k, a.reps)
    base_t, base_i = train["direct filter"], infer["direct filter"]
    print(f"Moving MNIST (SRNN, 10 steps of 32x32), torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"training batch {a.batch}, {a.reps} x {a.steps} steps per row (median, interleaved); inference over "
          f"{a.eval_n} sequences")
    print(f"{'scheme':<18}{'train step ms':>14}{'x direct':>10}{'inference us/step':>19}{'x direct':>10}")
    for name in modules:
        print(f"{name:<18}{1e3 * train[name]:>14.1f}{train[name] / base_t:>10.2f}{1e6 * infer[name]:>19.1f}"
              f"{infer[name] / base_i:>10.2f}")
    print(f"\nSMC evaluation (evaluate_batch, evaluation=smc: IWAE-k + SMC-K + diagnostics), seconds per sequence, "
          f"median of {a.reps}: Moving MNIST k = K = 100 over {a.smc_n} sequences; LGSSM k = K = {a.lgssm_k} over "
          f"{a.lgssm_n} sequences of {a.lgssm_steps} steps")
    print(f"{'scheme':<18}{'Moving MNIST s':>15}{'x direct':>10}{'LGSSM s':>10}{'x direct':>10}")
    for name in modules:
        print(f"{name:<18}{mm[name]:>15.3f}{mm[name] / mm['direct filter']:>10.2f}{lg[name]:>10.3f}"
              f"{lg[name] / lg['direct filter']:>10.2f}")


if __name__ == "__main__":
    main()

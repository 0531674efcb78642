#!/usr/bin/env python
"""Cost of the inference schemes against the VAE, in one process: training step time of SA-VAE(K), VAE+SVI(K),
iterative (T) and RecMix (M) relative to the VAE step, the peak memory of a training step (and of SA-VAE's exact
reverse pass vs plain autograd through the unrolled steps), and test-time inference cost per point (RecMix's M
encoder passes vs SA-VAE's K steps vs iterative's T updates).

    python bench/inference_schemes.py                 # K = 10, 20; T = 5; M = 3; binarized MNIST, batch 50
    python bench/inference_schemes.py --quick

Step times: the same process, the schemes interleaved, ``--reps`` rounds of ``--steps`` optimiser steps (forward,
backward, Adam) after warm-up; medians. Peak memory: each configuration runs a few steps in a fresh subprocess,
which reports how far its peak resident set size rises above its resident size before those steps (after one
warm-up step; the peak is reset through /proc/self/clear_refs), i.e. the memory a training step needs on top of the
model, the optimiser state and the data (CPU has no allocator high-water mark; Linux only). Refinement cost:
``infer_seconds`` of the library's own evaluation on ``--eval-n`` test points.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from amortlab.data.loader import Batch  # noqa: E402
from amortlab.build import build_from_overrides  # noqa: E402


STEPS_KEY = {"sa_vae": "refinement.steps", "vae_svi": "refinement.steps", "iterative": "iterations",
             "recursive_mixture": "components"}


def build(data_dir: str, inference: str, K: int, batch: int):
    """The scheme with its step count ``K`` (refinement steps K, iterations T or components M)."""
    over = ["dataset=binarized_mnist", f"data_dir={data_dir}", "logger=none", f"dataset.batch_size={batch}"]
    if inference != "amortized":
        over += [f"inference={inference}", f"inference.{STEPS_KEY[inference]}={K}"]
    module, dm = build_from_overrides(over)
    return module, dm


def step_fn(module, x_batches, unrolled: bool = False):
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    if unrolled:  # reference: plain autograd through the unrolled loop (create_graph), same math
        from amortlab.methods.semi_amortized import _lam, _q
        from amortlab.objectives import k_sample_bound
        from amortlab.refinement import refine

        def loss_fn(x):
            q0 = module.infer(x)
            lams = refine(module._objective(x, True), _lam(q0), module._noise(x, None), module.refinement,
                          create_graph=True)
            return -k_sample_bound(module.log_weights(x, _q(lams[-1]), module.k_train)).mean()
    else:
        loss_fn = module.training_loss
    it = iter(x_batches)

    def step():
        nonlocal it
        try:
            x = next(it)
        except StopIteration:
            it = iter(x_batches)
            x = next(it)
        opt.zero_grad(set_to_none=True)
        loss_fn(x).backward()
        opt.step()
    return step


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(a) -> None:
    """One configuration in a fresh process: print the growth of the peak RSS (KiB) over ``a.child_steps`` steps,
    measured from the resident size after the model and data are built (VmHWM reset through clear_refs)."""
    import gc

    torch.set_num_threads(a.threads)
    inference, K, mode = a.child.split(":")
    module, dm = build(a.data_dir, inference, int(K), a.batch)
    xs = [dm.splits["train"][i * a.batch:(i + 1) * a.batch].clone() for i in range(4)]
    step = step_fn(module, xs, unrolled=mode == "unrolled")
    step()  # first step: Adam's state and the allocator's caches exist from here on
    del dm
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = _status_kib("VmRSS")
    for _ in range(a.child_steps):
        step()
    print(json.dumps({"peak_growth_kib": _status_kib("VmHWM") - start}))


def peak_mib(a, spec: str) -> float:
    cmd = [sys.executable, __file__, "--child", spec, "--data-dir", a.data_dir, "--batch", str(a.batch),
           "--threads", str(a.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)["peak_growth_kib"] / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("AMORTLAB_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--Ks", type=int, nargs="*", default=[10, 20])
    p.add_argument("--T", type=int, default=5)
    p.add_argument("--M", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--eval-n", type=int, default=500)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-steps", type=int, default=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    if a.child:
        return child(a)
    if a.quick:
        a.steps, a.reps, a.eval_n = 8, 2, 200
    torch.set_num_threads(a.threads)

    # --- step times, interleaved ---
    cases = [("VAE", "amortized", 0)]
    for K in a.Ks:
        cases += [(f"VAE+SVI K={K}", "vae_svi", K), (f"SA-VAE K={K}", "sa_vae", K)]
    cases += [(f"iterative T={a.T}", "iterative", a.T), (f"RecMix M={a.M}", "recursive_mixture", a.M)]
    steps, modules = {}, {}
    for name, inf, K in cases:
        module, dm = build(a.data_dir, inf, K, a.batch)
        xs = [dm.splits["train"][i * a.batch:(i + 1) * a.batch] for i in range(20)]
        steps[name], modules[name] = step_fn(module, xs), (module, dm)
        for _ in range(2):
            steps[name]()  # warm-up
    times = {name: [] for name, _, _ in cases}
    for _ in range(a.reps):
        for name, _, _ in cases:
            t0 = time.perf_counter()
            for _ in range(a.steps):
                steps[name]()
            times[name].append((time.perf_counter() - t0) / a.steps)
    base = statistics.median(times["VAE"])

    # --- test-time refinement cost per point (the library's evaluation) ---
    infer = {}
    for name, _inf, _K in cases:
        module, dm = modules[name]
        module.eval()
        x = dm.splits["test"][:a.eval_n]
        out = module.evaluate_batch(Batch(x, 0), 1)
        infer[name] = float(out["infer_seconds"].mean())

    # --- peak memory in fresh processes ---
    mem = {}
    for name, inf, K in cases:
        mem[name] = peak_mib(a, f"{inf}:{K}:step")
    for K in a.Ks:
        mem[f"SA-VAE K={K} (plain unrolled autograd)"] = peak_mib(a, f"sa_vae:{K}:unrolled")

    print(f"batch {a.batch}, k = 1, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{a.reps} x {a.steps} steps per scheme (median)")
    print(f"{'scheme':<40}{'step ms':>10}{'x VAE':>8}{'peak MiB':>10}{'test infer ms/pt':>18}")
    for name, _, _ in cases:
        t = statistics.median(times[name])
        print(f"{name:<40}{1000 * t:>10.1f}{t / base:>8.1f}{mem[name]:>10.1f}{1000 * infer[name]:>18.3f}")
    for K in a.Ks:
        key = f"SA-VAE K={K} (plain unrolled autograd)"
        print(f"{key:<40}{'':>10}{'':>8}{mem[key]:>10.1f}")


if __name__ == "__main__":
    main()

"""Shared by the per-scheme benchmarks (bench/hierarchy.py, bench/expressive.py): the common arguments, one built
module per case, and interleaved step timing (each case's median over rounds, so machine drift hits all alike)."""
from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

from amortlab.build import build_from_overrides
from inference_schemes import step_fn

ROOT = Path(__file__).resolve().parent.parent


def parser(doc: str, steps: int, reps: int) -> argparse.ArgumentParser:
    """--data-dir, --threads, --batch, --steps, --reps, --quick; a script adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("AMORTLAB_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--reps", type=int, default=reps)
    p.add_argument("--quick", action="store_true")
    return p


def build_cases(cases: list[tuple[str, list[str]]], a: argparse.Namespace, warmup: int = 1,
                base: tuple[str, ...] = ("dataset=binarized_mnist",)):
    """``{name: step()}`` and ``{name: (module, datamodule)}``: ``base`` overrides (binarized MNIST) at ``a.batch``,
    each case's overrides; ``warmup`` steps each."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    steps, modules = {}, {}
    for name, over in cases:
        module, dm = build_from_overrides([*base, f"data_dir={a.data_dir}", "logger=none",
                                           f"dataset.batch_size={a.batch}", *over])
        xs = [dm.splits["train"][i * a.batch:(i + 1) * a.batch] for i in range(20)]
        steps[name], modules[name] = step_fn(module, xs), (module, dm)
        for _ in range(warmup):
            steps[name]()
    return steps, modules


def interleaved_medians(steps: dict, reps: int, n: int) -> dict[str, float]:
    """Seconds per step of each case: ``reps`` rounds of ``n`` steps, the cases interleaved; the median round."""
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            times[name].append((time.perf_counter() - t0) / n)
    return {name: statistics.median(t) for name, t in times.items()}

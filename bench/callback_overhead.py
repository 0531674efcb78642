#!/usr/bin/env python
"""Cost of the throughput callbacks per training step: amortlab's ``Throughput`` (no per-step hook: images counted
from the step counter at epoch ends) against Lightning's ``ThroughputMonitor`` (a per-step hook that times every batch
and logs rates), on the same model in the same process, interleaved, medians of ``--reps``.

    python bench/callback_overhead.py [--batch 20 100] [--reps 3]

Prints training images/s with each (both runs also carry ``Throughput`` to measure) and the ratio. The library keeps
its own callback unless Lightning's costs no more than noise at the papers' smallest batch (Burda et al.: 20).
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import warnings
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from amortlab.callbacks import Throughput  # noqa: E402
from amortlab.build import build_from_overrides, quiet_lightning  # noqa: E402


def images_per_s(data_dir: str, batch: int, monitor: bool, steps: int) -> float:
    module, dm = build_from_overrides(["dataset=binarized_mnist", f"data_dir={data_dir}", "logger=none",
                                       f"dataset.batch_size={batch}"])
    tp = Throughput()
    callbacks: list[L.Callback] = [tp]
    if monitor:
        from lightning.pytorch.callbacks import ThroughputMonitor

        callbacks.append(ThroughputMonitor(batch_size_fn=lambda b: len(b.x)))
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, max_epochs=3,
              limit_train_batches=steps, callbacks=callbacks, use_distributed_sampler=False).fit(module, datamodule=dm)
    return tp.images_per_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("AMORTLAB_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--batch", type=int, nargs="*", default=[20, 100])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    quiet_lightning()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(a.threads)
    print(f"{'batch':>6}{'Throughput img/s':>20}{'+ThroughputMonitor':>20}{'ratio':>8}")
    for batch in a.batch:
        own, lightning = [], []
        for _ in range(a.reps):
            own.append(images_per_s(a.data_dir, batch, False, a.steps))
            lightning.append(images_per_s(a.data_dir, batch, True, a.steps))
        o, m = statistics.median(own), statistics.median(lightning)
        print(f"{batch:>6}{o:>20.0f}{m:>20.0f}{m / o:>8.3f}", flush=True)


if __name__ == "__main__":
    main()

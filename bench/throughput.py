#!/usr/bin/env python
"""Throughput of amortlab against the plain-PyTorch reference loop, in one process run on binarized MNIST.

    python bench/throughput.py                  # k = 1 and k = 50 training, IWAE-5000 evaluation, paper overlays
    python bench/throughput.py --quick          # shorter runs (noisier)
    python bench/throughput.py --only burda cremer air   # the paper overlays only
    python bench/throughput.py --only stack20 stack100   # N seeds stacked vs separate runs

Same model (784-200-200-50 tanh), batch 100, fused Adam, same thread count, same process (so the same allocator
settings). Library and reference runs are interleaved and repeated; the table reports medians and the ratio
library / reference. Library training throughput is the Lightning fit loop's training time (validation off,
Trainer start-up excluded; > 3 epochs or 300 steps per measurement); evaluation throughput is the test epoch of
``trainer.test`` with the library's default evaluation settings (IWAE-5000, 100 images x 10-sample chunks).
Targets (issue 3): training >= 0.85x at k = 1 and k = 50, IWAE-5000 evaluation >= 0.9x.

Stacked seeds (``stack20``, ``stack100``; issue 17): 8 seeds trained as one stacked computation (``stack.seeds``);
``stack_sigma``: air_reduced's 6 denoising sigmas x 2 seeds (``stack.key``/``stack.values``) as one computation;
aggregate training images/s against one single run of the same config (N separate runs one after another reach
the single run's rate in aggregate); both through ``run`` with the default callbacks and validation off. Targets
>= 1.8x at batch 20 and >= 1.3x at batch 100.

Paper overlays (``burda``, ``cremer``, ``air``; issue 17): the overlay itself through ``amortlab.run.run`` with
``test=false`` (its own batch size, callbacks, checkpoint and validation cadence, its ``inference.fused_steps``; a
few epochs of ``--overlay-batches`` steps), training images/s as results.json reports it (``Throughput``: training
epochs including their checkpoint writes, validation excluded), beside the reference loop at the overlay's batch
size and k. ``burda_unfused``/``cremer_unfused``: the same with ``inference.fused_steps=1`` (Lightning's own loop).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from amortlab.callbacks import EpochLog, Throughput  # noqa: E402
from amortlab.build import build_from_overrides, quiet_lightning  # noqa: E402


def reference_module(shared: Path):
    sys.path.insert(0, str(shared / "bench"))
    import reference_loop

    return reference_loop


def run_reference(ref, data: Path, args: list[str]) -> dict:
    argv, out = sys.argv, io.StringIO()
    sys.argv = ["reference_loop.py", "--data", str(data), "--json", *args]
    try:
        with contextlib.redirect_stdout(out):
            ref.main()
    finally:
        sys.argv = argv
    return json.loads(out.getvalue().strip().splitlines()[-1])


class TestTimer(L.Callback):
    def on_test_epoch_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_test_epoch_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.t0


def library(data_dir: Path, k: int, overrides: list[str] = ()):
    return build_from_overrides(["dataset=binarized_mnist", f"data_dir={data_dir}", f"importance_samples.train={k}",
                                 "logger=none", *overrides])


def trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                     num_sanity_val_steps=0, limit_val_batches=0, **kw)


def run_library_train(data_dir: Path, k: int, epochs: int, batches: int | None) -> float:
    module, dm = library(data_dir, k)
    tp = Throughput()
    # EpochLog is in every run's default callbacks (its per-step hook adds the loss on the device)
    trainer(max_epochs=epochs, limit_train_batches=batches, callbacks=[tp, EpochLog()]).fit(module, datamodule=dm)
    return tp.images_per_s


def run_library_eval(data_dir: Path, n: int) -> float:
    module, dm = library(data_dir, 1)
    timer = TestTimer()
    batches = max(1, n // dm.eval_batch_size)
    trainer(limit_test_batches=batches, callbacks=[timer]).test(module, datamodule=dm, verbose=False)
    return batches * dm.eval_batch_size / timer.seconds


OVERLAYS = {  # key: (experiment, batch, k, extra overrides)
    "burda": ("burda_mnist_vae", 20, 1, []),
    "cremer": ("cremer_mnist_ffg", 100, 1, []),
    "air": ("air_mnist_reduced", 100, 1, []),
    # the same overlays with one optimiser step per Lightning step (Lightning's own loop): what fusing removes
    "burda_unfused": ("burda_mnist_vae", 20, 1, ["inference.fused_steps=1"]),
    "cremer_unfused": ("cremer_mnist_ffg", 100, 1, ["inference.fused_steps=1"]),
}


def run_overlay(data_dir: Path, experiment: str, epochs: int, batches: int, overrides: list[str] = ()) -> float:
    """Training images/s of the overlay over ``epochs * batches`` steps: epochs of at most ``batches`` steps (an
    overlay whose epoch is shorter, e.g. air_mnist_reduced's 20 steps, runs more of its own epochs: its per-epoch
    work is part of what is measured)."""
    import tempfile

    from amortlab.build import compose_config
    from amortlab.run import run

    with tempfile.TemporaryDirectory(prefix="bench-overlay-") as out:
        cfg = compose_config([f"experiment={experiment}", f"data_dir={data_dir}", "logger=none", "test=false",
                              "trainer.max_epochs=-1", f"trainer.max_steps={epochs * batches}",
                              f"trainer.limit_train_batches={batches}", *overrides], out)
        with contextlib.redirect_stdout(io.StringIO()):
            return run(cfg, out)["timing"]["train_images_per_s"]


SIGMAS = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2]  # air_reduced's denoising grid
STACKED = {  # key: (batch, seeds, overrides, what): the models trained as one stacked computation vs one at a time
    "stack20": (20, 8, [], "8 seeds"),
    "stack100": (100, 8, [], "8 seeds"),
    "stack_sigma": (100, 2, ["encoder_regularizer=denoising", "stack.key=encoder_regularizer.sigma",
                             f"stack.values=[{','.join(map(str, SIGMAS))}]"], f"{len(SIGMAS)} sigma x 2 seeds"),
}


def run_stacked_pair(data_dir: Path, batch: int, n: int, epochs: int, batches: int,
                     overrides: list[str] = ()) -> tuple[float, float]:
    """(aggregate images/s of N stacked seeds (x ``stack.values`` in ``overrides``), images/s of one single run = the
    aggregate of the same runs made one after another), both through ``run`` with the default callbacks, validation
    off."""
    import tempfile

    from amortlab.build import compose_config
    from amortlab.run import run

    base = ["dataset=binarized_mnist", f"data_dir={data_dir}", "logger=none", "test=false",
            f"dataset.batch_size={batch}", f"trainer.max_epochs={epochs}", f"trainer.limit_train_batches={batches}",
            "trainer.limit_val_batches=0"]
    own = [o for o in overrides if not o.startswith("stack.")]
    with tempfile.TemporaryDirectory(prefix="bench-stack-") as out, contextlib.redirect_stdout(io.StringIO()):
        single = run(compose_config([*base, *own], out), out)["timing"]["train_images_per_s"]
    with tempfile.TemporaryDirectory(prefix="bench-stack-") as out, contextlib.redirect_stdout(io.StringIO()):
        res = run(compose_config([*base, *overrides, f"stack.seeds=[{','.join(map(str, range(n)))}]"], out), out)
    return res["members"][0]["timing"]["stack_images_per_s"], single


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("AMORTLAB_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--shared", default=str(ROOT.parent / "shared"), help="folder holding bench/reference_loop.py")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", choices=["k1", "k50", "eval", *OVERLAYS, *STACKED], nargs="*",
                   default=["k1", "k50", "eval", "burda", "cremer", "air", *STACKED])
    p.add_argument("--overlay-batches", type=int, default=600, help="training steps per epoch of an overlay run")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args()

    warnings.filterwarnings("ignore")
    quiet_lightning()
    torch.set_num_threads(a.threads)
    data_dir = Path(a.data_dir)
    npz = data_dir / "binarized_mnist.npz"
    ref = reference_module(Path(a.shared))

    # (name, k, library epochs, batches per epoch, reference steps)
    q = a.quick
    cases = {"k1": ("train k=1", 1, 3, None if not q else 200, 1500 if not q else 600),
             "k50": ("train k=50", 50, 3, 100 if not q else 30, 300 if not q else 90)}
    n_eval = 500 if not q else 200
    rows = []
    for key in a.only:
        lib, refv = [], []
        for _ in range(a.reps):
            if key in OVERLAYS:
                exp, batch, k, extra = OVERLAYS[key]
                steps = a.overlay_batches if not q else a.overlay_batches // 3
                r = run_reference(ref, npz, ["--k", str(k), "--batch", str(batch), "--steps", str(3 * steps),
                                             "--threads", str(a.threads)])
                refv.append(r["train_img_s"])
                lib.append(run_overlay(data_dir, exp, 3, steps, extra))
                name = f"experiment={exp} (batch {batch}){' ' + ' '.join(extra) if extra else ''}"
            elif key in STACKED:  # "reference" here = separate runs of the library, one at a time
                batch, n, overrides, what = STACKED[key]
                agg, single = run_stacked_pair(data_dir, batch, n, 3, 300 if not q else 100, overrides)
                lib.append(agg)
                refv.append(single)
                name = f"{what} stacked vs separate (batch {batch})"
            elif key == "eval":
                r = run_reference(ref, npz, ["--steps", "0", "--eval-k", "5000", "--eval-n", str(n_eval),
                                             "--threads", str(a.threads)])
                refv.append(r["eval_img_s"])
                lib.append(run_library_eval(data_dir, n_eval))
                name = "IWAE-5000 eval (test img/s)"
            else:
                name, k, epochs, batches, steps = cases[key]
                r = run_reference(ref, npz, ["--k", str(k), "--steps", str(steps), "--threads", str(a.threads)])
                refv.append(r["train_img_s"])
                lib.append(run_library_train(data_dir, k, epochs, batches))
            print(f"  {name}: library {lib[-1]:.1f}  reference {refv[-1]:.1f}", flush=True)
        lm, rm = statistics.median(lib), statistics.median(refv)
        target = {"stack20": 1.8, "stack100": 1.3, "stack_sigma": 1.3}.get(
            key, 0.9 if key in ("eval", *OVERLAYS) else 0.85)  # the unfused rows show what fusing gains
        rows.append({"case": name, "library": round(lm, 1), "reference": round(rm, 1), "ratio": round(lm / rm, 3),
                     "target": target, "ok": lm / rm >= target, "library_runs": lib, "reference_runs": refv})

    print(f"\nthroughput vs ../shared/bench/reference_loop.py (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, medians of {a.reps})")
    print(f"{'case':<44}{'library':>12}{'reference':>12}{'ratio':>8}{'target':>8}")
    for r in rows:
        print(f"{r['case']:<44}{r['library']:>12.1f}{r['reference']:>12.1f}{r['ratio']:>8.3f}"
              f"{'>=' + str(r['target']):>8} {'ok' if r['ok'] else 'BELOW'}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

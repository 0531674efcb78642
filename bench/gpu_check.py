#!/usr/bin/env python
"""GPU readiness check (issue 17): one script, a few minutes on one GPU, numbers to paste into the README.

    bash bench/gpu_check.sh                       # on a GPU machine (AMORTLAB_DATA points at binarized_mnist.npz)
    python bench/gpu_check.py --device cpu --test-points 200 --train-steps 20   # smoke run anywhere

Prints:
1. the device and a matmul peak it measures itself (float32 with TF32 allowed, and bfloat16), TFLOP/s;
2. IWAE-5000 on the first ``--test-points`` binarized-MNIST test images (10 000 by default) through the library's
   own evaluation (``ELBOModule.evaluate_batch``, chunked, float64 accumulation): seconds, images/s, and achieved
   TFLOP/s (decoder matmuls only: 2 * (50*200 + 200*200 + 200*784) flops per sample) beside the peak;
3. training images/s at k = 1 and k = 50 (Lightning fit loop, data on the device, ``--train-steps`` steps; the second
   of two epochs is timed), at k = 1 with 20 optimiser steps per Lightning step (``inference.fused_steps``) and at
   k = 1 with the networks compiled (``--compile-mode``, default reduce-overhead = CUDA graphs;
   ``inference.compile_mode``);
4. stacked N = 16 / 64 models (``stack.seeds``, through ``amortlab.run.run``, validation off) at k = 1 and k = 50:
   aggregate training images/s of the N members;
5. with >= 2 devices: a 2-process DDP run and a 1-process run of train.py give the same test NLL.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from amortlab.callbacks import Throughput  # noqa: E402
from amortlab.data.loader import Batch  # noqa: E402
from amortlab.build import build_from_overrides, compose_config, quiet_lightning  # noqa: E402
from amortlab.run import run  # noqa: E402

DECODER_FLOPS_PER_SAMPLE = 2 * (50 * 200 + 200 * 200 + 200 * 784)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def iwae_eval(data_dir: str, device: torch.device, n_points: int, k: int, batch: int, rows: int) -> tuple[float, float]:
    module, dm = build_from_overrides(["dataset=binarized_mnist", f"data_dir={data_dir}", "logger=none",
                                       f"evaluation.rows={rows}"])
    module = module.to(device).eval()
    x_all = dm.splits["test"][:n_points].to(device)
    with torch.inference_mode():
        module.evaluate_batch(Batch(x_all[:batch], 0), k=min(k, 100))  # warm-up
        sync(device)
        t0 = time.perf_counter()
        nll = []
        for i in range(0, len(x_all), batch):
            nll.append(module.evaluate_batch(Batch(x_all[i:i + batch], i), k=k)["nll"])
        sync(device)
    seconds = time.perf_counter() - t0
    return seconds, float(torch.cat(nll).mean())


class WarmThroughput(Throughput):
    """Training images/s of the epochs after the first (warm-up, compilation and CUDA-graph capture excluded)."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            self.images, self.train_s = 0, 0.0
        super().on_train_epoch_start(trainer, pl_module)


def train_images_per_s(data_dir: str, device: torch.device, k: int, steps: int, compile_mode: str | None = None,
                       fused_steps: int = 1) -> float:
    import lightning as L

    from amortlab.data.fused import fused_fit

    module, dm = build_from_overrides(["dataset=binarized_mnist", f"data_dir={data_dir}", "logger=none",
                                       f"importance_samples.train={k}", f"inference.fused_steps={fused_steps}",
                                       *([f"inference.compile_mode={compile_mode}"] if compile_mode else [])])
    tp = WarmThroughput()
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    data, fused = fused_fit(dm, fused_steps, {"limit_train_batches": max(1, steps // 2)})
    L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, max_epochs=2,
              **{"limit_train_batches": max(1, steps // 2), **fused}, callbacks=[tp],
              use_distributed_sampler=False).fit(module, datamodule=data)
    return tp.images_per_s or float("nan")


def stacked_images_per_s(data_dir: str, device: torch.device, k: int, n: int, steps: int) -> float:
    """Aggregate training images/s of ``n`` seeds trained as one stacked computation (``stack.seeds``)."""
    import contextlib
    import io

    trainer = ["trainer=gpu"] if device.type == "cuda" else []
    with tempfile.TemporaryDirectory(prefix="gpu-check-stack-") as out, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        cfg = compose_config(["dataset=binarized_mnist", f"data_dir={data_dir}", "logger=none", "test=false",
                              f"importance_samples.train={k}", *trainer, "trainer.max_epochs=2",
                              f"trainer.limit_train_batches={max(1, steps // 2)}", "trainer.limit_val_batches=0",
                              f"stack.seeds=[{','.join(map(str, range(n)))}]"], out)
        res = run(cfg, out)
    return res["members"][0]["timing"]["stack_images_per_s"]


def ddp_equality(data_dir: str) -> str:
    base = ["logger=none", "dataset=binarized_mnist", f"data_dir={data_dir}", "trainer.max_epochs=1",
            "trainer.limit_train_batches=50", "trainer.limit_test_batches=5", "importance_samples.test=500",
            "evaluation.val=false"]
    nll = {}
    with tempfile.TemporaryDirectory() as d:
        for name, extra in (("1 process", ["trainer=gpu"]), ("2 processes", ["trainer=ddp", "trainer.devices=2"])):
            out = Path(d) / name.replace(" ", "_")
            subprocess.run([sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={out}", *base, *extra],
                           check=True, capture_output=True, text=True, cwd=ROOT)
            nll[name] = json.loads((out / "results.json").read_text())["metrics"]["test/nll"]
    diff = abs(nll["1 process"] - nll["2 processes"])
    return f"test/nll 1 process {nll['1 process']:.6f}, 2 processes {nll['2 processes']:.6f}, |diff| {diff:.2e}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("AMORTLAB_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--test-points", type=int, default=10_000)
    p.add_argument("--k", type=int, default=5000)
    p.add_argument("--eval-batch", type=int, default=500)
    p.add_argument("--rows", type=int, default=2_000_000, help="decoder rows per evaluation chunk (GPU: large)")
    p.add_argument("--train-steps", type=int, default=2000)
    p.add_argument("--stack-steps", type=int, default=200, help="training steps of each stacked measurement")
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode of the compiled training "
                   "row (reduce-overhead = CUDA graphs); '' skips it")
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    quiet_lightning()
    device = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    n = a.matmul_n if device.type == "cuda" else min(a.matmul_n, 1024)
    peak32 = matmul_peak(device, torch.float32, n)
    peak16 = matmul_peak(device, torch.bfloat16, n) if device.type == "cuda" else float("nan")
    print(f"matmul peak (n={n}): float32/TF32 {peak32:.1f} TFLOP/s, bfloat16 {peak16:.1f} TFLOP/s", flush=True)

    seconds, nll = iwae_eval(a.data_dir, device, a.test_points, a.k, a.eval_batch, a.rows)
    tflops = a.test_points * a.k * DECODER_FLOPS_PER_SAMPLE / seconds / 1e12
    print(f"IWAE-{a.k} on {a.test_points} test images: {seconds:.1f} s ({a.test_points / seconds:.1f} img/s), "
          f"NLL {nll:.3f} (untrained model), decoder {tflops:.2f} TFLOP/s = {tflops / peak32:.1%} of the float32 "
          f"peak", flush=True)
    for k in (1, 50):
        print(f"training k={k}: {train_images_per_s(a.data_dir, device, k, a.train_steps):,.0f} img/s", flush=True)
    rate = train_images_per_s(a.data_dir, device, 1, a.train_steps, fused_steps=20)
    print(f"training k=1 fused (inference.fused_steps=20): {rate:,.0f} img/s", flush=True)
    if a.compile_mode:  # the second of its two epochs is timed (WarmThroughput): compilation falls in the first
        rate = train_images_per_s(a.data_dir, device, 1, a.train_steps, a.compile_mode)
        print(f"training k=1 compiled ({a.compile_mode}): {rate:,.0f} img/s", flush=True)
    for k in (1, 50):
        for n in (16, 64):
            rate = stacked_images_per_s(a.data_dir, device, k, n, a.stack_steps)
            print(f"training stacked N={n} k={k}: {rate:,.0f} img/s in all ({rate / n:,.0f} per model)", flush=True)
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        print("DDP equality:", ddp_equality(a.data_dir), flush=True)
    else:
        print("DDP equality: skipped (needs 2 GPUs)", flush=True)


if __name__ == "__main__":
    main()

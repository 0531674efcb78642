#!/usr/bin/env python
"""Cost of the expressive posteriors and decoders relative to the flat MLP VAE, in one process: training step time
and the cost of one importance sample in evaluation (IWAE-k: one decoder pass per sample and point).

    python bench/expressive.py              # binarized MNIST, batch 50, k = 1
    python bench/expressive.py --quick

Rows: flat VAE (model=burda_mlp, the yardstick); posterior=iaf (T = 2); model=conv; model=pixelcnn (6 gated layers,
32 channels, the config default); the reduced PixelCNN of experiment=pixelcnn_mnist_reduced (3 layers, 16 channels);
SA-VAE (K = 5) with that PixelCNN. Training: the library's ``training_loss`` with backward and Adam, interleaved over
``--reps`` rounds of ``--steps`` steps after warm-up; medians. Evaluation: ``log_weights`` of ``--eval-k`` samples for
``--eval-n`` test points under ``torch.no_grad``, per sample and point (µs).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scheme_timing import build_cases, interleaved_medians, parser  # noqa: E402

SMALL_PIXELCNN = ["model=pixelcnn", "model.decoder.layers=3", "model.decoder.channels=16",
                  "model.decoder.out_channels=32"]


def cases(K: int) -> list[tuple[str, list[str]]]:
    return [("flat VAE (MLP)", []), ("IAF posterior T=2", ["posterior=iaf"]), ("conv VAE", ["model=conv"]),
            ("PixelCNN 6x32 VAE", ["model=pixelcnn"]), ("PixelCNN 3x16 VAE", SMALL_PIXELCNN),
            (f"PixelCNN 3x16 SA-VAE K={K}", [*SMALL_PIXELCNN, "inference=sa_vae", f"inference.refinement.steps={K}"])]


def main() -> None:
    p = parser(__doc__, steps=10, reps=3)
    p.add_argument("--K", type=int, default=5)
    p.add_argument("--eval-n", type=int, default=50)
    p.add_argument("--eval-k", type=int, default=20)
    a = p.parse_args()
    if a.quick:
        a.steps, a.reps = 3, 2
    steps, modules = build_cases(cases(a.K), a)
    times = interleaved_medians(steps, a.reps, a.steps)
    sample_us = {}
    for name, (module, dm) in modules.items():
        module.eval()
        x = dm.splits["test"][:a.eval_n]
        with torch.no_grad():
            q = module.infer_for_eval(x).q
            module.log_weights(x, q, 2)  # warm-up
            t0 = time.perf_counter()
            module.log_weights(x, q, a.eval_k)
            sample_us[name] = 1e6 * (time.perf_counter() - t0) / (a.eval_k * a.eval_n)
    base, base_s = times["flat VAE (MLP)"], sample_us["flat VAE (MLP)"]
    print(f"binarized MNIST, batch {a.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{a.reps} x {a.steps} steps per row (median, interleaved); evaluation {a.eval_k} samples x {a.eval_n} "
          f"points")
    print(f"{'model / scheme':<30}{'step ms':>10}{'x flat VAE':>12}{'eval us/sample/pt':>19}{'x flat VAE':>12}")
    for name in steps:
        t = times[name]
        print(f"{name:<30}{1000 * t:>10.2f}{t / base:>12.2f}{sample_us[name]:>19.2f}{sample_us[name] / base_s:>12.1f}")


if __name__ == "__main__":
    main()

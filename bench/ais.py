#!/usr/bin/env python
"""AIS evaluation cost: AIS (HMC) log p(x) per test point vs the library's IWAE-5000 estimate per point.

    python bench/ais.py                         # 100 binarized-MNIST test points, default AISConfig, 2 threads
    python bench/ais.py --points 10             # quick smoke run
    python bench/ais.py --ckpt RUN/checkpoints/best.ckpt   # a trained 784-200-200-50 model (else: untrained)

Both estimates run on the 784-200-200-50 model (model=burda_mlp) and binarized MNIST test images, in the same
process, each on all ``--points`` points as one batch (``--batch`` to split them): AIS is
``amortlab.evaluation.ais.run_ais(module.model.log_likelihood, x, z_dim, AISConfig(...))``; IWAE-5000 is
``module.evaluate_batch(Batch(x, 0), k=5000, estimator=None)``. Prints seconds per point for both, the ratio, the
wall time extrapolated to the 10 000 test points, and the mean log p(x) estimates and AIS acceptance rate (the
estimates mean something only with ``--ckpt``).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from amortlab.data.loader import Batch  # noqa: E402
from amortlab.evaluation.ais import AISConfig, run_ais  # noqa: E402
from amortlab.build import build_from_overrides, load_weights  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("AMORTLAB_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--points", type=int, default=100, help="test points timed (the first ones of the test split)")
    p.add_argument("--batch", type=int, default=0, help="points per batch for both estimators (0: all at once)")
    p.add_argument("--k", type=int, default=5000, help="IWAE samples")
    p.add_argument("--ckpt", default=None, help="a train.py checkpoint of the same model (state_dict is loaded)")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    defaults = AISConfig()
    for f in dataclasses.fields(AISConfig):  # --n-intermediate, --n-chains, --schedule, ... (AISConfig fields)
        default = getattr(defaults, f.name)
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if isinstance(default, bool) else type(default)
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ais_cfg = AISConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(AISConfig)})

    module, dm = build_from_overrides(["dataset=binarized_mnist", f"data_dir={a.data_dir}", "logger=none",
                                       *a.override])
    if a.ckpt:
        load_weights(module, a.ckpt)  # tensors only (weights_only=True), old key layouts migrated
    module = module.to(a.device).eval()
    X = dm.splits["test"][:a.points].to(a.device)
    bs = a.batch or len(X)
    sync = torch.cuda.synchronize if X.is_cuda else (lambda: None)

    def time_ais() -> tuple[float, torch.Tensor, float]:
        sync()
        t0, out, acc = time.perf_counter(), [], []
        for i in range(0, len(X), bs):
            g = torch.Generator(device=X.device).manual_seed(i)
            res = run_ais(module.model.log_likelihood, X[i:i + bs], module.z_dim, ais_cfg, g)
            out.append(res.log_px)
            acc.append(res.accept_rate)
        sync()
        return (time.perf_counter() - t0) / len(X), torch.cat(out), float(torch.cat(acc).mean())

    def time_iwae() -> tuple[float, torch.Tensor]:
        sync()
        t0, out = time.perf_counter(), []
        for i in range(0, len(X), bs):
            out.append(-module.evaluate_batch(Batch(X[i:i + bs], i), k=a.k, estimator=None)["nll"])
        sync()
        return (time.perf_counter() - t0) / len(X), torch.cat(out)

    # warm-up (allocator, kernels) on 2 points with a short AIS
    run_ais(module.model.log_likelihood, X[:2], module.z_dim, dataclasses.replace(ais_cfg, n_intermediate=5))
    module.evaluate_batch(Batch(X[:2], 0), k=100, estimator=None)

    iwae_s, iwae_lp = time_iwae()
    ais_s, ais_lp, acc = time_ais()
    n_total = 10_000
    print(f"AIS (T={ais_cfg.n_intermediate}, {ais_cfg.n_chains} chains, {ais_cfg.n_leapfrog} leapfrog, "
          f"{ais_cfg.schedule} schedule) vs IWAE-{a.k}; {len(X)} binarized-MNIST test points in batches of {bs}; "
          f"torch {torch.__version__}, {a.device}, {torch.get_num_threads()} threads"
          f"{'' if a.ckpt else '; untrained model (timing only)'}")
    print(f"{'':<14}{'s / point':>12}{f'{n_total} points (h)':>20}{'mean log p(x)':>16}")
    print(f"{f'IWAE-{a.k}':<14}{iwae_s:>12.4f}{iwae_s * n_total / 3600:>20.2f}{iwae_lp.double().mean():>16.2f}")
    print(f"{'AIS':<14}{ais_s:>12.4f}{ais_s * n_total / 3600:>20.2f}{ais_lp.mean():>16.2f}   "
          f"(acceptance {acc:.3f})")
    print(f"AIS / IWAE-{a.k} time per point: {ais_s / iwae_s:.1f}x;  AIS - IWAE mean log p(x): "
          f"{(ais_lp - iwae_lp.double()).mean():+.3f} nats")


if __name__ == "__main__":
    main()

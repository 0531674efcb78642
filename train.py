#!/usr/bin/env python
"""Hydra entry point: compose the config, then train and evaluate one run (see amortlab/run.py).

    python train.py                                   # VAE on the embedded digits data
    python train.py dataset=binarized_mnist importance_samples=k5 trainer.max_epochs=10
    python train.py train=false ckpt_path=outputs/.../checkpoints/best.ckpt
"""
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import amortlab.schemas  # noqa: F401  (registers the typed schemas the config groups select)
from amortlab.errors import AmortlabError


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from amortlab.run import run

    try:
        results = run(cfg, HydraConfig.get().runtime.output_dir)
    except AmortlabError as e:  # results.json holds status failed and this message
        print(f"\namortlab error: {e}", file=sys.stderr, flush=True)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra marks only this job failed, runs the rest of the sweep, then exits non-zero
        sys.exit(1)
    if results.get("status") == "interrupted" and HydraConfig.get().mode != RunMode.MULTIRUN:
        sys.exit(130)  # Ctrl-C / SIGTERM: results.json says interrupted; resume from last.ckpt
    return results["metrics"].get("test/nll")  # the value Hydra sweepers optimise


if __name__ == "__main__":
    main()

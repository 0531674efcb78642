"""Logger set-up (W&B offline by default), what a logger does with the final results, and the results.json writer."""
from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from amortlab.errors import AmortlabError

WANDB_MODES = ("auto", "online", "offline", "disabled")


def wandb_has_key() -> bool:
    """True if the user configured a W&B API key (env var or ``wandb login``'s netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def resolve_wandb_mode(mode: str | None) -> str:
    """``auto`` (default): online when an API key is configured, offline otherwise. CI and tests force
    offline/disabled through ``WANDB_MODE``, which always wins."""
    env = os.environ.get("WANDB_MODE")
    mode = env or mode or "auto"
    if mode == "dryrun":
        mode = "offline"
    if mode not in WANDB_MODES:
        raise AmortlabError(f"logger.mode={mode!r} is not one of {', '.join(WANDB_MODES)}; use offline (default "
                            f"without a key), online (needs WANDB_API_KEY or `wandb login`) or disabled.")
    if mode == "auto":
        mode = "online" if wandb_has_key() else "offline"
    return mode


def make_wandb_logger(save_dir: str, project: str = "amortlab", mode: str | None = "auto", name: str | None = None,
                      group: str | None = None, tags: list[str] | None = None, entity: str | None = None,
                      log_model: bool = False):
    """A Lightning ``WandbLogger``; offline runs stay inspectable locally (``wandb sync <dir>`` uploads later)."""
    from lightning.pytorch.loggers import WandbLogger

    mode = resolve_wandb_mode(mode)
    os.makedirs(save_dir, exist_ok=True)
    return WandbLogger(save_dir=save_dir, project=project, mode=mode, name=name, group=group,
                       tags=list(tags or []), entity=entity, log_model=log_model,
                       settings=_wandb_settings(mode))


@functools.singledispatch
def finish_logger(logger, metrics: dict[str, Any], status: str = "success") -> None:
    """Hand the run's final metrics to ``logger`` and close it. Any Lightning logger: ``finalize(status)`` (the
    metrics were logged as they were computed); a logger type that keeps a run summary registers its own rule."""
    logger.finalize(status)


@functools.singledispatch
def describe_logger(logger) -> str:
    """Lines for the run summary saying where the logged run is (nothing for loggers without a place of their own)."""
    return ""


def _finish_wandb(logger, metrics: dict[str, Any], status: str = "success") -> None:
    """W&B: the final metrics go into the run summary (the dashboard's table columns), then the run is closed (also
    after a failure, so the next run of a sweep never logs into this one)."""
    import wandb

    if metrics:
        logger.experiment.summary.update(metrics)
    logger.finalize(status)
    wandb.finish(exit_code=0 if status == "success" else 1)


def _describe_wandb(logger) -> str:
    run = logger.experiment
    if run.settings.mode == "offline" or run.offline:
        folder = Path(run.dir).parent
        return f"\nW&B: offline run {run.id} in {folder}; upload it with `wandb sync {folder}`"
    return f"\nW&B: {run.url}" if run.url else ""


def _register_wandb() -> None:
    from lightning.pytorch.loggers import WandbLogger  # the class only; wandb itself is imported when a run starts

    finish_logger.register(WandbLogger, _finish_wandb)
    describe_logger.register(WandbLogger, _describe_wandb)


_register_wandb()


def _wandb_settings(mode: str):
    import wandb

    # no console capture / system stats: nothing to upload in offline mode, and less start-up cost
    return wandb.Settings(console="off", x_disable_stats=True, silent=True) if mode != "online" else None


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    import hydra
    import lightning
    import numpy
    import torch
    import torchmetrics

    import amortlab
    return {"python": platform.python_version(), "amortlab": amortlab.__version__, "torch": torch.__version__,
            "lightning": lightning.__version__, "torchmetrics": torchmetrics.__version__,
            "hydra": hydra.__version__, "numpy": numpy.__version__}


def write_results(path: str | os.PathLike, results: dict[str, Any]) -> Path:
    """Write ``results`` as JSON atomically; an existing file is kept as ``results.prev-<time>.json``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
        keep = path.with_name(f"{path.stem}.prev-{stamp}{path.suffix}")
        n = 1
        while keep.exists():
            keep = path.with_name(f"{path.stem}.prev-{stamp}-{n}{path.suffix}")
            n += 1
        os.replace(path, keep)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
    return path

"""What each stacked member keeps of a stacked fit: its checkpoints (a single run's format), its logged values
(``MemberLogs``: what its single run's logger receives, replayed into the member's own logger after training) and a
line per epoch on the console.

A member checkpoint is the stacked trainer's checkpoint with the member's slice of every tensor: ``state_dict``
(the member's own keys), the optimiser state, its ``amortlab_config`` and noise stream, and the state of the
member's own ``ModelCheckpoint`` callbacks. So ``train=false ckpt_path=...`` evaluates it, and
``ckpt_path=<member>/checkpoints/last.ckpt`` resumes the member as a single run.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Container
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger

from amortlab.stack.values import member_lr_state

log = logging.getLogger("amortlab")


_MEMBER_KEY = re.compile(r"^stack\.member(\d+)/(.+)$")


def member_key(i: int, name: str) -> str:
    """The key under which the stacked module logs member i's value ``name`` (``MemberLogs`` gives it back as
    ``name`` to member i only)."""
    return f"stack.member{i}/{name}"


class MemberLogs(Logger):
    """The stacked trainer's logger: writes nothing, keeps every ``log_metrics`` call split per member.

    A key ``member_key(i, name)`` goes to member i as ``name``; any other key (Lightning's ``epoch``, a shared
    callback's value such as ``train/anneal_weight``) to every member. A call is kept for member i when it holds a
    value of i's own or a shared value other than ``epoch``, and i is not in ``stopped`` (the diverged members: their
    single runs end there; Lightning would repeat a member's last step value).
    ``calls[i]``: ``[(metrics, step)]`` in the order Lightning logged them, with its step axis and ``epoch``, i.e.
    what member i's single run hands its logger during training (``run_stacked`` replays them into it).
    """

    def __init__(self, n: int, stopped: Container[int]):
        super().__init__()
        self.calls: list[list[tuple[dict[str, float], int | None]]] = [[] for _ in range(n)]
        self.stopped = stopped

    @property
    def name(self) -> str:
        return "stack"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        """Nothing: each member's logger gets its own config when it is built."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        split = [(_MEMBER_KEY.match(k), k, v) for k, v in metrics.items()]
        shared = any(m is None and k != "epoch" for m, k, _ in split)
        for i, calls in enumerate(self.calls):
            if i in self.stopped:
                continue
            own = {m[2]: v for m, _, v in split if m is not None and int(m[1]) == i}
            if own or shared:
                calls.append(({(k if m is None else m[2]): v for m, k, v in split if m is None or int(m[1]) == i},
                              step))


def slice_optimizer_state(state: dict, i: int, shapes: list[torch.Size]) -> dict:
    """Member i's slice of an optimiser ``state_dict`` whose parameters (in order) have the stacked ``shapes``."""
    per_param = {}
    for idx, st in state["state"].items():
        shape = shapes[idx]
        per_param[idx] = {k: v[i].clone() if torch.is_tensor(v) and v.shape == shape else v for k, v in st.items()}
    return {"state": per_param, "param_groups": state["param_groups"]}


class MemberRecords(L.Callback):
    """Per-member checkpoints (``best``: lowest ``val_epoch/nll``; ``last``: every ``every_n_epochs`` and at the end
    of training) and the epoch line. ``checkpoints[i]``: member i's ``ModelCheckpoint``
    callbacks by name (built from its own config; only their settings and recorded state are used).
    ``configs[i]``: the member's resolved config. ``log_every``: the epoch line's cadence (the run's
    ``callbacks.epoch_log.every_n_epochs``; None: no line). ``throughput``: the stacked run's ``Throughput``; each
    member's checkpoint holds its share (images / N; the shared seconds), as its single run's would, so a member
    resumed alone keeps counting its fit time."""

    def __init__(self, checkpoints: list[dict[str, ModelCheckpoint]], configs: list[dict[str, Any]],
                 names: list[str], log_every: int | None = 1, throughput: L.Callback | None = None):
        self.checkpoints, self.configs, self.names, self.log_every = checkpoints, configs, names, log_every
        self.throughput = throughput
        self._t0 = 0.0
        self._step0 = 0
        self._full: dict | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0, self._step0, self._full = time.perf_counter(), trainer.global_step, None

    def on_validation_end(self, trainer, pl_module) -> None:
        self._full = None  # each save event dumps the trainer's state as it is then (as ModelCheckpoint does)
        if trainer.sanity_checking or not pl_module.val_results:
            return
        epoch = trainer.current_epoch + 1
        for i, values in enumerate(pl_module.val_results):
            if i in pl_module.diverged:
                continue
            for cb in self.checkpoints[i].values():
                if cb.monitor and cb.monitor in values and self._due(cb, epoch):
                    score = torch.tensor(values[cb.monitor])
                    best = cb.best_model_score
                    if best is None or (score < best if cb.mode == "min" else score > best):
                        self._save(trainer, pl_module, i, cb, score)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch, self._full = trainer.current_epoch + 1, None
        pl_module.read_nonfinite_flag()  # before these checkpoints (this hook runs before the module's)
        for i in range(pl_module.n_stack):
            if i in pl_module.diverged:
                continue
            for cb in self.checkpoints[i].values():
                if not cb.monitor and self._due(cb, epoch):
                    self._save(trainer, pl_module, i, cb, None)
        self._log_epoch(trainer, pl_module, epoch)

    def on_train_end(self, trainer, pl_module) -> None:
        """A member's cadence checkpoint (``last``) also holds its final weights (``LastCheckpoint``), unless it was
        written at this step or the member diverged (read at the last epoch's end, in ``on_train_epoch_end``)."""
        if trainer.global_step == 0:
            return
        self._full = None
        for i in range(pl_module.n_stack):
            if i in pl_module.diverged:
                continue
            for cb in self.checkpoints[i].values():
                if not cb.monitor and cb._every_n_epochs and cb._last_global_step_saved != trainer.global_step:
                    self._save(trainer, pl_module, i, cb, None)

    @staticmethod
    def _due(cb: ModelCheckpoint, epoch: int) -> bool:
        every = cb._every_n_epochs or 0
        return every >= 1 and (epoch % every == 0)

    def _save(self, trainer, pl_module, i: int, cb: ModelCheckpoint, score) -> None:
        if self._full is None:
            # writes (does not load) the trainer's state; weights_only=False = with optimiser and loop state
            self._full = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        full = self._full
        path = Path(cb.dirpath) / f"{cb.filename}{cb.FILE_EXTENSION}"
        cb.last_model_path = str(path) if not cb.monitor else cb.last_model_path
        if score is not None:
            cb.best_model_score, cb.current_score = score, score
            cb.best_k_models = {str(path): score}
            cb.kth_best_model_path, cb.kth_value = str(path), score
        cb.best_model_path = str(path)
        cb._last_global_step_saved = trainer.global_step
        shapes = [p.shape for p in pl_module.parameters()]
        ckpt = {k: v for k, v in full.items() if k not in ("state_dict", "optimizer_states", "callbacks")}
        ckpt["state_dict"] = {k: v[i].clone() for k, v in full["state_dict"].items()}
        ckpt["optimizer_states"] = [slice_optimizer_state(o, i, shapes) for o in full["optimizer_states"]]
        if pl_module.lr_scale is not None:
            member_lr_state(ckpt, float(pl_module.lr_scale[i]))
        ckpt["callbacks"] = {c.state_key: c.state_dict() for c in self.checkpoints[i].values()}
        if self.throughput is not None:
            shared = self.throughput.state_dict()
            shared["images"] = shared["images"] // len(self.configs)
            ckpt["callbacks"][self.throughput.state_key] = shared
        ckpt["amortlab_config"] = self.configs[i]
        ckpt["torch_rng_state"] = pl_module.member_rng_state(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(ckpt, tmp)
        tmp.replace(path)

    def _log_epoch(self, trainer, pl_module, epoch: int) -> None:
        if self.log_every is None or (epoch % self.log_every and epoch != trainer.max_epochs):
            return
        seconds = time.perf_counter() - self._t0
        batch = getattr(trainer.datamodule, "batch_size", 0)
        rate = (trainer.global_step - self._step0) * batch / max(seconds, 1e-9)
        losses = getattr(pl_module, "last_losses", None)
        vals = [r.get("val_epoch/nll") for r in pl_module.val_results] if pl_module.val_results else []
        parts = [f"epoch {epoch}/{trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else '?'}",
                 f"{pl_module.n_stack} stacked models"]
        if losses is not None:
            parts.append("train -L_k (last step) " + " ".join(f"{v:.2f}" for v in losses.tolist()))
        if vals:
            parts.append("val_epoch/nll " + " ".join("-" if v is None else f"{v:.2f}" for v in vals))
        parts.append(f"{rate:,.0f} img/s in all")
        parts.append(f"{seconds:.1f} s")
        log.info(" | ".join(parts))

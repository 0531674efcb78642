"""``train.py stack.seeds=[s1,...,sN]``: N runs of one config, differing in seed, trained as one stacked computation
(with ``stack.key=K stack.values=[v1,...]`` also in one setting: members = values x seeds, ``amortlab.stack.values``).

Each member gets what its single run would write, in its own directory (``stack.dir``, default ``seed{seed}`` under the
run dir): ``.hydra/config.yaml`` and ``overrides.yaml`` (as if run alone), ``results.json`` (same format, plus
``stack``), ``checkpoints/best.ckpt`` and ``last.ckpt`` (single-run format: evaluable with ``train=false`` and resumable
alone with ``ckpt_path=``), and its own logger run: when training ends, the values its single run would have logged
during training (same keys, steps and ``epoch``; ``amortlab.stack.records.MemberLogs``), then the final evaluation at
the step where the single run logs it (W&B: one run per member, one after another). Training noise, data order and
initial weights are the member's single run's, so each member's numbers equal that run's to float tolerance
(tests/test_stack.py).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

from amortlab.build import (build_callbacks, build_logger, build_module, command_overrides, instantiate_group,
                            load_weights, quiet_lightning, run_name)
from amortlab.callbacks import EpochLog, ImagePanels, Throughput
from amortlab.data.fused import fused_fit
from amortlab.errors import AmortlabError, NonFiniteLossError
from amortlab.record import RunRecord, final_evaluation, sigterm_as_interrupt, summary
from amortlab.runlock import RunLock
from amortlab.stack.data import StackedData
from amortlab.stack.layers import member_state
from amortlab.stack.module import capture_rng, stack_method
from amortlab.stack.records import MemberLogs, MemberRecords
from amortlab.stack.values import apply_values, check_values
from amortlab.validate import check_config, check_data

log = logging.getLogger("amortlab")
OUTPUT_DIR = "${hydra:runtime.output_dir}"


def member_config(cfg: DictConfig, seed: int, out_dir: Path, setting: tuple[str, float] | None = None,
                  name: str | None = None) -> DictConfig:
    """The config of the member with ``seed`` (and ``setting`` = (key, value) when values are stacked): the run's
    config with those set, no stack, every path under the run dir (``${hydra:runtime.output_dir}``) moved to the
    member's dir, and ``name`` if given."""
    node = OmegaConf.to_container(cfg, resolve=False)

    def move(v):
        if isinstance(v, str):
            return v.replace(OUTPUT_DIR, str(out_dir))
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        if isinstance(v, list):
            return [move(x) for x in v]
        return v

    node = move(node)
    node["seed"] = int(seed)
    node["stack"] = {k: (cfg.stack.dir if k == "dir" else None) for k in cfg.stack}  # the single run's, in order
    if name is not None:
        node["name"] = name
    member = OmegaConf.create(node)
    if setting is not None:
        OmegaConf.update(member, setting[0], setting[1], merge=False)
    OmegaConf.set_struct(member, True)
    return member


def member_overrides(overrides: list[str], seed: int, setting: tuple[str, float] | None = None,
                     name: str | None = None) -> list[str]:
    """The command's overrides as the member's single run would have them (``seed=``, the stacked setting's
    ``key=value`` and ``name=`` when given, no ``stack.*``)."""
    own = {"stack", "seed"} | ({setting[0]} if setting else set()) | ({"name"} if name is not None else set())
    keep = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] not in own and not o.lstrip("+~").startswith(
        "stack.")]
    return [*keep, *([f"{setting[0]}={setting[1]!r}"] if setting else []), *([f"name={name}"] if name else []),
            f"seed={seed}"]


class Member(NamedTuple):
    """One stacked member: its seed, directory, (key, value) when values are stacked, and run name if set."""

    seed: int
    dir: Path
    setting: tuple[str, float] | None = None
    name: str | None = None


def member_plan(cfg: DictConfig, out_dir: Path) -> list[Member]:
    """The members: values x seeds, value-major."""
    seeds = [int(s) for s in cfg.stack.seeds]
    if cfg.stack.get("key") is None:
        return [Member(s, out_dir / str(cfg.stack.dir).format(seed=s)) for s in seeds]
    key, values = str(cfg.stack.key), [float(v) for v in cfg.stack["values"]]
    labels = list(cfg.stack.labels) if cfg.stack.get("labels") else [f"{key.rsplit('.', 1)[-1]}{v:g}" for v in values]
    root = out_dir / cfg.stack.root if cfg.stack.get("root") else out_dir
    own_name = cfg.get("name") is not None and not cfg.stack.get("labels")
    return [Member(s, root / label / str(cfg.stack.dir).format(seed=s), (key, v),
                   f"{cfg.name}-{label}" if own_name else f"{label}-s{s}")
            for v, label in zip(values, labels) for s in seeds]


def check_stackable(cfg: DictConfig) -> None:
    """Refuse, before anything is built, what a stacked fit cannot do exactly."""
    if not cfg.train or cfg.ckpt_path:
        raise AmortlabError("stack.seeds trains new models; a stacked run neither evaluates nor resumes a checkpoint "
                            "(train=false / ckpt_path). Resume or evaluate one member as a single run: "
                            "ckpt_path=<run dir>/seed<s>/checkpoints/last.ckpt, without stack.seeds.")
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    if devices not in (1, "1", "auto", None) or nodes not in (1, None) or "ddp" in str(cfg.trainer.get("strategy")):
        raise AmortlabError("stack.seeds runs the stacked models in one process on one device; drop trainer=ddp (or "
                            "run one stacked job per device).")
    if cfg.trainer.get("max_time") is not None:
        raise AmortlabError(
            f"trainer.max_time={cfg.trainer.max_time} is a wall-clock budget; stacked models would share one, so each "
            f"would train for an unknown part of its single run (the numbers would not be that run's). Train one run "
            f"per seed (drop stack.seeds; in sweep.py: stack=false, which a study does by itself for such settings), "
            f"or bound training by progress instead: trainer.max_time=null with trainer.max_epochs or "
            f"trainer.max_steps.")
    if cfg.trainer.get("gradient_clip_val"):
        raise AmortlabError("trainer.gradient_clip_val clips the norm of all stacked models' gradients together, "
                            "which couples them; drop it or train one run per seed (no stack.seeds).")
    if cfg.trainer.get("accumulate_grad_batches", 1) not in (1, None):
        raise AmortlabError("stack.seeds does not combine with trainer.accumulate_grad_batches; drop one of them.")


CPU_STACK_ROWS = 1000  # decoder rows per model per step above which stacking stopped paying on a 2-core CPU


def warn_large_steps(cfg: DictConfig, rows: int, n: int) -> None:
    """Warn when the stacked models train on a CPU with large steps (``rows`` = k x batch per model), where one
    batched computation is no faster than N runs one after another (README, Benchmarks)."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and rows > CPU_STACK_ROWS:
        log.warning(
            "amortlab: stacking %d models whose training step is k x batch = %d decoder rows each, on a CPU. "
            "Stacking pays for small steps only: on 2 cores at batch 100, 10 stacked models trained 1.8x faster "
            "than one run at a time at k = 1 (100 rows), 0.95x at k = 8 and 0.67x at k = 64 (the stacked "
            "activations no longer fit in cache). For this setting prefer one run per seed (drop stack.seeds; "
            "sweep.py ... stack=false); the numbers are the same either way.", n, rows)


def run_stacked(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Train the members of ``cfg.stack.seeds`` as one stacked computation, then evaluate and record each one.
    Returns ``{"status", "members": [results per member], "metrics": {}}``."""
    out_dir = Path(out_dir)
    quiet_lightning()
    requested = list(cfg.stack.seeds)
    n_values = len(cfg.stack["values"] or []) if cfg.stack.get("key") else 1
    if len(requested) * max(n_values, 1) < 2 or len(set(requested)) != len(requested):
        raise AmortlabError(f"stack.seeds={requested} needs distinct seeds, two or more of them unless stack.values "
                            f"gives two or more values (e.g. stack.seeds=[0,1,2,3]).")
    check_values(cfg)  # before the members' directories are named from the values
    overrides = command_overrides()
    plan = []
    for member in member_plan(cfg, out_dir):
        d = member.dir
        if cfg.skip_if_done and (d / "results.json").is_file() and '"status": "ok"' in (d / "results.json").read_text():
            print(f"amortlab: {d} already holds a finished run (skip_if_done=true); not running it again.")
            continue
        plan.append(member)
    if not plan:
        return {"status": "ok", "members": [], "metrics": {}}
    dirs = [m.dir for m in plan]
    with contextlib.ExitStack() as stack:
        for d in dirs:
            stack.enter_context(RunLock(d))
        records = [RunRecord(d, True) for d in dirs]
        try:
            check_config(cfg)
            check_stackable(cfg)
            return _run_stacked(cfg, plan, records, overrides, out_dir)
        except BaseException as e:
            for r in records:
                if r.results["status"] in ("running",):
                    r.fail(e)
            raise
        finally:
            for r in records:
                r.close_logger()


def _run_stacked(cfg: DictConfig, plan: list[Member], records: list[RunRecord], overrides: list[str],
                 out_dir: Path) -> dict[str, Any]:
    seeds, dirs = [m.seed for m in plan], [m.dir for m in plan]
    values = [m.setting[1] for m in plan] if cfg.stack.get("key") else None
    with open_dict(cfg):
        if cfg.data_dir is None:
            from amortlab.data.download import default_data_dir
            cfg.data_dir = default_data_dir()
        if cfg.trainer.get("enable_progress_bar") is None:
            cfg.trainer.enable_progress_bar = sys.stderr.isatty()
    cfgs = [member_config(cfg, s, d, setting, name) for s, d, setting, name in plan]
    for c, (s, d, setting, name) in zip(cfgs, plan):
        (d / ".hydra").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(c, d / ".hydra" / "config.yaml")
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(member_overrides(overrides, s, setting, name)))

    members, rng_states, dm = [], [], None
    for c, r in zip(cfgs, records):
        L.seed_everything(c.seed, workers=True, verbose=False)
        member_dm = instantiate_group(c.dataset, "dataset")
        member_dm.setup("fit")
        dm = dm or member_dm
        r.results["data"] = member_dm.info()
        check_data(c, r.results["data"]["train_size"])
        with open_dict(c):
            c.x_dim = member_dm.x_dim
            c.image_shape = list(member_dm.image_shape)
            c.step_dim = getattr(member_dm, "step_dim", None)
        module = build_module(c)
        module.init_output_bias(member_dm.train_mean)
        members.append(module)
        rng_states.append(capture_rng())
        r.results.update(config=module.run_config, tags=module.tags(), axes=module.axes(),
                         estimator=module.estimator.name,
                         stack={"seeds": list(dict.fromkeys(seeds)), "index": len(members) - 1, "run_dir": str(out_dir),
                                **({"key": cfg.stack.key, "values": values} if values else {})})
        del member_dm
    stacked = stack_method(members, rng_states)
    warn_large_steps(cfgs[0], members[0].k_train * dm.batch_size, len(members))
    if values:
        apply_values(stacked, str(cfg.stack.key), values)

    validates = cfg.trainer.get("limit_val_batches") not in (0, 0.0)
    member_cbs = [build_callbacks(c, validates) for c in cfgs]
    ckpt_cbs = [{k: v for k, v in cbs.items() if isinstance(v, ModelCheckpoint)} for cbs in member_cbs]
    for r, cbs in zip(records, ckpt_cbs):
        r.callbacks = cbs
    epoch_log = next((cb for cb in member_cbs[0].values() if isinstance(cb, EpochLog)), None)
    throughput = Throughput()
    records_cb = MemberRecords(ckpt_cbs, [m.run_config for m in members], [d.name for d in dirs],
                               epoch_log.every if epoch_log else None, throughput)
    member_logs = MemberLogs(len(members), stacked.diverged) if cfg.logger else False
    # per-run callbacks are replaced (checkpoints, throughput, epoch line: MemberRecords) or not drawn (image
    # panels); every other one (annealing, a user's +callbacks.NAME) sees the stacked module
    shared = [cb for cb in member_cbs[0].values()
              if not isinstance(cb, (ModelCheckpoint, Throughput, EpochLog, ImagePanels))]
    fit_data, fused = fused_fit(StackedData(dm, [c.dataset.seed for c in cfgs]), stacked.fused_steps, cfgs[0].trainer)
    trainer: L.Trainer = instantiate_group(cfgs[0].trainer, "trainer", logger=member_logs, enable_checkpointing=False,
                                           callbacks=[throughput, records_cb, *shared], **fused)
    log.info("amortlab: training %d models as one stacked computation (seeds %s%s) -> %s", len(seeds), seeds,
             f", {cfg.stack.key} {values}" if values else "",
             ", ".join(str(d) for d in dirs))
    t0 = time.perf_counter()
    with sigterm_as_interrupt():
        try:
            trainer.fit(stacked, datamodule=fit_data)
        except SystemExit:
            if not trainer.interrupted:
                raise
    fit_s = round(time.perf_counter() - t0, 3)
    aggregate = throughput.images_per_s
    # where the single run's trainer stands after fitting: its final evaluation is logged at this step and epoch
    fit_state = Progress(trainer.fit_loop.epoch_loop._batches_that_stepped, trainer.current_epoch)

    out: list[dict[str, Any]] = []
    for i, (c, module, record) in enumerate(zip(cfgs, members, records)):
        calls = member_logs.calls[i] if member_logs else []
        res = record.results
        res["timing"].update(fit_s=fit_s, epochs=trainer.current_epoch, steps=trainer.global_step,
                             train_images_per_s=round(aggregate / len(seeds), 1) if aggregate else None,
                             stack_images_per_s=round(aggregate, 1) if aggregate else None)
        if trainer.interrupted:
            last = (record.callbacks.get("checkpoint_last") or ModelCheckpoint()).last_model_path or None
            record.fail(KeyboardInterrupt())
            res["error"] = (f"Training was interrupted (Ctrl-C or SIGTERM) at epoch {trainer.current_epoch}, step "
                            f"{trainer.global_step}; not evaluated. "
                            + (f"Resume this member alone with ckpt_path={last}." if last else
                               "No checkpoint was written yet."))
            _replay(c, module, record, calls, fit_state)
            record.write()
            record.close_logger()
            out.append(res)
            continue
        if i in stacked.diverged:
            _replay(c, module, record, calls, fit_state)
            record.fail(NonFiniteLossError(stacked.diverged[i]))
            record.close_logger()
            out.append(res)
            continue
        module.load_state_dict(member_state(stacked, i))
        out.append(_finish_member(c, module, dm, record, calls, fit_state))
        record.close_logger()  # one logger run open at a time (W&B: one run per process at a time)
    status = "interrupted" if trainer.interrupted else ("ok" if all(r["status"] == "ok" for r in out) else "failed")
    if trainer.interrupted:
        print(f"\namortlab: interrupted; {out[0].get('error', '')}", file=sys.stderr, flush=True)
    return {"status": status, "members": out, "metrics": {}}


class Progress(NamedTuple):
    """The logging position of a trainer after fitting: Lightning's step axis (optimiser steps taken) and epoch."""

    step: int
    epoch: int


def _replay(cfg: DictConfig, module, record: RunRecord, calls, fit_state: Progress) -> L.Trainer:
    """The member's logger, holding what its single run logged during training (``calls``: ``MemberLogs.calls[i]``);
    a trainer to evaluate the member with, logging to it at the step and epoch ``fit_state`` (the single run
    evaluates with its fitted trainer, so it logs there)."""
    logger = record.logger = build_logger(cfg, module, record.results["data"]["name"])
    if logger:
        logger.log_hyperparams(module.run_config)
        for metrics, step in calls:
            logger.log_metrics(metrics, step=step)
    trainer = instantiate_group(cfg.trainer, "trainer", logger=logger, callbacks=[], enable_checkpointing=False)
    trainer.fit_loop.epoch_loop._batches_that_stepped = fit_state.step  # Lightning's step axis for logging
    trainer.fit_loop.epoch_progress.current.completed = fit_state.epoch  # trainer.current_epoch
    return trainer


def _finish_member(cfg: DictConfig, module, dm, record: RunRecord, calls, fit_state: Progress) -> dict[str, Any]:
    res, timing = record.results, record.results["timing"]
    trainer = _replay(cfg, module, record, calls, fit_state)
    ckpts = {name.removeprefix("checkpoint_"): cb.best_model_path or None for name, cb in record.callbacks.items()}
    best = ckpts.get("best") or ""
    eval_ckpt = best if (cfg.evaluation.ckpt == "best" and best) else None
    res["checkpoints"] = {"evaluated": eval_ckpt or "final weights", **ckpts}
    if cfg.test:
        if eval_ckpt:
            load_weights(module, eval_ckpt)
        res["metrics"].update(final_evaluation(trainer, module, dm, cfg, timing))
    res["status"] = "ok"
    if cfg.test:
        module.estimator.after_run(module, dm, res["metrics"], record.out_dir, run_name(cfg, module), record.logger,
                                   int(cfg.evaluation.seed))
    path = record.write()
    if logging.getLogger().handlers:  # Hydra's logging: console and train.log
        log.info(summary(res, path))
    else:
        print(summary(res, path), flush=True)
    return res

#!/usr/bin/env python
"""Run a named study (a grid of settings x seeds) through one Hydra multirun of train.py, then collect every run's
results.json into table.md / table.csv and plots.

    python sweep.py study=air_strength                          # conf/sweep/air_strength.yaml, its launcher
    python sweep.py study=air_strength launcher=joblib hydra.launcher.n_jobs=4 seeds=[0,1,2]
    python sweep.py study=air_table1_mnist launcher=submitit_slurm hydra.launcher.partition=gpu
    python sweep.py study=air_strength dry_run=true             # print the settings and commands, launch nothing
    python sweep.py study=air_strength collect_only=true        # only (re)write the tables and plots
    python sweep.py study_file=my_study.yaml out_dir=/tmp/s trainer.max_epochs=5   # extra overrides go to every run

A study yaml (conf/sweep/NAME.yaml; see docs/sweep.md):

    name: air_strength
    base: [experiment=air_mnist_reduced, evaluation=iw_svi]   # train.py overrides for every run
    seeds: [0, 1]
    grid: {importance_samples: [k1, k8, k64]}                  # crossed with every setting
    settings:                                                  # one entry per setting; list values expand
      - {encoder_regularizer: none}
      - {encoder_regularizer: denoising, encoder_regularizer.sigma: [0.1, 0.2, 0.4]}
    launcher: basic                                            # basic | joblib | submitit_local | submitit_slurm
    metrics: [test/nll, test/neg_elbo, test/inference_gap]

Layout of out_dir (default sweeps/<name>):
    settings/setting/<id>.yaml   one `# @package _global_` config per setting (its overrides, W&B tags and name)
    runs/<id>/seed<s>/           one train.py run dir per (setting, seed): results.json, checkpoints, train.log
    table.md, table.csv          one row per setting: axes, n_seeds, n_failed, <metric>_mean, <metric>_std
    best.md                      (with `select_by:`) per series and k, the setting with the best select_by mean
    failures.md                  failed or crashed runs and their errors
    nll_vs_strength.png, gap_vs_strength.png
    study.json                   the expanded study (settings, series, commands)
"""
from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parent
CONF = ROOT / "conf"
STUDY_DIR = CONF / "sweep"

# sweep.py's launcher names -> options of the hydra/launcher group (conf/hydra/launcher/*.yaml wrap the plugins)
LAUNCHERS = {"basic": "basic", "joblib": "local_parallel", "submitit_local": "local_submitit",
             "submitit_slurm": "slurm"}
# launchers whose multirun process is the only thing running the jobs: when it dies (a run that kills its process,
# e.g. out of memory), the jobs it never started can be launched again at once without duplicating queued ones
RELAUNCHABLE = {"basic", "local_parallel"}

SWEEP_KEYS = {
    "study": "name of a study in conf/sweep/ (without .yaml)",
    "study_file": "path of a study yaml anywhere (instead of study=)",
    "out_dir": "output folder (default sweeps/<study name>)",
    "launcher": "basic | joblib | submitit_local | submitit_slurm (default: the study's, else basic)",
    "seeds": "seeds of every setting, e.g. seeds=[0,1,2] (default: the study's)",
    "dry_run": "true: print settings, run states and commands; launch nothing, write nothing",
    "collect_only": "true: launch nothing, only write the tables and plots",
    "retry_failed": "true: also relaunch runs whose results.json says failed (default: only crashed ones)",
    "resume": "false: relaunch crashed runs from scratch instead of from their last.ckpt (default true)",
}
STUDY_KEYS = {"name", "description", "base", "seeds", "grid", "settings", "launcher", "launcher_overrides",
              "metrics", "select_by", "tags"}
AXES = ("method", "regularizer", "strength", "k")
# a method's own iteration count (results.json axes): refinement steps K, iterations T, mixture components M
METHOD_STEPS = ("K", "T", "M")
DEFAULT_METRIC_ORDER = ("test/nll", "test/nll_iwae", "test/neg_elbo", "test/inference_gap", "val/nll",
                        "val/nll_iwae", "val/neg_elbo", "val/inference_gap")
SUBDIR = "${hydra:runtime.choices.setting}/seed${seed}"


class SweepError(Exception):
    """A user-facing error: printed as one paragraph, exit status 2."""


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------

def _yaml_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise SweepError(f"{key}={value!r} is not a boolean: write {key}=true or {key}=false.")


def parse_args(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Split ``key=value`` arguments into sweep.py options and train.py overrides (everything else)."""
    opts: dict[str, Any] = {}
    extra: list[str] = []
    for arg in argv:
        if arg in ("-h", "--help"):
            raise SweepError("usage")
        if arg in ("-m", "--multirun") or arg.startswith("--"):
            raise SweepError(f"sweep.py takes no '{arg}' flag: it always runs train.py as a Hydra multirun. Arguments "
                             f"are key=value: sweep.py options ({', '.join(SWEEP_KEYS)}) or train.py overrides.")
        key, sep, value = arg.partition("=")
        if key in SWEEP_KEYS:
            if not sep:
                raise SweepError(f"'{arg}' needs a value: {key}=... ({SWEEP_KEYS[key]}).")
            opts[key] = value
            continue
        if not sep and not arg.startswith("~"):
            raise SweepError(f"'{arg}' is not key=value. sweep.py takes its own options ({', '.join(SWEEP_KEYS)}) "
                             f"and train.py overrides such as trainer.max_epochs=5 or hydra.launcher.n_jobs=4.")
        bare = key.lstrip("+~")
        if bare == "seed":
            raise SweepError(f"'{arg}': the seeds of a study are set with seeds=[0,1,...], not seed=.")
        if bare in ("hydra/launcher",):
            raise SweepError(f"'{arg}': pick the launcher with launcher=({'|'.join(LAUNCHERS)}); its keys with "
                             f"hydra.launcher.KEY=VALUE.")
        if bare.startswith(("hydra.sweep", "hydra.run", "hydra.searchpath", "hydra.mode")) or bare == "setting":
            raise SweepError(f"'{arg}': sweep.py sets {bare} itself (runs go to <out_dir>/runs/<setting>/seed<s>); "
                             f"use out_dir= to move them.")
        extra.append(arg)
    for key in ("dry_run", "collect_only", "retry_failed", "resume"):
        if key in opts:
            opts[key] = _as_bool(key, _yaml_value(opts[key]))
    if "seeds" in opts:
        opts["seeds"] = _parse_seeds(opts["seeds"])
    return opts, extra


def _parse_seeds(value: Any) -> list[int]:
    v = _yaml_value(value) if isinstance(value, str) else value
    if isinstance(v, str):
        v = [_yaml_value(s) for s in v.strip("[]").split(",") if s.strip()]
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(s, int) and not isinstance(s, bool) for s in v):
        raise SweepError(f"seeds={value!r}: write a list of integers, e.g. seeds=[0,1,2].")
    if len(set(v)) != len(v):
        raise SweepError(f"seeds={value!r} repeats a seed.")
    return list(v)


def override_key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


# ----------------------------------------------------------------------------------------------------------------
# studies and their settings
# ----------------------------------------------------------------------------------------------------------------

def available_studies(search_dir: Path = STUDY_DIR) -> list[str]:
    return sorted(p.stem for p in Path(search_dir).glob("*.yaml"))


def load_study(name: str | None = None, study_file: str | Path | None = None,
               search_dir: Path = STUDY_DIR) -> dict[str, Any]:
    import yaml

    if study_file:
        path = Path(study_file)
        if not path.is_file():
            raise SweepError(f"study_file={study_file} does not exist. Point it at a study yaml (see conf/sweep/ for "
                             f"examples).")
    elif name:
        path = Path(search_dir) / f"{name}.yaml"
        if not path.is_file():
            have = available_studies(search_dir)
            raise SweepError(f"No study '{name}' in {search_dir}. Available: {', '.join(have) or '(none)'}. Run one "
                             f"with `python sweep.py study=NAME`, or pass study_file=PATH for a study yaml elsewhere.")
    else:
        have = available_studies(search_dir)
        raise SweepError(f"Which study? Pass study=NAME (one of: {', '.join(have) or '(none)'}) or "
                         f"study_file=PATH.")
    try:
        study = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(study, dict):
        raise SweepError(f"{path} must be a mapping with keys {', '.join(sorted(STUDY_KEYS))}.")
    bad = sorted(set(study) - STUDY_KEYS)
    if bad:
        raise SweepError(f"{path}: unknown key(s) {', '.join(bad)}. A study has: {', '.join(sorted(STUDY_KEYS))}.")
    study.setdefault("name", path.stem)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(study["name"])):
        raise SweepError(f"{path}: name {study['name']!r} may only use letters, digits, '_', '.', '-'.")
    study["_path"] = str(path)
    for key in ("base", "metrics", "tags"):
        value = study.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SweepError(f"{path}: '{key}' must be a list of strings, e.g. {key}: [a, b].")
        study[key] = value
    if not isinstance(study.get("grid") or {}, dict):
        raise SweepError(f"{path}: 'grid' must map override keys to lists, e.g. grid: {{importance_samples: [k1, k8]}}.")
    settings = study.get("settings") or [{}]
    if not isinstance(settings, list) or not all(isinstance(s, dict) for s in settings):
        raise SweepError(f"{path}: 'settings' must be a list of mappings (override key -> value or list of values).")
    study["settings"] = settings
    study["grid"] = study.get("grid") or {}
    study["seeds"] = _parse_seeds(study.get("seeds", [0]))
    return study


@dataclass
class Setting:
    id: str
    overrides: dict[str, Any]                 # override key -> value (YAML value), setting entry then grid
    series: str                               # one line in the plots (the setting entry without its expanded lists)
    varied: list[str] = field(default_factory=list)  # keys that the setting's lists expanded (the strength axis)

    def override_strings(self) -> list[str]:
        return [f"{k}={_override_value(v)}" for k, v in self.overrides.items()]


def _override_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return format(v, "g")
    if v is None:
        return "null"
    if isinstance(v, list):
        return "-".join(_fmt(x) for x in v)
    return str(v)


def is_group(key: str) -> bool:
    """True when ``key`` selects a config group option (``encoder_regularizer: denoising``), not a value."""
    key = key.lstrip("+")
    return "/" in key or (CONF / key).is_dir()


def _part(key: str, value: Any) -> str:
    if is_group(key):
        return _fmt(value)
    return key.lstrip("+~").rsplit(".", 1)[-1] + _fmt(value)


def _sanitize(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "base"
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|true|false|null|nan|inf", s, flags=re.I):
        s = "s" + s  # Hydra would parse a bare number / bool as such, not as an option name
    return s


def expand(study: dict[str, Any]) -> list[Setting]:
    """settings x grid -> Settings with stable ids (e.g. ``denoising_sigma0.2_k8``)."""
    grid = study.get("grid") or {}
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise SweepError(f"study {study['name']}: grid '{k}' must be a non-empty list of values.")
    grid_items = list(grid.items())
    out: list[Setting] = []
    for entry in study["settings"]:
        entry = dict(entry)
        label = entry.pop("id", None)
        for k, v in entry.items():
            if isinstance(v, list) and not v:
                raise SweepError(f"study {study['name']}: setting {entry}: '{k}' is an empty list.")
            if k in grid:
                raise SweepError(f"study {study['name']}: '{k}' is in both a setting and the grid; keep it in one.")
        scalars = [(k, v) for k, v in entry.items() if not isinstance(v, list)]
        lists = [(k, v) for k, v in entry.items() if isinstance(v, list)]
        series = _sanitize(str(label)) if label is not None else _sanitize("_".join(_part(k, v) for k, v in scalars))
        for combo in itertools.product(*[v for _, v in lists]):
            chosen = dict(entry)
            chosen.update({k: c for (k, _), c in zip(lists, combo)})
            for gcombo in itertools.product(*[v for _, v in grid_items]):
                overrides = dict(chosen)
                overrides.update({k: c for (k, _), c in zip(grid_items, gcombo)})
                parts = [str(label)] if label is not None else [_part(k, v) for k, v in scalars]
                parts += [_part(k, c) for (k, _), c in zip(lists, combo)]
                parts += [_part(k, c) for (k, _), c in zip(grid_items, gcombo)]
                out.append(Setting(id=_sanitize("_".join(p for p in parts if p)), overrides=overrides, series=series,
                                   varied=[k for k, _ in lists]))
    seen: dict[str, Setting] = {}
    for s in out:
        if s.id in seen:
            raise SweepError(f"study {study['name']}: two settings get the id '{s.id}' ({seen[s.id].overrides} and "
                             f"{s.overrides}). Give the setting entries distinct `id:` labels.")
        seen[s.id] = s
    return out


def setting_yaml(setting: Setting, study_name: str, extra: dict[str, Any] | None = None) -> str:
    """The ``# @package _global_`` config of one setting: group choices as defaults overrides, values nested."""
    from omegaconf import OmegaConf

    defaults: list[str] = []
    values: dict[str, Any] = {}
    for key, value in setting.overrides.items():
        if key.startswith("~"):
            raise SweepError(f"setting {setting.id}: deletions ('{key}') cannot be written into a setting; put them "
                             f"in the study's base overrides.")
        bare = key.lstrip("+")
        if is_group(bare):
            defaults.append(f"override /{bare}: {_override_value(value) if value is not None else 'null'}")
            continue
        node = values
        parts = bare.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SweepError(f"setting {setting.id}: '{key}' conflicts with another key of the setting.")
        node[parts[-1]] = value
    values.update(extra or {})
    lines = ["# @package _global_",
             f"# Written by sweep.py (study {study_name}, setting {setting.id}); rewritten on every sweep.py call.",
             f"#   {' '.join(setting.override_strings())}"]
    if defaults:
        lines.append("defaults:")
        lines += [f"  - {d}" for d in defaults]
    if values:
        lines.append(OmegaConf.to_yaml(OmegaConf.create(values)).rstrip())
    return "\n".join(lines) + "\n"


def write_setting_files(settings: list[Setting], settings_dir: Path, study_name: str,
                        extras: dict[str, dict[str, Any]] | None = None) -> None:
    group_dir = settings_dir / "setting"
    group_dir.mkdir(parents=True, exist_ok=True)
    keep = {f"{s.id}.yaml" for s in settings}
    for old in group_dir.glob("*.yaml"):
        if old.name not in keep:
            old.unlink()
    for s in settings:
        text = setting_yaml(s, study_name, (extras or {}).get(s.id))
        path = group_dir / f"{s.id}.yaml"
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)


def _searchpath(settings_dir: Path) -> str:
    return f"hydra.searchpath=[{_quote('file://' + str(settings_dir))}]"


def _quote(value: str) -> str:
    """A path as a Hydra override value: bare when it only has safe characters, else double-quoted."""
    if re.fullmatch(r"[A-Za-z0-9_./:-]+", value):
        return value
    if '"' in value or "\\" in value:
        raise SweepError(f"path {value!r} contains a quote or backslash; pick an out_dir without them.")
    return f'"{value}"'



def compose_settings(settings: list[Setting], settings_dir: Path, run_overrides: list[str], seed: int,
                     study_name: str) -> dict[str, dict[str, Any]]:
    """Compose every setting's train.py config once (catches a wrong key or option before anything is launched) and
    return the extra values its setting file gets: W&B tags (the composed ones + ``study:NAME``) and run name."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    import amortlab.config  # noqa: F401  (the typed schema)

    job_overrides = [o for o in run_overrides if not override_key(o).startswith("hydra")]
    extras: dict[str, dict[str, Any]] = {}
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            for s in settings:
                overrides = [_searchpath(settings_dir), f"+setting={s.id}", *job_overrides, f"seed={seed}"]
                try:
                    cfg = compose("config", overrides=overrides)
                except Exception as e:  # noqa: BLE001  (Hydra raises many types; all mean "this does not compose")
                    cause = f" ({e.__cause__})" if e.__cause__ and str(e.__cause__) not in str(e) else ""
                    msg = " ".join(f"{e}{cause}".split("Config search path")[0].split()).rstrip(".")
                    raise SweepError(
                        f"Setting '{s.id}' of study {study_name} does not compose: {msg}. Its overrides: "
                        f"{' '.join(s.override_strings()) or '(none)'}; for every run: {' '.join(job_overrides)}. "
                        f"Fix the study yaml or the override (print a config with `python train.py --cfg job "
                        f"OVERRIDES`).") from None
                tags = [t for t in OmegaConf.to_container(cfg.tags, resolve=False) if t != f"study:{study_name}"]
                extra: dict[str, Any] = {"tags": [*tags, f"study:{study_name}"]}
                if cfg.get("name") is None:
                    extra["name"] = f"{s.id}-s${{seed}}"
                extras[s.id] = extra
    finally:
        GlobalHydra.instance().clear()
    return extras


# ----------------------------------------------------------------------------------------------------------------
# run states and launching
# ----------------------------------------------------------------------------------------------------------------

def run_dir(out_dir: Path, setting_id: str, seed: int) -> Path:
    return Path(out_dir) / "runs" / setting_id / f"seed{seed}"


def read_results(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_state(d: Path) -> str:
    """``ok``; ``failed`` (results.json with status failed: an error such as a NaN loss, which a rerun would repeat);
    ``crashed`` (a dir without results.json: killed, timed out, out of memory, or still running; or status
    ``interrupted``); ``new`` (no dir)."""
    r = d / "results.json"
    if r.is_file():
        res = read_results(r)
        status = res.get("status") if res else None
        return {"ok": "ok", "interrupted": "crashed", "running": "crashed"}.get(status, "failed")
    return "crashed" if d.is_dir() else "new"


@dataclass
class Launch:
    settings: list[str]
    seeds: list[int]
    resume_from: str | None = None  # last.ckpt of a crashed run (then one setting, one seed)

    def pairs(self) -> list[tuple[str, int]]:
        return [(s, seed) for s in self.settings for seed in self.seeds]


def plan_launches(pairs: list[tuple[str, int]], out_dir: Path, resume: bool = True) -> list[Launch]:
    """Group the (setting, seed) pairs to run into as few multiruns as possible: settings sharing the same set of
    seeds to run go in one multirun; a crashed run with a last.ckpt is resumed from it in its own multirun."""
    order = {p: i for i, p in enumerate(pairs)}
    by_setting: dict[str, list[int]] = {}
    launches: list[Launch] = []
    for sid, seed in pairs:
        d = run_dir(out_dir, sid, seed)
        ckpt = d / "checkpoints" / "last.ckpt"
        if resume and run_state(d) == "crashed" and ckpt.is_file():
            launches.append(Launch([sid], [seed], resume_from=str(ckpt)))
        else:
            by_setting.setdefault(sid, []).append(seed)
    groups: dict[tuple[int, ...], list[str]] = {}
    for sid, seeds in by_setting.items():
        groups.setdefault(tuple(seeds), []).append(sid)
    launches = [Launch(sids, list(seeds)) for seeds, sids in groups.items()] + launches
    launches.sort(key=lambda l: min(order[p] for p in l.pairs()))
    return launches


def launch_command(launch: Launch, out_dir: Path, run_overrides: list[str], launcher: str,
                   launcher_overrides: list[str], study_name: str, settings_dir: Path | None = None) -> list[str]:
    settings_dir = settings_dir or out_dir / "settings"
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", _searchpath(settings_dir),
           f"+setting={','.join(launch.settings)}", f"seed={','.join(str(s) for s in launch.seeds)}",
           *run_overrides]
    if launch.resume_from:
        cmd.append(f"ckpt_path={_quote(launch.resume_from)}")
    cmd += ["skip_if_done=true", f"hydra.sweep.dir={_quote(str(out_dir / 'runs'))}",
            f"hydra.sweep.subdir={SUBDIR}", f"hydra/launcher={LAUNCHERS.get(launcher, launcher)}",
            *launcher_overrides]
    return cmd


def _started_since(d: Path, t0: float) -> bool:
    cfg = d / ".hydra" / "config.yaml"
    return cfg.is_file() and cfg.stat().st_mtime >= t0 - 1.0


def _recorded_overrides(d: Path) -> list[str] | None:
    import yaml

    try:
        return [str(o) for o in yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text()) or []]
    except (OSError, ValueError, yaml.YAMLError):
        return None


def _job_overrides(setting_id: str, seed: int, run_overrides: list[str]) -> set[str]:
    return _normalized([f"+setting={setting_id}", f"seed={seed}", "skip_if_done=true",
                        *(o for o in run_overrides if not override_key(o).startswith("hydra"))])


def _normalized(overrides: Iterable[str]) -> set[str]:
    """Overrides as Hydra reads them (Hydra records evaluation.val=false as evaluation.val=False)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out: set[str] = set()
    parser = OverridesParser.create()
    for o in overrides:
        if override_key(o) == "ckpt_path":
            continue
        try:
            parsed = parser.parse_override(o)
            out.add(f"{parsed.get_key_element()}={parsed.value()!r}")
        except Exception:  # noqa: BLE001  (compare unparsable ones verbatim)
            out.add(o)
    return out


@contextlib.contextmanager
def _lock(out_dir: Path):
    import fcntl

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".sweep.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SweepError(f"Another sweep.py is launching runs into {out_dir} right now; wait for it (or use "
                             f"collect_only=true to only write the tables).") from None
        yield


# ----------------------------------------------------------------------------------------------------------------
# collection
# ----------------------------------------------------------------------------------------------------------------

def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _axes_from_config(d: Path, results: dict[str, Any] | None) -> dict[str, Any]:
    """Axes of a run without results.json ``axes`` (older or crashed runs): from its config and Hydra's choices."""
    import yaml

    axes: dict[str, Any] = {}
    cfg = (results or {}).get("config")
    if cfg is None:
        try:
            cfg = yaml.safe_load((d / ".hydra" / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            cfg = None
    try:
        choices = yaml.safe_load((d / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"]["choices"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        choices = {}
    if isinstance(cfg, dict):
        k = (cfg.get("importance_samples") or {}).get("train")
        axes["k"] = k if isinstance(k, int) else None
        reg = (cfg.get("encoder_regularizer") or {}).get("_target_", "")
        axes["regularizer"] = choices.get("encoder_regularizer") or (
            "none" if reg.endswith(".EncoderRegularizer") else reg.rsplit(".", 1)[-1].lower() or None)
    axes.setdefault("regularizer", choices.get("encoder_regularizer"))
    axes["method"] = choices.get("inference")
    axes["strength"] = None
    return axes


def _seed_of(d: Path) -> int | str:
    m = re.fullmatch(r"seed(-?\d+)", d.name)
    return int(m.group(1)) if m else d.name


def collect(out_dir: str | Path, metrics: list[str] | None = None,
            expected: dict[str, list[int]] | None = None) -> list[dict[str, Any]]:
    """Every ``<out_dir>/runs/<setting>/seed<s>/results.json`` -> one row per setting.

    A row: ``setting``, ``series``, the axes (method, regularizer, strength, k; from results.json ``axes``, else
    from the run's config), ``n_seeds`` (runs with status ok), ``n_failed`` (runs with another status, run dirs
    without results.json, and, with ``expected`` = {setting: [seeds]}, expected runs that never started),
    ``seeds``, ``failures`` ([(seed, message, dir)]), and ``<metric>_mean`` / ``<metric>_std`` (sample std, n - 1;
    None for fewer than 2 values) for ``metrics`` (default: every numeric metric found). With ``expected`` only those
    settings and seeds are read.
    """
    out_dir = Path(out_dir)
    runs_dir = out_dir / "runs"
    manifest = read_results(out_dir / "study.json") or {}
    series_of = {s["id"]: s.get("series") for s in manifest.get("settings", [])}
    param_of = {s["id"]: ",".join(v.rsplit(".", 1)[-1] for v in s.get("varied") or [])
                for s in manifest.get("settings", [])}
    dirs: dict[str, list[Path]] = {}
    if runs_dir.is_dir():
        for sdir in sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if expected is not None and sdir.name not in expected:
                continue
            runs = sorted((p for p in sdir.iterdir() if p.is_dir() and p.name.startswith("seed")),
                          key=lambda p: (str(type(_seed_of(p))), _seed_of(p)))
            if expected is not None:
                runs = [p for p in runs if _seed_of(p) in expected[sdir.name]]
            dirs[sdir.name] = runs
    for sid in expected or {}:
        dirs.setdefault(sid, [])

    rows: list[dict[str, Any]] = []
    found_metrics: list[str] = []
    for sid, runs in dirs.items():
        values: dict[str, list[float]] = {}
        axes: dict[str, Any] | None = None
        fallback_axes: dict[str, Any] | None = None
        ok_seeds: list[Any] = []
        failures: list[tuple[Any, str, str]] = []
        for d in runs:
            res = read_results(d / "results.json")
            if res is not None and axes is None and isinstance(res.get("axes"), dict):
                axes = res["axes"]
            if fallback_axes is None:
                fallback_axes = _axes_from_config(d, res)
            if res is None:
                why = ("results.json unreadable" if (d / "results.json").exists()
                       else "no results.json: the run crashed, was killed or is still running")
                failures.append((_seed_of(d), why, str(d)))
                continue
            if res.get("status") != "ok":
                failures.append((_seed_of(d), f"status {res.get('status')!r}: {res.get('error') or 'no message'}",
                                 str(d)))
                continue
            ok_seeds.append(_seed_of(d))
            for key, v in (res.get("metrics") or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    values.setdefault(key, []).append(float(v))
                    if key not in found_metrics:
                        found_metrics.append(key)
        started = {_seed_of(d) for d in runs}
        for seed in (expected or {}).get(sid, []):
            if seed not in started:
                failures.append((seed, "never started (launch it by running the study again)",
                                 str(run_dir(out_dir, sid, seed))))
        axes = {**(fallback_axes or {a: None for a in AXES}), **(axes or {})}
        row: dict[str, Any] = {"setting": sid, "series": series_of.get(sid) or axes.get("regularizer") or sid,
                               **{a: axes.get(a) for a in AXES}, "strength_param": param_of.get(sid) or None,
                               "steps": next(((key, axes[key]) for key in METHOD_STEPS if axes.get(key) is not None),
                                             None),
                               "n_seeds": len(ok_seeds),
                               "n_failed": len(failures), "seeds": ok_seeds, "failures": failures,
                               "_values": values}
        rows.append(row)

    if metrics is None:
        metrics = sorted(found_metrics, key=lambda m: (DEFAULT_METRIC_ORDER.index(m) if m in DEFAULT_METRIC_ORDER
                                                       else len(DEFAULT_METRIC_ORDER), m))
    for row in rows:
        values = row.pop("_values")
        for m in metrics:
            vs = values.get(m, [])
            row[f"{m}_mean"] = statistics.fmean(vs) if vs else None
            row[f"{m}_std"] = statistics.stdev(vs) if len(vs) > 1 else None
    rows.sort(key=_row_order)
    return rows


def _row_order(row: dict[str, Any]):
    k, s = row.get("k"), row.get("strength")
    reg = row.get("regularizer")
    return (k is None, k if isinstance(k, (int, float)) else 0, reg not in ("none", None), str(reg),
            s is not None, s if _finite(s) else 0, row["setting"])


def row_metrics(rows: list[dict[str, Any]]) -> list[str]:
    return [key[:-5] for key in (rows[0] if rows else {}) if key.endswith("_mean")]


def _num(v: Any) -> str:
    return "" if v is None else repr(v) if isinstance(v, float) else str(v)


def _pm(mean: Any, std: Any) -> str:
    if mean is None:
        return "–"
    if not math.isfinite(mean):
        return str(mean)
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    metrics = row_metrics(rows)
    cols = ["setting", *AXES, "series", "n_seeds", "n_failed", "seeds"]
    cols += [f"{m}_{s}" for m in metrics for s in ("mean", "std")]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([" ".join(str(s) for s in r[c]) if c == "seeds" else _num(r.get(c)) for c in cols])


def markdown_table(rows: list[dict[str, Any]], metrics: list[str] | None = None, title: str | None = None) -> str:
    metrics = metrics if metrics is not None else row_metrics(rows)
    head = ["setting", *AXES, "n_seeds", "n_failed", *metrics]
    lines = [f"## {title}", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["setting"], *("–" if r.get(a) is None else _fmt(r.get(a)) for a in AXES), str(r["n_seeds"]),
                 str(r["n_failed"])]
        cells += [_pm(r.get(f"{m}_mean"), r.get(f"{m}_std")) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def best_rows(rows: list[dict[str, Any]], select_by: str) -> list[dict[str, Any]]:
    """Per (series, k): the row with the lowest ``select_by`` mean (e.g. val/nll: the paper's model selection)."""
    best: dict[tuple[str, Any], dict[str, Any]] = {}
    for r in rows:
        v = r.get(f"{select_by}_mean")
        if v is None or not math.isfinite(v):
            continue
        key = (r["series"], r.get("k"))
        if key not in best or v < best[key][f"{select_by}_mean"]:
            best[key] = r
    return sorted(best.values(), key=_row_order)


def pivot_table(rows: list[dict[str, Any]], metric: str) -> str:
    """The paper's layout: a row per series, a column per k, cells ``mean ± std`` of ``metric`` (and the strength)."""
    ks = sorted({r.get("k") for r in rows}, key=lambda k: (k is None, k if isinstance(k, (int, float)) else 0))
    series = list(dict.fromkeys(r["series"] for r in sorted(rows, key=lambda r: r.get("regularizer") != "none")))
    lines = [f"| {metric} | " + " | ".join(f"k = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for s in series:
        cells = []
        for k in ks:
            r = next((r for r in rows if r["series"] == s and r.get("k") == k), None)
            if r is None:
                cells.append("")
                continue
            cell = _pm(r.get(f"{metric}_mean"), r.get(f"{metric}_std"))
            if r.get("strength") is not None:
                cell += f" ({r.get('strength_param') or 'strength'} {_fmt(r['strength'])})"
            cells.append(cell)
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_failures(rows: list[dict[str, Any]], path: Path) -> int:
    lines = ["# Failed runs", "", "| setting | seed | what | run dir |", "|---|---|---|---|"]
    n = 0
    for r in rows:
        for seed, msg, d in r["failures"]:
            msg = " ".join(str(msg).split()).replace("|", "\\|")
            lines.append(f"| {r['setting']} | {seed} | {msg} | {d} |")
            n += 1
    if n:
        path.write_text("\n".join(lines) + "\n")
    elif path.exists():
        path.unlink()
    return n


def plot_vs_strength(rows: list[dict[str, Any]], metric: str, path: Path, ylabel: str | None = None) -> bool:
    """One panel per k; a line per series over strength (error bars = std over seeds); settings without a strength
    (the unregularized run) as horizontal dashed lines with a +-std band. False (no file) when nothing to draw."""
    pts = [r for r in rows if r.get(f"{metric}_mean") is not None and math.isfinite(r[f"{metric}_mean"])]
    if not pts:
        if path.exists():
            path.unlink()
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r.get("k") for r in pts}, key=lambda k: (k is None, k if isinstance(k, (int, float)) else 0))
    series = list(dict.fromkeys(r["series"] for r in sorted(pts, key=lambda r: (r.get("strength") is not None,
                                                                                  str(r["series"])))))
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(series)}
    strengths = [r["strength"] for r in pts if _finite(r.get("strength"))]
    log_x = bool(strengths) and min(strengths) > 0
    fig, axs = plt.subplots(1, len(ks), figsize=(4.6 * len(ks) + 0.4, 3.8), squeeze=False, sharex=True)
    label = {r["series"]: f"{r['series']} ({r['strength_param']})" if r.get("strength_param") else r["series"]
             for r in pts}
    for ax, k in zip(axs[0], ks):
        panel = [r for r in pts if r.get("k") == k]
        for s in series:
            rs = [r for r in panel if r["series"] == s]
            line = sorted((r for r in rs if _finite(r.get("strength"))), key=lambda r: r["strength"])
            flat = [r for r in rs if not _finite(r.get("strength"))]
            if line:
                ax.errorbar([r["strength"] for r in line], [r[f"{metric}_mean"] for r in line],
                            yerr=[r[f"{metric}_std"] or 0.0 for r in line], marker="o", ms=4, capsize=3,
                            color=colors[s], label=label[s])
            for r in flat:
                m, sd = r[f"{metric}_mean"], r[f"{metric}_std"] or 0.0
                dashed = r.get("regularizer") in ("none", None)
                ax.axhline(m, ls="--" if dashed else ":", color=colors[s], label=label[s], lw=1.3)
                if sd:
                    ax.axhspan(m - sd, m + sd, color=colors[s], alpha=0.12, lw=0)
        if log_x:
            ax.set_xscale("log")
        ax.set_title(f"k = {k}" if k is not None else "k unknown")
        ax.set_xlabel("regularization strength")
        ax.grid(alpha=0.3, which="major")
        ax.grid(alpha=0.1, which="minor")
        if not strengths:
            ax.set_xticks([])
    axs[0][0].set_ylabel(ylabel or metric)
    handles: dict[str, Any] = {}
    for ax in axs[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 5), frameon=False,
               fontsize=9)
    fig.tight_layout(rect=(0, 0.06 + 0.05 * ((len(handles) - 1) // 5), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


PLOTS = (("test/nll", "nll_vs_strength.png", "test NLL (nats)"),
         ("test/inference_gap", "gap_vs_strength.png", "test inference gap (nats)"))


def write_report(out_dir: str | Path, rows: list[dict[str, Any]], metrics: list[str] | None = None,
                 select_by: str | None = None, title: str | None = None) -> dict[str, Path]:
    """table.csv, table.md, failures.md (when any), best.md (with select_by) and the plots, into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = [m for m in (metrics or row_metrics(rows)) if m in row_metrics(rows)]
    written = {"table.csv": out_dir / "table.csv", "table.md": out_dir / "table.md"}
    write_csv(rows, written["table.csv"])
    text = markdown_table(rows, shown, title)
    if select_by:
        picked = best_rows(rows, select_by)
        best = markdown_table(picked, shown, f"best {select_by} per series and k" if picked else None)
        if picked and shown:
            best = (f"## {shown[0]} of the setting with the best {select_by}, per series and k\n\n"
                    + pivot_table(picked, shown[0]) + "\n" + best)
        (out_dir / "best.md").write_text(best if picked else f"no finished run has {select_by} (for val/... metrics the runs need evaluation.val=true)\n")
        written["best.md"] = out_dir / "best.md"
    written["table.md"].write_text(text)
    if write_failures(rows, out_dir / "failures.md"):
        written["failures.md"] = out_dir / "failures.md"
    for metric, name, label in PLOTS:
        if metric in row_metrics(rows) and plot_vs_strength(rows, metric, out_dir / name, label):
            written[name] = out_dir / name
    if "test/gap/inference" in row_metrics(rows):
        written.update(write_gap_report(rows, out_dir))
    written.update(write_methods_report(rows, out_dir))
    return written


METHOD_COLUMNS = (("test/nll", "test NLL"), ("test/nll_iwae", "NLL, IWAE from the method's q"),
                  ("test/neg_elbo", "-ELBO (method's q)"),
                  ("test/neg_elbo_encoder", "-ELBO (encoder's q)"), ("test/gap/amortization", "amortization gap"),
                  ("test/inference_gap", "inference gap"), ("test/infer_seconds", "inference ms / point"))


def _method_label(r: dict[str, Any]) -> str:
    steps = r.get("steps")
    return f"{r.get('method')}" + (f" ({steps[0]}={_fmt(steps[1])})" if steps else "")


def write_methods_report(rows: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
    """When a study compares inference methods: methods.md (a row per setting: NLL, -ELBO of the method's q and of
    the encoder's q, amortization / inference gap, inference wall time per point), methods.png (a bar panel per
    column) and, when any method has refinement steps K, bound_vs_K.png (the test -ELBO against K per method, the
    encoder's bound as open markers; methods without K as horizontal lines)."""
    done = [r for r in rows if r.get("n_seeds")]
    if len({r.get("method") for r in done}) < 2:
        return {}
    have = row_metrics(rows)
    cols = [(m, label) for m, label in METHOD_COLUMNS if m in have
            and any(_finite(r.get(f"{m}_mean")) for r in done)]
    scale = {"test/infer_seconds": 1000.0}

    def cell(r, m):
        mean, std = r.get(f"{m}_mean"), r.get(f"{m}_std")
        f = scale.get(m, 1.0)
        if mean is None or not _finite(mean):
            return "–"
        return _pm(mean * f, None if std is None else std * f) if m not in scale else f"{mean * f:.3f}"

    lines = ["| setting | method | n_seeds | " + " | ".join(label for _, label in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for r in done:
        lines.append(f"| {r['setting']} | {_method_label(r)} | {r['n_seeds']} | "
                     + " | ".join(cell(r, m) for m, _ in cols) + " |")
    path = out_dir / "methods.md"
    path.write_text("Inference methods side by side (test split; nats; time = the method's inference, encoder pass "
                    "and any iterations or refinement, per point)\n\n" + "\n".join(lines) + "\n")
    written = {"methods.md": path}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["setting"] for r in done]
    fig, axs = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.6), squeeze=False)
    for ax, (m, label) in zip(axs[0], cols):
        f = scale.get(m, 1.0)
        vals = [(r.get(f"{m}_mean") or float("nan")) * f for r in done]
        errs = [(r.get(f"{m}_std") or 0.0) * f for r in done]
        finite = [v for v in vals if _finite(v)]
        # a diverged run (e.g. a bound of 1e21) is drawn at the top edge and labelled, not allowed to set the scale
        med = statistics.median([abs(v) for v in finite]) if finite else 0.0
        inscale = [v for v in finite if abs(v) <= 10 * med + 1.0]
        lo, hi = (min(inscale), max(inscale)) if inscale else (0.0, 1.0)
        zoom = m != "test/infer_seconds" and lo > 0  # bounds: zoom in on the differences
        bottom, top = (lo - 0.15 * (hi - lo) - 0.5, hi + 0.15 * (hi - lo) + 0.5) if zoom else (0.0, 1.15 * hi or 1.0)
        shown_vals = [min(v, top) if _finite(v) else float("nan") for v in vals]
        ax.bar(range(len(names)), shown_vals, yerr=[e if _finite(v) and v <= top else 0 for v, e in zip(vals, errs)],
               capsize=3, color=["tab:red" if _finite(v) and v > top else "tab:blue" for v in vals])
        for i, v in enumerate(vals):
            if _finite(v) and v > top:
                ax.annotate(f"{v:.2g}", (i, top), ha="center", va="top", fontsize=7, color="white", rotation=90)
        ax.set_ylim(bottom, top)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "methods.png", dpi=120)
    plt.close(fig)
    written["methods.png"] = out_dir / "methods.png"

    with_k = [r for r in done if r.get("steps") and r["steps"][0] == "K"]
    if with_k and "test/neg_elbo" in have:
        fig, ax = plt.subplots(figsize=(5.2, 3.8))
        encoder_points = []
        for i, method in enumerate(dict.fromkeys(r["method"] for r in with_k)):
            pts = sorted((r for r in with_k if r["method"] == method), key=lambda r: r["steps"][1])
            color = f"C{i}"
            ax.plot([r["steps"][1] for r in pts], [r.get("test/neg_elbo_mean") for r in pts], "o-", color=color,
                    label=f"{method}: after K steps")
            encoder_points.append((color, [r["steps"][1] for r in pts],
                                   [r.get("test/neg_elbo_encoder_mean") for r in pts]))
        flat = [r for r in done if not (r.get("steps") and r["steps"][0] == "K")
                and _finite(r.get("test/neg_elbo_mean"))]
        for r in flat:
            ax.axhline(r["test/neg_elbo_mean"], ls="--", color="gray", lw=1)
            ax.annotate(r["setting"], (min(r2["steps"][1] for r2 in with_k), r["test/neg_elbo_mean"]), fontsize=8,
                        color="gray", xytext=(2, 2), textcoords="offset points")
        # the refined bounds set the scale; an encoder's bound far above them is marked at the top edge
        shown = [v for v in [r.get("test/neg_elbo_mean") for r in with_k + flat] if _finite(v)]
        lo, hi = min(shown), max(shown)
        top = hi + 0.35 * (hi - lo) + 1.0
        ax.set_ylim(lo - 0.15 * (hi - lo) - 1.0, top)
        for color, ks, enc in encoder_points:
            for kk, v in zip(ks, enc):
                if not _finite(v):
                    continue
                if v <= top:
                    ax.plot([kk], [v], "o", mfc="none", color=color)
                else:
                    ax.plot([kk], [top], "^", mfc="none", color=color, clip_on=False)
                    ax.annotate(f"{v:.0f}", (kk, top), fontsize=7, color=color, xytext=(4, -10),
                                textcoords="offset points")
        ax.set_xlabel("refinement steps K (train and test)")
        ax.set_ylabel("test -ELBO (nats)")
        ax.set_title("filled: after K steps; open: encoder's q (triangle: off scale)", fontsize=8)
        ax.legend(frameon=False, fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "bound_vs_K.png", dpi=120)
        plt.close(fig)
        written["bound_vs_K.png"] = out_dir / "bound_vs_K.png"
    return written


def write_gap_report(rows: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
    """gaps.md (Cremer et al.'s Table 1 layout, a column per setting, means over seeds; a second table for the
    training points when the runs evaluated them, ``evaluation.train_points``) and gaps.png (stacked bars per split:
    approximation + amortization = inference gap per setting, error bar = std of the inference gap over seeds)."""
    from amortlab.evaluation.gaps import gap_table

    done = [r for r in rows if _finite(r.get("test/gap/inference_mean"))]
    columns = {r["setting"]: {k[:-5]: v for k, v in r.items() if k.endswith("_mean") and _finite(v)} for r in done}
    splits = [s for s in ("test", "train") if any(f"{s}/gap/inference" in c for c in columns.values())]
    text = []
    for split in splits:
        n = {int(c[f"{split}/n_points"]) for c in columns.values() if f"{split}/n_points" in c}
        text.append(f"Inference-gap decomposition ({split} split, {'/'.join(map(str, sorted(n)))} points, nats, "
                    f"mean over seeds)\n\n" + gap_table(columns, split))
    (out_dir / "gaps.md").write_text("\n".join(text))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(columns)
    fig, axs = plt.subplots(1, len(splits), figsize=(len(splits) * (1.3 * len(names) + 2.0), 3.8), squeeze=False,
                            sharey=True)
    xs = range(len(names))
    for ax, split in zip(axs[0], splits):
        approx = [columns[n].get(f"{split}/gap/approximation", float("nan")) for n in names]
        amort = [columns[n].get(f"{split}/gap/amortization", float("nan")) for n in names]
        err = [r.get(f"{split}/gap/inference_std") or 0.0 for r in done]
        ax.bar(xs, approx, label="approximation", color="tab:blue")
        ax.bar(xs, amort, bottom=approx, yerr=err, capsize=3, label="amortization", color="tab:orange")
        ax.set_xticks(list(xs), names, rotation=20, ha="right")
        ax.set_title(f"{split} points: inference gap = approximation + amortization", fontsize=9)
    axs[0][0].set_ylabel("gap (nats)")
    axs[0][0].legend(frameon=False)
    fig.tight_layout()
    fig.savefig(out_dir / "gaps.png", dpi=120)
    plt.close(fig)
    return {"gaps.md": out_dir / "gaps.md", "gaps.png": out_dir / "gaps.png"}


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------

def _launcher_overrides(study: dict[str, Any], launcher: str) -> list[str]:
    per = (study.get("launcher_overrides") or {}).get(launcher) or {}
    if not isinstance(per, dict):
        raise SweepError(f"study {study['name']}: launcher_overrides.{launcher} must map launcher keys to values.")
    return [f"hydra.launcher.{k}={_override_value(v)}" for k, v in per.items()]


def _merge_overrides(base: list[str], extra: list[str]) -> list[str]:
    """base then extra; an extra override replaces a base override of the same key."""
    keys = {override_key(o) for o in extra}
    return [o for o in base if override_key(o) not in keys] + list(extra)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _main(argv)
    except SweepError as e:
        if str(e) == "usage":
            print(__doc__.split("\nLayout")[0])
            print("sweep.py options:\n" + "\n".join(f"  {k:<13} {v}" for k, v in SWEEP_KEYS.items()))
            print(f"studies in {STUDY_DIR}: {', '.join(available_studies())}")
            return 0
        print(f"sweep.py: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str]) -> int:
    opts, extra = parse_args(argv)
    study = load_study(opts.get("study"), opts.get("study_file"))
    name = study["name"]
    grid_cli = [o for o in extra if override_key(o).startswith("grid.")]
    for o in grid_cli:  # grid.KEY=[...] narrows or changes the study's grid from the command line
        key, _, value = o.partition("=")
        v = _yaml_value(value)
        study["grid"][key[len("grid."):]] = v if isinstance(v, list) else [v]
    extra = [o for o in extra if o not in grid_cli]
    settings = expand(study)
    seeds = opts.get("seeds") or study["seeds"]
    out_dir = Path(opts.get("out_dir") or Path("sweeps") / name).expanduser().resolve()
    launcher = str(opts.get("launcher") or study.get("launcher") or "basic")
    if launcher not in LAUNCHERS and not (CONF / "hydra" / "launcher" / f"{launcher}.yaml").is_file():
        raise SweepError(f"launcher={launcher}: use one of {', '.join(LAUNCHERS)} (or an option of "
                         f"conf/hydra/launcher/).")
    hydra_launcher = LAUNCHERS.get(launcher, launcher)

    # overrides of every run: the study's base, then the command line's (which replace base ones of the same key)
    varied = {k.lstrip("+") for s in settings for k in s.overrides}
    clash = sorted({override_key(o) for o in [*study["base"], *extra]} & varied)
    if clash:
        raise SweepError(f"{', '.join(clash)} is varied by the study's settings or grid and also set for every run "
                         f"(base or command line), which would silently win over the settings. Remove it there, or "
                         f"change the grid from the command line with grid.KEY=[...].")
    run_overrides = _merge_overrides(study["base"], extra)
    if not any(override_key(o) == "group" for o in run_overrides):
        run_overrides.append(f"group={name}")
    launcher_overrides = _merge_overrides(_launcher_overrides(study, launcher),
                                          [o for o in run_overrides if override_key(o).startswith("hydra.launcher")])
    run_overrides = [o for o in run_overrides if not override_key(o).startswith("hydra.launcher")]
    # tags go into the setting files (composed tags + study:NAME), not on the command line where they would win
    cmd_overrides = [o for o in run_overrides if override_key(o) != "tags"]
    expected = {s.id: list(seeds) for s in settings}
    metrics = study["metrics"] or None

    print(f"sweep.py | study {name}: {len(settings)} settings x {len(seeds)} seeds = {len(settings) * len(seeds)} "
          f"runs | launcher {launcher} | out_dir {out_dir}", flush=True)
    if study.get("description"):
        print("  " + " ".join(str(study["description"]).split()))

    if opts.get("collect_only"):
        return _collect_and_report(out_dir, study, settings, expected, metrics)

    dry = bool(opts.get("dry_run"))
    with contextlib.ExitStack() as stack:
        if dry:
            settings_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sweep-settings-")))
        else:
            stack.enter_context(_lock(out_dir))
            settings_dir = out_dir / "settings"
        write_setting_files(settings, settings_dir, name)
        extras = compose_settings(settings, settings_dir, run_overrides, seeds[0], name)
        write_setting_files(settings, settings_dir, name, extras)

        states = {(s.id, seed): run_state(run_dir(out_dir, s.id, seed)) for s in settings for seed in seeds}
        counts = {st: sum(1 for v in states.values() if v == st) for st in ("ok", "failed", "crashed", "new")}
        retry = opts.get("retry_failed", False)
        todo = [p for p, st in states.items() if st in ("new", "crashed") or (retry and st == "failed")]
        print(f"runs: {counts['ok']} finished (skipped), {counts['failed']} failed ("
              f"{'relaunched' if retry else 'skipped; retry_failed=true relaunches them'}), {counts['crashed']} "
              f"crashed or incomplete (relaunched), {counts['new']} new -> launching {len(todo)}", flush=True)
        _warn_stale(out_dir, settings, seeds, states, cmd_overrides)

        if dry:
            print("\nsettings:")
            for s in settings:
                print(f"  {s.id:<32} {' '.join(s.override_strings())}")
            print(f"\nsetting files (written to {out_dir / 'settings' / 'setting'} when launched), e.g.:\n")
            print(setting_yaml(settings[0], name, extras.get(settings[0].id)))
            print("commands:" if todo else "nothing to launch; the tables would be collected from the finished runs")
            for launch in plan_launches(todo, out_dir, opts.get("resume", True)):
                cmd = launch_command(launch, out_dir, cmd_overrides, hydra_launcher, launcher_overrides, name)
                print("  " + shlex.join(cmd))
            return 0

        _write_manifest(out_dir, study, settings, seeds, run_overrides, launcher)
        interrupted = _launch_all(todo, out_dir, cmd_overrides, hydra_launcher, launcher_overrides, name,
                                  resume=opts.get("resume", True))
    rc = _collect_and_report(out_dir, study, settings, expected, metrics)
    return 130 if interrupted else rc


def _launch_all(todo: list[tuple[str, int]], out_dir: Path, cmd_overrides: list[str], hydra_launcher: str,
                launcher_overrides: list[str], name: str, resume: bool) -> bool:
    """Launch the runs in ``todo``; with a local launcher, relaunch the runs that a dying multirun never started.
    True when interrupted (Ctrl-C)."""
    attempted: set[tuple[str, int]] = set()
    remaining = list(todo)
    round_ = 0
    while remaining:
        round_ += 1
        progressed = False
        for launch in plan_launches(remaining, out_dir, resume):
            cmd = launch_command(launch, out_dir, cmd_overrides, hydra_launcher, launcher_overrides, name)
            print(f"\n$ {shlex.join(cmd)}", flush=True)
            t0 = time.time()
            rc = _call(cmd)
            if rc is None or rc in (-signal.SIGINT, -signal.SIGTERM, 128 + signal.SIGINT, 128 + signal.SIGTERM):
                print("\nsweep.py: interrupted; collecting the runs that finished.", file=sys.stderr, flush=True)
                return True
            started = {p for p in launch.pairs() if _started_since(run_dir(out_dir, *p), t0)}
            attempted |= started
            progressed |= bool(started)
            if rc != 0:
                print(f"sweep.py: this multirun exited with status {rc} ({len(started)} of {len(launch.pairs())} "
                      f"runs started); failed runs are listed in the table (n_failed) and in failures.md.",
                      flush=True)
        remaining = [p for p in remaining if p not in attempted]
        if remaining and (hydra_launcher not in RELAUNCHABLE or not progressed or round_ >= 20):
            print(f"sweep.py: {len(remaining)} runs were not started (e.g. {remaining[0][0]} seed {remaining[0][1]});"
                  f" run the study again to launch them.", flush=True)
            break
        if remaining:
            print(f"sweep.py: the multirun stopped before {len(remaining)} of its runs; launching them.", flush=True)
    return False


class _Stop(Exception):
    pass


def _call(cmd: list[str]) -> int | None:
    """Run the multirun; Ctrl-C or SIGTERM to sweep.py stop it too (None then)."""
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def stop(signum, frame):
        raise _Stop()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return proc.wait()
    except (KeyboardInterrupt, _Stop):
        proc.terminate()  # Ctrl-C already reached the child through the terminal; SIGTERM did not
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _warn_stale(out_dir: Path, settings: list[Setting], seeds: list[int], states: dict, cmd_overrides: list[str]):
    """Finished runs made with other overrides than the study would use now still count; say so."""
    prev = read_results(out_dir / "study.json") or {}
    prev_overrides = {s["id"]: s.get("overrides") for s in prev.get("settings", [])}
    stale: list[str] = []
    for s in settings:
        if s.id in prev_overrides and prev_overrides[s.id] != s.overrides and any(
                states[(s.id, seed)] == "ok" for seed in seeds):
            stale.append(f"{s.id} (setting was {prev_overrides[s.id]}, now {s.overrides})")
            continue
        for seed in seeds:
            d = run_dir(out_dir, s.id, seed)
            if states[(s.id, seed)] != "ok":
                continue
            rec = _recorded_overrides(d)
            if rec is None:
                continue
            rec_set = _normalized(rec)
            now = _job_overrides(s.id, seed, cmd_overrides)
            if rec_set != now:
                diff = sorted(now - rec_set)
                gone = sorted(rec_set - now)
                stale.append(f"{d.relative_to(out_dir)} (now also: {' '.join(diff) or '-'}; no longer: "
                             f"{' '.join(gone) or '-'})")
    if stale:
        print(f"sweep.py: warning: {len(stale)} finished runs were made with other overrides than now; they are "
              f"skipped and count in the table as they are. Delete their dirs (or use a new out_dir=) to rerun them: "
              + "; ".join(stale[:5]) + (" ..." if len(stale) > 5 else ""), flush=True)


def _write_manifest(out_dir: Path, study: dict[str, Any], settings: list[Setting], seeds: list[int],
                    run_overrides: list[str], launcher: str) -> None:
    manifest = {"name": study["name"], "description": study.get("description"), "study_file": study["_path"],
                "seeds": seeds, "overrides": run_overrides, "launcher": launcher, "metrics": study["metrics"],
                "select_by": study.get("select_by"),
                "settings": [{"id": s.id, "overrides": s.overrides, "series": s.series, "varied": s.varied}
                             for s in settings]}
    (out_dir / "study.json").write_text(json.dumps(manifest, indent=1) + "\n")


def _collect_and_report(out_dir: Path, study: dict[str, Any], settings: list[Setting],
                        expected: dict[str, list[int]], metrics: list[str] | None) -> int:
    if not (out_dir / "study.json").is_file():
        _write_manifest(out_dir, study, settings, expected[settings[0].id], study["base"], "basic")
    rows = collect(out_dir, expected=expected)
    written = write_report(out_dir, rows, metrics, study.get("select_by"), f"study {study['name']}")
    n_ok = sum(r["n_seeds"] for r in rows)
    n_failed = sum(r["n_failed"] for r in rows)
    print("\n" + (out_dir / "table.md").read_text())
    print(f"collected {n_ok} finished runs, {n_failed} failed or missing"
          + (f" (see {written['failures.md']})" if "failures.md" in written else "") + "; wrote "
          + ", ".join(str(p) for p in written.values()), flush=True)
    return 0 if n_failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

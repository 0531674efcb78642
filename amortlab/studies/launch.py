"""Launching a study's runs: plan the multiruns of the runs still to do, build their train.py commands, run them
(relaunching what a dying multirun never started), hold the out_dir lock, and warn about finished runs made with
other overrides than now."""
from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Iterator

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from amortlab.studies.expand import Setting
from amortlab.studies.layout import read_json, run_dir, run_state
from amortlab.studies.overrides import override_key, override_value, quote, searchpath
from amortlab.studies.spec import ROOT, SweepError

# sweep.py's launcher names -> options of the hydra/launcher group (conf/hydra/launcher/*.yaml wrap the plugins)
LAUNCHERS = {"basic": "basic", "joblib": "local_parallel", "submitit_local": "local_submitit",
             "submitit_slurm": "slurm"}
# launchers whose multirun process is the only thing running the jobs: when it dies (a run that kills its process,
# e.g. out of memory), the jobs it never started can be launched again at once without duplicating queued ones
RELAUNCHABLE = {"basic", "local_parallel"}
SUBDIR = "${hydra:runtime.choices.setting}/seed${seed}"
STACKED_SUBDIR = "${hydra:runtime.choices.setting}"  # a stacked job; its members write <subdir>/seed<s> themselves


@dataclass
class Launch:
    settings: list[str]
    seeds: list[int]
    resume_from: str | None = None  # last.ckpt of a crashed run (then one setting, one seed)
    stacked: bool = False  # each setting's seeds trained as one stacked computation (train.py stack.seeds=[...])
    key: str | None = None  # stacked with the settings' values of this key as well: one job for all settings
    values: list[Any] | None = None  # per setting, its value of ``key``

    def pairs(self) -> list[tuple[str, int]]:
        return [(s, seed) for s in self.settings for seed in self.seeds]


def plan_launches(pairs: list[tuple[str, int]], out_dir: Path, resume: bool = True,
                  stackable: dict[str, frozenset[str]] | None = None,
                  settings: list[Setting] | None = None) -> list[Launch]:
    """Group the (setting, seed) pairs to run into as few multiruns as possible: settings sharing the same set of
    seeds to run go in one multirun; a crashed run with a last.ckpt is resumed from it in its own multirun. Settings
    in ``stackable`` (id -> the keys its stacked models may differ in) go in multiruns of their own whose jobs stack
    their seeds; stackable settings that differ only in the value of one such key (``settings`` gives their
    overrides; e.g. a sigma grid) and share their seeds to run go in one job that stacks them all."""
    stackable = stackable or {}
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
    groups: dict[tuple[tuple[int, ...], bool], list[str]] = {}
    for sid, seeds in by_setting.items():
        groups.setdefault((tuple(seeds), sid in stackable), []).append(sid)
    overrides = {s.id: s.overrides for s in settings or []}
    for (seeds, stacked), sids in groups.items():
        if not stacked:
            launches.append(Launch(sids, list(seeds)))
            continue
        singles = []
        for key, members in _value_groups(sids, stackable, overrides):
            if key is None:
                singles.append(members[0])
            else:
                launches.append(Launch(members, list(seeds), stacked=True, key=key,
                                       values=[overrides[m][key] for m in members]))
        if singles:
            launches.append(Launch(singles, list(seeds), stacked=len(seeds) > 1))
    launches.sort(key=lambda launch: min(order[p] for p in launch.pairs()))
    return launches


def _value_groups(sids: list[str], stackable: dict[str, frozenset[str]],
                  overrides: dict[str, dict[str, Any]]) -> list[tuple[str | None, list[str]]]:
    """Partition ``sids`` into (key, settings) groups of two or more settings whose overrides differ only in the
    value of ``key`` (a key all of them may stack), and (None, [setting]) for the rest; in the settings' order."""
    signature: dict[str, list[tuple[str, tuple]]] = {}
    counts: dict[tuple[str, tuple], int] = {}
    for sid in sids:
        ov = overrides.get(sid) or {}
        sigs = [(k, tuple(sorted((a, repr(b)) for a, b in ov.items() if a != k)))
                for k in ov if k in stackable.get(sid, ()) and isinstance(ov[k], (int, float))]
        signature[sid] = sigs
        for sig in sigs:
            counts[sig] = counts.get(sig, 0) + 1
    chosen = {sid: max(sigs, key=lambda g: counts[g]) for sid, sigs in signature.items() if sigs}
    out: list[tuple[str | None, list[str]]] = []
    placed: dict[tuple[str, tuple], list[str]] = {}
    for sid in sids:
        sig = chosen.get(sid)
        if sig is None or counts[sig] < 2:
            out.append((None, [sid]))
        elif sig in placed:
            placed[sig].append(sid)
        else:
            placed[sig] = [sid]
            out.append((sig[0], placed[sig]))
    return [(k, m) if k is None or len(m) > 1 else (None, m) for k, m in out]


def launch_command(launch: Launch, out_dir: Path, run_overrides: list[str], launcher: str,
                   launcher_overrides: list[str], study_name: str, settings_dir: Path | None = None) -> list[str]:
    """The ``train.py -m`` command of one multirun (``launcher``: an option of the hydra/launcher group). A launch
    stacking values runs one job from its first setting's file with ``stack.key``/``values``, and ``stack.labels``
    = the settings' ids under ``stack.root`` = ``<out_dir>/runs``, so each member writes ``runs/<id>/seed<s>``."""
    settings_dir = settings_dir or out_dir / "settings"
    seeds = ",".join(str(s) for s in launch.seeds)
    values = []
    if launch.key:
        values = [f"stack.key={launch.key}",
                  f"stack.values=[{','.join(override_value(v) for v in launch.values)}]",
                  f"stack.labels=[{','.join(launch.settings)}]", f"stack.root={quote(str(out_dir / 'runs'))}"]
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", searchpath(settings_dir),
           f"+setting={launch.settings[0] if launch.key else ','.join(launch.settings)}",
           f"stack.seeds=[{seeds}]" if launch.stacked else f"seed={seeds}", *values, *run_overrides]
    if launch.resume_from:
        cmd.append(f"ckpt_path={quote(launch.resume_from)}")
    cmd += ["skip_if_done=true", f"hydra.sweep.dir={quote(str(out_dir / 'runs'))}",
            f"hydra.sweep.subdir={STACKED_SUBDIR if launch.stacked else SUBDIR}",
            f"hydra/launcher={LAUNCHERS.get(launcher, launcher)}", *launcher_overrides]
    return cmd


def study_launcher_overrides(study: dict[str, Any], launcher: str) -> list[str]:
    """The study's ``launcher_overrides.<launcher>`` as ``hydra.launcher.KEY=VALUE`` overrides."""
    per = (study.get("launcher_overrides") or {}).get(launcher) or {}
    if not isinstance(per, dict):
        raise SweepError(f"study {study['name']}: launcher_overrides.{launcher} must map launcher keys to values.")
    return [f"hydra.launcher.{k}={override_value(v)}" for k, v in per.items()]


@contextlib.contextmanager
def lock(out_dir: Path) -> Iterator[None]:
    """Hold ``<out_dir>/.sweep.lock``: one sweep.py launching into an out_dir at a time."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".sweep.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SweepError(f"Another sweep.py is launching runs into {out_dir} right now; wait for it (or use "
                             f"collect_only=true to only write the tables).") from None
        yield


def launch_all(todo: list[tuple[str, int]], out_dir: Path, cmd_overrides: list[str], hydra_launcher: str,
               launcher_overrides: list[str], name: str, resume: bool,
               stackable: dict[str, frozenset[str]] | None = None, settings: list[Setting] | None = None) -> bool:
    """Launch the runs in ``todo``; with a local launcher, relaunch the runs that a dying multirun never started.
    True when interrupted (Ctrl-C)."""
    attempted: set[tuple[str, int]] = set()
    remaining = list(todo)
    round_ = 0
    while remaining:
        round_ += 1
        progressed = False
        for launch in plan_launches(remaining, out_dir, resume, stackable, settings):
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


def _started_since(d: Path, t0: float) -> bool:
    cfg = d / ".hydra" / "config.yaml"
    return cfg.is_file() and cfg.stat().st_mtime >= t0 - 1.0


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


def warn_stale(out_dir: Path, settings: list[Setting], seeds: list[int], states: dict, cmd_overrides: list[str]):
    """Finished runs made with other overrides than the study would use now still count; say so."""
    prev = read_json(out_dir / "study.json") or {}
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
            # a member of a job stacking several settings records the first setting's file with its own value
            # and name: the setting's own keys are checked above (study.json), the rest must match
            own = {"setting", "seed", "name", *(k.lstrip("+") for k in s.overrides)}
            rec_set = {o for o in _normalized(rec) if o.split("=", 1)[0].lstrip("+") not in own}
            now = {o for o in _job_overrides(s.id, seed, cmd_overrides) if o.split("=", 1)[0].lstrip("+") not in own}
            if rec_set != now:
                diff = sorted(now - rec_set)
                gone = sorted(rec_set - now)
                stale.append(f"{d.relative_to(out_dir)} (now also: {' '.join(diff) or '-'}; no longer: "
                             f"{' '.join(gone) or '-'})")
    if stale:
        print(f"sweep.py: warning: {len(stale)} finished runs were made with other overrides than now; they are "
              f"skipped and count in the table as they are. Delete their dirs (or use a new out_dir=) to rerun them: "
              + "; ".join(stale[:5]) + (" ..." if len(stale) > 5 else ""), flush=True)


def _recorded_overrides(d: Path) -> list[str] | None:
    try:
        return [str(o) for o in yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text()) or []]
    except (OSError, ValueError, yaml.YAMLError):
        return None


def _job_overrides(setting_id: str, seed: int, run_overrides: list[str]) -> set[str]:
    return _normalized([f"+setting={setting_id}", f"seed={seed}", "skip_if_done=true",
                        *(o for o in run_overrides if not override_key(o).startswith("hydra"))])


def _normalized(overrides: Iterable[str]) -> set[str]:
    """Overrides as Hydra reads them (Hydra records evaluation.val=false as evaluation.val=False)."""
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

"""The sweep.py command line: parse its arguments, then print (dry_run), launch and collect, or only collect a study.

``python sweep.py -h`` prints USAGE, the options and the studies; docs/sweep.md is the full reference.
"""
from __future__ import annotations

import contextlib
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from amortlab.studies.collect import collect
from amortlab.studies.expand import Setting, compose_settings, expand, setting_yaml, write_setting_files
from amortlab.studies.launch import (LAUNCHERS, launch_all, launch_command, lock, plan_launches,
                                     study_launcher_overrides, warn_stale)
from amortlab.studies.layout import run_dir, run_state, write_manifest
from amortlab.studies.overrides import merge_overrides, override_key
from amortlab.studies.report import write_report
from amortlab.studies.reports import Report, build_reports
from amortlab.studies.spec import CONF, STUDY_DIR, SweepError, available_studies, load_study, parse_seeds, yaml_value

USAGE = """\
Run a named study (a grid of settings x seeds) through one Hydra multirun of train.py, then collect every run's
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
    reports: []                                                # extra reports: gaps, methods, bound_vs_k, ...
"""

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
    "stack": "true/false: train each setting's seeds as one stacked computation where the method allows "
             "(default: the study's stack)",
}


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
        if bare == "stack" or bare.startswith("stack."):
            raise SweepError(f"'{arg}': sweep.py stacks a setting's seeds itself; use stack=true or stack=false.")
        if bare in ("hydra/launcher",):
            raise SweepError(f"'{arg}': pick the launcher with launcher=({'|'.join(LAUNCHERS)}); its keys with "
                             f"hydra.launcher.KEY=VALUE.")
        if bare.startswith(("hydra.sweep", "hydra.run", "hydra.searchpath", "hydra.mode")) or bare == "setting":
            raise SweepError(f"'{arg}': sweep.py sets {bare} itself (runs go to <out_dir>/runs/<setting>/seed<s>); "
                             f"use out_dir= to move them.")
        extra.append(arg)
    for key in ("dry_run", "collect_only", "retry_failed", "resume", "stack"):
        if key in opts:
            opts[key] = _as_bool(key, yaml_value(opts[key]))
    if "seeds" in opts:
        opts["seeds"] = parse_seeds(opts["seeds"])
    return opts, extra


def main(argv: list[str] | None = None) -> int:
    """sweep.py: 0 when every run of the study finished, 1 when some failed or are missing, 2 for a bad argument or
    study, 130 when interrupted."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _main(argv)
    except SweepError as e:
        if str(e) == "usage":
            print(USAGE)
            print("sweep.py options:\n" + "\n".join(f"  {k:<13} {v}" for k, v in SWEEP_KEYS.items()))
            print(f"studies in {STUDY_DIR}: {', '.join(available_studies())}")
            return 0
        print(f"sweep.py: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str]) -> int:
    opts, extra = parse_args(argv)
    study = load_study(opts.get("study"), opts.get("study_file"))
    name = study["name"]
    reports = build_reports(study["reports"], where=study["_path"])
    grid_cli = [o for o in extra if override_key(o).startswith("grid.")]
    for o in grid_cli:  # grid.KEY=[...] narrows or changes the study's grid from the command line
        key, _, value = o.partition("=")
        v = yaml_value(value)
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
    run_overrides = merge_overrides(study["base"], extra)
    if not any(override_key(o) == "group" for o in run_overrides):
        run_overrides.append(f"group={name}")
    launcher_overrides = merge_overrides(study_launcher_overrides(study, launcher),
                                         [o for o in run_overrides if override_key(o).startswith("hydra.launcher")])
    run_overrides = [o for o in run_overrides if not override_key(o).startswith("hydra.launcher")]
    # tags go into the setting files (composed tags + study:NAME), not on the command line where they would win
    cmd_overrides = [o for o in run_overrides if override_key(o) != "tags"]
    expected = {s.id: list(seeds) for s in settings}

    print(f"sweep.py | study {name}: {len(settings)} settings x {len(seeds)} seeds = {len(settings) * len(seeds)} "
          f"runs | launcher {launcher} | out_dir {out_dir}", flush=True)
    if study.get("description"):
        print("  " + " ".join(str(study["description"]).split()))

    if opts.get("collect_only"):
        return _collect_and_report(out_dir, study, settings, expected, reports)

    dry = bool(opts.get("dry_run"))
    resume = opts.get("resume", True)
    with contextlib.ExitStack() as stack:
        if dry:
            settings_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sweep-settings-")))
        else:
            stack.enter_context(lock(out_dir))
            settings_dir = out_dir / "settings"
        write_setting_files(settings, settings_dir, name)
        stackable: dict[str, frozenset[str]] = {}  # filled by compose_settings only when the study stacks
        extras = compose_settings(settings, settings_dir, run_overrides, seeds[0], name,
                                  stackable if opts.get("stack", study["stack"]) else None)
        write_setting_files(settings, settings_dir, name, extras)

        states = {(s.id, seed): run_state(run_dir(out_dir, s.id, seed)) for s in settings for seed in seeds}
        counts = {st: sum(1 for v in states.values() if v == st) for st in ("ok", "failed", "crashed", "new")}
        retry = opts.get("retry_failed", False)
        todo = [p for p, st in states.items() if st in ("new", "crashed") or (retry and st == "failed")]
        print(f"runs: {counts['ok']} finished (skipped), {counts['failed']} failed ("
              f"{'relaunched' if retry else 'skipped; retry_failed=true relaunches them'}), {counts['crashed']} "
              f"crashed or incomplete (relaunched), {counts['new']} new -> launching {len(todo)}", flush=True)
        warn_stale(out_dir, settings, seeds, states, cmd_overrides)

        if dry:
            print("\nsettings:")
            for s in settings:
                print(f"  {s.id:<32} {' '.join(s.override_strings())}")
            print(f"\nsetting files (written to {out_dir / 'settings' / 'setting'} when launched), e.g.:\n")
            print(setting_yaml(settings[0], name, extras.get(settings[0].id)))
            print("commands:" if todo else "nothing to launch; the tables would be collected from the finished runs")
            for launch in plan_launches(todo, out_dir, resume, stackable, settings):
                cmd = launch_command(launch, out_dir, cmd_overrides, hydra_launcher, launcher_overrides, name)
                print("  " + shlex.join(cmd))
            return 0

        write_manifest(out_dir, study, settings, seeds, run_overrides, launcher)
        interrupted = launch_all(todo, out_dir, cmd_overrides, hydra_launcher, launcher_overrides, name, resume,
                                 stackable, settings)
    rc = _collect_and_report(out_dir, study, settings, expected, reports)
    return 130 if interrupted else rc


def _collect_and_report(out_dir: Path, study: dict[str, Any], settings: list[Setting],
                        expected: dict[str, list[int]], reports: list[Report]) -> int:
    """Collect the expected runs, write the report, print table.md; 0 when every expected run finished, else 1."""
    if not (out_dir / "study.json").is_file():
        write_manifest(out_dir, study, settings, expected[settings[0].id], study["base"], "basic")
    rows = collect(out_dir, expected=expected)
    written = write_report(out_dir, rows, study["metrics"] or None, study.get("select_by"), f"study {study['name']}",
                           reports)
    n_ok = sum(r["n_seeds"] for r in rows)
    n_failed = sum(r["n_failed"] for r in rows)
    print("\n" + (out_dir / "table.md").read_text())
    print(f"collected {n_ok} finished runs, {n_failed} failed or missing"
          + (f" (see {written['failures.md']})" if "failures.md" in written else "") + "; wrote "
          + ", ".join(str(p) for p in written.values()), flush=True)
    return 0 if n_failed == 0 else 1

"""A study's out_dir: where each run lives, what state it is in, and its JSON files (a run's results.json, the
study's study.json manifest).

    settings/setting/<id>.yaml   one ``# @package _global_`` config per setting
    runs/<id>/seed<s>/           one train.py run dir per (setting, seed): results.json, checkpoints, train.log
    study.json                   the expanded study (settings, series, seeds, overrides, launcher, reports)
    table.md, table.csv, ...     the report (amortlab.studies.report and the study's report plug-ins)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from amortlab.studies.expand import Setting


def run_dir(out_dir: Path, setting_id: str, seed: int) -> Path:
    return Path(out_dir) / "runs" / setting_id / f"seed{seed}"


def read_json(path: Path) -> Any:
    """The parsed JSON file (any JSON value), or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def record_problem(path: Path, res: Any) -> str | None:
    """Why the run record ``res`` read from ``path`` (``read_json``) is unusable, or None when it is well formed:
    a JSON object with a string ``status``, a ``metrics`` object, and (status ok) every metric a number (int or
    float, not a bool; NaN and inf are numbers)."""
    if res is None:
        return f"unreadable: {path} is not valid JSON"
    if not isinstance(res, dict):
        return f"unreadable: {path} holds a JSON {type(res).__name__}, not an object with status and metrics"
    if not isinstance(res.get("status"), str):
        return f"unreadable: {path} has no status string (status = {res.get('status')!r})"
    metrics = res.get("metrics", {})
    if not isinstance(metrics, dict):
        return f"malformed: {path} has metrics = {metrics!r}, not an object"
    if res["status"] == "ok":
        bad = [(k, v) for k, v in metrics.items() if not isinstance(v, (int, float)) or isinstance(v, bool)]
        if bad:
            shown = ", ".join(f"{k} = {v!r}" for k, v in bad[:3])
            return f"malformed: {path} says status ok but holds metrics that are not numbers ({shown})"
    return None


def run_state(d: Path) -> str:
    """``ok``; ``failed`` (results.json with status failed: an error such as a NaN loss, which a rerun would repeat;
    or a malformed record, ``record_problem``); ``crashed`` (a dir without results.json: killed, timed out, out of
    memory, or still running; or status ``interrupted``); ``new`` (no dir)."""
    r = d / "results.json"
    if r.is_file():
        res = read_json(r)
        if record_problem(r, res):
            return "failed"
        return {"ok": "ok", "interrupted": "crashed", "running": "crashed"}.get(res["status"], "failed")
    return "crashed" if d.is_dir() else "new"


def write_manifest(out_dir: Path, study: dict[str, Any], settings: list[Setting], seeds: list[int],
                   run_overrides: list[str], launcher: str) -> None:
    """``<out_dir>/study.json``: the expanded study (collect reads each setting's series and varied keys from it)."""
    manifest = {"name": study["name"], "description": study.get("description"), "study_file": study["_path"],
                "seeds": seeds, "overrides": run_overrides, "launcher": launcher, "metrics": study["metrics"],
                "select_by": study.get("select_by"), "reports": study["reports"],
                "settings": [{"id": s.id, "overrides": s.overrides, "series": s.series, "varied": s.varied}
                             for s in settings]}
    (out_dir / "study.json").write_text(json.dumps(manifest, indent=1) + "\n")

"""A study yaml: find it, load it, check its keys and value types, and return the study dict the other modules read."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from amortlab.errors import AmortlabError

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
STUDY_DIR = CONF / "sweep"

STUDY_KEYS = {"name", "description", "base", "seeds", "grid", "settings", "launcher", "launcher_overrides",
              "metrics", "select_by", "tags", "reports", "stack"}


class SweepError(AmortlabError):
    """A user-facing error of a study: printed as one paragraph, exit status 2."""


def available_studies(search_dir: Path = STUDY_DIR) -> list[str]:
    """Names of the study yamls in ``search_dir``."""
    return sorted(p.stem for p in Path(search_dir).glob("*.yaml"))


def parse_seeds(value: Any) -> list[int]:
    """``[0,1]``, ``"[0,1]"``, ``"0,1"`` or ``3`` -> a list of distinct integers."""
    v = yaml_value(value) if isinstance(value, str) else value
    if isinstance(v, str):
        v = [yaml_value(s) for s in v.strip("[]").split(",") if s.strip()]
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(s, int) and not isinstance(s, bool) for s in v):
        raise SweepError(f"seeds={value!r}: write a list of integers, e.g. seeds=[0,1,2].")
    if len(set(v)) != len(v):
        raise SweepError(f"seeds={value!r} repeats a seed.")
    return list(v)


def yaml_value(text: str) -> Any:
    """A command-line value read as YAML (``[0,1]`` -> a list, ``true`` -> True); unparsable text as it is."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def load_study(name: str | None = None, study_file: str | Path | None = None,
               search_dir: Path = STUDY_DIR) -> dict[str, Any]:
    """The study ``search_dir/<name>.yaml`` (or ``study_file``), checked, with defaults filled in and ``_path`` set."""
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
    reports = study.get("reports") or []
    if not isinstance(reports, list) or not all(isinstance(r, (str, dict)) for r in reports):
        raise SweepError(f"{path}: 'reports' must be a list of report names or {{_target_: ...}} mappings, e.g. "
                         f"reports: [methods, bound_vs_k].")
    study["reports"] = reports
    if not isinstance(study.get("grid") or {}, dict):
        raise SweepError(f"{path}: 'grid' must map override keys to lists, e.g. "
                         f"grid: {{importance_samples: [k1, k8]}}.")
    settings = study.get("settings") or [{}]
    if not isinstance(settings, list) or not all(isinstance(s, dict) for s in settings):
        raise SweepError(f"{path}: 'settings' must be a list of mappings (override key -> value or list of values).")
    study["settings"] = settings
    study["grid"] = study.get("grid") or {}
    study["seeds"] = parse_seeds(study.get("seeds", [0]))
    if not isinstance(study.get("stack", False), bool):
        raise SweepError(f"{path}: 'stack' must be true (train each setting's seeds as one stacked computation where "
                         f"the method allows, amortlab.stack) or false.")
    study["stack"] = bool(study.get("stack", False))
    return study

"""Collection: every run's results.json -> one row per setting (axes, seeds, failures, mean and std per metric)."""
from __future__ import annotations

import math
import re
import statistics
from pathlib import Path
from typing import Any

import yaml

from amortlab.studies.layout import read_json, record_problem, run_dir

AXES = ("method", "regularizer", "strength", "k")
# a method's own iteration count (results.json axes): refinement steps K, iterations T, mixture components M
METHOD_STEPS = ("K", "T", "M")
DEFAULT_METRIC_ORDER = ("test/nll", "test/nll_iwae", "test/neg_elbo", "test/inference_gap", "val/nll",
                        "val/nll_iwae", "val/neg_elbo", "val/inference_gap")


def finite(v: Any) -> bool:
    """True for a finite int or float (not a bool, not None)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _axes_from_config(d: Path, results: dict[str, Any] | None) -> dict[str, Any]:
    """Axes of a run without results.json ``axes`` (older or crashed runs): from its config and Hydra's choices."""
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
    ``seeds``, ``failures`` ([(seed, message, dir)]; a malformed results.json, ``layout.record_problem``, is one,
    its message naming the file, and nothing else is read from it), and ``<metric>_mean`` / ``<metric>_std``
    (sample std, n - 1; None for fewer than 2 values) for ``metrics`` (default: every numeric metric found). With
    ``expected`` only those settings and seeds are read.
    """
    out_dir = Path(out_dir)
    runs_dir = out_dir / "runs"
    manifest = read_json(out_dir / "study.json") or {}
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
            path = d / "results.json"
            res = read_json(path)
            problem = record_problem(path, res) if path.exists() else None
            if problem:  # listed with its path and skipped, whatever else it holds
                res = None
            if res is not None and axes is None and isinstance(res.get("axes"), dict):
                axes = res["axes"]
            if fallback_axes is None:
                fallback_axes = _axes_from_config(d, res)
            if res is None:
                why = problem or "no results.json: the run crashed, was killed or is still running"
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
    rows.sort(key=row_order)
    return rows


def row_order(row: dict[str, Any]):
    """Sort key of rows: by k, unregularized first, regularizer, strength, setting id."""
    k, s = row.get("k"), row.get("strength")
    reg = row.get("regularizer")
    return (k is None, k if isinstance(k, (int, float)) else 0, reg not in ("none", None), str(reg),
            s is not None, s if finite(s) else 0, row["setting"])


def row_metrics(rows: list[dict[str, Any]]) -> list[str]:
    """The metrics the rows have a ``<metric>_mean`` column for."""
    return [key[:-5] for key in (rows[0] if rows else {}) if key.endswith("_mean")]

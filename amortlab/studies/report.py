"""The report of every study, from the collected rows: table.csv, table.md, best.md (with ``select_by``),
failures.md and the generic plots; then the study's report plug-ins (amortlab.studies.reports)."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any
from collections.abc import Iterable

from amortlab.studies.collect import AXES, row_metrics, row_order
from amortlab.studies.overrides import short
from amortlab.studies.plots import PLOTS, plot_vs_strength
from amortlab.studies.reports.base import Report


def pm(mean: Any, std: Any) -> str:
    """A table cell: ``mean ± std`` to 2 decimals (``mean`` alone without std, ``–`` without mean)."""
    if mean is None:
        return "–"
    if not math.isfinite(mean):
        return str(mean)
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def _num(v: Any) -> str:
    return "" if v is None else repr(v) if isinstance(v, float) else str(v)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """table.csv: a row per setting, full precision."""
    metrics = row_metrics(rows)
    cols = ["setting", *AXES, "series", "n_seeds", "n_failed", "seeds"]
    cols += [f"{m}_{s}" for m in metrics for s in ("mean", "std")]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([" ".join(str(s) for s in r[c]) if c == "seeds" else _num(r.get(c)) for c in cols])


def markdown_table(rows: list[dict[str, Any]], metrics: list[str] | None = None, title: str | None = None) -> str:
    """A row per setting: axes, n_seeds, n_failed and ``mean ± std`` per metric."""
    metrics = metrics if metrics is not None else row_metrics(rows)
    head = ["setting", *AXES, "n_seeds", "n_failed", *metrics]
    lines = [f"## {title}", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["setting"], *("–" if r.get(a) is None else short(r.get(a)) for a in AXES), str(r["n_seeds"]),
                 str(r["n_failed"])]
        cells += [pm(r.get(f"{m}_mean"), r.get(f"{m}_std")) for m in metrics]
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
    return sorted(best.values(), key=row_order)


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
            cell = pm(r.get(f"{metric}_mean"), r.get(f"{metric}_std"))
            if r.get("strength") is not None:
                cell += f" ({r.get('strength_param') or 'strength'} {short(r['strength'])})"
            cells.append(cell)
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_failures(rows: list[dict[str, Any]], path: Path) -> int:
    """failures.md: each failed, crashed or never started run (the file is removed when there are none)."""
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


def write_report(out_dir: str | Path, rows: list[dict[str, Any]], metrics: list[str] | None = None,
                 select_by: str | None = None, title: str | None = None,
                 reports: Iterable[Report] = ()) -> dict[str, Path]:
    """table.csv, table.md, failures.md (when any), best.md (with select_by), the generic plots and then each of
    ``reports`` (the study's plug-ins), into out_dir. Returns {file name: path} of what was written."""
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
        (out_dir / "best.md").write_text(best if picked else f"no finished run has {select_by} (for val/... metrics "
                                         f"the runs need evaluation.val=true)\n")
        written["best.md"] = out_dir / "best.md"
    written["table.md"].write_text(text)
    if write_failures(rows, out_dir / "failures.md"):
        written["failures.md"] = out_dir / "failures.md"
    for metric, name, label in PLOTS:
        if metric in row_metrics(rows) and plot_vs_strength(rows, metric, out_dir / name, label):
            written[name] = out_dir / name
    for report in reports:
        written.update(report.write(rows, out_dir))
    return written

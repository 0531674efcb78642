"""Test log-likelihood against inference time (the RecMix paper's scatter plot): nll_vs_time.md and .png.

One point per setting: x = the method's inference wall time per test point (ms; encoder pass plus any iterations,
refinement or flow steps), y = test NLL, error bars = the std over seeds. The table names the best setting on each
axis and the settings no other beats on both (the Pareto front)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from amortlab.studies.collect import finite
from amortlab.studies.report import pm
from amortlab.studies.reports.base import Report
from amortlab.studies.reports.methods import method_label

NLL, TIME = "test/nll", "test/infer_seconds"


def pareto(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the (name, time, nll) points that no other point beats on both axes (<= on both, < on one)."""
    return [n for n, t, v in points
            if not any((t2 <= t and v2 <= v) and (t2 < t or v2 < v) for _, t2, v2 in points)]


class NLLvsTimeReport(Report):
    """nll_vs_time.md / .png (module docstring); nothing unless two settings have both metrics."""

    name = "nll_vs_time"

    def write(self, rows: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
        done = [r for r in rows if r.get("n_seeds") and finite(r.get(f"{NLL}_mean"))
                and finite(r.get(f"{TIME}_mean"))]
        if len(done) < 2:
            return {}
        pts = [(r["setting"], 1000.0 * r[f"{TIME}_mean"], r[f"{NLL}_mean"]) for r in done]
        front = pareto(pts)
        fastest = min(pts, key=lambda p: p[1])[0]
        best = min(pts, key=lambda p: p[2])[0]
        lines = ["| setting | method | n_seeds | test NLL | inference ms / point | on the front |",
                 "|---|---|---|---|---|---|"]
        for r, (name, t, _) in zip(done, pts):
            t_std = r.get(f"{TIME}_std")
            time_cell = f"{t:.3f}" + ("" if t_std is None else f" ± {1000.0 * t_std:.3f}")
            lines.append(f"| {name} | {method_label(r)} | {r['n_seeds']} | {pm(r[f'{NLL}_mean'], r.get(f'{NLL}_std'))} "
                         f"| {time_cell} | {'yes' if name in front else ''} |")
        text = ("Test NLL against inference time per test point (nats; ms; mean ± std over seeds)\n\n"
                + "\n".join(lines) + f"\n\nBest NLL: {best}. Fastest inference: {fastest}. Not beaten on both axes: "
                f"{', '.join(front)}.\n")
        md = out_dir / "nll_vs_time.md"
        md.write_text(text)
        self._plot(done, pts, front, out_dir / "nll_vs_time.png")
        return {"nll_vs_time.md": md, "nll_vs_time.png": out_dir / "nll_vs_time.png"}

    @staticmethod
    def _plot(done, pts, front, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 4.0))
        for r, (name, t, v) in zip(done, pts):
            xerr = 1000.0 * (r.get(f"{TIME}_std") or 0.0)
            yerr = r.get(f"{NLL}_std") or 0.0
            ax.errorbar([t], [v], xerr=[xerr], yerr=[yerr], fmt="o", capsize=3,
                        color="tab:red" if name in front else "tab:blue")
            ax.annotate(name, (t, v), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("inference time per test point (ms, log scale)")
        ax.set_ylabel("test NLL (nats)")
        ax.set_title("NLL vs inference time (red: not beaten on both axes)", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

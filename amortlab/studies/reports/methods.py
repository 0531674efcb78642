"""The inference-methods report (studies comparing inference schemes): methods.md and methods.png."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from amortlab.studies.collect import finite, row_metrics
from amortlab.studies.overrides import short
from amortlab.studies.report import pm
from amortlab.studies.reports.base import Report

# (metric, column label), shown when some finished run has the metric
METHOD_COLUMNS = (("test/nll", "test NLL"), ("test/nll_iwae", "NLL, IWAE from the method's q"),
                  ("test/neg_elbo", "-ELBO (method's q)"),
                  ("test/neg_elbo_encoder", "-ELBO (encoder's q)"), ("test/gap/amortization", "amortization gap"),
                  ("test/gap/qstar_converged_frac", "its q* converged (share of points)"),
                  ("test/gap/qstar_tail_gain", "its q* gain over its last steps"),
                  ("test/inference_gap", "inference gap"), ("test/active_units", "active units"),
                  ("test/active_units/z1", "active units z1"), ("test/active_units/z2", "active units z2"),
                  ("test/kl", "KL(q || p(z))"), ("test/mutual_info", "mutual information I_q(x; z)"),
                  ("test/infer_seconds", "inference ms / point"))
SCALE = {"test/infer_seconds": 1000.0}  # seconds -> ms


def method_label(r: dict[str, Any]) -> str:
    """``sa_vae (K=20)``: the method and its own iteration count, if any."""
    steps = r.get("steps")
    return f"{r.get('method')}" + (f" ({steps[0]}={short(steps[1])})" if steps else "")


def _cell(r: dict[str, Any], m: str) -> str:
    mean, std = r.get(f"{m}_mean"), r.get(f"{m}_std")
    f = SCALE.get(m, 1.0)
    if mean is None or not finite(mean):
        return "–"
    return pm(mean * f, None if std is None else std * f) if m not in SCALE else f"{mean * f:.3f}"


class MethodsReport(Report):
    """methods.md (a row per setting: NLL, -ELBO of the method's q and of the encoder's q, amortization / inference
    gap, inference wall time per point) and methods.png (a bar panel per column). Nothing unless the finished runs
    use at least two methods."""

    name = "methods"

    def write(self, rows: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
        done = [r for r in rows if r.get("n_seeds")]
        if len({r.get("method") for r in done}) < 2:
            return {}
        have = row_metrics(rows)
        cols = [(m, label) for m, label in METHOD_COLUMNS if m in have
                and any(finite(r.get(f"{m}_mean")) for r in done)]
        lines = ["| setting | method | n_seeds | " + " | ".join(label for _, label in cols) + " |",
                 "|---|---|---|" + "---|" * len(cols)]
        for r in done:
            lines.append(f"| {r['setting']} | {method_label(r)} | {r['n_seeds']} | "
                         + " | ".join(_cell(r, m) for m, _ in cols) + " |")
        path = out_dir / "methods.md"
        path.write_text("Inference methods side by side (test split; nats; time = the method's inference, encoder "
                        "pass and any iterations or refinement, per point)\n\n" + "\n".join(lines) + "\n")
        self._plot(done, cols, out_dir / "methods.png")
        return {"methods.md": path, "methods.png": out_dir / "methods.png"}

    @staticmethod
    def _plot(done: list[dict[str, Any]], cols: list[tuple[str, str]], path: Path) -> None:
        # matplotlib is imported here, not at the top, to keep sweep.py's start-up fast
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [r["setting"] for r in done]
        fig, axs = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.6), squeeze=False)
        for ax, (m, label) in zip(axs[0], cols):
            f = SCALE.get(m, 1.0)
            vals = [(r.get(f"{m}_mean") or float("nan")) * f for r in done]
            errs = [(r.get(f"{m}_std") or 0.0) * f for r in done]
            shown = [v for v in vals if finite(v)]
            # a diverged run (e.g. a bound of 1e21) is drawn at the top edge and labelled, not allowed to set the scale
            med = statistics.median([abs(v) for v in shown]) if shown else 0.0
            inscale = [v for v in shown if abs(v) <= 10 * med + 1.0]
            lo, hi = (min(inscale), max(inscale)) if inscale else (0.0, 1.0)
            zoom = m != "test/infer_seconds" and lo > 0  # bounds: zoom in on the differences
            bottom, top = ((lo - 0.15 * (hi - lo) - 0.5, hi + 0.15 * (hi - lo) + 0.5) if zoom
                           else (0.0, 1.15 * hi or 1.0))
            bars = [min(v, top) if finite(v) else float("nan") for v in vals]
            ax.bar(range(len(names)), bars, yerr=[e if finite(v) and v <= top else 0 for v, e in zip(vals, errs)],
                   capsize=3, color=["tab:red" if finite(v) and v > top else "tab:blue" for v in vals])
            for i, v in enumerate(vals):
                if finite(v) and v > top:
                    ax.annotate(f"{v:.2g}", (i, top), ha="center", va="top", fontsize=7, color="white", rotation=90)
            ax.set_ylim(bottom, top)
            ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
            ax.set_title(label, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

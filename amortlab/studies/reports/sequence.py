"""The sequence-model report (filtering schemes compared on one model): sequence.md and sequence.png.

A row per setting, every number in nats per time step (sums over the split / total present steps; mean ± std over
seeds): -log p(x) of the configured estimator (SMC with ``evaluation=smc``), IWAE-k over sequences, -ELBO, the KL
term, active units, inference wall time per step, the SMC effective sample size, and the -ELBO after each AVF update
(``neg_elbo_step/<i>``: i = 0 is the prior's prediction). The plot shows that -ELBO against the update index (the
direct filter as a flat line) and -log p(x) against inference time per step.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from amortlab.studies.collect import finite, row_metrics
from amortlab.studies.report import pm
from amortlab.studies.reports.base import Report
from amortlab.studies.reports.methods import method_label

# (metric, column label, scale)
COLUMNS = (("test/nll_per_step", "-log p(x) / step", 1.0), ("test/nll_iwae_per_step", "IWAE-k / step", 1.0),
           ("test/neg_elbo_per_step", "-ELBO / step", 1.0), ("test/kl_per_step", "KL / step", 1.0),
           ("test/active_units", "active units", 1.0), ("test/infer_seconds_per_step", "inference ms / step", 1000.0),
           ("test/smc_ess", "SMC ESS / K", 1.0))
STEP = re.compile(r"^test/neg_elbo_step/(\d+)$")
NLL, TIME = "test/nll_per_step", "test/infer_seconds_per_step"


def _cell(r: dict[str, Any], m: str, scale: float = 1.0) -> str:
    mean, std = r.get(f"{m}_mean"), r.get(f"{m}_std")
    if mean is None or not finite(mean):
        return "–"
    if scale != 1.0:
        return f"{mean * scale:.3f}" + ("" if std is None else f" ± {std * scale:.3f}")
    return pm(mean, std)


def update_curve(r: dict[str, Any]) -> list[tuple[int, float, float | None]]:
    """(i, -ELBO per step after AVF update i, its std) for i = 0..S; empty for a scheme without updates."""
    steps = r.get("test/steps_mean")
    if not finite(steps) or not steps:
        return []
    out = []
    for key in r:
        m = STEP.match(key[:-5]) if key.endswith("_mean") else None
        if m and finite(r[key]):
            std = r.get(f"{key[:-5]}_std")
            out.append((int(m.group(1)), r[key] / steps, None if std is None else std / steps))
    return sorted(out)


class SequenceReport(Report):
    """sequence.md / .png (module docstring); nothing unless a finished setting has per-step results."""

    name = "sequence"

    def write(self, rows: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
        done = [r for r in rows if r.get("n_seeds") and finite(r.get(f"{NLL}_mean"))]
        if not done:
            return {}
        have = row_metrics(rows)
        cols = [(m, label, s) for m, label, s in COLUMNS if m in have]
        n_upd = max((len(update_curve(r)) for r in done), default=0)
        lines = ["| setting | method | n_seeds | " + " | ".join(label for _, label, _ in cols)
                 + "".join(f" | -ELBO / step after update {i}" for i in range(n_upd)) + " |",
                 "|---|---|---|" + "---|" * (len(cols) + n_upd)]
        for r in done:
            curve = {i: (v, s) for i, v, s in update_curve(r)}
            lines.append(f"| {r['setting']} | {method_label(r)} | {r['n_seeds']} | "
                         + " | ".join(_cell(r, m, s) for m, _, s in cols)
                         + "".join(f" | {pm(*curve[i])}" if i in curve else " | –" for i in range(n_upd)) + " |")
        best = min(done, key=lambda r: r[f"{NLL}_mean"])["setting"]
        timed = [r for r in done if finite(r.get(f"{TIME}_mean"))]
        text = ("Sequence models: filtering schemes side by side (test split; nats per time step; mean ± std over "
                "seeds; update 0 = the prior's prediction)\n\n" + "\n".join(lines) + f"\n\nLowest -log p(x) per step: "
                f"{best}." + (f" Fastest inference: {min(timed, key=lambda r: r[f'{TIME}_mean'])['setting']}."
                              if timed else "") + "\n")
        md = out_dir / "sequence.md"
        md.write_text(text)
        self._plot(done, out_dir / "sequence.png")
        return {"sequence.md": md, "sequence.png": out_dir / "sequence.png"}

    @staticmethod
    def _plot(done: list[dict[str, Any]], path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        n_upd = max((len(update_curve(r)) for r in done), default=0)
        for r in done:
            curve = update_curve(r)
            if curve:
                a.errorbar([i for i, _, _ in curve], [v for _, v, _ in curve], yerr=[s or 0 for _, _, s in curve],
                           marker="o", capsize=3, label=r["setting"])
            elif finite(r.get("test/neg_elbo_per_step_mean")) and n_upd:
                a.axhline(r["test/neg_elbo_per_step_mean"], ls="--", color="gray", label=f"{r['setting']} (direct)")
            if finite(r.get(f"{TIME}_mean")):
                t, v = 1000.0 * r[f"{TIME}_mean"], r[f"{NLL}_mean"]
                b.errorbar([t], [v], xerr=[1000.0 * (r.get(f"{TIME}_std") or 0)], yerr=[r.get(f"{NLL}_std") or 0],
                           fmt="o", capsize=3)
                b.annotate(r["setting"], (t, v), textcoords="offset points", xytext=(4, 4), fontsize=8)
        a.set_xlabel("AVF update i (0 = the prior's prediction)")
        a.set_ylabel("-ELBO per step (nats)")
        a.set_title("-ELBO after each update", fontsize=9)
        if a.has_data():
            a.legend(fontsize=8)
        b.set_xlabel("inference time per step (ms)")
        b.set_ylabel("-log p(x) per step (nats)")
        b.set_title("likelihood vs inference time", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

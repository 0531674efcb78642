"""The gap-decomposition report (studies with evaluation=gaps): gaps.md and gaps.png."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from amortlab.evaluation.gaps import gap_table
from amortlab.studies.collect import finite, row_metrics
from amortlab.studies.reports.base import Report


class GapsReport(Report):
    """gaps.md (Cremer et al.'s Table 1 layout, a column per setting, means over seeds; a second table for the
    training points when the runs evaluated them, ``evaluation.train_points``) and gaps.png (stacked bars per split:
    approximation + amortization = inference gap per setting, error bar = std of the inference gap over seeds).
    Nothing when no run has ``test/gap/inference``."""

    name = "gaps"

    def write(self, rows: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
        if "test/gap/inference" not in row_metrics(rows):
            return {}
        done = [r for r in rows if finite(r.get("test/gap/inference_mean"))]
        columns = {r["setting"]: {k[:-5]: v for k, v in r.items() if k.endswith("_mean") and finite(v)} for r in done}
        splits = [s for s in ("test", "train") if any(f"{s}/gap/inference" in c for c in columns.values())]
        if not splits:
            return {}
        text = []
        for split in splits:
            n = {int(c[f"{split}/n_points"]) for c in columns.values() if f"{split}/n_points" in c}
            text.append(f"Inference-gap decomposition ({split} split, {'/'.join(map(str, sorted(n)))} points, nats, "
                        f"mean over seeds)\n\n" + gap_table(columns, split))
        (out_dir / "gaps.md").write_text("\n".join(text))
        # matplotlib is imported here, not at the top, to keep sweep.py's start-up fast
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

"""The bound-vs-K report (studies with refinement steps K): bound_vs_K.png."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from amortlab.studies.collect import finite, row_metrics
from amortlab.studies.reports.base import Report


class BoundVsKReport(Report):
    """bound_vs_K.png: the test -ELBO against the refinement steps K per method (filled), the encoder's bound as open
    markers (a triangle at the top edge when off scale), settings without K as gray horizontal lines. Nothing when
    no finished run has K or the rows lack ``test/neg_elbo``."""

    name = "bound_vs_k"

    def write(self, rows: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
        done = [r for r in rows if r.get("n_seeds")]
        with_k = [r for r in done if r.get("steps") and r["steps"][0] == "K"]
        if not with_k or "test/neg_elbo" not in row_metrics(rows):
            return {}
        # matplotlib is imported here, not at the top, to keep sweep.py's start-up fast
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.2, 3.8))
        encoder_points = []
        for i, method in enumerate(dict.fromkeys(r["method"] for r in with_k)):
            pts = sorted((r for r in with_k if r["method"] == method), key=lambda r: r["steps"][1])
            color = f"C{i}"
            ax.plot([r["steps"][1] for r in pts], [r.get("test/neg_elbo_mean") for r in pts], "o-", color=color,
                    label=f"{method}: after K steps")
            encoder_points.append((color, [r["steps"][1] for r in pts],
                                   [r.get("test/neg_elbo_encoder_mean") for r in pts]))
        flat = [r for r in done if not (r.get("steps") and r["steps"][0] == "K")
                and finite(r.get("test/neg_elbo_mean"))]
        for r in flat:
            ax.axhline(r["test/neg_elbo_mean"], ls="--", color="gray", lw=1)
            ax.annotate(r["setting"], (min(r2["steps"][1] for r2 in with_k), r["test/neg_elbo_mean"]), fontsize=8,
                        color="gray", xytext=(2, 2), textcoords="offset points")
        # the refined bounds set the scale; an encoder's bound far above them is marked at the top edge
        shown = [v for v in [r.get("test/neg_elbo_mean") for r in with_k + flat] if finite(v)]
        lo, hi = min(shown), max(shown)
        top = hi + 0.35 * (hi - lo) + 1.0
        ax.set_ylim(lo - 0.15 * (hi - lo) - 1.0, top)
        for color, ks, enc in encoder_points:
            for kk, v in zip(ks, enc):
                if not finite(v):
                    continue
                if v <= top:
                    ax.plot([kk], [v], "o", mfc="none", color=color)
                else:
                    ax.plot([kk], [top], "^", mfc="none", color=color, clip_on=False)
                    ax.annotate(f"{v:.0f}", (kk, top), fontsize=7, color=color, xytext=(4, -10),
                                textcoords="offset points")
        ax.set_xlabel("refinement steps K (train and test)")
        ax.set_ylabel("test -ELBO (nats)")
        ax.set_title("filled: after K steps; open: encoder's q (triangle: off scale)", fontsize=8)
        ax.legend(frameon=False, fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "bound_vs_K.png", dpi=120)
        plt.close(fig)
        return {"bound_vs_K.png": out_dir / "bound_vs_K.png"}

"""The generic plots of every study: a metric against regularization strength, a panel per k (PLOTS)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from amortlab.studies.collect import finite

# (metric, file name, y label): drawn when the rows have the metric
PLOTS = (("test/nll", "nll_vs_strength.png", "test NLL (nats)"),
         ("test/inference_gap", "gap_vs_strength.png", "test inference gap (nats)"))


def plot_vs_strength(rows: list[dict[str, Any]], metric: str, path: Path, ylabel: str | None = None) -> bool:
    """One panel per k; a line per series over strength (error bars = std over seeds); settings without a strength
    (the unregularized run) as horizontal dashed lines with a +-std band. False (no file) when nothing to draw."""
    pts = [r for r in rows if finite(r.get(f"{metric}_mean"))]
    if not pts:
        if path.exists():
            path.unlink()
        return False
    # matplotlib is imported here, not at the top, to keep sweep.py's start-up fast
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r.get("k") for r in pts}, key=lambda k: (k is None, k if isinstance(k, (int, float)) else 0))
    series = list(dict.fromkeys(r["series"] for r in sorted(pts, key=lambda r: (r.get("strength") is not None,
                                                                                  str(r["series"])))))
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(series)}
    strengths = [r["strength"] for r in pts if finite(r.get("strength"))]
    log_x = bool(strengths) and min(strengths) > 0
    fig, axs = plt.subplots(1, len(ks), figsize=(4.6 * len(ks) + 0.4, 3.8), squeeze=False, sharex=True)
    label = {r["series"]: f"{r['series']} ({r['strength_param']})" if r.get("strength_param") else r["series"]
             for r in pts}
    for ax, k in zip(axs[0], ks):
        panel = [r for r in pts if r.get("k") == k]
        for s in series:
            rs = [r for r in panel if r["series"] == s]
            line = sorted((r for r in rs if finite(r.get("strength"))), key=lambda r: r["strength"])
            flat = [r for r in rs if not finite(r.get("strength"))]
            if line:
                ax.errorbar([r["strength"] for r in line], [r[f"{metric}_mean"] for r in line],
                            yerr=[r[f"{metric}_std"] or 0.0 for r in line], marker="o", ms=4, capsize=3,
                            color=colors[s], label=label[s])
            for r in flat:
                m, sd = r[f"{metric}_mean"], r[f"{metric}_std"] or 0.0
                dashed = r.get("regularizer") in ("none", None)
                ax.axhline(m, ls="--" if dashed else ":", color=colors[s], label=label[s], lw=1.3)
                if sd:
                    ax.axhspan(m - sd, m + sd, color=colors[s], alpha=0.12, lw=0)
        if log_x:
            ax.set_xscale("log")
        ax.set_title(f"k = {k}" if k is not None else "k unknown")
        ax.set_xlabel("regularization strength")
        ax.grid(alpha=0.3, which="major")
        ax.grid(alpha=0.1, which="minor")
        if not strengths:
            ax.set_xticks([])
    axs[0][0].set_ylabel(ylabel or metric)
    handles: dict[str, Any] = {}
    for ax in axs[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 5), frameon=False,
               fontsize=9)
    fig.tight_layout(rect=(0, 0.06 + 0.05 * ((len(handles) - 1) // 5), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

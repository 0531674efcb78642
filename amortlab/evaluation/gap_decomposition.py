"""The gap decomposition as an estimator (``evaluation=gaps``); the math is in ``evaluation/gaps.py``."""
from __future__ import annotations

from pathlib import Path

from amortlab.evaluation.ais import ais_log_likelihood
from amortlab.evaluation.gaps import GAP_METRICS, GapsConfig, decompose, gap_table
from amortlab.evaluation.posterior_plot import draw_posteriors
from amortlab.evaluation.protocol import Estimate, EvalBatch, Estimator
from amortlab.settings import build


class GapDecomposition(Estimator):
    """``evaluation=gaps``: log p_hat(x) = the decomposition's reference ``gap/log_px`` (module docstring), with every
    ``gap/...`` value per point. After the run: ``gaps.md`` (Cremer et al.'s Table 1 layout) and, for a 2-D latent,
    ``images/posteriors.png``. Settings: ``GapsConfig``."""

    name = "gaps"
    metric_names = GAP_METRICS

    def __init__(self, **settings):
        self.cfg = build(GapsConfig, settings, "evaluation.estimator")

    def __call__(self, batch: EvalBatch) -> Estimate:
        m, gen = batch.module, batch.generator
        ais = None
        if self.cfg.ais:
            def ais(x):
                # annealed in the prior's own noise eps ~ N(0, I) (z = from_noise(eps); the identity for one layer)
                return ais_log_likelihood(lambda x_, eps: m.model.log_likelihood(x_, m.model.from_noise(eps)), x,
                                          m.z_dim, self.cfg.ais_settings, gen)
        out = decompose(m, batch.x, batch.q, batch.k, batch.rows, self.cfg, gen, ais_fn=ais)
        return Estimate(out["gap/log_px"], out)

    def after_run(self, module, datamodule, metrics: dict[str, float], out_dir: Path, run_name: str,
                  logger, seed: int) -> None:
        text = []
        for split in ("test", "train"):
            n = metrics.get(f"{split}/n_points")
            if n:
                text.append(f"Inference-gap decomposition, {split} split ({n} points, nats)\n\n"
                            + gap_table({run_name: metrics}, split))
        (Path(out_dir) / "gaps.md").write_text("\n".join(text))
        if module.z_dim == 2:
            draw_posteriors(module, datamodule, self.cfg, Path(out_dir) / "images" / "posteriors.png", logger, seed)

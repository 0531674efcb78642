"""Per-datapoint q* and the gap decomposition against the linear-Gaussian closed forms."""
import pytest
import torch

from amortlab.data.loader import Batch
from amortlab.evaluation.gaps import FlowFamilyConfig, GapsConfig, decompose, gap_table
from amortlab.evaluation.qstar import QStarConfig, optimize_local
from tests.test_estimators import data, elbo_of, linear_model, perturbed_model

FAST = QStarConfig(lr=0.05, k=50, max_steps=3000, patience=100, ema=0.95, select_k=500)



def test_qstar_gaussian_reaches_exact_posterior_and_never_below_init():
    from amortlab.distributions.flow import LocalGaussian

    m = perturbed_model()
    x = data(m, 12)
    exact = m.decoder.exact_log_marginal(x)
    fam = LocalGaussian(len(x), 3).double()
    with torch.no_grad():
        init = elbo_of(m, x, fam())
    fam, report = optimize_local(m, x, fam, FAST, torch.Generator().manual_seed(0))
    with torch.no_grad():
        final = elbo_of(m, x, fam())
    assert (final >= init - 1e-6).all()
    torch.testing.assert_close(final, exact, atol=0.02, rtol=0)  # diagonal true posterior: the family holds it
    assert report["steps"] < FAST.max_steps  # the patience rule stopped it
    assert report["kept"] == 1.0


def test_gap_decomposition_linear_gaussian():
    cfg = GapsConfig(families=["ffg"], qstar=FAST, flow=FlowFamilyConfig())
    weak = perturbed_model()  # a deliberately weak encoder
    x = data(weak, 12)
    exact = weak.decoder.exact_log_marginal(x)
    g = torch.Generator().manual_seed(0)
    out = decompose(weak, x, weak.infer(x), k=2000, rows=100_000, cfg=cfg, generator=g)
    torch.testing.assert_close(out["gap/log_px"], exact, atol=0.05, rtol=0)
    assert out["gap/approximation"].abs().max() < 0.05  # the FFG family contains the true posterior
    assert out["gap/amortization"].mean() > 0.1  # the weak encoder leaves a real amortization gap
    torch.testing.assert_close(out["gap/inference"], out["gap/approximation"] + out["gap/amortization"])
    # the exact encoder has no amortization gap either
    exact_enc = linear_model()
    out2 = decompose(exact_enc, x, exact_enc.infer(x), k=2000, rows=100_000, cfg=cfg, generator=g)
    assert out2["gap/amortization"].abs().max() < 0.05 and out2["gap/inference"].abs().max() < 0.05


def test_gap_decomposition_flow_family_and_table():
    cfg = GapsConfig(families=["ffg", "flow"], qstar=QStarConfig(lr=0.02, k=20, max_steps=300, patience=50,
                                                                 select_k=200))
    m = linear_model(diagonal_posterior=False)
    x = data(m, 6)
    out = decompose(m, x, m.infer(x), k=500, rows=100_000, cfg=cfg, generator=torch.Generator().manual_seed(1))
    for key in ("gap/L_qstar_ffg", "gap/L_qstar_flow", "gap/L_q", "gap/log_px"):
        assert out[key].shape == (6,) and torch.isfinite(out[key]).all()
    assert (out["gap/log_px"] >= out["gap/L_qstar_ffg"] - 0.05).all()
    # the flow q* starts at q*_FFG (a member of the flow family) and keeps only improvements
    assert out["gap/L_qstar_flow"].mean() >= out["gap/L_qstar_ffg"].mean() - 0.05
    # log p^ is the candidate with the best batch mean: a deliberately weak "AIS" (= L[q]) is not chosen
    weak = decompose(m, x, m.infer(x), k=500, rows=100_000, cfg=cfg, generator=torch.Generator().manual_seed(1),
                     ais_fn=lambda xx: out["gap/L_q"].clone())
    assert torch.equal(weak["gap/log_px_ais"], out["gap/L_q"])
    best = max((weak[k] for k in ("gap/log_px_iwae", "gap/log_px_iwae_ffg", "gap/log_px_iwae_flow")),
               key=lambda e: e.mean())
    assert torch.equal(weak["gap/log_px"], best) and weak["gap/log_px"].mean() > weak["gap/L_qstar_flow"].mean()
    table = gap_table({"m": {f"test/{k}": v.mean().item() for k, v in out.items()}})
    assert "L[q*_Flow]" in table and "Amortization" in table


def test_evaluate_batch_with_gaps_estimator():
    m = perturbed_model()
    m.gaps_cfg = GapsConfig(families=["ffg"], qstar=FAST)
    x = data(m, 8)
    out = m.evaluate_batch(Batch(x, 0), k=500, estimator="gaps")
    torch.testing.assert_close(-out["nll"], out["gap/log_px"])
    assert (out["gap/inference"] >= -0.05).all()


def test_gaps_cli_with_flow_posterior_and_ais(tmp_path):
    """evaluation=gaps on a flow-trained run, AIS on: results.json gap keys and gaps.md."""
    import json

    from tests.test_cli import train

    train("posterior=flow", "logger=none", "trainer.max_epochs=1", "evaluation=gaps", "evaluation.gaps.ais=true",
          "evaluation.ais.n_intermediate=10", "evaluation.ais.n_chains=2", "evaluation.gaps.qstar.max_steps=20",
          "evaluation.gaps.qstar.init=encoder", "trainer.limit_test_batches=1", "dataset.eval_batch_size=20",
          "importance_samples.test=50", "evaluation.train_points=30", run_dir=tmp_path)
    m = json.loads((tmp_path / "results.json").read_text())["metrics"]
    for key in ("gap/log_px", "gap/log_px_ais", "gap/L_q", "gap/L_qstar_ffg", "gap/L_qstar_flow",
                "gap/approximation", "gap/amortization", "gap/inference"):
        assert f"test/{key}" in m, key
    assert m["test/n_points"] == 20
    assert m["test/gap/inference"] == pytest.approx(m["test/gap/approximation"] + m["test/gap/amortization"])
    assert m["test/nll"] == pytest.approx(-m["test/gap/log_px"])
    assert m["train/n_points"] == 30  # the training points: all 30, trainer.limit_test_batches does not apply
    assert m["train/gap/inference"] == pytest.approx(m["train/gap/approximation"] + m["train/gap/amortization"])
    for split in ("test", "train"):  # the flow q's active units (Monte Carlo posterior means), in the table too
        assert isinstance(m[f"{split}/active_units"], int) and 0 <= m[f"{split}/active_units"] <= 50
    table = (tmp_path / "gaps.md").read_text()
    assert f"| Active units | {m['test/active_units']} |" in table
    assert "| L[q*_Flow] |" in table and "test split (20 points" in table and "train split (30 points" in table


def test_ffg_qstar_of_a_flow_q_starts_at_its_moments():
    """q*_FFG of a flow posterior (no Gaussian parameters) starts at the flow's moment-matched Gaussian, not the prior."""
    from amortlab.evaluation.gaps import local_family
    from amortlab.nets import FlowEncoder

    torch.manual_seed(0)
    enc = FlowEncoder(6, 3, hidden=(8,), flow_hidden=6).double()
    x = 3 * torch.randn(4, 6, dtype=torch.float64)
    q0 = enc(x)
    cfg = GapsConfig(families=["ffg"], qstar=QStarConfig(init="encoder"))
    fam = local_family("ffg", 4, 3, q0, cfg, x)
    with torch.no_grad():
        z = q0.rsample(20000)
    assert (z.mean(0).abs() > 0.05).any()  # not the prior's moments
    torch.testing.assert_close(fam.mu, z.mean(0), atol=0.15, rtol=0)
    torch.testing.assert_close(fam.logvar.exp(), z.var(0), atol=0.15, rtol=0.15)
    assert fam.mu.dtype == torch.float64

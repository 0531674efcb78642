"""Per-datapoint q* and the gap decomposition against the linear-Gaussian closed forms (exact log p(x), exact
posterior, the closed-form ELBO of any diagonal q and the closed-form KL of the best mean-field Gaussian)."""
import json

import pytest
import torch

from amortlab.data.loader import Batch
from amortlab.distributions.flow import LocalGaussian
from amortlab.evaluation.gap_decomposition import GapDecomposition
from amortlab.evaluation.gaps import FlowFamilyConfig, GapsConfig, decompose, gap_table, reference_log_px
from amortlab.evaluation.qstar import QStarConfig, optimize_local
from tests.test_estimators import analytic_elbo, data, elbo_of, linear_model, perturbed_model

FAST = QStarConfig(lr=0.05, k=50, max_steps=3000, patience=100, ema=0.95, select_k=500)

CORRELATED_W = [[1.0, 0.9, 0.0], [0.9, 1.0, 0.2], [0.0, 0.3, 1.0], [0.5, 0.5, 0.5], [0.1, -0.2, 0.3], [0.0, 0.0, 0.4]]


def correlated_model():
    m = linear_model(diagonal_posterior=False)
    with torch.no_grad():
        m.decoder.W.copy_(torch.tensor(CORRELATED_W, dtype=torch.float64))
        m.encoder.set_exact(m.decoder)  # the encoder's q: the true mean with the true marginal variances
    return m


def mean_field_kl(m, x) -> float:
    """KL(q*_FFG || p(z | x)) of the best diagonal Gaussian for a Gaussian posterior with precision Lambda: mean at
    the posterior mean, variances 1 / Lambda_ii, so KL = (sum_i log Lambda_ii - log det Lambda) / 2 (every x)."""
    _, cov = m.decoder.exact_posterior(x)
    prec = torch.linalg.inv(cov)
    return float(0.5 * (torch.log(torch.diagonal(prec)).sum() - torch.logdet(prec)))


def test_qstar_gaussian_reaches_exact_posterior_and_never_below_init(one_thread):
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
    assert report["steps"] < FAST.max_steps and report["converged"].eq(1).all()  # every point stopped on its own
    assert report["kept"] == 1.0


def test_qstar_stops_per_point_and_reports_truncation(one_thread):
    """Points far from their optimum keep going after the near ones have stopped (a batch-mean rule would stop them
    together); with a too-short budget the report shows it (converged < 1, a positive tail gain)."""
    m = perturbed_model()
    x = data(m, 12)
    exact = m.decoder.exact_log_marginal(x)
    mean, cov = m.decoder.exact_posterior(x)
    init_mu = mean.clone()
    init_mu[6:] += 4.0  # the last six points start 4 posterior-sd-scale units away
    logvar = torch.log(torch.diagonal(cov)).expand(12, -1)
    cfg = QStarConfig(lr=0.02, k=50, max_steps=4000, patience=60, ema=0.95, select_k=500)
    fam, report = optimize_local(m, x, LocalGaussian(12, 3, init_mu=init_mu, init_logvar=logvar),
                                 cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        final = elbo_of(m, x, fam())
    torch.testing.assert_close(final, exact, atol=0.03, rtol=0)  # the slow points reached their optimum too
    assert report["converged"].eq(1).all()
    short = QStarConfig(lr=0.02, k=50, max_steps=150, patience=60, ema=0.95, select_k=500)
    _, trunc = optimize_local(m, x, LocalGaussian(12, 3, init_mu=init_mu, init_logvar=logvar), short,
                              torch.Generator().manual_seed(0))
    assert trunc["converged"][6:].eq(0).all()  # still climbing at the budget
    assert (trunc["tail_gain"][6:] > 0.5).all() and trunc["tail_gain"][:6].abs().max() < 0.3


def test_gap_decomposition_linear_gaussian_against_closed_forms(one_thread):
    cfg = GapsConfig(families=["ffg"], qstar=FAST, flow=FlowFamilyConfig())
    weak = perturbed_model()  # a deliberately weak encoder
    x = data(weak, 12)
    exact = weak.decoder.exact_log_marginal(x)
    g = torch.Generator().manual_seed(0)
    out = decompose(weak, x, weak.infer(x), k=2000, rows=100_000, cfg=cfg, generator=g)
    torch.testing.assert_close(out["gap/log_px"], exact, atol=0.05, rtol=0)
    assert out["gap/approximation"].abs().max() < 0.05  # the FFG family contains the true posterior
    # amortization gap = L[p(z|x)] - L[q] = log p(x) - closed-form ELBO of the encoder's q
    torch.testing.assert_close(out["gap/amortization"], exact - analytic_elbo(weak, x), atol=0.05, rtol=0)
    assert out["gap/amortization"].mean() > 0.1
    torch.testing.assert_close(out["gap/L_q"], analytic_elbo(weak, x), atol=0.05, rtol=0)
    # the exact encoder has no amortization gap either
    exact_enc = linear_model()
    out2 = decompose(exact_enc, x, exact_enc.infer(x), k=2000, rows=100_000, cfg=cfg, generator=g)
    assert out2["gap/amortization"].abs().max() < 0.05 and out2["gap/inference"].abs().max() < 0.05


def test_flow_qstar_closes_the_mean_field_gap_on_a_correlated_posterior(one_thread):
    """Correlated posterior: q*_FFG's approximation gap is the closed-form mean-field KL; q*_Flow (started at
    q*_FFG) does better, and both stay below the exact log p(x)."""
    m = correlated_model()
    x = data(m, 6)
    exact = m.decoder.exact_log_marginal(x)
    kl = mean_field_kl(m, x)
    assert kl > 0.1
    cfg = GapsConfig(families=["ffg", "flow"], qstar=QStarConfig(lr=0.02, k=50, max_steps=600, patience=100,
                                                                 select_k=500, init="encoder"),
                     flow=FlowFamilyConfig(hidden=20))
    out = decompose(m, x, m.infer(x), k=2000, rows=100_000, cfg=cfg, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(exact - out["gap/L_qstar_ffg"], torch.full_like(exact, kl), atol=0.05, rtol=0)
    assert (out["gap/L_qstar_flow"] <= exact + 0.02).all()
    assert (exact - out["gap/L_qstar_flow"]).mean() < kl - 0.03  # the flow family holds part of the correlation
    for key in ("gap/qstar_converged_frac_ffg", "gap/qstar_converged_frac_flow", "gap/qstar_tail_gain_flow"):
        assert out[key].shape == (6,) and torch.isfinite(out[key]).all()
    table = gap_table({"m": {f"test/{k}": v.mean().item() for k, v in out.items()}})
    assert "L[q*_Flow]" in table and "Amortization" in table


def test_reference_with_ais_is_ais_alone(one_thread):
    """With AIS the reference is AIS, even where an IWAE estimate from q* comes out higher (no selection)."""
    m = correlated_model()
    x = data(m, 6)
    cfg = GapsConfig(families=["ffg"], qstar=QStarConfig(lr=0.02, k=20, max_steps=100, patience=50, select_k=100))
    weak_ais = analytic_elbo(m, x) - 1.0  # an "AIS" 1 nat below L[q]: a selection rule would never pick it
    out = decompose(m, x, m.infer(x), k=500, rows=100_000, cfg=cfg, generator=torch.Generator().manual_seed(1),
                    ais_fn=lambda xx: weak_ais.clone())
    assert torch.equal(out["gap/log_px"], weak_ais) and torch.equal(out["gap/log_px_ais"], weak_ais)


def test_reference_without_ais_is_chosen_on_an_independent_pass(one_thread):
    """The IWAE reference is picked by fresh samples, not by the values it reports: reported estimates that say
    'candidate 0 is best' do not override a selection pass in which candidate 1 is (and vice versa)."""
    m = perturbed_model()
    x = data(m, 8)
    weak_q = m.infer(x)
    good = linear_model().infer(x)  # the exact posterior: a far better proposal than the perturbed encoder's
    proposals = [lambda n, g: m.log_weights(x, weak_q, n, g), lambda n, g: m.log_weights(x, good, n, g)]
    reported = [torch.zeros(8, dtype=torch.float64), torch.full((8,), -50.0, dtype=torch.float64)]
    value, j = reference_log_px(m, x, proposals, reported, 200, 100_000, torch.Generator().manual_seed(0))
    assert j == 1 and torch.equal(value, reported[1])
    value, j = reference_log_px(m, x, proposals[::-1], reported, 200, 100_000, torch.Generator().manual_seed(0))
    assert j == 0 and torch.equal(value, reported[0])


def test_evaluate_batch_with_gaps_estimator_against_exact(one_thread):
    m = perturbed_model()
    x = data(m, 8)
    exact = m.decoder.exact_log_marginal(x)
    out = m.evaluate_batch(Batch(x, 0), k=5000, estimator=GapDecomposition(families=["ffg"], qstar=FAST))
    torch.testing.assert_close(-out["nll"], exact, atol=0.05, rtol=0)
    # the 5000-sample ELBO of the weak q has a Monte Carlo sd of ~0.03-0.05 nats here
    torch.testing.assert_close(out["inference_gap"], exact - analytic_elbo(m, x), atol=0.15, rtol=0)


def test_ffg_qstar_of_a_flow_q_starts_at_its_moments(one_thread):
    """q*_FFG of a flow posterior (no Gaussian parameters) starts at the flow's moment-matched Gaussian."""
    from amortlab.evaluation.gaps import local_family
    from amortlab.nets import FlowEncoder

    torch.manual_seed(0)
    enc = FlowEncoder(6, 3, hidden=(8,), flow_hidden=6).double()
    x = 3 * torch.randn(4, 6, dtype=torch.float64)
    q0 = enc(x)
    cfg = GapsConfig(families=["ffg"], qstar=QStarConfig(init="encoder"))
    fam = local_family("ffg", 4, 3, q0, cfg, x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = q0.rsample(20000)
    assert (z.mean(0).abs() > 0.05).any()  # not the prior's moments
    se = (z.var(0) / 256).sqrt()  # the start is a 256-draw sample mean
    assert ((fam.mu - z.mean(0)).abs() < 4 * se + 0.01).all()
    torch.testing.assert_close(fam.logvar.exp(), z.var(0), atol=0.05, rtol=0.4)  # 256 draws: ~9% relative sd
    assert fam.mu.dtype == torch.float64


def test_flow_qstar_of_a_flow_q_is_its_family_and_never_below_it(one_thread):
    """For a flow-trained model q*_Flow has the encoder's flow shape and starts from the encoder's flow too, so its
    bound is not below L[q] (measured on independent samples)."""
    from amortlab.evaluation.gaps import fit_qstar
    from amortlab.methods import AmortizedVAE
    from amortlab.nets import BernoulliDecoder, FlowEncoder

    torch.manual_seed(0)
    enc = FlowEncoder(10, 3, hidden=(16,), flow_hidden=7, flow_steps=3).double()
    m = AmortizedVAE(enc, decoder=BernoulliDecoder(10, 3, (16,)).double())
    x = torch.bernoulli(torch.full((5, 10), 0.4, dtype=torch.float64))
    q = m.infer(x)
    cfg = GapsConfig(families=["ffg", "flow"], qstar=QStarConfig(lr=0.01, k=20, max_steps=60, patience=20,
                                                                 select_k=200, init="encoder"))
    fits = fit_qstar(m, x, q, cfg, torch.Generator().manual_seed(0))
    flow = fits["flow"]
    assert len(flow.members) == 2 and flow.choice is not None
    for member in flow.members:
        assert member.flow.steps == 3 and member.flow.hidden == 7
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        L_q = m.log_weights(x, q, 4000, g).mean(0)
        L_flow = flow.log_weights(m, x, 4000, g).mean(0)
    assert (L_flow >= L_q - 0.05).all()


@pytest.mark.slow
def test_gaps_cli_flow_posterior_reproducible_and_ddp_equal(tmp_path):
    """evaluation=gaps on a flow-trained run, AIS on: results.json gap keys and gaps.md; re-evaluating the checkpoint
    gives the same numbers, and so do 2 gloo processes."""
    from tests.test_cli import train

    small = ["posterior=flow", "model.encoder.z_dim=8", "model.encoder.hidden=[32]", "model.decoder.hidden=[32]",
             "model.encoder.flow_hidden=10"]
    gaps = ["evaluation=gaps", "evaluation.estimator.ais=true", "evaluation.estimator.ais_settings.n_intermediate=10",
            "evaluation.estimator.ais_settings.n_chains=2", "evaluation.estimator.ais_settings.pilot_chains=2",
            "evaluation.estimator.qstar.max_steps=20", "evaluation.estimator.qstar.patience=5",
            "evaluation.estimator.qstar.init=encoder", "dataset.eval_batch_size=180",
            "evaluation.estimator.qstar.select_k=50", "importance_samples.test=50", "evaluation.val=false"]
    train(*small, "logger=none", "trainer.max_epochs=1", *gaps, "evaluation.train_points=30",
          run_dir=tmp_path / "fit")
    r = json.loads((tmp_path / "fit" / "results.json").read_text())
    m = r["metrics"]
    for key in ("gap/log_px", "gap/log_px_ais", "gap/L_q", "gap/L_qstar_ffg", "gap/L_qstar_flow",
                "gap/approximation", "gap/amortization", "gap/inference", "gap/qstar_converged_frac",
                "gap/qstar_tail_gain"):
        assert f"test/{key}" in m, key
    assert m["test/n_points"] == 359 and m["train/n_points"] == 30
    assert 0.0 <= m["test/gap/qstar_converged_frac"] <= 1.0
    assert m["test/gap/L_qstar_flow"] >= m["test/gap/L_q"] - 0.1  # started at the encoder's flow as well
    for split in ("test", "train"):  # the flow q's active units (Monte Carlo posterior means), in the table too
        assert isinstance(m[f"{split}/active_units"], int) and 0 <= m[f"{split}/active_units"] <= 8
    table = (tmp_path / "fit" / "gaps.md").read_text()
    assert f"| Active units | {m['test/active_units']} |" in table
    assert "| L[q*_Flow] |" in table and "test split (359 points" in table and "train split (30 points" in table

    ckpt = r["checkpoints"]["evaluated"]
    common = ["train=false", f"ckpt_path={ckpt}", *small, "logger=none", *gaps]
    train(*common, run_dir=tmp_path / "again")
    train(*common, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", run_dir=tmp_path / "two")
    again = json.loads((tmp_path / "again" / "results.json").read_text())["metrics"]
    two = json.loads((tmp_path / "two" / "results.json").read_text())["metrics"]
    keys = [k for k in m if k.startswith("test/gap/")]
    assert len(keys) >= 15
    for key in keys:
        assert again[key] == pytest.approx(m[key], abs=1e-9), key
        assert two[key] == pytest.approx(m[key], abs=1e-9), key


@pytest.mark.slow
def test_gaps_cli_draws_the_posterior_figure_for_a_2d_latent(tmp_path):
    """A 2-D latent model: evaluation=gaps writes images/posteriors.png and logs it to the (offline) W&B run."""
    from PIL import Image

    from tests.test_cli import train

    run = tmp_path / "run"
    train("model.encoder.z_dim=2", "model.encoder.hidden=[32]", "model.decoder.hidden=[32]", "trainer.max_epochs=1",
          "evaluation=gaps", "evaluation.estimator.qstar.max_steps=30",
          "evaluation.estimator.qstar.select_k=50", "evaluation.estimator.flow.hidden=10", "importance_samples.test=50",
          "trainer.limit_test_batches=1",
          "evaluation.val=false", "dataset.eval_batch_size=50", "logger=wandb", f"logger.save_dir={tmp_path}",
          run_dir=run, env={"WANDB_MODE": "offline"})
    png = run / "images" / "posteriors.png"
    with Image.open(png) as im:
        assert im.width > 400 and im.height > 400  # 4 rows x 4 columns of contour panels
    logged = list(tmp_path.glob("wandb/offline-run-*/files/media/images/images/posteriors_*.png"))
    assert logged, sorted(str(p) for p in tmp_path.rglob("*.png"))

"""Sequence models and filtering inference (issue 20) against exact linear-Gaussian references.

The linear-Gaussian state-space model has an exact log p(x_1:T): the Kalman filter, checked here against the dense
multivariate-normal density of all observations at once; every estimator is then checked against it.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amortlab.build import build_from_overrides
from amortlab.data.loader import Batch
from amortlab.errors import AmortlabError
from amortlab.evaluation.smc import smc_log_likelihood, systematic_resample
from amortlab.metrics import SplitMetrics
from amortlab.models import SRNN, LinearGaussianSSM
from amortlab.models.sequence import gaussian_log_prob, split_rows
from amortlab.objectives import k_sample_bound

ROOT = Path(__file__).resolve().parent.parent


def dense_log_likelihood(model: LinearGaussianSSM, x: torch.Tensor) -> torch.Tensor:
    """log p(x_1:T) ``[B]`` from the joint Gaussian of all T*X observations (no recursion): mean C A^{t-1} mu0,
    Cov(z_s, z_t) = A^{t-s} V_s (t >= s), V_t = A V_{t-1} A^T + Q, Cov(x_s, x_t) = C Cov(z_s, z_t) C^T + [s=t] R."""
    p = model.params()
    T, X = x.shape[1], p.x_dim
    Q, R = torch.diag(p.q ** 2), torch.diag(p.r ** 2)
    means, V = [p.mu0], [torch.diag(p.s0 ** 2)]
    for _ in range(1, T):
        means.append(p.A @ means[-1])
        V.append(p.A @ V[-1] @ p.A.T + Q)
    cov = torch.zeros(T * X, T * X, dtype=torch.float64)
    for s in range(T):
        for t in range(s, T):
            czz = torch.linalg.matrix_power(p.A, t - s) @ V[s]  # Cov(z_t, z_s)
            block = p.C @ czz @ p.C.T + (R if s == t else 0)
            cov[t * X:(t + 1) * X, s * X:(s + 1) * X] = block
            cov[s * X:(s + 1) * X, t * X:(t + 1) * X] = block.T
    mean = torch.cat([p.C @ m for m in means])
    return torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).log_prob(x.double().reshape(len(x), -1))


def _lgssm(**kw) -> LinearGaussianSSM:
    return LinearGaussianSSM(**{"z_dim": 2, "x_dim": 3, "param_seed": 1, **kw})


def _sample(model: LinearGaussianSSM, n: int, T: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x, _ = model.params().sample(n, T, torch.Generator().manual_seed(seed))
    return x.float(), torch.ones(n, T)


def _bootstrap(t, prep, x_t, c_t, z_prev, mu_p, lv_p, g):
    """q(z_t | .) = p(z_t | z_{t-1}): the bootstrap particle filter's proposal."""
    z = mu_p + torch.exp(0.5 * lv_p) * torch.randn(mu_p.shape, generator=g)
    return z, gaussian_log_prob(z, mu_p, lv_p), None


def _estimate(model, sampler, x, mask, K, thr, reps, seed=1, prep=None) -> torch.Tensor:
    """Mean over ``reps`` independent runs of the SMC estimate ``[B]`` (thr = 0: no resampling, K = 1: an ELBO
    sample, K > 1: IWAE-K over whole sequences)."""
    g = torch.Generator().manual_seed(seed)
    c = model.context(x)
    runs = [smc_log_likelihood(model, sampler, x, mask, c, K, g, thr, prep)[0] for _ in range(reps)]
    return torch.stack(runs).mean(0)


# --- the exact reference ------------------------------------------------------------------------------------------
def test_kalman_equals_the_dense_gaussian_likelihood_and_handles_padding():
    model = _lgssm()
    x, mask = _sample(model, 5, 7)
    kal = model.kalman_log_likelihood(x, mask)
    assert torch.allclose(kal, dense_log_likelihood(model, x), atol=1e-8)
    mask[:, 4:] = 0  # the last 3 steps are padding: the value is that of the 4-step prefix
    assert torch.allclose(model.kalman_log_likelihood(x, mask), dense_log_likelihood(model, x[:, :4]), atol=1e-8)


def test_smc_with_the_locally_optimal_proposal_converges_to_kalman():
    model = _lgssm()
    x, mask = _sample(model, 40, 20, seed=3)
    kal = model.kalman_log_likelihood(x, mask)
    errors, bias = [], []
    for K in (1, 10, 300):
        est = _estimate(model, model.optimal_sample_step, x, mask, K, 0.5, reps=3)
        errors.append(float((est - kal).abs().mean()))
        bias.append(float((est - kal).mean()))
    # the error shrinks like 1 / sqrt(K) (measured: 7.7, 0.89, 0.12 nats per 20-step sequence; 0.04 at K = 4000)
    assert errors[0] > 4 * errors[1] > 16 * errors[2]
    assert errors[2] < 0.25 and abs(bias[2]) < 0.08, (errors, bias)
    # one particle without resampling is an ELBO sample of the Bayes filter: below log p(x) on average
    assert float((_estimate(model, model.optimal_sample_step, x, mask, 1, 0.0, reps=20) - kal).mean()) < -0.5


def test_systematic_resampling_follows_the_weights():
    w = torch.tensor([0.1, 0.6, 0.3])
    anc = systematic_resample(w.log()[:, None].expand(3, 4000).contiguous(), torch.Generator().manual_seed(0))
    freq = torch.bincount(anc.flatten(), minlength=3).double() / anc.numel()
    assert torch.allclose(freq, w.double(), atol=0.02)


# --- trained filters on the linear-Gaussian model -----------------------------------------------------------------
def _train(overrides: list[str], epochs: int, lr: float = 1e-2):
    torch.manual_seed(0)
    module, dm = build_from_overrides(["dataset=lgssm", "model=lgssm", "logger=none", "dataset.n_train=1000",
                                       *overrides])
    module.init_output_bias(dm.train_mean)
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr)
    train = dm.splits["train"]
    for _ in range(epochs):
        perm = torch.randperm(len(train))
        for i in range(0, len(train), 100):
            loss = -module.bound(train[perm[i:i + 100]], 1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    module.eval()
    return module, dm


@pytest.fixture(scope="module")
def direct_filter():
    return _train(["inference=filtering"], epochs=12)


@pytest.fixture(scope="module", params=["gradient", "error"])
def avf2(request):
    return _train(["inference=avf", "inference.steps=2", f"inference.encoding={request.param}"], epochs=4)


def test_bounds_lie_below_kalman_and_tighten(direct_filter):
    module, dm = direct_filter
    model = module.model
    x, mask = split_rows(dm.splits["test"][:100], model.step_dim)
    kal = float(model.kalman_log_likelihood(x, mask).mean())
    assert kal == pytest.approx(float(dense_log_likelihood(model, x).mean()), abs=1e-6)
    with torch.no_grad():
        prep = module.prepare(x, model.context(x))
        elbo = float(_estimate(model, module.sample_step, x, mask, 1, 0.0, reps=10, prep=prep).mean())
        iwae10 = float(_estimate(model, module.sample_step, x, mask, 10, 0.0, reps=3, seed=2, prep=prep).mean())
        iwae100 = float(_estimate(model, module.sample_step, x, mask, 100, 0.0, reps=2, seed=3, prep=prep).mean())
        smc100 = float(_estimate(model, module.sample_step, x, mask, 100, 0.5, reps=2, seed=4, prep=prep).mean())
    assert elbo < iwae10 < iwae100 < kal
    # the method's own path (ancestral scan, then every step scored at once) against the step-by-step weights above
    rows, g = dm.splits["test"][:100], torch.Generator().manual_seed(7)
    with torch.no_grad():
        q = module.infer(rows)
        own_elbo = float(torch.stack([module.log_weights(rows, q, 1, g)[0] for _ in range(10)]).mean())
        own_iwae100 = float(torch.stack([k_sample_bound(module.log_weights(rows, q, 100, g))
                                         for _ in range(2)]).mean())
    assert own_elbo == pytest.approx(elbo, abs=0.6) and own_iwae100 == pytest.approx(iwae100, abs=0.3)
    assert iwae100 < smc100 <= kal + 0.05  # resampling helps; the estimate is unbiased in p, so below in log
    assert kal - smc100 < 1.0


def test_trained_direct_filter_approaches_the_optimal_filtering_bound(direct_filter):
    """The Bayes filter q(z_t | z_{t-1}, x_t) = p(z_t | z_{t-1}, x_t) (the locally optimal proposal) sets the
    reference filtering bound; the bootstrap filter q = p(z_t | z_{t-1}) the untrained end. A trained direct filter
    closes (almost) all of the distance between them and stays below log p(x)."""
    module, dm = direct_filter
    model = module.model
    x, mask = split_rows(dm.splits["test"][:100], model.step_dim)
    with torch.no_grad():
        prep = module.prepare(x, model.context(x))
        trained = float(_estimate(model, module.sample_step, x, mask, 1, 0.0, reps=20, prep=prep).mean())
    bayes = float(_estimate(model, model.optimal_sample_step, x, mask, 1, 0.0, reps=20).mean())
    boot = float(_estimate(model, _bootstrap, x, mask, 1, 0.0, reps=20).mean())
    kal = float(model.kalman_log_likelihood(x, mask).mean())
    assert boot < bayes < kal
    assert trained < kal
    assert bayes - trained < 0.02 * (bayes - boot), (boot, trained, bayes, kal)  # measured: 2.4 of 366 nats


def test_avf_steps_do_not_lower_the_bound(avf2):
    """Either encoding (gradient of the step's term, or the prediction errors): after training, every update
    improves the filtering bound of its step, and the last one does not undo the first."""
    module, dm = avf2
    with torch.no_grad():
        out = module.evaluate_batch(Batch(dm.splits["test"][:200], 0), 10, "test")
    steps = [float(out[f"neg_elbo_step/{i}"].mean()) for i in range(3)]
    assert steps[0] > steps[1] + 5.0  # the first update improves on the prior's prediction by a wide margin
    assert steps[2] <= steps[1] + 0.2
    assert float(out["neg_elbo"].mean()) == pytest.approx(steps[2], abs=0.5)  # the final iterate is the filter
    assert float(out["nll_kalman"].mean()) < float(out["nll"].mean()) < float(out["neg_elbo"].mean())


# --- causality and the SRNN's parallel scoring --------------------------------------------------------------------
def _srnn_method(inference: str):
    from amortlab.methods import AVF, FilteringVAE
    from amortlab.nets.sequence import FilterEncoder

    torch.manual_seed(0)
    model = SRNN(step_dim=5, z_dim=3, rnn_dim=8, hidden=[16], emission="bernoulli")
    if inference == "filtering":
        return FilteringVAE(model=model, filter=FilterEncoder(5, 8, 3, [16]))
    return AVF(model=model, steps=2, hidden=[16])


@pytest.mark.parametrize("inference", ["filtering", "avf"])
def test_q_t_never_reads_future_observations(inference):
    """Perturbing x_s changes q(z_t | .) only for t >= s (same noise), and for the direct filter the gradient of
    q's mean at t w.r.t. x_s is zero for every s > t and non-zero for s <= t."""
    method = _srnn_method(inference)
    T = 6
    x = torch.bernoulli(torch.full((4, T, 5), 0.5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, T)

    def mu_q(x):
        tr = method.scan(x, mask, method.model.context(x), 2, torch.Generator().manual_seed(1))
        return tr.mu_q  # [k, B, T, Z]

    base = mu_q(x)
    for s in range(T):
        x2 = x.clone()
        x2[:, s] = 1 - x2[:, s]
        moved = (mu_q(x2) - base).abs().amax(dim=(0, 1, 3))  # [T]
        assert torch.all(moved[:s] == 0), (s, moved)
        assert torch.all(moved[s:] > 0), (s, moved)
    if inference == "filtering":
        for t in range(T):
            xg = x.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(mu_q(xg)[:, :, t].sum(), xg)
            per_step = grad.abs().sum(dim=(0, 2))
            assert torch.all(per_step[t + 1:] == 0) and torch.all(per_step[:t + 1] > 0), (t, per_step)


def test_srnn_parallel_scoring_equals_the_step_by_step_model():
    model = SRNN(step_dim=4, z_dim=3, rnn_dim=6, hidden=[8], emission="gaussian")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.float32)
    z = torch.randn(3, 2, 5, 3, generator=g)
    log_px, log_pz = model.log_joint_steps(x, mask, z)
    # step by step: the GRU state by hand, the prior from z_{t-1} (z_0 = 0), the emission at each step
    h = torch.zeros(1, 2, 6)
    x_prev = torch.zeros(2, 1, 4)
    for t in range(5):
        d_t, h = model.rnn(x_prev, h)
        d_t = d_t[:, 0]
        z_prev = z[:, :, t - 1] if t else torch.zeros(3, 2, 3)
        mu, lv = model.prior(z_prev, d_t, first=t == 0)
        want_pz = gaussian_log_prob(z[:, :, t], mu, lv) * mask[:, t]
        want_px = model.log_emission(x[:, t], z[:, :, t], d_t) * mask[:, t]
        assert torch.allclose(log_pz[:, :, t], want_pz, atol=1e-5)
        assert torch.allclose(log_px[:, :, t], want_px, atol=1e-5)
        x_prev = x[:, t:t + 1]
    assert torch.all(log_px[:, 1, 3:] == 0) and torch.all(log_pz[:, 1, 3:] == 0)


# --- metrics, configuration, the command line ---------------------------------------------------------------------
def test_per_step_ratio_is_total_over_total_steps():
    m = SplitMetrics(["nll", "steps"], 2, ratios={"nll_per_step": ("nll", "steps")})
    m.update({"nll": torch.tensor([10.0, 40.0]), "steps": torch.tensor([2.0, 8.0])}, torch.zeros(2, 2))
    m.update({"nll": torch.tensor([5.0]), "steps": torch.tensor([1.0])}, torch.zeros(1, 2))
    out = m.compute("test")
    assert out["test/nll_per_step"] == pytest.approx(55.0 / 11.0)  # not the mean of the ratios (5, 5, 5 -> 5)
    assert out["test/nll"] == pytest.approx(55.0 / 3)


@pytest.mark.parametrize("overrides, needle", [
    (["dataset=lgssm"], "model is static"),
    (["model=srnn"], "not a sequence dataset"),
    (["dataset=lgssm", "model=lgssm"], "sequence models take inference=filtering"),
    (["dataset=moving_mnist", "model=lgssm", "inference=filtering"], "model=lgssm takes its parameters"),
    (["evaluation=smc"], "evaluation=smc is a particle filter"),
    (["dataset=lgssm", "model=lgssm", "inference=avf", "evaluation=gaps"], "sequence models are evaluated with"),
    (["dataset=lgssm", "model=lgssm", "inference=filtering", "posterior=gaussian"], "do not use"),
])
def test_incompatible_choices_are_refused_before_anything_runs(overrides, needle):
    with pytest.raises(AmortlabError, match=needle):
        build_from_overrides([*overrides, "logger=none"])


def test_sequence_methods_refuse_regularizers():
    with pytest.raises(AmortlabError, match="encoder_regularizer=denoising is not supported"):
        build_from_overrides(["dataset=lgssm", "model=lgssm", "inference=filtering", "encoder_regularizer=denoising",
                              "logger=none"])


@pytest.mark.slow
def test_cli_avf_on_lgssm_reports_per_step_results_and_the_exact_value(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), "dataset=lgssm", "model=lgssm", "inference=avf",
           "inference.steps=2", "evaluation=smc", "importance_samples.test=50", "trainer.max_epochs=2",
           "dataset.n_train=400", "dataset.n_test=100", "logger=none", f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    m = json.loads((tmp_path / "results.json").read_text())["metrics"]
    # the exact value, computed here from the dataset's own parameters without the Kalman recursion
    from amortlab.data import LGSSMDataModule

    dm = LGSSMDataModule(n_train=400, n_test=100)
    dm.setup()
    x, _ = split_rows(dm.splits["test"], 4)
    exact = float(dense_log_likelihood(LinearGaussianSSM(), x).mean())
    assert m["test/nll_kalman"] == pytest.approx(-exact, rel=1e-6)
    assert m["test/steps"] == 20 and m["test/n_points"] == 100
    assert m["test/nll_per_step"] == pytest.approx(m["test/nll"] / 20)
    assert m["test/nll_kalman_per_step"] == pytest.approx(-exact / 20, rel=1e-6)
    for i in range(3):
        assert math.isfinite(m[f"test/neg_elbo_step/{i}"])
    assert m["test/nll_kalman"] <= m["test/nll"] + 0.05 <= m["test/nll_iwae"] + 0.05 <= m["test/neg_elbo"] + 0.05
    assert 0 < m["test/smc_ess"] <= 1 and m["test/infer_seconds_per_step"] > 0


@pytest.mark.slow
def test_cli_sequence_evaluation_on_two_processes_equals_one(tmp_path):
    """A sequence method (filtering on the LGSSM: per-step ratios sum(nll) / sum(steps), the Kalman NLL) trained and
    evaluated on 2 gloo processes, splits of 150 and 250 sequences in batches of 100: every key of results.json's
    metrics equals the 1-process evaluation of the evaluated checkpoint."""
    from tests.test_cli import assert_same_on_any_world_size, results, train

    common = ["dataset=lgssm", "model=lgssm", "inference=filtering", "dataset.n_train=400", "dataset.n_val=150",
              "dataset.n_test=250", "importance_samples.test=20", "logger=none"]
    train(*common, "trainer.max_epochs=2", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
          run_dir=tmp_path / "two")
    r = results(tmp_path / "two")
    train(*common, "train=false", f"ckpt_path={r['checkpoints']['evaluated']}", run_dir=tmp_path / "one")
    a = results(tmp_path / "one")["metrics"]
    assert (a["val/n_points"], a["test/n_points"]) == (150, 250) and "test/nll_kalman_per_step" in a
    assert_same_on_any_world_size(a, r["metrics"])


@pytest.mark.slow
def test_cli_music_paper_config_runs_when_the_file_is_present(tmp_path):
    """experiment=avf_music is ready for the real corpus: with a small pickle in the canonical format under the
    canonical name, the paper configuration (shrunk) trains and evaluates whole, ragged pieces with SMC."""
    from tests.test_sequence_data import write_music

    rng = torch.Generator().manual_seed(0)

    def piece(n):
        return [tuple(int(v) for v in torch.randint(21, 109, (3,), generator=rng)) for _ in range(n)]

    write_music(tmp_path, "jsb_chorales", {"train": [piece(6 + i % 5) for i in range(20)],
                                           "valid": [piece(7), piece(9)], "test": [piece(5), piece(8), piece(10)]})
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=avf_music", "dataset=jsb_chorales", "inference=avf",
           "inference.steps=2", f"data_dir={tmp_path}", "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=1",
           "model.generative.z_dim=4", "model.generative.rnn_dim=8", "model.generative.hidden=[8]",
           "model.update_hidden=[8]", "importance_samples.test=20", "dataset.batch_size=4", "logger=none",
           f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    m = r["metrics"]
    assert r["data"]["steps"] == 10 and m["test/n_points"] == 3
    assert m["test/steps"] == pytest.approx((5 + 8 + 10) / 3)  # padding steps are not counted
    assert m["test/nll_per_step"] == pytest.approx(m["test/nll"] * 3 / 23)  # total over total steps
    assert m["test/nll_per_step"] < 88 * math.log(2)  # better than a fair coin per key
    assert "-ELBO after each AVF update" in proc.stdout + proc.stderr


@pytest.mark.parametrize("inference", ["filtering", "avf"])
def test_training_with_k_trajectories_is_the_iwae_bound_over_sequences(inference):
    """importance_samples.train=k trains on L_k over k whole trajectories: for an untrained filter the k = 5 bound
    lies above the ELBO (independent draws, averaged over 200 sequences) and below the Kalman value, and it has
    gradients for the filter."""
    torch.manual_seed(0)
    module, dm = build_from_overrides(["dataset=lgssm", "model=lgssm", f"inference={inference}",
                                       "importance_samples=k5", "logger=none"])
    assert module.k_train == 5
    x = dm.splits["train"][:200]
    with torch.no_grad():
        l1 = float(torch.stack([module.bound(x, 1) for _ in range(5)]).mean())
    l5 = module.bound(x, module.k_train)
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(l5.mean(), params, allow_unused=True)
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)
    xs, mask = split_rows(x, 4)
    kal = float(module.model.kalman_log_likelihood(xs, mask).mean())
    assert l1 + 5.0 < float(l5.detach().mean()) < kal

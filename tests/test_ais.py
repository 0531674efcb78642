"""AIS with HMC transitions against the exact log p(x) of the linear-Gaussian VAE, and against IWAE on a small
Bernoulli MLP decoder (where AIS must be the stronger estimate)."""
import math

import pytest
import torch

from amortlab.evaluation import iwae_estimate
from amortlab.evaluation.ais import AISConfig, ais_log_likelihood, ais_schedule, run_ais
from amortlab.nets import BernoulliDecoder
from tests.test_estimators import Z_DIM, data, linear_model

# moderate settings for the accuracy tests: 500 annealing steps, many (cheap, batched) chains for a small variance
ACCURATE = dict(n_intermediate=500, n_chains=256)


def correlated_model():
    """Linear-Gaussian VAE whose exact posterior has a non-diagonal covariance."""
    m = linear_model(diagonal_posterior=False)
    with torch.no_grad():
        m.decoder.W.copy_(torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.2], [0.0, 0.3, 1.0], [0.5, 0.5, 0.5],
                                        [0.1, -0.2, 0.3], [0.0, 0.0, 0.4]], dtype=torch.float64))
    return m


def problem(diagonal: bool):
    m = linear_model() if diagonal else correlated_model()
    x = data(m, 16)
    return m, x, m.decoder.exact_log_marginal(x)


_cache = {}


pytestmark = pytest.mark.usefixtures("one_thread")


def accurate_run(diagonal: bool, schedule: str):
    """One AIS run per (model, schedule), shared by the tests that look at it."""
    key = (diagonal, schedule)
    if key not in _cache:
        m, x, exact = problem(diagonal)
        res = run_ais(m.decoder.log_prob, x, Z_DIM, AISConfig(schedule=schedule, **ACCURATE),
                      torch.Generator().manual_seed(0))
        _cache[key] = (res, exact)
    return _cache[key]


def test_schedules():
    for schedule in ("linear", "sigmoid"):
        b = ais_schedule(100, schedule, 4.0)
        assert b.shape == (101,) and b.dtype == torch.float64
        assert b[0] == 0 and b[-1] == 1 and (b.diff() > 0).all()
    torch.testing.assert_close(ais_schedule(4, "linear"), torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=torch.float64))
    s = 4.0
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected = (sig(s * (2 * 0.25 - 1)) - sig(-s)) / (sig(s) - sig(-s))
    assert ais_schedule(4, "sigmoid", s)[1].item() == pytest.approx(expected, abs=1e-12)
    b = ais_schedule(100, "sigmoid", 4.0)
    assert b[10] < 0.05 and 1 - b[90] < 0.05  # denser near both ends than the linear schedule (0.1 there)
    with pytest.raises(ValueError, match="schedule"):
        AISConfig(schedule="cosine")
    with pytest.raises(ValueError):
        AISConfig(n_chains=0)


@pytest.mark.parametrize("schedule", ["sigmoid", "linear"])
@pytest.mark.parametrize("diagonal", [True, False], ids=["diagonal_posterior", "correlated_posterior"])
def test_matches_exact_log_px(diagonal, schedule):
    res, exact = accurate_run(diagonal, schedule)
    err = res.log_px - exact
    assert res.log_px.shape == (16,) and res.log_px.dtype == torch.float64
    assert res.log_weights.shape == (ACCURATE["n_chains"], 16) and res.z.shape == (ACCURATE["n_chains"], 16, Z_DIM)
    assert err.abs().mean() < 0.1, err
    assert err.abs().max() < 0.1, err
    assert err.mean() < 0.03  # a lower bound in expectation: no visible upward bias (step-size adaptation included)


def test_few_intermediate_distributions_are_worse():
    """Same chains, T = 2 vs T = 500: with few steps AIS is little better than importance sampling from the prior."""
    m, x, exact = problem(diagonal=True)
    est = {T: ais_log_likelihood(m.decoder.log_prob, x, Z_DIM, AISConfig(n_intermediate=T, n_chains=4),
                                 torch.Generator().manual_seed(0)) for T in (2, 500)}
    assert (est[2] - exact).mean() < (est[500] - exact).mean() - 0.3


def test_acceptance_rate_and_step_size_sane():
    res, _ = accurate_run(False, "sigmoid")
    assert 0.5 < res.mean_accept_rate < 0.9  # adapts towards target_accept = 0.65 (the start, at 0.05, accepts all)
    assert ((res.accept_rate > 0.4) & (res.accept_rate < 0.95)).all()
    assert ((res.step_size > 0.05) & (res.step_size < 1.0)).all()  # grew from init_step_size, below the cap
    # a far too large fixed step is (almost) always rejected; adaptation from the same start recovers
    m, x, _ = problem(diagonal=False)
    big = dict(n_intermediate=200, n_chains=8, init_step_size=3.0, max_step_size=3.0)
    fixed = run_ais(m.decoder.log_prob, x, Z_DIM, AISConfig(adapt=False, **big), torch.Generator().manual_seed(0))
    adapted = run_ais(m.decoder.log_prob, x, Z_DIM, AISConfig(adapt=True, **big), torch.Generator().manual_seed(0))
    assert fixed.mean_accept_rate < 0.2 < 0.4 < adapted.mean_accept_rate  # the pilot-tuned schedule recovers


def test_reproducible_with_a_generator():
    m, x, _ = problem(diagonal=False)
    cfg = AISConfig(n_intermediate=20, n_chains=4)
    a = run_ais(m.decoder.log_prob, x, Z_DIM, cfg, torch.Generator().manual_seed(3))
    b = run_ais(m.decoder.log_prob, x, Z_DIM, cfg, torch.Generator().manual_seed(3))
    c = run_ais(m.decoder.log_prob, x, Z_DIM, cfg, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a.log_weights, b.log_weights, atol=0, rtol=0)
    torch.testing.assert_close(a.step_size, b.step_size, atol=0, rtol=0)
    assert not torch.equal(a.log_px, c.log_px)


def test_works_under_inference_mode_and_leaves_parameters_alone():
    m, x, _ = problem(diagonal=True)
    cfg = AISConfig(n_intermediate=20, n_chains=4)
    outside = ais_log_likelihood(m.decoder.log_prob, x, Z_DIM, cfg, torch.Generator().manual_seed(0))
    with torch.inference_mode():
        x_inf = x.clone()  # an inference tensor, as in Lightning's test loop
        inside = ais_log_likelihood(m.decoder.log_prob, x_inf, Z_DIM, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        no_grad = ais_log_likelihood(m.decoder.log_prob, x, Z_DIM, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(inside, outside, atol=0, rtol=0)
    torch.testing.assert_close(no_grad, outside, atol=0, rtol=0)
    assert all(p.grad is None for p in m.parameters())  # gradients only with respect to z


def test_stronger_than_iwae_on_a_bernoulli_mlp():
    """x_dim 20, z_dim 3, a sharpened random MLP decoder (float32). AIS with many steps agrees with a 200k-sample
    prior importance estimate (near-exact in 3 dimensions) and beats IWAE-100 from the prior on average."""
    torch.manual_seed(0)
    dec = BernoulliDecoder(20, 3, hidden=(50, 50))
    with torch.no_grad():  # larger weights: a sharper, non-Gaussian posterior that prior sampling finds rarely
        dec.net[0].weight.mul_(10.0)
        dec.net[-1].weight.mul_(10.0)
    B = 16
    x = torch.bernoulli(torch.sigmoid(dec(torch.randn(B, 3))))

    def iwae_from_prior(k: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return iwae_estimate(lambda n: dec.log_prob(x, torch.randn(n, B, 3, generator=g)), k, min(k, 500))[0]

    with torch.no_grad():
        reference = iwae_from_prior(200_000, 0)  # its spread over seeds: ~0.01 nat per point
        iwae100 = torch.stack([iwae_from_prior(100, s) for s in range(1, 21)])  # [20, B]: its expectation
    res = run_ais(dec.log_prob, x, 3, AISConfig(n_intermediate=1000, n_chains=32), torch.Generator().manual_seed(0))
    assert res.log_px.dtype == torch.float64 and torch.isfinite(res.log_px).all()
    assert 0.5 < res.mean_accept_rate < 0.9
    assert (res.log_px - reference).abs().mean() < 0.08 and (res.log_px - reference).mean().abs() < 0.05
    assert res.log_px.mean() > iwae100.mean() + 0.03  # stronger than E[IWAE-100] on average (by ~0.1 nat here)

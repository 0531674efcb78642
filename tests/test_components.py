"""Schedules, annealing, loader sharding, checkpoint config, malloc-free pieces of the base module."""
import pytest
import torch

from amortlab.callbacks import Annealing
from amortlab.data import loader as loader_mod
from amortlab.data.loader import TensorLoader
from amortlab.errors import AmortlabError
from amortlab.methods import AmortizedVAE
from amortlab.metrics import ExactMean
from amortlab.nets import BernoulliDecoder, GaussianEncoder
from amortlab.optim import burda_factor


def test_burda_schedule_stages():
    # stage i lasts 3^i epochs: epochs 0 | 1-3 | 4-12 | 13-39 | ... | total 3280
    assert burda_factor(0) == 1.0
    assert burda_factor(1) == pytest.approx(10 ** (-1 / 7))
    assert burda_factor(3) == pytest.approx(10 ** (-1 / 7))
    assert burda_factor(4) == pytest.approx(10 ** (-2 / 7))
    assert burda_factor(3279) == pytest.approx(10 ** (-7 / 7))
    assert burda_factor(10_000) == pytest.approx(0.1)
    assert sum(3**i for i in range(8)) == 3280
    # time_scale shrinks every stage but keeps at least one epoch each
    assert burda_factor(4, time_scale=0.01) == pytest.approx(10 ** (-4 / 7))  # stages 1,1,1,1,1,2.43,...
    assert burda_factor(40, time_scale=0.01) == pytest.approx(0.1)


class _Trainer:
    def __init__(self, epoch, step=0, n=10):
        self.current_epoch, self.global_step, self.num_training_batches = epoch, step, n


def test_annealing_weights():
    ent = Annealing("entropy", start=0.0, duration=4)
    # weight(global_step, epoch, step within the epoch, steps per epoch)
    assert ent.weight(0, 0, 0, 10) == 0.0
    assert ent.weight(15, 1, 5, 10) == pytest.approx(1.5 / 4)
    assert ent.weight(100, 10, 0, 10) == 1.0
    assert Annealing("entropy", duration=40, unit="step").weight(15, 1, 5, 10) == pytest.approx(15 / 40)
    kl = Annealing("kl", start=0.1, duration=10)
    m = AmortizedVAE(GaussianEncoder(4, 2, (8,)), decoder=BernoulliDecoder(4, 2, (8,)))
    kl.on_train_batch_start(_Trainer(5), m, None, 0)
    assert m.prior_weight == m.entropy_weight == pytest.approx(0.55)
    ent.on_train_batch_start(_Trainer(2), m, None, 0)
    assert m.prior_weight == 1.0 and m.entropy_weight == pytest.approx(0.5)
    with pytest.raises(AmortlabError, match="entropy"):
        Annealing("warm")


def test_annealed_objective_is_weighted_bound():
    torch.manual_seed(0)
    m = AmortizedVAE(GaussianEncoder(6, 3, (8,)), decoder=BernoulliDecoder(6, 3, (8,)))
    x = torch.bernoulli(torch.full((5, 6), 0.3))
    torch.manual_seed(1)
    plain = m.bound(x, 1)
    m.entropy_weight = 0.0  # lambda = 0: E[log p(x, z)] only
    torch.manual_seed(1)
    q = m.infer(x)
    z = q.rsample(1)
    expected = (m.decoder.log_prob(x, z) - 0.5 * (z**2 + torch.log(torch.tensor(2 * torch.pi))).sum(-1))[0]
    torch.manual_seed(1)
    torch.testing.assert_close(m.bound(x, 1), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, expected)


def test_train_loader_shards_disjoint_and_epoch_dependent(monkeypatch):
    data = torch.arange(100, dtype=torch.float32)[:, None]
    seen = []
    for rank in range(2):
        monkeypatch.setattr(loader_mod, "_rank_world", lambda r=rank: (r, 2))
        dl = TensorLoader(data, 10, shuffle=True, drop_last=True, seed=3)
        assert len(dl) == 5
        seen.append(torch.cat([b.x for b in dl]).flatten())
    assert len(set(seen[0].tolist()) & set(seen[1].tolist())) == 0
    assert sorted(torch.cat(seen).tolist()) == list(range(100))
    monkeypatch.setattr(loader_mod, "_rank_world", lambda: (0, 1))
    dl = TensorLoader(data, 10, shuffle=True, drop_last=True, seed=3)
    e0 = torch.cat([b.x for b in dl]).flatten()
    dl.set_epoch(1)
    e1 = torch.cat([b.x for b in dl]).flatten()
    dl.set_epoch(0)
    assert torch.equal(torch.cat([b.x for b in dl]).flatten(), e0) and not torch.equal(e0, e1)


def test_eval_loader_batches_independent_of_world_size(monkeypatch):
    data = torch.arange(95, dtype=torch.float32)[:, None]
    monkeypatch.setattr(loader_mod, "_rank_world", lambda: (0, 1))
    single = {b.first_index: b.x for b in TensorLoader(data, 10)}
    multi = {}
    for rank in range(3):
        monkeypatch.setattr(loader_mod, "_rank_world", lambda r=rank: (r, 3))
        multi.update({b.first_index: b.x for b in TensorLoader(data, 10)})
    assert single.keys() == multi.keys()
    assert all(torch.equal(single[i], multi[i]) for i in single)


def test_exact_mean_stays_float64_after_cast():
    m = ExactMean()
    m.to(torch.float32)
    m.reset()
    m.update(torch.tensor([1.0, 2.0, 4.0]))
    assert m.compute().dtype == torch.float64
    assert m.compute().item() == pytest.approx(7 / 3, abs=1e-15)


def test_output_bias_initialised_to_data_logit():
    dec = BernoulliDecoder(4, 2, (8,))
    dec.init_output_bias(torch.tensor([0.5, 0.1, 0.0, 1.0]))
    p = torch.sigmoid(dec.output_layer.bias)
    torch.testing.assert_close(p, torch.tensor([0.5, 0.1, 1e-3, 1 - 1e-3]), atol=1e-6, rtol=0)


def test_active_units_are_the_covariance_of_posterior_means_over_the_split():
    from amortlab.metrics import ActiveUnits

    g = torch.Generator().manual_seed(0)
    # units: three of std 1, one of std 0.05 (A_u = 0.0025: inactive), one constant, one of std 0.2 (0.04: active)
    means = torch.randn(300, 6, generator=g, dtype=torch.float64) * torch.tensor([1, 1, 1, 0.05, 0, 0.2]) + 3.0
    m = ActiveUnits(6)
    m.to(torch.float32)  # the precision plugin's cast must not reduce the float64 sums
    m.reset()
    for chunk in means.split(70):  # batches of unequal size
        m.update(chunk)
    torch.testing.assert_close(m.variances(), means.var(0), atol=1e-12, rtol=1e-12)
    assert int(m.compute()) == 4


def test_active_units_of_a_linear_gaussian_model_match_the_closed_form():
    """p(z) = N(0, I), x | z ~ N(W z + b, s^2 I) with orthogonal columns of norm c_u: the exact posterior mean of unit
    u has Cov_x E[z_u | x] = 1 - S_uu = c_u^2 / (c_u^2 + s^2) (law of total variance) -- 0.89, 0.67 and, for
    c = 0.05, s = 0.7, 0.0051 < 0.01: two active units."""
    from amortlab.distributions import posterior_mean
    from amortlab.metrics import ActiveUnits
    from tests.test_estimators import X_DIM, Z_DIM, data, linear_model

    m = linear_model(noise_std=0.7)
    scales = torch.tensor([2.0, 1.0, 0.05], dtype=torch.float64)
    with torch.no_grad():
        Q, _ = torch.linalg.qr(torch.randn(X_DIM, Z_DIM, dtype=torch.float64))
        m.decoder.W.copy_(Q * scales)
        m.encoder.set_exact(m.decoder)
    torch.manual_seed(1)
    x = data(m, 20_000)
    au = ActiveUnits(Z_DIM)
    au.update(posterior_mean(m.infer(x)))
    expected = scales**2 / (scales**2 + 0.7**2)
    torch.testing.assert_close(au.variances(), expected, rtol=0.05, atol=5e-4)
    assert int(au.compute()) == 2


def test_posterior_mean_of_a_mixture_is_the_weighted_component_mean():
    from amortlab.distributions import DiagGaussian, MixtureGaussian, posterior_mean

    g = torch.Generator().manual_seed(0)
    comps = [DiagGaussian(torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g) * 0.3) for _ in range(3)]
    q = MixtureGaussian.from_components(comps, [0.5, 0.3, 0.2])
    exact = posterior_mean(q)
    torch.testing.assert_close(exact, 0.5 * comps[0].mu + 0.3 * comps[1].mu + 0.2 * comps[2].mu)
    mc = q.rsample(200_000, g).mean(0)  # the sampler agrees with the closed form (MC error ~ 3e-3)
    torch.testing.assert_close(mc, exact, atol=0.02, rtol=0)
    assert torch.equal(posterior_mean(comps[0]), comps[0].mu)

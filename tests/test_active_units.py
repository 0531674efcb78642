"""Active units (Burda et al. 2016) of families whose E_q[z] is sampled and of layered q's.

References are constructed analytically: posterior means with a prescribed covariance over the points
(A_u = Cov_x(E_q[z_u]) exactly, by standardising the points' means), a layered q's mean by independent Monte Carlo
through its networks; the library's sampled estimator itself runs, also through the evaluation.
"""
from __future__ import annotations

import pytest
import torch

from amortlab.data.loader import Batch
from amortlab.distributions import IAFPosterior, posterior_mean, posterior_mean_estimate
from amortlab.distributions.iaf import IAFFlow
from amortlab.methods.base import ELBOModule
from amortlab.metrics import ActiveUnits, SplitMetrics

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")

# true A_u: three units just below the threshold, three just above, one constant, one clearly active
A = torch.tensor([0.007, 0.007, 0.007, 0.013, 0.013, 0.013, 0.0, 0.5], dtype=F64)
Z = len(A)
TRUE_COUNT = 4


def means_with_covariance(n: int, a: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """n points' means ``[n, Z]`` whose covariance over the points (n - 1 normalised) is diag(a) on the diagonal,
    exactly: standardised Gaussian columns scaled by sqrt(a)."""
    xi = torch.randn(n, len(a), dtype=F64, generator=torch.Generator().manual_seed(seed))
    xi = (xi - xi.mean(0)) / xi.std(0)
    return xi * a.sqrt()


def identity_iaf(mu: torch.Tensor) -> IAFPosterior:
    """q = N(mu, I) as an IAF posterior with no steps: E_q[z] = mu, Var_q(z_u) = 1, but the family declares no
    closed-form mean, so the library samples it."""
    return IAFPosterior(mu, torch.zeros_like(mu), IAFFlow(mu.shape[-1], steps=0))


def test_sampled_active_units_are_unbiased_and_do_not_move_with_the_number_of_draws():
    """Var_q = 1 adds ~1/S to every unit's variance of sample means: the plain sample means (the old estimator) count
    the 0.007 units (at S <= 256), and at S = 64 even the constant unit, as active; the corrected estimate is within
    its noise of the true A_u and gives the true count at every S."""
    n = 6000
    mu = means_with_covariance(n, A)
    old_counts, new_counts = [], []
    for S in (64, 256, 1024):
        old, new = ActiveUnits(Z), ActiveUnits(Z)
        g = torch.Generator().manual_seed(S)
        mc = []
        for i in range(0, n, 500):
            m, v = posterior_mean_estimate(identity_iaf(mu[i:i + 500]), g, samples=S)
            old.update(m)  # what the count did with sampled means before
            new.update(m, v)
            mc.append(v)
        torch.testing.assert_close(torch.cat(mc).mean(0), torch.full((Z,), 1.0 / S, dtype=F64), rtol=0.02, atol=0)
        # sd of the corrected estimate: cross term 4 A / (S (n - 1)) and the noise's own square 2 / (S^2 (n - 1))
        sd = ((4 * A / S + 2 / S**2) / (n - 1)).sqrt()
        assert ((new.variances() - A).abs() < 5 * sd + 1e-12).all(), (S, new.variances(), A)
        torch.testing.assert_close(old.variances(), A + 1.0 / S, atol=float(5 * sd.max()), rtol=0)  # the old bias
        old_counts.append(int(old.compute()))
        new_counts.append(int(new.compute()))
    assert new_counts == [TRUE_COUNT] * 3
    assert old_counts == [8, 7, 4]


class MeanIsTheData(ELBOModule):
    """A method whose q(z | x) = N(x, I) is an identity IAF (E_q[z] = x, sampled by the evaluation)."""

    method_name = "mean_is_the_data"

    def __init__(self, z_dim: int):
        from amortlab.nets import LinearGaussianDecoder

        super().__init__(decoder=LinearGaussianDecoder(z_dim, z_dim).double(), importance_samples={"test": 1})
        self.flow = IAFFlow(z_dim, steps=0)

    def infer(self, x: torch.Tensor) -> IAFPosterior:
        return IAFPosterior(x, torch.zeros_like(x), self.flow)


def test_evaluation_counts_active_units_of_a_sampled_q_without_the_monte_carlo_bias():
    """The real evaluation path (evaluate_batch -> SplitMetrics, as the final evaluation runs it) on a q whose means
    have A_u just below / above 0.01 and Var_q = 1: the old count was 7 (the three 0.007 units counted)."""
    n = 6000
    x = means_with_covariance(n, A, seed=1)
    method = MeanIsTheData(Z)
    metrics = SplitMetrics(method.eval_metric_names(None), method.model.latent_dims)
    for i in range(0, n, 500):
        out = method.evaluate_batch(Batch(x[i:i + 500], i), 1, "test")
        metrics.update(out, out.pop("z_mean"))
    assert metrics.compute("test")["test/active_units"] == TRUE_COUNT


# --- layered q's: the first layer in sampling order is exact ---------------------------------------------------------
def burda_like(x_dim: int = 12, dims: tuple[int, int] = (6, 3), seed: int = 0):
    """Burda et al.'s two-layer model and bottom-up encoder (conf/model/burda_mlp2.yaml), small."""
    from amortlab.models import HierarchicalModel
    from amortlab.nets import BernoulliDecoder, BottomUpEncoder, GaussianEncoder

    torch.manual_seed(seed)
    enc = BottomUpEncoder(x_dim, dims, [[16, 16], [16, 16]]).double()
    model = HierarchicalModel(BernoulliDecoder(x_dim, dims[0], (16, 16)),
                              [GaussianEncoder(x_dim=dims[1], z_dim=dims[0], hidden=(16, 16))], dims).double()
    x = torch.bernoulli(torch.full((10, x_dim), 0.4, dtype=F64), generator=torch.Generator().manual_seed(seed))
    return enc, model, x


def reference_mean(first_mu, first_logvar, second, n: int = 100_000) -> torch.Tensor:
    """E[mu_2(z_first)] with z_first ~ N(first_mu, e^first_logvar), by plain Monte Carlo ``[B, D]`` (chunked)."""
    g = torch.Generator().manual_seed(123)
    total = 0.0
    for _ in range(n // 20_000):
        z = first_mu + torch.exp(0.5 * first_logvar) * torch.randn(20_000, *first_mu.shape, dtype=F64, generator=g)
        total = total + second(z).sum(0)
    return total / n


def test_bottom_up_layered_q_has_the_exact_mean_of_z1_and_an_unbiased_one_of_z2():
    from amortlab.methods import AmortizedVAE

    enc, model, x = burda_like()
    D1 = model.latent_dims[0]
    q = enc(x)
    with torch.no_grad():
        first = enc.layer(0, x)
        mean, var = posterior_mean_estimate(q, torch.Generator().manual_seed(0))
        assert torch.equal(mean[:, :D1], first.mu) and torch.equal(var[:, :D1], torch.zeros_like(first.mu))
        assert torch.equal(posterior_mean(q, torch.Generator().manual_seed(5))[:, :D1], first.mu)
        ref = reference_mean(first.mu, first.logvar, lambda z: enc.layer(1, z).mu)
    # z2: within 5 of the estimate's own standard deviations (plus the reference's MC error, ~1/20 of it)
    assert ((mean[:, D1:] - ref).abs() < 5 * var[:, D1:].sqrt() + 1e-4).all()
    # the reported variance is the estimate's: compare with the spread over independent estimates
    with torch.no_grad():
        reps = torch.stack([posterior_mean_estimate(q, torch.Generator().manual_seed(s), samples=64)[0][:, D1:]
                            for s in range(1, 101)])
        v64 = posterior_mean_estimate(q, torch.Generator().manual_seed(0), samples=4096)[1][:, D1:] * 4096 / 64
    ratio = reps.var(0).mean() / v64.mean()
    assert 0.85 < float(ratio) < 1.15, float(ratio)
    # ... and the evaluation passes z1's exact means to the count
    method = AmortizedVAE(enc, model=model, importance_samples={"test": 2}).double()
    out = method.evaluate_batch(Batch(x, 0), 2, "test")
    assert torch.equal(out["z_mean"][:, :D1], first.mu) and not out["z_mean_var"][:, :D1].any()
    assert (out["z_mean_var"][:, D1:] > 0).all()


def test_ladder_q_has_the_exact_mean_of_its_top_layer():
    """Top-down: q(z2 | x) q(z1 | z2, x); z2's mean is its Gaussian's, z1's that of q(z1 | z2, x) averaged over z2
    (reference: plain Monte Carlo through q's own conditionals)."""
    from amortlab.methods import LadderVAE

    enc, model, x = burda_like(seed=1)
    D1 = model.latent_dims[0]
    method = LadderVAE(enc, model=model).double()
    with torch.no_grad():
        q = method.infer(x)
        top_mu, top_logvar = q.conditional(1, {})
        mean, var = posterior_mean_estimate(q, torch.Generator().manual_seed(0))
        assert torch.equal(mean[:, D1:], top_mu) and not var[:, D1:].any()
        ref = reference_mean(top_mu, top_logvar, lambda z2: q.conditional(0, {1: z2})[0])
    assert ((mean[:, :D1] - ref).abs() < 5 * var[:, :D1].sqrt() + 1e-4).all()


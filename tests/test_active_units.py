"""Active units (Burda et al. 2016) of families whose E_q[z] is sampled, of layered q's and of sequence models.

References are constructed analytically: posterior means with a prescribed covariance over the points
(A_u = Cov_x(E_q[z_u]) exactly, by standardising the points' means), a layered q's mean by independent Monte Carlo
through its networks, a hand-built filter's E_q[z_t] from its linear recursion solved here in closed form, and the
pooled per-step variance written out step by step (also on two processes).
"""
from __future__ import annotations

import math
import os
import socket

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

    from amortlab.nets import LadderEncoder

    _, model, x = burda_like(seed=1)
    D1 = model.latent_dims[0]
    torch.manual_seed(1)
    enc = LadderEncoder(x.shape[1], model.latent_dims, [[16, 16], [16, 16]]).double()
    method = LadderVAE(enc, model=model).double()
    with torch.no_grad():
        q = method.infer(x)
        top_mu, top_logvar = q.conditional(1, {})
        mean, var = posterior_mean_estimate(q, torch.Generator().manual_seed(0))
        assert torch.equal(mean[:, D1:], top_mu) and not var[:, D1:].any()
        ref = reference_mean(top_mu, top_logvar, lambda z2: q.conditional(0, {1: z2})[0])
    assert ((mean[:, :D1] - ref).abs() < 5 * var[:, :D1].sqrt() + 1e-4).all()


# --- sequences: use of the code, not its dynamics -------------------------------------------------------------------
SEQ_D, SEQ_USED, SEQ_X, SEQ_T = 4, 2, 2, 10


def drift(t: int) -> float:
    """The filter's step-dependent drift (the same for every sequence): the dynamics."""
    return 2.0 * math.sin(1.3 * t)


def hand_filter():
    """A filter q(z_t | x_t, z_{t-1}) = N(0.5 z_{t-1} + drift(t) + [u < m] x_{t,u}, 1): every unit moves along the
    sequence, only the first m = ``SEQ_USED`` read the data."""
    from amortlab.methods.filtering import SequenceELBOModule
    from amortlab.models import LinearGaussianSSM

    class HandFilter(SequenceELBOModule):
        method_name = "hand_filter"

        def propose(self, t, prep, x_t, c_t, z_prev, mu_p, lv_p, generator):
            mu = 0.5 * z_prev + drift(t)
            mu = torch.cat([mu[..., :SEQ_USED] + x_t[:, :SEQ_USED], mu[..., SEQ_USED:]], -1)
            return mu, torch.zeros_like(mu), None

    return HandFilter(model=LinearGaussianSSM(z_dim=SEQ_D, x_dim=SEQ_X), importance_samples={"test": 2})


def ragged_sequences(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, SEQ_T + 1, (n,), generator=g)
    return [torch.randn(int(n_i), SEQ_X, generator=g) for n_i in lengths]


def exact_step_means(seq: torch.Tensor) -> torch.Tensor:
    """E_q[z_t] ``[T_i, D]`` of the hand filter, in closed form: e_t = 0.5 e_{t-1} + drift(t) + [u < m] x_{t,u}."""
    e, out = torch.zeros(SEQ_D, dtype=F64), []
    for t in range(len(seq)):
        e = 0.5 * e + drift(t)
        e[:SEQ_USED] += seq[t, :SEQ_USED].double()
        out.append(e.clone())
    return torch.stack(out)


def pooled_within_step_variance(means: list[torch.Tensor]) -> torch.Tensor:
    """sum_t sum_i (m_it - mean_i m_it)^2 / sum_t (n_t - 1) over the sequences present at each step ``[D]``."""
    num, dof = 0.0, 0
    for t in range(max(len(m) for m in means)):
        at_t = torch.stack([m[t] for m in means if len(m) > t])
        num = num + (at_t - at_t.mean(0)).pow(2).sum(0)
        dof += len(at_t) - 1
    return num / dof


def test_sequence_active_units_count_the_dimensions_that_read_the_data():
    """All D units change along the sequences (drift(t)), only m read x: pooling (sequence, step) pairs counted all D;
    the per-step variance across sequences (pooled over steps, padding excluded, Monte Carlo variance of the 8
    trajectories' means removed: ~0.04 in the unused units) counts m, and equals the closed-form value."""
    from amortlab.data import pack_sequences

    method = hand_filter()
    seqs = ragged_sequences(1000)
    rows = pack_sequences(seqs, SEQ_T)
    metrics = SplitMetrics(method.eval_metric_names(None), method.model.latent_dims, method.eval_ratios)
    for i in range(0, len(rows), 100):
        out = method.evaluate_batch(Batch(rows[i:i + 100], i), 2, "test")
        metrics.update(out, out.pop("z_mean"))
    exact = pooled_within_step_variance([exact_step_means(s) for s in seqs])
    assert (exact[SEQ_USED:] < 1e-20).all() and (exact[:SEQ_USED] > 0.9).all()
    got = metrics.units.variances()
    torch.testing.assert_close(got[:SEQ_USED], exact[:SEQ_USED], atol=0.05, rtol=0)
    assert (got[SEQ_USED:] < 0.005).all(), got
    assert metrics.compute("test")["test/active_units"] == SEQ_USED
    # the pooled (sequence, step) definition on the exact means: every unit "active" through the drift alone
    pairs = torch.cat([exact_step_means(s) for s in seqs])
    assert (pairs.var(0) > 1.0).all()


def random_step_means(n: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Means ``[n, T, 3]``, their MC variances and ragged present flags ``[n, T]`` (each length 1..T)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, T, 3, dtype=F64, generator=g) * torch.tensor([1.0, 0.2, 0.05], dtype=F64) \
        + 0.7 * torch.arange(T, dtype=F64)[:, None]  # a drift along the steps
    v = torch.rand(n, T, 3, dtype=F64, generator=g) * 0.01
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    present = (torch.arange(T)[None, :] < lengths[:, None]).double()
    return m, v, present


def step_reference(parts) -> torch.Tensor:
    """A_u written out: per step, sum over present sequences of squared deviations minus (n_t - 1)/n_t times the
    summed MC variances, pooled with weights n_t - 1 (steps of every part aligned at t = 0)."""
    T = max(m.shape[1] for m, _, _ in parts)
    num, dof = torch.zeros(3, dtype=F64), 0.0
    for t in range(T):
        rows = [(m[i, t], v[i, t]) for m, v, p in parts if m.shape[1] > t for i in range(len(m)) if p[i, t] > 0]
        if len(rows) < 2:
            continue
        mt, vt = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
        n_t = len(rows)
        num += (mt - mt.mean(0)).pow(2).sum(0) - (n_t - 1) / n_t * vt.sum(0)
        dof += n_t - 1
    return (num / dof).clamp_min(0)


def _ddp_worker(rank: int, world: int, port: int, layouts, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for name, parts in layouts.items():
            metric = ActiveUnits(3)
            for m, v, p in parts[rank]:
                metric.update(m, v, p)
            count = int(metric.compute())  # synchronised by torchmetrics
            with metric.sync_context():
                variances = metric.variances()
            torch.save({"count": count, "variances": variances}, os.path.join(out_dir, f"{name}{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sequence_active_units_are_the_whole_splits_on_two_processes(tmp_path):
    """Two gloo processes, one with sequences padded to T = 8 and one to T = 5 ("ragged"), or one with none at all
    ("idle"): both ranks report the one-process value, which equals A_u written out step by step."""
    import torch.multiprocessing as mp

    a, b, c = random_step_means(40, 8, 0), random_step_means(30, 5, 1), random_step_means(25, 8, 2)
    layouts = {"ragged": [[a, c], [b]], "idle": [[a, b, c], []]}
    single = ActiveUnits(3)
    for m, v, p in [a, b, c]:
        single.update(m, v, p)
    reference = step_reference([a, b, c])
    torch.testing.assert_close(single.variances(), reference, atol=1e-12, rtol=1e-12)
    assert int(single.compute()) == 2  # spreads 1 and 0.2 across sequences; 0.05 (0.0025) is inactive
    mp.spawn(_ddp_worker, args=(2, _free_port(), layouts, str(tmp_path)), nprocs=2, join=True)
    for name in layouts:
        for rank in range(2):
            got = torch.load(tmp_path / f"{name}{rank}.pt")
            assert got["count"] == 2, (name, rank)
            torch.testing.assert_close(got["variances"], reference, atol=1e-12, rtol=1e-12)

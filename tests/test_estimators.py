"""Estimators against closed forms on the linear-Gaussian VAE (exact log p(x) and exact posterior)."""
import math

import torch

from amortlab.data.loader import Batch
from amortlab.distributions import DiagGaussian
from amortlab.evaluation import chunk_size, iwae_estimate
from amortlab.evaluation.estimators import scored_in_chunks
from amortlab.methods import AmortizedVAE
from amortlab.nets import LinearGaussianDecoder, LinearGaussianEncoder
from amortlab.objectives import bernoulli_log_prob, k_sample_bound, log_mean_exp

X_DIM, Z_DIM = 6, 3


def linear_model(diagonal_posterior: bool = True, noise_std: float = 0.7, seed: int = 0) -> AmortizedVAE:
    """Linear-Gaussian VAE; with orthogonal decoder columns the true posterior is diagonal."""
    torch.manual_seed(seed)
    dec = LinearGaussianDecoder(X_DIM, Z_DIM, noise_std).double()
    with torch.no_grad():
        if diagonal_posterior:
            Q, _ = torch.linalg.qr(torch.randn(X_DIM, Z_DIM, dtype=torch.float64))
            dec.W.copy_(Q * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64))
        dec.b.copy_(torch.randn(X_DIM, dtype=torch.float64) * 0.3)
    enc = LinearGaussianEncoder(X_DIM, Z_DIM).double()
    enc.set_exact(dec)
    return AmortizedVAE(enc, decoder=dec, importance_samples={"train": 1, "val": 100, "test": 500})


def data(model: AmortizedVAE, n: int = 16) -> torch.Tensor:
    z = torch.randn(n, Z_DIM, dtype=torch.float64)
    return model.decoder.mean(z) + torch.exp(model.decoder.log_s) * torch.randn(n, X_DIM, dtype=torch.float64)


def test_exact_posterior_bound_equals_log_px_for_every_sample():
    m = linear_model()
    x = data(m)
    lw = m.log_weights(x, m.infer(x), k=50)  # [k, B]
    exact = m.decoder.exact_log_marginal(x)
    # with q = p(z|x) every importance weight equals p(x): zero variance, bound = log p(x)
    torch.testing.assert_close(lw, exact.expand_as(lw), atol=1e-9, rtol=0)
    torch.testing.assert_close(m.bound(x, 1), exact, atol=1e-9, rtol=0)


def test_encoder_exact_posterior_matches_closed_form():
    m = linear_model()
    x = data(m)
    mean, cov = m.decoder.exact_posterior(x)
    q = m.infer(x)
    assert torch.allclose(cov, torch.diag(torch.diagonal(cov)), atol=1e-12)  # diagonal by construction
    torch.testing.assert_close(q.mu, mean)
    torch.testing.assert_close(q.logvar[0].exp(), torch.diagonal(cov))


def perturbed_model() -> AmortizedVAE:
    m = linear_model()
    with torch.no_grad():
        m.encoder.linear.bias.add_(0.4)
        m.encoder.logvar.add_(0.5)
    return m


def test_iwae_monotone_in_k_and_below_log_px():
    m = perturbed_model()
    x = data(m, 8)
    exact = m.decoder.exact_log_marginal(x)
    q = m.infer(x)
    means = []
    for k in (1, 5, 50, 500):
        reps = 4000 // k if k < 500 else 40
        vals = torch.stack([k_sample_bound(m.log_weights(x, q, k)) for _ in range(reps)])  # [reps, B]
        means.append(vals.mean(0))
    elbo_exact = analytic_elbo(m, x)
    gap1 = (exact - means[0]).mean().item()
    assert gap1 > 0.1, "the perturbed encoder must leave a visible inference gap"
    for lo, hi in zip(means[:-1], means[1:]):
        assert (hi - lo).mean() > 0  # L_1 < L_5 < L_50 < L_500 on average
    assert (means[-1] - exact).mean() <= 0  # a lower bound on log p(x) ...
    assert (means[-1] - exact).max() < 0.02  # ... per point up to Monte Carlo error (40 reps of k = 500)
    assert (exact - means[-1]).mean() < 0.1 * gap1  # and closes most of the gap
    torch.testing.assert_close(means[0], elbo_exact, atol=0.05, rtol=0)


def elbo_of(m: AmortizedVAE, x: torch.Tensor, q) -> torch.Tensor:
    """Closed-form ELBO of a given diagonal q (instead of the encoder's) on the linear-Gaussian model."""
    orig = m.infer
    m.infer = lambda _: q
    try:
        return analytic_elbo(m, x)
    finally:
        m.infer = orig


def analytic_elbo(m: AmortizedVAE, x: torch.Tensor) -> torch.Tensor:
    """Closed form E_q[log N(x; Wz + b, s^2 I)] - KL(q || N(0, I)) for diagonal q."""
    q, d = m.infer(x), m.decoder
    var = torch.exp(2 * d.log_s)
    resid = ((x - d.mean(q.mu)) ** 2).sum(-1) + (d.W**2 * q.logvar.exp()[:, None, :]).sum((-1, -2))
    rec = -0.5 * (resid / var + x.shape[-1] * (torch.log(var) + math.log(2 * math.pi)))
    return rec - q.kl_to_standard_normal()


def test_analytic_elbo_matches_monte_carlo():
    """ELBO = E_q[log p(x|z)] - KL(q || p), both in closed form, against the Monte Carlo average of log w."""
    m = perturbed_model()
    x = data(m, 4)
    q = m.infer(x)
    analytic = analytic_elbo(m, x)
    mc = m.log_weights(x, q, 200000).mean(0)
    torch.testing.assert_close(analytic, mc, atol=0.02, rtol=0)


def test_kl_closed_form_vs_monte_carlo():
    mu = torch.randn(5, 4, dtype=torch.float64)
    logvar = torch.randn(5, 4, dtype=torch.float64) * 0.5
    q = DiagGaussian(mu, logvar)
    z = q.rsample(400000)
    mc = (q.log_prob(z) - (-0.5 * (z**2 + math.log(2 * math.pi)).sum(-1))).mean(0)
    torch.testing.assert_close(q.kl_to_standard_normal(), mc, atol=0.02, rtol=0)
    # entropy likewise
    torch.testing.assert_close(q.entropy(), -q.log_prob(z).mean(0), atol=0.02, rtol=0)


def test_rsample_log_prob_consistent():
    q = DiagGaussian(torch.randn(3, 2), torch.randn(3, 2))
    z, log_q = q.rsample_with_log_prob(7)
    assert z.shape == (7, 3, 2) and log_q.shape == (7, 3)
    torch.testing.assert_close(log_q, q.log_prob(z), atol=1e-5, rtol=1e-5)


def test_chunked_and_unchunked_estimators_agree_exactly():
    torch.manual_seed(1)
    lw = torch.randn(1000, 7, dtype=torch.float64) * 5 - 300  # large magnitudes: needs the max shift
    def sampler():
        pos = [0]
        def draw(n):
            out = lw[pos[0]:pos[0] + n]
            pos[0] += n
            return out
        return draw
    full = iwae_estimate(sampler(), 1000, 1000)
    for chunk in (1, 7, 100, 333):
        part = iwae_estimate(sampler(), 1000, chunk)
        torch.testing.assert_close(part[0], full[0], atol=1e-10, rtol=0)
        torch.testing.assert_close(part[1], full[1], atol=1e-10, rtol=0)
    torch.testing.assert_close(full[0], log_mean_exp(lw, 0))
    torch.testing.assert_close(full[1], lw.mean(0))


def test_scored_in_chunks_draws_what_one_call_draws():
    """Many samples per point (a common-random-numbers estimate), scored a few rows at a time: the log-weights of
    one unchunked ``log_weights`` call with an identically seeded generator, sample for sample."""
    m = perturbed_model()
    x = data(m, 12)
    q = m.infer(x)
    whole = m.log_weights(x, q, 300, torch.Generator().manual_seed(4))
    for rows in (12, 100, 1000, 10_000):
        part = scored_in_chunks(m, x, q, 300, torch.Generator().manual_seed(4), rows=rows)
        torch.testing.assert_close(part, whole, atol=1e-5, rtol=0)


def test_chunk_size():
    assert chunk_size(5000, 100, 1000) == 10
    assert chunk_size(5000, 10, 1000) == 100
    assert chunk_size(5, 10, 1000) == 5
    assert chunk_size(5000, 5000, 1000) == 1


def test_evaluate_batch_against_exact_log_px():
    m = perturbed_model()
    x = data(m, 10)
    exact = m.decoder.exact_log_marginal(x)
    out = m.evaluate_batch(Batch(x, 0), k=5000)
    torch.testing.assert_close(-out["nll"], exact, atol=0.05, rtol=0)
    # neg_elbo: a 5000-sample estimate of the closed-form -ELBO (4 standard errors, sd of log w from fresh draws);
    # inference_gap: of log p(x) - ELBO = KL(q || p(z | x)), up to that and the nll tolerance above
    elbo = analytic_elbo(m, x).detach()
    se = m.log_weights(x, m.infer(x), 20_000).std(0).detach() / math.sqrt(5000)
    assert ((out["neg_elbo"] + elbo).abs() <= 4 * se + 1e-3).all(), (out["neg_elbo"] + elbo, se)
    gap = exact - elbo
    assert gap.min() > 1.0  # the perturbed encoder's KL from the posterior: far above the tolerance
    assert ((out["inference_gap"] - gap).abs() <= 4 * se + 0.05).all(), (out["inference_gap"] - gap, se)
    # chunking does not change the estimate's distribution: two chunkings agree within MC error
    m.eval_rows = 10_000_000
    out_big = m.evaluate_batch(Batch(x, 0), k=5000)
    torch.testing.assert_close(out_big["nll"], out["nll"], atol=0.05, rtol=0)
    # evaluation noise is seeded per batch position: the same batch gives the same number
    m.eval_rows = 1000
    torch.testing.assert_close(m.evaluate_batch(Batch(x, 0), k=5000)["nll"], out["nll"], atol=0, rtol=0)
    # exact encoder: nll = -log p(x) exactly and zero inference gap
    m2 = linear_model()
    out2 = m2.evaluate_batch(Batch(x, 0), k=100)
    torch.testing.assert_close(-out2["nll"], m2.decoder.exact_log_marginal(x), atol=1e-9, rtol=0)
    torch.testing.assert_close(out2["inference_gap"], torch.zeros(10, dtype=torch.float64), atol=1e-9, rtol=0)


def test_non_diagonal_posterior_leaves_approximation_gap():
    """With a correlated true posterior even the best diagonal q has a gap: IWAE-k still closes it with k."""
    m = linear_model(diagonal_posterior=False)
    with torch.no_grad():
        m.decoder.W.copy_(torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.2], [0.0, 0.3, 1.0], [0.5, 0.5, 0.5],
                                        [0.1, -0.2, 0.3], [0.0, 0.0, 0.4]], dtype=torch.float64))
    x = data(m, 6)
    exact = m.decoder.exact_log_marginal(x)
    mean, cov = m.decoder.exact_posterior(x)
    with torch.no_grad():  # best mean-field fit to a Gaussian is the one with precision diagonal
        m.encoder.set_exact(m.decoder)
        m.encoder.logvar.copy_(-torch.log(torch.diagonal(torch.linalg.inv(cov))))
    gap1 = (exact - m.log_weights(x, m.infer(x), 20000).mean(0)).mean().item()
    gap_k = (exact - m.evaluate_batch(Batch(x, 0), k=5000)["nll"].neg()).mean().item()
    assert gap1 > 0.05
    assert 0 <= gap_k + 0.02 and gap_k < gap1 / 5


def test_bernoulli_log_prob_stable_and_correct():
    logits = torch.tensor([[-200.0, 0.0, 200.0, 3.0]])
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    got = bernoulli_log_prob(logits, x)
    expected = 0.0 + math.log(0.5) + 0.0 + math.log(1 - 1 / (1 + math.exp(-3.0)))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.tensor([expected]), atol=1e-5, rtol=0)
    # broadcasting [B, X] against [k, B, X]
    assert bernoulli_log_prob(torch.zeros(5, 2, 3), torch.ones(2, 3)).shape == (5, 2)

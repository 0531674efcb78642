"""Hierarchical (two-stochastic-layer) models against closed forms.

The linear-Gaussian two-layer model p(z2) = N(0, I), p(z1 | z2) = N(A z2 + c, diag v1), p(x | z1) = N(W z1 + b, s^2 I)
is one joint Gaussian over (z1, z2, x): its log p(x), posterior mean and covariance, and the best factorised Gaussian
(mean = posterior mean, variances 1 / diag(posterior precision)) are computed here from the joint covariance alone,
independently of the library's layer-by-layer densities. Every bound and scheme is checked against them; the bottom-up
q's densities and gradients against formulas written out from scratch, the ladder's q against Sønderby et al.'s
equations evaluated with its parameters read by name.
"""
import math

import pytest
import torch

from amortlab.distributions import DiagGaussian
from amortlab.distributions.layered import LayeredGaussian
from amortlab.errors import AmortlabError
from amortlab.evaluation import iwae_estimate
from amortlab.evaluation.ais import AISConfig, ais_log_likelihood
from amortlab.evaluation.gaps import GapsConfig, decompose
from amortlab.evaluation.iw_svi import SVIConfig, refine
from amortlab.evaluation.qstar import QStarConfig
from amortlab.grad import local_grad
from amortlab.methods import SAVAE, AmortizedVAE, IterativeVAE, LadderVAE
from amortlab.methods.iterative import _q
from amortlab.metrics import SplitMetrics
from amortlab.models import HierarchicalModel
from amortlab.nets import BottomUpEncoder, LadderEncoder, LinearGaussianDecoder, LinearGaussianEncoder
from amortlab.objectives import LOG_2PI
from tests.test_cli import assert_same_on_any_world_size, results, train

X, D1, D2 = 6, 3, 2
Z = D1 + D2
F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


# --- the model and its closed forms ---------------------------------------------------------------------------------
def linear_hierarchy(seed: int = 0, factorised: bool = False) -> HierarchicalModel:
    """The linear-Gaussian two-layer model; ``factorised``: A = 0 and orthogonal columns of W, so the exact posterior
    over (z1, z2) is a diagonal Gaussian."""
    torch.manual_seed(seed)
    dec = LinearGaussianDecoder(X, D1, noise_std=0.7).double()
    cond = LinearGaussianEncoder(D2, D1).double()  # p(z1 | z2) = N(A z2 + c, diag exp(logvar))
    with torch.no_grad():
        if factorised:
            Q, _ = torch.linalg.qr(torch.randn(X, D1, dtype=F64))
            dec.W.copy_(Q * torch.tensor([2.0, 1.0, 0.5], dtype=F64))
            cond.linear.weight.zero_()
        else:
            cond.linear.weight.copy_(torch.randn(D1, D2, dtype=F64))
        dec.b.copy_(0.3 * torch.randn(X, dtype=F64))
        cond.linear.bias.copy_(0.5 * torch.randn(D1, dtype=F64))
        cond.logvar.copy_(torch.tensor([-1.0, -0.5, 0.0], dtype=F64))
    return HierarchicalModel(dec, [cond], (D1, D2)).double()


def joint(model: HierarchicalModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[Z + X]`` and covariance of (z1, z2, x), from the linear maps alone."""
    dec, cond = model.decoder, model.conditionals[0]
    A, c, v1 = cond.linear.weight, cond.linear.bias, cond.logvar.exp()
    W, b, s2 = dec.W, dec.b, torch.exp(2 * dec.log_s)
    # (z1, z2, x) = M (e1, z2, e0) + offset with e1 ~ N(0, diag v1), z2 ~ N(0, I), e0 ~ N(0, s2 I)
    M = torch.zeros(Z + X, D1 + D2 + X, dtype=F64)
    M[:D1, :D1] = torch.eye(D1, dtype=F64)
    M[:D1, D1:Z] = A
    M[D1:Z, D1:Z] = torch.eye(D2, dtype=F64)
    M[Z:, :Z] = W @ M[:D1, :Z]
    M[Z:, Z:] = torch.eye(X, dtype=F64)
    noise_var = torch.cat([v1, torch.ones(D2, dtype=F64), s2.expand(X)])
    mean = torch.cat([c, torch.zeros(D2, dtype=F64), W @ c + b])
    return mean.detach(), (M @ torch.diag(noise_var) @ M.T).detach()


def exact(model: HierarchicalModel, x: torch.Tensor):
    """log p(x) ``[B]``, posterior mean ``[B, Z]`` and covariance ``[Z, Z]`` of (z1, z2) given x."""
    m, S = joint(model)
    Sxx, Sux, Suu = S[Z:, Z:], S[:Z, Z:], S[:Z, :Z]
    log_px = torch.distributions.MultivariateNormal(m[Z:], Sxx).log_prob(x)
    gain = Sux @ torch.linalg.inv(Sxx)
    return log_px, m[:Z] + (x - m[Z:]) @ gain.T, Suu - gain @ Sux.T


def gaussian_kl(mu_q, var_q, mu_p, cov_p) -> torch.Tensor:
    """KL(N(mu_q, diag var_q) || N(mu_p, cov_p)) ``[B]``."""
    P = torch.linalg.inv(cov_p)
    d = mu_p - mu_q
    return 0.5 * ((torch.diagonal(P) * var_q).sum(-1) + ((d @ P) * d).sum(-1) - Z + torch.logdet(cov_p)
                  - var_q.log().sum(-1))


def elbo_closed_form(model, x, q: DiagGaussian) -> torch.Tensor:
    """ELBO of a factorised Gaussian q over (z1, z2) = log p(x) - KL(q || p(z | x)), exact."""
    log_px, mu, cov = exact(model, x)
    return log_px - gaussian_kl(q.mu, q.logvar.exp(), mu, cov)


def mean_field_optimum(model, x) -> torch.Tensor:
    """max over factorised Gaussians of the ELBO: mean = posterior mean, variance_i = 1 / (posterior precision)_ii."""
    log_px, mu, cov = exact(model, x)
    var = 1.0 / torch.diagonal(torch.linalg.inv(cov))
    return log_px - gaussian_kl(mu, var.expand_as(mu), mu, cov)


def data(model: HierarchicalModel, n: int, seed: int = 1) -> torch.Tensor:
    m, S = joint(model)
    g = torch.Generator().manual_seed(seed)
    L = torch.linalg.cholesky(S[Z:, Z:])
    return m[Z:] + torch.randn(n, X, dtype=F64, generator=g) @ L.T


def encoder(seed: int = 3) -> BottomUpEncoder:
    torch.manual_seed(seed)
    return BottomUpEncoder(X, (D1, D2), [[16], [16]]).double()


def ladder_encoder(seed: int = 3) -> LadderEncoder:
    """d_1 = MLP(x) 16-3, d_2 = MLP(d_1) 8; d_1 has D1 units, so a path that fed mu^_1 upward would run too."""
    torch.manual_seed(seed)
    return LadderEncoder(X, (D1, D2), [[16, D1], [8]]).double()


def ladder(model: HierarchicalModel, **kwargs) -> LadderVAE:
    return LadderVAE(ladder_encoder(), model=model, **kwargs).double()


def amortized(model: HierarchicalModel, k: int = 1) -> AmortizedVAE:
    return AmortizedVAE(encoder(), model=model, importance_samples={"train": k, "val": 10, "test": 100}).double()


class FullGaussian:
    """A q with full covariance (the exact posterior as a fixed q)."""

    def __init__(self, mu, cov):
        self.d = torch.distributions.MultivariateNormal(mu, cov)

    def rsample_with_log_prob(self, k, generator=None):
        z = self.d.rsample((k,))
        return z, self.d.log_prob(z)


# --- the model ----------------------------------------------------------------------------------------------------
def test_log_joint_is_the_joint_gaussian_density():
    model = linear_hierarchy()
    m, S = joint(model)
    x = data(model, 5)
    z = torch.randn(4, 5, Z, dtype=F64)
    want = torch.distributions.MultivariateNormal(m, S).log_prob(torch.cat([z, x.expand(4, -1, -1)], -1))
    torch.testing.assert_close(model.log_joint(x, z), want.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(model.log_joint(x, model.split(z)), want.detach(), rtol=0, atol=1e-10)  # a tuple too


def test_prior_samples_prior_residual_and_layer_names():
    model = linear_hierarchy()
    z = model.sample_latent(200_000, torch.Generator().manual_seed(0))
    m, S = joint(model)
    torch.testing.assert_close(z.mean(0), m[:Z], atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), S[:Z, :Z], atol=0.04, rtol=0)
    cond = model.conditionals[0]
    z1, z2 = z[:10, :D1], z[:10, D1:]
    want = torch.cat([(z1 - z2 @ cond.linear.weight.T - cond.linear.bias) / torch.exp(0.5 * cond.logvar), z2], -1)
    torch.testing.assert_close(model.prior_residual(z[:10]), want.detach())
    assert model.layer_names == ("z1", "z2") and model.latent_dims == (D1, D2) and not model.flat


def test_bad_model_is_one_readable_error():
    with pytest.raises(AmortlabError, match="conditionals"):
        HierarchicalModel(LinearGaussianDecoder(X, D1), [], (D1, D2))
    with pytest.raises(AmortlabError, match="latent_dims"):
        HierarchicalModel(LinearGaussianDecoder(X, D1), [LinearGaussianEncoder(D2, D1)], (4, D2))


# --- bounds ---------------------------------------------------------------------------------------------------------
def test_exact_posterior_as_q_gives_log_px_for_every_sample():
    model = linear_hierarchy()
    m = amortized(model)
    x = data(model, 6)
    log_px, mu, cov = exact(model, x)
    lw = m.log_weights(x, FullGaussian(mu, cov), 50)
    torch.testing.assert_close(lw, log_px.expand(50, -1), rtol=0, atol=1e-9)


@pytest.mark.parametrize("scheme", ["bottom_up", "ladder"])
def test_iwae_bounds_below_log_px_and_rising_in_k(scheme):
    model = linear_hierarchy()
    m = amortized(model) if scheme == "bottom_up" else ladder(model)
    x = data(model, 8)
    log_px = exact(model, x)[0]
    q = m.infer(x)
    g = torch.Generator().manual_seed(0)
    reps = 400
    bounds = {}
    for k in (1, 5, 50):
        lw = m.log_weights(x, q, k * reps, g).detach().reshape(reps, k, -1)
        bounds[k] = (torch.logsumexp(lw, 1) - math.log(k)).mean(0)  # [B], mean of reps independent k-sample bounds
    gap1 = log_px - bounds[1]
    assert gap1.mean() > 0.5  # a random encoder is a poor q
    assert (bounds[1] < bounds[5]).all() and (bounds[5] < bounds[50]).all()
    assert (bounds[50] < log_px).all()
    # the largest estimate closes most of the gap
    big = iwae_estimate(lambda n: m.log_weights(x, q, n, g), 20_000, 20_000)[0]
    assert ((log_px - big) < 0.5 * gap1).all()


def test_qstar_ffg_over_all_layers_is_the_mean_field_optimum():
    """q*_FFG reaches the closed-form best factorised Gaussian (correlated posterior: below log p(x) by exactly its KL)
    and, for a factorised posterior, log p(x) itself."""
    cfg = GapsConfig(families=["ffg"], qstar=QStarConfig(lr=0.05, k=50, max_steps=3000, patience=100, ema=0.95,
                                                         select_k=500))
    for factorised in (False, True):
        model = linear_hierarchy(factorised=factorised)
        m = amortized(model)
        x = data(model, 8)
        out = decompose(m, x, m.infer(x), k=2000, rows=100_000, cfg=cfg, generator=torch.Generator().manual_seed(0))
        best = mean_field_optimum(model, x)
        torch.testing.assert_close(out["gap/L_qstar_ffg"], best, atol=0.05, rtol=0)
        log_px = exact(model, x)[0]
        # IWAE-2000 from q*_FFG: a lower bound, tight where q*_FFG is exact (the reference gap/log_px is whichever
        # proposal wins an independent selection pass, which the random encoder's heavy-tailed IWAE can win)
        ref = out["gap/log_px_iwae_ffg"]
        if factorised:
            torch.testing.assert_close(best, log_px, atol=1e-9, rtol=0)
            torch.testing.assert_close(ref, log_px, atol=0.05, rtol=0)
        else:
            assert (log_px - best).mean() > 0.1  # the correlation between layers costs the factorised family
            assert (ref >= best - 0.05).all()  # at least the best factorised Gaussian's bound


def test_qstar_ffg_of_a_layered_q_starts_at_its_moments_not_its_point_estimate():
    """A layered q is not its own lambda (capability ``factorised`` is False): q*_FFG starts at its sampled mean and
    variance, which for the ladder's z1 include the spread that z2's draws carry through p(z1 | z2)."""
    from amortlab.distributions.moments import sampled_moments
    from amortlab.evaluation.gaps import local_family

    model = linear_hierarchy()
    m = ladder(model)
    x = data(model, 6)
    q = m.infer(x)
    assert not q.capabilities.factorised and DiagGaussian.capabilities.factorised
    cfg = GapsConfig(families=["ffg"], qstar=QStarConfig(init="encoder"))
    start = local_family("ffg", 6, Z, q, cfg, x, torch.Generator().manual_seed(0))()
    mean, var = sampled_moments(q, torch.Generator().manual_seed(0))
    torch.testing.assert_close(start.mu, mean)
    torch.testing.assert_close(start.logvar, var.log())
    point_logvar = q.pack().chunk(2, -1)[1]
    assert (var[:, :D1].log() > point_logvar[:, :D1] + 0.01).all()  # wider than the point estimate's z1


def test_ais_in_prior_noise_matches_exact_log_px():
    model = linear_hierarchy()
    x = data(model, 6)
    est = ais_log_likelihood(lambda x_, e: model.log_likelihood(x_, model.from_noise(e)), x, Z,
                             AISConfig(n_intermediate=500, n_chains=256), torch.Generator().manual_seed(0))
    err = est - exact(model, x)[0]
    assert err.abs().max() < 0.1 and err.abs().mean() < 0.04, err


def test_iw_svi_refines_the_factorised_gaussian_over_all_layers():
    model = linear_hierarchy()
    m = amortized(model)
    x = data(model, 8)
    q0 = m.infer(x)
    start = DiagGaussian.unpack(q0.pack())
    # k = 1: the refinement maximises each point's ELBO, whose optimum over factorised Gaussians is known exactly
    refined = refine(m, x, q0, SVIConfig(steps=1000, lr=0.05, k=1, select_reps=20), torch.Generator().manual_seed(0))
    before, after = elbo_closed_form(model, x, start), elbo_closed_form(model, x, refined)
    assert (before < mean_field_optimum(model, x) - 10).all()  # a random encoder's start is far off ...
    short = mean_field_optimum(model, x) - after
    assert (short >= -1e-9).all() and (short < 0.2).all(), short  # ... refinement reaches the best factorised q


# --- the layered q: densities and gradients against formulas written out ----------------------------------------
def _lognormal(z, mu, var):
    return (-0.5 * ((z - mu) ** 2 / var + var.log() + LOG_2PI)).sum(-1)


def _explicit_log_joint(model, x, z1, z2):
    dec, cond = model.decoder, model.conditionals[0]
    s2 = torch.exp(2 * dec.log_s)
    return (_lognormal(z2, torch.zeros_like(z2), torch.ones_like(z2))
            + _lognormal(z1, z2 @ cond.linear.weight.T + cond.linear.bias, cond.logvar.exp())
            + _lognormal(x, z1 @ dec.W.T + dec.b, s2.expand_as(x)))


def _explicit_bound(m, x, k, seed):
    """L_k per point of the bottom-up q with the library's noise stream (one eps [k, B, Z], layer order), everything
    written out."""
    torch.manual_seed(seed)
    eps = torch.randn(k, len(x), Z, dtype=F64)
    e1, e2 = eps[..., :D1], eps[..., D1:]
    enc = m.encoder
    h1 = enc.nets[0](x)
    mu1, lv1 = h1[:, :D1], h1[:, D1:]
    z1 = mu1 + torch.exp(0.5 * lv1) * e1  # z1 ~ q(z1 | x), z2 ~ q(z2 | z1)
    h2 = enc.nets[1](z1)
    mu2, lv2 = h2[..., :D2], h2[..., D2:]
    z2 = mu2 + torch.exp(0.5 * lv2) * e2
    log_q = _lognormal(z1, mu1, lv1.exp()) + _lognormal(z2, mu2, lv2.exp())
    lw = _explicit_log_joint(m.model, x, z1, z2) - log_q
    return torch.logsumexp(lw, 0) - math.log(k), log_q, torch.cat([z1, z2], -1)


def test_bottom_up_q_density_bound_and_gradients_against_explicit_formulas():
    """log q of the samples, the k-sample bound and the gradient of every parameter (encoder nets, p(z1 | z2) and the
    decoder) against the same quantities written out by hand."""
    model = linear_hierarchy()
    m = amortized(model, k=3)
    x = data(model, 5)
    params = list(m.parameters())
    torch.manual_seed(11)
    z, log_q = m.infer(x).rsample_with_log_prob(3)
    ref_bound, ref_log_q, ref_z = _explicit_bound(m, x, 3, 11)
    torch.testing.assert_close(z, ref_z, rtol=0, atol=1e-12)
    torch.testing.assert_close(log_q, ref_log_q, rtol=0, atol=1e-10)
    torch.testing.assert_close(m.infer(x).log_prob(z), ref_log_q, rtol=0, atol=1e-10)
    torch.manual_seed(11)
    bound = m.bound(x, 3)
    torch.testing.assert_close(bound, ref_bound, rtol=0, atol=1e-10)
    got = torch.autograd.grad(bound.sum(), params, allow_unused=True)
    want = torch.autograd.grad(ref_bound.sum(), params, allow_unused=True)
    for (name, _), a, b in zip(m.named_parameters(), got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)
    cond_grad = got[[n for n, _ in m.named_parameters()].index("model.conditionals.0.linear.weight")]
    assert cond_grad.abs().max() > 0


def _sonderby_ladder(m, x):
    """Sønderby et al. 2016's ladder inference model, with its parameters read by name: the deterministic path
    d_1 = MLP(x), d_2 = MLP(d_1) (tanh after every layer), heads mu^_n = Linear(d_n),
    sigma^_n^2 = softplus(Linear(d_n));
    q(z2 | x) = N(mu^_2, sigma^_2^2); q(z1 | z2, x) = N(mu_q, sigma_q^2), sigma_q^2 = 1 / (sigma^_1^-2 + sigma_p^-2),
    mu_q = (mu^_1 sigma^_1^-2 + mu_p sigma_p^-2) sigma_q^2, p(z1 | z2) = N(mu_p = A z2 + c, sigma_p^2).
    Returns mu^_2, sigma^_2^2 ``[B, D2]`` and z2 ``[..., B, D2]`` -> (mu_q, sigma_q^2) ``[..., B, D1]``."""
    P = dict(m.named_parameters())
    used = set()

    def linear(name, inputs):
        used.update({f"encoder.{name}.weight", f"encoder.{name}.bias"})
        return inputs @ P[f"encoder.{name}.weight"].T + P[f"encoder.{name}.bias"]

    def softplus(a):
        return torch.log1p(torch.exp(a))

    d1 = torch.tanh(linear("paths.0.2", torch.tanh(linear("paths.0.0", x))))
    d2 = torch.tanh(linear("paths.1.0", d1))
    mu1_hat, var1_hat = linear("mean_heads.0", d1), softplus(linear("var_heads.0", d1))
    mu2_hat, var2_hat = linear("mean_heads.1", d2), softplus(linear("var_heads.1", d2))
    assert used == {n for n in P if n.startswith("encoder.")}  # the reference reads every encoder parameter
    A, c = P["model.conditionals.0.linear.weight"], P["model.conditionals.0.linear.bias"]
    var_p = P["model.conditionals.0.logvar"].exp()

    def z1_given(z2):
        mu_p = z2 @ A.T + c
        var_q = 1.0 / (1.0 / var1_hat + 1.0 / var_p)
        return (mu1_hat / var1_hat + mu_p / var_p) * var_q, var_q

    return mu2_hat, var2_hat, z1_given


def test_ladder_q_is_sonderby_et_als_top_down_q():
    """The ladder's q against Sønderby et al.'s equations (``_sonderby_ladder``): the point estimate, z1's mean and
    variance given z2's drawn here, log q of z's drawn here (not from the library's noise), the log q it returns with
    its own samples, and the gradient of log q at fixed z of every parameter (encoder and p(z1 | z2))."""
    model = linear_hierarchy()
    m = ladder(model)
    x = data(model, 5)
    q = m.infer(x)
    mu2, var2, z1_given = _sonderby_ladder(m, x)
    mu1_pt, var1_pt = z1_given(mu2)
    want_pack = torch.cat([mu1_pt, mu2, var1_pt.log().expand_as(mu1_pt), var2.log()], -1)
    torch.testing.assert_close(q.pack(), want_pack, rtol=0, atol=1e-12)
    z = 1.5 * torch.randn(7, 5, Z, dtype=F64, generator=torch.Generator().manual_seed(4))
    mu_q, var_q = z1_given(z[..., D1:])
    got_mu, got_logvar = q.conditional(0, {1: z[..., D1:]})
    torch.testing.assert_close(got_mu, mu_q, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_logvar, var_q.log().expand_as(got_logvar), rtol=0, atol=1e-12)

    def ref_log_q(z):
        mu_q, var_q = z1_given(z[..., D1:])
        return _lognormal(z[..., D1:], mu2, var2) + _lognormal(z[..., :D1], mu_q, var_q)

    want = ref_log_q(z)
    got = q.log_prob(z)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    zs, log_q = q.rsample_with_log_prob(50, torch.Generator().manual_seed(5))
    torch.testing.assert_close(log_q, ref_log_q(zs), rtol=0, atol=1e-10)
    params = [p for _, p in m.named_parameters()]
    g_got = torch.autograd.grad(got.sum(), params, allow_unused=True, retain_graph=True)
    g_want = torch.autograd.grad(want.sum(), params, allow_unused=True)
    for (name, _), a, b in zip(m.named_parameters(), g_got, g_want):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)
        if name.startswith("encoder.") or name.startswith("model.conditionals."):
            assert a is not None and a.abs().max() > 0, name


def test_ladder_refuses_the_earlier_ladders_encoder_and_weights():
    """The earlier ladder (a BottomUpEncoder whose layer 2 read mu^_1) cannot be built or loaded: a reason, not a list
    of missing keys."""
    model = linear_hierarchy()
    with pytest.raises(AmortlabError, match="Retrain the ladder"):
        LadderVAE(encoder(), model=model)
    m = ladder(model)
    old = {k: v for k, v in m.state_dict().items() if not k.startswith("encoder.")}
    old.update({f"encoder.{k}": v for k, v in encoder().state_dict().items()})  # the earlier ladder's state_dict
    with pytest.raises(AmortlabError, match="earlier inference=ladder"):
        m.load_state_dict(old)
    m.load_state_dict(ladder(model).state_dict())


def test_pack_is_the_point_estimate_of_each_layer():
    model = linear_hierarchy()
    m = amortized(model)
    x = data(model, 4)
    q = m.infer(x)
    first = m.encoder.layer(0, x)
    second = m.encoder.layer(1, first.mu)
    want = torch.cat([first.mu, second.mu, first.logvar, second.logvar], -1)
    torch.testing.assert_close(q.pack(), want)
    assert isinstance(LayeredGaussian.unpack(q.pack()), DiagGaussian)


# --- schemes over all layers ----------------------------------------------------------------------------------------
def test_iterative_error_encoding_uses_each_layers_prior_prediction():
    model = linear_hierarchy()
    m = IterativeVAE(model=model, x_dim=X, iterations=2, encoding="error", hidden=[16]).double()
    x = data(model, 4)
    lam = 0.3 * torch.randn(4, 2 * Z, dtype=F64)
    inputs = m._inputs(x, lam, torch.Generator().manual_seed(2))
    z = DiagGaussian.unpack(lam).rsample(1, torch.Generator().manual_seed(2))[0]
    cond = model.conditionals[0]
    mu_p = z[:, D1:] @ cond.linear.weight.T + cond.linear.bias
    want = -torch.cat([(z[:, :D1] - mu_p) / torch.exp(0.5 * cond.logvar), z[:, D1:]], -1)
    torch.testing.assert_close(inputs[:, X:X + Z], want.detach())


def test_iterative_inference_climbs_to_the_mean_field_optimum():
    """Model fixed, update network trained: the iterates' closed-form ELBO rises from the prior's to within a small
    tolerance of the best factorised Gaussian - log p(x) itself on a factorised posterior."""
    for factorised in (True, False):
        model = linear_hierarchy(factorised=factorised)
        torch.manual_seed(0)
        m = IterativeVAE(model=model, x_dim=X, iterations=5, hidden=[32, 32]).double()
        m.x_center.zero_()
        model.requires_grad_(False)
        opt = torch.optim.Adam(m.update_net.parameters(), lr=3e-3)
        for step in range(300):
            loss = -m.bound(data(model, 64, seed=100 + step), 1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        x = data(model, 128, seed=7)
        with local_grad():
            lams = m.iterates(x, torch.Generator().manual_seed(0), track=False)
        gaps = [(mean_field_optimum(model, x) - elbo_closed_form(model, x, _q(lam.detach()))) for lam in lams]
        assert gaps[0].mean() > 1.0 and gaps[1].mean() < gaps[0].mean()
        assert gaps[-1].mean() < 0.05 * gaps[0].mean() and gaps[-1].mean() < 0.3, [float(g.mean()) for g in gaps]


def test_sa_vae_starts_at_the_layered_point_estimate_and_refinement_raises_the_bound():
    model = linear_hierarchy()
    enc = encoder()
    m = SAVAE(encoder=enc, model=model, refinement={"steps": 20, "lr": 0.05, "max_grad_norm": 0.0},
              importance_samples={"train": 1}).double()
    x = data(model, 8)
    q0 = m.infer(x)
    torch.testing.assert_close(q0.pack(), enc(x).pack())
    qK = m.refine(x, q0, torch.Generator().manual_seed(0))
    assert (elbo_closed_form(model, x, qK) - elbo_closed_form(model, x, q0)).mean() > 0.5
    bound = m.bound(x, 1)  # differentiable through the steps: the encoder gets a gradient
    g = torch.autograd.grad(bound.sum(), list(enc.parameters()))
    assert max(t.abs().max() for t in g) > 0


def test_iterative_gradients_route_as_for_the_flat_model():
    """theta from -L_k(lambda_T) only, phi from the mean over iterates of -L_k(lambda_t) (p(z1 | z2) is part of theta):
    the surrogate's gradients against the bounds of the iterates formed directly."""
    model = linear_hierarchy()
    m = IterativeVAE(model=model, x_dim=X, iterations=3, hidden=[16], importance_samples={"train": 4}).double()
    x = data(model, 5)
    theta = list(m.model.parameters())
    phi = list(m.update_net.parameters())
    torch.manual_seed(3)
    surrogate = m.bound(x, 4)
    g_theta = torch.autograd.grad(-surrogate.mean(), theta, retain_graph=True)
    g_phi = torch.autograd.grad(-surrogate.mean(), phi)
    torch.manual_seed(3)
    lams = m.iterates(x)
    bounds = {t: torch.logsumexp(m.log_weights(x, _q(lams[t]), 4, annealed=True), 0) - math.log(4)
              for t in (1, 2, 3)}
    torch.testing.assert_close(surrogate, bounds[3], rtol=0, atol=1e-12)
    ref_theta = torch.autograd.grad(-bounds[3].mean(), theta, retain_graph=True)
    ref_phi = torch.autograd.grad(-torch.stack([bounds[t].mean() for t in (1, 2, 3)]).mean(), phi)
    for a, b in [*zip(g_theta, ref_theta), *zip(g_phi, ref_phi)]:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert g_theta[[n for n, _ in m.model.named_parameters()].index("conditionals.0.linear.weight")].abs().max() > 0


def test_sa_vae_reverse_pass_over_all_layers_equals_unrolled_autograd():
    """SA-VAE's exact reverse pass through K steps on lambda = (z1, z2)'s (mu, log sigma^2): gradients of the
    encoder, p(z1 | z2) and the decoder against plain autograd through the unrolled steps."""
    from amortlab.objectives import k_sample_bound
    from amortlab.refinement import refine as unrolled

    model = linear_hierarchy()
    m = SAVAE(encoder=encoder(), model=model, refinement={"steps": 4, "lr": 0.05, "max_grad_norm": 2.0},
              importance_samples={"train": 2}).double()
    x = data(model, 5)
    params = list(m.parameters())
    torch.manual_seed(5)
    got = torch.autograd.grad(-m.bound(x, 2).sum(), params, allow_unused=True)
    torch.manual_seed(5)
    q0 = m.infer(x)
    lams = unrolled(m._objective(x, True), q0.pack(), m._noise(x, None), m.refinement, create_graph=True)
    ref = -k_sample_bound(m.log_weights(x, DiagGaussian.unpack(lams[-1]), 2, annealed=True)).sum()
    want = torch.autograd.grad(ref, params, allow_unused=True)
    for (name, _), a, b in zip(m.named_parameters(), got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=name)
    names = [n for n, _ in m.named_parameters()]
    assert got[names.index("encoder.nets.0.0.weight")].abs().max() > 0  # the encoder learns through the steps


# --- results per layer ----------------------------------------------------------------------------------------------
def test_active_units_are_counted_per_layer():
    torch.manual_seed(0)
    z = torch.zeros(500, Z, dtype=F64)
    z[:, 0] = torch.randn(500)           # z1: units 0 and 2 vary across points, unit 1 barely
    z[:, 1] = 0.01 * torch.randn(500)
    z[:, 2] = torch.randn(500)
    z[:, 4] = 0.5 * torch.randn(500)     # z2: unit 4 only
    metrics = SplitMetrics(["nll"], (D1, D2))
    for chunk in z.split(100):
        metrics.update({"nll": torch.zeros(100)}, chunk)
    out = metrics.compute("test")
    var = z.var(0)
    assert out["test/active_units/z1"] == int((var[:D1] > 0.01).sum()) == 2
    assert out["test/active_units/z2"] == int((var[D1:] > 0.01).sum()) == 1
    assert out["test/active_units"] == 3
    assert "test/active_units/z1" not in SplitMetrics(["nll"], 5).compute("test")


# --- the command line -------------------------------------------------------------------------------------------------
FAST = ["dataset=digits", "model=burda_mlp2", "trainer.max_epochs=1", "logger=none", "importance_samples.test=50",
        "trainer.limit_test_batches=1", "evaluation.train_points=0"]


@pytest.mark.parametrize("scheme", [["inference=amortized", "importance_samples=k5"], ["inference=ladder"],
                                    ["inference=iterative", "inference.iterations=2"],
                                    ["inference=sa_vae", "inference.refinement.steps=2"]])
def test_cli_every_scheme_reports_active_units_per_layer(tmp_path, scheme):
    train(*FAST, *scheme, run_dir=tmp_path)
    r = results(tmp_path)["metrics"]
    assert {"test/active_units/z1", "test/active_units/z2"} <= set(r)
    assert r["test/active_units/z1"] + r["test/active_units/z2"] == r["test/active_units"]
    assert r["test/nll"] < r["test/neg_elbo"] + 1e-9 and math.isfinite(r["test/nll"])


@pytest.mark.parametrize("overrides, says", [
    (["posterior=flow"], "one latent layer"),
    (["inference=recursive_mixture"], "stochastic layers"),
    (["model=burda_mlp", "inference=ladder"], "hierarchical model"),
])
def test_cli_refuses_one_layer_pieces_with_a_hierarchy(tmp_path, overrides, says):
    proc = train(*FAST, *overrides, run_dir=tmp_path, check=False)
    assert proc.returncode != 0
    assert says in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
    r = results(tmp_path)  # the run's record: refused before anything was built or trained
    assert r["status"] == "failed" and r["reason"] == "config" and not (tmp_path / "checkpoints").exists()


def test_cli_refuses_to_evaluate_a_checkpoint_of_the_earlier_ladder(tmp_path):
    """A checkpoint as the earlier ladder wrote it (inference.encoder = the model's BottomUpEncoder, weights
    encoder.nets.*): evaluating it is refused with the reason (results.json: failed, config), not a traceback; so are
    its weights under today's stored config."""
    train(*FAST, "inference=ladder", run_dir=tmp_path / "fit")
    ckpt = torch.load(results(tmp_path / "fit")["checkpoints"]["last"], weights_only=True)
    enc = ckpt["amortlab_config"]["model"]["encoder"]
    earlier = BottomUpEncoder(enc["x_dim"], enc["latent_dims"], enc["hidden"], enc["activation"]).state_dict()
    ckpt["state_dict"] = {**{k: v for k, v in ckpt["state_dict"].items() if not k.startswith("encoder.")},
                          **{f"encoder.{k}": v for k, v in earlier.items()}}
    torch.save(ckpt, tmp_path / "weights.ckpt")  # the earlier weights, today's config
    ckpt["amortlab_config"]["inference"]["encoder"] = enc
    del ckpt["amortlab_config"]["model"]["ladder_encoder"]
    torch.save(ckpt, tmp_path / "earlier.ckpt")  # the earlier ladder's checkpoint
    for name, says in [("earlier", "Retrain the ladder"), ("weights", "earlier inference=ladder")]:
        proc = train("train=false", f"ckpt_path={tmp_path / name}.ckpt", "logger=none", run_dir=tmp_path / name,
                     check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert says in proc.stderr + proc.stdout and "Retrain the ladder" in proc.stderr + proc.stdout
        r = results(tmp_path / name)
        assert r["status"] == "failed" and r["reason"] == "config"


@pytest.mark.slow
def test_cli_ladder_evaluation_is_equal_on_two_processes(tmp_path):
    """Every value of a two-layer checkpoint's evaluation (IWAE estimates, counts, per-layer active units; splits of
    180 and 359 points, not multiples of 2 x 100): DDP on 2 processes = one process."""
    train(*FAST, "inference=ladder", run_dir=tmp_path / "fit")
    ckpt = results(tmp_path / "fit")["checkpoints"]["evaluated"]
    common = ["train=false", f"ckpt_path={ckpt}", "logger=none", "importance_samples.test=200"]
    train(*common, run_dir=tmp_path / "one")
    train(*common, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", run_dir=tmp_path / "two")
    a, b = results(tmp_path / "one")["metrics"], results(tmp_path / "two")["metrics"]
    assert {"test/active_units/z1", "test/active_units/z2"} <= set(a) and (a["val/n_points"], a["test/n_points"]) == (
        180, 359)
    assert_same_on_any_world_size(a, b)  # every key

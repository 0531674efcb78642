"""Recursive mixture inference (inference=recursive_mixture) and the stratified mixture posterior."""
import copy
import math

import pytest
import torch

from amortlab.data.loader import Batch
from amortlab.distributions import DiagGaussian, MixtureGaussian
from amortlab.distributions.mixture import recursive_mixture_weights
from amortlab.errors import AmortlabError
from amortlab.evaluation.iw_svi import IWSVI
from amortlab.methods import AmortizedVAE, RecursiveMixtureVAE
from amortlab.nets import BernoulliDecoder, GaussianEncoder, LinearGaussianEncoder
from amortlab.objectives import k_sample_bound
from tests.test_estimators import X_DIM, Z_DIM, data, linear_model

pytestmark = pytest.mark.usefixtures("one_thread")


def recmix_linear(M: int = 3, shifts=(0.6, -0.6, 0.2), exact: bool = False, **kwargs):
    """RecMix on the linear-Gaussian model, component j = the exact posterior with its mean shifted by shifts[j]
    (all exact with ``exact``); returns (model, x, exact log p(x))."""
    base = linear_model()
    x = data(base, 6).detach()
    m = RecursiveMixtureVAE(LinearGaussianEncoder(X_DIM, Z_DIM), base.decoder, components=M, **kwargs).double()
    with torch.no_grad():
        for j, enc in enumerate(m.encoders):
            enc.set_exact(base.decoder)
            if not exact:
                enc.linear.bias.add_(shifts[j])
    return m, x, base.decoder.exact_log_marginal(x)


@pytest.mark.parametrize("M, eps", [(1, 0.5), (2, 0.5), (3, 0.5), (5, 0.5), (4, 0.3), (5, 0.9)])
def test_recursive_weights_sum_to_one_and_follow_the_recursion(M, eps):
    w = recursive_mixture_weights(M, eps)
    assert len(w) == M and math.isclose(sum(w), 1.0, rel_tol=0, abs_tol=1e-12)
    # Q_m = (1 - eps) Q_{m-1} + eps q_m, unrolled by hand
    ref = [1.0]
    for _ in range(2, M + 1):
        ref = [(1 - eps) * v for v in ref] + [eps]
    assert w == pytest.approx(ref, abs=1e-15)
    assert recursive_mixture_weights(3, 0.5) == [0.25, 0.25, 0.5]


@pytest.mark.parametrize("kwargs, fix", [({"components": 0}, "components"), ({"epsilon": 1.0}, "epsilon"),
                                         ({"kl_weight": -1.0}, "kl_weight")])
def test_bad_config_is_one_readable_error(kwargs, fix):
    with pytest.raises(AmortlabError, match=fix):
        RecursiveMixtureVAE(LinearGaussianEncoder(X_DIM, Z_DIM), linear_model().decoder, **kwargs)


@pytest.mark.parametrize("per_point_weights", [False, True])
def test_mixture_log_prob_against_explicit_density(per_point_weights):
    M, B, Z, k = 3, 4, 2, 5
    g = torch.Generator().manual_seed(0)
    mus = torch.randn(M, B, Z, generator=g, dtype=torch.float64)
    logvars = 0.5 * torch.randn(M, B, Z, generator=g, dtype=torch.float64)
    w = torch.rand(M, B, generator=g, dtype=torch.float64) if per_point_weights else torch.tensor(
        [0.2, 0.3, 0.5], dtype=torch.float64)
    w = w / w.sum(0)
    q = MixtureGaussian(mus, logvars, w.log())

    def density(z):  # sum_j w_j prod_d N(z_d; mu_jd, sigma_jd^2), written out
        dens = torch.zeros(z.shape[:-1], dtype=torch.float64)
        for j in range(M):
            var = logvars[j].exp()
            comp = torch.exp(-0.5 * (z - mus[j]) ** 2 / var) / torch.sqrt(2 * math.pi * var)
            dens += (w[j] if per_point_weights else w[j].expand(B)) * comp.prod(-1)
        return dens

    z = 2 * torch.randn(k, B, Z, generator=g, dtype=torch.float64)
    torch.testing.assert_close(q.log_prob(z), density(z).log(), rtol=1e-12, atol=1e-12)
    # the log-density the (stratified) draws come with is log Q at the draws
    zz, log_q = q.rsample_with_log_prob(7, g)
    assert zz.shape == (7, B, Z)
    torch.testing.assert_close(log_q, density(zz).log(), rtol=1e-12, atol=1e-12)


def test_stratified_allocation_is_proportional():
    """Exact counts n_j = k w_j when k w_j are integers; otherwise E[n_j] = k w_j (the estimator's unbiasedness)."""
    B = 3
    q = MixtureGaussian(torch.zeros(3, B, 1), torch.zeros(3, B, 1), torch.tensor([0.25, 0.25, 0.5]).log())
    for seed in range(5):
        j = q.stratified_components(8, torch.Generator().manual_seed(seed))  # [k, B]
        counts = torch.stack([(j == c).sum(0) for c in range(3)])
        assert (counts == torch.tensor([2, 2, 4]).unsqueeze(-1)).all()
    q = MixtureGaussian(torch.zeros(3, B, 1), torch.zeros(3, B, 1), torch.tensor([0.1, 0.3, 0.6]).log())
    j = torch.stack([q.stratified_components(4, torch.Generator().manual_seed(s)) for s in range(2000)])
    freq = torch.stack([(j == c).double().mean() for c in range(3)])
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64), atol=0.01, rtol=0)
    counts = torch.stack([(j == c).sum(1) for c in range(3)])  # [3, reps, B]: stratified, never far from k w_j
    assert (counts[2] >= 2).all() and (counts[2] <= 3).all()


def _mean_and_se(bounds):
    """Mean and standard error over independent repetitions (dim 0) ``[reps, B]`` -> ``[B]``, ``[B]``."""
    return bounds.mean(0), bounds.std(0) / math.sqrt(bounds.shape[0])


def test_stratified_iwae_is_unbiased_for_px_and_a_bound_increasing_in_k():
    m, x, exact = recmix_linear()
    q = m.infer(x)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lw = m.log_weights(x, q, 100_000, g)  # [k, B], one call (the draws are stratified over all of them)
    # (1/k) sum w is unbiased for p(x): with many draws its log is log p(x) (sd of w / p(x) ~ 0.94: ~0.003 here)
    torch.testing.assert_close(k_sample_bound(lw), exact, atol=0.015, rtol=0)
    # the mean log-weight estimates the mixture ELBO sum_j w_j E_{q_j}[log p - log Q] (by component, i.i.d.)
    w = recursive_mixture_weights(3, 0.5)  # [1/4, 1/4, 1/2]
    with torch.no_grad():
        by_component = [m.log_joint(x, z) - q.log_prob(z) for z in (q.component(j).rsample(100_000, g)
                                                                      for j in range(3))]
    elbo = sum(wj * lwj.mean(0) for wj, lwj in zip(w, by_component))
    elbo_se = sum(wj**2 * lwj.var(0) / lwj.shape[0] for wj, lwj in zip(w, by_component)).sqrt()
    torch.testing.assert_close(lw.mean(0), elbo, atol=0.02, rtol=0)
    # E[L_k] of the stratified k-draw estimator: every repetition is its own stratified set of k draws (x repeated,
    # one log_weights call with k draws per row), against independent references -- k = 1: one draw from component
    # j with probability w_j, so E[L_1] = the mixture ELBO above; k in 4, 16, 64 (k w_j integers): the allocation is
    # deterministic, n_j = k w_j draws from component j, written out here by component
    means, ses = [], []
    for k in (1, 4, 16, 64):
        reps = 65_536 // k
        xr = x.repeat(reps, 1)
        with torch.no_grad():
            bounds = k_sample_bound(m.log_weights(xr, m.infer(xr), k, g)).reshape(reps, len(x))
            if k == 1:
                ref, ref_se = elbo, elbo_se
            else:
                parts = []
                for j, wj in enumerate(w):
                    n = round(k * wj)
                    z = q.component(j).rsample(n * reps, g)  # [n * reps, B, Z]
                    parts.append((m.log_joint(x, z) - q.log_prob(z)).reshape(reps, n, len(x)))
                ref, ref_se = _mean_and_se(torch.logsumexp(torch.cat(parts, 1), 1) - math.log(k))
        mean, se = _mean_and_se(bounds)
        tol = 4 * (se**2 + ref_se**2).sqrt() + 1e-3
        assert ((mean - ref).abs() <= tol).all(), (k, mean - ref, tol)
        means.append(mean)
        ses.append(se)
    gap1 = (exact - means[0]).mean()
    assert gap1 > 0.3  # the shifted components leave a real gap at k = 1 ...
    for lo, hi, se_lo, se_hi in zip(means[:-1], means[1:], ses[:-1], ses[1:]):  # ... E[L_k] rises with k ...
        assert (hi - lo).mean() > 4 * (se_lo.pow(2).sum() + se_hi.pow(2).sum()).sqrt() / len(x)
    # ... stays below the exact log p(x) (up to Monte Carlo error) and closes most of the gap by k = 64
    assert ((means[-1] - exact) < 4 * ses[-1]).all()
    assert (exact - means[-1]).mean() < 0.05 * gap1


@pytest.mark.parametrize("k", [1, 3])
def test_exact_components_give_log_px_for_every_sample(k):
    m, x, exact = recmix_linear(exact=True)
    lw = m.log_weights(x, m.infer(x), 20)
    torch.testing.assert_close(lw, exact.expand_as(lw), atol=1e-9, rtol=0)
    torch.testing.assert_close(m.bound(x, k), exact, atol=1e-9, rtol=0)  # the training bound too


def test_training_bound_is_below_log_px_and_increases_with_k():
    m, x, exact = recmix_linear()
    reps = {1: 4000, 4: 1000, 32: 125}  # independent bounds of x, batched as copies of x
    vals = {k: m.bound(x.repeat(r, 1), k).detach().reshape(r, len(x)).mean(0) for k, r in reps.items()}
    assert (vals[1] < vals[4]).all() and (vals[4] < vals[32]).all()
    assert ((vals[32] - exact) < 0.02).all()


def _normal_log_prob(z, mu, logvar):
    return torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)


@pytest.mark.parametrize("k", [1, 2])
def test_training_loss_matches_reference_objective(k):
    """Loss and every gradient against an independent implementation of methods.md §5: the stratified mixture
    bound (theta, all components) plus, for m >= 2, ELBO(q_m) + kl_weight KL(q_m || sg Q_{m-1}) with theta and
    Q_{m-1} held constant (the KL is a reward: it enters with a + sign)."""
    m, x, _ = recmix_linear(M=3, kl_weight=0.7)
    m.entropy_weight = 0.8
    params = dict(m.named_parameters())
    torch.manual_seed(11)
    loss = -m.bound(x, k).mean()
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))

    torch.manual_seed(11)
    qs = [enc(x) for enc in m.encoders]
    M, B = 3, len(x)
    eps = torch.randn(k, M, B, Z_DIM, dtype=torch.float64)
    w = torch.tensor(recursive_mixture_weights(3, 0.5), dtype=torch.float64)
    d = m.decoder

    def log_px_z(z, frozen=False):
        W, b, log_s = (d.W.detach(), d.b.detach(), d.log_s.detach()) if frozen else (d.W, d.b, d.log_s)
        return _normal_log_prob(x, z @ W.T + b, 2 * log_s.expand(X_DIM))

    def log_mix(z, comps, weights):
        return torch.logsumexp(torch.stack([wj.log() + _normal_log_prob(z, c.mu, c.logvar)
                                            for wj, c in zip(weights, comps)]), 0)

    std_normal = torch.zeros(Z_DIM, dtype=torch.float64)
    mixture_terms, new_terms = [], 0
    for j, c in enumerate(qs):
        z = c.mu + torch.exp(0.5 * c.logvar) * eps[:, j]  # [k, B, Z]
        lw = log_px_z(z) + _normal_log_prob(z, std_normal, std_normal) - 0.8 * log_mix(z, qs, w)
        mixture_terms.append(lw)
        if j >= 1:
            prev = [DiagGaussian(p.mu.detach(), p.logvar.detach()) for p in qs[:j]]
            log_q = _normal_log_prob(z, c.mu, c.logvar)
            elbo = log_px_z(z, frozen=True) + _normal_log_prob(z, std_normal, std_normal) - 0.8 * log_q
            kl = log_q - log_mix(z, prev, torch.tensor(recursive_mixture_weights(j, 0.5), dtype=torch.float64))
            new_terms = new_terms + (elbo + 0.7 * kl).mean(0)
    lw = torch.stack(mixture_terms, 1)  # [k, M, B]
    if k == 1:
        mixture = (w[:, None] * lw[0]).sum(0)
    else:
        mixture = torch.logsumexp(w.log()[:, None] + torch.logsumexp(lw, 0) - math.log(k), 0)
    torch.testing.assert_close(loss, -mixture.mean(), rtol=1e-12, atol=1e-12)  # the value: the mixture bound
    ref = dict(zip(params, torch.autograd.grad(-(mixture + new_terms).mean(), list(params.values()),
                                               retain_graph=True)))
    for name in params:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-9, atol=1e-11, msg=name)
    # theta's gradient comes from the mixture bound alone
    ref_theta = torch.autograd.grad(-mixture.mean(), [d.W, d.b, d.log_s])
    for name, r in zip(["model.decoder.W", "model.decoder.b", "model.decoder.log_s"], ref_theta):
        torch.testing.assert_close(grads[name], r, rtol=1e-9, atol=1e-11)


def test_components_are_wrapped_copies_with_their_own_initialisation():
    from torch.nn.utils import parametrize

    from amortlab.regularizers import WeightNorm

    torch.manual_seed(0)
    enc = GaussianEncoder(20, 4, [16])
    first = copy.deepcopy(enc.state_dict())
    m = RecursiveMixtureVAE(enc, BernoulliDecoder(20, 4, [16]), components=3, regularizer=WeightNorm(2.0))
    assert len(m.encoders) == 3 and m.encoders[0] is enc
    for e in m.encoders:
        assert all(parametrize.is_parametrized(layer, "weight") for layer in e.modules()
                   if isinstance(layer, torch.nn.Linear))
    x = torch.rand(5, 20)
    q = m.infer(x)
    assert q.mus.shape == (3, 5, 4) and not torch.allclose(q.mus[0], q.mus[1])  # distinct initialisations
    torch.testing.assert_close(m.encoders[0].net[0].parametrizations.weight.original, first["net.0.weight"])
    torch.testing.assert_close(q.weights[:, 0], torch.tensor([0.25, 0.25, 0.5]))
    torch.testing.assert_close(q.mu, q.mus[2])  # the point estimate: the heaviest component's mean


def mlp_pair(k: int):
    """AmortizedVAE and RecursiveMixtureVAE(M=1) with identical (float64) weights on an MLP encoder/decoder."""
    torch.manual_seed(0)
    enc, dec = GaussianEncoder(20, 4, [16]), BernoulliDecoder(20, 4, [16])
    ks = {"train": k, "val": 10, "test": 200}
    vae = AmortizedVAE(copy.deepcopy(enc), copy.deepcopy(dec), importance_samples=ks).double()
    mix = RecursiveMixtureVAE(copy.deepcopy(enc), copy.deepcopy(dec), components=1, importance_samples=ks).double()
    x = torch.bernoulli(torch.rand(12, 20, generator=torch.Generator().manual_seed(1))).double()
    return vae, mix, x


@pytest.mark.parametrize("k", [1, 5])
def test_one_component_is_the_vae_exactly(k):
    vae, mix, x = mlp_pair(k)
    out = []
    for m in (vae, mix):
        torch.manual_seed(7)
        loss = m.training_loss(x)
        loss.backward()
        grads = {n.replace("encoders.0.", "encoder."): p.grad for n, p in m.named_parameters()}
        with torch.inference_mode():
            ev = m.evaluate_batch(Batch(x, 0), k=200)
            ev_svi = m.evaluate_batch(Batch(x, 0), k=50, estimator=IWSVI())
        out.append((loss.detach(), grads, ev, ev_svi))
    (la, ga, ea, sa), (lb, gb, eb, sb) = out
    assert torch.equal(la, lb)
    assert ga.keys() == gb.keys()
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n
    for a, b in ((ea, eb), (sa, sb)):
        for key in a:
            if key != "infer_seconds":
                assert torch.equal(a[key], b[key]), key


def test_gaps_evaluation_runs_on_a_mixture():
    """Every number of the decomposition against an independent one: log p(x) exact; L[Q] = sum_j w_j E_{q_j}[log p -
    log Q] by component; q*_FFG reaches the exact (diagonal) posterior, so L[q*_FFG] = log p(x), the approximation gap
    is 0 and the amortization and inference gaps are log p(x) - L[Q]. The reference log p_hat(x) is either q*_FFG's
    IWAE (exact here) or the mixture's own IWAE-2000, whose noise (sd over 50 independent repetitions) sets its
    tolerance."""
    from amortlab.evaluation.gap_decomposition import GapDecomposition
    from amortlab.evaluation.qstar import QStarConfig

    m, x, exact = recmix_linear(M=2)
    q = m.infer(x)
    w = recursive_mixture_weights(2, 0.5)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        by_component = [m.log_joint(x, z) - q.log_prob(z) for z in (q.component(j).rsample(100_000, g)
                                                                      for j in range(2))]
        L_q = sum(wj * lwj.mean(0) for wj, lwj in zip(w, by_component))
        L_q_se = sum(wj**2 * lwj.var(0) / lwj.shape[0] for wj, lwj in zip(w, by_component)).sqrt()
        sd_lw = m.log_weights(x, q, 100_000, g).std(0)  # the stratified mean over 2000 draws varies less than iid
        xr = x.repeat(50, 1)
        iwae_sd = k_sample_bound(m.log_weights(xr, m.infer(xr), 2000, g)).reshape(50, len(x)).std(0)
    tol_ref = 4 * iwae_sd + 0.01  # the reference log p_hat(x)
    tol_L_q = 4 * (sd_lw**2 / 2000 + L_q_se**2).sqrt() + 1e-3
    tol_qstar = 0.02  # 300 steps of q* from either start: within 0.02 of the exact posterior's ELBO
    for init in ("prior", "encoder"):  # q* from the prior, or from the heaviest component
        est = GapDecomposition(families=["ffg"], qstar=QStarConfig(lr=0.05, k=20, max_steps=300, patience=50,
                                                                   init=init))
        with torch.inference_mode():
            out = m.evaluate_batch(Batch(x, 0), k=2000, estimator=est)
        checks = {"gap/log_px": (exact, tol_ref), "gap/L_q": (L_q, tol_L_q), "gap/L_qstar_ffg": (exact, tol_qstar),
                  "gap/approximation": (0 * exact, tol_ref + tol_qstar),
                  "gap/amortization": (exact - L_q, tol_qstar + tol_L_q),
                  "gap/inference": (exact - L_q, tol_ref + tol_L_q)}
        for key, (want, tol) in checks.items():
            assert ((out[key] - want).abs() <= tol).all(), (init, key, out[key] - want, tol)
        assert ((exact - L_q) > 3 * (tol_ref + tol_L_q)).all()  # the shifted components leave a real gap


# --- CLI (in-process compose -> run, as train.py does) --------------------------------------------------------------
def cli(run_dir, *overrides: str) -> dict:
    from amortlab.build import compose_config
    from amortlab.run import run

    cfg = compose_config(["logger=none", "trainer.max_epochs=2", "trainer.limit_train_batches=4",
                          "importance_samples.test=50", *overrides], run_dir)
    return run(cfg, run_dir)


def test_cli_digits_with_k5_and_gap_evaluation(tmp_path):
    r = cli(tmp_path, "inference=recursive_mixture", "importance_samples=k5", "evaluation=gaps",
            "evaluation.estimator.families=[ffg]", "evaluation.estimator.qstar.max_steps=10",
            "evaluation.estimator.qstar.k=5", "evaluation.estimator.qstar.select_k=20")
    assert r["status"] == "ok"
    m = r["metrics"]
    for key in ("test/nll", "test/neg_elbo", "test/gap/L_qstar_ffg", "test/gap/amortization", "test/gap/inference"):
        assert math.isfinite(m[key]), key
    assert r["axes"] == {**r["axes"], "method": "recursive_mixture", "M": 3, "k": 5}
    assert "recmix3" in r["tags"] and (tmp_path / "gaps.md").is_file()


def test_cli_one_component_reproduces_the_vae_run(tmp_path):
    a = cli(tmp_path / "vae", "inference=amortized", "encoder_regularizer=weight_norm")
    b = cli(tmp_path / "mix", "inference=recursive_mixture", "inference.components=1",
            "encoder_regularizer=weight_norm")
    for key, value in a["metrics"].items():
        if "infer_seconds" not in key:
            assert b["metrics"][key] == value, key


def test_iw_svi_with_a_mixture_is_refused():
    from amortlab.errors import AmortlabError
    from amortlab.build import build_from_overrides

    with pytest.raises(AmortlabError, match="MixtureGaussian.*inference.components=1"):
        build_from_overrides(["inference=recursive_mixture", "evaluation=iw_svi", "logger=none"])


def test_adversarial_perturbs_along_the_clean_bound_not_the_surrogate():
    """RecMix's training surrogate has zero-valued terms with non-zero gradients (the KL reward of new components);
    the adversarial regularizer must step along grad_x of the clean bound L_k(x; Q = f(x_enc)) instead."""
    from amortlab.objectives import k_sample_bound
    from amortlab.regularizers import Adversarial

    m, x, _ = recmix_linear(kl_weight=1.0)
    reg = Adversarial(epsilon=0.1, norm="l2")

    def step_along(objective):
        torch.manual_seed(7)
        x_enc = x.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(objective(x_enc).sum(), x_enc)
        return g / g.norm(dim=1, keepdim=True)

    clean = step_along(lambda xe: k_sample_bound(m.log_weights(x, m.infer(xe), 3)))
    surrogate = step_along(lambda xe: m.bound(x, 3, x_enc=xe))
    assert (clean - surrogate).norm(dim=1).min() > 0.05  # the two directions differ here
    torch.manual_seed(7)
    x_adv = reg.perturb(m, x, 3)
    torch.testing.assert_close((x - x_adv) / 0.1, clean, atol=1e-9, rtol=0)

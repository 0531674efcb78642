"""Semi-amortized inference: the exact reverse pass through the K refinement steps against an independent unrolled
autograd loop and float64 finite differences; the four schemes' gradients; K = 0 equals the VAE; per-example steps;
test-time refinement; composition on the CLI."""
import pytest
import torch

from amortlab.data.loader import Batch
from amortlab.distributions import DiagGaussian
from amortlab.errors import AmortlabError
from amortlab.methods import SAVAE, SVI, AmortizedVAE, VAEPlusSVI, VAEPlusSVIKL
from amortlab.nets import BernoulliDecoder, GaussianEncoder
from amortlab.objectives import LOG_2PI
from amortlab.refinement import RefinementConfig
from tests.test_cli import results, train

X, Z, B = 12, 3, 5
F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def make(cls, steps=4, k=1, clip=35.0, lr=0.02, momentum=0.5, hvp="exact", seed=0, dtype=F64):
    torch.manual_seed(seed)
    enc, dec = GaussianEncoder(X, Z, (10,)), BernoulliDecoder(X, Z, (10,))
    with torch.no_grad():  # a lively random model: large, varied gradients so clipping and curvature matter
        for p in [*enc.parameters(), *dec.parameters()]:
            p.mul_(2.0)
    kw = {"importance_samples": {"train": k}}
    if cls is AmortizedVAE:
        return AmortizedVAE(enc, decoder=dec, **kw).to(dtype)
    ref = {"steps": steps, "lr": lr, "momentum": momentum, "max_grad_norm": clip, "hvp": hvp}
    return cls(decoder=dec, encoder=enc, refinement=ref, **kw).to(dtype)


def data(seed=1, n=B):
    return torch.bernoulli(torch.full((n, X), 0.4, dtype=F64), generator=torch.Generator().manual_seed(seed))


# --- an independent reference: plain autograd through the unrolled loop -------------------------------------------
def ref_elbo(model, x, lam, eps):
    """-L_k per example for lambda [B, 2Z], eps [k, B, Z], written out from scratch."""
    mu, logvar = lam[:, :Z], lam[:, Z:]
    z = mu + (0.5 * logvar).exp() * eps
    log_q = (-0.5 * (eps ** 2 + logvar + LOG_2PI)).sum(-1)
    logits = model.decoder(z)
    log_px_z = (x * torch.nn.functional.logsigmoid(logits) + (1 - x) * torch.nn.functional.logsigmoid(-logits)).sum(-1)
    log_pz = (-0.5 * (z ** 2 + LOG_2PI)).sum(-1)
    log_w = log_px_z + log_pz - log_q
    return -(torch.logsumexp(log_w, 0) - torch.log(torch.tensor(float(eps.shape[0]), dtype=F64)))


def ref_clip(g, c):
    out = []
    for h in (g[:, :Z], g[:, Z:]):
        n = h.norm(dim=1, keepdim=True)
        out.append(torch.where(n > c, h * c / n, h) if c > 0 else h)
    return torch.cat(out, 1)


def ref_loss(model, x, seed, steps, k, clip, lr, momentum=0.5):
    """-sum_b L_k(x_b; lambda_K) with the same noise stream as the library (K step noises, then the final eps)."""
    torch.manual_seed(seed)
    noise = [torch.randn(k, len(x), Z, dtype=F64) for _ in range(steps)]
    eps = torch.randn(k, len(x), Z, dtype=F64)
    q0 = model.encoder(x)
    lam = torch.cat([q0.mu, q0.logvar], 1)
    v = torch.zeros_like(lam)
    for t in range(steps):
        g = torch.autograd.grad(ref_elbo(model, x, lam, noise[t]).sum(), lam, create_graph=True)[0]
        v = momentum * v - ref_clip(g, clip)
        lam = lam + lr * v
    return ref_elbo(model, x, lam, eps).sum(), lam


def lib_loss(model, x, seed):
    torch.manual_seed(seed)
    return -model.bound(x, model.k_train).sum()


@pytest.mark.parametrize("k,clip,lr", [(1, 5.0, 1.0), (1, 0.5, 0.5), (3, 1.0, 0.02), (2, 0.0, 0.1)])
def test_sa_vae_gradients_equal_unrolled_autograd(k, clip, lr):
    model = make(SAVAE, steps=4, k=k, clip=clip, lr=lr)
    x = data()
    params = list(model.parameters())
    loss = lib_loss(model, x, seed=7)
    grads = torch.autograd.grad(loss, params)
    ref, lam_K = ref_loss(model, x, 7, 4, k, clip, lr=lr)
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(loss, ref, atol=1e-10, rtol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-9)
    assert all(g.abs().max() > 1e-6 for g in grads[:2])  # the encoder does get a gradient through the steps
    if clip == 0.5:  # the clip was active (its Jacobian is part of what was checked)
        q0 = model.encoder(x)
        g0 = torch.autograd.grad(ref_elbo(model, x, torch.cat([q0.mu, q0.logvar], 1),
                                          torch.randn(k, B, Z, dtype=F64)).sum(), q0.mu)[0]
        assert (g0.norm(dim=1) > 0.5).any()


def test_sa_vae_gradients_equal_finite_differences():
    model = make(SAVAE, steps=3, k=2, clip=5.0, lr=0.5)
    x = data(seed=2)
    loss = lib_loss(model, x, seed=3)
    named = dict(model.named_parameters())
    grads = dict(zip(named, torch.autograd.grad(loss, list(named.values()))))
    h = 1e-6
    checked = 0
    for name in ("encoder.net.0.weight", "encoder.net.2.bias", "model.decoder.net.0.bias",
                 "model.decoder.net.2.weight"):
        p = named[name]
        for idx in [(0,) * p.dim(), tuple(s - 1 for s in p.shape)]:
            with torch.no_grad():
                p[idx] += h
                up = lib_loss(model, x, seed=3)
                p[idx] -= 2 * h
                down = lib_loss(model, x, seed=3)
                p[idx] += h
            fd = (up - down) / (2 * h)
            torch.testing.assert_close(grads[name][idx], fd, atol=2e-6, rtol=1e-5)
            checked += 1
    assert checked >= 4


def test_finite_difference_hvp_option_approximates_exact():
    x = data()
    exact = make(SAVAE, steps=4, k=1, clip=5.0, lr=0.5)
    fd = make(SAVAE, steps=4, k=1, clip=5.0, lr=0.5, hvp="finite_difference")
    g_exact = torch.autograd.grad(lib_loss(exact, x, 5), list(exact.parameters()))
    g_fd = torch.autograd.grad(lib_loss(fd, x, 5), list(fd.parameters()))
    for a, b in zip(g_exact, g_fd):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_k0_sa_vae_is_the_vae_exactly():
    x = data()
    vae, sa = make(AmortizedVAE), make(SAVAE, steps=0)
    lv, ls = lib_loss(vae, x, 11), lib_loss(sa, x, 11)
    assert torch.equal(lv, ls)
    for a, b in zip(torch.autograd.grad(lv, list(vae.parameters())), torch.autograd.grad(ls, list(sa.parameters()))):
        assert torch.equal(a, b)
    batch = Batch(x, 0)
    ev, es = vae.evaluate_batch(batch, 50), sa.evaluate_batch(batch, 50)
    for key in ("nll", "neg_elbo"):
        assert torch.equal(ev[key], es[key])


def test_steps_are_per_example():
    """Refining a batch = refining each point alone with its own noise (no 1/B in the step)."""
    model = make(VAEPlusSVI, steps=5)
    x = data()
    q0 = model.encoder(x)
    torch.manual_seed(0)
    together = model.refine(x, q0)
    for b in range(B):
        torch.manual_seed(0)
        noise = [n[:, b:b + 1] for n in model._noise(x, None)]
        model._noise = lambda xx, g, noise=noise: noise
        alone = model.refine(x[b:b + 1], DiagGaussian(q0.mu[b:b + 1], q0.logvar[b:b + 1]))
        del model._noise
        torch.testing.assert_close(alone.mu, together.mu[b:b + 1], atol=1e-12, rtol=0)
        torch.testing.assert_close(alone.logvar, together.logvar[b:b + 1], atol=1e-12, rtol=0)


def _split_grads(model, loss):
    enc = list(model.encoder.parameters()) if hasattr(model, "encoder") else []
    dec = list(model.decoder.parameters())
    g = torch.autograd.grad(loss, enc + dec, allow_unused=True)
    return g[:len(enc)], g[len(enc):]


def test_vae_svi_gradients():
    """Encoder: gradient of its own bound only; decoder: gradient of the bound at lambda_K held constant."""
    model = make(VAEPlusSVI, steps=3, k=2)
    x = data()
    loss = lib_loss(model, x, 4)
    g_enc, g_dec = _split_grads(model, loss)
    torch.manual_seed(4)  # the library's noise stream: the encoder's bound, the K steps, the refined bound
    q0 = model.encoder(x)
    own = -model._refined_bound(x, 2, q0).sum()
    qK = model.refine(x, DiagGaussian(q0.mu.detach(), q0.logvar.detach()))
    refined = -model._refined_bound(x, 2, DiagGaussian(qK.mu.detach(), qK.logvar.detach())).sum()
    # the value is the refined bound
    torch.testing.assert_close(loss, refined, atol=1e-10, rtol=0)
    e_ref = torch.autograd.grad(own, list(model.encoder.parameters()))
    d_ref = torch.autograd.grad(refined, list(model.decoder.parameters()))
    for a, b in zip(g_enc, e_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    for a, b in zip(g_dec, d_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_vae_svi_kl_and_svi_gradients():
    model = make(VAEPlusSVIKL, steps=3)
    x = data()
    loss = lib_loss(model, x, 4)
    g_enc, _ = _split_grads(model, loss)
    torch.manual_seed(4)
    q0 = model.encoder(x)
    qK = model.refine(x, q0)
    # KL(q0 || qK) by its definition E_q0[log q0 - log qK], here in closed form per dimension
    s0, sK = q0.logvar.exp(), qK.logvar.exp()
    kl = 0.5 * (torch.log(sK / s0) + (s0 + (q0.mu - qK.mu) ** 2) / sK - 1).sum()
    for a, b in zip(g_enc, torch.autograd.grad(kl, list(model.encoder.parameters()))):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)

    svi = make(SVI, steps=3)
    assert not hasattr(svi, "encoder")
    _, g_dec = _split_grads(svi, lib_loss(svi, x, 4))
    assert all(g.abs().max() > 0 for g in g_dec)


@pytest.mark.parametrize("cls", [SVI, VAEPlusSVI, VAEPlusSVIKL, SAVAE])
def test_refined_bound_beats_encoder_bound(cls):
    model = make(cls, steps=10, k=1)  # the library's default step settings
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.mul_(4.0)  # a sharp likelihood: the posterior is far from both the prior and the encoder's q
    x = data(n=40)
    out = model.evaluate_batch(Batch(x, 0), 2000)
    assert out["neg_elbo_refined"].mean() < out["neg_elbo_encoder"].mean() - 1.0
    # each against an independent many-sample -ELBO (ref_elbo, written out above) of its q: the encoder's, and the
    # refined one (the same K steps, from the evaluation's per-batch seeded noise), 4 standard errors apart at most
    with torch.no_grad():
        q_refined = model.infer_for_eval(x, generator=model.eval_generator(Batch(x, 0), "test")).q
        n = 5000
        eps = torch.randn(1, n * len(x), Z, generator=torch.Generator().manual_seed(3), dtype=F64)
        for key, q in (("neg_elbo_encoder", model.infer(x)), ("neg_elbo_refined", q_refined)):
            lam = torch.cat([q.mu, q.logvar], 1).repeat(n, 1)
            neg_log_w = ref_elbo(model, x.repeat(n, 1), lam, eps).reshape(n, len(x))  # -log w, one draw each
            tol = 4 * neg_log_w.std(0) * (1 / 2000 + 1 / n) ** 0.5 + 1e-3
            assert ((out[key] - neg_log_w.mean(0)).abs() <= tol).all(), (key, out[key] - neg_log_w.mean(0), tol)
    assert (out["refine_seconds"] > 0).all()


def test_bad_settings():
    with pytest.raises(AmortlabError, match="momentum"):
        RefinementConfig(momentum=1.5)
    with pytest.raises(AmortlabError, match="hvp"):
        RefinementConfig(hvp="numeric")
    from amortlab.nets import FlowEncoder
    with pytest.raises(AmortlabError, match="posterior=gaussian"):
        SAVAE(decoder=BernoulliDecoder(X, Z, (4,)), encoder=FlowEncoder(X, Z, hidden=(4,)))


def test_cli_weight_norm_sa_vae_iwae8_one_command(tmp_path):
    run = tmp_path / "run"
    train("logger=none", "trainer.max_epochs=2", "importance_samples=k8", "importance_samples.test=100",
          "inference=sa_vae", "inference.refinement.steps=3", "encoder_regularizer=weight_norm",
          "trainer.limit_train_batches=4", run_dir=run)
    r = results(run)
    m = r["metrics"]
    assert r["status"] == "ok" and r["config"]["inference"]["_target_"].endswith("SAVAE")
    assert abs(m["test/neg_elbo_refined"] - m["test/neg_elbo_encoder"]) < 5.0  # 3 small steps (gains: see above)
    assert m["test/refine_seconds"] > 0 and m["test/infer_seconds"] >= m["test/refine_seconds"]
    bad = train("logger=none", "inference=sa_vae", "posterior=flow", run_dir=tmp_path / "bad", check=False)
    assert bad.returncode == 1 and "posterior=gaussian" in bad.stderr and "Traceback" not in bad.stderr

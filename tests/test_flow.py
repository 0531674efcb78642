"""Auxiliary coupling flow posterior: change of variables, the bound on a linear-Gaussian model, the per-point
families for q*, and the posterior=flow config."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from amortlab.distributions import AuxFlowPosterior, DiagGaussian, LocalFlow, LocalGaussian
from amortlab.methods import AmortizedVAE
from amortlab.nets import BernoulliDecoder, CouplingFlow, FlowEncoder, GaussianReverse, LinearGaussianDecoder
from amortlab.objectives import LOG_2PI, k_sample_bound
from tests.conftest import ROOT

X_DIM, Z_DIM = 6, 3
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _std_normal(e):
    return -0.5 * (e.pow(2) + LOG_2PI).sum(-1)


# --- (a) the log-density by explicit change of variables ---------------------------------------------------------
def _check_change_of_variables(q: AuxFlowPosterior, b: int):
    """For point b of q: log|det| of the full map (z0, v0) -> (zT, vT) by autograd, and log q~ from it."""
    Z, V = q.z_dim, q.v_dim
    eps = q.sample_noise(1).to(F64)
    z, log_q, aux = q.transform(eps, return_aux=True)
    z0 = (q.mu_z + torch.exp(0.5 * q.logvar_z) * eps[..., :Z])[0, b].detach()
    v0 = (q.mu_v + torch.exp(0.5 * q.logvar_v) * eps[..., Z:])[0, b].detach()

    def full_map(u):  # u = (z0, v0) of point b; the other points' rows are held at their sampled values
        zz = (q.mu_z + torch.exp(0.5 * q.logvar_z) * eps[..., :Z]).detach().clone()
        vv = (q.mu_v + torch.exp(0.5 * q.logvar_v) * eps[..., Z:]).detach().clone()
        zz[0, b], vv[0, b] = u[:Z], u[Z:]
        zt, vt, _ = q.flow(zz, vv)
        return torch.cat([zt[0, b], vt[0, b]])

    J = torch.autograd.functional.jacobian(full_map, torch.cat([z0, v0]))
    assert J.shape == (Z + V, Z + V)
    _, logabsdet = torch.linalg.slogdet(J)
    torch.testing.assert_close(aux["logdet"][0, b], logabsdet, atol=1e-10, rtol=0)
    assert abs(logabsdet.item()) > 0.1  # a non-trivial flow
    # log q(zT, vT) by change of variables, then log q~ = log q(zT, vT) - log r(vT | zT)
    sd = torch.exp(0.5 * torch.cat([q.logvar_z[b], q.logvar_v[b]]))
    mean = torch.cat([q.mu_z[b], q.mu_v[b]])
    log_q0 = (-0.5 * (((torch.cat([z0, v0]) - mean) / sd) ** 2 + LOG_2PI) - torch.log(sd)).sum()
    log_q_joint = log_q0 - logabsdet
    r_mean, r_logvar = q.reverse(z.detach())
    vT = full_map(torch.cat([z0, v0]))[Z:]
    log_r = (-0.5 * ((vT - r_mean[0, b]) ** 2 * torch.exp(-r_logvar[0, b]) + r_logvar[0, b] + LOG_2PI)).sum()
    torch.testing.assert_close(log_q[0, b], log_q_joint - log_r, atol=1e-10, rtol=0)


def test_shared_flow_log_det_matches_autograd_jacobian():
    torch.manual_seed(1)
    flow = CouplingFlow(2, 2, hidden=5, steps=2, init_scale=1.0).double()
    rev = GaussianReverse(2, 2, hidden=5, init_scale=1.0).double()
    B = 3
    q = AuxFlowPosterior(torch.randn(B, 2, dtype=F64), torch.randn(B, 2, dtype=F64) * 0.3,
                         torch.randn(B, 2, dtype=F64), torch.randn(B, 2, dtype=F64) * 0.3, flow, rev)
    for b in range(B):
        _check_change_of_variables(q, b)


def test_local_flow_log_det_matches_autograd_jacobian():
    torch.manual_seed(2)
    lf = LocalFlow(3, 2, v_dim=2, hidden=4, steps=2, init_scale=1.0,
                   init_mu=torch.randn(3, 2, dtype=F64), init_logvar=0.3 * torch.randn(3, 2, dtype=F64))
    for b in range(3):
        _check_change_of_variables(lf(), b)


def test_flow_shapes_and_interface():
    enc = FlowEncoder(10, 4, hidden=(8,), v_dim=3, flow_hidden=6, flow_steps=3)
    q = enc(torch.rand(5, 10))
    assert q.family == "flow" and enc.z_dim == 4 and not hasattr(q, "logvar")
    z, log_q = q.rsample_with_log_prob(7)
    assert z.shape == (7, 5, 4) and log_q.shape == (7, 5)
    assert q.rsample(2).shape == (2, 5, 4) and q.mu.shape == (5, 4) and q.sample_noise(2).shape == (2, 5, 7)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(q.rsample_with_log_prob(4, g1), q.rsample_with_log_prob(4, g2))


# --- (b) the bound on a linear-Gaussian model --------------------------------------------------------------------
def linear_decoder(seed: int = 0, diagonal_posterior: bool = False) -> LinearGaussianDecoder:
    torch.manual_seed(seed)
    dec = LinearGaussianDecoder(X_DIM, Z_DIM, 0.7).double()
    with torch.no_grad():
        if diagonal_posterior:
            Q, _ = torch.linalg.qr(torch.randn(X_DIM, Z_DIM, dtype=F64))
            dec.W.copy_(Q * torch.tensor([2.0, 1.0, 0.5], dtype=F64))
        dec.b.copy_(torch.randn(X_DIM, dtype=F64) * 0.3)
    for p in dec.parameters():
        p.requires_grad_(False)
    return dec


def data(dec: LinearGaussianDecoder, n: int) -> torch.Tensor:
    z = torch.randn(n, Z_DIM, dtype=F64)
    return dec.mean(z) + torch.exp(dec.log_s) * torch.randn(n, X_DIM, dtype=F64)


def test_flow_bound_is_below_log_px_and_iwae_rises_with_k():
    dec = linear_decoder()
    enc = FlowEncoder(X_DIM, Z_DIM, hidden=(16,), flow_hidden=8).double()
    with torch.no_grad():  # a non-trivial flow: every gate and shift depends on its input
        for m in (enc.flow, enc.reverse):
            for p in m.parameters():
                p.add_(0.3 * torch.randn_like(p))
    model = AmortizedVAE(enc, decoder=dec)
    x = data(dec, 6)
    exact = dec.exact_log_marginal(x)
    with torch.no_grad():
        lw = model.log_weights(x, model.infer(x), 20000)  # [n, B]
    means = {k: k_sample_bound(lw.view(k, -1, len(x)).transpose(0, 1).reshape(k, -1)).view(-1, len(x)).mean(0)
             for k in (1, 10, 100)}  # 20000 / k independent IWAE-k estimates per point, averaged
    assert ((exact - means[1]) > 0.1).all()  # the ELBO: clearly below log p(x)
    assert ((means[10] - means[1]) > 0).all() and ((means[100] - means[10]) > 0).all()
    assert (means[100] <= exact + 0.02).all()


def test_flow_importance_weights_are_unbiased():
    """E_q~[w] = p(x) only if log q~ is the right density: with a flow near the posterior, IWAE-20000 converges to
    log p(x) (a sign error in log|det| or a missing log r would shift it by ~1.5 nats here)."""
    dec = linear_decoder(diagonal_posterior=True)
    model = AmortizedVAE(FlowEncoder(X_DIM, Z_DIM, hidden=(4,)).double(), decoder=dec)
    x = data(dec, 6)
    exact = dec.exact_log_marginal(x)
    mean, cov = dec.exact_posterior(x)
    torch.manual_seed(0)
    f = LocalFlow(6, Z_DIM, hidden=8, init_mu=mean, init_logvar=torch.log(torch.diagonal(cov)).expand(6, -1) + 0.3,
                  init_scale=0.2)
    with torch.no_grad():
        f.reverse.net[-1].bias[:, Z_DIM:] += 0.3  # a reverse model a little wider than q(v_T | z_T)
        q = f()
        _, _, aux = q.transform(q.sample_noise(10), return_aux=True)
        assert (aux["logdet"].abs() > 1.0).all()
        lw = model.log_weights(x, q, 20000)
    assert ((exact - lw.mean(0)) > 0.1).all()  # the ELBO
    err = k_sample_bound(lw) - exact
    assert err.abs().max() < 0.05 and err.mean().abs() < 0.02, err


# --- (c) per-point families --------------------------------------------------------------------------------------
def _optimise(model, x, local, steps, lr, k=50):
    opt = torch.optim.Adam(local.parameters(), lr=lr)
    for _ in range(steps):
        loss = -model.log_weights(x, local(), k).mean(0).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return local


def _elbo(model, x, q, k=20000, seed=0):
    with torch.no_grad():
        return model.log_weights(x, q, k, torch.Generator().manual_seed(seed)).mean(0)


def test_local_shapes_and_initialisation():
    n, Z = 4, 3
    mu, logvar = torch.randn(n, Z, dtype=F64), 0.5 * torch.randn(n, Z, dtype=F64)
    g = LocalGaussian(n, Z, init_mu=mu, init_logvar=logvar)
    assert isinstance(g(), DiagGaussian) and g.mu.dtype == F64 and torch.equal(g().mu, mu)
    f = LocalFlow(n, Z, v_dim=2, hidden=5, init_mu=mu, init_logvar=logvar)
    assert all(p.shape[0] == n for p in f.parameters()) and all(p.dtype == F64 for p in f.parameters())
    q = f()
    z, log_q = q.rsample_with_log_prob(6)
    assert z.shape == (6, n, Z) and log_q.shape == (6, n) and q.mu.shape == (n, Z)
    # near identity: q~ is (nearly) the given Gaussian; exactly so with init_scale=0
    torch.testing.assert_close(q.mu, mu, atol=0.05, rtol=0)
    exact = LocalFlow(n, Z, v_dim=2, hidden=5, init_mu=mu, init_logvar=logvar, init_scale=0.0)()
    z, log_q = exact.rsample_with_log_prob(6)
    torch.testing.assert_close(log_q, DiagGaussian(mu, logvar).log_prob(z), atol=1e-10, rtol=0)
    torch.testing.assert_close(exact.mu, mu, atol=1e-12, rtol=0)
    prior = LocalFlow(n, Z, init_scale=0.0, dtype=F64)()
    assert LocalGaussian(n, Z, dtype=F64).mu.dtype == F64
    z, log_q = prior.rsample_with_log_prob(6)
    torch.testing.assert_close(log_q, _std_normal(z), atol=1e-10, rtol=0)


@pytest.mark.parametrize("family", ["gaussian", "flow"])
def test_per_point_gradients_are_independent(family):
    dec = linear_decoder()
    model = AmortizedVAE(FlowEncoder(X_DIM, Z_DIM, hidden=(4,)).double(), decoder=dec)
    n = 4
    x = data(dec, n)
    local = LocalGaussian(n, Z_DIM).double() if family == "gaussian" else LocalFlow(n, Z_DIM, hidden=5).double()
    i = 2
    bound_i = model.log_weights(x, local(), 8)[:, i].mean()
    params = list(local.parameters())
    grads = torch.autograd.grad(bound_i, params)
    for p, g in zip(params, grads):
        assert p.shape[0] == n
        others = torch.cat([g[:i].flatten(), g[i + 1:].flatten()])
        assert torch.count_nonzero(others) == 0
    assert any(g[i].abs().sum() > 0 for g in grads)


def test_local_gaussian_reaches_log_px_and_local_flow_at_least_as_good():
    torch.manual_seed(0)
    # diagonal posterior: the Gaussian family contains p(z | x), so the optimised ELBO approaches log p(x)
    dec = linear_decoder(diagonal_posterior=True)
    model = AmortizedVAE(FlowEncoder(X_DIM, Z_DIM, hidden=(4,)).double(), decoder=dec)
    n = 8
    x = data(dec, n)
    exact = dec.exact_log_marginal(x)
    g = _optimise(model, x, LocalGaussian(n, Z_DIM).double(), 400, 0.05)
    gap = exact - _elbo(model, x, g())
    assert gap.max() < 0.05 and gap.min() > -0.02, gap

    # correlated posterior: q*_FFG leaves an approximation gap; the flow started at q*_FFG does at least as well
    dec = linear_decoder(seed=1)
    model = AmortizedVAE(FlowEncoder(X_DIM, Z_DIM, hidden=(4,)).double(), decoder=dec)
    x = data(dec, n)
    exact = dec.exact_log_marginal(x)
    g = _optimise(model, x, LocalGaussian(n, Z_DIM).double(), 400, 0.05)
    L_ffg = _elbo(model, x, g())
    f = LocalFlow(n, Z_DIM, hidden=10, init_mu=g.mu.detach(), init_logvar=g.logvar.detach())
    L_init = _elbo(model, x, f())
    torch.testing.assert_close(L_init, L_ffg, atol=0.03, rtol=0)  # starts at the Gaussian
    _optimise(model, x, f, 300, 0.01)
    L_flow = _elbo(model, x, f())
    assert (L_flow >= L_ffg - 0.01).all(), (L_flow - L_ffg)
    # and closes part of the approximation gap (here ~85% of its 0.36 nats)
    assert ((L_flow - L_ffg) > 0.5 * (exact - L_ffg)).all(), (L_flow - L_ffg, exact - L_ffg)
    assert (L_flow <= exact + 0.01).all()


def test_flow_inverse_and_path_derivative():
    """inverse(forward(z, v)) = (z, v) with the same log|det|; the path-derivative sample has the same value as the
    plain one, and its gradient w.r.t. q's base and flow parameters is the plain gradient minus the score term
    d/dphi log q~_phi(z, v) at fixed (z, v) (computed independently by autograd with the sample detached)."""
    torch.manual_seed(3)
    f = CouplingFlow(Z_DIM, 2, hidden=5, steps=3, init_scale=0.5, dtype=F64)
    z0, v0 = torch.randn(4, 6, Z_DIM, dtype=F64), torch.randn(4, 6, 2, dtype=F64)
    z, v, logdet = f(z0, v0)
    zb, vb, logdet_b = f.inverse(z, v)
    torch.testing.assert_close((zb, vb, logdet_b), (z0, v0, logdet), atol=1e-10, rtol=0)

    dec = linear_decoder(seed=1)
    model = AmortizedVAE(FlowEncoder(X_DIM, Z_DIM, hidden=(4,)).double(), decoder=dec)
    n, k = 3, 5
    x = data(dec, n)
    local = LocalFlow(n, Z_DIM, hidden=5, init_scale=0.3, dtype=F64)
    with torch.no_grad():
        for p in local.parameters():
            p.add_(0.1 * torch.randn_like(p))
    q = local()
    z_pd, log_q_pd = q.rsample_path_derivative(k, torch.Generator().manual_seed(7))
    z_pl, log_q_pl = q.rsample_with_log_prob(k, torch.Generator().manual_seed(7))
    torch.testing.assert_close((z_pd, log_q_pd), (z_pl, log_q_pl), atol=1e-10, rtol=0)
    own = [local.mu_z, local.logvar_z, local.mu_v, local.logvar_v, *local.flow.parameters()]
    g_pd = torch.autograd.grad((model.log_joint(x, z_pd) - log_q_pd).sum(), own)
    g_pl = torch.autograd.grad((model.log_joint(x, z_pl) - log_q_pl).sum(), own)
    # score term: d/dphi log q~_phi at the sample held fixed = d/dphi [log q0(inv(z, v)) - logdet] with z, v detached
    eps = q.sample_noise(k, torch.Generator().manual_seed(7))
    zT, _, aux = q.transform(eps, return_aux=True)
    zT, vT = zT.detach(), aux["v"].detach()
    z0s, v0s, ld = local.flow.inverse(zT, vT)
    score = (DiagGaussian(local.mu_z, local.logvar_z).log_prob(z0s)
             + DiagGaussian(local.mu_v, local.logvar_v).log_prob(v0s) - ld).sum()
    g_score = torch.autograd.grad(score, own)
    for a, b, c in zip(g_pd, g_pl, g_score):
        torch.testing.assert_close(a, b + c, atol=1e-8, rtol=1e-6)
    assert any(c.abs().max() > 1e-3 for c in g_score)  # the dropped term is not trivially zero here


def test_local_flow_from_amortized_posterior():
    enc = FlowEncoder(X_DIM, Z_DIM, hidden=(8,), flow_hidden=6).double()
    x = torch.randn(5, X_DIM, dtype=F64)
    q = enc(x)
    local = LocalFlow.from_posterior(q)
    assert all(p.shape[0] == 5 for p in local.parameters())
    eps = q.sample_noise(3)
    z, log_q = q.transform(eps)
    z2, log_q2 = local().transform(eps)
    torch.testing.assert_close(z2, z, atol=1e-12, rtol=0)
    torch.testing.assert_close(log_q2, log_q, atol=1e-12, rtol=0)


# --- (d) training and config -------------------------------------------------------------------------------------
def test_amortized_flow_vae_trains_on_binary_data():
    torch.manual_seed(0)
    X = 20
    x = (torch.rand(32, X) < 0.3).float()
    model = AmortizedVAE(FlowEncoder(X, 4, hidden=(16,), flow_hidden=8), BernoulliDecoder(X, 4, hidden=(16,)),
                         importance_samples={"train": 3})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model.training_loss(x)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < sum(losses[:5])
    assert model.reconstruct(x).shape == x.shape


@pytest.mark.parametrize("reg", ["none", "weight_norm"])
def test_posterior_flow_composes_and_builds(reg, tmp_path):
    from amortlab.build import build_module, compose_config
    cfg = compose_config(["posterior=flow", f"encoder_regularizer={reg}", "x_dim=64", "model.encoder.flow_hidden=16",
                          "encoder_size=large"], tmp_path)
    assert cfg.model.encoder._target_ == "amortlab.nets.FlowEncoder" and list(cfg.model.encoder.hidden) == [500, 500]
    m = build_module(cfg)
    assert isinstance(m.encoder, FlowEncoder) and m.encoder.net[0].out_features == 500
    x = (torch.rand(4, 64) < 0.5).float()
    assert torch.isfinite(m.training_loss(x))
    default = compose_config(["x_dim=64"], tmp_path)
    assert default.model.encoder._target_ == "amortlab.nets.GaussianEncoder"
    assert "flow_hidden" not in default.model.encoder and list(default.model.encoder.hidden) == [200, 200]


# --- (e) CLI smoke run -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_flow_one_epoch(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), "posterior=flow", "logger=none", "trainer.max_epochs=1",
           "importance_samples.test=20", f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["status"] == "ok" and math.isfinite(r["metrics"]["test/nll"])
    # the reported numbers against IWAE-k / ELBO written out on the checkpoint's flow q (z, log q from its draws)
    from tests.test_cli import assert_matches_independent_evaluation
    assert_matches_independent_evaluation(
        tmp_path, draws=lambda module, x, k, g: module.infer(x).rsample_with_log_prob(k, g))

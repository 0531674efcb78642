"""Iterative amortized inference (inference=iterative) on the linear-Gaussian model's closed forms, and CLI runs."""
import math

import pytest
import torch

from amortlab.errors import AmortlabError
from amortlab.methods import IterativeVAE
from amortlab.grad import local_grad
from amortlab.methods.iterative import _q
from amortlab.nets import LinearGaussianEncoder
from tests.test_estimators import X_DIM, Z_DIM, data, elbo_of, linear_model

pytestmark = pytest.mark.usefixtures("one_thread")


def iterative_model(T: int = 5, init: str = "prior", encoding: str = "gradient", n_grad_samples: int = 1,
                    k_train: int = 1) -> tuple[IterativeVAE, torch.Tensor]:
    """IterativeVAE on the linear-Gaussian decoder (exact log p(x), diagonal exact posterior); returns (model, x)."""
    base = linear_model()
    x = data(base, 8).detach()
    torch.manual_seed(1)
    enc = None
    if init == "encoder":  # a slightly wrong encoder: the exact posterior's, shifted
        enc = LinearGaussianEncoder(X_DIM, Z_DIM).double()
        enc.set_exact(base.decoder)
        with torch.no_grad():
            enc.linear.bias.add_(0.3)
    m = IterativeVAE(base.decoder, x_dim=X_DIM, encoder=enc, iterations=T, encoding=encoding, init=init,
                     hidden=[32, 32], n_grad_samples=n_grad_samples, importance_samples={"train": k_train}).double()
    m.x_center.zero_()
    return m, x


@pytest.mark.parametrize("kwargs, fix", [({"iterations": 0}, "iterations"), ({"encoding": "hessian"}, "encoding"),
                                         ({"init": "data"}, "init"), ({"init": "encoder"}, "encoder")])
def test_bad_config_is_one_readable_error(kwargs, fix):
    dec = linear_model().decoder
    with pytest.raises(AmortlabError, match=fix):
        IterativeVAE(dec, x_dim=X_DIM, **kwargs)


def test_gradient_input_is_the_per_example_elbo_gradient():
    """log|g| and sign(g) against the closed-form reparameterised gradient of each example's ELBO (no 1/B)."""
    m, x = iterative_model(n_grad_samples=3)
    lam = torch.cat([0.3 * torch.randn(len(x), Z_DIM), -0.5 + 0.2 * torch.randn(len(x), Z_DIM)], -1).double()
    inputs = m._inputs(x, lam, torch.Generator().manual_seed(5))
    assert not inputs.requires_grad  # detached: first-order, nothing flows back into lambda
    X, Z = X_DIM, Z_DIM
    log_abs, sign = inputs[:, X:X + 2 * Z], inputs[:, X + 2 * Z:X + 4 * Z]
    got = sign * (log_abs.exp() - 1e-5)
    torch.testing.assert_close(inputs[:, :X], x)  # x_center = 0 here
    torch.testing.assert_close(inputs[:, X + 4 * Z:], lam)
    # z = mu + sigma eps (the same eps); d/dz [log p(x|z) + log p(z)] = W^T (x - Wz - b) / s^2 - z; log q adds +1/2
    eps = torch.randn((3, len(x), Z), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mu, logvar = lam.chunk(2, -1)
    sigma = torch.exp(0.5 * logvar)
    z = mu + sigma * eps
    d = m.decoder
    dz = (x - d.mean(z)) @ d.W / torch.exp(2 * d.log_s) - z  # [n, B, Z]
    want = torch.cat([dz.mean(0), (dz * eps * sigma / 2).mean(0) + 0.5], -1)
    torch.testing.assert_close(got, want.detach(), rtol=1e-8, atol=1e-9)


def test_gated_update_and_log_variance_clamp():
    """lambda_1 = g * lambda_0 + (1 - g) * delta with g = sigmoid(a), (a, delta) = f(inputs); log sigma^2 in
    [-15, 15]."""
    m, x = iterative_model(T=1, init="encoder")
    Z = Z_DIM
    a = torch.linspace(-2, 2, 2 * Z, dtype=torch.float64).expand(len(x), -1)
    delta = torch.cat([torch.full((len(x), Z), 0.7), torch.full((len(x), Z), 100.0)], -1).double()
    m.update_net.forward = lambda inputs: torch.cat([a, delta], -1)
    lam0, lam1 = m.iterates(x)
    g = torch.sigmoid(a)
    want = g * lam0 + (1 - g) * delta
    torch.testing.assert_close(lam1[:, :Z], want[:, :Z])
    torch.testing.assert_close(lam1[:, Z:], want[:, Z:].clamp(max=15.0))
    assert lam1[:, Z:].max() == 15.0


@pytest.mark.parametrize("encoding", ["gradient", "error"])
def test_iterates_do_not_backpropagate_through_earlier_iterates(encoding):
    m, x = iterative_model(T=3, init="encoder", encoding=encoding)
    lams = m.iterates(x)
    for t in range(1, 4):
        assert lams[t].requires_grad
        (g,) = torch.autograd.grad(lams[t].sum(), lams[t - 1], retain_graph=True, allow_unused=True)
        assert g is None  # lambda_t enters update t+1 only as a constant
    # ... and no update-network parameter reaches lambda_0 (the encoder's output)
    assert all(g is None for g in torch.autograd.grad(lams[0].sum(), list(m.update_net.parameters()),
                                                      allow_unused=True))


@pytest.mark.parametrize("init", ["prior", "encoder"])
def test_decoder_gets_final_iterate_gradient_and_phi_the_mean_over_iterates(init):
    m, x = iterative_model(T=3, init=init, k_train=4)
    m.entropy_weight = 0.7  # annealing applies to every term of the training objective
    theta = list(m.decoder.parameters())
    phi = [p for n, p in m.named_parameters() if not n.startswith("model.")]
    torch.manual_seed(3)
    surrogate = m.bound(x, 4)
    loss = -surrogate.mean()
    g_theta = torch.autograd.grad(loss, theta, retain_graph=True)
    g_phi = torch.autograd.grad(loss, phi)
    # direct computation with the same draws (the iterations' draws first, then one bound per iterate in order)
    torch.manual_seed(3)
    lams = m.iterates(x)
    steps = range(0 if init == "encoder" else 1, 4)
    bounds = {t: torch.logsumexp(m.log_weights(x, _q(lams[t]), 4, annealed=True), 0) - math.log(4) for t in steps}
    torch.testing.assert_close(surrogate, bounds[3], rtol=0, atol=1e-12)  # its value: L_k of the final iterate
    ref_theta = torch.autograd.grad(-bounds[3].mean(), theta, retain_graph=True)
    ref_phi = torch.autograd.grad(-torch.stack([bounds[t].mean() for t in steps]).mean(), phi)
    for a, b in zip(g_theta, ref_theta):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_phi, ref_phi):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert max(g.abs().max() for g in g_phi) > 0


@pytest.mark.parametrize("encoding", ["gradient", "error"])
def test_trained_update_network_raises_elbo_towards_log_px(encoding):
    """Decoder frozen, the update network trained on fresh data: the iterates' closed-form ELBO climbs from the
    prior's to within a small fraction of the exact log p(x) (the diagonal family holds the true posterior)."""
    m, _ = iterative_model(T=5, encoding=encoding)
    m.decoder.requires_grad_(False)
    opt = torch.optim.Adam(m.update_net.parameters(), lr=3e-3)
    for _ in range(200):
        x = data(m, 64).detach()
        loss = -m.bound(x, 1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = data(m, 128).detach()
    exact = m.decoder.exact_log_marginal(x)
    with local_grad():
        lams = m.iterates(x, torch.Generator().manual_seed(0), track=False)
    gaps = [(exact - elbo_of(m, x, _q(lam.detach()))) for lam in lams]  # closed form: no Monte Carlo error
    assert all((g >= -1e-9).all() for g in gaps)  # ELBO <= log p(x)
    assert gaps[0].mean() > 3.0  # the prior is a poor q ...
    assert gaps[1].mean() < gaps[0].mean()  # ... the first update improves it ...
    assert gaps[-1].mean() < 0.05 * gaps[0].mean() and gaps[-1].mean() < 0.3  # ... and lambda_T nearly closes the gap


def test_evaluation_runs_under_inference_mode_and_reports_iterates():
    from amortlab.data.loader import Batch

    m, x = iterative_model(T=2, init="encoder")
    m.eval_elbo_samples = 20_000
    with torch.inference_mode():
        a = m.evaluate_batch(Batch(x.clone(), 0), k=1000)
        b = m.evaluate_batch(Batch(x.clone(), 0), k=1000)
    for t in range(3):
        assert a[f"neg_elbo_iter/{t}"].shape == (len(x),)
    with local_grad():  # the evaluation's iterates: the same per-batch seeded noise
        lams = m.iterates(x, m.eval_generator(Batch(x, 0), "test"), track=False)
    analytic = [-elbo_of(m, x, _q(lam.detach())).detach() for lam in lams]
    torch.testing.assert_close(a["neg_elbo_encoder"], analytic[0], atol=0.15, rtol=0)  # the encoder's q = lambda_0
    for t in range(3):  # Monte Carlo estimates (20000 samples) of the iterates' ELBOs
        torch.testing.assert_close(a[f"neg_elbo_iter/{t}"], analytic[t], atol=0.15, rtol=0)
    # neg_elbo_refined: the k = 1000-sample estimate of the final iterate's closed-form -ELBO (4 standard errors, the sd
    # of log w from fresh draws), which the encoder's q (lambda_0) misses by more than that
    with torch.no_grad():
        sd = m.log_weights(x, _q(lams[-1].detach()), 20_000, torch.Generator().manual_seed(9)).std(0)
    tol = 4 * sd / math.sqrt(1000) + 1e-3
    assert ((a["neg_elbo_refined"] - analytic[-1]).abs() <= tol).all(), (a["neg_elbo_refined"] - analytic[-1], tol)
    assert ((analytic[-1] - analytic[0]).abs() > tol).all()
    for key in a:  # the iterations' noise is seeded per batch: evaluation is reproducible
        if key != "infer_seconds":
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_denoising_regularizer_reads_noisy_x_but_scores_clean_x():
    from amortlab.regularizers import Denoising

    m, x = iterative_model(T=2)
    seen = []
    orig = m.iterates
    m.iterates = lambda xx, *a, **k: seen.append(xx) or orig(xx, *a, **k)
    m.regularizer = Denoising(sigma=0.3, alpha=1.0)
    loss = m.training_loss(x)
    assert torch.isfinite(loss) and len(seen) == 1 and not torch.equal(seen[0], x)


def test_weight_norm_wraps_update_network_and_encoder():
    from torch.nn.utils import parametrize

    from amortlab.regularizers import WeightNorm

    base = linear_model()
    enc = LinearGaussianEncoder(X_DIM, Z_DIM)
    m = IterativeVAE(base.decoder, x_dim=X_DIM, encoder=enc, init="encoder", hidden=[16], regularizer=WeightNorm(0.5))
    layers = [mod for net in (m.update_net, m.encoder) for mod in net.modules() if isinstance(mod, torch.nn.Linear)]
    assert len(layers) == 3 and all(parametrize.is_parametrized(layer, "weight") for layer in layers)
    assert all((layer.weight.norm(dim=1) <= 0.5 + 1e-6).all() for layer in layers)


# --- CLI (in-process: the same compose -> run as train.py, without the interpreter start) -----------------------------
def cli(run_dir, *overrides: str) -> dict:
    from amortlab.build import compose_config
    from amortlab.run import run

    cfg = compose_config(["logger=none", "trainer.max_epochs=2", "trainer.limit_train_batches=4",
                          "importance_samples.test=50", *overrides], run_dir)
    return run(cfg, run_dir)


def test_cli_digits_reports_per_iteration_elbo(tmp_path):
    r = cli(tmp_path / "train", "inference=iterative", "inference.iterations=3")
    assert r["status"] == "ok"
    m = r["metrics"]
    for split in ("val", "test"):
        for t in range(4):
            assert math.isfinite(m[f"{split}/neg_elbo_iter/{t}"])
    assert abs(m["test/neg_elbo_iter/3"] - m["test/neg_elbo"]) < 0.5  # the evaluated q is the final iterate
    assert r["axes"]["method"] == "iterative" and r["axes"]["T"] == 3
    assert "iterative3" in r["tags"] and "neg_elbo_encoder" not in " ".join(m)
    # evaluating the checkpoint again (fresh process state, buffers from the checkpoint) gives the same numbers
    again = cli(tmp_path / "eval", "train=false", f"ckpt_path={r['checkpoints']['evaluated']}")["metrics"]
    for key in ("test/nll", "test/neg_elbo", "test/neg_elbo_iter/0", "test/neg_elbo_iter/3"):
        assert again[key] == pytest.approx(m[key], abs=1e-9), key


def test_cli_composes_with_weight_norm_k5_and_encoder_init(tmp_path):
    r = cli(tmp_path, "inference=iterative", "inference.iterations=2", "inference.init=encoder",
            "inference.encoding=error", "encoder_regularizer=weight_norm", "importance_samples=k5")
    assert r["status"] == "ok"
    m = r["metrics"]
    assert {"test/neg_elbo_iter/2", "test/neg_elbo_encoder", "test/neg_elbo_refined"} <= set(m)
    assert r["axes"]["regularizer"] == "weight_norm" and r["axes"]["k"] == 5 and r["axes"]["init"] == "encoder"


def test_spectral_norm_composes_with_iterations():
    """The update net runs T times in one graph; the spectral-norm power iteration must not break backward."""
    from amortlab.build import build_from_overrides

    module, dm = build_from_overrides(["inference=iterative", "encoder_regularizer=spectral_norm", "logger=none"])
    module.train()
    x = dm.splits["train"][:16]
    loss = module.training_loss(x)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)

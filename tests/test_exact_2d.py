"""Estimators against an exact log p(x) of a NONLINEAR model: a Bernoulli-MLP VAE with a 2-D latent whose
posteriors are visibly non-Gaussian, integrated by quadrature on a fine grid (tests/exact2d.py); and the posterior
picture (amortlab.evaluation.posterior_plot) against closed forms."""
import math

import numpy as np
import pytest
import torch

from amortlab.distributions import DiagGaussian
from amortlab.evaluation import iwae_estimate
from amortlab.evaluation.ais import AISConfig, run_ais
from amortlab.evaluation.posterior_plot import density_on_grid, grid_log_density, plot_posteriors, posterior_grid
from amortlab.methods import AmortizedVAE
from amortlab.nets import LinearGaussianDecoder, LinearGaussianEncoder
from tests.exact2d import NON_GAUSSIAN_KL, Grid, non_gaussian_points, problem, quadrature

pytestmark = pytest.mark.usefixtures("one_thread")

K_BIG, K_SMALL = 5000, 50
R_BIG, R_SMALL = 32, 1000  # independent repeats of IWAE-5000 and IWAE-50


def se(runs: torch.Tensor) -> float:
    """Standard error of ``runs.mean()`` for independent runs ``[R, P]`` (R repeats of P points whose means may
    differ): sqrt(sum_p Var_p / R) / P, each point's variance from its own repeats."""
    R, P = runs.shape
    return math.sqrt(runs.var(0).sum().item() / R) / P


_iwae_cache = {}


def iwae_runs():
    """R_BIG runs of IWAE-5000 (with the ELBO from the same samples) and R_SMALL runs of IWAE-50, ``[R, P]``."""
    if not _iwae_cache:
        model, x, _ = problem()
        q = model.infer(x)
        g = torch.Generator().manual_seed(11)
        big = [iwae_estimate(lambda n: model.log_weights(x, q, n, g), K_BIG, 1000) for _ in range(R_BIG)]
        small = [iwae_estimate(lambda n: model.log_weights(x, q, n, g), K_SMALL, K_SMALL)[0] for _ in range(R_SMALL)]
        _iwae_cache.update(iwae_big=torch.stack([b[0] for b in big]), elbo=torch.stack([b[1] for b in big]),
                           iwae_small=torch.stack(small))
    return _iwae_cache


# --- the reference ------------------------------------------------------------------------------------------------
def test_quadrature_is_converged():
    model, x, grid = problem()
    assert grid.log_px.shape == (len(x),) and grid.log_px.dtype == torch.float64
    assert (grid.log_px < 0).all()  # binary x: p(x) <= 1
    coarse = quadrature(model.decoder, x, extent=6.0, n=300)  # h 0.04 instead of 0.03
    wide = quadrature(model.decoder, x, extent=8.0, n=534)  # [-8, 8]^2 at (about) the same h
    assert (coarse.log_px - grid.log_px).abs().max() < 1e-4
    assert (wide.log_px - grid.log_px).abs().max() < 1e-4
    # the window holds the posterior: on its border the density is below e^-12 of the peak (the prior's tail; the
    # likelihood saturates there), and the wider grid above shows the mass outside is below 1e-4
    border = torch.cat([grid.log_post[:, [0, -1], :].flatten(1), grid.log_post[:, :, [0, -1]].flatten(1)], 1)
    assert (border.amax(1) < grid.log_post.flatten(1).amax(1) - 12).all()


def test_gaussian_kl_measure_against_closed_forms():
    """The non-Gaussianity measure KL(p || N(moments)) on grids of known densities: 0 for a correlated Gaussian,
    (1/2) log(pi e) - 1 = 0.0724 nats for Laplace(b) x N(0, 1) (any b: Var = 2 b^2, H = 1 + log 2b) and
    (1/2) log(2 pi^3 e / 3) - 2 = 0.0144 nats for Logistic(s) x N(0, 1) (Var = pi^2 s^2 / 3, H = log s + 2)."""
    h = 12.0 / 400
    axis = -6.0 + h * (torch.arange(400, dtype=torch.float64) + 0.5)
    z = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1)
    gauss = torch.distributions.MultivariateNormal(torch.tensor([0.4, -0.7], dtype=torch.float64),
                                                   torch.tensor([[0.3, 0.2], [0.2, 0.5]], dtype=torch.float64))
    normal = -0.5 * (z[..., 1] ** 2 + math.log(2 * math.pi))
    b, s = 0.4, 0.3
    laplace = -z[..., 0].abs() / b - math.log(2 * b) + normal
    u = z[..., 0] / s
    logistic = -u - 2 * torch.nn.functional.softplus(-u) - math.log(s) + normal
    log_post = torch.stack([gauss.log_prob(z), laplace, logistic])
    kl = Grid(axis=axis, h=h, log_px=torch.zeros(3, dtype=torch.float64), log_post=log_post).gaussian_kl()
    assert abs(kl[0].item()) < 1e-6
    # the Laplace density's kink at 0 costs the midpoint rule ~4e-4 nats here
    assert kl[1].item() == pytest.approx(0.5 * math.log(math.pi * math.e) - 1, abs=1e-3)
    assert kl[2].item() == pytest.approx(0.5 * math.log(2 * math.pi**3 * math.e / 3) - 2, abs=1e-5)


def test_posteriors_are_visibly_non_gaussian():
    _, x, grid = problem()
    kl = grid.gaussian_kl()
    picked = non_gaussian_points(grid)
    torch.testing.assert_close(picked, torch.nonzero(kl > NON_GAUSSIAN_KL).flatten())
    assert len(picked) >= 3, kl  # enough rows for the posterior picture
    assert kl.max() > 0.2, kl  # and a clearly non-Gaussian one (4x the threshold)


# --- estimators against it ----------------------------------------------------------------------------------------
def test_iwae_5000_against_quadrature():
    _, _, grid = problem()
    err = iwae_runs()["iwae_big"] - grid.log_px  # [R, P]
    # a lower bound in expectation: not above log p(x) on average (its true gap here is below the noise)
    assert err.mean().item() <= 2 * se(err), (err.mean(), se(err))
    # and within 0.1 nats of it for every point (mean of the repeats), within 0.03 on average over the points
    assert err.mean(0).abs().max() < 0.1, err.mean(0)
    assert err.mean().abs() < 0.03, err.mean()


def test_bounds_monotone_in_k_and_below_log_px():
    _, _, grid = problem()
    runs = iwae_runs()
    elbo, small, big = runs["elbo"].mean(0), runs["iwae_small"].mean(0), runs["iwae_big"].mean(0)  # [P]
    log_px = grid.log_px
    # q is imperfect: every point has a visible ELBO gap (else every estimate would be exact by construction)
    assert (log_px - elbo).min() > 0.3, log_px - elbo
    assert (elbo < small).all()  # ELBO < IWAE-50 per point (the gaps differ by > 0.5 nat)
    diff = big - small  # IWAE-50 < IWAE-5000 on average, beyond Monte Carlo error
    diff_se = math.sqrt(se(runs["iwae_big"]) ** 2 + se(runs["iwae_small"]) ** 2)
    assert diff.mean() > 3 * diff_se, (diff, diff_se)
    # all below the quadrature value: ELBO per point, IWAE-50 on average (IWAE-5000: test above)
    assert (elbo < log_px).all()
    assert (small - log_px).mean() < -3 * se(runs["iwae_small"]), (small - log_px)
    assert (big - log_px).mean() <= 2 * se(runs["iwae_big"])


def _ais_errors(cfg: AISConfig, repeats: int, seed: int) -> tuple[torch.Tensor, float]:
    """AIS errors against the quadrature ``[R, P]``: R independent runs per point (x repeated R times, one batch)."""
    model, x, grid = problem()
    res = run_ais(model.decoder.log_prob, x.repeat(repeats, 1), 2, cfg, torch.Generator().manual_seed(seed))
    return res.log_px.view(repeats, len(x)) - grid.log_px, res.mean_accept_rate


def test_ais_textbook_against_quadrature():
    """Fixed step size (p_hat unbiased for p(x)): 16 runs per point of 16 chains, T = 200, 5 leapfrog steps.

    A run's log p_hat has sd ~0.13 nats here, so E[log p_hat] sits ~0.01 below log p(x) (Jensen), about one standard
    error of the mean over all runs: the checks below allow that; an error of a wrong normaliser or schedule (nats)
    or a 0.05-nat shift of the reference fails them."""
    R = 16
    cfg = AISConfig(n_intermediate=200, n_chains=16, n_leapfrog=5, init_step_size=0.25, adapt=False)
    err, accept = _ais_errors(cfg, R, seed=1)
    mean, se_pt = err.mean(0), err.std(0) / math.sqrt(R)
    assert 0.5 < accept < 0.99
    assert (mean.abs() <= 3.5 * se_pt).all(), (mean, se_pt)  # every point within ~3 standard errors
    assert mean.abs().max() < 0.2, mean
    assert err.mean().item() <= 0.02 + 2 * se(err), (err.mean(), se(err))  # not systematically above
    assert err.mean().abs().item() <= 3 * se(err), (err.mean(), se(err))


def test_ais_default_config_against_quadrature():
    """``AISConfig()`` as it stands (whatever step-size adaptation its defaults select), 4 runs per point."""
    R = 4
    err, _ = _ais_errors(AISConfig(), R, seed=2)
    assert err.mean().item() <= 0.02 + 2 * se(err), (err.mean(), se(err))  # not systematically above
    assert err.mean().abs().item() <= 3 * se(err), (err.mean(), se(err))
    assert err.mean(0).abs().max() < 0.2, err.mean(0)


def test_qstar_ordering_against_quadrature():
    """On the visibly non-Gaussian points, against the quadrature log p(x) (not an estimator):

        L[q*_FFG] <= L[q*_Flow] <= log p(x),

    and q*_Flow's approximation gap log p(x) - L[q*] is smaller than q*_FFG's (the flow holds part of the skew)."""
    from amortlab.evaluation.gaps import FlowFamilyConfig, GapsConfig, decompose
    from amortlab.evaluation.qstar import QStarConfig

    model, x, grid = problem()
    idx = non_gaussian_points(grid)
    x_ng, log_px = x[idx], grid.log_px[idx]
    cfg = GapsConfig(families=["ffg", "flow"], flow=FlowFamilyConfig(hidden=30),
                     qstar=QStarConfig(lr=0.01, k=50, max_steps=1500, patience=150, select_k=1000, init="encoder",
                                       final_lr_ratio=0.1))
    with torch.no_grad():
        q = model.infer(x_ng)
    out = decompose(model, x_ng, q, k=5000, rows=100_000, cfg=cfg, generator=torch.Generator().manual_seed(0))
    ffg, flow = log_px - out["gap/L_qstar_ffg"], log_px - out["gap/L_qstar_flow"]  # approximation gaps [P]
    assert (ffg > 0.03).all()  # the Gaussian family cannot hold these posteriors (KL to their moments > 0.05)
    assert (flow > -0.03).all()  # every bound is below the exact log p(x), up to its Monte Carlo error
    assert (out["gap/L_qstar_flow"] >= out["gap/L_qstar_ffg"] - 0.03).all()
    assert flow.mean() < 0.7 * ffg.mean()
    # without AIS the reference is an IWAE-5000 estimate: within 0.1 of the quadrature value, and not above it
    assert (out["gap/log_px"] - log_px).abs().max() < 0.1 and (out["gap/log_px"] - log_px).mean() < 0.01


# --- the posterior picture ----------------------------------------------------------------------------------------
def test_posterior_grid_matches_linear_gaussian_posterior():
    """p(z | x) of a linear-Gaussian VAE with a 2-D latent and a correlated posterior, in closed form."""
    torch.manual_seed(3)
    dec = LinearGaussianDecoder(5, 2, noise_std=0.8).double()
    with torch.no_grad():
        dec.W.copy_(torch.tensor([[1.0, 0.6], [0.8, 1.0], [0.0, 0.5], [0.7, -0.2], [0.3, 0.3]], dtype=torch.float64))
        dec.b.copy_(torch.tensor([0.2, -0.1, 0.0, 0.3, 0.1], dtype=torch.float64))
    model = AmortizedVAE(LinearGaussianEncoder(5, 2).double(), decoder=dec)
    x = torch.tensor([[1.5, 0.5, -0.5, 1.0, 0.0], [-1.0, 0.2, 0.8, -0.6, 0.4], [0.3, -1.2, 0.1, 0.9, -0.3]],
                     dtype=torch.float64)
    axis, log_post = posterior_grid(model.log_joint, x, extent=4.0, n=160, rows=999)  # several chunks
    assert axis.shape == (160,) and log_post.shape == (3, 160, 160)
    mean, cov = dec.exact_posterior(x)
    assert abs(cov[0, 1]) > 0.05 and (mean[:, 0] - mean[:, 1]).abs().min() > 0.1  # a transposed grid would fail
    z = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1)
    exact = torch.distributions.MultivariateNormal(mean[:, None, None], cov).log_prob(z[None])  # [3, n, n]
    region = exact > exact.flatten(1).amax(1)[:, None, None] - 20  # where the density is not negligible
    assert (log_post - exact)[region].abs().max() < 1e-6


def test_density_on_grid_of_gaussian_samples():
    """A smoothed histogram of 400k samples from two known correlated Gaussians: integrates to 1 and matches their
    closed-form density (total variation and pointwise, relative to the peak)."""
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([[0.5, -0.3], [-1.0, 0.8]], dtype=torch.float64)
    cov = torch.tensor([[[0.5, 0.2], [0.2, 0.3]], [[0.2, -0.1], [-0.1, 0.4]]], dtype=torch.float64)
    L = torch.linalg.cholesky(cov)
    S = 400_000
    samples = mu + torch.einsum("pab,spb->spa", L, torch.randn(S, 2, 2, generator=g, dtype=torch.float64))
    axis = torch.linspace(-4.0, 4.0, 121, dtype=torch.float64)
    h2 = (axis[1] - axis[0]).item() ** 2
    dens = density_on_grid(samples, axis)
    assert dens.shape == (2, 121, 121) and dens.dtype == torch.float64
    z = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1)
    exact = torch.distributions.MultivariateNormal(mu[:, None, None], cov[:, None, None]).log_prob(z[None]).exp()
    torch.testing.assert_close(dens.sum((1, 2)) * h2, torch.ones(2, dtype=torch.float64), atol=2e-3, rtol=0)
    tv = 0.5 * (dens - exact).abs().sum((1, 2)) * h2
    assert (tv < 0.03).all(), tv
    assert ((dens - exact).abs().amax((1, 2)) < 0.05 * exact.amax((1, 2))).all()
    raw = density_on_grid(samples, axis, bandwidth=0)  # the raw histogram: same mass, noisier
    torch.testing.assert_close(raw.sum((1, 2)) * h2, dens.sum((1, 2)) * h2, atol=2e-3, rtol=0)
    # samples outside the grid are dropped, not piled onto the border
    far = density_on_grid(samples + 10.0, axis)
    assert far.abs().max() == 0


def test_plot_posteriors_writes_png(tmp_path):
    """Three non-Gaussian points of the 2-D model, four columns: the true posterior, the amortized q and a
    moment-matched diagonal Gaussian (closed-form densities), and importance-resampled samples (a histogram)."""
    from PIL import Image

    model, x_all, ref = problem()
    idx = non_gaussian_points(ref)[:3]
    x = x_all[idx]
    axis, log_post = posterior_grid(model.log_joint, x, extent=4.0, n=200)
    # the library grid agrees with the reference quadrature (different grid, likelihood and normaliser code)
    ref_mean, _ = ref.moments()
    w = log_post.exp() * (axis[1] - axis[0]) ** 2
    z = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1)
    torch.testing.assert_close(torch.einsum("pij,ija->pa", w, z), ref_mean[idx], atol=1e-3, rtol=0)
    q = model.infer(x)
    mean, cov = ref.moments()
    fit = DiagGaussian(mean[idx], torch.log(torch.diagonal(cov[idx], dim1=1, dim2=2)))
    g = torch.Generator().manual_seed(0)
    zs, log_q = q.rsample_with_log_prob(200_000, g)  # sampling-importance-resampling from q (ESS > 2000)
    lw = model.log_joint(x, zs) - log_q
    pick = torch.multinomial(torch.softmax(lw, 0).T, 20_000, replacement=True, generator=g)  # [P, S]
    sir = torch.gather(zs, 0, pick.T[..., None].expand(-1, -1, 2))  # [S, P, 2]
    sir_dens = density_on_grid(sir, axis)
    tv = 0.5 * (sir_dens - log_post.exp()).abs().sum((1, 2)) * (axis[1] - axis[0]) ** 2
    assert (tv < 0.12).all(), tv  # the samples' picture is the grid posterior's (exact draws: ~0.04)
    panels = {"amortized q": grid_log_density(q.log_prob, axis, 3).exp(),
              "Gaussian fit": grid_log_density(fit.log_prob, axis, 3).exp(),
              "SIR samples": sir_dens}
    out = plot_posteriors(tmp_path / "sub" / "posteriors.png", axis, log_post, panels,
                          row_labels=[f"x{i}" for i in idx.tolist()], title="2-D posteriors", dpi=80)
    assert out == tmp_path / "sub" / "posteriors.png" and out.is_file()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        w_px, h_px = img.size
        pixels = np.asarray(img.convert("L"))
    assert w_px == pytest.approx(2.4 * 4 * 80, abs=2) and h_px == pytest.approx((2.4 * 3 + 0.4) * 80, abs=2)
    assert 10_000 < out.stat().st_size < 2_000_000
    assert (pixels < 200).mean() > 0.01  # contours and text were drawn, not a blank canvas
    with pytest.raises(ValueError, match="shape"):
        plot_posteriors(tmp_path / "bad.png", axis, log_post, {"wrong": sir_dens[:2]})

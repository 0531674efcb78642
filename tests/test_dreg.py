"""IW-SVI's doubly-reparameterised gradient (DReG, Tucker et al. 2019) against the true gradient of E[L_k].

The gradient under test is the one ``evaluation.iw_svi.refine`` really hands its optimiser (recorded at lambda_0 by
a recording Adam, one step), and the one of ``iw_svi.dreg_surrogate`` on log-weights formed as refine forms them.
The reference is computed independently: the many-sample average of the plain reparameterised IWAE-k gradient
(autograd of log (1/k) sum_i p(x, z_i) / q_lambda(z_i) with the full dependence of log q on lambda), with every density
of the linear-Gaussian model written out here with ``torch.distributions.Normal``.
"""
import math

import pytest
import torch

from amortlab.distributions import DiagGaussian
from amortlab.evaluation import iw_svi
from amortlab.evaluation.iw_svi import SVIConfig, refine
from tests.test_estimators import data, linear_model, perturbed_model

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
K = 5


def _repeat(q0: DiagGaussian, reps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, logvar) ``[reps * B, Z]``: row r * B + b is point b's lambda_0 (reps independent copies of the batch)."""
    return q0.mu.detach().repeat(reps, 1), q0.logvar.detach().repeat(reps, 1)


def refine_gradients(monkeypatch, m, x, q0, k: int, reps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of refine's loss w.r.t. (mu, logvar) at lambda_0, for ``reps`` independent k-draw sets per point:
    ``[reps, B, Z]`` each, as refine computes it (x repeated ``reps`` times; one step, no selection)."""
    recorded = []

    class RecordingAdam(torch.optim.Adam):
        def step(self, closure=None):
            recorded.append([p.grad.detach().clone() for group in self.param_groups for p in group["params"]])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    mu, logvar = _repeat(q0, reps)
    refine(m, x.repeat(reps, 1), DiagGaussian(mu, logvar), SVIConfig(steps=1, k=k, select_reps=0),
           torch.Generator().manual_seed(seed))
    monkeypatch.undo()
    assert len(recorded) == 1 and len(recorded[0]) == 2, "refine no longer takes one Adam step on [mu, logvar]"
    g_mu, g_logvar = recorded[0]
    return g_mu.reshape(reps, len(x), -1), g_logvar.reshape(reps, len(x), -1)


def surrogate_gradients(m, x, q0, k: int, reps: int, seed: int, power: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of ``iw_svi.dreg_surrogate`` on lw = log p(x, z) - log q_{stopgrad lambda}(z), z = mu + sigma eps
    (``power=1``: the same with unsquared weights, the STL-IWAE surrogate, written out: biased for k > 1)."""
    mu, logvar = (t.requires_grad_(True) for t in _repeat(q0, reps))
    eps = torch.randn(k, *mu.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    z = mu + torch.exp(0.5 * logvar) * eps
    lw = m.log_joint(x.repeat(reps, 1), z) - DiagGaussian(mu.detach(), logvar.detach()).log_prob(z)
    loss = iw_svi.dreg_surrogate(lw) if power == 2 else -(torch.softmax(lw.detach(), 0) * lw).sum()
    g_mu, g_logvar = torch.autograd.grad(loss, [mu, logvar])
    return g_mu.reshape(reps, len(x), -1), g_logvar.reshape(reps, len(x), -1)


def plain_iwae_gradients(m, x, q0, k: int, reps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent reference: per-draw-set gradient of -L_k = -log (1/k) sum_i p(x, z_i) / q_lambda(z_i) w.r.t.
    (mu, logvar), the full (path + score) dependence of log q on lambda, densities written out; ``[reps, B, Z]``."""
    mu, logvar = (t.requires_grad_(True) for t in _repeat(q0, reps))
    eps = torch.randn(k, *mu.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    sigma = torch.exp(0.5 * logvar)
    z = mu + sigma * eps
    d = m.decoder
    W, b, s = d.W.detach(), d.b.detach(), torch.exp(d.log_s.detach())
    Normal = torch.distributions.Normal
    lw = (Normal(z @ W.T + b, s).log_prob(x.repeat(reps, 1)).sum(-1) + Normal(0.0, 1.0).log_prob(z).sum(-1)
          - Normal(mu, sigma).log_prob(z).sum(-1))
    bound = torch.logsumexp(lw, 0) - math.log(k)
    g_mu, g_logvar = torch.autograd.grad(-bound.sum(), [mu, logvar])
    return g_mu.reshape(reps, len(x), -1), g_logvar.reshape(reps, len(x), -1)


def mean_and_se(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return g.mean(0), g.std(0) / math.sqrt(g.shape[0])


@pytest.mark.parametrize("source", ["refine", "dreg_surrogate"])
def test_dreg_gradient_is_unbiased_for_the_iwae_gradient(source, monkeypatch):
    """E[DReG gradient] = grad_lambda E[L_k] at k = 5 (away from the posterior: the perturbed encoder), each of the
    2 x B x Z coordinates within 4 standard errors of the difference (plus a 1e-3 floor) of the plain
    reparameterised IWAE-k gradient's many-sample mean; the same tolerance rejects the biased STL-IWAE gradient."""
    m = perturbed_model()
    x = data(m, 4).detach()
    q0 = m.infer(x)
    if source == "refine":
        dreg = refine_gradients(monkeypatch, m, x, q0, K, reps=20_000, seed=1)
    else:
        dreg = surrogate_gradients(m, x, q0, K, reps=20_000, seed=1)
    plain = plain_iwae_gradients(m, x, q0, K, reps=80_000, seed=2)
    stl = surrogate_gradients(m, x, q0, K, reps=20_000, seed=3, power=1)
    for name, g_dreg, g_ref, g_stl in zip(("mu", "logvar"), dreg, plain, stl):
        (mean_d, se_d), (mean_r, se_r) = mean_and_se(g_dreg), mean_and_se(g_ref)
        tol = 4 * (se_d**2 + se_r**2).sqrt() + 1e-3
        assert ((mean_d - mean_r).abs() <= tol).all(), (name, mean_d, mean_r, tol)
        assert (mean_r.abs() > 5 * tol).any(), name  # a gradient clearly away from zero: the comparison has content
        assert ((mean_and_se(g_stl)[0] - mean_r).abs() > tol).any(), name  # and it can tell STL-IWAE from DReG
    # DReG's point: far less variance than the plain estimator of q's gradient at the same k
    assert (dreg[0].std(0) < 0.6 * plain[0].std(0)).all()


@pytest.mark.parametrize("source", ["refine", "dreg_surrogate"])
def test_dreg_gradient_is_exactly_zero_at_the_true_posterior(source, monkeypatch):
    """q = p(z | x) (the exact encoder of the diagonal linear-Gaussian model): log p(x, z) - log q(z) is constant in
    z, so every draw's DReG gradient is zero (the plain IWAE gradient's per-draw score term is not)."""
    m = linear_model()
    x = data(m, 6).detach()
    q0 = m.infer(x)
    if source == "refine":
        g_mu, g_logvar = refine_gradients(monkeypatch, m, x, q0, K, reps=50, seed=4)
    else:
        g_mu, g_logvar = surrogate_gradients(m, x, q0, K, reps=50, seed=4)
    assert g_mu.abs().max() <= 1e-9 and g_logvar.abs().max() <= 1e-9
    p_mu, p_logvar = plain_iwae_gradients(m, x, q0, K, reps=50, seed=4)
    assert p_mu.abs().max() > 0.1 and p_logvar.abs().max() > 0.1  # zero is not what any estimator gives here

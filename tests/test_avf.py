"""Amortized variational filtering's training objective (Marino et al. 2018) and the cost of its evaluation.

The published objective: the generative model on the total free energy of the final filter, the update network on
each step's free energy F_t averaged over the S iterates, with h_t (the recurrent context) and z_{t-1} detached and
the model held constant. Which parameters each term reaches is checked with autograd on a tiny SRNN; the annealing
weights' effect on the step terms against KL and entropy values computed here from the iterates.
"""
from __future__ import annotations

import math

import pytest
import torch

from amortlab.errors import AmortlabError
from amortlab.methods import AVF
from amortlab.models import SRNN

X, Z, H, T, B = 5, 3, 8, 4, 6


def tiny_avf(**kw) -> AVF:
    torch.manual_seed(0)
    model = SRNN(step_dim=X, z_dim=Z, rnn_dim=H, hidden=[16], emission="bernoulli")
    return AVF(model=model, hidden=[16], **{"steps": 2, **kw})


def rows(seed: int = 0) -> torch.Tensor:
    """B sequences of T binary steps as data rows [B, T * (X + 1)] (every step present)."""
    x = torch.bernoulli(torch.full((B, T, X), 0.5), generator=torch.Generator().manual_seed(seed))
    return torch.cat([x, torch.ones(B, T, 1)], -1).reshape(B, -1)


def nonzero(grads) -> list[bool]:
    return [g is not None and bool(g.abs().sum() > 0) for g in grads]


def grads(out: torch.Tensor, params) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad(out.sum(), list(params), retain_graph=True, allow_unused=True))


def model_groups(m: AVF) -> dict[str, list[torch.nn.Parameter]]:
    return {"rnn (h_t)": list(m.model.rnn.parameters()), "prior": list(m.model.prior_net.parameters()),
            "decoder": list(m.model.emission_net.parameters())}


@pytest.mark.parametrize("encoding", ["gradient", "error"])
def test_published_objective_reaches_each_network_only_through_its_own_term(encoding):
    m = tiny_avf(encoding=encoding)
    assert m.objective == "published"  # the default
    m.train()
    q = m.infer(rows())
    total, steps = m.training_terms(q, 2)
    phi = list(m.update_net.parameters())
    # the inference term: the update network only; no gradient to the decoder, the prior or the GRU behind h_t ...
    assert all(nonzero(grads(steps, phi)))
    for name, params in model_groups(m).items():
        assert not any(nonzero(grads(steps, params))), name
    # ... and none through z_{t-1} or h_t (both detached: F_t does not reach earlier steps or the context)
    assert not any(nonzero(grads(steps, [q.trace.z, q.context])))
    # the generative term: every part of the model, nothing of the update network (q's draws held fixed)
    for name, params in model_groups(m).items():
        assert any(nonzero(grads(total, params))), name
    assert not any(nonzero(grads(total, phi)))
    # one backward pass: the surrogate's value is the bound, its gradient the sum of the two
    torch.manual_seed(3)
    b = m.bound(rows(), 2)
    torch.manual_seed(3)
    t2, s2 = m.training_terms(m.infer(rows()), 2)
    assert torch.equal(b, t2)
    for got, want in zip(grads(b, [*phi, *m.model.parameters()]), grads(t2 + s2, [*phi, *m.model.parameters()])):
        assert (got is None and want is None) or torch.allclose(got, want, atol=1e-6)


def test_published_bound_sends_no_gradient_through_the_filters_draws():
    """Through ``bound`` alone (the method's training objective): the gradient reaches neither the drawn trajectory
    z_1:T (the sequence bound would, through log p(z_{t+1} | z_t) and the emission) nor the context h_t from the
    update network's side, and the update network gets exactly the gradient of its per-step terms."""
    m = tiny_avf()
    m.train()
    seen = []
    infer = m.infer
    m.infer = lambda x: seen.append(infer(x)) or seen[-1]
    b = m.bound(rows(), 1)
    q = seen[0]
    dz = torch.autograd.grad(b.sum(), q.trace.z, retain_graph=True, allow_unused=True)[0]
    assert dz is None or bool(dz.abs().sum() == 0)
    steps = torch.stack([info[1] for info in q.trace.infos]).sum(0).mean(0) / m.S
    phi = list(m.update_net.parameters())
    for got, want in zip(grads(b, phi), grads(steps, phi)):
        assert torch.allclose(got, want, atol=1e-6)


def test_sequence_bound_objective_is_kept_as_an_option():
    m = tiny_avf(objective="sequence_bound")
    m.train()
    q = m.infer(rows())
    total, steps = m.training_terms(q, 1)
    phi = list(m.update_net.parameters())
    assert any(nonzero(grads(total, phi)))  # the sequence bound trains the update network too ...
    assert any(nonzero(grads(total, [q.trace.z])))  # ... through the draws (later steps' terms)
    assert len([i for i in q.trace.infos if i[1] is not None]) == T  # intermediate iterates (S = 2: one)
    assert "objective:sequence_bound" in m.tags() and m.axes()["objective"] == "sequence_bound"
    with pytest.raises(AmortlabError, match="inference.objective='paper'"):
        tiny_avf(objective="paper")


def gaussian_kl(mu, lv, mu_p, lv_p):
    """KL(N(mu, e^lv) || N(mu_p, e^lv_p)), diagonal, summed over the last dim (written out)."""
    return 0.5 * (lv_p - lv + (lv.exp() + (mu - mu_p) ** 2) / lv_p.exp() - 1).sum(-1)


def gaussian_entropy(lv):
    return 0.5 * (1 + math.log(2 * math.pi) + lv).sum(-1)


def test_annealing_weights_enter_the_step_terms():
    """KL annealing (a = b = beta) scales each step term's KL; entropy annealing (a = 1, b = lambda) adds
    (lambda - 1) H(q): with the error encoding (the iterates do not depend on the weights) and the same noise,
    F(a, b) - F(1, 1) = (1/S) sum_i sum_t [-(a - 1) KL(q^i_t || p_t) + (b - a) H(q^i_t)], all S iterates weighted
    1/S (the final one included), from KL and entropy computed here."""
    m = tiny_avf(encoding="error", steps=2)
    m.train()
    x = rows()

    def run(a, b):
        m.prior_weight, m.entropy_weight = a, b
        torch.manual_seed(5)
        q = m.infer(x)
        _, steps = m.training_terms(q, 3)
        return steps.detach(), q.trace

    base, tr = run(1.0, 1.0)
    kl = torch.zeros(B)
    ent = torch.zeros(B)
    for t, (lams, _) in enumerate(tr.infos):
        for lam in lams[1:]:
            mu, lv = lam.detach().chunk(2, -1)
            kl += gaussian_kl(mu, lv, tr.mu_p[:, :, t].detach(), tr.lv_p[:, :, t].detach()).mean(0) / m.S
            ent += gaussian_entropy(lv).mean(0) / m.S
    for a, b in [(0.3, 0.3), (1.0, 0.4), (0.5, 0.2)]:
        got, tr2 = run(a, b)
        assert torch.equal(tr2.mu_q, tr.mu_q)  # the same iterates
        assert torch.allclose(got - base, -(a - 1) * kl + (b - a) * ent, atol=1e-4), (a, b)


def test_gradient_encoding_reads_the_annealed_step_term_in_training_only():
    m = tiny_avf(encoding="gradient")
    x_t, c_t = torch.rand(B, X), torch.randn(B, H)
    lam, mu_p, lv_p = torch.randn(1, B, 2 * Z), torch.randn(1, B, Z), torch.randn(1, B, Z)

    def enc(a, train):
        m.prior_weight = m.entropy_weight = a
        m.train(train)
        with torch.no_grad():
            return m.encode(x_t, c_t, lam, mu_p, lv_p, torch.Generator().manual_seed(0))

    assert not torch.equal(enc(1.0, True), enc(0.2, True))
    assert torch.equal(enc(1.0, False), enc(0.2, False))  # evaluation: the bound itself


# --- evaluation: the proposal's numbers and the batched IWAE over sequences ------------------------------------------
def lgssm_avf(*overrides: str):
    from amortlab.build import build_from_overrides

    torch.manual_seed(0)
    module, dm = build_from_overrides(["dataset=lgssm", "model=lgssm", "dataset.steps=12", "dataset.n_train=100",
                                       "dataset.n_val=20", "dataset.n_test=20", "inference=avf", "inference.steps=2",
                                       "logger=none", *overrides])
    module.eval()
    return module, dm


def test_gradient_encoding_equals_the_closed_form_gradient_on_the_linear_gaussian_model():
    """The SMC / IWAE proposal's input: with x_t ~ N(C z, R) and z = mu + sigma eps (the same eps), the gradient of
    L_t = mean_n log N(x_t; C z_n, R) - KL(q || N(mu_p, sigma_p^2)) w.r.t. (mu, log sigma^2) in closed form; also
    under torch.inference_mode, as Lightning evaluates."""
    module, _ = lgssm_avf("inference.n_grad_samples=3")
    model = module.model
    Zd, Xd, k, b = 2, 4, 5, 7
    g = torch.Generator().manual_seed(1)
    x_t, lam = torch.randn(b, Xd, generator=g), torch.randn(k, b, 2 * Zd, generator=g)
    mu_p, lv_p = torch.randn(k, b, Zd, generator=g), torch.randn(k, b, Zd, generator=g)
    with torch.inference_mode():
        got = module.encode(x_t, x_t.new_zeros(b, 0), lam, mu_p, lv_p, torch.Generator().manual_seed(0))
    C, R = model.C.detach(), (2 * model.log_r.detach()).exp()
    eps = torch.randn((3, k, b, Zd), generator=torch.Generator().manual_seed(0))
    mu, lv = lam.chunk(2, -1)
    sd = (0.5 * lv).exp()
    z = mu + sd * eps
    dz = ((x_t - z @ C.T) / R) @ C  # d log N(x; C z, R) / dz
    g_mu = dz.mean(0) - (mu - mu_p) / lv_p.exp()
    g_lv = (dz * 0.5 * sd * eps).mean(0) - 0.5 * (lv.exp() / lv_p.exp() - 1)
    grad = torch.cat([g_mu, g_lv], -1)
    assert torch.allclose(got, torch.cat([torch.log(grad.abs() + 1e-5), torch.sign(grad), lam], -1), atol=1e-4)


def test_batched_iwae_over_sequences_equals_a_step_by_step_reference():
    """evaluate_batch draws IWAE-k in filtering passes of evaluation.rows // B trajectories (k x B rows per step, not
    k x B x T) and scores them in groups; the same draws scored here step by step, one trajectory set at a time."""
    from amortlab.data.loader import Batch

    module, dm = lgssm_avf()
    module.eval_rows = 40
    model = module.model
    x_rows, k = dm.splits["test"][:8], 12
    out = module.evaluate_batch(Batch(x_rows, 0), k, "test")

    gen = module.eval_generator(Batch(x_rows, 0), "test")
    lws = []
    with torch.no_grad():
        q = module.infer(x_rows)
        q.rsample_with_log_prob(1, gen)  # the timed filtering pass comes first
        per = 40 // 8
        for s in range(0, k, per):
            tr = module.scan(q.x, q.mask, q.context, min(per, k - s), gen)
            lw = torch.zeros(tr.z.shape[:2], dtype=torch.float64)
            for t in range(q.x.shape[1]):
                z_t, z_prev = tr.z[:, :, t], tr.z[:, :, t - 1] if t else torch.zeros_like(tr.z[:, :, 0])
                mu_p, lv_p = model.prior(z_prev, q.context[:, t], first=t == 0)
                log_p = -0.5 * (lv_p + (z_t - mu_p) ** 2 / lv_p.exp() + math.log(2 * math.pi)).sum(-1)
                log_q = -0.5 * (tr.lv_q[:, :, t] + (z_t - tr.mu_q[:, :, t]) ** 2 / tr.lv_q[:, :, t].exp()
                                + math.log(2 * math.pi)).sum(-1)
                lw += (model.log_emission(q.x[:, t], z_t, q.context[:, t]) + log_p - log_q).double()
            lws.append(lw)
    lw = torch.cat(lws)
    assert lw.shape == (k, 8)
    assert torch.allclose(out["nll_iwae"], -(torch.logsumexp(lw, 0) - math.log(k)), atol=1e-4)
    assert torch.allclose(out["neg_elbo"], -lw.mean(0), atol=1e-4)
    assert torch.equal(out["nll"], out["nll_iwae"])

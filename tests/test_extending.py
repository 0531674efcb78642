"""Extending amortlab without editing it: a new estimator and a new posterior family, defined here and selected from
config (a yaml in a config dir of this test on Hydra's search path, and ``_target_`` overrides), touch no file of the
package. What docs/extending.md promises, checked end to end through ``run.run``."""
import json
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import Tensor, nn

from amortlab.distributions import Capabilities
from amortlab.errors import AmortlabError
from amortlab.evaluation import chunk_size, iwae_estimate
from amortlab.evaluation.protocol import Estimate, EvalBatch, Estimator
from amortlab.nets.mlp import MLP
from amortlab.build import build_from_overrides, compose_config
from amortlab.run import run

TINY = ["logger=none", "trainer.max_epochs=2", "importance_samples.test=400", "trainer.limit_test_batches=2",
        "evaluation.val=false", "dataset.eval_batch_size=50"]


# --- a toy posterior family: a diagonal Laplace q(z | x) ----------------------------------------------------------
@dataclass
class DiagLaplace:
    """q(z | x) = prod_d Laplace(z_d; mu_d, b_d), b = exp(log_b): ``mu``, ``log_b`` ``[B, D]``."""

    mu: Tensor
    log_b: Tensor
    capabilities: ClassVar[Capabilities] = Capabilities(log_prob=True, closed_form_mean=True)

    def rsample_with_log_prob(self, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        u = torch.rand((k, *self.mu.shape), generator=generator, dtype=self.mu.dtype) - 0.5
        u = u.clamp(-0.5 + 1e-7, 0.5 - 1e-7)
        z = self.mu - self.log_b.exp() * u.sign() * torch.log1p(-2 * u.abs())
        return z, self.log_prob(z)

    def rsample(self, k: int = 1, generator: torch.Generator | None = None) -> Tensor:
        return self.rsample_with_log_prob(k, generator)[0]

    def log_prob(self, z: Tensor) -> Tensor:
        return (-(z - self.mu).abs() / self.log_b.exp() - self.log_b - math.log(2.0)).sum(-1)

    def mean(self) -> Tensor:
        return self.mu


class LaplaceEncoder(nn.Module):
    """x -> DiagLaplace(mu, b) with the same constructor keys as the model's Gaussian encoder."""

    family = DiagLaplace

    def __init__(self, x_dim: int, z_dim: int, hidden=(200, 200), activation: str = "tanh"):
        super().__init__()
        self.z_dim = z_dim
        self.net = MLP(x_dim, list(hidden), 2 * z_dim, activation)

    def forward(self, x: Tensor) -> DiagLaplace:
        mu, log_b = self.net(x).chunk(2, dim=-1)
        return DiagLaplace(mu, log_b - 1.0)


def test_laplace_q_log_prob_and_draws_against_torch():
    q = DiagLaplace(torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64) * 0.3)
    z, log_q = q.rsample_with_log_prob(20_000, torch.Generator().manual_seed(0))
    ref = torch.distributions.Laplace(q.mu, q.log_b.exp())
    torch.testing.assert_close(log_q, ref.log_prob(z).sum(-1))
    torch.testing.assert_close(z.mean(0), q.mu, atol=0.05, rtol=0)
    torch.testing.assert_close(z.var(0), ref.variance, atol=0.1, rtol=0.1)


# --- a toy estimator: IWAE-(k / thin) from fresh, separately seeded samples ---------------------------------------
class ThinnedIWAE(Estimator):
    """log p_hat(x) = IWAE from k // thin fresh samples of q (its own seed), and the difference to the IWAE-k."""

    name = "thinned_iwae"
    metric_names = ("toy/iwae_minus_thinned",)

    def __init__(self, thin: int, seed: int):
        self.thin, self.seed = int(thin), int(seed)

    def check(self, module) -> None:
        if module.k_test < self.thin:
            raise AmortlabError(f"thinned_iwae needs importance_samples.test >= thin={self.thin}.")

    def __call__(self, b: EvalBatch) -> Estimate:
        g = torch.Generator().manual_seed(self.seed)
        k = b.k // self.thin
        log_px, _ = iwae_estimate(lambda n: b.module.log_weights(b.x, b.q, n, g), k, chunk_size(k, len(b.x)))
        return Estimate(log_px, {"toy/iwae_minus_thinned": b.log_px_iwae - log_px})


@pytest.fixture
def toy_conf(tmp_path):
    conf = tmp_path / "conf"
    (conf / "evaluation").mkdir(parents=True)
    (conf / "evaluation" / "thinned.yaml").write_text(
        "estimator:\n  _target_: tests.test_extending.ThinnedIWAE\n  thin: 4\n  seed: 11\n")
    return f"hydra.searchpath=[file://{conf}]"


def test_toy_estimator_from_a_yaml_outside_the_package(toy_conf, tmp_path):
    out = tmp_path / "run"
    res = run(compose_config([*TINY, toy_conf, "evaluation=thinned"], out), out)
    m = res["metrics"]
    assert res["estimator"] == "thinned_iwae" and json.loads((out / "results.json").read_text())["metrics"] == m
    # nll is the toy's IWAE-100 from its own draws, nll_iwae the IWAE-400: both estimate log p(x) from below, the
    # 100-sample one by at most a few tenths of a nat more on this model, and never by a lot less
    assert m["test/n_points"] == 100
    assert m["test/nll"] != m["test/nll_iwae"]
    assert -0.05 < m["test/nll"] - m["test/nll_iwae"] < 0.5
    assert m["test/toy/iwae_minus_thinned"] == pytest.approx(m["test/nll"] - m["test/nll_iwae"], abs=1e-9)
    with pytest.raises(AmortlabError, match="thin=4"):
        build_from_overrides(["logger=none", toy_conf, "evaluation=thinned", "importance_samples.test=2"])


def test_toy_posterior_family_trains_evaluates_and_is_refused_by_schemes_that_need_lambda(tmp_path):
    enc = ["model.encoder._target_=tests.test_extending.LaplaceEncoder"]
    out = tmp_path / "run"
    res = run(compose_config([*TINY, *enc], out), out)
    m = res["metrics"]
    assert math.isfinite(m["test/nll"]) and m["test/inference_gap"] > 0
    module, _ = build_from_overrides(["logger=none", *enc])
    assert module.posterior_family is DiagLaplace
    for scheme in (["evaluation=iw_svi"], ["inference=sa_vae"], ["inference=iterative", "inference.init=encoder"],
                   ["inference=recursive_mixture"]):
        with pytest.raises(AmortlabError, match="DiagLaplace"):
            build_from_overrides(["logger=none", *enc, *scheme])

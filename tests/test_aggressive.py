"""inference=aggressive (He et al. 2019): the inner loop's stopping rule, what each phase updates, that after the phase
a step is exactly the amortized VAE's, the phase's end by the validation mutual information, and the CLI."""
import copy
import json
import math

import pytest
import torch

from amortlab.data.loader import Batch, TensorLoader
from amortlab.errors import AmortlabError
from amortlab.methods import AggressiveVAE, AmortizedVAE
from amortlab.methods.aggressive import InnerStop
from amortlab.nets import BernoulliDecoder, GaussianEncoder

X, Z = 12, 3
pytestmark = pytest.mark.usefixtures("one_thread")


def test_inner_stop_rule():
    # falling block means: runs to the cap
    rule = InnerStop(max_steps=25, check_every=5)
    assert [rule.step(100 - i) for i in range(25)] == [False] * 24 + [True]
    # the second block's mean (10) is not below the first's (10): stops at step 10
    rule = InnerStop(max_steps=100, check_every=5)
    stops = [rule.step(v) for v in [12, 8, 10, 11, 9] + [10] * 5]
    assert stops == [False] * 9 + [True]
    # first block 10, second 9, third 9.5 -> stops at 15
    rule = InnerStop(max_steps=100, check_every=5)
    seq = [10] * 5 + [9] * 5 + [9.5] * 5
    assert [i for i, v in enumerate(seq) if rule.step(v)] == [14]


def _modules(seed: int = 0):
    torch.manual_seed(seed)
    enc, dec = GaussianEncoder(X, Z, hidden=(8,)), BernoulliDecoder(X, Z, hidden=(8,))
    opt = {"optimizer": lambda params: torch.optim.Adam(params, lr=1e-2), "lr_scheduler": None, "interval": "step"}
    agg = AggressiveVAE(copy.deepcopy(enc), copy.deepcopy(dec), max_inner_steps=30, check_every=5, optim=opt)
    vae = AmortizedVAE(copy.deepcopy(enc), copy.deepcopy(dec), optim=opt)
    data = (torch.rand(200, X) < 0.4).float()
    agg.batch_source = TensorLoader(data, 20, shuffle=True, seed=3)
    return agg, vae, data


class _Trainer:  # what training_step reads of a trainer
    sanity_checking = False
    world_size = 1


def _step(module, x):
    """One outer step outside Lightning: training_step, backward, on_before_optimizer_step, optimizer step."""
    opt = module._test_opt
    opt.zero_grad(set_to_none=True)
    loss = module.training_step(Batch(x, 0), 0)
    loss.backward()
    module.on_before_optimizer_step(opt)
    opt.step()
    return loss


@pytest.fixture
def patched(monkeypatch):
    monkeypatch.setattr(AggressiveVAE, "log", lambda *a, **k: None)
    monkeypatch.setattr(AmortizedVAE, "log", lambda *a, **k: None)
    monkeypatch.setattr(AggressiveVAE, "global_step", property(lambda self: 0))
    monkeypatch.setattr(AmortizedVAE, "global_step", property(lambda self: 0))


def test_phase_updates_encoder_in_the_inner_loop_and_decoder_in_the_outer_step(patched):
    agg, _, data = _modules()
    agg._test_opt = torch.optim.Adam(agg.parameters(), lr=1e-2)
    x = data[:20]
    enc0 = [p.detach().clone() for p in agg.encoder.parameters()]
    dec0 = [p.detach().clone() for p in agg.model.parameters()]
    # the inner loop alone: the encoder moves, the decoder does not; it stops by its rule
    losses = agg.inner_loop(x)
    rule = InnerStop(30, 5)
    assert len(losses) == next(i + 1 for i, v in enumerate(losses) if rule.step(v))
    assert all(torch.equal(a, b) for a, b in zip(dec0, agg.model.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(enc0, agg.encoder.parameters()))
    assert all(p.grad is None for p in agg.parameters())
    # a whole step: after the inner loop the outer step moves the decoder only
    enc1 = [p.detach().clone() for p in agg.encoder.parameters()]
    inner = agg.inner_loop

    def spy(xx):
        out = inner(xx)
        spy.enc = [p.detach().clone() for p in agg.encoder.parameters()]
        return out
    agg.inner_loop = spy
    _step(agg, x)
    assert agg.inner_steps_last >= 5
    assert all(torch.equal(a, b) for a, b in zip(spy.enc, agg.encoder.parameters()))  # outer: encoder untouched
    assert any(not torch.equal(a, b) for a, b in zip(enc1, spy.enc))
    assert any(not torch.equal(a, b) for a, b in zip(dec0, agg.model.parameters()))


def test_after_the_phase_a_step_is_exactly_the_vae_step(patched):
    agg, vae, data = _modules()
    agg.aggressive = False
    agg._test_opt = torch.optim.Adam(agg.parameters(), lr=1e-2)
    vae._test_opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    for i in range(3):
        x = data[20 * i:20 * (i + 1)]
        torch.manual_seed(10 + i)
        la = _step(agg, x)
        torch.manual_seed(10 + i)
        lv = _step(vae, x)
        assert torch.equal(la, lv)
    for (na, a), (nv, v) in zip(agg.named_parameters(), vae.named_parameters()):
        assert na == nv and torch.equal(a, v), na


def test_phase_ends_when_validation_mutual_information_falls(patched, monkeypatch):
    agg, _, _ = _modules()
    monkeypatch.setattr(AggressiveVAE, "current_epoch", property(lambda self: 4))
    for mi in (0.5, 0.9, 1.2):
        agg.after_validation({"val_epoch/mutual_info": mi})
        assert agg.aggressive
    agg.after_validation({"val_epoch/mutual_info": 1.1})
    assert not agg.aggressive and agg.phase_end_epoch == 5
    agg.after_validation({"val_epoch/mutual_info": 3.0})
    assert not agg.aggressive  # never restarts


def test_refusals():
    enc, dec = GaussianEncoder(X, Z, hidden=(8,)), BernoulliDecoder(X, Z, hidden=(8,))
    with pytest.raises(AmortlabError, match="max_inner_steps"):
        AggressiveVAE(enc, dec, max_inner_steps=0)
    from amortlab.nets import FlowEncoder
    with pytest.raises(AmortlabError, match="max_epochs=N"):
        AggressiveVAE(FlowEncoder(X, Z, hidden=(4,)), dec)
    AggressiveVAE(FlowEncoder(X, Z, hidden=(4,)), dec, max_epochs=2)  # a fixed-length phase needs no density


@pytest.mark.slow
def test_cli_aggressive_run(tmp_path):
    from tests.test_cli import results, train
    proc = train("logger=csv", "inference=aggressive", "trainer.max_epochs=4", "inference.max_inner_steps=20",
                 "importance_samples.test=20", run_dir=tmp_path)
    r = results(tmp_path)
    m = r["metrics"]
    assert r["status"] == "ok" and math.isfinite(m["test/nll"]) and "test/mutual_info" in m
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["aggressive"]
    assert state["previous_mi"] is not None
    out = proc.stdout + proc.stderr
    assert ("aggressive phase ended" in out) == (not state["on"])
    metrics_csv = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "train/aggressive" in metrics_csv and "val_epoch/mutual_info" in metrics_csv
    json.dumps(state["previous_mi"])


def test_cli_aggressive_refuses_ddp_and_stacking(tmp_path):
    from tests.test_cli import train
    proc = train("logger=none", "inference=aggressive", "stack.seeds=[0,1]", "trainer.max_epochs=1",
                 run_dir=tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr

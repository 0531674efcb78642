"""inference=aggressive (He et al. 2019, the rules of their image code jxhe/vae-lagging-encoder image.py): the inner
loop against a reference loop written from their code, what each phase updates, that after the phase a step is the
clipped VAE step, the phase's end against a replay of their rule on an injected I_q sequence, the clipping, the inner
batches (without replacement), the inner learning rate under a scheduler, resuming, and the CLI."""
import copy
import json
import math

import pytest
import torch

from amortlab.build import compose_config, read_checkpoint
from amortlab.data.loader import Batch, TensorLoader
from amortlab.errors import AmortlabError
from amortlab.methods import AggressiveVAE, AmortizedVAE
from amortlab.methods import aggressive as aggressive_module
from amortlab.methods.aggressive import AggressiveConfig, InnerStop
from amortlab.nets import BernoulliDecoder, GaussianEncoder
from amortlab.run import run
from torch.optim.optimizer import register_optimizer_step_post_hook

X, Z = 12, 3
pytestmark = pytest.mark.usefixtures("one_thread")


def test_inner_stop_rule():
    # falling block means: runs to the cap
    rule = InnerStop(max_steps=25, check_every=5)
    assert [rule.step(100 - i) for i in range(25)] == [False] * 24 + [True]
    # the second block's mean (10.2) is above the first's (10): stops at step 10
    rule = InnerStop(max_steps=100, check_every=5)
    stops = [rule.step(v) for v in [12, 8, 10, 11, 9] + [10.2] * 5]
    assert stops == [False] * 9 + [True]
    # a block mean equal to the previous one does not stop the loop (He et al. stop when it is higher)
    rule = InnerStop(max_steps=100, check_every=5)
    assert not any(rule.step(v) for v in [10] * 10)
    # first block 10, second 9, third 9.5 -> stops at 15
    rule = InnerStop(max_steps=100, check_every=5)
    seq = [10] * 5 + [9] * 5 + [9.5] * 5
    assert [i for i, v in enumerate(seq) if rule.step(v)] == [14]


def test_defaults_are_he_et_al_image_experiment():
    """conf/inference/aggressive.yaml, AggressiveConfig and He et al.'s image.py (values read off their code): inner
    cap 100 (``sub_iter < 100``) with blocks of 10, the phase ends at the 5th epoch with I_q below its best
    (``mi_not_improved == 5``), I_q over their validation batches of 50, clip_grad_norm_ 5.0, batches drawn without
    replacement, one learning rate for both optimisers."""
    cfg = compose_config(["inference=aggressive", "logger=none"]).inference
    he = {"max_inner_steps": 100, "check_every": 10, "max_epochs": None, "mi_patience": 5, "mi_group": 50,
          "grad_clip": 5.0, "inner_batches": "without_replacement", "inner_follows_scheduler": True}
    assert {k: cfg[k] for k in he} == he
    assert {k: getattr(AggressiveConfig(), k) for k in he} == he


def _modules(seed: int = 0, **settings):
    torch.manual_seed(seed)
    enc, dec = GaussianEncoder(X, Z, hidden=(8,)), BernoulliDecoder(X, Z, hidden=(8,))
    opt = {"optimizer": lambda params: torch.optim.Adam(params, lr=1e-2), "lr_scheduler": None, "interval": "step"}
    settings = {"max_inner_steps": 30, "check_every": 5, **settings}
    agg = AggressiveVAE(copy.deepcopy(enc), copy.deepcopy(dec), optim=opt, **settings)
    vae = AmortizedVAE(copy.deepcopy(enc), copy.deepcopy(dec), optim=opt)
    data = (torch.rand(200, X) < 0.4).float()
    agg.batch_source = TensorLoader(data, 20, shuffle=True, seed=3)
    return agg, vae, data


def _step(module, x, clip: float | None = None):
    """One outer step outside Lightning: training_step, backward, on_before_optimizer_step, optimizer step
    (``clip``: He et al.'s clip_grad_norm_ over all parameters, for a module that does not clip itself)."""
    opt = module._test_opt
    opt.zero_grad(set_to_none=True)
    loss = module.training_step(Batch(x, 0), 0)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], clip)
    module.on_before_optimizer_step(opt)
    opt.step()
    return loss


@pytest.fixture
def patched(monkeypatch):
    monkeypatch.setattr(AggressiveVAE, "log", lambda *a, **k: None)
    monkeypatch.setattr(AmortizedVAE, "log", lambda *a, **k: None)
    monkeypatch.setattr(AggressiveVAE, "global_step", property(lambda self: 0))
    monkeypatch.setattr(AmortizedVAE, "global_step", property(lambda self: 0))


@pytest.mark.parametrize("clip", [1.0, None])
def test_inner_loop_equals_a_reference_written_from_he_et_al(patched, clip):
    """The inner loop against a loop written from He et al.'s image.py (not from the module): on batches X_1 (the
    step's), X_2, ... (a fixed list handed to both), each update is loss.backward(), clip_grad_norm_(every parameter,
    c; He et al. 5, here 1 so that it acts), the encoder's Adam step; after every 10th (here 5th) update the block's
    mean loss is compared with the previous block's and the loop breaks when it is higher; at most max_inner_steps
    updates. Same global noise seed for both; the number of updates, the losses and the encoder afterwards must
    agree, the decoder must not move."""
    agg, _, data = _modules(grad_clip=clip)
    ref = copy.deepcopy(agg)
    pool = [data[20 * i:20 * (i + 1)] for i in range(10)] * 4
    fed = iter(pool[1:])
    agg.fresh_batch = lambda like: next(fed)
    dec0 = [p.detach().clone() for p in agg.model.parameters()]

    torch.manual_seed(7)
    losses = agg.inner_loop(pool[0])

    torch.manual_seed(7)
    opt = torch.optim.Adam(ref.encoder.parameters(), lr=1e-2)
    ref_losses, norms, previous = [], [], float("inf")
    for j in range(1, 31):
        ref.zero_grad(set_to_none=True)
        loss = ref.training_loss(pool[j - 1])
        loss.backward()
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(list(ref.parameters()), clip)))
        opt.step()
        ref_losses.append(loss.item())
        if j % 5 == 0:
            block = sum(ref_losses[-5:]) / 5
            if block > previous:
                break
            previous = block
    assert len(losses) == len(ref_losses) and 10 <= len(losses) < 30  # the block rule stopped it, not the cap
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for a, b in zip(agg.encoder.parameters(), ref.encoder.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(dec0, agg.model.parameters()))
    assert all(p.grad is None for p in agg.parameters())
    if clip is not None:
        assert max(norms) > clip  # the clip acted (so the comparison covers it)


def test_phase_updates_encoder_in_the_inner_loop_and_decoder_in_the_outer_step(patched):
    agg, _, data = _modules()
    agg._test_opt = torch.optim.Adam(agg.parameters(), lr=1e-2)
    x = data[:20]
    enc1 = [p.detach().clone() for p in agg.encoder.parameters()]
    dec0 = [p.detach().clone() for p in agg.model.parameters()]
    inner = agg.inner_loop

    def spy(xx):
        out = inner(xx)
        spy.enc = [p.detach().clone() for p in agg.encoder.parameters()]
        spy.dec = [p.detach().clone() for p in agg.model.parameters()]
        return out
    agg.inner_loop = spy
    _step(agg, x)
    assert agg.inner_steps_last >= 10
    assert all(torch.equal(a, b) for a, b in zip(dec0, spy.dec))  # inner: decoder untouched
    assert any(not torch.equal(a, b) for a, b in zip(enc1, spy.enc))
    assert all(torch.equal(a, b) for a, b in zip(spy.enc, agg.encoder.parameters()))  # outer: encoder untouched
    assert any(not torch.equal(a, b) for a, b in zip(dec0, agg.model.parameters()))


def test_after_the_phase_a_step_is_the_clipped_vae_step(patched):
    """After the phase: the amortized VAE's step with He et al.'s clip_grad_norm_(all parameters, 5) before it."""
    agg, vae, data = _modules()
    agg.aggressive = False
    agg._test_opt = torch.optim.Adam(agg.parameters(), lr=1e-2)
    vae._test_opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    for i in range(3):
        x = data[20 * i:20 * (i + 1)]
        torch.manual_seed(10 + i)
        la = _step(agg, x)
        torch.manual_seed(10 + i)
        lv = _step(vae, x, clip=5.0)
        assert torch.equal(la, lv)
    for (na, a), (nv, v) in zip(agg.named_parameters(), vae.named_parameters()):
        assert na == nv and torch.allclose(a, v, atol=1e-7), na


def test_inner_batches_are_drawn_without_replacement(patched):
    """Rows encode their own index (12 bits), so the drawn batches show which points were used: each pass of
    floor(N / B) batches uses every point at most once; with_replacement repeats points within a pass."""
    n, b = 210, 20
    data = torch.tensor([[(i >> j) & 1 for j in range(X)] for i in range(n)], dtype=torch.float32)
    for mode in ("without_replacement", "with_replacement"):
        agg, _, _ = _modules(inner_batches=mode)
        agg.batch_source = TensorLoader(data, b, shuffle=True, seed=3)
        like = data[:b]
        ids = [sum(int(v) << j for j, v in enumerate(row)) for _ in range(5 * (n // b))
               for row in agg.fresh_batch(like)]
        passes = [ids[i:i + (n // b) * b] for i in range(0, len(ids), (n // b) * b)]
        unique = [len(set(p)) == len(p) for p in passes]
        assert all(unique) if mode == "without_replacement" else not any(unique)


def test_phase_end_follows_he_et_al_rule_on_an_injected_mutual_information(monkeypatch, tmp_path):
    """A real fit for 10 epochs whose per-epoch phase I_q is replaced by a known sequence; the epochs in which the
    inner loop ran (the inner optimiser's step count) must be exactly those before the end given by a replay of He
    et al.'s image.py rule on that sequence: best = 0; an epoch below best counts one (never reset), else it is the
    new best; the phase ends with the epoch whose count reaches 5. (The sequence falls first at epoch 2 and has a
    new best in between, so ending at the first fall, or counting only since the latest best, end elsewhere.)"""
    seq = [0.2, 0.5, 0.4, 0.45, 0.6, 0.55, 0.58, 0.3, 0.59, 0.7]
    best, count, end = 0.0, 0, None
    for epoch, mi in enumerate(seq):
        if mi - best < 0:
            count += 1
            if count == 5:
                end = epoch
                break
        else:
            best = mi
    assert end == 7

    at = {}
    start = AggressiveVAE.on_validation_epoch_start
    epoch_end = AggressiveVAE.on_train_epoch_end
    inner_steps = []

    def on_validation_epoch_start(self):
        at["epoch"] = self.current_epoch
        start(self)

    def on_train_epoch_end(self):  # records, then runs the method's own hook
        opt = self._inner_opt
        inner_steps.append(0 if opt is None else int(sum(s["step"] for s in opt.state.values())))
        epoch_end(self)

    monkeypatch.setattr(AggressiveVAE, "on_validation_epoch_start", on_validation_epoch_start)
    monkeypatch.setattr(AggressiveVAE, "on_train_epoch_end", on_train_epoch_end)
    monkeypatch.setattr(aggressive_module, "mutual_information",
                        lambda q, generator, group: torch.full(q.mu.shape[:1], seq[at["epoch"]]))
    d = tmp_path / "run"
    run(compose_config(["logger=none", "inference=aggressive", "trainer.max_epochs=10", "trainer.limit_train_batches=2",
                        "trainer.limit_val_batches=1", "inference.max_inner_steps=4", "inference.check_every=2",
                        "test=false"], d), d)
    per_epoch = [b - a for a, b in zip([0] + inner_steps, inner_steps)]
    assert [s > 0 for s in per_epoch] == [e <= end for e in range(10)], per_epoch
    state = read_checkpoint(d / "checkpoints" / "last.ckpt")["aggressive"]
    assert state["phase_end_epoch"] == end + 1 and state["mi_below_best"] == 5
    assert state["best_mi"] == pytest.approx(0.6)


class _Norms:
    """After every optimiser step (inner / outer): the norm of all the gradients the module holds, those the step
    used (the inner step's include the model's, computed for the clipping norm), and the learning rate."""

    def __init__(self, module):
        self.module, self.rows = module, []

    def __call__(self, opt, args, kwargs):
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        inner = opt is self.module._inner_opt
        self.rows.append((inner, self.module.current_epoch, float(torch.nn.utils.get_total_norm(grads)),
                          opt.param_groups[0]["lr"]))


def test_clipping_and_the_inner_learning_rate_in_a_fit(monkeypatch, tmp_path):
    """A fit with a learning rate halved every epoch (StepLR) and inference.grad_clip=1 (digits' gradients are mostly
    below He et al.'s 5): every optimiser step, inner and outer, used gradients of norm <= 1 (some clipped to 1),
    and every inner step's learning rate is 1e-3 / 2^epoch."""
    rec = {}
    fit_start = AggressiveVAE.on_fit_start

    def on_fit_start(self):
        fit_start(self)
        rec["norms"] = _Norms(self)
        rec["hook"] = register_optimizer_step_post_hook(rec["norms"])

    monkeypatch.setattr(AggressiveVAE, "on_fit_start", on_fit_start)
    d = tmp_path / "run"
    try:
        run(compose_config(["logger=none", "inference=aggressive", "trainer.max_epochs=3",
                            "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "test=false",
                            "inference.max_inner_steps=6", "inference.check_every=2", "inference.grad_clip=1.0",
                            "+optim.lr_scheduler={_target_: torch.optim.lr_scheduler.StepLR, _partial_: true, "
                            "step_size: 1, gamma: 0.5}"], d), d)
    finally:
        if "hook" in rec:
            rec["hook"].remove()
    rows = rec["norms"].rows
    inner = [r for r in rows if r[0]]
    outer = [r for r in rows if not r[0]]
    assert len(outer) == 9 and len(inner) >= 9 * 2
    assert max(r[2] for r in rows) <= 1.0 * (1 + 1e-5)
    # inner: the encoder's and model's gradients clipped together to 1; outer (in the phase): the decoder's part of a
    # norm clipped with the encoder's gradients included (He et al.), so below 1
    assert sum(abs(r[2] - 1.0) < 1e-5 for r in inner) >= 3 and sum(abs(r[2] - 1.0) < 1e-5 for r in outer) == 0
    assert [r[3] for r in inner] == [1e-3 * 0.5 ** r[1] for r in inner]
    assert {r[1] for r in inner} == {0, 1, 2}


def test_refusals():
    enc, dec = GaussianEncoder(X, Z, hidden=(8,)), BernoulliDecoder(X, Z, hidden=(8,))
    with pytest.raises(AmortlabError, match="max_inner_steps"):
        AggressiveVAE(enc, dec, max_inner_steps=0)
    with pytest.raises(AmortlabError, match="inner_batches"):
        AggressiveVAE(enc, dec, inner_batches="sometimes")
    with pytest.raises(AmortlabError, match="grad_clip"):
        AggressiveVAE(enc, dec, grad_clip=0)
    from amortlab.nets import FlowEncoder
    with pytest.raises(AmortlabError, match="max_epochs=N"):
        AggressiveVAE(FlowEncoder(X, Z, hidden=(4,)), dec)
    AggressiveVAE(FlowEncoder(X, Z, hidden=(4,)), dec, max_epochs=2)  # a fixed-length phase needs no density


@pytest.mark.slow
def test_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """2 epochs straight vs 1 epoch and then the resume command as the README prints it (ckpt_path, the run dir,
    more epochs; the run's settings come from the checkpoint), and again with inference=aggressive repeated: the
    weights, both optimisers, the phase's state and the final numbers are the same, bit for bit."""
    from tests.test_cli import results, train

    first = ["logger=none", "inference=aggressive", "importance_samples.test=20", "trainer.limit_train_batches=4"]
    train(*first, "trainer.max_epochs=2", run_dir=tmp_path / "straight")
    train(*first, "trainer.max_epochs=1", run_dir=tmp_path / "cut")
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    resumed = {"as_printed": [], "repeating_inference": ["inference=aggressive"]}
    for name, extra in resumed.items():
        d = tmp_path / name
        d.mkdir()
        (d / "last.ckpt").write_bytes(last.read_bytes())
        train("logger=none", *extra, f"ckpt_path={d / 'last.ckpt'}", "trainer.max_epochs=2", run_dir=d)
    a = read_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    for name in resumed:
        b = read_checkpoint(tmp_path / name / "checkpoints" / "last.ckpt")
        assert a["global_step"] == b["global_step"] == 8
        for k, v in a["state_dict"].items():
            assert torch.equal(v, b["state_dict"][k]), (name, k)
        for i, s in a["optimizer_states"][0]["state"].items():
            assert all(torch.equal(s[key], b["optimizer_states"][0]["state"][i][key]) for key in s), (name, i)
        sa, sb = a["aggressive"], b["aggressive"]
        assert {k: sa[k] for k in ("on", "previous_mi", "best_mi", "mi_below_best")} == \
            {k: sb[k] for k in ("on", "previous_mi", "best_mi", "mi_below_best")}
        for i, s in sa["inner_optimizer"]["state"].items():
            assert all(torch.equal(s[key], sb["inner_optimizer"]["state"][i][key]) for key in s), (name, i)
        assert torch.equal(sa["inner_batches"]["generator"], sb["inner_batches"]["generator"])
        assert results(tmp_path / name)["metrics"]["test/nll"] == results(tmp_path / "straight")["metrics"][
            "test/nll"]


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
    assert "train/aggressive" in metrics_csv and "val_epoch/aggressive_mutual_info" in metrics_csv
    json.dumps(state["previous_mi"])


def test_cli_aggressive_refuses_ddp_and_stacking(tmp_path):
    from tests.test_cli import train
    proc = train("logger=none", "inference=aggressive", "stack.seeds=[0,1]", "trainer.max_epochs=1",
                 run_dir=tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr

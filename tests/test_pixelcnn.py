"""Convolutional models and the gated PixelCNN decoder: causal masking by gradients (no blind spot), log p(x | z)
against a pixel-by-pixel computation and against normalisation over every image, ancestral sampling, the conv nets'
shapes and likelihood, the configs, refusals and the CLI (model=conv, model=pixelcnn)."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from amortlab.errors import AmortlabError
from amortlab.nets import ConvDecoder, ConvEncoder, PixelCNNDecoder
from amortlab.objectives import bernoulli_log_prob

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _pixelcnn(H: int, W: int, layers: int = 4, z_dim: int = 3, seed: int = 0) -> PixelCNNDecoder:
    torch.manual_seed(seed)
    dec = PixelCNNDecoder(H * W, z_dim, image_shape=(1, H, W), layers=layers, channels=5, out_channels=6).double()
    with torch.no_grad():  # generic weights: no accidental zeros
        for p in dec.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return dec


def _jacobian_support(dec, H: int, W: int, draws: int = 4) -> torch.Tensor:
    """Which pixels each logit depends on: |d logit_i / d x_j| > 0 at some of ``draws`` generic (x, z) ``[X, X]``
    (bool; several draws, since the output's ReLUs can switch a pixel's whole row off at one point)."""
    support = torch.zeros(H * W, H * W, dtype=torch.bool)
    for _ in range(draws):
        x = (torch.rand(1, H * W, dtype=F64) < 0.5).to(F64)
        z = torch.randn(1, 3, dtype=F64)
        J = torch.autograd.functional.jacobian(lambda u, z=z: dec.logits(u, z)[0], x)[:, 0]  # [X, X]
        support |= J.abs() > 1e-12
    return support


def test_pixelcnn_is_causal_without_blind_spot():
    """The full Jacobian on a small image whose every pixel lies in the receptive field (4 layers of 3x3 reach 4
    rows up and 4 columns either side): logit i depends on *every* pixel before i in raster order and on none at or
    after it, i.e. its support is exactly the strictly lower triangle. A PixelCNN of stacked masked convolutions
    misses the blind spot (row r - 1, columns c + 2, ... and the cone above it) and fails here."""
    H, W = 4, 5
    support = _jacobian_support(_pixelcnn(H, W, layers=4), H, W)
    before = torch.tril(torch.ones(H * W, H * W, dtype=torch.bool), diagonal=-1)  # j < i
    assert not (support & ~before).any()  # causal: nothing at or after i
    missing = [(divmod(i, W), divmod(j, W)) for i, j in (before & ~support).nonzero().tolist()]
    assert missing == []  # no blind spot: e.g. pixel (1, 0) sees (0, 2), (0, 3), (0, 4)
    for r, c in itertools.product(range(1, H), range(W - 2)):  # the blind-spot region, named
        assert support[r * W + c, (r - 1) * W + c + 2:r * W].all(), (r, c)
    dec = _pixelcnn(H, W, layers=4)
    x = (torch.rand(1, H * W, dtype=F64) < 0.5).to(F64)
    Jz = torch.autograd.functional.jacobian(lambda u: dec.logits(x, u)[0], torch.randn(1, 3, dtype=F64))[:, 0]
    assert (Jz.abs().sum(-1) > 1e-10).all()  # every pixel, the first too, depends on z


def test_pixelcnn_receptive_field_is_the_two_stack_cone():
    """With fewer layers than the image needs, logit (r, c) sees exactly: its row, columns c - L - 1 .. c - 1 (the
    horizontal stack: L layers of 1 x 2 plus the first layer's shift), and rows r - 1 - L .. r - 1, columns
    c - L .. c + L (the vertical stack: L layers of 2 x 3, shifted down one row) -- a rectangle above, without
    holes (Van den Oord et al. 2016, gated PixelCNN, kernel 3)."""
    H, W, L = 6, 7, 2
    support = _jacobian_support(_pixelcnn(H, W, layers=L), H, W)
    expected = torch.zeros(H * W, H * W, dtype=torch.bool)
    for r, c in itertools.product(range(H), range(W)):
        for r2, c2 in itertools.product(range(H), range(W)):
            row = r2 == r and c - L - 1 <= c2 <= c - 1
            above = r - 1 - L <= r2 <= r - 1 and abs(c2 - c) <= L
            expected[r * W + c, r2 * W + c2] = row or above
    assert torch.equal(support, expected)


def test_log_prob_equals_pixel_by_pixel_computation():
    """One pass = sum_i log Bernoulli(x_i; sigmoid(l_i)), l_i from the net run on an image holding only x_<i
    (pixels >= i replaced by noise): H*W separate passes."""
    H, W, k, B = 4, 5, 2, 3
    dec = _pixelcnn(H, W, layers=3)
    x = (torch.rand(B, H * W, dtype=F64) < 0.4).to(F64)
    z = torch.randn(k, B, 3, dtype=F64)
    fast = dec.log_prob(x, z)
    naive = torch.zeros(k, B, dtype=F64)
    for i in range(H * W):
        masked = x.clone()
        masked[:, i:] = torch.rand(B, H * W - i, dtype=F64)  # the future: anything
        for s in range(k):
            li = dec.logits(masked, z[s])[:, i]
            naive[s] += x[:, i] * F.logsigmoid(li) + (1 - x[:, i]) * F.logsigmoid(-li)
    torch.testing.assert_close(fast, naive, atol=1e-10, rtol=0)


def test_pixelcnn_is_normalised_and_samples_follow_it():
    """sum over all 2^X binary images of p(x | z) = 1 (a 3x3 image); ancestral samples' frequencies of the 512
    images match p(x | z) (chi-square-style bound)."""
    H = W = 3
    dec = _pixelcnn(H, W, layers=2)
    z = torch.randn(1, 1, 3, dtype=F64)
    images = torch.tensor(list(itertools.product([0.0, 1.0], repeat=H * W)), dtype=F64)  # [512, 9]
    with torch.no_grad():
        logp = dec.log_prob(images, z.expand(1, len(images), 3))[0]
    torch.testing.assert_close(torch.logsumexp(logp, 0), torch.zeros((), dtype=F64), atol=1e-10, rtol=0)
    n = 20000
    samples = dec.sample(z[0].expand(n, 3), torch.Generator().manual_seed(0))
    codes = (samples * (2 ** torch.arange(H * W - 1, -1, -1, dtype=F64))).sum(-1).long()
    freq = torch.bincount(codes, minlength=len(images)).to(F64) / n
    p = logp.exp()
    assert (freq - p).abs().max() < 4 * math.sqrt(0.25 / n) + 1e-3
    # the first pixel's marginal: its logit depends on z only
    p0 = torch.sigmoid(dec.logits(torch.zeros(1, 9, dtype=F64), z[0])[0, 0]).item()
    assert abs(samples[:, 0].mean().item() - p0) < 4 * math.sqrt(0.25 / n)


def test_conv_nets_shapes_and_likelihood():
    torch.manual_seed(0)
    enc, dec = ConvEncoder(64, 4, image_shape=(1, 8, 8)), ConvDecoder(64, 4, image_shape=(1, 8, 8))
    x = (torch.rand(5, 64) < 0.3).float()
    q = enc(x)
    assert q.mu.shape == (5, 4) and q.logvar.shape == (5, 4)
    z = q.rsample(3)
    logits = dec(z)
    assert logits.shape == (3, 5, 64)
    torch.testing.assert_close(dec.log_prob(x, z), bernoulli_log_prob(logits, x))
    dec.init_output_bias(torch.full((64,), 0.25))
    torch.testing.assert_close(dec.output_bias, torch.full((64,), math.log(0.25 / 0.75)))
    with pytest.raises(AmortlabError, match="multiples of 4"):
        ConvEncoder(36, 4, image_shape=(1, 6, 6))
    with pytest.raises(AmortlabError, match="not a square image"):
        ConvDecoder(50, 4)
    assert ConvEncoder(784, 4).image_shape == (1, 28, 28)


@pytest.mark.parametrize("overrides, needle", [
    (["model=conv", "posterior=flow"], "drop the posterior"),
    (["model=pixelcnn", "encoder_size=large"], "model.encoder.hidden=N"),
    (["model=pixelcnn", "model.decoder.kernel=4"], "odd kernel"),
])
def test_conv_refusals(overrides, needle, tmp_path):
    from amortlab.build import build_module, compose_config
    with pytest.raises(AmortlabError, match=needle):
        build_module(compose_config(["x_dim=784", *overrides], tmp_path))


@pytest.mark.parametrize("model", ["conv", "pixelcnn"])
def test_models_build_and_train_a_step(model, tmp_path):
    from amortlab.build import build_module, compose_config
    m = build_module(compose_config([f"model={model}", "x_dim=784", "image_shape=[1,28,28]",
                                     "importance_samples=k5"], tmp_path))
    x = (torch.rand(4, 784) < 0.3).float()
    loss = m.training_loss(x)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in m.parameters() if p.requires_grad)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["conv", "pixelcnn"])
def test_cli_conv_models(model, tmp_path):
    from tests.test_cli import results, train
    train(f"model={model}", "logger=none", "trainer.max_epochs=2", "importance_samples.test=20",
          "model.encoder.z_dim=4", run_dir=tmp_path)
    r = results(tmp_path)
    m = r["metrics"]
    assert r["status"] == "ok" and math.isfinite(m["test/nll"]) and m["test/nll"] <= m["test/neg_elbo"] + 1e-6
    assert {"test/kl", "test/mutual_info"} <= set(m)
    assert (tmp_path / "images" / "samples_final.png").exists()
    assert r["config"]["image_shape"] == [1, 8, 8]

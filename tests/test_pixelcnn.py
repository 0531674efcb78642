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


def test_pixelcnn_is_causal_without_blind_spot():
    """d logit_i / d x_j = 0 exactly for every j >= i (raster order); and each logit sees its left neighbour, the
    pixel above and the pixel above-right (the blind spot of stacked masked 3x3 convolutions) when they exist."""
    H, W = 5, 6
    dec = _pixelcnn(H, W)
    x = (torch.rand(1, H * W, dtype=F64) < 0.5).to(F64)
    z = torch.randn(1, 3, dtype=F64)
    J = torch.autograd.functional.jacobian(lambda u: dec.logits(u, z)[0], x)[:, 0]  # [X, X]
    for i in range(H * W):
        r, c = divmod(i, W)
        assert torch.count_nonzero(J[i, i:]) == 0, i
        if c > 0:
            assert J[i, i - 1].abs() > 1e-10, (i, "left")
        if r > 0:
            assert J[i, i - W].abs() > 1e-10, (i, "above")
            if c < W - 1:
                assert J[i, i - W + 1].abs() > 1e-10, (i, "above-right")
    Jz = torch.autograd.functional.jacobian(lambda u: dec.logits(x, u)[0], z)[:, 0]
    assert (Jz.abs().sum(-1) > 1e-10).all()  # every pixel, the first too, depends on z


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

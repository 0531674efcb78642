"""Image panels: samples from p(x | z), z ~ p(z), and reconstructions of fixed validation images.

Saved as PNG grids in ``<run dir>/images/`` every ``every_n_epochs`` epochs and at the end of training (an
autoregressive decoder's, drawn ancestrally, only at the end and fewer of them), and sent to
the logger when it can show images (W&B). Uses its own generator, so it never perturbs the training noise stream.
"""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor


def grid(images: Tensor, shape: tuple[int, int, int], ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """``[N, X]`` in [0, 1] -> uint8 ``[H', W']`` grid image (single channel)."""
    n = len(images)
    _, h, w = shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    out = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad), dtype=np.float32)
    imgs = images.detach().float().cpu().reshape(n, h, w).numpy()
    for i in range(n):
        r, c = divmod(i, ncol)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = imgs[i]
    return (out.clip(0, 1) * 255).astype(np.uint8)


def save_png(array: np.ndarray, path: Path, scale: int = 1) -> None:
    from PIL import Image

    img = Image.fromarray(array, mode="L")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


class ImagePanels(L.Callback):
    def __init__(self, out_dir: str, every_n_epochs: int = 10, n_samples: int = 64, n_recon: int = 32,
                 seed: int = 0, scale: int = 3):
        self.out_dir = Path(out_dir)
        self.every_n_epochs, self.n_samples, self.n_recon, self.seed, self.scale = (
            every_n_epochs, n_samples, n_recon, seed, scale)
        self.saved: list[Path] = []

    @staticmethod
    def autoregressive(pl_module) -> bool:
        """An autoregressive decoder (model=pixelcnn): each image costs H*W decoder passes."""
        return bool(getattr(getattr(pl_module.model, "decoder", None), "autoregressive", False))

    def _panels(self, trainer: L.Trainer, pl_module, tag: str) -> None:
        if not trainer.is_global_zero or getattr(pl_module.model, "sequential", False):  # sequences: no panels yet
            return
        dm = trainer.datamodule
        shape = tuple(dm.image_shape)
        gen = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        was_training = pl_module.training
        pl_module.eval()
        ar = self.autoregressive(pl_module)  # ancestral sampling: fewer panels (16 samples, 8 reconstructions)
        samples = pl_module.sample_images(min(self.n_samples, 16) if ar else self.n_samples, gen)
        x = dm.splits["val"][:min(self.n_recon, 8) if ar else self.n_recon].to(pl_module.device)
        recon = pl_module.reconstruct(x)
        pl_module.train(was_training)
        pair = torch.stack([x, recon], 1).reshape(-1, x.shape[-1])  # originals and reconstructions interleaved
        panels = {"samples": grid(samples, shape), "reconstructions": grid(pair, shape, ncol=8)}
        for name, arr in panels.items():
            path = self.out_dir / f"{name}_{tag}.png"
            save_png(arr, path, self.scale)
            self.saved.append(path)
            for logger in trainer.loggers:
                if hasattr(logger, "log_image"):
                    logger.log_image(key=f"images/{name}", images=[str(path)], step=trainer.global_step)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        if self.autoregressive(pl_module):  # panels of an autoregressive decoder only at the end (H*W passes each)
            return
        if self.every_n_epochs and epoch % self.every_n_epochs == 0 and epoch < (trainer.max_epochs or 0):
            self._panels(trainer, pl_module, f"epoch{epoch:05d}")

    def on_train_end(self, trainer, pl_module) -> None:
        self._panels(trainer, pl_module, "final")

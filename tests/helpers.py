"""Callbacks that tests inject through the CLI (``+callbacks.NAME._target_=tests.helpers.X``)."""
import os

import lightning as L
import torch


class KillAt(L.Callback):
    """Simulate a killed job: the process exits abruptly (no clean-up) before global step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os._exit(17)


class PoisonAt(L.Callback):
    """Make the decoder's output bias NaN before global step ``step`` so the loss becomes NaN there."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.decoder.output_layer.bias.fill_(float("nan"))


class SignalAt(L.Callback):
    """Send this process signal ``sig`` (2 = SIGINT, as Ctrl-C; 15 = SIGTERM) before global step ``step``."""

    def __init__(self, step: int, sig: int = 2):
        self.step, self.sig = step, sig

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.sig)


class SignalInSplit(L.Callback):
    """Send this process signal ``sig`` when the final evaluation of ``split`` starts (``amortlab.evaluation.final``
    runs each split through ``trainer.test`` / ``trainer.validate`` with these callbacks)."""

    def __init__(self, split: str = "test", sig: int = 15):
        self.split, self.sig = split, sig

    def on_test_start(self, trainer, pl_module):
        if getattr(pl_module, "split", None) == self.split:
            os.kill(os.getpid(), self.sig)


class Payload:
    """An object whose unpickling would run code (a malicious checkpoint); ``weights_only=True`` never builds it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))

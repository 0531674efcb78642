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


class DenyWritesUnder(L.Callback):
    """From global step ``step`` on, writing a file under ``dir`` raises ``PermissionError`` (EACCES), as an
    unwritable directory does for a user without root (tests run as root, where permission bits do not stop writes):
    ``open`` for writing and ``os.rename`` / ``os.replace`` onto a path there are refused."""

    def __init__(self, dir: str, step: int):
        self.dir, self.step, self.patched = os.path.abspath(dir), step, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step < self.step or self.patched:
            return
        import builtins
        import errno

        under = lambda p: isinstance(p, (str, os.PathLike)) and os.path.abspath(p).startswith(self.dir)  # noqa: E731

        def deny(p):
            raise PermissionError(errno.EACCES, "Permission denied", str(p))

        real_open, real_rename, real_replace = builtins.open, os.rename, os.replace
        builtins.open = lambda f, mode="r", *a, **k: deny(f) if under(f) and set(mode) & set("wax+") else \
            real_open(f, mode, *a, **k)
        os.rename = lambda a, b, *x, **k: deny(b) if under(b) else real_rename(a, b, *x, **k)
        os.replace = lambda a, b, *x, **k: deny(b) if under(b) else real_replace(a, b, *x, **k)
        self.patched = True

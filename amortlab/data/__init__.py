"""Datamodules: one per source format, all ``TensorDataModule`` subclasses (see ``base.py``)."""
from amortlab.data.base import TensorDataModule
from amortlab.data.binarized_mnist import BinarizedMNISTDataModule
from amortlab.data.caltech import CaltechSilhouettesDataModule
from amortlab.data.digits import DigitsDataModule
from amortlab.data.idx import FashionMNISTDataModule, MNISTDataModule
from amortlab.data.omniglot import OmniglotDataModule

__all__ = [
    "TensorDataModule",
    "DigitsDataModule",
    "BinarizedMNISTDataModule",
    "OmniglotDataModule",
    "CaltechSilhouettesDataModule",
    "MNISTDataModule",
    "FashionMNISTDataModule",
]

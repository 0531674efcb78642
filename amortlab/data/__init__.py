"""Datamodules: one per source format, all ``TensorDataModule`` subclasses (see ``base.py``)."""
from amortlab.data.base import TensorDataModule
from amortlab.data.binarized_mnist import BinarizedMNISTDataModule
from amortlab.data.caltech import CaltechSilhouettesDataModule
from amortlab.data.digits import DigitsDataModule
from amortlab.data.idx import FashionMNISTDataModule, MNISTDataModule
from amortlab.data.lgssm import LGSSMDataModule
from amortlab.data.moving_mnist import MovingMNISTDataModule
from amortlab.data.music import PolyphonicMusicDataModule
from amortlab.data.omniglot import OmniglotDataModule
from amortlab.data.sequence import SequenceDataModule, pack_sequences, unpack_steps

__all__ = [
    "TensorDataModule",
    "DigitsDataModule",
    "BinarizedMNISTDataModule",
    "OmniglotDataModule",
    "CaltechSilhouettesDataModule",
    "MNISTDataModule",
    "FashionMNISTDataModule",
    "SequenceDataModule",
    "pack_sequences",
    "unpack_steps",
    "MovingMNISTDataModule",
    "PolyphonicMusicDataModule",
    "LGSSMDataModule",
]

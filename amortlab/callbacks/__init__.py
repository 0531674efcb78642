"""Callbacks shared by every method: annealing (warm-up), the last checkpoint, image panels, throughput timing."""
from amortlab.callbacks.annealing import Annealing
from amortlab.callbacks.checkpoint import LastCheckpoint
from amortlab.callbacks.images import ImagePanels
from amortlab.callbacks.progress import EpochLog
from amortlab.callbacks.timing import Throughput

__all__ = ["Annealing", "EpochLog", "ImagePanels", "LastCheckpoint", "Throughput"]

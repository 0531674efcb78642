"""Encoder regularizers (the `encoder_regularizer` config group)."""
from amortlab.regularizers.adversarial import Adversarial
from amortlab.regularizers.base import EncoderRegularizer
from amortlab.regularizers.denoising import Denoising
from amortlab.regularizers.weight_norm import SpectralNorm, WeightNorm

__all__ = ["EncoderRegularizer", "Denoising", "WeightNorm", "SpectralNorm", "Adversarial"]

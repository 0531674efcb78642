"""Encoder regularizers (the `encoder_regularizer` config group)."""
from amortlab.regularizers.base import EncoderRegularizer

__all__ = ["EncoderRegularizer"]

"""Encoder and decoder networks."""
from amortlab.nets.linear import LinearGaussianDecoder, LinearGaussianEncoder
from amortlab.nets.mlp import MLP, BernoulliDecoder, GaussianEncoder

__all__ = ["MLP", "GaussianEncoder", "BernoulliDecoder", "LinearGaussianDecoder", "LinearGaussianEncoder"]

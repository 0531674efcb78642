"""Encoder and decoder networks."""
from amortlab.nets.flow import CouplingFlow, FlowEncoder, GaussianReverse
from amortlab.nets.layered import BottomUpEncoder
from amortlab.nets.linear import LinearGaussianDecoder, LinearGaussianEncoder
from amortlab.nets.mlp import MLP, BernoulliDecoder, GaussianEncoder

__all__ = ["MLP", "GaussianEncoder", "BernoulliDecoder", "LinearGaussianDecoder", "LinearGaussianEncoder",
           "FlowEncoder", "CouplingFlow", "GaussianReverse", "BottomUpEncoder"]

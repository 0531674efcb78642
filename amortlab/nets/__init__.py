"""Encoder and decoder networks."""
from amortlab.nets.conv import ConvDecoder, ConvEncoder
from amortlab.nets.flow import CouplingFlow, FlowEncoder, GaussianReverse
from amortlab.nets.iaf import IAFEncoder
from amortlab.nets.layered import BottomUpEncoder, LadderEncoder
from amortlab.nets.linear import LinearGaussianDecoder, LinearGaussianEncoder
from amortlab.nets.mlp import MLP, BernoulliDecoder, GaussianEncoder
from amortlab.nets.pixelcnn import PixelCNNDecoder

__all__ = ["MLP", "GaussianEncoder", "BernoulliDecoder", "LinearGaussianDecoder", "LinearGaussianEncoder",
           "FlowEncoder", "CouplingFlow", "GaussianReverse", "BottomUpEncoder", "LadderEncoder",
           "IAFEncoder", "ConvEncoder", "ConvDecoder", "PixelCNNDecoder"]

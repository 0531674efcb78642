"""Generative models p_theta(x, z): the protocol every method, estimator and regularizer talks to, and its
implementations (``FlatLatentModel``: one Gaussian latent layer and any decoder; ``HierarchicalModel``: L Gaussian
layers, top-down; ``SequenceModel``: one latent per time step, ``SRNN`` and the linear-Gaussian
``LinearGaussianSSM``)."""
from amortlab.models.base import GenerativeModel, Latent
from amortlab.models.flat import FlatLatentModel
from amortlab.models.hierarchical import HierarchicalModel
from amortlab.models.lgssm import LinearGaussianSSM
from amortlab.models.sequence import SequenceModel
from amortlab.models.srnn import SRNN

__all__ = ["GenerativeModel", "Latent", "FlatLatentModel", "HierarchicalModel", "SequenceModel", "SRNN",
           "LinearGaussianSSM"]

"""Generative models p_theta(x, z): the protocol every method, estimator and regularizer talks to, and its
implementations (``FlatLatentModel``: one Gaussian latent layer and any decoder; ``HierarchicalModel``: L Gaussian
layers, top-down)."""
from amortlab.models.base import GenerativeModel, Latent
from amortlab.models.flat import FlatLatentModel
from amortlab.models.hierarchical import HierarchicalModel

__all__ = ["GenerativeModel", "Latent", "FlatLatentModel", "HierarchicalModel"]

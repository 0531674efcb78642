"""Generative models p_theta(x, z): the protocol every method, estimator and regularizer talks to, and its
implementations (``FlatLatentModel``: one Gaussian latent layer and any decoder)."""
from amortlab.models.base import GenerativeModel, Latent
from amortlab.models.flat import FlatLatentModel

__all__ = ["GenerativeModel", "Latent", "FlatLatentModel"]

"""Variational families. Each has ``rsample(k) -> [k, B, D]`` and ``log_prob(z) -> [k, B]``."""
from amortlab.distributions.gaussian import DiagGaussian

__all__ = ["DiagGaussian"]

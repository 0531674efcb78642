"""Methods: every one is an ``ELBOModule`` subclass that says how q(z | x) is made."""
from amortlab.methods.amortized import AmortizedVAE
from amortlab.methods.base import ELBOModule

__all__ = ["ELBOModule", "AmortizedVAE"]

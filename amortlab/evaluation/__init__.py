"""log p(x) estimators."""
from amortlab.evaluation.estimators import chunk_size, iwae_estimate

__all__ = ["iwae_estimate", "chunk_size"]

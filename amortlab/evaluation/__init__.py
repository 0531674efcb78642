"""log p(x) estimators and the final evaluation.

Estimators (``protocol.Estimator``) are built by Hydra from ``conf/evaluation/<name>.yaml``; their settings
dataclasses are registered here as the schemas those yamls select (``schema/estimator/<name>``), so each default is
stated once, in the dataclass.
"""
from amortlab.evaluation.estimators import chunk_size, iwae_estimate
from amortlab.evaluation.gaps import GapsConfig
from amortlab.evaluation.iw_svi import SVIConfig
from amortlab.evaluation.iwae import IWAEConfig
from amortlab.evaluation.smc import SMCConfig
from amortlab.settings import register_schema

register_schema("estimator", "iwae", IWAEConfig)
register_schema("estimator", "iw_svi", SVIConfig)
register_schema("estimator", "gaps", GapsConfig)
register_schema("estimator", "smc", SMCConfig)

__all__ = ["iwae_estimate", "chunk_size"]

"""Importing this module registers every typed schema the config groups select in Hydra's ConfigStore: the top-level
``base_config`` (amortlab/config.py), the estimators' settings (``schema/estimator/*``, amortlab/evaluation) and the
SVI refinement's (``schema/refinement/default``, amortlab/refinement.py). train.py and ``build.compose_config`` import
it before composing."""
import amortlab.config  # noqa: F401
import amortlab.evaluation  # noqa: F401
import amortlab.refinement  # noqa: F401

"""Methods: every one is an ``ELBOModule`` subclass that says how q(z | x) is made."""
from amortlab.methods.amortized import AmortizedVAE
from amortlab.methods.base import ELBOModule
from amortlab.methods.semi_amortized import SAVAE, SVI, VAEPlusSVI, VAEPlusSVIKL

__all__ = ["ELBOModule", "AmortizedVAE", "SVI", "VAEPlusSVI", "VAEPlusSVIKL", "SAVAE"]
from amortlab.methods.aggressive import AggressiveVAE  # noqa: E402
from amortlab.methods.iterative import IterativeVAE  # noqa: E402
from amortlab.methods.ladder import LadderVAE  # noqa: E402
from amortlab.methods.recursive_mixture import RecursiveMixtureVAE  # noqa: E402

__all__ += ["AggressiveVAE", "IterativeVAE", "LadderVAE", "RecursiveMixtureVAE"]
from amortlab.methods.avf import AVF  # noqa: E402
from amortlab.methods.filtering import FilteringVAE, SequenceELBOModule  # noqa: E402

__all__ += ["SequenceELBOModule", "FilteringVAE", "AVF"]

"""Variational families. Each declares ``capabilities`` (``capabilities.Capabilities``) and has
``rsample_with_log_prob(k, generator) -> (z [k, B, D], log q [k, B])``, ``rsample``,
``sample_noise`` and ``mu`` (a point estimate for reconstructions); ``DiagGaussian`` also has ``log_prob(z)`` and the
closed-form KL; ``MixtureGaussian`` (RecMix) has ``log_prob`` and stratified draws. ``AuxFlowPosterior`` returns
log q~ of the auxiliary-variable bound in place of log q(z); ``IAFPosterior`` (inverse autoregressive flow) has
exact log q.
``posterior_mean(q)``: E_q[z] of any of them (``posterior_mean_estimate``: with the estimate's variance);
``as_factorised(q)``: the factorised Gaussian of a local_params q.
``LocalGaussian`` / ``LocalFlow``: per-datapoint parameter holders (leading ``n_points`` dim) for q* optimisation."""
from amortlab.distributions.capabilities import Capabilities, require
from amortlab.distributions.gaussian import DiagGaussian, as_factorised
from amortlab.distributions.flow import AuxFlowPosterior, LocalFlow, LocalGaussian
from amortlab.distributions.iaf import IAFPosterior, LocalIAF
from amortlab.distributions.mixture import MixtureGaussian
from amortlab.distributions.moments import posterior_mean, posterior_mean_estimate

__all__ = ["Capabilities", "require", "DiagGaussian", "as_factorised", "AuxFlowPosterior", "LocalFlow", "LocalGaussian",
           "MixtureGaussian", "IAFPosterior", "LocalIAF", "posterior_mean",
           "posterior_mean_estimate"]

"""sdekit: diffusion models and SDEs through the reparameterization (pathwise) view."""
from . import data, estimators, ito, losses, metrics, precond, sensitivity, solvers
from .data import GaussianMixture
from .likelihood import log_likelihood
from .samplers import SAMPLERS, sample
from .sde import EDM, SDE, VESDE, VPSDE, SubVPSDE, make_sde
from .solvers import simulate

__all__ = [
    "SDE", "VPSDE", "SubVPSDE", "VESDE", "EDM", "make_sde",
    "GaussianMixture", "data", "losses", "metrics", "precond",
    "sample", "SAMPLERS",
    "sensitivity", "solvers", "simulate",
    "log_likelihood",
    "ito", "estimators",
]
__version__ = "0.1.0"

"""sdekit: diffusion models and SDEs through the reparameterization (pathwise) view."""
from . import data, estimators, ito, losses, metrics, montecarlo, precond, sensitivity, solvers
from .data import GaussianMixture
from .likelihood import log_likelihood
from .samplers import SAMPLERS, sample
from .sde import EDM, SDE, VESDE, VPSDE, SubVPSDE, make_sde
from .solvers import simulate

__all__ = [
    "SDE", "VPSDE", "SubVPSDE", "VESDE", "EDM", "make_sde",
    "GaussianMixture", "data", "losses", "metrics", "precond",
    "sample", "SAMPLERS",
    "sensitivity", "solvers", "simulate", "montecarlo",
    "log_likelihood",
    "ito", "estimators",
]
__version__ = "0.1.0"

# Submodules the documentation uses as attributes (`sdekit.training.load_trained(...)`) load on first access, so
# that `import sdekit` stays light: accelerate, matplotlib, argparse and JAX load only with the feature that needs them.
_LAZY_SUBMODULES = ("training", "config", "checkpoint", "sampling", "likelihood", "samplers", "sde", "interop",
                    "images", "image_metrics", "classifier", "guidance", "rng", "checks")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))

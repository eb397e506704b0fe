"""Gradient estimators for expectations over distributions: d/dtheta E_{q_theta}[f(z)].

Pathwise (reparameterization) against score-function (REINFORCE, baselines, control variates)
across reparameterizable families, with closed-form oracles; plus the pieces a VAE reuses
(Gumbel-softmax, ELBO / IWAE bounds, safe scale parameterisations). `sdekit estimators` runs the
variance comparison (see `report`).

    families   q_theta with flat parameters: Gaussian (diag, full), Laplace, Logistic, Exponential,
               Gamma, Categorical, Concrete
    oracles    the objectives f and exact d/dtheta E_q[f]
    gradients  the estimators, per sample
    relaxed    Gumbel noise and gumbel_softmax (straight-through option)
    bounds     elbo, iwae, iwae_curve
    scale      softplus_scale, clamped_logvar_scale
    report     the `sdekit estimators` command
"""
from .bounds import elbo, iwae, iwae_curve
from .families import CONTINUOUS, FAMILIES, Family, make_family
from .gradients import ESTIMATORS, GradientEstimate, estimate_gradient, summarize
from .oracles import OBJECTIVES, Objective, exact_gradient, expectation, make_objective
from .relaxed import gumbel_noise, gumbel_softmax
from .report import main
from .scale import SCALES, clamped_logvar_scale, softplus_scale

__all__ = [
    "Family", "FAMILIES", "CONTINUOUS", "make_family",
    "Objective", "OBJECTIVES", "make_objective", "expectation", "exact_gradient",
    "ESTIMATORS", "GradientEstimate", "estimate_gradient", "summarize",
    "gumbel_noise", "gumbel_softmax", "elbo", "iwae", "iwae_curve",
    "softplus_scale", "clamped_logvar_scale", "SCALES", "main",
]

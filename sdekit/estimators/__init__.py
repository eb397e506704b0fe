"""Gradient estimators for expectations over distributions: d/dtheta E_{q_theta}[f(z)].

Pathwise (reparameterization) against score-function (REINFORCE, baselines, control variates)
across reparameterizable families, with closed-form oracles; plus the pieces a VAE reuses
(Gumbel-softmax, ELBO / IWAE bounds, safe scale parameterisations). `sdekit estimators`
(sdekit.commands.estimators) runs the variance comparison (see `report`).

    families   q_theta with flat parameters: Gaussian (diag, full), Laplace, Logistic, Exponential,
               Gamma, Categorical, Concrete, Bernoulli, RelaxedBernoulli
    oracles    the objectives f (smooth, and NONSMOOTH: floor, indicator, jump) and exact d/dtheta E_q[f]
    gradients  the estimators, per sample
    failures   where pathwise fails (non-differentiable f, discrete latents), the detector check_pathwise,
               and the failure-mode demonstration next to the unbiased alternatives
    relaxed    Gumbel noise and gumbel_softmax (straight-through option)
    bounds     elbo, iwae, iwae_curve
    scale      softplus_scale, clamped_logvar_scale
    report     variance sweep, counter-cases, z-score summary, failures, their tables (`sdekit estimators`)
"""
from .bounds import elbo, iwae, iwae_curve
from .failures import PathwiseCheck, check_pathwise, failure_modes
from .families import CONTINUOUS, DISCRETE, FAMILIES, Family, make_family
from .gradients import ESTIMATORS, GradientEstimate, estimate_gradient, summarize
from .oracles import NONSMOOTH, OBJECTIVES, Objective, exact_gradient, expectation, make_objective
from .relaxed import gumbel_noise, gumbel_softmax
from .report import counter_cases, dimension_slopes, frequency_sweep, sinusoid_variances, variance_sweep, z_summary
from .scale import SCALES, clamped_logvar_scale, softplus_scale

__all__ = [
    "Family", "FAMILIES", "CONTINUOUS", "DISCRETE", "make_family",
    "Objective", "OBJECTIVES", "NONSMOOTH", "make_objective", "expectation", "exact_gradient",
    "PathwiseCheck", "check_pathwise", "failure_modes",
    "variance_sweep", "counter_cases", "dimension_slopes", "z_summary", "sinusoid_variances", "frequency_sweep",
    "ESTIMATORS", "GradientEstimate", "estimate_gradient", "summarize",
    "gumbel_noise", "gumbel_softmax", "elbo", "iwae", "iwae_curve",
    "softplus_scale", "clamped_logvar_scale", "SCALES",
]

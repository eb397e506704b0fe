"""Monte Carlo estimators of d/dtheta E_{q_theta}[f(z)], returned sample by sample.

Each estimator returns per-sample estimates G: (n, P); their mean is the gradient estimate and
their variance is the per-sample variance the estimators are compared by. Per-sample gradients come
from giving every sample its own copy of theta (theta: (n, P)), so one backward pass suffices.

- pathwise:          grad_theta f(g_theta(eps))                     (needs a reparameterizable family)
- score:             f(z) grad_theta log q(z)                        (REINFORCE; any family)
- score_baseline:    (f(z) - b) grad log q(z), b = E[f] from a pilot batch
- score_optimal:     (f(z) - b_p) d/dtheta_p log q, b_p = E[f s_p^2] / E[s_p^2] from a pilot batch,
                     the per-coordinate minimiser of the variance
- control_variate:   score estimator of f minus c_p (score estimator of h - d/dtheta_p E[h]), with h the
                     linearisation of f at the mean (E[h] is exact) and c_p = Cov / Var from a pilot batch

The pilot batch is drawn from the same generator after the main batch and is independent of it, so
every estimator above except pathwise-through-a-relaxation is unbiased. Drawing the main batch
first means that estimators run from equally seeded generators see the same z (common random
numbers), which makes their variances directly comparable.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .families import Family

__all__ = ["GradientEstimate", "ESTIMATORS", "pathwise", "score", "score_baseline", "score_optimal",
           "control_variate", "summarize", "estimate_gradient", "per_sample_scores"]

Objective = Callable[[Tensor], Tensor]


@dataclass
class GradientEstimate:
    """Summary of n per-sample estimates: mean, its standard error and the per-sample variance, each (P,)."""

    mean: Tensor
    stderr: Tensor
    variance: Tensor
    n: int

    def z_scores(self, exact: Tensor) -> Tensor:
        """(mean - exact) / stderr per coordinate. The standard error is floored at round-off level
        (1e-9 of the largest |exact|), so an estimator with zero variance must match to round-off."""
        floor = 1e-9 * exact.abs().max().clamp_min(1e-12)
        return (self.mean - exact) / torch.sqrt(self.stderr ** 2 + floor ** 2)


def summarize(samples: Tensor) -> GradientEstimate:
    """samples: (n, P) per-sample gradient estimates."""
    if samples.ndim != 2 or samples.shape[0] < 2:
        raise ValueError(f"expected per-sample estimates of shape (n >= 2, P), got {tuple(samples.shape)}")
    n = samples.shape[0]
    var = samples.var(0)
    return GradientEstimate(samples.mean(0), (var / n).sqrt(), var, n)


def _replicate(fam: Family, n: int, theta: Tensor | None) -> Tensor:
    theta = fam.theta0 if theta is None else theta
    if theta.shape != (fam.n_params,):
        raise ValueError(f"{fam.name}: theta must be ({fam.n_params},), got {tuple(theta.shape)}")
    return theta.detach().expand(n, -1).clone().requires_grad_(True)


def per_sample_scores(fam: Family, theta: Tensor | None, z: Tensor) -> Tensor:
    """grad_theta log q_theta(z_i) for each sample: (n, P). z: (n, d), drawn without a gradient path."""
    th = _replicate(fam, z.shape[0], theta)
    with torch.enable_grad():
        (s,) = torch.autograd.grad(fam.log_prob(th, z.detach()).sum(), th)
    return s


def pathwise(fam: Family, f: Objective, n: int, *, theta: Tensor | None = None,
             generator: torch.Generator | None = None) -> Tensor:
    """grad_theta f(g_theta(eps_i)): (n, P). Unbiased for exact reparameterizations; through a
    Concrete relaxation it estimates the gradient of the relaxed objective (biased)."""
    if not fam.reparameterizable:
        raise ValueError(f"family {fam.name!r} is not reparameterizable; use a score-function estimator")
    th = _replicate(fam, n, theta)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(f(fam.rsample(th, generator=generator)).sum(), th)
    return g


def _draw(fam: Family, f: Objective, n: int, theta, generator) -> tuple[Tensor, Tensor]:
    th = (fam.theta0 if theta is None else theta).detach().expand(n, -1)
    z = fam.sample(th, generator=generator)
    return f(z), per_sample_scores(fam, theta, z)


def score(fam: Family, f: Objective, n: int, *, theta: Tensor | None = None,
          generator: torch.Generator | None = None) -> Tensor:
    """REINFORCE: f(z_i) grad log q(z_i): (n, P)."""
    fz, s = _draw(fam, f, n, theta, generator)
    return fz[:, None] * s


def score_baseline(fam: Family, f: Objective, n: int, *, theta: Tensor | None = None, n_pilot: int = 1000,
                   generator: torch.Generator | None = None) -> Tensor:
    """(f(z_i) - b) grad log q(z_i) with b the mean of f over an independent pilot batch: (n, P)."""
    fz, s = _draw(fam, f, n, theta, generator)
    b = f(fam.sample((fam.theta0 if theta is None else theta).detach().expand(n_pilot, -1), generator=generator)).mean()
    return (fz - b)[:, None] * s


def score_optimal(fam: Family, f: Objective, n: int, *, theta: Tensor | None = None, n_pilot: int = 1000,
                  generator: torch.Generator | None = None) -> Tensor:
    """(f(z_i) - b_p) s_p(z_i) with the variance-optimal b_p = E[f s_p^2] / E[s_p^2] estimated on a pilot batch."""
    fz, s = _draw(fam, f, n, theta, generator)
    fp, sp = _draw(fam, f, n_pilot, theta, generator)
    b = (fp[:, None] * sp ** 2).mean(0) / (sp ** 2).mean(0).clamp_min(1e-300)
    return (fz[:, None] - b) * s


def _linearisation(fam: Family, f: Objective, theta: Tensor) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """h(z) = f(m) + grad f(m) . (z - m) at m = E[z], and d/dtheta E[h] = J_mean(theta)^T grad f(m): (P,)."""
    th = theta.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        m = fam.mean(th)
        m0 = m.detach().clone().requires_grad_(True)
        (grad_f,) = torch.autograd.grad(f(m0.unsqueeze(0)).sum(), m0)
        (grad_Eh,) = torch.autograd.grad((m * grad_f).sum(), th)
    m0 = m0.detach()
    f_m = f(m0.unsqueeze(0))[0]
    return (lambda z: f_m + ((z - m0) * grad_f).sum(-1)), grad_Eh


def control_variate(fam: Family, f: Objective, n: int, *, theta: Tensor | None = None, n_pilot: int = 1000,
                    generator: torch.Generator | None = None) -> Tensor:
    """Score estimator with the linearisation h of f at E[z] as a control variate: (n, P).

    G_i = f(z_i) s_i - c * (h(z_i) s_i - grad E[h]); E[h s] = grad E[h] exactly, so G is unbiased for any c,
    and c_p = Cov(f s_p, h s_p) / Var(h s_p) (from a pilot batch) minimises its variance.
    """
    theta = fam.theta0 if theta is None else theta
    h, grad_Eh = _linearisation(fam, f, theta)

    def parts(m):
        th = theta.detach().expand(m, -1)
        z = fam.sample(th, generator=generator)
        s = per_sample_scores(fam, theta, z)
        return f(z)[:, None] * s, h(z)[:, None] * s - grad_Eh

    fs, hs = parts(n)
    a, c = parts(n_pilot)
    a, c = a - a.mean(0), c - c.mean(0)
    coef = (a * c).mean(0) / (c * c).mean(0).clamp_min(1e-300)
    return fs - coef * hs


ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    "pathwise": pathwise,
    "score": score,
    "score_baseline": score_baseline,
    "score_optimal": score_optimal,
    "control_variate": control_variate,
}


def estimate_gradient(fam: Family, f: Objective, estimator: str = "pathwise", n: int = 1000, *,
                      theta: Tensor | None = None, generator: torch.Generator | None = None,
                      **options) -> GradientEstimate:
    """Run one estimator by name (options such as n_pilot pass through) and summarise its n per-sample estimates."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {list(ESTIMATORS)}")
    return summarize(ESTIMATORS[estimator](fam, f, n, theta=theta, generator=generator, **options))

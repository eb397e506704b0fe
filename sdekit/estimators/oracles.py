"""The canonical objectives f and their exact expectations E_q[f(z)], whose autograd gradient is the oracle.

    quadratic    f(z) = sum_i (z_i - c_i)^2        c = linspace(-0.5, 0.5, d)
    exponential  f(z) = exp(sum_i a_i z_i)         a = linspace(0.05, 0.2, d)
    sinusoidal   f(z) = sum_i sin(w_i z_i)         w = linspace(0.5, 1.5, d)

Coefficients differ across coordinates so that f also separates the outcomes of a categorical.
Closed forms use each family's moments, moment generating function or characteristic function;
differentiating the closed form with autograd (exactly, no sampling) gives d/dtheta E_q[f].
For Categorical and Concrete the reference is the categorical expectation sum_k p_k f(e_k).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .families import Categorical, Exponential, Family, Gamma, GaussianDiag, GaussianFull, Laplace, Logistic

__all__ = ["Objective", "OBJECTIVES", "make_objective", "expectation", "exact_gradient"]

OBJECTIVES = ("quadratic", "exponential", "sinusoidal")


@dataclass(frozen=True)
class Objective:
    """f: (n, d) -> (n,), one of OBJECTIVES, with its coefficient vector coef: (d,)."""

    name: str
    coef: Tensor

    def __call__(self, z: Tensor) -> Tensor:
        if z.shape[-1] != self.coef.numel():
            raise ValueError(f"objective {self.name!r} has d={self.coef.numel()}, got z of shape {tuple(z.shape)}")
        if self.name == "quadratic":
            return ((z - self.coef) ** 2).sum(-1)
        if self.name == "exponential":
            return torch.exp((z * self.coef).sum(-1))
        return torch.sin(z * self.coef).sum(-1)


def make_objective(name: str, d: int, dtype=torch.float64) -> Objective:
    ranges = {"quadratic": (-0.5, 0.5), "exponential": (0.05, 0.2), "sinusoidal": (0.5, 1.5)}
    if name not in ranges:
        raise ValueError(f"unknown objective {name!r}; expected one of {OBJECTIVES}")
    lo, hi = ranges[name]
    coef = torch.linspace(lo, hi, d, dtype=dtype) if d > 1 else torch.tensor([(lo + hi) / 2], dtype=dtype)
    return Objective(name, coef)


def _moments(fam: Family, theta: Tensor) -> tuple[Tensor, Tensor]:
    """Per-coordinate mean and variance: two (d,)."""
    d = fam.d
    if isinstance(fam, GaussianFull):
        return theta[:d], torch.diagonal(fam.covariance(theta))
    if isinstance(fam, GaussianDiag):
        return theta[:d], theta[d:] ** 2
    if isinstance(fam, Laplace):
        return theta[:d], 2 * theta[d:] ** 2
    if isinstance(fam, Logistic):
        return theta[:d], (math.pi * theta[d:]) ** 2 / 3
    if isinstance(fam, Exponential):
        return 1 / theta, 1 / theta ** 2
    if isinstance(fam, Gamma):
        return theta[:d] / theta[d:], theta[:d] / theta[d:] ** 2
    raise ValueError(f"no moments for family {fam.name!r}")


def _log_mgf(fam: Family, theta: Tensor, t: Tensor) -> Tensor:
    """log E[exp(t . z)] for an independent-coordinate family (summed over d); t: (d,)."""
    d = fam.d
    if isinstance(fam, GaussianDiag):
        return (t * theta[:d] + 0.5 * (t * theta[d:]) ** 2).sum()
    if isinstance(fam, Laplace):
        b = theta[d:]
        _check(fam, (t * b).abs() < 1, "|a| < 1/scale")
        return (t * theta[:d] - torch.log1p(-(b * t) ** 2)).sum()
    if isinstance(fam, Logistic):
        x = math.pi * theta[d:] * t
        _check(fam, (theta[d:] * t).abs() < 1, "|a| < 1/scale")
        return (t * theta[:d] + torch.log(x / torch.sin(x))).sum()
    if isinstance(fam, Exponential):
        _check(fam, t < theta, "a < rate")
        return (torch.log(theta) - torch.log(theta - t)).sum()
    if isinstance(fam, Gamma):
        alpha, beta = theta[:d], theta[d:]
        _check(fam, t < beta, "a < rate")
        return (alpha * (torch.log(beta) - torch.log(beta - t))).sum()
    raise ValueError(f"no moment generating function for family {fam.name!r}")


def _check(fam: Family, ok: Tensor, what: str) -> None:
    if not bool(ok.all()):
        raise ValueError(f"E[exp(a.z)] is infinite for {fam.name} at these parameters: needs {what}")


def _sin_mean(fam: Family, theta: Tensor, w: Tensor) -> Tensor:
    """sum_i E[sin(w_i z_i)] = sum_i Im E[exp(i w_i z_i)]; w: (d,)."""
    d = fam.d
    if isinstance(fam, (GaussianDiag, GaussianFull)):
        m, v = _moments(fam, theta)
        return (torch.sin(w * m) * torch.exp(-0.5 * w ** 2 * v)).sum()
    if isinstance(fam, Laplace):
        return (torch.sin(w * theta[:d]) / (1 + (theta[d:] * w) ** 2)).sum()
    if isinstance(fam, Logistic):
        x = math.pi * theta[d:] * w
        return (torch.sin(w * theta[:d]) * x / torch.sinh(x)).sum()
    if isinstance(fam, Exponential):
        return (theta * w / (theta ** 2 + w ** 2)).sum()
    if isinstance(fam, Gamma):
        alpha, beta = theta[:d], theta[d:]
        # (1 - i w / beta)^(-alpha) = r^(-alpha) exp(i alpha atan(w / beta)), r = |1 - i w / beta|
        return ((1 + (w / beta) ** 2) ** (-alpha / 2) * torch.sin(alpha * torch.atan(w / beta))).sum()
    raise ValueError(f"no characteristic function for family {fam.name!r}")


def expectation(fam: Family, f: Objective, theta: Tensor | None = None) -> Tensor:
    """E_{q_theta}[f(z)] in closed form, differentiable in theta: (P,) (default fam.theta0). Returns ()."""
    theta = fam.theta0 if theta is None else theta
    if f.coef.numel() != fam.d:
        raise ValueError(f"objective has d={f.coef.numel()} but family {fam.name!r} has d={fam.d}")
    if isinstance(fam, Categorical):      # also Concrete: the reference is the discrete expectation
        eye = torch.eye(fam.d, dtype=theta.dtype)
        return (fam.probs(theta) * f(eye)).sum()
    if f.name == "quadratic":
        m, v = _moments(fam, theta)
        return (v + (m - f.coef) ** 2).sum()
    if f.name == "exponential":
        if isinstance(fam, GaussianFull):
            a = f.coef
            return torch.exp(a @ theta[: fam.d] + 0.5 * a @ fam.covariance(theta) @ a)
        return torch.exp(_log_mgf(fam, theta, f.coef))
    return _sin_mean(fam, theta, f.coef)


def exact_gradient(fam: Family, f: Objective, theta: Tensor | None = None) -> Tensor:
    """d/dtheta E_{q_theta}[f(z)]: (P,), by autograd of the closed form (no sampling)."""
    theta = (fam.theta0 if theta is None else theta).detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(expectation(fam, f, theta), theta)
    return grad

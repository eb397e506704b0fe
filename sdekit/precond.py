"""Turn a raw network F(x_in, c_noise) into a denoiser and a score function, for any prediction type and SDE.

With x_t = alpha x0 + sigma eps, every parameterisation is a different linear read-out of the
same quantity; this module converts each to (x0_hat, eps_hat, score_hat). The network always sees
a unit-variance input c_in x_t and the noise level c_noise = log(sigma/alpha) / 4, as in EDM,
so one architecture serves every SDE.

Prediction types (what F's output means):
  eps    eps_hat = F                             (DDPM)
  x0     x0_hat  = F
  v      v_hat   = F, with v = alpha eps - sigma x0   (Salimans & Ho 2022)
  score  score_hat = F
  edm    x0_hat  = c_skip x~ + c_out F, x~ = x_t / alpha  (Karras et al. 2022)

`data_prediction` is Tweedie's formula, the x0 read-out of a score, for samplers that work with x0.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .sde import SDE, broadcast_like, per_sample_t

__all__ = ["PREDICTIONS", "Denoiser", "data_prediction", "edm_coefficients", "resolve_sigma_data"]

PREDICTIONS = ("eps", "x0", "v", "score", "edm")


def data_prediction(score: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Tweedie: E[x0 | x_t] = (x_t + sigma_t^2 score) / alpha_t. score, x: (B, *S); alpha, sigma: () or (B,)."""
    return (x + broadcast_like(sigma**2, x) * score) / broadcast_like(alpha, x)


def edm_coefficients(sigma: Tensor, sigma_data: float):
    """EDM's c_skip, c_out, c_in for noise level sigma (of x / alpha). All shaped like sigma."""
    var = sigma**2 + sigma_data**2
    return sigma_data**2 / var, sigma * sigma_data / var.sqrt(), 1.0 / var.sqrt()


def resolve_sigma_data(sde: SDE, sigma_data: float | None = None) -> float:
    """The data scale for the preconditioning and the 'edm' loss weight: the SDE's own (EDM carries one) or 1.0.

    An explicit sigma_data is used where the SDE has none; where it has one, the two must agree (a different
    value would train and sample with two data scales), so a mismatch raises ValueError naming both.
    """
    own = getattr(sde, "sigma_data", None)
    if sigma_data is None:
        return float(own) if own is not None else 1.0
    sigma_data = float(sigma_data)
    if not (sigma_data > 0 and math.isfinite(sigma_data)):
        raise ValueError(f"sigma_data must be a finite number > 0, got {sigma_data}")
    if own is not None and not math.isclose(sigma_data, float(own), rel_tol=1e-12):
        raise ValueError(f"sigma_data={sigma_data} contradicts {type(sde).__name__}'s sigma_data={float(own)}; "
                         f"leave sigma_data unset (the SDE's value is used) or build the SDE with the value wanted")
    return sigma_data


class Denoiser(nn.Module):
    """Wraps net(x_in: (B, *S), c_noise: (B,)) -> (B, *S). Call it as score_fn(x, t).

    sigma_data (c_in for every prediction type; c_skip/c_out for 'edm'; the 'edm' loss weight) defaults to the
    SDE's (EDM(sigma_data=0.5)) or 1.0 for SDEs without one; see `resolve_sigma_data`.
    """

    def __init__(self, net: nn.Module, sde: SDE, prediction: str = "eps", sigma_data: float | None = None):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")
        self.net, self.sde, self.prediction = net, sde, prediction
        self.sigma_data = resolve_sigma_data(sde, sigma_data)

    def predict(self, x: Tensor, t, **net_kwargs) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) at x: (B, *S), t: () or (B,)."""
        t = per_sample_t(t, x)
        alpha, sigma = self.sde.marginal(t)
        a, s = broadcast_like(alpha, x), broadcast_like(sigma, x)
        ratio = sigma / alpha                                            # noise level of x / alpha
        c_skip, c_out, c_in = edm_coefficients(ratio, self.sigma_data)
        c_noise = torch.log(ratio) / 4
        out = self.net(broadcast_like(c_in, x) * (x / a), c_noise, **net_kwargs)
        if self.prediction == "eps":
            eps = out
            x0 = (x - s * eps) / a
        elif self.prediction == "x0":
            x0 = out
            eps = (x - a * x0) / s
        elif self.prediction == "v":
            norm = a**2 + s**2
            x0, eps = (a * x - s * out) / norm, (s * x + a * out) / norm
        elif self.prediction == "score":
            eps = -s * out
            x0 = (x - s * eps) / a
        else:  # edm
            x0 = broadcast_like(c_skip, x) * (x / a) + broadcast_like(c_out, x) * out
            eps = (x - a * x0) / s
        return x0, eps

    def score(self, x: Tensor, t, **net_kwargs) -> Tensor:
        """grad_x log p_t(x) = -eps_hat / sigma_t. x: (B, *S) -> (B, *S)."""
        t = per_sample_t(t, x)
        _, eps = self.predict(x, t, **net_kwargs)
        return -eps / broadcast_like(self.sde.marginal(t)[1], x)

    def forward(self, x: Tensor, t, **net_kwargs) -> Tensor:
        return self.score(x, t, **net_kwargs)

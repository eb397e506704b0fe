"""Denoising score matching on x_t = alpha_t x0 + sigma_t eps.

Every prediction type reads out the same eps_hat (see precond.py), so every loss here is
w(t) * mean_dims (eps_hat - eps)^2, and a weighting is just w(t). Equivalences, with
SNR = alpha^2 / sigma^2:
  uniform      w = 1                           the DDPM "simple" loss (uniform in eps)
  likelihood   w = g^2 / sigma^2               g^2 ||score_hat - score||^2: bounds the NLL (Song et al. 2021)
  snr          w = 1 / SNR                     ||x0_hat - x0||^2
  min_snr      w = min(SNR, gamma) / SNR       Hang et al. 2023
  edm          w = (s^2 + sigma_data^2) / sigma_data^2, s = sigma/alpha: EDM's lambda(sigma) ||D - x0||^2
Losses are per sample, shape (B,); the mean (or any other reduction) is the caller's.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .precond import Denoiser, resolve_sigma_data
from .sde import SDE

__all__ = ["WEIGHTINGS", "T_SAMPLINGS", "loss_weight", "sample_t", "dsm_loss"]

WEIGHTINGS = ("uniform", "likelihood", "snr", "min_snr", "edm")
T_SAMPLINGS = ("uniform", "lognormal")

def loss_weight(sde: SDE, t: Tensor, weighting: str, sigma_data: float | None = None, min_snr_gamma: float = 5.0) -> Tensor:
    """w(t) multiplying mean (eps_hat - eps)^2. t: (B,) -> (B,).

    sigma_data ('edm' weighting) defaults to the SDE's (EDM) or 1.0; a value contradicting the SDE's raises.
    """
    sigma_data = resolve_sigma_data(sde, sigma_data)
    alpha, sigma = sde.marginal(t)
    if weighting == "uniform":
        return torch.ones_like(t)
    if weighting == "likelihood":
        return sde.diffusion(t) ** 2 / sigma**2
    snr = (alpha / sigma) ** 2
    if weighting == "snr":
        return 1.0 / snr
    if weighting == "min_snr":
        return torch.clamp(snr, max=min_snr_gamma) / snr
    if weighting == "edm":
        return ((sigma / alpha) ** 2 + sigma_data**2) / sigma_data**2
    raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}")

def sample_t(sde: SDE, n: int, generator: torch.Generator | None = None, scheme: str = "uniform",
             P_mean: float = -1.2, P_std: float = 1.2, dtype=None, device=None) -> Tensor:
    """Training times (n,): uniform on [t_min, t_max], or EDM's log-normal noise levels
    log(sigma/alpha) ~ N(P_mean, P_std^2) mapped to t (not clipped: the SDE is defined beyond its sampling interval)."""
    if scheme == "uniform":
        u = torch.rand(n, generator=generator, dtype=dtype, device=device)
        return sde.t_min + (sde.t_max - sde.t_min) * u
    if scheme == "lognormal":
        log_sigma = P_mean + P_std * torch.randn(n, generator=generator, dtype=torch.float64, device=device)
        return sde.t_from_sigma_ratio(torch.exp(log_sigma)).to(dtype or torch.get_default_dtype())
    raise ValueError(f"unknown time sampling {scheme!r}; expected one of {T_SAMPLINGS}")

def dsm_loss(denoiser: Denoiser, x0: Tensor, t: Tensor, noise: Tensor, weighting: str = "uniform",
             min_snr_gamma: float = 5.0, **net_kwargs) -> Tensor:
    """Per-sample denoising score-matching loss. x0, noise: (B, *S); t: (B,) -> (B,).

    t and noise are explicit: the loss is a deterministic function of (parameters, x0, t, noise).
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} must equal x0 shape {tuple(x0.shape)}")
    if t.shape != (x0.shape[0],):
        raise ValueError(f"t must be (B,)=({x0.shape[0]},), got {tuple(t.shape)}")
    sde = denoiser.sde
    x_t = sde.perturb(x0, t, noise)
    _, eps_hat = denoiser.predict(x_t, t, **net_kwargs)
    w = loss_weight(sde, t, weighting, denoiser.sigma_data, min_snr_gamma)
    return w * (eps_hat - noise).pow(2).flatten(1).mean(1)

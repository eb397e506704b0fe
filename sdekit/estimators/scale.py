"""Numerically safe scale parameterisations for Gaussian encoders.

A raw network output r can drive exp(r / 2) to 0 or inf; then log sigma, 1 / sigma and the score
(z - mu) / sigma^2 are not finite and one bad batch poisons training with NaN. Two standard cures:

- softplus: sigma = softplus(r) + min_scale (smooth, linear for large r, never below min_scale);
- clamped log-variance: sigma = exp(clamp(r, lo, hi) / 2) (gradient zero outside [lo, hi]).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["softplus_scale", "clamped_logvar_scale", "SCALES"]


def softplus_scale(raw: Tensor, min_scale: float = 1e-3) -> Tensor:
    """sigma = softplus(raw) + min_scale; same shape as raw."""
    if not min_scale > 0:
        raise ValueError(f"min_scale must be positive, got {min_scale}")
    return F.softplus(raw) + min_scale


def clamped_logvar_scale(raw: Tensor, lo: float = -12.0, hi: float = 8.0) -> Tensor:
    """sigma = exp(clamp(raw, lo, hi) / 2), raw read as a log-variance; same shape as raw."""
    if not lo < hi:
        raise ValueError(f"need lo < hi, got lo={lo}, hi={hi}")
    return torch.exp(0.5 * raw.clamp(lo, hi))


SCALES = {"softplus": softplus_scale, "clamped_logvar": clamped_logvar_scale}

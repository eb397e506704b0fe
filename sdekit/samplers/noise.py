"""Per-step standard normal draws for stochastic samplers: given explicitly or drawn from a generator.

Passing `noise` makes a stochastic sampler a deterministic function of (score, x_T, noise); that is
what pathwise gradients and the backend-agreement tests rely on.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..rng import draw

__all__ = ["check_noise", "step_noise"]


def check_noise(noise: Tensor | None, draws: int, x: Tensor, sampler: str) -> None:
    """Raise unless noise is None or has shape (draws, *x.shape) (extra leading rows are allowed)."""
    if noise is None:
        return
    if not isinstance(noise, Tensor):
        raise TypeError(f"{sampler}: noise must be a tensor of shape ({draws}, {', '.join(map(str, x.shape))}), got {type(noise).__name__}")
    if tuple(noise.shape[1:]) != tuple(x.shape) or noise.shape[0] < draws:
        raise ValueError(f"{sampler}: noise must have shape ({draws}, {', '.join(map(str, x.shape))}) "
                         f"(draws, *x.shape), got {tuple(noise.shape)}")


def step_noise(noise: Tensor | None, k: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """The k-th standard normal draw like x: noise[k], or a fresh draw from generator."""
    if noise is not None:
        return noise[k].to(dtype=x.dtype, device=x.device)
    return draw(torch.randn, x.shape, generator=generator, dtype=x.dtype, device=x.device)

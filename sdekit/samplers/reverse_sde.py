"""Reverse-time SDE samplers: dx = [f(x,t) - g(t)^2 score(x,t)] dt + g(t) dW-bar, integrated t_max -> t_min."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..sde import SDE, broadcast_like
from .noise import check_noise, step_noise

__all__ = ["euler_maruyama", "em_step"]


def em_step(score_fn: Callable, sde: SDE, x: Tensor, t: Tensor, t_next: Tensor, z: Tensor) -> Tensor:
    """One Euler-Maruyama step of the reverse SDE from scalar t to t_next < t with standard normal z: (B, *S)."""
    dt = t_next - t                                                # negative
    tb = t.expand(x.shape[0])
    drift = sde.reverse_drift(x, tb, score_fn(x, tb))
    g = broadcast_like(sde.diffusion(tb), x)
    return x + drift * dt + g * torch.sqrt(-dt) * z


def euler_maruyama(score_fn: Callable, sde: SDE, x: Tensor, ts: Tensor, *, generator: torch.Generator | None = None,
                   noise: Tensor | None = None, callback: Callable | None = None) -> Tensor:
    """Euler-Maruyama on the reverse SDE (Song et al. 2021, eq. 6).

    x: (B, *S) at ts[0]; ts: (N+1,) decreasing; noise: (N, B, *S) standard normals (drawn from
    generator when None). Returns x at ts[-1]. One NFE per step.
    """
    check_noise(noise, len(ts) - 1, x, "euler_maruyama")
    for i in range(len(ts) - 1):
        x = em_step(score_fn, sde, x, ts[i], ts[i + 1], step_noise(noise, i, x, generator))
        if callback is not None:
            callback(i, ts[i + 1], x)
    return x

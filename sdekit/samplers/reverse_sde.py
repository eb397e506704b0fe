"""Reverse-time SDE samplers: dx = [f(x,t) - g(t)^2 score(x,t)] dt + g(t) dW-bar, integrated t_max -> t_min."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..sde import SDE, broadcast_like

__all__ = ["euler_maruyama"]


def _step_noise(noise: Tensor | None, i: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
    if noise is not None:
        return noise[i]
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def euler_maruyama(score_fn: Callable, sde: SDE, x: Tensor, ts: Tensor, *, generator: torch.Generator | None = None,
                   noise: Tensor | None = None, callback: Callable | None = None) -> Tensor:
    """Euler-Maruyama on the reverse SDE (Song et al. 2021, eq. 6).

    x: (B, *S) at ts[0]; ts: (N+1,) decreasing; noise: (N, B, *S) standard normals (drawn from
    generator when None). Returns x at ts[-1].
    """
    for i in range(len(ts) - 1):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t                                            # negative
        tb = t.expand(x.shape[0])
        drift = sde.reverse_drift(x, tb, score_fn(x, tb))
        g = broadcast_like(sde.diffusion(tb), x)
        x = x + drift * dt + g * torch.sqrt(-dt) * _step_noise(noise, i, x, generator)
        if callback is not None:
            callback(i, t_next, x)
    return x

"""Predictor-corrector sampling (Song et al. 2021, Algorithm 1 with the Langevin corrector of Algorithms 4/5).

Each step first predicts x at t_{i+1} with an Euler-Maruyama step of the reverse SDE, then corrects
it with `n_corrector` steps of Langevin dynamics targeting p_{t_{i+1}}:
    z ~ N(0, I),  eps = 2 a (snr ||z|| / ||score||)^2,  x <- x + eps score + sqrt(2 eps) z,
where a = (alpha_{t_i} / alpha_{t_{i+1}})^2 = exp(-int_{t_{i+1}}^{t_i} beta(s) ds) < 1 is the continuous-time
counterpart of the paper's alpha_i = 1 - beta_i for VP and sub-VP (a = 1 for VE and EDM, whose alpha_t = 1):
the signal decay of one forward step, so a shrinks the Langevin step where beta is large. As in the
reference code, ||z|| and ||score|| are averaged over the batch: one step size for all samples.
(Per-sample norms look more natural but fail in low dimension: near a mode centre ||score|| -> 0
and the step blows up, which visibly shifts the mode weights of a 2-D mixture.) Samples are
therefore coupled through that one scalar.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..sde import SDE
from .noise import check_noise, step_noise
from .reverse_sde import em_step

__all__ = ["pc", "langevin_step", "pc_noise_draws"]


def pc_noise_draws(n_steps: int, n_corrector: int = 1) -> int:
    """Standard normal draws pc needs: one for the predictor and one per corrector step, per step."""
    return n_steps * (1 + n_corrector)


def langevin_step(score: Tensor, x: Tensor, z: Tensor, snr: float, a: Tensor) -> Tensor:
    """One Langevin corrector step with signal-to-noise ratio snr (batch-mean norms). score, x, z: (B, *S); a: ()."""
    B = x.shape[0]
    grad_norm = score.reshape(B, -1).norm(dim=1).mean()
    noise_norm = z.reshape(B, -1).norm(dim=1).mean()
    eps = 2.0 * a * (snr * noise_norm / grad_norm.clamp_min(torch.finfo(x.dtype).tiny)) ** 2
    return x + eps * score + torch.sqrt(2.0 * eps) * z


def pc(score_fn: Callable, sde: SDE, x: Tensor, ts: Tensor, *, generator: torch.Generator | None = None,
       noise: Tensor | None = None, callback: Callable | None = None, snr: float = 0.16, n_corrector: int = 1) -> Tensor:
    """Predictor (Euler-Maruyama) then `n_corrector` Langevin corrector steps at the new time.

    x: (B, *S) at ts[0]; ts: (N+1,) decreasing; noise: (N * (1 + n_corrector), B, *S) standard normals,
    row i * (1 + n_corrector) for the predictor of step i and the following rows for its correctors.
    NFE: 1 + n_corrector per step.
    """
    if not isinstance(n_corrector, int) or isinstance(n_corrector, bool) or n_corrector < 0:
        raise ValueError(f"pc: n_corrector must be an integer >= 0, got {n_corrector!r}")
    if not snr > 0:
        raise ValueError(f"pc: snr must be > 0, got {snr!r}")
    k = 1 + n_corrector
    check_noise(noise, pc_noise_draws(len(ts) - 1, n_corrector), x, "pc")
    for i in range(len(ts) - 1):
        t, t_next = ts[i], ts[i + 1]
        x = em_step(score_fn, sde, x, t, t_next, step_noise(noise, i * k, x, generator))
        tb = t_next.expand(x.shape[0])
        a = (sde.marginal(t)[0] / sde.marginal(t_next)[0]) ** 2    # signal decay of the step t_next -> t, <= 1
        for j in range(n_corrector):
            x = langevin_step(score_fn(x, tb), x, step_noise(noise, i * k + 1 + j, x, generator), snr, a)
        if callback is not None:
            callback(i, t_next, x)
    return x

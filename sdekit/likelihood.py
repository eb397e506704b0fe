"""Log-likelihood by the probability-flow ODE (Song et al. 2021, Appendix D.2; Chen et al. 2018).

Along a solution of the probability-flow ODE dx/dt = v(x, t) = f(x, t) - g(t)^2 score(x, t) / 2, the
density obeys d log p_t(x_t) / dt = -div v(x_t, t), so
    log p_{t_min}(x) = log p_{t_max}(x_{t_max}) + int_{t_min}^{t_max} div v(x_t, t) dt.
The state and the integral are solved together by the adaptive Dormand-Prince integrator of
`sdekit.solvers.dopri`. The divergence is exact (one backward pass per dimension; for small d) or a
Hutchinson estimate eps^T (dv/dx) eps with one probe eps per sample held fixed along the path,
which keeps the integral an unbiased estimate of the exact one.

`bits_per_dim` and `dequantize` convert to the number reported for discrete data such as images.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .checks import check_finite
from .rng import draw
from .samplers.noise import check_noise
from .sde import SDE
from .solvers import dopri5

__all__ = ["log_likelihood", "bits_per_dim", "dequantize"]

METHODS = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")


def _probe(x: Tensor, kind: str, generator: torch.Generator | None) -> Tensor:
    if kind == "rademacher":
        return draw(torch.randint, 0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
    return draw(torch.randn, x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _divergence(v: Tensor, x: Tensor, probe: Tensor | None) -> Tensor:
    """div_x v per sample (exact when probe is None, else probe^T J probe). v, x: (B, *S) -> (B,)."""
    if probe is not None:
        (vjp,) = torch.autograd.grad(v, x, grad_outputs=probe)
        return (vjp * probe).reshape(x.shape[0], -1).sum(1)
    flat_v = v.reshape(x.shape[0], -1)
    div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for j in range(flat_v.shape[1]):
        # Samples are independent, so the gradient of the batch sum of v_j gives each sample's dv_j/dx.
        (grad,) = torch.autograd.grad(flat_v[:, j].sum(), x, retain_graph=j + 1 < flat_v.shape[1])
        div = div + grad.reshape(x.shape[0], -1)[:, j]
    return div


def log_likelihood(score_fn: Callable, sde: SDE, x: Tensor, method: str = "exact",
                   generator: torch.Generator | None = None, *, probe: str = "rademacher", noise: Tensor | None = None,
                   rtol: float = 1e-5, atol: float = 1e-5, prior_log_prob: Callable[[Tensor], Tensor] | None = None,
                   max_steps: int = 100_000, return_info: bool = False):
    """log p_{t_min}(x) in nats per sample, by the probability-flow ODE from sde.t_min to sde.t_max.

    score_fn(x: (B, *S), t: (B,)) -> (B, *S); it must be differentiable in x (torch autograd).
    x: (B, *S), finite (NaN/Inf raise ValueError with the first bad index). method: 'exact' (D backward passes per
    evaluation, D = prod(S)) or 'hutchinson'
    (one, with a `probe` of 'rademacher' or 'gaussian' per sample drawn from generator, or given as noise: (B, *S)).
    prior_log_prob(x_T: (B, *S)) -> (B,) defaults to sde.prior_log_prob; pass the exact p_{t_max}
    when it is known to remove the prior mismatch from the comparison.
    Returns (B,) (and, with return_info, a dict with 'nfe', 'accepted', 'rejected', 'x_T',
    'prior_log_prob', 'delta_log_prob').
    """
    if method not in METHODS:
        raise ValueError(f"unknown likelihood method {method!r}; expected one of {METHODS}")
    if probe not in PROBES:
        raise ValueError(f"unknown Hutchinson probe {probe!r}; expected one of {PROBES}")
    if not isinstance(x, Tensor) or x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"x must be a (B, *S) tensor with B >= 1, got {getattr(x, 'shape', type(x).__name__)}")
    check_finite(x, "log_likelihood: x")
    if noise is not None and method != "hutchinson":
        raise ValueError("noise (the Hutchinson probes) is only used with method='hutchinson'")
    eps = None
    if method == "hutchinson":
        if noise is not None:
            check_noise(noise[None] if isinstance(noise, Tensor) else noise, 1, x, "log_likelihood")
            check_finite(noise, "log_likelihood: noise")
        eps = noise.to(x) if noise is not None else _probe(x, probe, generator)

    B, shape, D = x.shape[0], x.shape, x[0].numel()
    nfe = 0

    def augmented(t: Tensor, y: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        with torch.enable_grad():
            xt = y[:, :D].reshape(shape).detach().requires_grad_(True)
            tb = t.expand(B)
            v = sde.reverse_drift(xt, tb, score_fn(xt, tb), probability_flow=True)
            div = _divergence(v, xt, eps)
        return torch.cat([v.detach().reshape(B, D), div.detach()[:, None]], 1)

    info: dict = {}
    y0 = torch.cat([x.detach().reshape(B, D), torch.zeros(B, 1, dtype=x.dtype, device=x.device)], 1)
    ts = torch.tensor([sde.t_min, sde.t_max], dtype=torch.float64)
    y1 = dopri5(augmented, y0, ts, rtol=rtol, atol=atol, max_steps=max_steps, info=info)
    x_T, delta = y1[:, :D].reshape(shape), y1[:, D]
    prior = (prior_log_prob or sde.prior_log_prob)(x_T)
    logp = prior + delta
    if not return_info:
        return logp
    info.update(nfe=nfe, x_T=x_T, prior_log_prob=prior, delta_log_prob=delta)
    return logp, info


def dequantize(x_int: Tensor, n_bins: int = 256, data_range: Sequence[float] = (-1.0, 1.0),
               generator: torch.Generator | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """Uniform dequantization of integers x_int in {0, ..., n_bins - 1} into data_range = (a, b):
        y = a + (b - a) (x_int + u) / n_bins,   u ~ U[0, 1) per element,
    so bin k covers [a + (b - a) k / n_bins, a + (b - a)(k + 1) / n_bins) (8-bit images into [-1, 1]:
    y = (x_int + u) / 128 - 1, not x_int / 127.5 - 1).
    """
    if (x_int < 0).any() or (x_int >= n_bins).any():
        raise ValueError(f"dequantize: values must lie in [0, {n_bins - 1}], got range [{float(x_int.min())}, {float(x_int.max())}]")
    dtype = dtype or torch.get_default_dtype()
    u = draw(torch.rand, x_int.shape, generator=generator, dtype=dtype, device=x_int.device)
    a, b = (float(v) for v in data_range)
    return a + (b - a) * (x_int.to(dtype) + u) / n_bins


def bits_per_dim(log_prob: Tensor, n_dims: int, n_bins: int = 256, data_range: Sequence[float] = (-1.0, 1.0)) -> Tensor:
    """Bits per dimension of discrete data from the continuous model's log density (nats) at dequantized points.

    log_prob: (B,) = log p(y) for y = dequantize(x_int, n_bins, data_range) (density over y, D = n_dims
    dimensions). The density of v = (x_int + u) / n_bins in [0, 1)^D is p(y) (b - a)^D, and the
    probability of the bin is at least exp(E_u log p_v(v)) / n_bins^D (Jensen), so
        bpd = [ -log p(y) - D log(b - a) + D log(n_bins) ] / (D log 2),
    an upper bound on -log2 P(x_int) / D once averaged over u. Offsets for common choices:
    data_range (-1, 1) and 256 bins: bpd = -log p(y) / (D ln 2) + 7 (the "+7" of Song et al.'s code);
    data_range (0, 1): + 8; data_range (0, 256) (raw integer scale, n_bins=256): + 0.
    """
    a, b = (float(v) for v in data_range)
    if not b > a:
        raise ValueError(f"data_range must be (a, b) with b > a, got {tuple(data_range)}")
    if n_dims < 1 or n_bins < 1:
        raise ValueError(f"n_dims and n_bins must be >= 1, got n_dims={n_dims}, n_bins={n_bins}")
    return (-log_prob - n_dims * math.log(b - a) + n_dims * math.log(n_bins)) / (n_dims * math.log(2.0))

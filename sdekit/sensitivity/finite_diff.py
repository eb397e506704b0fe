"""Central finite differences in theta (or x0), with or without common random numbers (CRN).

With CRN both perturbed solves use the same noise (the same dW and Levy areas, or the same Brownian path bm), so
(X(theta+h) - X(theta-h)) / 2h converges to the pathwise derivative of the discrete scheme as h -> 0 (error O(h^2)
until round-off, O(eps/h)). Without CRN the two solves use independent noise: the difference no longer shrinks
with h, so the per-path variance grows like Var(L) / (2 h^2).

Any registered scheme and noise type, as `sdekit.simulate` takes them; wrt="x0" differentiates in the initial
state (each path's own x0: the k-th coordinate of every row moved at once).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..solvers import Field, brownian_increments, get_scheme, simulate
from ._common import check_wrt, increments, noise_dim

__all__ = ["jacobian", "path_gradients"]


def _shifted(v: Tensor, index, delta: float) -> Tensor:
    out = v.detach().clone()
    out[index] += delta
    return out


def _columns(fn: Callable[[Tensor, Tensor], Tensor], x0: Tensor, theta: Tensor, h: float, wrt: str) -> list[Tensor]:
    """Central differences (fn(+) - fn(-)) / 2h of fn(x0, theta) along each column wrt asks for."""
    if h <= 0:
        raise ValueError(f"finite-difference step h must be positive, got {h}")
    cols = []
    if wrt in ("theta", "both"):
        cols += [(fn(x0, _shifted(theta, p, h)) - fn(x0, _shifted(theta, p, -h))) / (2 * h) for p in range(theta.shape[0])]
    if wrt in ("x0", "both"):
        cols += [(fn(_shifted(x0, (slice(None), k), h), theta) - fn(_shifted(x0, (slice(None), k), -h), theta)) / (2 * h)
                 for k in range(x0.shape[1])]
    return cols


def _split(J: Tensor, wrt: str, P: int):
    return (J[..., :P], J[..., P:]) if wrt == "both" else J


def jacobian(f: Field, g: Field, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor | None, h: float,
             scheme: str = "euler", *, noise: str = "diagonal", levy_area: Tensor | None = None, bm=None,
             wrt: str = "theta", dg: Field | None = None):
    """(X_T(theta + h e_p) - X_T(theta - h e_p)) / 2h on common noise: (B, d, P) (wrt="x0": (B, d, d); "both": pair)."""
    check_wrt(wrt)
    dW, H = increments(f, g, x0, theta, ts, dW, scheme, noise=noise, levy_area=levy_area, bm=bm)
    solve = lambda x, th: simulate(f, g, x, th, ts, dW, scheme, noise=noise, levy_area=H, dg=dg)   # noqa: E731
    return _split(torch.stack(_columns(solve, x0, theta, h, wrt), -1), wrt, theta.shape[0])


def fresh_noise(ts: Tensor, shape: tuple[int, int], levy: bool, generator: torch.Generator | None,
                dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """Independent increments (N, B, m) over ts, and Levy areas H ~ N(0, |h|/12) if levy."""
    t = ts.to(dtype)
    dW = brownian_increments(t, shape, generator)
    if not levy:
        return dW, None
    habs = (t[1:] - t[:-1]).abs().reshape(-1, 1, 1)
    return dW, torch.randn(dW.shape, generator=generator, dtype=dtype, device=dW.device) * (habs / 12).sqrt()


def path_gradients(f: Field, g: Field, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor | None,
                   loss: Callable[[Tensor], Tensor], h: float, scheme: str = "euler", crn: bool = True,
                   generator: torch.Generator | None = None, *, noise: str = "diagonal",
                   levy_area: Tensor | None = None, bm=None, wrt: str = "theta", dg: Field | None = None):
    """Per-path central differences of L(X_T): (B, P) (wrt="x0": (B, d); "both": the pair). loss: (B, d) -> (B,).

    crn=True uses the given noise (dW and levy_area, or bm) for both solves; crn=False draws fresh independent
    noise (from generator) for every perturbed solve, and the given noise is used for neither.
    """
    check_wrt(wrt)
    levy = get_scheme(scheme).needs_levy_area
    if crn:
        dW, H = increments(f, g, x0, theta, ts, dW, scheme, noise=noise, levy_area=levy_area, bm=bm)

        def value(x, th):
            return loss(simulate(f, g, x, th, ts, dW, scheme, noise=noise, levy_area=H, dg=dg))
    else:
        shape = (x0.shape[0], noise_dim(g, x0, theta, ts, noise))

        def value(x, th):
            w, lv = fresh_noise(ts, shape, levy, generator, x0.dtype)
            return loss(simulate(f, g, x, th, ts, w, scheme, noise=noise, levy_area=lv, dg=dg))
    return _split(torch.stack(_columns(value, x0, theta, h, wrt), -1), wrt, theta.shape[0])

"""The benchmark SDEs in torch: geometric Brownian motion and a 16-dimensional neural SDE.

Each problem gives fields in sdekit's convention, f(t, x, theta) -> (B, d), g(t, x, theta) -> (B, d)
(diagonal noise), dg = dg_i/dx_i for Milstein, an initial state x0 (B, d), and theta (P,).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Problem:
    name: str
    d: int
    f: Callable
    g: Callable
    dg: Callable
    theta: Tensor
    x0: Callable[[int], Tensor]          # batch -> (B, d)
    params: dict                          # what the JAX versions need (as numpy arrays)


def gbm(device="cpu", dtype=torch.float32) -> Problem:
    """dX = mu X dt + sigma X dW, theta = (mu, sigma); dX_T/dmu = T X_T in closed form."""
    theta = torch.tensor([0.05, 0.2], device=device, dtype=dtype)
    f = lambda t, x, th: th[0] * x
    g = lambda t, x, th: th[1] * x
    dg = lambda t, x, th: th[1].expand_as(x)
    return Problem("gbm", 1, f, g, dg, theta, lambda B: torch.ones(B, 1, device=device, dtype=dtype),
                   {"mu": 0.05, "sigma": 0.2})


def neural(P: int = 4, d: int = 16, hidden: int = 64, device="cpu", dtype=torch.float32, seed: int = 0) -> Problem:
    """dX = tanh(X W1 + b1) W2(theta) dt + 0.1 sigmoid(c X + e) dW in d dimensions.

    W2(theta) = W2 + reshape(theta @ M): each of the P parameters moves the output layer along a fixed
    random direction, so P can be varied without changing the network's cost. g is elementwise (diagonal).
    """
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    W1, b1 = r(d, hidden) / math.sqrt(d), 0.1 * r(hidden)
    W2, M = r(hidden, d) / math.sqrt(hidden), r(P, hidden * d) / math.sqrt(hidden)
    c, e = 0.5 * r(d), 0.5 * r(d)
    theta = 0.1 * r(P)
    to = lambda a: a.to(device=device, dtype=dtype)
    W1t, b1t, W2t, Mt, ct, et = map(to, (W1, b1, W2, M, c, e))

    def f(t, x, th):
        W = W2t + (th @ Mt).reshape(hidden, d)
        return torch.tanh(x @ W1t + b1t) @ W

    def g(t, x, th):
        return 0.1 * torch.sigmoid(ct * x + et)

    def dg(t, x, th):
        s = torch.sigmoid(ct * x + et)
        return 0.1 * ct * s * (1 - s)

    x0 = lambda B: to(torch.randn(B, d, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64))
    params = {k: v.numpy() for k, v in dict(W1=W1, b1=b1, W2=W2, M=M, c=c, e=e, theta=theta).items()}
    return Problem(f"neural{d}", d, f, g, dg, to(theta), x0, params)


def plain_loop(p: Problem, x0: Tensor, T: float, N: int, generator: torch.Generator, milstein: bool = False) -> Tensor:
    """The textbook loop a user would write: fresh normals every step, out-of-place update.

    milstein=True adds the diagonal-noise correction 0.5 g dg/dx (dW^2 - h) with the problem's hand-written dg.
    """
    h, sh = T / N, math.sqrt(T / N)
    x, th = x0, p.theta
    for n in range(N):
        t = torch.tensor(n * h)
        dw = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * sh
        gx = p.g(t, x, th)
        dx = p.f(t, x, th) * h + gx * dw
        if milstein:
            dx = dx + 0.5 * gx * p.dg(t, x, th) * (dw * dw - h)
        x = x + dx
    return x


def torchsde_module(p: Problem):
    """The problem as a torchsde SDE (Ito, diagonal noise)."""
    import torchsde  # noqa: F401 - imported so a missing package fails here, where callers catch it

    class _SDE(torch.nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        def f(self, t, y):
            return p.f(t, y, p.theta)

        def g(self, t, y):
            return p.g(t, y, p.theta)

    return _SDE()

"""Round-off tolerances for comparing two floating-point computations of the same formula.

Every rounding step makes a relative error of at most u = eps / 2 of the magnitude it works on, so two correct
implementations of a formula that take `ops` rounding steps along the longest chain from inputs to result differ
by at most about 2 * ops * u * scale = ops * eps * scale, where `scale` bounds the magnitudes along the way (the
terms of a sum, not only the sum: cancellation amplifies). Kernels for different CPUs (AVX-512, AVX2, the portable
ones) sum in different orders and use different vectorised sin/exp/log, so any of these differences may appear on
some machine: a tolerance below this bound is one that happened to pass on one CPU. `cond` is an amplification the
operation count does not see, e.g. sin(x) at large |x|, whose argument carries an absolute error |x| eps.

The bound is first order and worst case; typical differences are far smaller, so it stays a sharp test of the
formula (a wrong formula is off by O(scale), not O(ops * eps * scale)).
"""
from __future__ import annotations

import numpy as np
import torch

# sin, cos, exp, log, tanh: vectorised implementations are accurate to a few ulp, not the 1/2 ulp of + and *
TRANSCENDENTAL_OPS = 4
# the longest chain of a schedule's closed forms in sdekit.sde (e.g. t_from_log_snr: softplus's exp and log1p, a
# square root, a division, a few products and sums): about 4 transcendentals and 4 exact-rounded operations
SCHEDULE_OPS = 4 * TRANSCENDENTAL_OPS + 4


def eps(dtype) -> float:
    """Machine epsilon of a torch or numpy floating dtype."""
    if isinstance(dtype, torch.dtype):
        return float(torch.finfo(dtype).eps)
    return float(np.finfo(dtype).eps)


def roundoff(dtype, scale=1.0, ops: float = 1, cond: float = 1.0):
    """Largest difference two correct evaluations may show: ops * cond * eps(dtype) * scale (a float, or a tensor or
    array of bounds for a tensor or array `scale`)."""
    factor = float(ops) * float(cond) * eps(dtype)
    return factor * scale if getattr(scale, "ndim", 0) else factor * float(scale)


def fan_in_ops(net) -> int:
    """Operation count of one forward pass of a network along its longest chain: the sum over its weight tensors of
    the fan-in (each output is a dot product of that length), and a transcendental per layer for its activation."""
    weights = [p for p in net.parameters() if p.ndim >= 2]
    return sum(p[0].numel() for p in weights) + TRANSCENDENTAL_OPS * len(weights)


def mlp_roundoff(net, x: torch.Tensor, c_noise: torch.Tensor, dtype=torch.float32,
                 input_error: torch.Tensor | float = 0.0, c_noise_error: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Elementwise bound (B, d) on |a dtype evaluation of sdekit_models.mlp.MLP - the exact one| at (x, c_noise).

    A running error bound: a Linear layer adds (fan_in + 1) u (|W| |h| + |b|) to |W| times the error it is given,
    SiLU passes errors with slope at most 1.1 and adds a few ulp; the Fourier features see the argument's error
    |w pi| * err(c_noise) + 2 u |w pi c_noise| (sin, cos have slope 1). Evaluated in float64 from the float64 copies
    of the parameters. `input_error` and `c_noise_error` are the errors the caller's inputs already carry
    (broadcastable to x and c_noise). Two evaluations differ by at most twice this bound.
    """
    u = eps(dtype) / 2
    f64 = lambda t: t.detach().to(torch.float64)  # noqa: E731
    x, c = f64(x), f64(c_noise).expand(x.shape[0]) if c_noise.ndim == 0 else f64(c_noise)
    freqs = f64(net.time.freqs) * torch.pi
    angles = c[:, None] * freqs[None, :]
    c_err = torch.as_tensor(c_noise_error, dtype=torch.float64).reshape(-1, 1)
    err_angles = freqs[None, :] * c_err + 2 * u * angles.abs()
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], -1)
    err_emb = torch.cat([err_angles, err_angles], -1) + TRANSCENDENTAL_OPS * u
    err_x = torch.as_tensor(input_error, dtype=torch.float64).expand_as(x)

    def linear(layer, h, err):
        w, b = f64(layer.weight), f64(layer.bias)
        fan_in = w.shape[1]
        return h @ w.T + b, err @ w.abs().T + (fan_in + 1) * u * (h.abs() @ w.abs().T + b.abs())

    def silu(z, err):
        return torch.nn.functional.silu(z), 1.1 * err + TRANSCENDENTAL_OPS * u * z.abs()

    h, err = silu(*linear(net.inp, torch.cat([x, emb], -1), torch.cat([err_x, err_emb], -1)))
    for lin, proj in zip(net.hidden_layers, net.time_proj):
        (z1, e1), (z2, e2) = linear(lin, h, err), linear(proj, emb, err_emb)
        h, err = silu(z1 + z2, e1 + e2 + u * (z1 + z2).abs())
    return linear(net.out, h, err)[1]

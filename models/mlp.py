"""MLP score network for low-dimensional data, conditioned on time through Fourier features."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["FourierFeatures", "MLP"]


class FourierFeatures(nn.Module):
    """c: (B,) -> (B, 2 n) features [sin(w_k c), cos(w_k c)] with geometric frequencies w_k = 2^k.

    Fixed (not learned, not random) frequencies: the features are a pure function of c, which keeps
    checkpoints small and makes exporting to other frameworks exact.
    """

    def __init__(self, n: int = 16, max_log2_freq: float = 8.0):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.linspace(-2.0, max_log2_freq, n), persistent=False)

    def forward(self, c: Tensor) -> Tensor:
        angles = c[:, None].to(self.freqs.dtype) * self.freqs[None, :] * math.pi
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class MLP(nn.Module):
    """MLP(data_shape=(d,)): (x: (B, d), c_noise: (B,)) -> (B, d), [x, fourier(c)] -> (Linear, SiLU) x depth -> Linear.

    The time embedding is re-injected before every hidden layer, so deep nets keep the time signal.
    """

    def __init__(self, data_shape: tuple[int] | int, hidden: int = 256, depth: int = 3, time_features: int = 16,
                 max_log2_freq: float = 8.0):
        super().__init__()
        if isinstance(data_shape, int):
            data_shape = (data_shape,)
        if len(data_shape) != 1:
            raise ValueError(f"MLP is for flat data (d,), got data shape {tuple(data_shape)}")
        dim = int(data_shape[0])
        if dim < 1 or hidden < 1 or depth < 1 or time_features < 1:
            raise ValueError(f"MLP needs positive dim/hidden/depth/time_features, "
                             f"got {dim}/{hidden}/{depth}/{time_features}")
        self.dim, self.hidden, self.depth = dim, hidden, depth
        # c_noise = log(sigma/alpha) / 4 spans about [-1.2, 1.3] under VP: frequencies up to 2^max_log2_freq pi
        self.time = FourierFeatures(time_features, max_log2_freq)
        temb = 2 * time_features
        self.inp = nn.Linear(dim + temb, hidden)
        self.time_proj = nn.ModuleList(nn.Linear(temb, hidden) for _ in range(depth - 1))
        self.hidden_layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)  # start as the zero predictor: a stable first step for every prediction type
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLP expects x of shape (B, {self.dim}), got {tuple(x.shape)}")
        emb = self.time(c_noise.expand(x.shape[0]) if c_noise.ndim == 0 else c_noise)
        h = torch.nn.functional.silu(self.inp(torch.cat([x, emb.to(x.dtype)], dim=-1)))
        for lin, proj in zip(self.hidden_layers, self.time_proj):
            h = torch.nn.functional.silu(lin(h) + proj(emb.to(x.dtype)))
        return self.out(h)

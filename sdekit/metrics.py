"""Sample-quality metrics: sliced Wasserstein distance, MMD, and per-mode weights of mixtures."""
from __future__ import annotations

import torch
from torch import Tensor

from .data import GaussianMixture

__all__ = ["sliced_wasserstein", "mmd", "mode_weights", "mode_weight_error"]


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected two (N, d) sample sets of equal d, got {tuple(x.shape)} and {tuple(y.shape)}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("samples contain NaN or Inf")


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 256,
                       generator: torch.Generator | None = None) -> float:
    """Sliced 2-Wasserstein distance between equal-size samples x, y: (N, d), over random unit directions.

    In 1-D the optimal coupling pairs sorted samples, so each slice is exact for the empirical measures.
    """
    _check_pair(x, y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"sliced_wasserstein needs equal sample sizes, got {x.shape[0]} and {y.shape[0]}")
    dirs = torch.randn(x.shape[1], n_projections, generator=generator, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x.double() @ dirs, dim=0)
    py, _ = torch.sort(y.double() @ dirs, dim=0)
    return float((px - py).pow(2).mean().sqrt())


def mmd(x: Tensor, y: Tensor, bandwidths=(0.1, 0.3, 1.0, 3.0)) -> float:
    """Unbiased squared MMD with a sum of Gaussian kernels exp(-|a-b|^2 / (2 h^2)). x: (N, d), y: (M, d)."""
    _check_pair(x, y)
    x, y = x.double(), y.double()

    def kernel(a, b):
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    n, m = x.shape[0], y.shape[0]
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    term_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    term_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(term_x + term_y - 2 * kxy.mean())


def mode_weights(x: Tensor, gmm: GaussianMixture) -> Tensor:
    """Fraction of samples assigned (by maximum posterior responsibility) to each component. x: (N, d) -> (K,)."""
    labels = gmm.responsibilities(x.to(gmm.means.dtype)).argmax(1)
    return torch.bincount(labels, minlength=gmm.n_components).to(torch.float64) / x.shape[0]


def mode_weight_error(x: Tensor, gmm: GaussianMixture) -> float:
    """Largest absolute difference between sampled and true component weights."""
    return float((mode_weights(x, gmm) - gmm.weights.double()).abs().max())

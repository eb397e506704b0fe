"""Variational bounds from log importance weights log w = log p(x, z) - log q(z | x), z ~ q.

    ELBO     = E[log w]                                   (K = 1)
    IWAE-K   = E[log (1/K) sum_k w_k]                     (Burda et al. 2016)

For z_1..z_K i.i.d. from q, log p(x) >= IWAE-K' >= IWAE-K >= ELBO for K' >= K: averaging more
weights inside the log tightens Jensen's gap. Estimators here are per data point; the bound is
their expectation.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["elbo", "iwae", "iwae_curve"]


def elbo(log_w: Tensor) -> Tensor:
    """Mean of log w over the sample axis 0. log_w: (K, B) -> (B,)."""
    if log_w.ndim < 1 or log_w.shape[0] < 1:
        raise ValueError(f"log_w must be (K >= 1, ...), got {tuple(log_w.shape)}")
    return log_w.mean(0)


def iwae(log_w: Tensor) -> Tensor:
    """log (1/K) sum_k exp(log_w_k), computed stably. log_w: (K, B) -> (B,)."""
    if log_w.ndim < 1 or log_w.shape[0] < 1:
        raise ValueError(f"log_w must be (K >= 1, ...), got {tuple(log_w.shape)}")
    return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])


def iwae_curve(log_w: Tensor, ks: list[int]) -> dict[int, Tensor]:
    """Per-data-point IWAE-K for each K in ks from one pool of weights log_w: (M, B) -> {K: (B,)}.

    The pool is split into M // K disjoint groups of K and the K-sample bound is averaged over groups.
    Using one pool keeps the comparison between K paired: differences between K carry far less noise
    than the values themselves (compare per-point differences, not independent means).
    """
    if log_w.ndim != 2:
        raise ValueError(f"log_w must be (M, B), got {tuple(log_w.shape)}")
    M, B = log_w.shape
    out = {}
    for k in ks:
        if not 1 <= k <= M:
            raise ValueError(f"K={k} needs 1 <= K <= pool size {M}")
        g = M // k
        out[k] = iwae(log_w[: g * k].reshape(k, g, B)).mean(0)
    return out

"""Gumbel noise and the Gumbel-softmax (Concrete) relaxation of a categorical sample."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gumbel_noise", "gumbel_softmax"]


def gumbel_noise(shape, *, generator: torch.Generator | None = None, dtype=torch.float32, device=None) -> Tensor:
    """Standard Gumbel(0, 1) noise -log(-log u), with u kept strictly inside (0, 1)."""
    eps = torch.finfo(dtype).eps
    u = torch.rand(shape, generator=generator, dtype=dtype, device=device).clamp(eps, 1 - eps)
    return -torch.log(-torch.log(u))


def gumbel_softmax(logits: Tensor, temperature: float, *, hard: bool = False,
                   generator: torch.Generator | None = None) -> Tensor:
    """softmax((logits + G) / temperature) over the last axis, G ~ Gumbel(0, 1). logits: (..., K) -> (..., K).

    hard=True returns the one-hot argmax in the forward pass with the relaxed sample's gradient
    (straight-through): z = onehot + y - y.detach(). argmax(logits + G) is an exact categorical
    sample (Gumbel-max), so the forward value is unbiased; only the gradient is.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    g = gumbel_noise(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
    y = torch.softmax((logits + g) / temperature, dim=-1)
    if not hard:
        return y
    onehot = F.one_hot(y.argmax(-1), logits.shape[-1]).to(y.dtype)
    return onehot + y - y.detach()

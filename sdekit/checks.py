"""Input checks shared by every layer (data, images, samplers, likelihoods): a bad value is reported early,
with a message that names it."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_finite"]


def check_finite(x: Tensor, what: str) -> None:
    """Raise ValueError naming `what` and the first bad index if x holds NaN or Inf."""
    bad = ~torch.isfinite(x)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{what} contains {int(bad.sum())} NaN/Inf value(s), first at index {first}")

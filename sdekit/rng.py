"""Random draws that give the same numbers on every device.

A torch.Generator lives on one device; drawing on the generator's device and then moving the result
lets a CPU generator drive a CUDA run reproducibly (equal seeds, equal samples, CPU or GPU).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["draw"]


def draw(fn: Callable[..., Tensor], *args, generator: torch.Generator | None = None, device=None, **kwargs) -> Tensor:
    """fn(*args, generator=generator, **kwargs) drawn on the generator's device, returned on `device`.

    e.g. draw(torch.randn, (B, d), generator=gen, dtype=x.dtype, device=x.device).
    """
    draw_on = generator.device if generator is not None else device
    out = fn(*args, generator=generator, device=draw_on, **kwargs)
    return out if device is None else out.to(device)

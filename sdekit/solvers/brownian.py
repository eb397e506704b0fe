"""Brownian increments: on a given time grid, or drawn in cache-sized chunks of steps for `simulate`."""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["brownian_increments", "normal_chunks", "chunk_steps"]

_CHUNK_ELEMENTS = 1 << 18   # ~1 MiB of float32 normals per draw: large enough to amortise the call, small enough for L2


def brownian_increments(ts: Tensor, shape: tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
    """Independent increments sqrt(|dt_n|) z_n: (N, *shape) in ts's dtype."""
    h = (ts[1:] - ts[:-1]).abs()
    z = torch.randn((h.shape[0], *shape), generator=generator, dtype=ts.dtype, device=ts.device)
    return z * h.sqrt().reshape(-1, *([1] * len(shape)))


def chunk_steps(shape: tuple[int, ...]) -> int:
    """How many steps of normals of `shape` (B, d) one draw covers."""
    return max(1, _CHUNK_ELEMENTS // max(1, math.prod(shape)))


def normal_chunks(steps: int, shape: tuple[int, ...], generator: torch.Generator | None, dtype: torch.dtype,
                  device: torch.device | str, out: Tensor | None = None) -> Iterator[Tensor]:
    """Standard normals for `steps` steps, yielded as (c, *shape) chunks of `chunk_steps(shape)` steps.

    This chunking is part of the definition of `simulate(dW=None)`: dW[n] = sqrt(|h_n|) z[n] where z is
    the concatenation of these chunks, so a seed gives the same path on every call.
    out: a (k, *shape) buffer, k a multiple of c, that the chunks are drawn into in turn (chunk j in the slice
    starting at step (j c) mod k; the same numbers, written where the caller reads them in blocks of k steps);
    each chunk is valid until the buffer comes round to it again.
    """
    c = chunk_steps(shape)
    gen_device = generator.device if generator is not None else torch.device(device)
    if out is not None and (out.shape[0] % c or out.device != gen_device or out.dtype != dtype or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {dtype} buffer on {gen_device} of a multiple of {c} steps; "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    for j, start in enumerate(range(0, steps, c)):
        n = min(c, steps - start)
        if out is not None:
            at = (j * c) % out.shape[0]
            yield torch.randn((n, *shape), generator=generator, dtype=dtype, device=gen_device, out=out[at:at + n])
            continue
        z = torch.randn((n, *shape), generator=generator, dtype=dtype, device=gen_device)
        yield z.to(device, non_blocking=True)

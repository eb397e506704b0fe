"""Keyed random streams: the noise of path b is a pure function of (seed, b), whoever draws it.

Paths are grouped in fixed blocks of `block` consecutive global indices. Every block has its own generator per
stream (Brownian increments, Levy areas, initial states, ...), seeded from (seed, stream, block) alone, so the
paths [start, stop) come out the same whether one process draws all of them or several processes draw a slice
each: any split of the paths over processes (or over batches) gives the same paths. A slice that starts or ends
inside a block draws the whole block and keeps its part.

Within a block the normals are drawn in fixed draws of `keyed_chunk_steps(block, m)` steps of (block, m) each,
one after the other from the block's generator; the last draw of a grid is drawn whole and cut. So path b's
increment at step n is a function of (seed, b, n) and of the stream's shape (block, m), dtype and device type
only, not of the grid's length or of which paths are drawn beside it.

Seeds. torch's CPU generator (MT19937) reads only the low 32 bits of its seed: seeds that differ above bit 31
give the same numbers. A hash of (seed, stream, block) folded to 32 bits would collide by the birthday bound
(about one pair in 1e5 blocks). So the 32-bit seeds are made injective instead: base(seed) + block * STREAMS +
stream, passed through a bijection of 32-bit integers (murmur3's finaliser); within one seed, distinct (stream,
block) pairs get distinct generators for up to 2^32 / STREAMS blocks.

Cost: one generator per block; a block that lies whole in the range is drawn in place when its draw is contiguous
there (one step per draw, or a single block), otherwise drawn and copied. `python -m benchmarks.montecarlo` gives
the ratio to the chunked stream `normal_chunks` that `simulate(generator=...)` draws, on the RNG-floor benchmark.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

__all__ = ["BLOCK", "STREAMS", "STREAM", "keyed_seed", "keyed_generator", "keyed_chunk_steps", "keyed_normal_chunks",
           "keyed_normals", "keyed_increments", "keyed_draw"]

BLOCK = 1024              # paths per block: the unit of keying
STREAMS = 1024            # stream ids per seed: 0 <= stream < STREAMS
STREAM = {"dW": 0, "levy_area": 1, "x0": 2}   # the streams sdekit draws; others (e.g. fresh noise per solve) from 8 on
_CHUNK_ELEMENTS = 1 << 16  # normals per draw from one block's generator: large enough to amortise the call
_MASK32 = 0xFFFFFFFF


def _fmix32(h: int) -> int:
    """murmur3's 32-bit finaliser: a bijection of [0, 2^32) that scatters neighbouring integers."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def _base(seed: int) -> int:
    """A 32-bit offset from any integer seed (splitmix64 of the seed, folded)."""
    z = (int(seed) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return (z ^ (z >> 32)) & _MASK32


def keyed_seed(seed: int, stream: int, block: int) -> int:
    """The 32-bit generator seed of block `block` of stream `stream` under `seed`; injective in (stream, block)."""
    if not 0 <= stream < STREAMS:
        raise ValueError(f"stream must be in [0, {STREAMS}), got {stream}")
    if not 0 <= block < (1 << 32) // STREAMS:
        raise ValueError(f"block index {block} out of range: at most {(1 << 32) // STREAMS} blocks per stream "
                         "(use larger blocks)")
    return _fmix32((_base(seed) + block * STREAMS + stream) & _MASK32)


def keyed_generator(seed: int, stream: int, block: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator on `device` for (seed, stream, block)."""
    return torch.Generator(device=device).manual_seed(keyed_seed(seed, stream, block))


def keyed_chunk_steps(block: int, m: int) -> int:
    """Steps per draw from a block's generator: a fixed function of the stream's shape (block, m)."""
    return max(1, _CHUNK_ELEMENTS // max(1, block * m))


def _check_range(start: int, stop: int, block: int) -> None:
    if not 0 <= start <= stop:
        raise ValueError(f"need 0 <= start <= stop, got start={start}, stop={stop}")
    if block < 1:
        raise ValueError(f"block must be a positive number of paths, got {block}")


class _Blocks:
    """The generators of the blocks that the paths [start, stop) touch, drawing their chunks in turn."""

    def __init__(self, start: int, stop: int, m: int, seed: int, stream: int, block: int, dtype, device):
        _check_range(start, stop, block)
        self.start, self.stop, self.m, self.block, self.dtype, self.device = start, stop, m, block, dtype, device
        self.c = keyed_chunk_steps(block, m)
        self.first = start // block
        self.gens = [keyed_generator(seed, stream, k, device) for k in range(self.first, -(-stop // block))]
        self.tmp = None

    def fill(self, out: Tensor) -> None:
        """Draw the next chunk of every block (c steps each) into out (k <= c steps, stop - start, m)."""
        k_steps, block = out.shape[0], self.block
        for i, gen in enumerate(self.gens):
            k = self.first + i
            lo, hi = max(self.start, k * block), min(self.stop, (k + 1) * block)
            dst = out[:, lo - self.start:hi - self.start]
            if k_steps == self.c and hi - lo == block and dst.is_contiguous():   # a whole block: drawn in place
                torch.randn((self.c, block, self.m), generator=gen, dtype=self.dtype, device=self.device, out=dst)
                continue
            if self.tmp is None:
                self.tmp = torch.empty((self.c, block, self.m), dtype=self.dtype, device=self.device)
            torch.randn((self.c, block, self.m), generator=gen, dtype=self.dtype, device=self.device, out=self.tmp)
            dst.copy_(self.tmp[:k_steps, lo - k * block:hi - k * block])


def keyed_normal_chunks(steps: int, start: int, stop: int, m: int, seed: int, *, stream: int = 0, block: int = BLOCK,
                        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Iterator[Tensor]:
    """Standard normals of the global paths [start, stop) for `steps` steps, yielded as (c, stop - start, m) chunks
    of c = keyed_chunk_steps(block, m) steps (the last one shorter), drawn into one buffer: each chunk is valid until
    the next one is drawn (as `normal_chunks(out=...)`); copy it to keep it."""
    blocks = _Blocks(start, stop, m, seed, stream, block, dtype, device)
    buf = torch.empty((blocks.c, stop - start, m), dtype=dtype, device=device)
    for s0 in range(0, steps, blocks.c):
        out = buf[:min(blocks.c, steps - s0)]
        blocks.fill(out)
        yield out


def keyed_normals(steps: int, start: int, stop: int, m: int, seed: int, *, stream: int = 0, block: int = BLOCK,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """Standard normals (steps, stop - start, m) of the global paths [start, stop), drawn in place."""
    blocks = _Blocks(start, stop, m, seed, stream, block, dtype, device)
    out = torch.empty((steps, stop - start, m), dtype=dtype, device=device)
    for s0 in range(0, steps, blocks.c):
        blocks.fill(out[s0:s0 + blocks.c])
    return out


def keyed_increments(ts: Tensor, start: int, stop: int, m: int, seed: int, *, levy_area: bool = False,
                     block: int = BLOCK, stream: int = STREAM["dW"]) -> Tensor | tuple[Tensor, Tensor]:
    """Brownian increments dW (N, stop - start, m) over ts of the global paths [start, stop), in ts's dtype and
    device: dW[n] = sqrt(|h_n|) z[n]. With levy_area=True also the space-time Levy areas H (N, stop - start, m),
    N(0, |h|/12) and independent of dW (their own stream, stream + 1), as srk reads them: returns (dW, H).

    Pass them to `sdekit.simulate(..., dW=dW, levy_area=H)` or any sensitivity method: the paths are the same
    however the global index range is split.
    """
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"ts must be a 1-d time grid of at least 2 points, got shape {tuple(ts.shape)}")
    habs = (ts[1:] - ts[:-1]).abs().reshape(-1, 1, 1)
    kw = dict(block=block, dtype=ts.dtype, device=ts.device)
    dW = keyed_normals(habs.shape[0], start, stop, m, seed, stream=stream, **kw) * habs.sqrt()
    if not levy_area:
        return dW
    return dW, keyed_normals(habs.shape[0], start, stop, m, seed, stream=stream + 1, **kw) * (habs / 12).sqrt()


def keyed_draw(draw: Callable[[int, torch.Generator], Tensor], start: int, stop: int, seed: int, *,
               stream: int = STREAM["x0"], block: int = BLOCK, device: torch.device | str = "cpu") -> Tensor:
    """Rows [start, stop) of a per-path draw: draw(n, generator) -> (n, ...) is called once per block with that
    block's generator (on `device`) and n = block, and the rows of [start, stop) are kept, e.g. random initial states
    `keyed_draw(lambda n, gen: sde.prior_sample((n, d), generator=gen), start, stop, seed)`."""
    _check_range(start, stop, block)
    parts = []
    for k in range(start // block, -(-stop // block)):
        rows = draw(block, keyed_generator(seed, stream, k, device))
        if rows.shape[0] != block:
            raise ValueError(f"draw(n, generator) must return n = {block} rows, got shape {tuple(rows.shape)}")
        parts.append(rows[max(start, k * block) - k * block:min(stop, (k + 1) * block) - k * block])
    if not parts:
        raise ValueError("keyed_draw needs a non-empty range of paths (start < stop)")
    return torch.cat(parts)


"""Random draws that give the same numbers on every device, and the seeds of every derived random stream.

A torch.Generator lives on one device; drawing on the generator's device and then moving the result
lets a CPU generator drive a CUDA run reproducibly (equal seeds, equal samples, CPU or GPU).

Every stream of draws that sdekit seeds from a user's seed (a training step, an epoch's data order, a batch of
samples, a fresh data draw for evaluation, ...) takes its seed from `derive_seed(seed, purpose, step)`: one
function, one table of purposes, so that a stream is a pure function of (seed, purpose, step) wherever it is drawn.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["draw", "derive_seed", "SEED_PURPOSES"]

_SEED_RANGE = 2**63 - 1


def _mix(*ints: int) -> int:
    """A seed from several integers (distinct tuples give unrelated streams)."""
    h = 0x9E3779B97F4A7C15
    for i in ints:
        h = ((h ^ (int(i) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 + 0x632BE59BD9B4E019) % (1 << 64)
    return h % _SEED_RANGE


# purpose -> (seed, step, keys) -> seed of that stream. Each derivation is fixed: changing one changes the numbers of
# every run that draws from it (trained weights, samples, reported metrics).
SEED_PURPOSES: dict[str, Callable[[int, int, tuple[int, ...]], int]] = {
    # training: the diffusion times, noise, flips, dequantisation and label dropout of optimisation step `step`
    "train_step": lambda seed, step, keys: seed * 1_000_003 + step * 7_919 + 12_345,
    # training: the permutation of the data in epoch `step`
    "data_order": lambda seed, step, keys: seed * 1_000_003 + step,
    # training: the dropout masks of step `step` (training.KeyedDropout)
    "dropout": lambda seed, step, keys: _mix(seed, step, 1),
    # training: the global RNG while the network runs at step `step`, keys = (micro-batch, rank)
    "network_rng": lambda seed, step, keys: _mix(seed, step, *keys, 2),
    # sampling a run: x_T and the sampler's noise of batch `step`
    "sample_batch": lambda seed, step, keys: seed * 1_000_003 + step,
    # optimised grids: the calibration batch's x_T (and its class labels), a 63-bit hash of the seed, so that no
    # seed a user samples with (nor any sample_batch seed) draws the calibration set in practice
    "grid_calibration": lambda seed, step, keys: _mix(seed, step, 0xC0FFEE, 3),
    # evaluation: the `step`-th fresh draw of a toy data set (references for the samples, a plot's background)
    "fresh_data": lambda seed, step, keys: seed + 101 * (step + 1),
    # the estimators' variance sweep: cell `step` (family, objective, dimension)
    "estimator_cell": lambda seed, step, keys: seed * 100_003 + step,
}


def derive_seed(seed: int, purpose: str, step: int = 0, *keys: int) -> int:
    """The seed, in [0, 2^63 - 1), of the random stream `purpose` (a key of SEED_PURPOSES) at `step` for a user's
    `seed`; keys: further integers a purpose reads (network_rng: micro-batch and rank).

    e.g. torch.Generator().manual_seed(derive_seed(cfg.train.seed, "train_step", step)).
    """
    if purpose not in SEED_PURPOSES:
        raise ValueError(f"unknown seed purpose {purpose!r}; expected one of {sorted(SEED_PURPOSES)}")
    return SEED_PURPOSES[purpose](int(seed), int(step), tuple(int(k) for k in keys)) % _SEED_RANGE


def draw(fn: Callable[..., Tensor], *args, generator: torch.Generator | None = None, device=None, **kwargs) -> Tensor:
    """fn(*args, generator=generator, **kwargs) drawn on the generator's device, returned on `device`.

    e.g. draw(torch.randn, (B, d), generator=gen, dtype=x.dtype, device=x.device).
    """
    draw_on = generator.device if generator is not None else device
    out = fn(*args, generator=generator, device=draw_on, **kwargs)
    return out if device is None else out.to(device)

"""Samplers: plain functions `fn(score_fn, sde, x, ts, *, generator, noise, callback, **options) -> x`.

Each family lives in its own module, written like its paper's algorithm; `SAMPLERS` is the one
registry, and `sample` is the one entry point that draws x_T, builds the time grid, counts network
evaluations (NFE) and checks arguments before any work starts.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data import check_finite
from ..precond import data_prediction
from ..sde import SDE
from .ddim import ddim
from .deis import deis
from .dpm_solver import dpmpp_2m, dpmpp_3m
from .edm import edm
from .grids import GRIDS, make_grid
from .ode import heun, ode_euler, rk4
from .pc import pc, pc_noise_draws
from .reverse_sde import euler_maruyama
from .rk45 import rk45
from .unipc import unipc

__all__ = ["sample", "SAMPLERS", "SamplerSpec", "CountingScore"]


@dataclass(frozen=True)
class SamplerSpec:
    fn: Callable
    default_steps: int | None      # None: adaptive, steps are ignored
    default_grid: str | None = None  # None: the SDE's own default grid (sde.default_grid); else a grid the method is built on
    stochastic: bool = False
    order: float | None = None     # declared convergence order (deterministic samplers, or deterministic settings);
                                   # the accuracy report prints it beside the fitted slope, the tests check it
    noise_draws: Callable[[int, dict], int] = lambda steps, options: steps  # rows of `noise` for `steps` steps
    zero_end: bool = False         # may run on a grid ending at t = 0 (sigma = 0): never evaluates the score there


SAMPLERS: dict[str, SamplerSpec] = {
    "euler_maruyama": SamplerSpec(euler_maruyama, 500, None, stochastic=True, order=0.5, zero_end=True),
    "pc": SamplerSpec(pc, 250, None, stochastic=True,
                      noise_draws=lambda steps, options: pc_noise_draws(steps, options.get("n_corrector", 1))),
    "ode_euler": SamplerSpec(ode_euler, 200, None, order=1.0, zero_end=True),
    "heun": SamplerSpec(heun, 50, None, order=2.0),
    "rk4": SamplerSpec(rk4, 25, None, order=4.0),
    "rk45": SamplerSpec(rk45, None, None, order=5.0),
    "ddim": SamplerSpec(ddim, 100, "log_snr", stochastic=True, order=1.0, zero_end=True),  # deterministic at eta=0
    "dpmpp_2m": SamplerSpec(dpmpp_2m, 25, "log_snr", order=2.0, zero_end=True),
    "dpmpp_3m": SamplerSpec(dpmpp_3m, 20, "log_snr", order=3.0, zero_end=True),
    "unipc": SamplerSpec(unipc, 20, "log_snr", order=4.0, zero_end=True),             # UniP-3 with UniC: order 3 + 1
    "deis": SamplerSpec(deis, 20, "log_snr", order=3.0, zero_end=True),              # tAB-DEIS, order=3
    "edm": SamplerSpec(edm, 32, "edm", stochastic=True, order=2.0, zero_end=True),   # deterministic at S_churn=0
}


class CountingScore:
    """Wraps a score function and counts its evaluations (one batched call is one NFE)."""

    def __init__(self, score_fn: Callable):
        self.score_fn, self.nfe = score_fn, 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.nfe += 1
        return self.score_fn(x, t)


_RESERVED = {"generator", "noise", "callback", "info"}   # passed by sample() itself, never as options


def _check_options(name: str, fn: Callable, options: dict) -> None:
    accepted = {p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY} - _RESERVED
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise TypeError(f"sampler {name!r} got unknown option(s) {unknown}; it accepts {sorted(accepted)}")


def sample(score_fn: Callable, sde: SDE, shape: Sequence[int], sampler: str = "euler_maruyama", steps: int | None = None,
           generator: torch.Generator | None = None, *, x_T: Tensor | None = None, noise: Tensor | None = None,
           ts: Tensor | None = None, grid: str | None = None, grid_cache=None, grid_key=None, to_zero: bool = False,
           denoise: bool = False, return_trajectory: bool = False,
           return_info: bool = False, callback: Callable | None = None, dtype: torch.dtype | None = None,
           device=None, **options):
    """Draw samples by integrating from sde.t_max to sde.t_min.

    score_fn(x: (B, *S), t: (B,)) -> (B, *S), the score grad_x log p_t(x).
    shape: (B, *S). x_T defaults to sde.prior_sample(shape, generator=generator); a given x_T (and noise) must be
    finite (NaN/Inf raise ValueError naming the argument and the first bad index).
    noise: (N, B, *S) standard normals for stochastic samplers (the path is then a deterministic function);
    pc takes N * (1 + n_corrector) rows (predictor, then its correctors, for each step).
    ts: explicit decreasing time grid (N+1,), else `grid` ('uniform', 'log_snr', 'edm') with `steps` steps;
    without either, ddim and the multistep samplers (dpmpp_2m, dpmpp_3m, unipc, deis) use 'log_snr', edm uses 'edm',
    and the samplers that step in t use sde.default_grid ('uniform' for the VP family and VE, 'edm' for EDM).
    grid='optimized': the grid minimising this sampler's error for this score_fn at this number of steps
    (`sdekit.samplers.optimize`: Adam on the grid's log-SNR increments, through the sampler, against an rk45 solution
    on 256 calibration draws of x_T from their own stream, optimize.CALIBRATION_SEED, which no sampling seed draws, so
    score_fn must take a batch of 256: for a score bound to per-sample labels, fit the grid with `optimize_grid` on a
    score of its own and pass its `ts`, as sample.py does); read from / written to the JSON file `grid_cache` (keep
    it next to the run's outputs) under what it was fitted for: a fingerprint of score_fn (its weights, mixture or
    the values its closure reads), the data shape and dtype; computed afresh on every call without one.
    grid_key: a JSON-able name of the model to key the cache with instead of the fingerprint, for a score_fn that
    cannot be fingerprinted (sample() raises FingerprintError naming the part it could not read); the caller then
    answers for the key naming everything the grid depends on.
    to_zero: the grid's last step goes from t_min to t = 0, where sigma = 0 (as k-diffusion's and diffusers' grids
    end), landing on the data prediction; only samplers that never evaluate the score at the grid's last point
    (SamplerSpec.zero_end) accept it, or an explicit ts ending at 0.
    denoise: end with the Tweedie step x0 = (x + sigma^2 score) / alpha at t_min (one extra NFE).
    options: the sampler's own keywords (eta, S_churn, order, variant, lower_order_final, rtol, ...); a keyword the
    sampler does not take is a TypeError naming it and listing the ones it takes.
    Returns x: (B, *S); with return_trajectory, also the (N+1, B, *S) stack of states; with return_info,
    also a dict holding 'nfe' and any sampler statistics.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
    spec = SAMPLERS[sampler]
    _check_options(sampler, spec.fn, options)
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be (B, *S) with positive sizes, got {shape}")
    if grid is not None and grid not in GRIDS and grid != "optimized":
        raise ValueError(f"unknown time grid {grid!r}; expected one of {sorted(GRIDS) + ['optimized']}")
    if grid == "optimized" and (ts is not None or to_zero):
        raise ValueError("grid='optimized' chooses the grid itself: pass neither ts nor to_zero")
    if (grid_cache is not None or grid_key is not None) and grid != "optimized":
        raise ValueError("grid_cache and grid_key only apply with grid='optimized'")
    if to_zero and not spec.zero_end:
        raise ValueError(f"sampler {sampler!r} evaluates the score at the grid's last point, so its grid cannot end at "
                         f"t = 0 (sigma = 0); samplers that can: {sorted(n for n, s in SAMPLERS.items() if s.zero_end)}")
    if to_zero and denoise:
        raise ValueError("denoise=True adds a Tweedie step at the grid's end, which to_zero=True already lands on")
    if x_T is None:
        x_T = sde.prior_sample(shape, generator=generator, dtype=dtype, device=device)
    elif tuple(x_T.shape) != shape:
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
    else:
        check_finite(x_T, "x_T")
    if ts is None:
        if spec.default_steps is None:
            steps = 1  # adaptive: only the end points matter
        steps = spec.default_steps if steps is None else steps
        if grid == "optimized":
            from .optimize import optimized_grid
            found = optimized_grid(score_fn, sde, (256, *shape[1:]), sampler, steps, cache=grid_cache, options=options,
                                   key=grid_key, dtype=x_T.dtype, device=x_T.device)
            ts = found.grid(dtype=x_T.dtype, device=x_T.device)
        else:
            ts = make_grid(grid or spec.default_grid or getattr(sde, "default_grid", "uniform"), sde, steps,
                           dtype=x_T.dtype, device=x_T.device, to_zero=to_zero)
    else:
        ts = torch.as_tensor(ts, dtype=x_T.dtype, device=x_T.device)
        if ts.ndim != 1 or len(ts) < 2 or not bool((ts[1:] < ts[:-1]).all()):
            raise ValueError(f"ts must be a strictly decreasing 1-D grid with at least 2 points, got shape {tuple(ts.shape)}")
    tol = 4 * torch.finfo(ts.dtype).eps  # the grid's ends are t_min/t_max rounded to its dtype
    lo, hi = sde.t_min * (1 - tol) - 1e-12, sde.t_max * (1 + tol) + 1e-12
    ends_at_zero = float(ts[-1]) == 0.0
    if ends_at_zero and not spec.zero_end:
        raise ValueError(f"sampler {sampler!r} evaluates the score at the grid's last point, so its grid cannot end at "
                         f"t = 0 (sigma = 0); samplers that can: {sorted(n for n, s in SAMPLERS.items() if s.zero_end)}")
    if ends_at_zero and denoise:
        raise ValueError("denoise=True adds a Tweedie step at the grid's end, which is already at sigma = 0")
    if float(ts[-1 - ends_at_zero]) < lo or float(ts[0]) > hi:
        raise ValueError(f"time grid [{float(ts[-1])}, {float(ts[0])}] leaves the SDE's interval [{sde.t_min}, {sde.t_max}]")
    if noise is not None:
        if not spec.stochastic:
            raise ValueError(f"sampler {sampler!r} is deterministic and takes no noise")
        draws = spec.noise_draws(len(ts) - 1, options)
        if tuple(noise.shape[1:]) != shape or noise.shape[0] < draws:
            raise ValueError(f"noise for sampler {sampler!r} must have shape ({draws}, {', '.join(map(str, shape))}), "
                             f"got {tuple(noise.shape)}")
        check_finite(noise, "noise")

    counted = CountingScore(score_fn)
    trajectory = [x_T] if return_trajectory else None

    def on_step(i, t, x):
        if trajectory is not None:
            trajectory.append(x)
        if callback is not None:
            callback(i, t, x)

    kwargs = dict(options)
    params = inspect.signature(spec.fn).parameters
    info: dict = {}
    for name, value in (("generator", generator), ("noise", noise), ("callback", on_step), ("info", info)):
        if name in params:
            kwargs[name] = value
    x = spec.fn(counted, sde, x_T, ts, **kwargs)
    if denoise:
        tb = ts[-1].expand(x.shape[0])
        alpha, sigma = sde.marginal(tb)
        x = data_prediction(counted(x, tb), x, alpha, sigma)                # Tweedie
    info["nfe"] = counted.nfe
    out = (x,)
    if return_trajectory:
        out += (torch.stack(trajectory),)
    if return_info:
        out += (info,)
    return out[0] if len(out) == 1 else out

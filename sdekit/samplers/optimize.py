"""Time grids chosen for a model, an SDE, a sampler and a budget: the grid that minimises the sampler's own error.

In the spirit of "Align Your Steps" (Sabour et al. 2024), which fits a grid to a bound on the sampling error,
but minimising the error itself: on a calibration batch of x_T, the typical distance (`typical_error`, the mean
log distance) between the sampler's output on the grid and a high-accuracy probability-flow solution from the
same x_T. The grid keeps its ends (t_max, t_min)
and is parametrised by its increments in lambda = log(alpha / sigma):
    lambda_i = lambda(t_max) + (lambda(t_min) - lambda(t_max)) * cumsum(softmax(theta))_i,
so every theta gives a strictly decreasing grid. theta starts at the sampler's default grid and is optimised by
Adam with the gradient taken through the sampler itself (every sampler here is differentiable in its grid: the
multistep coefficients are float64 tensor arithmetic). The best grid seen is kept, so the result is never worse
than the start on the calibration batch; the gain on other draws of x_T is what the accuracy report measures.

Grids are cached in a JSON file next to a run's outputs (`load_grid`, `save_grid`, `optimized_grid`), keyed by
sampler, steps, options, the SDE's configuration and what the grid was fitted for (`fitted_for`): the model (a
fingerprint of the score function's weights, mixture or closure, `sdekit.samplers.fingerprint`, or a key the caller
names), the data shape and dtype, and the caller's context (sample.py adds the guidance scale, EMA or raw weights
and the checkpoint step). A grid is only ever read back for the same key; a score function that cannot be
fingerprinted for certain is refused (FingerprintError) unless the caller names a key.
`sample(..., grid="optimized", grid_cache=path)` uses it.

Calibration draws come from their own stream: x_T of the calibration batch is drawn with the seed
`derive_seed(seed, "grid_calibration")` (a 63-bit hash of the user's seed, `sdekit.rng`), which no seed a user
samples with equals in practice, so a grid is never evaluated on the draws it was fitted on.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..rng import derive_seed
from ..sde import SDE
from .fingerprint import fingerprint
from .grids import GRIDS, make_grid

__all__ = ["OptimizedGrid", "optimize_grid", "calibration_set_for", "typical_error", "sample_distances",
           "grid_from_theta", "load_grid", "save_grid", "optimized_grid", "fitted_for", "calibration_seed",
           "CALIBRATION_SEED"]


def calibration_seed(seed: int) -> int:
    """The seed of the calibration draws for a user's `seed`: derive_seed(seed, 'grid_calibration')."""
    return derive_seed(seed, "grid_calibration")


CALIBRATION_SEED = calibration_seed(0)     # sample(grid="optimized") and optimize_grid's default


@dataclass
class OptimizedGrid:
    """An optimised grid and what it cost. ts: decreasing, t_max ... t_min (N+1 values)."""
    sampler: str
    steps: int
    options: dict
    sde: dict
    ts: list[float]
    init_grid: str
    loss_init: float               # typical_error (mean log distance to the reference), calibration batch, start grid
    loss: float                    # the same for the optimised grid
    iterations: int
    seconds: float
    nfe: int                       # score evaluations spent (reference, forward passes; backward passes not counted)
    calibration: dict = field(default_factory=dict)
    fitted_for: dict = field(default_factory=dict)   # the model, data shape and dtype, context (see fitted_for())

    def grid(self, dtype=torch.float32, device=None) -> Tensor:
        return torch.tensor(self.ts, dtype=torch.float64).to(dtype=dtype, device=device)


def grid_from_theta(sde: SDE, theta: Tensor) -> Tensor:
    """The float64 grid (N+1,) from t_max to t_min whose lambda-increments are softmax(theta) of the whole range."""
    ends = torch.tensor([sde.t_max, sde.t_min], dtype=torch.float64)
    lam0, lam1 = (0.5 * sde.log_snr(ends)).unbind()
    frac = torch.cumsum(torch.softmax(theta.to(torch.float64), 0), 0)[:-1]
    inner = sde.t_from_log_snr(2 * (lam0 + (lam1 - lam0) * frac))
    return torch.cat([ends[:1], inner, ends[1:]])


def _theta_from_grid(sde: SDE, ts: Tensor) -> Tensor:
    lam = 0.5 * sde.log_snr(ts.to(torch.float64))
    return torch.log(torch.diff(lam).clamp_min(1e-12))


CACHE_VERSION = 3     # 1: mean distance; 2: typical_error; 3: keyed by what the grid was fitted for (fitted_for)


def _key(sampler: str, steps: int, options: dict, sde_config: dict, fitted: dict) -> dict:
    return dict(sampler=sampler, steps=int(steps), options=_plain(options), sde=_plain(sde_config),
                fitted_for=_plain(fitted))


def _plain(value):
    """value as JSON reads it back (tuples -> lists, keys sorted), so that keys compare equal after a round trip."""
    return json.loads(json.dumps(value, sort_keys=True))


def fitted_for(score_fn: Callable, shape: Sequence[int], dtype: torch.dtype, key=None, **context) -> dict:
    """What a grid is fitted for: {'model': {'fingerprint': sha256 of score_fn} or {'key': key}, 'data_shape': S,
    'dtype': ..., **context}. key: a JSON-able name of the model given by the caller, used instead of the
    fingerprint (for a score function that cannot be fingerprinted); context: anything else the grid depends on
    that the score function does not show (guidance scale, EMA or raw weights, checkpoint step).
    Raises FingerprintError when key is None and score_fn cannot be fingerprinted for certain."""
    model = {"key": _plain(key)} if key is not None else {"fingerprint": fingerprint(score_fn)}
    return dict(model=model, data_shape=[int(s) for s in tuple(shape)[1:]], dtype=str(dtype).replace("torch.", ""),
                **_plain(context))


def optimize_grid(score_fn: Callable, sde: SDE, shape: Sequence[int], sampler: str, steps: int, *,
                  options: dict | None = None, init_grid: str | None = "best", iterations: int = 60, lr: float = 0.1,
                  reference_tol: float | None = None, dtype: torch.dtype | None = None, device=None,
                  seed: int = CALIBRATION_SEED,
                  calibration_set: tuple[Tensor, Tensor] | None = None, progress: bool = False) -> OptimizedGrid:
    """Optimise the `steps`-step grid of `sampler` for score_fn under sde on a calibration batch.

    shape: (B, *S), the calibration batch (B = 256 is plenty for a 2-D mixture); x_T is drawn from
    sde.prior_sample with a generator seeded by `seed` (the user's generator is not touched; default
    CALIBRATION_SEED, a stream no sampling seed draws from: pass calibration_seed(user_seed) to derive one).
    options: the sampler's keywords (as for sample()); init_grid: the start, a name of GRIDS, or 'best' (the default):
    the one of them with the least calibration error (so the result is never worse than any fixed grid there).
    reference_tol: rtol = atol of the rk45 reference (default 1e-7 in float64, 1e-5 in lower precision, where 1e-7
    is at the round-off and makes rk45 crawl). Cost: the reference, then `iterations` forward and backward
    passes of the sampler (about 3 x steps NFE each).
    calibration_set: (x_T, reference) of `shape`, e.g. from `calibration_set`, to share one reference between
    several optimisations (then seed and reference_tol are not used, and nfe counts no reference).
    """
    from . import SAMPLERS, CountingScore, _check_options
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
    spec = SAMPLERS[sampler]
    if spec.default_steps is None or spec.stochastic and not _deterministic(sampler, options or {}):
        raise ValueError(f"optimize_grid: {sampler!r} with options {options or {}} is not a deterministic fixed-step "
                         "sampler")
    options = dict(options or {})
    _check_options(sampler, spec.fn, options)
    if not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an integer >= 0, got {iterations!r}")
    t0 = time.perf_counter()
    dtype = dtype or torch.get_default_dtype()
    shape = tuple(int(s) for s in shape)
    counted = CountingScore(score_fn)
    if reference_tol is None:
        reference_tol = 1e-7 if dtype == torch.float64 else 1e-5
    if calibration_set is None:
        x_T, ref = calibration_set_for(counted, sde, shape, reference_tol, dtype, device, seed)
    else:
        x_T, ref = calibration_set
        if tuple(x_T.shape) != shape or tuple(ref.shape) != shape:
            raise ValueError(f"calibration_set must be (x_T, reference) of shape {shape}, got "
                             f"{tuple(x_T.shape)}, {tuple(ref.shape)}")

    def loss_of(th: Tensor) -> Tensor:
        ts = grid_from_theta(sde, th).to(dtype=dtype, device=x_T.device)
        x = spec.fn(counted, sde, x_T, ts, **options)
        return typical_error(x, ref)

    if init_grid in (None, "best"):     # start from the fixed grid of least calibration error: never worse than it
        with torch.no_grad():
            init_grid = min(GRIDS, key=lambda g: float(loss_of(_theta_from_grid(sde, make_grid(g, sde, steps,
                                                                                                dtype=torch.float64)))))
    elif init_grid not in GRIDS:
        raise ValueError(f"init_grid must be one of {sorted(GRIDS)} or 'best', got {init_grid!r}")
    theta = _theta_from_grid(sde, make_grid(init_grid, sde, steps, dtype=torch.float64)).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)

    with torch.enable_grad():                              # also under a caller's torch.no_grad()
        best_loss, best_theta, loss_init = _adam(loss_of, theta, opt, iterations, sampler, steps, progress)
    ts = grid_from_theta(sde, best_theta)
    return OptimizedGrid(sampler=sampler, steps=int(steps), options=options, sde=sde.config(), ts=ts.tolist(),
                         init_grid=init_grid, loss_init=float(loss_init), loss=float(best_loss), iterations=iterations,
                         seconds=time.perf_counter() - t0, nfe=counted.nfe,
                         calibration=dict(batch=shape[0], shape=list(shape), seed=seed,
                                          dtype=str(dtype).replace("torch.", ""),
                                          reference=f"rk45 rtol=atol={reference_tol:g}", lr=lr))


def typical_error(x: Tensor, ref: Tensor) -> Tensor:
    """The calibration objective: the mean over samples of log |x - ref| (the log of the geometric mean distance).
    A typical sample's error: the few trajectories a coarse grid sends to another mode (distance of the order of
    the mode spacing) would dominate a plain mean and pull the grid towards them; a log weighs every sample's
    relative improvement alike (on 25 tight modes this gave 5-9x lower median error at 15-20 NFE than the mean)."""
    d = sample_distances(x, ref)
    return torch.log(d.clamp_min(torch.finfo(d.dtype).tiny)).mean()


def sample_distances(x: Tensor, ref: Tensor) -> Tensor:
    """(B,) Euclidean distance of each sample x[b] (B, *S) to ref[b]."""
    return (x - ref).reshape(x.shape[0], -1).norm(dim=1)


def calibration_set_for(score_fn: Callable, sde: SDE, shape: Sequence[int], reference_tol: float = 1e-7,
                        dtype: torch.dtype | None = None, device=None, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(x_T, rk45 solution at t_min from it), both `shape`: x_T drawn with a generator seeded by `seed`."""
    from . import sample
    shape = tuple(int(s) for s in shape)
    x_T = sde.prior_sample(shape, generator=torch.Generator().manual_seed(seed),
                           dtype=dtype or torch.get_default_dtype())
    x_T = x_T.to(device)
    with torch.no_grad():
        return x_T, sample(score_fn, sde, shape, "rk45", x_T=x_T, rtol=reference_tol, atol=reference_tol)


def _adam(loss_of, theta, opt, iterations, sampler, steps, progress):
    """Adam on theta; returns (best loss, its theta, the starting loss)."""
    best_loss, best_theta, loss_init = math.inf, theta.detach().clone(), None
    for it in range(iterations + 1):
        loss = loss_of(theta)
        value = float(loss.detach())
        if loss_init is None:
            loss_init = value
        if math.isfinite(value) and value < best_loss:
            best_loss, best_theta = value, theta.detach().clone()
        if it == iterations:
            break
        # the gradient with respect to the grid alone: a network's own parameters get no .grad from this
        theta.grad, = torch.autograd.grad(loss, theta)
        if not torch.isfinite(theta.grad).all():
            break
        opt.step()
        if progress:
            print(f"optimize_grid {sampler} {steps} steps: iteration {it + 1}/{iterations} loss {value:.4e}",
                  flush=True)
    return best_loss, best_theta, loss_init


def _deterministic(sampler: str, options: dict) -> bool:
    return (sampler == "ddim" and options.get("eta", 0.0) == 0.0) or \
        (sampler == "edm" and options.get("S_churn", 0.0) == 0.0)


def load_grid(path: str | os.PathLike, sampler: str, steps: int, sde: SDE, options: dict | None = None, *,
              fitted: dict) -> OptimizedGrid | None:
    """The cached grid for (sampler, steps, options, sde, fitted) in the JSON file at path, or None.
    fitted: what the grid must have been fitted for (`fitted_for`)."""
    path = Path(path)
    if not path.exists():
        return None
    key = _key(sampler, steps, options or {}, sde.config(), fitted)
    cached = json.loads(path.read_text())
    if cached.get("version") != CACHE_VERSION:      # optimised for another objective: optimise again
        return None
    for entry in cached.get("grids", []):
        if all(entry.get(k) == v for k, v in key.items()):
            return OptimizedGrid(**entry)
    return None


def save_grid(path: str | os.PathLike, result: OptimizedGrid) -> None:
    """Add (or replace) result in the JSON cache at path, written atomically."""
    path = Path(path)
    cached = json.loads(path.read_text()) if path.exists() else {}
    grids = cached.get("grids", []) if cached.get("version") == CACHE_VERSION else []
    if not result.fitted_for:
        raise ValueError("save_grid: the grid does not say what it was fitted for (OptimizedGrid.fitted_for, see "
                         "fitted_for())")
    key = _key(result.sampler, result.steps, result.options, result.sde, result.fitted_for)
    grids = [g for g in grids if not all(g.get(k) == v for k, v in key.items())] + [asdict(result)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"version": CACHE_VERSION, "grids": grids}, indent=1))
    os.replace(tmp, path)


def optimized_grid(score_fn: Callable, sde: SDE, shape: Sequence[int], sampler: str, steps: int, *,
                   cache: str | os.PathLike | None = None, options: dict | None = None, key=None,
                   context: dict | None = None, **kwargs) -> OptimizedGrid:
    """The cached grid if `cache` holds one for (sampler, steps, options, sde) fitted for this model, data shape,
    dtype and context (`fitted_for(score_fn, shape, dtype, key, **context)`), else optimize_grid (saved to cache).
    With a cache, a score function that cannot be fingerprinted needs key= (FingerprintError before any work)."""
    dtype = kwargs.get("dtype") or torch.get_default_dtype()
    fitted = fitted_for(score_fn, shape, dtype, key, **(context or {})) if cache is not None or key is not None else {}
    if cache is not None:
        found = load_grid(cache, sampler, steps, sde, options, fitted=fitted)
        if found is not None:
            return found
    result = optimize_grid(score_fn, sde, shape, sampler, steps, options=options, **kwargs)
    result.fitted_for = fitted
    if cache is not None:
        save_grid(cache, result)
    return result

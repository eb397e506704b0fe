"""The low-NFE frontier: sdekit's deterministic samplers against diffusers' and k-diffusion's on one exact oracle.

Every library integrates the probability-flow ODE of the same VP SDE (linear beta, t from 1 to 1e-3) driven by the
same exact Gaussian-mixture score, from the same 1024 draws of x_T, and is scored by the median over them of the
distance to a float64 rk45 solution at rtol = atol = 1e-11 from the same x_T. For each NFE budget, each library's
best sampler and grid (among the ones it recommends) is reported, and the ratio sdekit-best / peer-best.

Wiring (`sdekit.interop.diffusers.run_scheduler`, `sdekit.interop.kdiffusion.run_sampler`):
- diffusers schedulers get `trained_betas` for which alphas_cumprod[k] = alpha(t_k)^2 at t_k = t_min + k (t_max -
  t_min) / 999 (k = 0..999), so timestep 999 is t_max, and `final_sigmas_type="sigma_min"` (DDIM:
  set_alpha_to_one=False; DEIS ends there by itself) so the last step lands on t_min, where the reference is. The model is evaluated at the
  noise level the scheduler's update assumes (its sigmas[i], or the timestep's alpha for DDIM), as eps = -sigma score:
  this removes the rounding of Karras/Lu timesteps to integers, which would otherwise count against diffusers.
  Samples are float64 (diffusers keeps its own schedule tables in float32).
- k-diffusion's samplers get the denoiser D(x / alpha; sigma) with sigma = sigma_t / alpha_t, started from
  x_T / alpha(t_max), on its grids (Karras rho = 7, exponential, its VP grid) from sigma(t_max) to sigma(t_min)
  (the appended 0 dropped), and their result is multiplied back by alpha(t_min). k-diffusion's package __init__
  imports torchvision, scikit-image and clean-fid; when that import fails, its `sampling` module (which needs
  torch, scipy, torchsde, torchdiffeq and utils.append_dims) is loaded on its own.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ..data import EXACT_MIXTURES, GaussianMixture
from ..sde import SDE, VPSDE
from . import CountingScore, sample
from .optimize import calibration_seed, calibration_set_for, optimize_grid, sample_distances

__all__ = ["run_frontier", "compare_samplers", "scorer", "median_distance", "random_mixture", "frontier_mixture", "sdekit_rows",
           "diffusers_rows", "kdiffusion_rows",
           "SDEKIT_CANDIDATES", "BUDGETS", "frontier_markdown"]

BUDGETS = (5, 10, 15, 20)
SDEKIT_GRIDS = ("uniform", "log_snr", "edm")
# (label, sampler, options): sdekit's deterministic fixed-step samplers
SDEKIT_CANDIDATES = [
    ("ode_euler", "ode_euler", {}), ("heun", "heun", {}), ("rk4", "rk4", {}), ("ddim", "ddim", {}),
    ("dpmpp_2m", "dpmpp_2m", {}), ("dpmpp_3m", "dpmpp_3m", {}), ("unipc bh2", "unipc", {}),
    ("unipc bh1", "unipc", {"variant": "bh1"}), ("unipc bh2 p=2", "unipc", {"order": 2}),
    ("deis", "deis", {}), ("deis o4", "deis", {"order": 4}),
    ("deis tAB", "deis", {"basis": "t", "lower_order_final": True}),
    ("edm (S_churn=0)", "edm", {}),
]
# samplers whose grids are optimised (the budgets' leaders among the multistep samplers)
OPTIMIZED = [("unipc bh2", "unipc", {}), ("dpmpp_3m", "dpmpp_3m", {}), ("dpmpp_2m", "dpmpp_2m", {}),
             ("deis", "deis", {})]


def median_distance(x: Tensor, ref: Tensor) -> float:
    """The frontier's error: the median over samples of the distance to the reference from the same x_T."""
    return float(sample_distances(x, ref).median())


def _nfe_per_step(name: str, options: dict) -> int:
    return {"heun": 2, "rk4": 4, "edm": 2}.get(name, 1)


Metric = Callable[[Tensor], float]     # samples (B, *S) -> error (lower is better)
Scorer = Callable[[Tensor], dict]      # samples -> {"error": ..., other measures}: what a row records


def scorer(metric: Metric, extras: dict[str, Metric] | None = None) -> Scorer:
    """{'error': metric(x), name: extra(x)...}, every entry NaN when x has a non-finite value."""
    extras = extras or {}

    def scores(x: Tensor) -> dict:
        if not bool(torch.isfinite(x).all()):
            return {"error": float("nan"), **{k: float("nan") for k in extras}}
        return {"error": metric(x), **{k: f(x) for k, f in extras.items()}}
    return scores


def sdekit_rows(score: Callable, sde: SDE, x_T: Tensor, scores: Scorer, budgets=BUDGETS,
                candidates=None, grids=SDEKIT_GRIDS) -> list[dict]:
    """Every candidate (label, sampler, options) on every fixed grid at every budget, scored by `scores`."""
    rows = []
    for label, name, options in candidates or SDEKIT_CANDIDATES:
        for grid in grids:
            for budget in budgets:
                steps = budget // _nfe_per_step(name, options)
                if steps < 1:
                    continue
                x, info = sample(score, sde, tuple(x_T.shape), name, steps=steps, grid=grid, x_T=x_T, return_info=True,
                                 **options)
                rows.append(dict(library="sdekit", sampler=label, grid=grid, budget=budget, steps=steps, nfe=info["nfe"],
                                 **scores(x)))
    return rows


# --- diffusers -------------------------------------------------------------------------------------------------------
DIFFUSERS_CONFIGS = [
    # (label, scheduler class name, config, grid label)
    ("DPM++ 2M", "DPMSolverMultistepScheduler", dict(solver_order=2, algorithm_type="dpmsolver++"), "default"),
    ("DPM++ 2M", "DPMSolverMultistepScheduler", dict(solver_order=2, algorithm_type="dpmsolver++", use_karras_sigmas=True), "karras"),
    ("DPM++ 2M", "DPMSolverMultistepScheduler", dict(solver_order=2, algorithm_type="dpmsolver++", use_lu_lambdas=True), "lu"),
    ("DPM++ 3M", "DPMSolverMultistepScheduler", dict(solver_order=3, algorithm_type="dpmsolver++"), "default"),
    ("DPM++ 3M", "DPMSolverMultistepScheduler", dict(solver_order=3, algorithm_type="dpmsolver++", use_karras_sigmas=True), "karras"),
    ("DPM++ 3M", "DPMSolverMultistepScheduler", dict(solver_order=3, algorithm_type="dpmsolver++", use_lu_lambdas=True), "lu"),
    ("UniPC bh2", "UniPCMultistepScheduler", dict(solver_order=3, solver_type="bh2"), "default"),
    ("UniPC bh2", "UniPCMultistepScheduler", dict(solver_order=3, solver_type="bh2", use_karras_sigmas=True), "karras"),
    ("UniPC bh1", "UniPCMultistepScheduler", dict(solver_order=3, solver_type="bh1"), "default"),
    ("UniPC bh1", "UniPCMultistepScheduler", dict(solver_order=3, solver_type="bh1", use_karras_sigmas=True), "karras"),
    ("DEIS-3", "DEISMultistepScheduler", dict(solver_order=3), "default"),
    ("DEIS-3", "DEISMultistepScheduler", dict(solver_order=3, use_karras_sigmas=True), "karras"),
    ("DDIM", "DDIMScheduler", dict(set_alpha_to_one=False, timestep_spacing="trailing", clip_sample=False), "trailing"),
]


def diffusers_rows(score: Callable, sde: SDE, x_T: Tensor, scores: Scorer, budgets=BUDGETS) -> list[dict]:
    from ..interop.diffusers import run_scheduler
    rows = []
    for label, cls_name, config, grid in DIFFUSERS_CONFIGS:
        for budget in budgets:
            x, nfe = run_scheduler(cls_name, config, score, sde, x_T, budget)
            rows.append(dict(library="diffusers", sampler=label, grid=grid, budget=budget, steps=budget, nfe=nfe,
                             **scores(x)))
    return rows


# --- k-diffusion ------------------------------------------------------------------------------------------------------
KDIFFUSION_SAMPLERS = [  # (label, sampler name, NFE per step, options)
    ("euler", "euler", 1, {}), ("heun", "heun", 2, {}), ("dpm_2", "dpm_2", 2, {}), ("lms", "lms", 1, {}),
    ("dpmpp_2m", "dpmpp_2m", 1, {}),
    ("dpmpp_3m (sde, eta=0)", "dpmpp_3m_sde", 1, {"eta": 0.0, "noise_sampler": lambda *a: None}),
]


def kdiffusion_rows(score: Callable, sde: SDE, x_T: Tensor, scores: Scorer, budgets=BUDGETS) -> list[dict]:
    from ..interop.kdiffusion import run_sampler, sigmas
    grids = ["karras", "exponential"]
    if isinstance(sde, VPSDE) and sde.schedule == "linear" and sde.t_max == 1.0:
        grids.append("vp")
    rows = []
    for budget in budgets:
        for label, name, per_step, options in KDIFFUSION_SAMPLERS:
            steps = budget // per_step
            if steps < 1:
                continue
            for grid in grids:
                x, nfe = run_sampler(name, score, sde, x_T, sigmas(grid, sde, steps), **options)
                rows.append(dict(library="k-diffusion", sampler=label, grid=grid, budget=budget, steps=steps, nfe=nfe,
                                 **scores(x)))
        x, nfe = run_sampler("dpm_fast", score, sde, x_T, steps=budget)
        rows.append(dict(library="k-diffusion", sampler="dpm_fast", grid="dpm-solver", budget=budget, steps=budget,
                         nfe=nfe, **scores(x)))
    return rows


# --- the report -------------------------------------------------------------------------------------------------------
def _variance_preserving(sde: SDE) -> bool:
    from ..interop.diffusers import check_variance_preserving
    try:
        check_variance_preserving(sde)
    except ValueError:
        return False
    return True


def _best(rows: list[dict], library: str, budget: int) -> dict | None:
    cands = [r for r in rows if r["library"] == library and r["budget"] == budget and r["nfe"] <= budget
             and np.isfinite(r["error"])]
    return min(cands, key=lambda r: r["error"]) if cands else None


def random_mixture(dim: int, n_modes: int, seed: int) -> GaussianMixture:
    """A float64 mixture the report was not tuned on: n_modes means ~ N(0, 1.5^2 I) in `dim` dimensions, covariances
    A A^T + 0.05 I with A ~ N(0, 0.3^2), weights uniform on [0.2, 1.2] normalised; drawn from `seed`."""
    if dim < 1 or n_modes < 1:
        raise ValueError(f"random mixture needs dim >= 1 and n_modes >= 1, got {dim}, {n_modes}")
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n_modes, dim, generator=g, dtype=torch.float64) * 1.5
    a = torch.randn(n_modes, dim, dim, generator=g, dtype=torch.float64) * 0.3
    covs = a @ a.transpose(1, 2) + 0.05 * torch.eye(dim, dtype=torch.float64)
    w = torch.rand(n_modes, generator=g, dtype=torch.float64) + 0.2
    return GaussianMixture(means, covs, w / w.sum())


def frontier_mixture(name: str) -> GaussianMixture:
    """'default' (the accuracy report's three anisotropic modes), a name of EXACT_MIXTURES, or 'random:D,K,S'
    (random_mixture(D, K, S)); float64."""
    from .report import default_mixture

    if name == "default":
        return default_mixture()
    if name in EXACT_MIXTURES:
        return EXACT_MIXTURES[name]().to(torch.float64)
    if name.startswith("random:"):
        try:
            dim, n_modes, seed = (int(v) for v in name[len("random:"):].split(","))
        except ValueError:
            raise ValueError(f"a random mixture is 'random:D,K,S' (dimension, modes, seed), got {name!r}") from None
        return random_mixture(dim, n_modes, seed)
    raise ValueError(f"unknown mixture {name!r}; expected 'default', one of {sorted(EXACT_MIXTURES)} or 'random:D,K,S'")


def run_frontier(budgets=BUDGETS, batch: int = 1024, seed: int = 0, mixture: str = "default", peers: bool = True,
                 optimized: bool = True, calibration_batch: int = 256, iterations: int = 60,
                 progress: bool = False) -> dict:
    """Every library's samplers at each NFE budget on an exact mixture; returns the JSON-ready dict with rows, best
    rows per budget and library, the ratios sdekit-best / peer-best, the optimised grids' cost, and which peers were
    measured (a peer that is not installed is listed under 'skipped' with the reason). mixture: see frontier_mixture."""
    sde = VPSDE()
    gmm = frontier_mixture(mixture)
    score = gmm.score_fn(sde)
    x_T = sde.prior_sample((batch, gmm.dim), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = sample(score, sde, (batch, gmm.dim), "rk45", x_T=x_T, rtol=1e-11, atol=1e-11)
    result = compare_samplers(score, sde, x_T, lambda x: median_distance(x, ref), budgets, peers=peers,
                              calibration=(score, calibration_batch, iterations, calibration_seed(seed), 1e-7) if optimized else None,
                              progress=progress)
    result["config"] = dict(sde=sde.config(), mixture=mixture, batch=batch, seed=seed, budgets=list(budgets),
                            reference="rk45 float64 rtol=atol=1e-11 from the same x_T",
                            metric="median over x_T of the distance to the reference",
                            calibration=dict(batch=calibration_batch, seed=calibration_seed(seed), iterations=iterations))
    return result


def compare_samplers(score: Callable, sde: SDE, x_T: Tensor, metric: Metric, budgets=BUDGETS, *, peers: bool = True,
                     extras: dict[str, Metric] | None = None, candidates=None, grids=SDEKIT_GRIDS, calibration: tuple | None = None,
                     progress: bool = False) -> dict:
    """sdekit's candidates on its fixed grids (and optimised ones), diffusers' and k-diffusion's samplers on theirs,
    all from the same x_T (B, *S) and scored by metric (the 'error' that ranks them) and by each of `extras` (recorded
    beside it); the best per budget and library and the ratios.

    calibration: (score for the calibration batch, its size, Adam iterations, seed, rk45 tolerance of its reference)
    to optimise the grids of OPTIMIZED (a calibration batch differs from x_T), or None for fixed grids only."""
    say = (lambda m: print(m, flush=True)) if progress else (lambda m: None)
    t0 = time.perf_counter()
    scores = scorer(metric, extras)
    rows = sdekit_rows(score, sde, x_T, scores, budgets, candidates, grids)
    say(f"sdekit: {len(rows)} runs in {time.perf_counter() - t0:.1f}s")
    optimized, reference_cost = [], None
    if calibration is not None:
        calib_score, calib_batch, iterations, calib_seed, tol = calibration
        t0 = time.perf_counter()
        counted = CountingScore(calib_score)
        calib = calibration_set_for(counted, sde, (calib_batch, *x_T.shape[1:]), tol, x_T.dtype, x_T.device,
                                    calib_seed)            # one reference for every optimisation
        reference_cost = dict(seconds=time.perf_counter() - t0, nfe=counted.nfe, rtol=tol, batch=calib_batch)
        say(f"calibration reference: {reference_cost['seconds']:.1f}s, {counted.nfe} NFE")
        for label, name, options in OPTIMIZED:
            for budget in budgets:
                r = optimize_grid(calib_score, sde, (calib_batch, *x_T.shape[1:]), name, budget, options=options,
                                  iterations=iterations, dtype=x_T.dtype, device=x_T.device, calibration_set=calib)
                with torch.no_grad():
                    x, info = sample(score, sde, tuple(x_T.shape), name, ts=r.grid(x_T.dtype, x_T.device), x_T=x_T,
                                     return_info=True, **options)
                rows.append(dict(library="sdekit", sampler=label, grid="optimized", budget=budget, steps=budget,
                                 nfe=info["nfe"], **scores(x)))
                start = [q["error"] for q in rows if q["library"] == "sdekit" and q["sampler"] == label
                         and q["grid"] == r.init_grid and q["budget"] == budget]
                optimized.append(dict(sampler=label, budget=budget, seconds=r.seconds, nfe=r.nfe,
                                      iterations=r.iterations, calibration_loss_init=r.loss_init,
                                      calibration_loss=r.loss, init_grid=r.init_grid,
                                      test_error_init=start[0] if start else None, test_error=rows[-1]["error"],
                                      ts=r.ts))
                say(f"optimized {label} {budget}: {optimized[-1]['test_error_init'] or float('nan'):.3g} -> "
                    f"{optimized[-1]['test_error']:.3g} ({r.seconds:.1f}s)")
    measured, skipped = ["sdekit"], {}
    if peers:
        for lib, fn in (("diffusers", diffusers_rows), ("k-diffusion", kdiffusion_rows)):
            if lib == "diffusers" and not _variance_preserving(sde):
                skipped[lib] = f"its schedulers are variance-preserving and {type(sde).__name__} is not"
                continue
            try:
                t0 = time.perf_counter()
                rows += fn(score, sde, x_T, scores, budgets)
                measured.append(lib)
                say(f"{lib}: {time.perf_counter() - t0:.1f}s")
            except ImportError as e:
                skipped[lib] = str(e)
    best, ratios = {}, {}
    for budget in budgets:
        best[budget] = {lib: _best(rows, lib, budget) for lib in measured}
        peer = [b for lib, b in best[budget].items() if lib != "sdekit" and b is not None]
        if peer and best[budget]["sdekit"] is not None:
            ratios[budget] = best[budget]["sdekit"]["error"] / min(b["error"] for b in peer)
        # sdekit's best on the fixed (not optimised) grids, for the recommendation without calibration
        fixed = [r for r in rows if r["library"] == "sdekit" and r["grid"] != "optimized"]
        best[budget]["sdekit (fixed grids)"] = _best(fixed, "sdekit", budget)
    return dict(rows=rows, best={str(k): v for k, v in best.items()}, ratios={str(k): v for k, v in ratios.items()},
                optimized_grids=optimized, calibration_reference=reference_cost, peers_measured=measured[1:], peers_skipped=skipped,
                versions=_versions(measured))


def _versions(libs) -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for lib in libs:
        if lib == "sdekit":
            continue
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = "unknown"
    return out


def frontier_markdown(result: dict, fmt: str = ".1e") -> str:
    """The per-budget table: each library's best (sampler, grid, error) and the ratio sdekit-best / peer-best;
    with a 'reference' (compare_samplers_on_run), a last row for it."""
    libs = ["sdekit", "sdekit (fixed grids)"] + result["peers_measured"]
    lines = [f"| NFE | {' | '.join(libs)} | sdekit / best peer | sdekit (fixed grids) / best peer |",
             "|---:|" + "---|" * len(libs) + "---:|---:|"]
    for budget in result["config"]["budgets"]:
        best = result["best"][str(budget)]
        cells = []
        for lib in libs:
            b = best.get(lib)
            fd = f", FD {b['fd']:.1f}" if b is not None and "fd" in b else ""
            cells.append("n/a" if b is None else f"{b['error']:{fmt}} ({b['sampler']}, {b['grid']}{fd})")
        peer = [best[lib]["error"] for lib in result["peers_measured"] if best.get(lib)]
        ratio = f"{best['sdekit']['error'] / min(peer):.2f}" if peer else "n/a"
        ratio_fixed = f"{best['sdekit (fixed grids)']['error'] / min(peer):.2f}" if peer else "n/a"
        lines.append(f"| {budget} | {' | '.join(cells)} | {ratio} | {ratio_fixed} |")
    ref = result.get("reference")
    if ref:
        lines.append(f"| {ref['nfe']} | {ref['error']:{fmt}} ({ref['sampler']}, reference, FD {ref['fd']:.1f}) |"
                     + " |" * (len(libs) + 1))
    return "\n".join(lines) + "\n"

"""Sampling a trained run: its samples drawn in seeded batches (on one process or several), and their evaluation.

`draw_samples` draws cfg.sample.n_samples samples, batch b from a generator seeded by (sample.seed, b), so that
N processes draw the same set as one; `gather_batches` reassembles them. `evaluate_toy` scores 2-D samples against
fresh data; `evaluate_images` scores images: the memorisation measure (nearest-neighbour distances to the
training split against the held-out split's, sdekit.image_metrics.memorisation), for digits also the classifier
Frechet distance against the held-out and the training split and class accuracy when sampling is conditional;
`held_out_bpd` gives bits/dim on held-out images. `sdekit sample` (sdekit.commands.sample) writes them out.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor

from .config import Config, ConfigError
from .data import EXACT_MIXTURES, load_dataset
from .guidance import guided_score
from .metrics import mmd, mode_weight_error, mode_weights, sliced_wasserstein
from .rng import derive_seed
from .samplers import sample

__all__ = ["draw_samples", "gather_batches", "TOY_TARGETS", "evaluate_toy", "eval_cache_dir", "evaluate_images", "image_splits",
           "held_out_bpd",
           "sample_labels", "conditioning_labels", "compare_samplers_on_run", "RUN_CANDIDATES"]


def conditioning_labels(labels: Tensor | None, guidance: float | None) -> Tensor | None:
    """The labels the samples were really conditioned on: None for unconditional sampling (no labels, or guidance 0,
    which is the unconditional model exactly), so that no class accuracy is scored against unused labels."""
    return None if labels is None or guidance == 0 else labels


def sample_labels(score_fn, n: int) -> Tensor | None:
    """Classes 0, 1, ..., K-1, 0, 1, ... (n,) for a class-conditional denoiser (K = net.num_classes), else None."""
    k = getattr(getattr(score_fn, "net", None), "num_classes", None)
    return None if k is None else torch.arange(n) % k


def draw_samples(score_fn, sde, cfg: Config, data_shape: tuple[int, ...], progress: bool = True,
                 rank: int = 0, world: int = 1, labels: Tensor | None = None,
                 grid_cache: str | Path | None = None, grid_context: dict | None = None) -> tuple[Tensor, dict]:
    """cfg.sample.n_samples samples (N, *S) in batches, batch b drawn with the generator seeded by (seed, b).

    With world > 1, this process draws batches b = rank, rank + world, ... and the result has only those
    (concatenated in batch order); `gather_batches` reassembles the full set, identical to one process.
    labels: (N,) classes for a class-conditional denoiser, sampled with classifier-free guidance at scale
    cfg.sample.guidance (null: 1, the conditional model); None samples the unconditional model.
    grid_cache: the JSON file holding optimised grids (sample.grid = optimized), kept with the run; the grid is
    optimised once, on a calibration batch of its own (x_T and labels from derive_seed(seed, 'grid_calibration'), a
    stream no sample batch draws), and read back for every later batch and process. It is keyed by the weights'
    fingerprint, the guidance scale, EMA or raw weights, the data shape and dtype, and `grid_context` (sdekit sample
    passes the checkpoint and its step): a grid fitted for other settings is never reused.
    """
    from tqdm.auto import tqdm

    sc = cfg.sample
    out, nfe, start = [], 0, time.perf_counter()
    device = _device_of(score_fn)
    if labels is None and sc.guidance is not None:
        raise ConfigError("sample.guidance needs a class-conditional model (model.options.num_classes)")
    mine = list(range(rank, -(-sc.n_samples // sc.batch_size), world))
    ts = None
    if sc.grid == "optimized":       # fitted once, on a calibration batch of its own, before any batch is drawn
        ts = _optimized_grid(score_fn, sde, sc, data_shape, labels is not None, device, grid_cache, grid_context)
    for b in tqdm(mine, desc="sample", disable=not progress or len(mine) == 1):
        n = min(sc.batch_size, sc.n_samples - b * sc.batch_size)
        gen = torch.Generator().manual_seed(derive_seed(sc.seed, "sample_batch", b))
        x_T = sde.prior_sample((n, *data_shape), generator=gen)
        fn = score_fn
        if labels is not None:
            fn = guided_score(score_fn, labels[b * sc.batch_size:b * sc.batch_size + n].to(device),
                              1.0 if sc.guidance is None else sc.guidance)
        with torch.no_grad():
            grid = dict(steps=sc.steps, grid=sc.grid) if ts is None else dict(ts=ts)
            x, info = sample(fn, sde, (n, *data_shape), sampler=sc.sampler, generator=gen, x_T=x_T.to(device),
                             denoise=sc.denoise, return_info=True, **grid, **sc.options)
        out.append(x.cpu())
        nfe = info["nfe"]
    local = torch.cat(out) if out else torch.empty((0, *data_shape))
    timing = {"nfe_per_sample": nfe, "seconds": time.perf_counter() - start, "processes": world}
    if labels is not None:
        timing["guidance"] = 1.0 if sc.guidance is None else sc.guidance
    return local, timing


def _optimized_grid(score_fn, sde, sc, data_shape: tuple[int, ...], conditional: bool, device,
                    grid_cache: str | Path | None, grid_context: dict | None = None) -> Tensor:
    """The grid of sample.grid = optimized: read from grid_cache, else fitted on CALIBRATION_BATCH draws of x_T (with
    classes of their own for a conditional model, at the sampling guidance) from the calibration stream of sc.seed,
    and saved there under the model's fingerprint and the settings it was fitted for."""
    from .samplers import SAMPLERS
    from .samplers.fingerprint import fingerprint
    from .samplers.optimize import calibration_seed, optimized_grid

    steps = sc.steps if sc.steps is not None else SAMPLERS[sc.sampler].default_steps
    seed = calibration_seed(sc.seed)
    fn = calibration_score(score_fn, CALIBRATION_BATCH, sc.guidance, seed) if conditional else score_fn
    context = dict(guidance=(1.0 if sc.guidance is None else sc.guidance) if conditional else None,
                   use_ema=sc.use_ema, denoise=sc.denoise, **(grid_context or {}))
    dtype = torch.get_default_dtype()
    found = optimized_grid(fn, sde, (CALIBRATION_BATCH, *data_shape), sc.sampler, steps, cache=grid_cache,
                           options=sc.options, key={"weights": fingerprint(score_fn)}, context=context, dtype=dtype,
                           device=device, seed=seed)
    return found.grid(dtype=dtype, device=device)


CALIBRATION_BATCH = 256


def calibration_score(denoiser, count: int, guidance: float | None, seed: int):
    """The score of a class-conditional denoiser for a calibration batch of `count`: classes 0..K-1 repeated, in an
    order shuffled by `seed` (so that any leading part of the batch sees every class), at the guidance scale."""
    labels = sample_labels(denoiser, count)
    labels = labels[torch.randperm(count, generator=torch.Generator().manual_seed(seed))]
    return guided_score(denoiser, labels, 1.0 if guidance is None else guidance)


def _device_of(score_fn) -> torch.device:
    params = getattr(score_fn, "parameters", None)
    first = next(params(), None) if params else None
    return first.device if first is not None else torch.device("cpu")


def gather_batches(local: Tensor, cfg: Config, world: int, return_shares: bool = False):
    """Reassemble batches drawn round-robin by `world` processes into batch order (call on every process).
    With return_shares, also the number of samples each process drew (a list, by rank)."""
    if world == 1:
        return (local, [local.shape[0]]) if return_shares else local
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, local)
    bs = cfg.sample.batch_size
    n_batches = -(-cfg.sample.n_samples // bs)
    chunks = {r: list(torch.split(parts[r], bs)) for r in range(world)}
    out = torch.cat([chunks[b % world][b // world] for b in range(n_batches)])
    return (out, [p.shape[0] for p in parts]) if return_shares else out


# Upper bounds a good model meets on the toy sets, at a few thousand samples (5000 in the demo): the largest
# per-mode weight error, the sliced Wasserstein distance over that of two data draws, and the data's mean
# log-density minus the samples' (in nats, under the exact density; samples wider than the data, or bridging
# modes, make it positive, samples packed tighter than the data negative: its size is what counts).
TOY_TARGETS = {"mode_weight_error": 0.02, "sliced_wasserstein_ratio": 3.0, "log_density_gap": 0.1}


def evaluate_toy(samples: Tensor, cfg: Config) -> dict:
    """Sliced Wasserstein and MMD against fresh data, with the same numbers between two fresh draws as the
    noise floor; per-mode weights and the mean log-density (the samples' and a fresh data draw's, and the gap)
    when the data set is an exact Gaussian mixture; each metric of TOY_TARGETS beside its `<name>_target`, and
    `targets_met`."""
    n = samples.shape[0]
    fresh_a = load_dataset(cfg.data.name, n, seed=derive_seed(cfg.data.seed, "fresh_data", 0), **cfg.data.options)
    fresh_b = load_dataset(cfg.data.name, n, seed=derive_seed(cfg.data.seed, "fresh_data", 1), **cfg.data.options)
    gen = lambda: torch.Generator().manual_seed(0)  # same projections for both distances  # noqa: E731
    sw_model = sliced_wasserstein(samples, fresh_a, generator=gen())
    sw_ref = sliced_wasserstein(fresh_b, fresh_a, generator=gen())
    m = min(n, 2000)
    metrics = {"n_samples": n, "sliced_wasserstein": sw_model, "sliced_wasserstein_data_vs_data": sw_ref,
               "sliced_wasserstein_ratio": sw_model / sw_ref,
               "mmd": mmd(samples[:m], fresh_a[:m]), "mmd_data_vs_data": mmd(fresh_b[:m], fresh_a[:m]),
               "non_finite_samples": int((~torch.isfinite(samples)).any(1).sum())}
    if cfg.data.name in EXACT_MIXTURES:
        gmm = EXACT_MIXTURES[cfg.data.name](**cfg.data.options)
        metrics["mode_weights"] = mode_weights(samples, gmm).tolist()
        metrics["mode_weight_error"] = mode_weight_error(samples, gmm)
        metrics["mode_weight_error_data"] = mode_weight_error(fresh_a, gmm)
        metrics["mean_log_prob"] = float(gmm.log_prob(samples.to(gmm.means.dtype)).mean())
        metrics["mean_log_prob_data"] = float(gmm.log_prob(fresh_a.to(gmm.means.dtype)).mean())
        # the log-density gap sees what the other two miss: modes wider than the data's, bridges between them
        metrics["log_density_gap"] = metrics["mean_log_prob_data"] - metrics["mean_log_prob"]
    for key, target in TOY_TARGETS.items():
        if key in metrics:
            metrics[f"{key}_target"] = target
    met = [abs(metrics[key]) <= target for key, target in TOY_TARGETS.items() if key in metrics]
    metrics["targets_met"] = bool(met) and all(met)
    return metrics


def eval_cache_dir(checkpoint: str | Path) -> Path:
    """The folder where evaluations of a run cache what they train (the digits classifier): <run>/eval_cache,
    beside the run's checkpoints/ (a checkpoint is <run>/checkpoints/step_*; one kept elsewhere caches beside
    itself). Derived from the run, so that an evaluation never writes into the current directory by accident."""
    checkpoint = Path(checkpoint)
    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return run / "eval_cache"


def evaluate_images(samples: Tensor, labels: Tensor | None, cfg: Config, cache_dir: str | Path) -> dict:
    """Digits: classifier FD against both splits, memorisation, and class accuracy when labels (the classes the
    samples were conditioned on) are given (sdekit.image_metrics; the classifier is cached in cache_dir, for a
    run `eval_cache_dir(checkpoint)`); other image sets: range statistics and memorisation (nearest-neighbour
    distances to the training split against the held-out split's)."""
    finite = torch.isfinite(samples).flatten(1).all(1)
    out = {"n_samples": samples.shape[0], "non_finite_samples": int((~finite).sum()),
           "mean": float(samples[finite].mean()), "std": float(samples[finite].std())}
    if not bool(finite.all()):
        return out
    if cfg.data.name == "digits" and tuple(samples.shape[1:]) == (1, 8, 8):
        from .image_metrics import evaluate_digits

        out.update(evaluate_digits(samples, labels, split_seed=cfg.data.seed, test_fraction=cfg.data.test_fraction,
                                   cache_dir=cache_dir))
        return out
    from .image_metrics import memorisation

    train, test = image_splits(cfg)
    if len(test) >= 2:
        out.update(memorisation(samples, train.x, test.x))
    else:
        out["memorisation_note"] = "no held-out split to compare with (data.test_fraction)"
    return out


def image_splits(cfg: Config):
    """(train, test) ImageData of the run's data config."""
    from .images import load_images

    d = cfg.data
    return load_images(d.name, d.path, d.test_fraction, d.seed, d.layout, d.value_range, **d.options)


def held_out_bpd(denoiser, cfg: Config, n: int) -> dict:
    """Bits/dim of the unconditional model on the first n held-out images of the run's data split."""
    from .image_metrics import held_out_bits_per_dim

    _, test = image_splits(cfg)
    if test.n_levels is None:
        return {"bits_per_dim": None, "bits_per_dim_note": "float images have no grey levels to dequantise"}
    x = test.x[:n].to(_device_of(denoiser))
    start = time.perf_counter()
    res = held_out_bits_per_dim(denoiser, denoiser.sde, x, test.n_levels, generator=torch.Generator().manual_seed(cfg.sample.seed))
    return {**res, "bits_per_dim_seconds": time.perf_counter() - start}


# samplers compared on a trained model: a lean set (the multistep leaders and the first-order baselines)
RUN_CANDIDATES = [("ode_euler", "ode_euler", {}), ("ddim", "ddim", {}), ("dpmpp_2m", "dpmpp_2m", {}),
                  ("dpmpp_3m", "dpmpp_3m", {}), ("unipc bh2", "unipc", {}), ("unipc bh2 p=2", "unipc", {"order": 2}),
                  ("deis", "deis", {}), ("deis o4", "deis", {"order": 4})]


def compare_samplers_on_run(denoiser, cfg: Config, checkpoint: str | Path, data_shape: tuple[int, ...],
                            budgets=(5, 10), n: int | None = None, reference: tuple[str, int] = ("heun", 30),
                            peers: bool = True, optimize: bool = True, calibration_batch: int = 64,
                            iterations: int = 30, progress: bool = False) -> dict:
    """sdekit's samplers (RUN_CANDIDATES on its fixed grids, and optimised grids), diffusers' and k-diffusion's on a
    trained digits model, all from the same x_T and class labels.

    Each run is ranked by its solver error, the median distance to the model's own probability-flow solution from
    the same x_T (rk45, rtol = atol = 1e-5; what a sampler controls), and also scored by the classifier Frechet
    distance to the held-out split ('fd'; what a user sees, but at the digits' sample sizes a few units of FD are
    noise). `reference` (sampler, steps) gives the many-NFE baseline of both. n: samples per run (default: the
    held-out split's size, the most the FD uses); the conditional model is sampled at cfg.sample.guidance.
    Returns compare_samplers' dict plus 'reference' and 'config'."""
    from .classifier import digits_classifier
    from .image_metrics import features, frechet_distance
    from .images import load_images
    from .samplers import CountingScore
    from .samplers.frontier import compare_samplers, median_distance

    if cfg.data.name != "digits":
        raise ConfigError(f"comparing samplers by FD needs the digits data (the classifier's), got {cfg.data.name!r}")
    sde = denoiser.sde
    clf, _ = digits_classifier(eval_cache_dir(checkpoint), split_seed=cfg.data.seed, test_fraction=cfg.data.test_fraction)
    _, test = load_images("digits", test_fraction=cfg.data.test_fraction, seed=cfg.data.seed)
    n = n or len(test)
    f_test = features(clf, test.x)
    fd = lambda x: frechet_distance(features(clf, x), f_test)
    guidance = 1.0 if cfg.sample.guidance is None else cfg.sample.guidance

    def score_for(count: int, seed: int):
        conditional = sample_labels(denoiser, count) is not None
        return calibration_score(denoiser, count, guidance, seed) if conditional else denoiser

    denoiser.requires_grad_(False)      # grids are optimised through the network, its weights stay fixed
    x_T = sde.prior_sample((n, *data_shape), generator=torch.Generator().manual_seed(derive_seed(cfg.sample.seed, "sample_batch", 0)))
    score = score_for(n, cfg.sample.seed)
    tol = 1e-5 if x_T.dtype == torch.float32 else 1e-7
    say = (lambda m: print(m, flush=True)) if progress else (lambda m: None)
    with torch.no_grad():
        start, counted = time.perf_counter(), CountingScore(score)
        ode = sample(counted, sde, tuple(x_T.shape), "rk45", x_T=x_T, rtol=tol, atol=tol)
        say(f"probability-flow solution (rk45 rtol=atol={tol:g}): {counted.nfe} NFE, {time.perf_counter() - start:.1f}s")
        solver_error = lambda x: median_distance(x, ode)
        ref_x, ref_info = sample(score, sde, tuple(x_T.shape), reference[0], steps=reference[1], x_T=x_T, return_info=True)
    ref = dict(sampler=reference[0], steps=reference[1], nfe=ref_info["nfe"], error=solver_error(ref_x), fd=fd(ref_x),
               fd_of_the_ode_solution=fd(ode), ode_nfe=counted.nfe)
    say(f"reference {reference[0]} {reference[1]} steps (NFE {ref['nfe']}): solver error {ref['error']:.3g}, "
        f"FD {ref['fd']:.2f} (the rk45 solution's FD {ref['fd_of_the_ode_solution']:.2f})")
    from .samplers.optimize import calibration_seed
    seed = calibration_seed(cfg.sample.seed)            # calibration draws from a stream the evaluation never uses
    calibration = (score_for(calibration_batch, seed), calibration_batch, iterations, seed, tol)
    with torch.no_grad():
        result = compare_samplers(score, sde, x_T, solver_error, budgets, peers=peers, extras={"fd": fd},
                                  candidates=RUN_CANDIDATES, calibration=calibration if optimize else None,
                                  progress=progress)
    result["reference"] = ref
    result["config"] = dict(checkpoint=str(checkpoint), budgets=list(budgets), n=n, guidance=guidance,
                            metric=f"median distance to the model's rk45 solution (rtol=atol={tol:g}) from the same x_T",
                            extras={"fd": "classifier Frechet distance to the held-out split"},
                            calibration=dict(batch=calibration_batch, iterations=iterations) if optimize else None)
    return result

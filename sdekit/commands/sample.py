"""`sdekit sample`: draw samples from a trained run, plot them and score them against the data.

Writes into the output folder: samples.safetensors, samples.png (samples over the data density for 2-D
data; an image grid for images, one column per class for class-conditional sampling), metrics.json (quality
numbers with their reference values) and config.json (the resolved config). For images the metrics hold
the memorisation measure (nearest-neighbour distances to the training split against the held-out split's,
sdekit.image_metrics.memorisation); for digits also the classifier Frechet distance against the held-out
and the training split, and class accuracy when sampling is conditional (guidance != 0), with the classifier
cached in the run folder's eval_cache/ (sdekit.sampling.eval_cache_dir); `--bpd N` adds bits/dim on N held-out
images, `--compare heun:10,dpmpp_2m:10` a grid (PNG + JSON) per sampler and step count.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from .._imports import check_extras, pyplot, require
from ..checkpoint import CheckpointError, FolderInUseError, atomic_write_text
from ..config import Config, ConfigError, apply_overrides, from_dict, to_dict
from ..data import EXACT_MIXTURES, load_dataset
from ..image_metrics import class_grid_layout, save_image_grid
from ..rng import derive_seed
from ..sampling import (
    conditioning_labels,
    draw_samples,
    eval_cache_dir,
    evaluate_images,
    evaluate_toy,
    gather_batches,
    held_out_bpd,
    sample_labels,
)
from ..training import check_launch, exclusive_folder, launch_kwargs, load_trained

__all__ = ["main", "plot_toy"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sdekit sample", description="Sample a trained run and evaluate the samples.")
    p.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="run folder (its newest valid checkpoint) or a checkpoint folder (under torchrun write --run-dir: "
                        "torchrun's own parser reads --run as an abbreviation of its --run-path)")
    p.add_argument("--out", help="output folder (default: <run>/samples)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--compare", default="", help="image data: also a grid per sampler:steps, e.g. heun:10,heun:25,dpmpp_2m:10")
    p.add_argument("--compare-n", type=int, default=200, help="samples per --compare entry (the grid shows up to 100)")
    p.add_argument("--bpd", type=int, default=0, help="image data: bits/dim on this many held-out images (Hutchinson)")
    p.add_argument("overrides", nargs="*", help="sample.key=value overrides, e.g. sample.sampler=euler_maruyama")
    args = p.parse_args(argv)
    try:   # before any work: the plot comes after the samples
        check_extras("sdekit sample", "accelerate", "matplotlib")
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        bad = [o for o in args.overrides if not o.startswith("sample.")]
        if bad:
            raise ConfigError(f"only sample.* settings can be overridden when sampling, got {bad}")
        denoiser, cfg, ckpt = load_trained(args.run, use_ema=True)
        cfg = from_dict(apply_overrides(to_dict(cfg), args.overrides))
        if not cfg.sample.use_ema:
            denoiser, _, _ = load_trained(args.run, use_ema=False)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    PartialState = require("accelerate", "sdekit sample").PartialState

    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    state = PartialState(**launch_kwargs())  # one process, or one of several under `accelerate launch` / torchrun (gloo on CPU)
    denoiser = denoiser.to(state.device)
    out = Path(args.out) if args.out else Path(args.run) / "samples"
    data_shape = tuple(json.loads((ckpt / "state.json").read_text())["data_shape"])
    compare = _parse_compare(args.compare)
    labels = sample_labels(denoiser, cfg.sample.n_samples)
    try:
        check_launch(state.num_processes)
        with exclusive_folder(out, state.is_main_process, state.num_processes, state.device):   # one sampler per folder
            return _sample_into(out, args, state, denoiser, cfg, ckpt, data_shape, compare, labels)
    except (FolderInUseError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _sample_into(out: Path, args, state, denoiser, cfg: Config, ckpt: Path, data_shape: tuple[int, ...], compare, labels) -> int:
    """Draw this process's share, gather, and (main process) score and write everything into `out`."""
    try:
        local, timing = draw_samples(denoiser, denoiser.sde, cfg, data_shape, progress=not args.no_progress and state.is_main_process,
                                     rank=state.process_index, world=state.num_processes, labels=labels,
                                     grid_cache=eval_cache_dir(ckpt) / "grids.json", grid_context=_grid_context(ckpt))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    samples, shares = gather_batches(local, cfg, state.num_processes, return_shares=True)
    if not state.is_main_process:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    save_file({"samples": samples.contiguous()}, str(out / "samples.safetensors"))
    metrics = {"checkpoint": str(ckpt), "sampler": cfg.sample.sampler, **timing, "samples_per_process": shares}
    if len(data_shape) == 1 and data_shape[0] == 2:
        metrics.update(evaluate_toy(samples, cfg))
        plot_toy(samples, cfg, out / "samples.png", title=f"{cfg.sample.sampler}, NFE {timing['nfe_per_sample']}")
    elif len(data_shape) == 3:
        used = conditioning_labels(labels, timing.get("guidance"))
        metrics.update(evaluate_images(samples, used, cfg, eval_cache_dir(ckpt)))
        title = f"{cfg.sample.sampler}, NFE {timing['nfe_per_sample']}"
        title += f", guidance {timing['guidance']:g}" if labels is not None else ""
        n_classes = getattr(denoiser.net, "num_classes", None)
        shown, ncol = class_grid_layout(len(samples), None if used is None else n_classes)
        save_image_grid(samples[:shown], out / "samples.png", nrow=ncol, title=title,
                        numbers={"shown": shown, "columns": ncol, "labels": None if used is None else used[:shown].tolist(),
                                 **{k: v for k, v in metrics.items() if not isinstance(v, list)}})
        for name, steps in compare:
            c = from_dict(apply_overrides(to_dict(cfg), [f"sample.sampler={name}", f"sample.steps={steps}",
                                                        f"sample.n_samples={args.compare_n}", f"sample.batch_size={args.compare_n}"]))
            lab = None if labels is None else sample_labels(denoiser, args.compare_n)
            x, info = draw_samples(denoiser, denoiser.sde, c, data_shape, progress=False, labels=lab)
            lab = conditioning_labels(lab, info.get("guidance"))
            numbers = {"sampler": name, "steps": steps, **info, **evaluate_images(x, lab, c, eval_cache_dir(ckpt))}
            shown, ncol = class_grid_layout(len(x), None if lab is None else n_classes)
            save_image_grid(x[:shown], out / f"grid_{name}_nfe{info['nfe_per_sample']}.png", nrow=ncol,
                            title=f"{name}, {steps} steps, NFE {info['nfe_per_sample']}", numbers=numbers)
            metrics.setdefault("compare", []).append({k: v for k, v in numbers.items() if not isinstance(v, list)})
        if args.bpd:
            metrics.update(held_out_bpd(denoiser, cfg, args.bpd))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    atomic_write_text(out / "config.json", json.dumps(to_dict(cfg), indent=1))
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items() if not isinstance(v, list)}
    print(json.dumps(shown, indent=1))
    print(f"wrote {out}/samples.png, metrics.json, samples.safetensors")
    return 0


def _grid_context(ckpt: Path) -> dict:
    """What an optimised grid of this checkpoint is fitted for beyond its weights: the checkpoint and its step."""
    state = json.loads((ckpt / "state.json").read_text())
    return {"checkpoint": ckpt.name, "checkpoint_step": state.get("step")}


def _parse_compare(spec: str) -> list[tuple[str, int]]:
    """'heun:10,dpmpp_2m:10' -> [('heun', 10), ('dpmpp_2m', 10)]."""
    from ..samplers import SAMPLERS

    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, steps = item.partition(":")
        if name not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
            raise SystemExit(f"error: --compare entry {item!r} must be sampler:steps with a sampler of {sorted(SAMPLERS)}")
        out.append((name, int(steps)))
    return out


def plot_toy(samples: Tensor, cfg: Config, path: Path, title: str = "") -> None:
    """Samples as points over the data density (exact log-density contours for mixtures, a histogram otherwise)."""
    plt = pyplot("samples.png")

    data = load_dataset(cfg.data.name, 20000, seed=derive_seed(cfg.data.seed, "fresh_data", 2), **cfg.data.options)
    lim = float(data.abs().max()) * 1.15
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.4), sharex=True, sharey=True)
    if cfg.data.name in EXACT_MIXTURES:
        gmm = EXACT_MIXTURES[cfg.data.name](**cfg.data.options)
        g = torch.linspace(-lim, lim, 200)
        xx, yy = torch.meshgrid(g, g, indexing="xy")
        logp = gmm.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1).to(gmm.means.dtype)).reshape(200, 200)
        for ax in axes:
            ax.contourf(xx, yy, logp.clamp(min=-12), levels=20, cmap="Blues")
    else:
        for ax in axes:
            ax.hist2d(data[:, 0].numpy(), data[:, 1].numpy(), bins=120, range=[[-lim, lim], [-lim, lim]], cmap="Blues")
    s = samples[torch.isfinite(samples).all(1)]
    axes[0].scatter(data[:2000, 0], data[:2000, 1], s=2, c="k", alpha=0.5)
    axes[0].set_title("data")
    axes[1].scatter(s[:2000, 0], s[:2000, 1], s=2, c="crimson", alpha=0.5)
    axes[1].set_title(title or "samples")
    for ax in axes:
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

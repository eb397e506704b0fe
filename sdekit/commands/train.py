"""`sdekit train` (and train.py): train a score model from a YAML config with `section.key=value` overrides
(sdekit.training.train), then plot the loss log as loss.png in the run folder."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .._imports import check_extras, pyplot
from ..checkpoint import CheckpointError
from ..config import ConfigError, load_config
from ..training import train

__all__ = ["main", "plot_loss"]


def plot_loss(log_path: Path, out: Path) -> None:
    """The DSM loss of log.jsonl (one JSON object per line with 'step' and 'loss') against step, log scale, as a PNG."""
    plt = pyplot("loss.png")

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set(xlabel="step", ylabel="DSM loss", yscale="log", title="training loss")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sdekit train", description="Train a denoising score-matching model.")
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("--resume", help="continue a run: its folder (the newest valid checkpoint) or a checkpoint folder; "
                                    "the config must be the run's own (train.steps may grow)")
    p.add_argument("--overwrite", action="store_true",
                   help="train.out_dir holds an earlier run: remove its checkpoints, logs and samples and start afresh")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=2000")
    args = p.parse_args(argv)
    try:   # before any work: the loss plot comes at the end of training
        check_extras("sdekit train", "accelerate", "matplotlib")
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    except (ConfigError, CheckpointError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result["is_main_process"] and Path(result["log"]).is_file():
        plot_loss(Path(result["log"]), Path(result["run_dir"]) / "loss.png")
    if result["checkpoint"]:
        print(f"trained {result['step']} steps, final loss {result['loss']:.4f}; checkpoint {result['checkpoint']}")
    return 0

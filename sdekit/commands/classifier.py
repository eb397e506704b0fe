"""`sdekit classifier`: train (or load the cached copy of) the digits classifier of sdekit.classifier and print
its record (settings and held-out accuracy).

    sdekit classifier --run runs/digits          # the run's split, cached in runs/digits/eval_cache (as `sdekit sample`)
    sdekit classifier --cache-dir DIR [--split-seed S] [--test-fraction F]
"""
from __future__ import annotations

import argparse
import json

from ..checkpoint import CheckpointError
from ..classifier import digits_classifier
from ..sampling import eval_cache_dir
from ..training import resolve_checkpoint

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sdekit classifier", description="Train (or load) the digits classifier.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", help="run (or checkpoint) folder: its data split (data.seed, data.test_fraction) and its "
                                     "eval_cache/, where `sdekit sample` looks for the classifier")
    where.add_argument("--cache-dir", help="folder for the cached classifier")
    p.add_argument("--split-seed", type=int, default=None, help="data split seed (default: the run's data.seed, else 0)")
    p.add_argument("--test-fraction", type=float, default=None, help="held-out fraction (default: the run's, else 0.2)")
    args = p.parse_args(argv)
    cache_dir, split_seed, test_fraction = args.cache_dir, args.split_seed, args.test_fraction
    if args.run is not None:
        try:
            ckpt = resolve_checkpoint(args.run)
        except CheckpointError as e:
            p.error(str(e))
        data = json.loads((ckpt / "state.json").read_text())["config"]["data"]
        if data["name"] != "digits":
            p.error(f"run {args.run} trains on data {data['name']!r}; the classifier judges digits runs")
        cache_dir = eval_cache_dir(ckpt)
        split_seed = data["seed"] if split_seed is None else split_seed
        test_fraction = data["test_fraction"] if test_fraction is None else test_fraction
    _, record = digits_classifier(cache_dir, progress=True, split_seed=split_seed, test_fraction=test_fraction)
    print(json.dumps(record, indent=1))
    return 0

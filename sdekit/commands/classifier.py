"""`sdekit classifier`: train (or load the cached copy of) the digits classifier of sdekit.classifier and print
its record (settings and held-out accuracy)."""
from __future__ import annotations

import argparse
import json

from ..classifier import digits_classifier

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sdekit classifier", description="Train (or load) the digits classifier.")
    p.add_argument("--cache-dir", default="runs/classifier")
    p.add_argument("--split-seed", type=int, default=None, help="data split seed (default 0, as the digits configs)")
    p.add_argument("--test-fraction", type=float, default=None, help="held-out fraction (default 0.2)")
    args = p.parse_args(argv)
    _, record = digits_classifier(args.cache_dir, progress=True, split_seed=args.split_seed, test_fraction=args.test_fraction)
    print(json.dumps(record, indent=1))
    return 0


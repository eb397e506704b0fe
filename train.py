"""Train a score model: `python train.py --config configs/ring.yaml [section.key=value ...]` (as `sdekit train`)."""
import sys

from sdekit.commands.train import main

if __name__ == "__main__":
    sys.exit(main())

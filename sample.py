"""Sample a trained run: `python sample.py --run runs/ring [sample.key=value ...]` (same as `sdekit sample`)."""
import sys

from sdekit.commands.sample import main

if __name__ == "__main__":
    sys.exit(main())

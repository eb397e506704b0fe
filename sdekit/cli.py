"""`sdekit <command> [args]`: each command is a `main(argv)` in the module that owns the concept.

Commands are imported lazily so that `sdekit sample` never pays for JAX, and so on.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("sdekit.training", "main", "train a score model from a YAML config"),
    "sample": ("sdekit.sampling_cli", "main", "sample a trained checkpoint"),
    "samplers": ("sdekit.samplers.report", "main", "accuracy of every sampler against an exact mixture oracle"),
    "sensitivity": ("sdekit.sensitivity.report", "main", "pathwise dX_T/dtheta by every method, compared"),
    "ito": ("sdekit.ito", "main", "Ito-correction demonstrations"),
    "estimators": ("sdekit.estimators", "main", "pathwise vs score-function gradient estimators"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: sdekit <command> [options]\n\ncommands:")
        for name, (_, _, doc) in COMMANDS.items():
            print(f"  {name:<12} {doc}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"sdekit: unknown command {name!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

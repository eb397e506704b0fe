"""The command layer: `sdekit <command> [options]`, each command a `main(argv) -> int` in its own module here.

Argument parsing, printing, plots and the files a command writes live in these modules; the library functions
they call return data. Commands are imported lazily, so that `sdekit sample` never pays for JAX, and so on,
and `import sdekit` imports none of them.
"""
from __future__ import annotations

import importlib
import sys

__all__ = ["COMMANDS", "main"]

# name -> (module holding `main(argv)`, one line of help)
COMMANDS = {
    "train": ("sdekit.commands.train", "train a score model from a YAML config"),
    "sample": ("sdekit.commands.sample", "sample a trained checkpoint"),
    "samplers": ("sdekit.commands.samplers", "accuracy of every sampler against an exact mixture oracle"),
    "frontier": ("sdekit.commands.frontier", "best error per NFE budget: sdekit's samplers and grids against diffusers and k-diffusion"),
    "sensitivity": ("sdekit.commands.sensitivity", "pathwise dX_T/dtheta by every method, compared"),
    "ito": ("sdekit.commands.ito", "Ito-correction demonstrations"),
    "estimators": ("sdekit.commands.estimators", "pathwise vs score-function gradient estimators"),
    "classifier": ("sdekit.commands.classifier", "train (or load) the digits classifier behind FD and class accuracy"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: sdekit <command> [options]\n\ncommands:")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:<12} {doc}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"sdekit: unknown command {name!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return int(importlib.import_module(COMMANDS[name][0]).main(rest) or 0)


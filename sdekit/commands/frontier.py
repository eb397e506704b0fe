"""`python -m sdekit.commands.frontier`: the low-NFE comparison of sdekit's samplers with diffusers' and k-diffusion's
on one exact Gaussian mixture (sdekit.samplers.frontier.run_frontier), with optimised grids.

Writes frontier.json (every run, the best per budget and library, the ratios, the optimised grids and their cost),
frontier.md (the table) and frontier.png (error against NFE, each library's best per budget) into --out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .._imports import pyplot, save_figure
from ..samplers.frontier import BUDGETS, frontier_markdown, run_frontier

__all__ = ["main", "plot"]


def plot(result: dict, path: Path) -> None:
    plt = pyplot("frontier.png")
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    budgets = result["config"]["budgets"]
    for lib in ["sdekit", "sdekit (fixed grids)", *result["peers_measured"]]:
        pts = [(b, result["best"][str(b)][lib]["error"]) for b in budgets if result["best"][str(b)].get(lib)]
        ax.semilogy([p[0] for p in pts], [p[1] for p in pts], "o-", label=lib)
    ax.set_xlabel("NFE")
    ax.set_ylabel("median distance to the rk45 solution (best sampler and grid)")
    ax.set_title("Exact mixture, VP SDE, 1024 x_T")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdekit.commands.frontier", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/frontier", help="output folder (default runs/frontier)")
    p.add_argument("--nfe", default=",".join(map(str, BUDGETS)), help="comma-separated NFE budgets (default 5,10,15,20)")
    p.add_argument("--batch", type=int, default=1024, help="x_T draws (default 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-peers", action="store_true", help="sdekit alone")
    p.add_argument("--no-optimized", action="store_true", help="no optimised grids")
    p.add_argument("--iterations", type=int, default=60, help="Adam iterations per optimised grid")
    args = p.parse_args(argv)
    try:
        budgets = tuple(int(v) for v in args.nfe.split(","))
    except ValueError:
        p.error(f"--nfe must be comma-separated integers, got {args.nfe!r}")
    torch.set_num_threads(1)
    result = run_frontier(budgets, batch=args.batch, seed=args.seed, peers=not args.no_peers,
                          optimized=not args.no_optimized, iterations=args.iterations, progress=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier.json").write_text(json.dumps(result, indent=1))
    (out / "frontier.md").write_text(frontier_markdown(result))
    plot(result, out / "frontier.png")
    print(frontier_markdown(result))
    if result["peers_skipped"]:
        print("peers not measured:", result["peers_skipped"])
    print(f"wrote {out / 'frontier.json'}, {out / 'frontier.md'}, {out / 'frontier.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m sdekit.commands.frontier`: the low-NFE comparison of sdekit's samplers with diffusers' and k-diffusion's
on one exact Gaussian mixture (sdekit.samplers.frontier.run_frontier), with optimised grids; with --run, on a
trained digits model instead, ranked by the distance to the model's own probability-flow solution, with the
classifier Frechet distance to the held-out split beside it (sdekit.sampling.compare_samplers_on_run); with
--family, on a family of random exact mixtures under VP, VE and EDM drawn from a fresh seed (printed and saved;
--family-seed reproduces a run), reporting per budget the median and worst ratio to the best peer
(sdekit.samplers.family.run_family; family.json, family.md, family.png into --out, default runs/frontier-family).

Writes frontier.json (every run, the best per budget and library, the ratios, the optimised grids and their cost),
frontier.md (the table) and frontier.png (error against NFE, each library's best per budget) into --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .._imports import PEERS, check_extras, pyplot, save_figure
from ..data import EXACT_MIXTURES
from ..samplers.frontier import BUDGETS, frontier_markdown, frontier_mixture, run_frontier

__all__ = ["main", "plot", "plot_family", "write_frontier"]


def plot(result: dict, path: Path) -> None:
    plt = pyplot("frontier.png")
    fig, ax = plt.subplots(figsize=(6.5, 4.8), layout="constrained")   # the layout keeps every label inside
    cfg = result["config"]
    budgets = result["config"]["budgets"]
    for lib in ["sdekit", "sdekit (fixed grids)", *result["peers_measured"]]:
        pts = [(b, result["best"][str(b)][lib]["error"]) for b in budgets if result["best"][str(b)].get(lib)]
        ax.semilogy([p[0] for p in pts], [p[1] for p in pts], "o-", label=lib)
    ax.set_xlabel("NFE")
    if "reference" in result:
        ref = result["reference"]
        ax.axhline(ref["error"], color="k", ls="--", lw=1, label=f"{ref['sampler']}, NFE {ref['nfe']}")
        ax.set_ylabel("median distance to\nthe model's rk45 solution")
        ax.set_title(f"{cfg['checkpoint']}, {cfg['n']} samples")
    else:
        ax.set_ylabel("median distance to the rk45 solution\n(best sampler and grid)")
        ax.set_title(f"Exact mixture '{cfg['mixture']}', VP SDE, {cfg['batch']} x_T")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdekit.commands.frontier", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="output folder (default runs/frontier; with --run <run>/frontier)")
    p.add_argument("--nfe", help="comma-separated NFE budgets (default 5,10,15,20; with --run 5,10)")
    p.add_argument("--batch", type=int, default=1024, help="x_T draws (default 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixture", default="default",
                   help=f"the exact Gaussian mixture: default (the accuracy report's three anisotropic modes), "
                        f"{', '.join(sorted(EXACT_MIXTURES))}, or random:D,K,S (K random modes in D dimensions, seed S)")
    p.add_argument("--no-peers", action="store_true", help="sdekit alone")
    p.add_argument("--no-optimized", action="store_true", help="no optimised grids")
    p.add_argument("--iterations", type=int,
                   help="Adam iterations per optimised grid (default 60; with --run 30, with --family 25)")
    p.add_argument("--run", help="a trained digits run (or checkpoint): compare on it by solver error and FD, budgets "
                                       "default 5,10")
    p.add_argument("--samples", type=int, help="with --run: samples per sampler (default: the held-out split's size)")
    p.add_argument("--family", type=int, nargs="?", const=0, metavar="SIZE",
                   help="the frontier on SIZE random exact mixtures (default 8) under VP, VE and EDM: median and worst "
                        "ratio to the best peer per budget")
    p.add_argument("--family-seed", type=int, help="with --family: the family's seed (default: a fresh one from "
                                                     "os.urandom, printed and saved)")
    p.add_argument("--sde", default="vp,ve,edm", help="with --family: comma-separated SDEs (default vp,ve,edm)")
    p.add_argument("--quick", action="store_true", help="with --family: 4 targets, 96 x_T each (about half the time)")
    args = p.parse_args(argv)
    try:   # before any work: without the peers the comparison has nothing to compare with
        if not args.no_peers:
            check_extras("sdekit frontier (or --no-peers)", *PEERS)
        check_extras("frontier.png", "matplotlib")
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.run:
        return _on_run(p, args)
    if args.family is not None or args.quick or args.family_seed is not None:
        return _on_family(p, args)
    budgets = _budgets(p, args.nfe or ",".join(map(str, BUDGETS)))
    try:
        frontier_mixture(args.mixture)
    except ValueError as e:
        p.error(str(e))
    torch.set_num_threads(1)
    result = run_frontier(budgets, batch=args.batch, seed=args.seed, mixture=args.mixture, peers=not args.no_peers,
                          optimized=not args.no_optimized, iterations=args.iterations or 60, progress=True)
    return write_frontier(result, Path(args.out or "runs/frontier"), ".1e")


def _on_family(p: argparse.ArgumentParser, args) -> int:
    from ..samplers.family import family_markdown, fresh_family_seed, run_family

    budgets = _budgets(p, args.nfe or ",".join(map(str, BUDGETS)))
    size = args.family or (4 if args.quick else 8)           # --family without SIZE: 8, or 4 with --quick
    if size < 1:
        p.error(f"--family needs at least one target, got {size}")
    sdes = tuple(s.strip() for s in args.sde.split(",") if s.strip())
    seed = args.family_seed if args.family_seed is not None else fresh_family_seed()
    print(f"family seed {seed} (rerun with --family {size} --family-seed {seed})", flush=True)
    torch.set_num_threads(1)
    try:
        result = run_family(seed, size, budgets, batch=96 if args.quick else 128, sdes=sdes, peers=not args.no_peers,
                            optimize=not args.no_optimized, iterations=args.iterations or 25)
    except ValueError as e:
        p.error(str(e))
    result["config"]["command"] = "sdekit frontier " + " ".join(["--family", str(size), "--family-seed", str(seed)]
                                                               + (["--quick"] if args.quick else [])
                                                               + ([f"--nfe={args.nfe}"] if args.nfe else [])
                                                               + ([f"--sde={args.sde}"] if args.sde != "vp,ve,edm" else []))
    out = Path(args.out or "runs/frontier-family")
    out.mkdir(parents=True, exist_ok=True)
    (out / "family.json").write_text(json.dumps(result, indent=1))
    table = family_markdown(result)
    (out / "family.md").write_text(table)
    plot_family(result, out / "family.png")
    print(table)
    if result["peers_skipped"]:
        print("peers not measured:", result["peers_skipped"])
    print(f"wrote {out / 'family.json'}, {out / 'family.md'}, {out / 'family.png'}")
    return 0


def plot_family(result: dict, path: Path) -> None:
    """Each (target, SDE) cell's ratio to the best peer against NFE (sdekit's best and its recommended setting),
    the medians joined, the goal lines at 0.5 and 1."""
    plt = pyplot("family.png")
    cfg = result["config"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"vp": "o", "ve": "s", "edm": "^"}
    for key, shift, color, label in (("ratio", -0.45, "tab:blue", "sdekit best"),
                                     ("ratio_recommended", 0.0, "tab:orange", "sdekit recommended"),
                                     ("ratio_optimized", 0.45, "tab:green", "recommended, optimised grid")):
        for sde in cfg["sdes"]:
            pts = [(c["budget"] + shift, c[key]) for c in result["cells"] if c["sde"] == sde and c.get(key) is not None]
            ax.scatter([q[0] for q in pts], [q[1] for q in pts], s=12, color=color, marker=markers.get(sde, "o"),
                       alpha=0.5, label=f"{label}, {sde}")
        med = [(b + shift, result["summary"][str(b)]["all"][key]["median"]) for b in cfg["budgets"]
               if result["summary"][str(b)]["all"].get(key)]
        ax.plot([q[0] for q in med], [q[1] for q in med], "-", color=color, lw=2, label=f"{label}, median")
    for y, style in ((1.0, "--"), (0.5, ":")):
        ax.axhline(y, color="k", ls=style, lw=1)
    ax.set_yscale("log")
    ax.set_xticks(cfg["budgets"])
    ax.set_xlabel("NFE")
    ax.set_ylabel("sdekit error / best peer's error")
    ax.set_title(f"{cfg['size']} random mixtures x {', '.join(cfg['sdes'])} (family seed {cfg['family_seed']})",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


def _on_run(p: argparse.ArgumentParser, args) -> int:
    from ..checkpoint import CheckpointError
    from ..config import ConfigError
    from ..sampling import compare_samplers_on_run
    from ..training import load_trained

    budgets = _budgets(p, args.nfe or "5,10")
    try:
        denoiser, cfg, ckpt = load_trained(args.run, use_ema=True)
        data_shape = tuple(json.loads((ckpt / "state.json").read_text())["data_shape"])
        torch.set_num_threads(1)
        result = compare_samplers_on_run(denoiser, cfg, ckpt, data_shape, budgets, n=args.samples,
                                         peers=not args.no_peers, optimize=not args.no_optimized,
                                         iterations=args.iterations or 30, progress=True)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.run) / "frontier"
    return write_frontier(result, out, ".2e")


def _budgets(p: argparse.ArgumentParser, spec: str) -> tuple[int, ...]:
    try:
        budgets = tuple(int(v) for v in spec.split(","))
    except ValueError:
        p.error(f"--nfe must be comma-separated integers, got {spec!r}")
    if any(b < 1 for b in budgets):
        p.error(f"--nfe budgets must be >= 1, got {spec!r}")
    return budgets


def write_frontier(result: dict, out: Path, fmt: str = ".1e", stem: str = "frontier") -> int:
    """<stem>.json, <stem>.md and <stem>.png into out; prints the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(frontier_markdown(result, fmt))
    plot(result, out / f"{stem}.png")
    print(frontier_markdown(result, fmt))
    if result["peers_skipped"]:
        print("peers not measured:", result["peers_skipped"])
    print(f"wrote {out / f'{stem}.json'}, {out / f'{stem}.md'}, {out / f'{stem}.png'}")
    return 0

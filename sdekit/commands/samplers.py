"""`sdekit samplers`: accuracy per network evaluation of every sampler, on an exact Gaussian-mixture oracle.

Runs sdekit.samplers.report.run_report and writes samplers.json (config and rows: sampler, label, kind, steps,
nfe, error, time_s, plus slopes and declared orders), samplers.md (the table) and samplers.png (log-log error
against NFE) into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .._imports import PEERS, check_extras, pyplot, save_figure
from ..data import EXACT_MIXTURES
from ..samplers.report import run_report
from ..sde import SDES
from ._style import series_styles

__all__ = ["main", "markdown", "plot"]


def markdown(result: dict) -> str:
    lines = [f"# Sampler accuracy on an exact mixture oracle ({result['config']['sde']['name']} SDE)", "",
             f"Deterministic: RMS error vs {result['config']['reference']}. "
             f"Stochastic: {result['config']['stochastic_metric']}; exact-vs-exact floor "
             f"{result['sw_noise_floor']:.4f}.", "",
             "| sampler | kind | steps | NFE | error | time (s) |", "|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        steps = r["steps"] if r["steps"] is not None else f"rtol {r['options']['rtol']:.0e}"
        lines.append(f"| {r['label']} | {r['kind']} | {steps} | {r['nfe']} | {r['error']:.3e} | {r['time_s']:.3f} |")
    lines += ["", "| sampler | declared order | fitted slope of log error vs log NFE |", "|---|---:|---:|"]
    for k, v in result["slopes"].items():
        order = result["orders"].get(k)
        lines.append(f"| {k} | {'n/a' if order is None else f'{order:g}'} | {'n/a' if v is None else f'{v:.2f}'} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    plt = pyplot("samplers.png")

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    for ax, kind in zip(axes, ("deterministic", "stochastic")):
        labels = list(dict.fromkeys(r["label"] for r in result["rows"] if r["kind"] == kind))
        for label, style in zip(labels, series_styles(len(labels))):   # one look per sampler, however many
            rs = [r for r in result["rows"] if r["label"] == label]
            ax.loglog([r["nfe"] for r in rs], [r["error"] for r in rs], label=label, **style)
        if kind == "stochastic":
            ax.axhline(result["sw_noise_floor"], color="gray", ls="--", label="exact vs exact")
        ax.set_xlabel("NFE")
        ax.set_ylabel("RMS error vs float64 rk45 reference" if kind == "deterministic" else "sliced Wasserstein to mixture")
        ax.set_title(kind)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # beside the axes, over no line
    save_figure(fig, path)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sdekit samplers", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/samplers", help="output folder (default runs/samplers)")
    p.add_argument("--sde", default="vp", choices=sorted(SDES), help="forward SDE (default vp)")
    p.add_argument("--mixture", default="default", choices=["default", *sorted(EXACT_MIXTURES)], help="exact mixture oracle")
    p.add_argument("--nfe", default="10,20,40,80,160,320", help="comma-separated NFE budgets (default 10,...,320)")
    p.add_argument("--batch", type=int, default=256, help="x_T draws for deterministic samplers")
    p.add_argument("--n-samples", type=int, default=4000, help="samples per stochastic run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--peers", action="store_true",
                   help="also measure diffusers' and k-diffusion's samplers at these NFE (VP SDE; needs the [peers] "
                        "extra) against sdekit's best on fixed and optimised grids: peers.md, peers.json, peers.png")
    args = p.parse_args(argv)
    try:
        nfes = tuple(int(v) for v in args.nfe.split(","))
    except ValueError:
        p.error(f"--nfe must be comma-separated integers, got {args.nfe!r}")
    if any(n < 1 for n in nfes) or args.batch < 1 or args.n_samples < 2:
        p.error("--nfe values and --batch must be >= 1, --n-samples >= 2")
    if args.peers and args.sde != "vp":
        p.error("--peers compares on the VP SDE (the peers' schedules are wired to it)")
    try:   # before any work: the report alone takes minutes
        if args.peers:
            check_extras("sdekit samplers --peers", *PEERS)
        check_extras("samplers.png", "matplotlib")
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The oracle's work is tiny batched 2x2 algebra: thread hand-offs cost more than they save.
    torch.set_num_threads(1)
    result = run_report(args.sde, nfes, args.batch, args.n_samples, args.seed, args.mixture, progress=not args.quiet)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "samplers.json", json.dumps(result, indent=2))
    _write_atomic(out / "samplers.md", markdown(result))
    plot(result, out / "samplers.png")
    print(markdown(result))
    print(f"wrote {out / 'samplers.json'}, {out / 'samplers.md'}, {out / 'samplers.png'}")
    if args.peers:
        from ..samplers.frontier import run_frontier
        from .frontier import write_frontier

        peers = run_frontier(nfes, batch=args.batch, seed=args.seed, mixture=args.mixture, progress=not args.quiet)
        if peers["peers_skipped"]:
            print(f"error: --peers could not measure {sorted(peers['peers_skipped'])}: {peers['peers_skipped']}",
                  file=sys.stderr)
            return 2
        write_frontier(peers, out, stem="peers")
    return 0


"""`sdekit sensitivity`: every method on one problem, a table, JSON of the numbers and PNG plots.

    sdekit sensitivity --problem gbm --paths 10000 --steps 200 [--scheme euler] [--out runs/sensitivity/gbm]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .._imports import pyplot
from ..sensitivity.compare import METHODS, run, strong_errors
from ..solvers import SCHEMES
from ..sensitivity.problems import PROBLEMS, make_problem

__all__ = ["main", "format_table"]


def _fmt(v: float) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def format_table(result: dict, max_params: int = 4) -> str:
    names = result["param_names"][:max_params]
    lines = [f"{result['problem']}: {result['description']}",
             f"paths={result['paths']} steps={result['steps']} scheme={result['scheme']}  memory: {result['memory']}",
             f"closed form: {', '.join(f'{n}={_fmt(v)}' for n, v in zip(names, result['exact']))}" if result["exact"]
             else "closed form: none"]
    head = f"{'method':<24}{'param':<8}{'estimate':>12}{'stderr':>12}{'var/path':>12}{'error':>12}{'time s':>10}{'peak MB':>10}"
    lines += [head, "-" * len(head)]
    for name, row in result["methods"].items():
        if "skipped" in row:
            lines.append(f"{name:<24}skipped: {row['skipped']}")
            continue
        for p, pname in enumerate(names):
            err = row["error"][p] if "error" in row else None
            tail = f"{row['seconds']:>10.3f}{row['peak_bytes'] / 2**20:>10.1f}" if p == 0 else ""
            lines.append(f"{name if p == 0 else '':<24}{pname:<8}{_fmt(row['estimate'][p]):>12}{_fmt(row['stderr'][p]):>12}"
                         f"{_fmt(row['per_path_variance'][p]):>12}{_fmt(err):>12}{tail}")
    return "\n".join(lines)


def _strong_schemes(strong: dict) -> list[str]:
    """The schemes in a strong_errors result (its other keys are the grid: steps, h)."""
    return [k for k, v in strong.items() if isinstance(v, dict) and "errors" in v]


def _plots(result: dict, strong: dict | None, out: Path) -> None:
    plt = pyplot("the sensitivity plots")

    if strong is not None:
        fig, ax = plt.subplots(figsize=(5, 4))
        for scheme in _strong_schemes(strong):
            ax.loglog(strong["h"], strong[scheme]["errors"], "o-",
                      label=f"{scheme}: slope {strong[scheme]['slope']:.2f} (order {strong[scheme]['order']})")
        ax.set_xlabel("step size h")
        ax.set_ylabel("mean |J_h(T) - J(T)|")
        ax.set_title(f"strong error of dX_T/dtheta, {result['problem']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "strong_error.png", dpi=120)
        plt.close(fig)
    rows = {k: v for k, v in result["methods"].items() if "skipped" not in v}
    names = result["param_names"][:4]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(names), 1)
    for p, pname in enumerate(names):
        vals = [rows[m]["per_path_variance"][p] for m in rows]
        ax.bar([i + p * width for i in range(len(rows))], [v if v == v and v > 0 else float("nan") for v in vals],
               width, label=pname)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(rows))], list(rows), rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("per-path variance of the estimator")
    ax.set_title(f"estimator variance, {result['problem']} (fd h={result['fd_h']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "variance.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sdekit sensitivity", description=__doc__.splitlines()[0])
    ap.add_argument("--problem", default="gbm", choices=sorted(PROBLEMS))
    ap.add_argument("--paths", type=int, default=10000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--scheme", default="euler", choices=sorted(SCHEMES), help="a scheme of sdekit.solvers.SCHEMES")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fd-h", type=float, default=1e-3, help="finite-difference step")
    ap.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    ap.add_argument("--strong-paths", type=int, default=1000, help="paths for the strong-error plot")
    ap.add_argument("--out", default=None, help="output folder (default runs/sensitivity/<problem>)")
    args = ap.parse_args(argv)
    if args.paths < 2 or args.steps < 1:
        ap.error(f"need --paths >= 2 and --steps >= 1, got {args.paths}, {args.steps}")
    problem = make_problem(args.problem)
    try:
        result = run(problem, args.paths, args.steps, args.scheme, args.seed, args.fd_h, args.methods)
    except ValueError as e:                      # e.g. a scheme a method cannot differentiate
        print(f"error: {e}", file=sys.stderr)
        return 2
    strong = strong_errors(problem, paths=args.strong_paths) if problem.exact_J is not None else None
    if strong is not None:
        result["strong_error"] = strong
    print(format_table(result))
    if strong is not None:
        print("strong order of J (fitted slope): " + ", ".join(f"{s} {strong[s]['slope']:.2f}" for s in _strong_schemes(strong)))
    out = Path(args.out or os.path.join("runs", "sensitivity", args.problem))
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=float))
    tmp.replace(out / "results.json")
    _plots(result, strong, out)
    print(f"wrote {out / 'results.json'} and plots in {out}")
    return 0

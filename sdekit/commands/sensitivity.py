"""`sdekit sensitivity`: every method on one problem, a table, JSON of the numbers and PNG plots.

    sdekit sensitivity --problem gbm [--scheme reversible_heun] [--paths N] [--steps N] [--out runs/sensitivity/gbm]

Under `accelerate launch` or `torchrun` the paths are shared out over the processes (whole path groups each) and
the estimates and standard errors are those of one process; the main process alone prints and writes files.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .._imports import pyplot
from ..sensitivity.compare import METHOD_HELP, METHODS, discrete_bias, run, strong_errors
from ..sensitivity.problems import PROBLEMS, make_problem
from ..solvers import SCHEMES
from ._style import log_limits, series_styles

__all__ = ["main", "format_table"]

COLUMNS = """columns of the table (several processes: the same estimates as one process; times are the slowest's):
  estimate     the method's estimate of dE[L]/dtheta_p (mean over paths, or over path groups)
  stderr       its standard error: sqrt(var/path / paths) for per-path methods; for methods that only return a
               mean gradient (adjoint, checkpoint, adjoint_torchsde) the spread of --groups group means
  var/path     the variance of the estimator per path (what one more path buys); the figure to compare methods by
  z (...)      (estimate - closed form) / stderr. "discrete": against dE[L(X_N)]/dtheta of this scheme's own chain
               on this grid, exact, so |z| > 4 means a wrong estimator; "continuous": against the SDE's limit, so
               z also measures the scheme's discretisation bias (large at many paths even for exact methods)
  warm s       wall time of a second, warm call (what a repeated solve costs)
  one-off s    first call minus warm call: tracing the step (forward, adjoint) or JIT compiling (diffrax)
  peak MiB     peak resident-memory increase during the warm call (2 ms sampling; ~0 means below resolution)"""


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.4g}"


def format_table(result: dict, max_params: int = 4) -> str:
    names = result["param_names"][:max_params]
    direction = (f"reverse time, t from {result['t0']:g} down to {result['t1']:g}" if result.get("reverse_time")
                 else f"t from {result['t0']:g} to {result['t1']:g}")
    calculus = ("Ito" if result.get("sde_type") == "ito" else
                "Stratonovich: the scheme solves dX = f dt + g o dW; the problem passes the Stratonovich drift of its "
                "Ito SDE, so the limit is the same")
    kind = result.get("closed_form_kind")
    lines = [f"{result['problem']}: {result['description']}",
             f"paths={result['paths']} steps={result['steps']} ({direction}), scheme={result['scheme']} ({calculus}), "
             f"noise={result.get('noise', 'diagonal')}, {result.get('threads', '?')} thread(s)"
             + (f" x {result['processes']} processes ({' + '.join(map(str, result['paths_per_process']))} paths)"
                if result.get("processes", 1) > 1 else "")]
    if kind is not None:
        what = ("of this scheme's discrete chain on this grid (exact)" if kind == "discrete" else
                "of the SDE (the continuous limit; no discrete closed form for this problem)")
        lines.append(f"closed form {what}: " + ", ".join(f"{n}={_fmt(v)}" for n, v in zip(names, result["closed_form"])))
    else:
        lines.append("closed form: none (compare the methods with each other)")
    if kind == "discrete" and result.get("continuous_limit") is not None:
        lines.append("continuous limit: " + ", ".join(f"{n}={_fmt(v)}" for n, v in zip(names, result["continuous_limit"]))
                     + ("  (the scheme's bias at this step: "
                        + ", ".join(_fmt(v) for v in result["discrete_bias"][:max_params]) + ")"
                        if result.get("discrete_bias") else ""))
    zhead = f"z ({kind})" if kind else "z"
    head = (f"{'method':<24}{'param':<9}{'estimate':>11}{'stderr':>10}{'var/path':>10}{zhead:>16}{'warm s':>9}"
            f"{'one-off s':>10}{'peak MiB':>9}")
    lines += [head, "-" * len(head)]
    for name, row in result["methods"].items():
        if "skipped" in row:
            lines.append(f"{name:<24}skipped: {row['skipped']}")
            continue
        for p, pname in enumerate(names):
            z = row["z"][p] if "z" in row else None
            tail = (f"{row['seconds']:>9.3f}{_fmt(row['one_off_seconds']):>10}{row['peak_bytes'] / 2**20:>9.1f}"
                    if p == 0 else "")
            lines.append(f"{name if p == 0 else '':<24}{pname:<9}{_fmt(row['estimate'][p]):>11}{_fmt(row['stderr'][p]):>10}"
                         f"{_fmt(row['per_path_variance'][p]):>10}{_fmt(z):>16}{tail}")
    if len(result["param_names"]) > max_params:
        lines.append(f"(first {max_params} of {len(result['param_names'])} parameters shown; all are in results.json)")
    groups = [n for n, r in result["methods"].items() if r.get("variance_from") == "group-means"]
    if groups:
        lines.append(f"{', '.join(groups)}: mean gradients; stderr and var/path from {result['groups']} group means")
    if "diffrax" in result["methods"] and "skipped" not in result["methods"]["diffrax"]:
        lines.append("diffrax: interop.diffrax.path_gradients jit-compiles on every call, so it runs once and its time "
                     "includes compiling")
    return "\n".join(lines)


def _strong_schemes(strong: dict) -> list[str]:
    """The schemes in a strong_errors result (its other keys are the grid: steps, h)."""
    return [k for k, v in strong.items() if isinstance(v, dict) and "errors" in v]


def _plots(result: dict, strong: dict | None, out: Path) -> None:
    plt = pyplot("the sensitivity plots")

    if strong is not None:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        schemes = _strong_schemes(strong)
        for scheme, style in zip(schemes, series_styles(len(schemes))):   # equal errors still show both lines
            ax.loglog(strong["h"], strong[scheme]["errors"], **style,
                      label=f"{scheme}: slope {strong[scheme]['slope']:.2f} (order {strong[scheme]['order']})")
        ax.set_xlabel("step size h")
        ax.set_ylabel("mean |J_h(T) - J(T)|")
        ax.set_title(f"strong error of dX_T/dtheta, {result['problem']}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "strong_error.png", dpi=120)
        plt.close(fig)
    rows = {k: v for k, v in result["methods"].items() if "skipped" not in v}
    names = result["param_names"][:4]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(len(names), 1)
    for p, pname in enumerate(names):
        vals = [rows[m]["per_path_variance"][p] for m in rows]
        axes[0].bar([i + p * width for i in range(len(rows))], [v if v == v and v > 0 else float("nan") for v in vals],
                    width, label=pname)
    axes[0].set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(rows))], list(rows), rotation=30, ha="right")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("per-path variance of the estimator")
    axes[0].set_title(f"estimator variance, {result['problem']} (fd h={result['fd_h']})")
    axes[0].set_ylim(*log_limits([v for m in rows for v in rows[m]["per_path_variance"][:len(names)]]))
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)   # beside the bars, not on them
    axes[1].bar(list(rows), [rows[m]["seconds"] for m in rows], label="warm")
    axes[1].bar(list(rows), [rows[m]["one_off_seconds"] or 0.0 for m in rows], bottom=[rows[m]["seconds"] for m in rows],
                label="one-off (trace / compile)")
    axes[1].set_yscale("log")   # the limits hold the smallest warm time and the tallest stacked bar
    axes[1].set_ylim(*log_limits([rows[m]["seconds"] for m in rows]
                                 + [rows[m]["seconds"] + (rows[m]["one_off_seconds"] or 0.0) for m in rows]))
    axes[1].set_ylabel("seconds")
    axes[1].set_title(f"time, {result['paths']} paths x {result['steps']} steps, scheme {result['scheme']}")
    axes[1].tick_params(axis="x", rotation=30)
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)   # beside the bars, not on them
    fig.tight_layout()
    fig.savefig(out / "variance.png", dpi=120)
    plt.close(fig)


def _epilog() -> str:
    probs = []
    for name in PROBLEMS:
        pb = make_problem(name)
        cf = ("discrete + continuous closed forms" if pb.linear and pb.exact_grad is not None else
              "discrete closed form" if pb.linear else "continuous-limit closed form" if pb.exact_grad is not None
              else "no closed form")
        probs.append(f"  {name:<16}{pb.description}; {pb.noise} noise, {'reverse' if pb.reverse_time else 'forward'} "
                     f"time, P={pb.P}; {cf}; default {pb.paths} paths x {pb.steps} steps")
    meths = [f"  {m:<24}{METHOD_HELP[m]}" for m in METHODS]
    schemes = [f"  {n:<16}{s.sde_type}, noise types {', '.join(s.noise_types)}"
               + ("; exact inverse step (reversible adjoint)" if s.inverse is not None else "")
               + ("; reads Levy areas" if s.needs_levy_area else "") for n, s in SCHEMES.items()]
    return ("problems:\n" + "\n".join(probs) + "\n\nmethods:\n" + "\n".join(meths) + "\n\nschemes:\n" + "\n".join(schemes)
            + "\n  Stratonovich schemes solve dX = f dt + g o dW; each problem passes them its Stratonovich drift\n"
            "  (f - 1/2 sum g_kj d_k g_ij), so every scheme targets the same Ito SDE and has the same continuous limit\n\n"
            + COLUMNS + "\n\nwrites <out>/results.json (every number, every parameter), variance.png and, "
            "for problems with a pathwise closed form (gbm), strong_error.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sdekit sensitivity", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_epilog())
    ap.add_argument("--problem", default="gbm", choices=list(PROBLEMS), help="the SDE, parameters and loss (below)")
    ap.add_argument("--paths", type=int, default=None, help="Monte Carlo paths (default: the problem's own)")
    ap.add_argument("--steps", type=int, default=None, help="time steps (default: the problem's own)")
    ap.add_argument("--scheme", default="euler", choices=list(SCHEMES), help="a scheme of sdekit.solvers.SCHEMES (below)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fd-h", type=float, default=1e-3, help="finite-difference step")
    ap.add_argument("--methods", nargs="+", default=None, choices=METHODS, help="a subset of the methods (default: all)")
    ap.add_argument("--groups", type=int, default=20, help="path groups for the mean-gradient methods' standard errors")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared machine extra threads spin-wait and make "
                         "timings erratic, as in the benchmarks)")
    ap.add_argument("--strong-paths", type=int, default=1000, help="paths for the strong-error plot (0: skip it)")
    ap.add_argument("--out", default=None, help="output folder (default runs/sensitivity/<problem>)")
    ap.add_argument("--timeout", type=float, default=1800.0,
                    help="seconds a process waits for the others at a reduction before failing (several processes)")
    args = ap.parse_args(argv)
    if (args.paths is not None and args.paths < 4) or (args.steps is not None and args.steps < 1):
        ap.error(f"need --paths >= 4 and --steps >= 1, got {args.paths}, {args.steps}")
    if args.threads < 1 or args.groups < 2:
        ap.error(f"need --threads >= 1 and --groups >= 2, got {args.threads}, {args.groups}")
    if args.threads == 1:                        # JAX (the diffrax method) reads this when it is first imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1").strip()
    import torch

    from ..config import ConfigError
    from ..distributed import processes
    torch.set_num_threads(args.threads)
    problem = make_problem(args.problem)
    try:
        procs = processes(timeout=args.timeout)   # one process, or one of several under accelerate launch / torchrun
        result = run(problem, args.paths, args.steps, args.scheme, args.seed, args.fd_h, args.methods, args.groups,
                     procs=procs)
    except (ValueError, ConfigError) as e:       # e.g. a scheme that does not take the problem's noise type
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not procs.is_main:                        # the main process has the same numbers: it alone writes them
        return 0
    result["discrete_bias"] = discrete_bias(problem, args.scheme, result["steps"])
    strong = (strong_errors(problem, paths=args.strong_paths)
              if problem.exact_J is not None and args.strong_paths > 0 else None)
    if strong is not None:
        result["strong_error"] = strong
    print(format_table(result))
    if strong is not None:
        print("strong order of J (fitted slope, nominal): " + ", ".join(
            f"{s} {strong[s]['slope']:.2f} ({strong[s]['order']})" for s in _strong_schemes(strong)))
    out = Path(args.out or os.path.join("runs", "sensitivity", args.problem))
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=float))
    tmp.replace(out / "results.json")
    _plots(result, strong, out)
    print(f"wrote {out / 'results.json'} and plots in {out}")
    return 0

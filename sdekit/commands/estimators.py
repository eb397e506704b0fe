"""`sdekit estimators`: per-sample variance of every gradient estimator across families, objectives and
dimension (the classic exercise), where the score function wins and why, the z-scores against the closed
forms judged as multiple comparisons, where the pathwise estimator fails (with a detector and the
unbiased alternatives), and the bias of the Gumbel-softmax relaxation against temperature
(sdekit.estimators.report computes them).

Writes estimators.md (tables), estimators.json (all numbers) and estimators.png / concrete.png /
failures.png into --out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .._imports import pyplot
from ..distributed import processes
from ..estimators.families import CONTINUOUS, DISCRETE
from ..estimators.gradients import ESTIMATORS
from ..estimators.oracles import OBJECTIVES
from ..estimators.report import (
    concrete_bias,
    counter_cases,
    dimension_slopes,
    failure_modes,
    frequency_sweep,
    markdown,
    variance_sweep,
    z_summary,
)

__all__ = ["main", "plot"]


def plot(rows: list[dict], bias_rows: list[dict], out: Path, failure_rows: list[dict] | None = None,
         freq_rows: list[dict] | None = None) -> None:
    plt = pyplot("the estimators plots")

    fams = list(dict.fromkeys(r["family"] for r in rows))
    objs = list(dict.fromkeys(r["objective"] for r in rows))
    fig, axes = plt.subplots(len(objs), len(fams), figsize=(3.2 * len(fams), 2.8 * len(objs)), squeeze=False)
    for i, obj in enumerate(objs):
        for j, fam in enumerate(fams):
            ax = axes[i][j]
            for k, est in enumerate(ESTIMATORS):
                # floor: a control variate that is exact (categorical, K=2) has round-off variance
                pts = sorted((r["d"], max(r["variance_mean"], 1e-12)) for r in rows
                             if r["family"] == fam and r["objective"] == obj and r["estimator"] == est)
                if pts:
                    ax.plot(*zip(*pts), "o-", ms=3, color=f"C{k}", label=est)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{fam}, {obj}", fontsize=9)
            if i == len(objs) - 1:
                ax.set_xlabel("dimension d")
            if j == 0:
                ax.set_ylabel("per-sample variance")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("per-sample variance of one-sample gradient estimates (mean over parameters; floored at 1e-12)")
    fig.tight_layout()
    fig.savefig(out / "estimators.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for obj in dict.fromkeys(r["objective"] for r in bias_rows):
        for hard, style in ((False, "o-"), (True, "s--")):
            pts = sorted((r["temperature"], r["bias_norm"], r["variance_mean"]) for r in bias_rows
                         if r["objective"] == obj and r["straight_through"] == hard)
            t, b, v = zip(*pts)
            lab = f"{obj}{' (straight-through)' if hard else ''}"
            ax[0].loglog(t, b, style, label=lab)
            ax[1].loglog(t, v, style, label=lab)
    ax[0].set(xlabel="temperature", ylabel="||bias||", title="Gumbel-softmax gradient bias")
    ax[1].set(xlabel="temperature", ylabel="per-sample variance", title="... and variance")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "concrete.png", dpi=100)
    plt.close(fig)

    if not (failure_rows or freq_rows):
        return
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    if freq_rows:
        w = [r["w"] for r in freq_rows]
        for key, lab, c in (("pathwise", "pathwise", "C0"), ("score", "score function", "C1")):
            ax[0].loglog(w, [r[f"{key}_exact"] for r in freq_rows], "-", color=c, label=f"{lab} (exact)")
            ax[0].loglog(w, [r[f"{key}_mc"] for r in freq_rows], "o", color=c, label=f"{lab} (Monte Carlo)")
        ax[0].set(xlabel="frequency w", ylabel="per-sample variance",
                  title="d/dmu E[sin(w z)], z ~ N(mu, 1): shape decides")
        ax[0].legend(fontsize=7)
    for r in failure_rows or []:
        for hard, style in ((False, "o-"), (True, "s--")):
            pts = sorted((q["temperature"], q["bias_norm"], q["stderr_norm"]) for q in r["relaxed"]
                         if q["straight_through"] == hard)
            if pts:
                t, b, se = zip(*pts)
                ax[1].errorbar(t, b, yerr=se, fmt=style, ms=4, capsize=2,
                               label=f"{r['case']}{' straight-through' if hard else ' relaxed'}")
    ax[1].set(xscale="log", yscale="log", xlabel="temperature", ylabel="||bias|| (error bar: ||stderr||)",
              title="relaxed discrete latents: bias against the exact gradient")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "failures.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sdekit estimators", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/estimators")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=4000, help="samples per (family, f, d, estimator)")
    p.add_argument("--dims", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--families", nargs="+", default=list(CONTINUOUS + DISCRETE), choices=list(CONTINUOUS + DISCRETE))
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    p.add_argument("--failure-n", type=int, default=20000, help="samples per estimate in the failure-mode section")
    args = p.parse_args(argv)
    if args.n < 2 or args.failure_n < 2 or min(args.dims) < 1:
        p.error("--n and --failure-n must be >= 2 and every --dims entry >= 1")
    procs = processes()           # one process, or one of several under accelerate launch / torchrun
    rows = variance_sweep(args.families, args.objectives, args.dims, args.n, seed=args.seed, procs=procs)
    if not procs.is_main:         # the sweep's cells are shared out; the rest is the main process's
        return 0
    bias_rows = concrete_bias(objectives=args.objectives, n=max(args.n, 2000),
                              generator=torch.Generator().manual_seed(args.seed))
    freq_rows = frequency_sweep(n=args.failure_n, seed=args.seed)
    failure_rows = failure_modes(args.failure_n, generator=torch.Generator().manual_seed(args.seed))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(rows, bias_rows, failure_rows, freq_rows)
    print(md)
    (out / "estimators.md").write_text(md)
    (out / "estimators.json").write_text(json.dumps(
        {"seed": args.seed, "processes": procs.world, "variance": rows, "z_summary": z_summary(rows),
         "counter_cases": counter_cases(rows), "dimension_slopes": dimension_slopes(rows),
         "frequency_sweep": freq_rows, "failure_modes": failure_rows, "concrete_bias": bias_rows}, indent=1))
    plot(rows, bias_rows, out, failure_rows, freq_rows)
    print(f"wrote {out}/estimators.md, estimators.json, estimators.png, concrete.png, failures.png")
    return 0

"""`sdekit estimators`: per-sample variance of every gradient estimator across families, objectives and
dimension (the classic exercise), plus the bias of the Gumbel-softmax relaxation against temperature.

Writes estimators.md (tables), estimators.json (all numbers) and estimators.png / concrete.png into --out.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from .families import CONTINUOUS, Concrete, make_family
from .gradients import ESTIMATORS, estimate_gradient
from .oracles import OBJECTIVES, exact_gradient, make_objective

__all__ = ["variance_sweep", "concrete_bias", "main"]

SCORE_ONLY = ("score", "score_baseline", "score_optimal", "control_variate")


def variance_sweep(families=CONTINUOUS + ("categorical",), objectives=OBJECTIVES, dims=(1, 2, 4, 8, 16, 32),
                   n: int = 4000, *, seed: int = 0, progress: bool = True) -> list[dict]:
    """One row per (family, objective, d, estimator): mean per-parameter variance of a one-sample
    estimate, total variance (trace), and the largest |z| of the estimate against the exact gradient.

    Within a (family, objective, d) cell every estimator starts from the same seed, so the score-type
    estimators see the same z (common random numbers) and their variances compare pairwise; the pilot
    batches for baselines and control variates have n samples too.
    """
    jobs = [(fam, obj, d) for fam in families for obj in objectives for d in dims if not (fam == "categorical" and d < 2)]
    rows = []
    for j, (fam_name, obj_name, d) in enumerate(tqdm(jobs, desc="estimators", disable=not progress)):
        fam, f = make_family(fam_name, d), make_objective(obj_name, d)
        exact = exact_gradient(fam, f)
        for est in ESTIMATORS:
            if est == "pathwise" and not fam.reparameterizable:
                continue
            options = {} if est in ("pathwise", "score") else {"n_pilot": n}
            gen = torch.Generator().manual_seed(seed * 100_003 + j)
            r = estimate_gradient(fam, f, est, n, generator=gen, **options)
            rows.append({"family": fam_name, "objective": obj_name, "d": d, "estimator": est, "n": n,
                         "variance_mean": r.variance.mean().item(), "variance_total": r.variance.sum().item(),
                         "max_abs_z": r.z_scores(exact).abs().max().item(),
                         "grad_norm": exact.norm().item()})
    return rows


def concrete_bias(K: int = 5, temperatures=(2.0, 1.0, 0.5, 0.25, 0.1), objectives=OBJECTIVES, n: int = 20000, *,
                  generator: torch.Generator | None = None) -> list[dict]:
    """Bias ||E[pathwise] - exact categorical gradient|| of the relaxed and straight-through Gumbel-softmax
    gradients, with the standard error of that norm's vector (||stderr||) and the per-sample variance."""
    rows = []
    for obj_name in objectives:
        f = make_objective(obj_name, K)
        for hard in (False, True):
            for tau in temperatures:
                fam = Concrete(K, tau, hard=hard)
                r = estimate_gradient(fam, f, "pathwise", n, generator=generator)
                exact = exact_gradient(fam, f)
                rows.append({"objective": obj_name, "straight_through": hard, "temperature": tau, "n": n,
                             "bias_norm": (r.mean - exact).norm().item(), "stderr_norm": r.stderr.norm().item(),
                             "variance_mean": r.variance.mean().item(), "grad_norm": exact.norm().item()})
    return rows


def markdown(rows: list[dict], bias_rows: list[dict]) -> str:
    ests = list(ESTIMATORS)
    out = ["## Per-sample variance of d/dtheta E_q[f] (mean over parameters)\n",
           "Ratio columns: variance relative to pathwise. max|z|: worst coordinate of the estimate against the"
           " closed-form gradient, in standard errors.\n",
           "| family | f | d | " + " | ".join(ests) + " | score/pathwise | max abs z |",
           "|---|---|---:|" + "---:|" * len(ests) + "---:|---:|"]
    key = {}
    for r in rows:
        key.setdefault((r["family"], r["objective"], r["d"]), {})[r["estimator"]] = r
    for (fam, obj, d), by in key.items():
        cells = [f"{by[e]['variance_mean']:.3g}" if e in by else "-" for e in ests]
        ratio = by["score"]["variance_mean"] / by["pathwise"]["variance_mean"] if "pathwise" in by else math.nan
        z = max(r["max_abs_z"] for r in by.values())
        out.append(f"| {fam} | {obj} | {d} | " + " | ".join(cells) + f" | {ratio:.3g} | {z:.2f} |")
    out += ["\n## Gumbel-softmax / Concrete: bias of the pathwise gradient against the categorical gradient\n",
            "| f | straight-through | temperature | bias norm | stderr norm | variance |", "|---|---|---:|---:|---:|---:|"]
    for r in bias_rows:
        out.append(f"| {r['objective']} | {r['straight_through']} | {r['temperature']} | {r['bias_norm']:.4f} | "
                   f"{r['stderr_norm']:.4f} | {r['variance_mean']:.3g} |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], bias_rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sdekit estimators", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/estimators")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=4000, help="samples per (family, f, d, estimator)")
    p.add_argument("--dims", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--families", nargs="+", default=list(CONTINUOUS) + ["categorical"],
                   choices=list(CONTINUOUS) + ["categorical"])
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    args = p.parse_args(argv)
    if args.n < 2 or min(args.dims) < 1:
        p.error("--n must be >= 2 and every --dims entry >= 1")
    rows = variance_sweep(args.families, args.objectives, args.dims, args.n, seed=args.seed)
    bias_rows = concrete_bias(objectives=args.objectives, n=max(args.n, 2000),
                              generator=torch.Generator().manual_seed(args.seed))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(rows, bias_rows)
    print(md)
    (out / "estimators.md").write_text(md)
    (out / "estimators.json").write_text(json.dumps({"seed": args.seed, "variance": rows, "concrete_bias": bias_rows}, indent=1))
    plot(rows, bias_rows, out)
    print(f"wrote {out}/estimators.md, estimators.json, estimators.png, concrete.png")
    return 0

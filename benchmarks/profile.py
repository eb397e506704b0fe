"""`python -m benchmarks.profile [--problem neural|gbm] [--batch B] [--steps N] [--scheme euler|milstein]`:
where a solve's time goes, op by op (torch.profiler), for sdekit.simulate and the plain torch loop.

Prints each method's ops per step and the share of its CPU time per op, and writes profile.json into --out.
This is the measurement behind README's "when each fast path pays off": a step that is a few large ops
(network drift, big batch) is bound by those ops in every simulator; one of many small ops is bound by
the number of launches, which tracing cuts.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from sdekit import simulate

from . import problems


def op_table(fn, steps: int, device: str) -> dict:
    """Run fn once to warm up, then once under the profiler: {ops_per_step, total_ms, ops: [(name, calls/step, share)]}."""
    fn()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        fn()
    # Top-level aten ops only: an op's children (e.g. addmm's internal copies) are inside its self time's parent.
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = sorted(((e.key, e.count / steps, e.self_cpu_time_total / total) for e in events), key=lambda r: -r[2])
    return {"ops_per_step": sum(e.count for e in events) / steps, "aten_self_ms": total / 1e3,
            "ops": [dict(op=k, calls_per_step=c, share=s) for k, c, s in rows if s >= 0.005]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--problem", choices=("neural", "gbm"), default="neural")
    p.add_argument("--batch", type=int, default=10_000)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--scheme", choices=("euler", "milstein"), default="euler")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/profile")
    args = p.parse_args(argv)
    if args.batch < 1 or args.steps < 1:
        p.error("--batch and --steps must be >= 1")
    torch.set_num_threads(args.threads)
    prob = problems.gbm(args.device) if args.problem == "gbm" else problems.neural(device=args.device)
    x0 = prob.x0(args.batch)
    ts = torch.linspace(0.0, 1.0, args.steps + 1, device=args.device)
    gen = lambda: torch.Generator(device=args.device).manual_seed(0)
    mil = args.scheme == "milstein"
    methods = {
        "sdekit.simulate": lambda: simulate(prob.f, prob.g, x0, prob.theta, ts, scheme=args.scheme, generator=gen(),
                                            dg=prob.dg if mil else None),
        "sdekit.simulate(trace=True)": lambda: simulate(prob.f, prob.g, x0, prob.theta, ts, scheme=args.scheme,
                                                        generator=gen(), dg=prob.dg if mil else None, trace=True),
        "plain torch loop": lambda: problems.plain_loop(prob, x0, 1.0, args.steps, gen(), milstein=mil),
    }
    result = {"problem": prob.name, "batch": args.batch, "steps": args.steps, "scheme": args.scheme,
              "device": args.device, "threads": args.threads,
              "methods": {k: op_table(fn, args.steps, args.device) for k, fn in methods.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(result, indent=1))
    for name, r in result["methods"].items():
        print(f"\n{name}: {r['ops_per_step']:.1f} aten ops per step, {r['aten_self_ms']:.0f} ms of op time")
        for row in r["ops"][:12]:
            print(f"  {row['op']:<28} {row['calls_per_step']:5.2f}/step  {100 * row['share']:5.1f}%")
    print(f"\nwrote {out / 'profile.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m benchmarks.run [--quick] [--device cuda] [--out runs/bench]`: every benchmark, one report.

Writes bench.json (all numbers), bench.md (tables, targets met or not) and PNG plots into --out. Every
figure is a ratio against a baseline measured in the same run, from medians of interleaved repeats.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

SECTIONS = ("simulation", "adaptive", "sensitivity", "samplers", "training")
PROBLEMS = ("gbm", "neural", "scalar", "additive", "general")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (a few minutes)")
    p.add_argument("--out", default="runs/bench", help="output folder (default runs/bench)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1,
                   help="torch/XLA intra-op threads (default 1: on a shared machine extra threads spin-wait and "
                        "make timings erratic)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per method (default 3 quick, 5 full)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--compile", default="default", nargs="?", const="default",
                   help="the torch.compile mode of the `simulate(compile=...)` Euler row (default: torch's default; "
                        "e.g. reduce-overhead for CUDA graphs), or none to leave the row out")
    p.add_argument("--no-jax", action="store_true", help="skip the JAX/diffrax rows")
    p.add_argument("--batches", default=None, help="simulation batch sizes, comma-separated (default 1e3,1e4 quick; 1e3,1e4,1e5 full)")
    p.add_argument("--schemes", default=None,
                   help="simulation schemes, comma-separated registry names (default: every registered scheme)")
    p.add_argument("--problems", default=",".join(PROBLEMS),
                   help=f"simulation problems, a subset of {','.join(PROBLEMS)} (the last three: noise types)")
    args = p.parse_args(argv)
    sections = [s for s in args.only.split(",") if s]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {bad}; expected a subset of {SECTIONS}")
    which = tuple(s for s in args.problems.split(",") if s)
    if not which or any(s not in PROBLEMS for s in which):
        p.error(f"--problems must be a comma-separated subset of {','.join(PROBLEMS)}, got {args.problems!r}")
    schemes = tuple(s for s in args.schemes.split(",") if s) if args.schemes else None
    if schemes is not None:
        from sdekit.solvers import SCHEMES
        if not schemes or any(s not in SCHEMES for s in schemes):
            p.error(f"--schemes must be a comma-separated subset of {','.join(SCHEMES)}, got {args.schemes!r}")
    try:
        batches = tuple(int(float(b)) for b in args.batches.split(",")) if args.batches else None
    except ValueError:
        p.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if batches and min(batches) < 1:
        p.error(f"--batches must be >= 1, got {args.batches!r}")
    if args.threads > 1:
        os.environ.setdefault("XLA_FLAGS", "")
    else:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1").strip()
    import torch
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.compile in ("none", "no", "off"):
        args.compile = None
    jax_ok = not args.no_jax and _has("jax") and _has("diffrax")
    repeats = args.repeats or (3 if args.quick else 5)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from . import report
    result = {"config": dict(quick=args.quick, device=args.device, threads=args.threads, repeats=repeats,
                             compile=args.compile, jax=jax_ok, torch=torch.__version__, python=platform.python_version(),
                             machine=_machine(args.device), cpus=os.cpu_count(), torchsde=_has("torchsde"))}
    t_start = time.perf_counter()
    for s in sections:
        t0 = time.perf_counter()
        print(f"[{s}]", flush=True)
        if s == "simulation":
            from . import simulation
            result[s] = simulation.run(args.quick, args.device, repeats, args.compile, jax_ok, batches=batches, which=which,
                                       schemes=schemes)
        elif s == "adaptive":
            from . import simulation
            result[s] = simulation.adaptive_run(args.quick, args.device)
        elif s == "sensitivity":
            from . import sensitivity
            result[s] = sensitivity.run(args.quick, args.device, repeats, jax_ok)
        elif s == "samplers":
            from . import samplers
            result[s] = samplers.run(args.quick, args.device, repeats)
        else:
            from . import training
            result[s] = training.run(args.quick, args.device, args.threads)
        result[s]["elapsed_s"] = time.perf_counter() - t0
        report.write(result, out)                  # after every section, so a long run leaves partial results
    result["elapsed_s"] = time.perf_counter() - t_start
    report.write(result, out)
    print(report.markdown(result))
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'} and plots in {time.perf_counter() - t_start:.0f} s")
    return 0


def _has(mod: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(mod) is not None


def _machine(device: str) -> str:
    import torch
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


if __name__ == "__main__":
    sys.exit(main())

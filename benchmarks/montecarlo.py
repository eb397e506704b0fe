"""`python -m benchmarks.montecarlo [--quick] [--out runs/bench/montecarlo]`: the cost of keyed noise, and the
speed-up of several processes.

1. The keyed Brownian stream (`sdekit.solvers.keyed`, path b's noise a function of (seed, b)) against the chunked
   stream `simulate(generator=...)` draws (`normal_chunks`): the RNG floor of benchmarks/simulation.py (the
   increments alone, drawn and scaled chunk by chunk), both in this process, interleaved; the ratio keyed / chunked.
2. `sdekit.montecarlo.gradient` (forward sensitivities of the neural SDE problem) on 1 and on 2 processes under
   torchrun (gloo, CPU), the timed call after a warm-up one, wall time of the main process (which waits for the
   other at the reduction); the speed-up t(1) / t(2), interleaved 1, 2, 1, 2, ...

Writes montecarlo.json and montecarlo.md into --out. On a machine shared with other jobs the ratios move from run to
run: the report gives every repeat.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


# --- 1. keyed stream against the chunked one ----------------------------------------------------------------------
def keyed_floor(N: int, B: int, m: int, ts: torch.Tensor, seed: int, block: int) -> None:
    """What `rng_floor` does with the keyed stream: the normals of paths [0, B), scaled by sqrt(|h|) per chunk."""
    from sdekit.solvers.keyed import keyed_normal_chunks

    scale = (ts[1:] - ts[:-1]).abs().sqrt()
    n = 0
    for z in keyed_normal_chunks(N, 0, B, m, seed, block=block, dtype=ts.dtype, device=ts.device):
        c = z.shape[0]
        z.mul_(scale[n:n + c, None, None])
        n += c


def rng_rows(quick: bool, repeats: int) -> list[dict]:
    from benchmarks.simulation import rng_floor
    from benchmarks.timing import interleaved

    shapes = [(10_000, 1, 1000), (10_000, 16, 100)] if quick else [(100_000, 1, 1000), (10_000, 1, 1000),
                                                                   (10_000, 16, 100)]
    rows = []
    for B, m, N in shapes:
        ts = torch.linspace(0.0, 1.0, N + 1, dtype=torch.float32)
        fns = {"chunked (RNG floor)": lambda N=N, B=B, m=m, ts=ts: rng_floor(N, (B, m), ts,
                                                                       torch.Generator().manual_seed(0)),
               "keyed, block 1024": lambda N=N, B=B, m=m, ts=ts: keyed_floor(N, B, m, ts, 0, 1024),
               "keyed, block 4096": lambda N=N, B=B, m=m, ts=ts: keyed_floor(N, B, m, ts, 0, 4096)}
        res = interleaved(fns, repeats)
        base = res["chunked (RNG floor)"]["median_s"]
        for name, r in res.items():
            rows.append({"B": B, "m": m, "N": N, "method": name, "median_s": r["median_s"], "times_s": r["times_s"],
                         "vs_chunked": r["median_s"] / base})
    return rows


# --- 2. processes ---------------------------------------------------------------------------------------------------
def worker(paths: int, steps: int) -> None:
    """One process of the speed-up measurement (under torchrun, or alone): prints the main process's JSON line."""
    from sdekit import montecarlo
    from sdekit.sensitivity.problems import make_problem

    torch.set_num_threads(1)
    procs = montecarlo.processes(timeout=600)
    pb = make_problem("neural")
    ts = pb.ts(steps)
    x0 = pb.x0(1)[0]

    def run(n: int):
        return montecarlo.gradient(pb.f, pb.g, x0, pb.theta, ts, pb.loss, n, seed=0, batch=1024, procs=procs)
    run(2048 * procs.world)                                    # warm-up: traces the step on every process
    t0 = time.perf_counter()
    est = run(paths)
    seconds = time.perf_counter() - t0
    if procs.is_main:
        print("RESULT " + json.dumps({"processes": procs.world, "seconds": seconds, "paths": paths,
                                      "paths_per_process": est.paths_per_process, "mean": est.mean.tolist(),
                                      "stderr": est.stderr.tolist()}), flush=True)


def _launch(n_proc: int, paths: int, steps: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("ACCELERATE_USE_CPU", None)
    me = ["-m", "benchmarks.montecarlo", "--worker", "--paths", str(paths), "--steps", str(steps)]
    launcher = [] if n_proc == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n_proc)]
    cmd = [sys.executable, *launcher, *me]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{n_proc}-process run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def process_rows(quick: bool, repeats: int) -> dict:
    paths, steps = (8_192, 50) if quick else (32_768, 50)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(repeats):
        for n in (1, 2):
            runs[n].append(_launch(n, paths, steps))
    t1 = statistics.median(r["seconds"] for r in runs[1])
    t2 = statistics.median(r["seconds"] for r in runs[2])
    same = all(r["mean"] == runs[1][0]["mean"] and r["stderr"] == runs[1][0]["stderr"] for r in runs[1] + runs[2])
    return {"problem": "neural", "method": "forward", "paths": paths, "steps": steps, "cores": os.cpu_count(),
            "seconds_1": [r["seconds"] for r in runs[1]], "seconds_2": [r["seconds"] for r in runs[2]],
            "median_1": t1, "median_2": t2, "speedup": t1 / t2,
            "speedups": [a["seconds"] / b["seconds"] for a, b in zip(runs[1], runs[2])],
            "paths_per_process_2": runs[2][0]["paths_per_process"], "bitwise_equal_estimates": same}


def report(result: dict) -> str:
    lines = ["## Keyed Brownian stream vs the chunked stream (RNG floor), float32, 1 thread", "",
             "| B | m | N | method | median s | vs chunked |", "|---|---|---|---|---|---|"]
    for r in result["rng"]:
        lines.append(f"| {r['B']} | {r['m']} | {r['N']} | {r['method']} | {r['median_s']:.4f} | "
                     f"{r['vs_chunked']:.2f} |")
    p = result.get("processes")
    if p:
        lines += ["", f"## 2 processes vs 1 (torchrun, gloo, CPU, {p['cores']} cores): montecarlo.gradient, "
                  f"{p['problem']} problem, {p['method']}, {p['paths']} paths x {p['steps']} steps", "",
                  f"1 process: {', '.join(f'{s:.2f}' for s in p['seconds_1'])} s; "
                  f"2 processes: {', '.join(f'{s:.2f}' for s in p['seconds_2'])} s; "
                  f"speed-up (median) {p['speedup']:.2f}x, per pair {', '.join(f'{s:.2f}' for s in p['speedups'])}; "
                  f"estimates bitwise equal: {p['bitwise_equal_estimates']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.montecarlo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3)")
    ap.add_argument("--only", default="rng,processes", help="rng, processes or both (comma-separated)")
    ap.add_argument("--out", default="runs/bench/montecarlo")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--paths", type=int, default=65_536, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=100, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.paths, args.steps)
        return 0
    torch.set_num_threads(1)
    repeats = args.repeats or 3
    only = set(args.only.split(","))
    result: dict = {"rng": rng_rows(args.quick, repeats) if "rng" in only else []}
    if "processes" in only:
        result["processes"] = process_rows(args.quick, repeats)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "montecarlo.json").write_text(json.dumps(result, indent=1))
    text = report(result)
    (out / "montecarlo.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

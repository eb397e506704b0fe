"""Training throughput: steps per second of `train.py` for the toy config (and digits when present), 1 vs 2 processes.

Each configuration runs twice, for S1 and S2 steps, in fresh processes; (S2 - S1) / (t2 - t1) is the
steady-state rate with start-up, data loading and the final checkpoint cancelled out. Two processes
run under `accelerate launch` on CPU (gloo); every process gets the same number of threads.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(config: str, steps: int, procs: int, threads: int, device: str, out: str) -> float:
    args = [f"train.steps={steps}", f"train.out_dir={out}", f"train.ckpt_every={steps}", "train.log_every=1000000"]
    if procs == 1:
        cmd = [sys.executable, "train.py", "--config", config, "--no-progress", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "train.py", "--config", config, "--no-progress", *args]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    if device == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... exited {r.returncode}: {r.stderr[-600:]}")
    return time.perf_counter() - t0


def run(quick: bool, device: str, threads: int, progress=print) -> dict:
    configs = [("configs/ring.yaml", (50, 300) if quick else (100, 1100))]
    if (ROOT / "configs/digits.yaml").is_file():
        configs.append(("configs/digits.yaml", (5, 45) if quick else (10, 110)))
    procs_list = (1,) if device != "cpu" and _gpus() < 2 else (1, 2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config, (s1, s2) in configs:
            for procs in procs_list:
                try:
                    times = [_run(config, s, procs, threads, device, f"{tmp}/{Path(config).stem}_{procs}_{s}") for s in (s1, s2)]
                    # start-up noise can exceed the extra steps' time; then there is no rate to report
                    rate = (s2 - s1) / (times[1] - times[0]) if times[1] > times[0] else float("nan")
                    rows.append(dict(config=config, processes=procs, threads_per_process=threads, steps=[s1, s2],
                                     wall_s=times, steps_per_s=rate))
                except Exception as e:  # noqa: BLE001 - a failed launch is reported in the table
                    rows.append(dict(config=config, processes=procs, error=f"{type(e).__name__}: {e}"[:600]))
            one = next((r for r in rows if r["config"] == config and r["processes"] == 1 and "steps_per_s" in r), None)
            for r in rows:
                if r["config"] == config and one and "steps_per_s" in r:
                    r["speedup_vs_1_process"] = r["steps_per_s"] / one["steps_per_s"]
            progress(f"  training {config}: " + ", ".join(f"{r['processes']} proc {r.get('steps_per_s', float('nan')):.1f} steps/s"
                                                         for r in rows if r["config"] == config))
    return {"rows": rows, "note": "global batch as in the config (each of 2 processes computes half of it)"}


def _gpus() -> int:
    import torch
    return torch.cuda.device_count()

"""Monte Carlo with 2 real processes (gloo on CPU) under torchrun and accelerate launch: the estimates and standard
errors of one process, each process running its share, and a killed process named in an error instead of a hang.

The launches take 10-40 s each on a loaded 2-core machine: the equality tests are marked slow (CI runs them, .ci/run);
the default run keeps the killed-process test."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdekit.montecarlo import Processes

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests/_dist_montecarlo.py"
SDEKIT = shutil.which("sdekit", path=str(Path(sys.executable).parent)) or shutil.which("sdekit")


def _env(accelerate: bool) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("ACCELERATE_USE_CPU", None)            # torchrun alone must join one gloo group on CPU
    if accelerate:
        env["ACCELERATE_USE_CPU"] = "1"
    return env


def _torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(False), capture_output=True, text=True, timeout=timeout)


def _close(a, b, rtol=1e-9):
    """Equal to rtol relative (elementwise over nested lists of floats)."""
    if isinstance(a, list):
        assert len(a) == len(b)
        return all(_close(x, y, rtol) for x, y in zip(a, b))
    return abs(a - b) <= rtol * max(abs(a), abs(b)) or a == b


def _worker_module():
    spec = importlib.util.spec_from_file_location("_dist_montecarlo", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_torchrun_sensitivity_command_equals_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 sdekit sensitivity ...`: the estimates, standard errors and per-path variances of
    one process (random keyed x0, reverse time; per-path, group-mean and fresh-noise methods); results.json says 2
    processes of 1000 paths each; one writer."""
    from sdekit.commands.sensitivity import main
    args = ["sensitivity", "--problem", "diffusion", "--paths", "2000", "--steps", "10", "--strong-paths", "0",
            "--groups", "8", "--methods", "forward", "adjoint", "fd_independent"]
    proc = _torchrun(SDEKIT, *args, "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1 and "2 processes (1000 + 1000 paths)" in proc.stdout, proc.stdout[-2000:]
    assert main(args[1:] + ["--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one/results.json").read_text())
    two = json.loads((tmp_path / "two/results.json").read_text())
    assert one["processes"] == 1 and two["processes"] == 2 and two["paths_per_process"] == [1000, 1000]
    for method, row in one["methods"].items():
        assert "skipped" not in row, (method, row)
        for key in ("estimate", "stderr", "per_path_variance", "z"):
            assert _close(row[key], two["methods"][method][key]), (method, key, row[key], two["methods"][method][key])
        assert len(two["methods"][method]["seconds_per_process"]) == 2


@pytest.mark.slow
def test_accelerate_launch_entry_points_equal_one_process(tmp_path):
    """montecarlo.mean / expectation / gradient and the estimators' variance sweep under `accelerate launch` (2 CPU
    processes): every process returns the one-process estimates and standard errors (the sweep's rows), and each
    evaluated its own half of the units."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", str(WORKER),
           str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(True), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one = _worker_module().problems_run(Processes())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    # the paths split: units 0-4 on rank 0, 5-9 on rank 1, together every unit once
    assert ranks[0]["ranges"] + ranks[1]["ranges"] == one["ranges"] and ranks[0]["ranges"] == one["ranges"][:5]
    for r in ranks:
        for key in ("mean", "expectation", "gradient"):
            assert r[key]["processes"] == 2 and sum(r[key]["paths_per_process"]) == one[key]["paths"]
            for stat in ("mean", "stderr", "per_path_variance"):
                assert _close(r[key][stat], one[key][stat]), (key, stat, r[key][stat], one[key][stat])
        assert r["sweep"] == one["sweep"]          # the estimators' sweep: cells shared out, the same rows


def test_killed_process_is_an_error_that_names_it(tmp_path):
    """Rank 1 is SIGKILLed mid-way: torchrun fails within seconds and names rank 1 and the signal (no hang)."""
    t0 = time.time()
    proc = _torchrun(str(WORKER), str(tmp_path), "--kill-rank", "1", timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rank      : 1" in out and "SIGKILL" in out, out[-3000:]
    assert time.time() - t0 < 200


def _without_agent(tmp_path, *args: str, port: int) -> tuple[list[subprocess.Popen], str]:
    """2 processes started one by one, as srun starts them (no torchrun agent to stop the others); rank 0's output."""
    base = dict(_env(True), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), *args], cwd=ROOT,
                              env=dict(base, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        return procs, procs[0].communicate(timeout=200)[0]
    finally:
        for p in procs:                                   # a stopped rank 1 (or a rank 0 that waits) is ours to end
            p.kill()
            p.communicate(timeout=60)


@pytest.mark.slow
def test_killed_or_hung_process_without_an_agent_fails_the_others_naming_it(tmp_path):
    """Without an agent, rank 0 fails at the reduction naming rank 1 instead of waiting for it: at once when rank 1
    was killed (its connection closes), after the process group's timeout (20 s here) when rank 1 hangs (SIGSTOP)."""
    procs, out0 = _without_agent(tmp_path, "--kill-rank", "1", port=29000 + os.getpid() % 1000)
    assert procs[1].returncode == -9 and procs[0].returncode != 0
    assert "lost a peer" in out0 and "process(es) 1 of 2 never reached it" in out0, out0[-3000:]
    t0 = time.time()
    procs, out0 = _without_agent(tmp_path, "--stop-rank", "1", "--timeout", "20", port=30000 + os.getpid() % 1000)
    assert procs[0].returncode != 0 and time.time() - t0 < 150
    assert "lost a peer" in out0 and "process(es) 1 of 2 never reached it" in out0, out0[-3000:]

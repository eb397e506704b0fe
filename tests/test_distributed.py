"""Multi-process training and sampling with real processes (gloo on CPU), and kill-and-resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdekit.checkpoint import list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests/_dist_train.py")
SMALL = ["model.options.hidden=32", "data.n_train=1000", "train.log_every=5", "train.warmup_steps=2"]


def _env():
    return dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _launch(n_proc: int, script: str, *args: str, timeout: int = 300, launcher: str = "accelerate") -> subprocess.CompletedProcess:
    if n_proc == 1:
        cmd = [sys.executable, script, *args]
    elif launcher == "torchrun":   # no ACCELERATE_USE_CPU: torchrun alone must give one process group on CPU
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n_proc), script, *args]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.pop("ACCELERATE_USE_CPU", None)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n_proc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               script, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_processes_match_one_process_with_twice_the_batch(tmp_path):
    steps = ["train.steps=20", "train.batch_size=64", "train.ckpt_every=20"]
    _launch(2, WORKER, str(tmp_path / "two"), *SMALL, *steps)
    _launch(1, WORKER, str(tmp_path / "one"), *SMALL, *steps)
    r0, r1 = load_file(str(tmp_path / "two/rank0.safetensors")), load_file(str(tmp_path / "two/rank1.safetensors"))
    one = load_file(str(tmp_path / "one/rank0.safetensors"))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks differ in {k}"
        torch.testing.assert_close(r0[k], one[k], rtol=1e-5, atol=1e-6, msg=f"2 x 32 differs from 1 x 64 in {k}")
    ckpt_two, state = load_checkpoint(tmp_path / "two/checkpoints/step_00000020")
    assert state["world_size"] == 2
    for k in r0:  # the main process wrote the checkpoint from the same replica
        assert torch.equal(ckpt_two["model"][k], r0[k])
    # gradient accumulation: 1 process x 2 micro-batches of 32 is the same update again
    _launch(1, WORKER, str(tmp_path / "accum"), *SMALL, *steps, "train.grad_accum=2")
    accum = load_file(str(tmp_path / "accum/rank0.safetensors"))
    for k in r0:
        torch.testing.assert_close(accum[k], one[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow   # several launches of real processes; the default run keeps one launch of each kind
def test_two_processes_match_one_process_with_dropout(tmp_path):
    """Dropout masks follow the global batch's rows: 2 processes x 16 = 1 process x 32, with dropout 0.3 in every
    residual block of a U-Net (that dropout acts, and that micro-batches slice one draw, test_training.py checks)."""
    unet = ["--config", str(ROOT / "configs/digits.yaml"), "model.options.channels=8", "model.options.attn_resolutions=[]",
            "model.options.dropout=0.3", "train.steps=12", "train.batch_size=32", "train.ckpt_every=12", "train.warmup_steps=2"]
    _launch(2, WORKER, str(tmp_path / "two"), *unet)
    _launch(1, WORKER, str(tmp_path / "one"), *unet)
    two = load_file(str(tmp_path / "two/rank0.safetensors"))
    assert load_checkpoint(tmp_path / "two/checkpoints/step_00000012")[1]["world_size"] == 2
    for other in ("two/rank1", "one/rank0"):
        ref = load_file(str(tmp_path / f"{other}.safetensors"))
        for k in two:
            torch.testing.assert_close(two[k], ref[k], rtol=1e-4, atol=1e-5, msg=f"{other} differs from 2 processes in {k}")


def test_distributed_sampling_equals_single_process(tmp_path):
    run = tmp_path / "run"
    _launch(1, WORKER, str(run), *SMALL, "train.steps=5", "train.batch_size=32", "train.ckpt_every=5")
    args = ["--run", str(run), "--no-progress", "sample.n_samples=300", "sample.batch_size=64",
            "sample.sampler=euler_maruyama", "sample.steps=20"]
    _launch(2, str(ROOT / "sample.py"), *args, "--out", str(tmp_path / "two"))
    _launch(2, str(ROOT / "sample.py"), "--run-dir", *args[1:], "--out", str(tmp_path / "torchrun"), launcher="torchrun")
    _launch(1, str(ROOT / "sample.py"), *args, "--out", str(tmp_path / "one"))
    one = load_file(str(tmp_path / "one/samples.safetensors"))["samples"]
    assert one.shape == (300, 2)
    for launched in ("two", "torchrun"):
        # 2 processes really ran, each drew only its batches (0, 2, 4 and 1, 3 of 64), and the gathered set is one process's
        metrics = json.loads((tmp_path / launched / "metrics.json").read_text())
        assert metrics["processes"] == 2 and metrics["samples_per_process"] == [64 + 64 + 44, 64 + 64], metrics
        torch.testing.assert_close(load_file(str(tmp_path / launched / "samples.safetensors"))["samples"], one, rtol=1e-6, atol=1e-6)


@pytest.mark.slow   # several launches of real processes; the default run keeps one launch of each kind
def test_torchrun_on_cpu_trains_one_run_with_two_processes(tmp_path):
    """torchrun --nproc_per_node 2 on a machine without a GPU: one gloo group (world size 2), equal to one process
    with the same global batch, not two independent runs writing into one folder."""
    steps = ["train.steps=10", "train.batch_size=64", "train.ckpt_every=5"]
    _launch(2, WORKER, str(tmp_path / "two"), *SMALL, *steps, launcher="torchrun")
    _launch(1, WORKER, str(tmp_path / "one"), *SMALL, *steps)
    r0, r1 = load_file(str(tmp_path / "two/rank0.safetensors")), load_file(str(tmp_path / "two/rank1.safetensors"))
    one = load_file(str(tmp_path / "one/rank0.safetensors"))
    assert load_checkpoint(tmp_path / "two/checkpoints/step_00000010")[1]["world_size"] == 2
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], one[k], rtol=1e-5, atol=1e-6)
    log = (tmp_path / "two/log.jsonl").read_text().splitlines()
    assert len(log) == 2, log   # one writer: steps 5 and 10 logged once each


@pytest.mark.slow   # several launches of real processes; the default run keeps one launch of each kind
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    common = [*SMALL, "train.steps=300", "train.batch_size=32", "train.ckpt_every=25", "train.keep_checkpoints=3"]
    _launch(1, WORKER, str(tmp_path / "full"), *common)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, WORKER, str(killed), *common], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list_checkpoints(killed)) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [int(p.name.split("_")[1]) for p in list_checkpoints(killed)]
    assert done and max(done) < 300, f"the run was not killed mid-way (checkpoints {done})"
    _launch(1, str(ROOT / "train.py"), "--config", str(ROOT / "configs/ring.yaml"), "--resume", str(killed), "--no-progress",
            f"train.out_dir={killed}", *common)
    full, _ = load_checkpoint(tmp_path / "full/checkpoints/step_00000300")
    resumed, _ = load_checkpoint(killed / "checkpoints/step_00000300")
    for group in ("model", "ema", "optimizer"):
        for k in full[group]:
            assert torch.equal(full[group][k], resumed[group][k]), (group, k)

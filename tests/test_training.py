"""Training end to end on a toy mixture, checkpoints, and exact resume."""
import json
import os
from pathlib import Path

import pytest
import torch

from sdekit.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from sdekit.config import load_config
from sdekit.data import ring
from sdekit.metrics import mode_weights
from sdekit.samplers import sample
from sdekit.training import _load_weights, batch_indices, build_network, load_trained, train

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, *overrides):
    return load_config(ROOT / "configs/ring.yaml", [f"train.out_dir={tmp_path}", "model.options.hidden=64",
                                                    "data.options.n_modes=4", *overrides])


def test_small_run_reaches_every_mode(tmp_path):
    cfg = _cfg(tmp_path, "train.steps=1200", "train.ckpt_every=400", "train.batch_size=256", "train.ema_decay=0.99")
    result = train(cfg, progress=False)
    assert result["step"] == 1200 and len(list_checkpoints(tmp_path)) == 3
    den, loaded_cfg, _ = load_trained(tmp_path)
    assert loaded_cfg == cfg
    with torch.no_grad():
        x = sample(den, den.sde, (2000, 2), sampler="heun", steps=40, generator=torch.Generator().manual_seed(0))
    w = mode_weights(x, ring(n_modes=4))
    assert (w > 0.15).all(), w            # every mode of four is reached (0.25 each in the data)
    assert (w - 0.25).abs().max() < 0.06, w
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    assert (tmp_path / "config.json").is_file()


def test_resume_equals_uninterrupted_run(tmp_path):
    common = ("train.steps=60", "train.batch_size=64", "train.log_every=10", "train.ckpt_every=30",
              "train.keep_checkpoints=5")
    train(_cfg(tmp_path / "full", *common), progress=False)
    # an interrupted run: stop at 30 (as a killed run leaves its checkpoint), then resume to 60
    train(_cfg(tmp_path / "part", *common[:-2], "train.steps=30", "train.ckpt_every=30"), progress=False)
    train(_cfg(tmp_path / "part", *common), resume=tmp_path / "part", progress=False)
    full, _ = load_checkpoint(tmp_path / "full/checkpoints/step_00000060")
    part, _ = load_checkpoint(tmp_path / "part/checkpoints/step_00000060")
    for group in ("model", "ema", "optimizer"):
        assert full[group].keys() == part[group].keys()
        for k in full[group]:
            assert torch.equal(full[group][k], part[group][k]), (group, k)


def test_batch_indices_cover_each_epoch_once():
    n, b = 50, 16
    seen = torch.cat([batch_indices(n, b, s, seed=3) for s in range(25)])  # 400 positions = 8 epochs
    for e in range(8):
        assert sorted(seen[e * n:(e + 1) * n].tolist()) == list(range(n))
    assert torch.equal(batch_indices(n, b, 7, 3), batch_indices(n, b, 7, 3))


def test_corrupted_and_mismatched_checkpoints_are_refused(tmp_path):
    train(_cfg(tmp_path, "train.steps=10", "train.batch_size=32", "train.ckpt_every=10"), progress=False)
    ckpt = list_checkpoints(tmp_path)[-1]
    with pytest.raises(CheckpointError, match="another model config|do not fit"):
        cfg = _cfg(tmp_path, "model.options.hidden=32")
        _load_weights(build_network(cfg.model, (2,)), load_checkpoint(ckpt)[0]["model"], str(ckpt))
    blob = ckpt / "model.safetensors"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        load_trained(tmp_path)


def test_logged_lr_is_the_one_the_step_used(tmp_path):
    """Adam's first update moves every parameter with a non-zero gradient by the step's learning rate exactly
    (m / sqrt(v) = g / |g|), so the largest change of any weight is the lr the step used; the log must say that
    lr, (s + 1) / (warmup + 1) x train.lr at step s = 0, not the next step's."""
    cfg = _cfg(tmp_path, "train.steps=1", "train.batch_size=32", "train.log_every=1", "train.ckpt_every=1",
               "train.warmup_steps=4", "train.weight_decay=0", "train.lr=1e-2")
    torch.manual_seed(cfg.train.seed)
    init = build_network(cfg.model, (2,)).state_dict()
    train(cfg, progress=False)
    after, _ = load_checkpoint(tmp_path / "checkpoints/step_00000001")
    moved = max(float((after["model"][k] - init[k]).abs().max()) for k in init)
    logged = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])["lr"]
    assert logged == pytest.approx(moved, rel=1e-4) and logged == pytest.approx(1e-2 / 5), (logged, moved)


DROPOUT = ["model.options.channels=8", "model.options.attn_resolutions=[]", "model.options.dropout=0.3",
           "train.batch_size=16", "train.warmup_steps=2", "train.keep_checkpoints=5"]


def test_resume_equals_uninterrupted_run_with_dropout(tmp_path):
    """Dropout masks are keyed by (seed, step) like every other draw: resumed from the uninterrupted run's own
    step-30 checkpoint (what a run killed after step 30 leaves), training to 60 gives exactly its parameters."""
    import shutil

    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)
    cfg = lambda out, *o: load_config(ROOT / "configs/digits.yaml", [*DROPOUT, f"train.out_dir={out}", "train.steps=60",  # noqa: E731
                                                                     "train.ckpt_every=30", *o])
    train(cfg(tmp_path / "full"), progress=False)
    shutil.copytree(tmp_path / "full/checkpoints/step_00000030", tmp_path / "part/checkpoints/step_00000030")
    train(cfg(tmp_path / "part"), resume=tmp_path / "part", progress=False)
    full, _ = load_checkpoint(tmp_path / "full/checkpoints/step_00000060")
    part, _ = load_checkpoint(tmp_path / "part/checkpoints/step_00000060")
    for group in ("model", "ema"):
        for k in full[group]:
            diff = float((full[group][k] - part[group][k]).abs().max())
            assert torch.equal(full[group][k], part[group][k]), (group, k, diff)
    # the masks are drawn: the same run without dropout ends elsewhere
    train(cfg(tmp_path / "none", "model.options.dropout=0.0"), progress=False)
    none, _ = load_checkpoint(tmp_path / "none/checkpoints/step_00000060")
    assert not torch.equal(none["model"]["out_conv.weight"], full["model"]["out_conv.weight"])


def test_keyed_dropout_masks_are_the_global_batch_sliced():
    """A micro-batch's masks are rows of the global batch's: two halves drawn separately equal the whole, each
    DropoutNd drops whole channels at rate p, and outside training dropout is the identity."""
    from sdekit.training import KeyedDropout
    net = torch.nn.Sequential(torch.nn.Dropout(0.25), torch.nn.Dropout2d(0.5))
    keyed = KeyedDropout(net)
    x = torch.ones(8, 64, 4, 4)
    with keyed.micro_batch(3, 7, slice(0, 8), 8, 0):
        whole = net(x)
    halves = []
    for rows in (slice(0, 4), slice(4, 8)):
        with keyed.micro_batch(3, 7, rows, 8, 0):
            halves.append(net(x[rows]))
    assert torch.equal(torch.cat(halves), whole)
    kept = (whole != 0)
    per_channel = kept.flatten(2).any(2)
    assert 0.3 < per_channel.double().mean() < 0.7                     # Dropout2d keeps about half the channels
    assert 0.65 < kept[per_channel].double().mean() < 0.85              # Dropout keeps about 3/4 inside them
    with keyed.micro_batch(3, 8, slice(0, 8), 8, 0):
        assert not torch.equal(net(x), whole)                           # another step, other masks
    net.eval()
    assert torch.equal(net(x), x)
    keyed.remove()
    assert "forward" not in net[0].__dict__


def _lock_holder(folder):
    """Another live process holding `folder`'s lock (as a running training or sampling run does)."""
    import subprocess
    import sys
    code = ("import sys, time\nfrom sdekit.checkpoint import folder_lock\nwith folder_lock(sys.argv[1]):\n"
            "    print('locked', flush=True)\n    time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_two_runs_into_one_folder_are_refused_and_a_dead_runs_lock_is_taken_over(tmp_path, capsys):
    from sdekit.commands.sample import main as sample_main
    from sdekit.commands.train import main as train_main
    run = tmp_path / "run"
    args = ["--config", str(ROOT / "configs/ring.yaml"), "--no-progress", f"train.out_dir={run}",
            "model.options.hidden=16",
            "train.steps=2", "train.batch_size=16", "train.ckpt_every=2"]
    holder = _lock_holder(run)
    try:
        assert train_main(args) == 2
        err = capsys.readouterr().err
        assert f"output folder {run} is in use" in err and f"pid {holder.pid}" in err, err
        assert sorted(p.name for p in run.iterdir()) == [".lock"]          # nothing written into the folder
    finally:
        holder.kill()                                                      # SIGKILL: the lock file stays behind
        holder.wait()
        holder.stdout.close()
    assert json.loads((run / ".lock").read_text())["pid"] == holder.pid
    assert train_main(args) == 0                                           # a dead owner's lock is taken over
    assert not (run / ".lock").exists() and list_checkpoints(run)
    assert (run / "loss.png").stat().st_size > 1000                        # the command plots the run's loss log
    # sampling into a folder another sampler holds is refused the same way
    holder = _lock_holder(tmp_path / "samples")
    try:
        assert sample_main(["--run", str(run), "--no-progress", "--out", str(tmp_path / "samples"),
                                  "sample.n_samples=10", "sample.batch_size=10", "sample.steps=2"]) == 2
        assert f"output folder {tmp_path / 'samples'} is in use" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_folder_lock_without_flock_judges_the_recorded_pid(tmp_path, monkeypatch):
    """On a file system without flock the lock file's pid decides: alive on this host = held, dead = taken over."""
    import errno
    import fcntl
    import socket
    import subprocess
    import sys

    from sdekit.checkpoint import FolderInUseError, folder_lock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({"pid": alive.pid, "host": socket.gethostname()}))
        with pytest.raises(FolderInUseError, match=f"pid {alive.pid}"):
            with folder_lock(tmp_path):
                pass
    finally:
        alive.kill()
        alive.wait()
    with folder_lock(tmp_path) as path:                                    # its owner is dead now
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()

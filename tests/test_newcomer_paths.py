"""The paths a newcomer takes first: one run per folder (resume or overwrite, never a mix), refused runs leave
no folder behind, documented submodules as attributes of `import sdekit`, and missing extras named before work."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdekit.checkpoint import list_checkpoints, load_checkpoint
from sdekit.config import ConfigError, load_config
from sdekit.training import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.options.hidden=16", "train.batch_size=32", "train.log_every=5"]


def _cfg(out, *overrides):
    return load_config(ROOT / "configs/ring.yaml", [f"train.out_dir={out}", *TINY, *overrides])


def _log_steps(run):
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_a_second_run_into_a_used_folder_is_refused_and_leaves_the_first_intact(tmp_path):
    run = tmp_path / "run"
    train(_cfg(run, "train.steps=20", "train.ckpt_every=10"), progress=False)
    before = {p.name: (p / "model.safetensors").read_bytes() for p in list_checkpoints(run)}
    config_before = (run / "config.json").read_text()
    with pytest.raises(ConfigError, match=r"already holds a run.*train\.out_dir=.*--resume .*--overwrite"):
        train(_cfg(run, "train.steps=6", "train.ckpt_every=2"), progress=False)
    after = {p.name: (p / "model.safetensors").read_bytes() for p in list_checkpoints(run)}
    assert after == before and (run / "config.json").read_text() == config_before
    assert _log_steps(run) == [5, 10, 15, 20]


def test_resume_continues_the_same_run_and_refuses_another_config(tmp_path):
    run = tmp_path / "run"
    train(_cfg(run, "train.steps=20", "train.ckpt_every=10"), progress=False)
    with pytest.raises(ConfigError, match=r"differs from the checkpoint's in model\.options"):
        train(_cfg(run, "train.steps=30", "model.options.hidden=32"), resume=run, progress=False)
    with pytest.raises(ConfigError, match="train.lr: 0.002 -> 0.001"):
        train(_cfg(run, "train.steps=30", "train.lr=1e-3"), resume=run, progress=False)
    with pytest.raises(ConfigError, match="older than"):   # branching off an older checkpoint would mix two runs
        train(_cfg(run, "train.steps=30"), resume=run / "checkpoints/step_00000010", progress=False)
    # the same config, more steps: the run continues, and a killed run's log rows after the checkpoint go
    with open(run / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 25, "loss": 1.0, "lr": 0.0}) + "\n")
    train(_cfg(run, "train.steps=30", "train.ckpt_every=10"), resume=run, progress=False)
    assert [p.name for p in list_checkpoints(run)][-1] == "step_00000030"
    assert _log_steps(run) == [5, 10, 15, 20, 25, 30]


def test_overwrite_replaces_the_earlier_run_whole(tmp_path):
    run = tmp_path / "run"
    train(_cfg(run, "train.steps=20", "train.ckpt_every=10"), progress=False)
    (run / "samples").mkdir()
    (run / "samples/metrics.json").write_text("{}")
    (run / "notes.txt").write_text("mine")   # not a run's file: kept
    train(_cfg(run, "train.steps=6", "train.ckpt_every=3"), progress=False, overwrite=True)
    assert [p.name for p in list_checkpoints(run)] == ["step_00000003", "step_00000006"]
    assert _log_steps(run) == [5, 6] and not (run / "samples").exists() and (run / "notes.txt").is_file()
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 6
    with pytest.raises(ConfigError, match="give one of them"):
        train(_cfg(run, "train.steps=6"), resume=run, overwrite=True, progress=False)


def test_the_command_line_names_the_way_out_and_a_refused_run_creates_no_folder(tmp_path, capsys):
    from sdekit.commands.train import main

    args = ["--config", str(ROOT / "configs/ring.yaml"), "--no-progress", *TINY, "train.steps=4", "train.ckpt_every=4"]
    run = tmp_path / "run"
    assert main([*args, f"train.out_dir={run}"]) == 0
    assert main([*args, f"train.out_dir={run}"]) == 2
    assert f"--resume {run}" in capsys.readouterr().err
    assert main([*args, f"train.out_dir={run}", "--overwrite"]) == 0
    # refused before any work: no output folder appears
    assert main([*args, f"train.out_dir={tmp_path / 'a'}", "sde.sigma_max=3"]) == 2
    assert main([*args, f"train.out_dir={tmp_path / 'b'}", "model.target=torch.nn:Identity", "model.options={}"]) == 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert main([str(ROOT / "configs/ring.yaml")]) == 2
    assert "--config" in capsys.readouterr().err


def test_resumed_parameters_equal_the_checkpoints_run(tmp_path):
    """--resume into the same folder continues exactly: 10 + 10 steps equal 20 in one go."""
    common = ("train.steps=20", "train.ckpt_every=10", "train.lr_schedule=constant")
    train(_cfg(tmp_path / "full", *common), progress=False)
    train(_cfg(tmp_path / "part", "train.steps=10", "train.ckpt_every=10", "train.lr_schedule=constant"),
          progress=False)
    train(_cfg(tmp_path / "part", *common), resume=tmp_path / "part", progress=False)
    full, _ = load_checkpoint(tmp_path / "full/checkpoints/step_00000020")
    part, _ = load_checkpoint(tmp_path / "part/checkpoints/step_00000020")
    for k in full["model"]:
        assert torch.equal(full["model"][k], part["model"][k]), k


def test_documented_submodules_are_attributes_and_import_sdekit_stays_light():
    code = ("import sys, sdekit\n"
            "heavy = [m for m in ('matplotlib', 'jax', 'accelerate', 'sdekit.training', 'sdekit.commands') "
            "if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert callable(sdekit.training.load_trained) and callable(sdekit.config.load_config)\n"
            "assert callable(sdekit.checkpoint.load_checkpoint) and callable(sdekit.likelihood.log_likelihood)\n"
            "assert 'training' in dir(sdekit)\n"
            "try:\n    sdekit.not_a_module\nexcept AttributeError as e:\n    assert 'not_a_module' in str(e)\n"
            "else:\n    raise SystemExit('no AttributeError')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def _pretend_missing(monkeypatch, *names):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))


@pytest.mark.parametrize("command", ["samplers", "frontier"])
def test_missing_peers_are_named_before_any_work(command, monkeypatch, capsys, tmp_path):
    """`sdekit samplers --peers` and `sdekit frontier` check the peers first: one error, one install line, and
    none of the report runs (its entry points fail the test if called)."""
    import importlib

    from sdekit._imports import PEERS_HINT

    module = importlib.import_module(f"sdekit.commands.{command}")
    for name in ("run_report", "run_frontier"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("the work started before the check"))
    _pretend_missing(monkeypatch, "diffusers", "torchdiffeq", "k_diffusion")   # (a fresh install has none of them)
    argv = ["--peers", "--out", str(tmp_path)] if command == "samplers" else ["--out", str(tmp_path)]
    assert module.main(argv) == 2
    err = capsys.readouterr().err
    assert "diffusers, torchdiffeq, k-diffusion" in err and PEERS_HINT in err and err.count("pip install") == 2
    assert not any(tmp_path.iterdir())


def test_missing_train_extras_are_named_before_training(monkeypatch, capsys, tmp_path):
    from sdekit.commands.train import main

    _pretend_missing(monkeypatch, "matplotlib")
    assert main(["--config", str(ROOT / "configs/ring.yaml"), f"train.out_dir={tmp_path / 'run'}"]) == 2
    assert "pip install -c constraints.txt 'sdekit[images]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

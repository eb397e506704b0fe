"""Image training through the common loop: labels, label dropout, augmentation, bf16, EDM's loss identity."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sdekit
from sdekit.checkpoint import load_checkpoint
from sdekit.config import load_config
from sdekit.losses import dsm_loss
from sdekit.precond import Denoiser, edm_coefficients
from sdekit.training import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.options.channels=8", "model.options.attn_resolutions=[]", "train.batch_size=16", "train.log_every=2",
        "train.warmup_steps=1", "train.steps=4", "train.ckpt_every=4"]



def test_edm_weighting_gives_unit_weight_on_the_network_target(float64):
    """lambda(sigma) ||D - x0||^2 = ||F - F_target||^2 with F_target = (x0 - c_skip x) / c_out: EDM's effective weight is 1."""
    sde = sdekit.EDM(sigma_data=0.5)
    out = torch.randn(5, 3)
    den = Denoiser(lambda x, c: out, sde, "edm", sigma_data=0.5)
    x0, noise, t = torch.randn(5, 3), torch.randn(5, 3), torch.exp(torch.linspace(-3, 3, 5))
    c_skip, c_out, _ = edm_coefficients(t, 0.5)
    x = x0 + t[:, None] * noise
    target = (x0 - c_skip[:, None] * x) / c_out[:, None]
    torch.testing.assert_close(dsm_loss(den, x0, t, noise, "edm"), (out - target).pow(2).mean(1))


@pytest.mark.parametrize("config, extra", [("digits", ["train.mixed_precision=bf16", "data.hflip=true"]),
                                           ("digits_edm", [])])
def test_conditional_image_training_runs_and_is_reproducible(tmp_path, config, extra):
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)   # accelerate keeps one mixed-precision setting per process
    runs = []
    for name in ("a", "b"):
        cfg = load_config(ROOT / f"configs/{config}.yaml", [*TINY, *extra, f"train.out_dir={tmp_path / name}"])
        result = train(cfg, progress=False)
        runs.append(load_checkpoint(result["checkpoint"])[0])
        log = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    for group in ("model", "ema"):
        for k in runs[0][group]:
            assert torch.equal(runs[0][group][k], runs[1][group][k]), (group, k)
    # the labels reached the network: the class embedding moved away from its initialisation
    torch.manual_seed(0)
    from sdekit.training import build_network
    init = build_network(cfg.model, (1, 8, 8)).state_dict()["label_emb.weight"]
    assert not torch.equal(runs[0]["model"]["label_emb.weight"], init)
    AcceleratorState._reset_state(True)


def _digits_quality_failures(m: dict) -> list[str]:
    """What the full digits runs must reach (the slow test below): FD against the held-out split within 1.5x of
    fresh data's, no sign of copying the training set, and the conditioning classes recognised."""
    failures = []
    if not m["fd_vs_test"] < 1.5 * m["fd_train_vs_test"]:
        failures.append(f"FD vs held-out {m['fd_vs_test']:.1f} >= 1.5 x {m['fd_train_vs_test']:.1f}")
    if m["memorised"] or m["near_copy_fraction"] > 0.15:
        failures.append(f"memorised: {m['near_copy_fraction']:.2f} of samples are near copies (fresh data: 0.05)")
    if not m.get("class_accuracy", 0) > 0.9:
        failures.append(f"class accuracy {m.get('class_accuracy')}")
    return failures


def test_the_full_runs_criterion_fails_a_model_that_copies_its_training_data(tmp_path):
    """The slow test's criterion, applied to a 'model' returning training images (with their labels): fails; to
    held-out images: passes."""
    from sdekit.image_metrics import evaluate_digits
    from sdekit.images import load_images
    train_split, test = load_images("digits", test_fraction=0.2, seed=0)
    copy = evaluate_digits(train_split.x[:1000], train_split.labels[:1000], cache_dir=tmp_path)
    assert any("memorised" in f for f in _digits_quality_failures(copy)), copy
    assert _digits_quality_failures(evaluate_digits(test.x, test.labels, cache_dir=tmp_path)) == []


def _tiny_conditional_run(tmp_path, *extra):
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)
    cfg = load_config(ROOT / "configs/digits.yaml", [*TINY, f"train.out_dir={tmp_path / 'run'}", *extra])
    train(cfg, progress=False)
    return tmp_path / "run"


def _sample(run, out, *overrides, monkeypatch=None, capture=None):
    from sdekit.commands import sample as sample_command
    if capture is not None:
        def grid(images, path, nrow=10, title="", numbers=None):
            capture[path.name] = {"n": len(images), "nrow": nrow, "labels": (numbers or {}).get("labels")}
        monkeypatch.setattr(sample_command, "save_image_grid", grid)
    assert sample_command.main(["--run", str(run), "--no-progress", "--out", str(out), "sample.n_samples=40",
                              "sample.batch_size=40", "sample.sampler=ddim", "sample.steps=4", *overrides]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_class_accuracy_is_reported_only_for_conditional_sampling(tmp_path, monkeypatch):
    """At guidance 0 the sampler is the unconditional model exactly and never sees the labels: no class accuracy
    against them (and no labels under the grid); at guidance 1 it is reported."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run = _tiny_conditional_run(tmp_path)
    shown = {}
    uncond = _sample(run, tmp_path / "g0", "sample.guidance=0", monkeypatch=monkeypatch, capture=shown)
    assert uncond["guidance"] == 0 and "class_accuracy" not in uncond and "fd_vs_test" in uncond, uncond
    assert shown["samples.png"]["labels"] is None
    cond = _sample(run, tmp_path / "g1", "sample.guidance=1")
    assert 0 <= cond["class_accuracy"] <= 1
    # the classifier is cached with the run (trained once for both), never in the current directory
    assert len(list((run / "eval_cache").glob("digits_*.safetensors"))) == 1
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("n_classes", [3, 12])
def test_samples_png_has_one_column_per_class(tmp_path, monkeypatch, n_classes):
    import numpy as np
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.integers(0, 256, (60, 8, 8), dtype=np.uint8), y=np.arange(60) % n_classes)
    run = _tiny_conditional_run(tmp_path, "data.name=npz", f"data.path={tmp_path / 'data.npz'}",
                                f"model.options.num_classes={n_classes}")
    shown = {}
    m = _sample(run, tmp_path / "out", monkeypatch=monkeypatch, capture=shown)
    grid = shown["samples.png"]
    assert grid["nrow"] == n_classes and grid["n"] >= n_classes, grid
    assert all(label == i % grid["nrow"] for i, label in enumerate(grid["labels"])), grid   # column j holds class j
    assert "nn_distance_ratio" in m and "near_copy_fraction" in m


@pytest.mark.slow
@pytest.mark.parametrize("config", ["digits", "digits_edm"])
def test_full_digits_config_reaches_the_stated_fd(tmp_path, config):
    """The whole configs/digits*.yaml run (minutes): conditional FD against the held-out split within 1.5x of fresh
    data's, no memorisation of the training set, class accuracy > 0.9 (_digits_quality_failures)."""
    from sdekit.commands import sample as sample_command
    cfg = load_config(ROOT / f"configs/{config}.yaml", [f"train.out_dir={tmp_path}"])
    train(cfg, progress=False)
    assert sample_command.main(["--run", str(tmp_path), "--no-progress"]) == 0
    m = json.loads((tmp_path / "samples/metrics.json").read_text())
    assert _digits_quality_failures(m) == [], m


def test_sampler_comparison_on_a_trained_run(tmp_path, monkeypatch):
    """`sdekit frontier --run`: the candidates on every fixed grid and the optimised grids, from one x_T, each with
    its solver error (median distance to the model's rk45 solution) and FD, the best per budget being the row of
    least error; the 60-NFE heun reference is scored alike; a run that is not digits is refused by name."""
    from sdekit import sampling
    from sdekit.commands import frontier as frontier_command

    monkeypatch.setattr(sampling, "RUN_CANDIDATES", [("ddim", "ddim", {}), ("unipc bh2", "unipc", {})])
    run = _tiny_conditional_run(tmp_path)
    out = tmp_path / "frontier"
    assert frontier_command.main(["--run", str(run), "--nfe", "2", "--samples", "16", "--no-peers", "--iterations", "1",
                                  "--out", str(out)]) == 0
    result = json.loads((out / "frontier.json").read_text())
    rows = result["rows"]
    fixed = [r for r in rows if r["grid"] != "optimized"]
    assert len(fixed) == 2 * 3 and len(rows) == len(fixed) + 4
    assert all(math.isfinite(r["error"]) and math.isfinite(r["fd"]) and r["nfe"] <= 2 for r in rows)
    assert result["best"]["2"]["sdekit"]["error"] == min(r["error"] for r in rows)
    ref = result["reference"]
    assert ref["nfe"] == 60 and math.isfinite(ref["error"]) and math.isfinite(ref["fd"]) and ref["ode_nfe"] > 0
    assert (out / "frontier.png").exists() and "reference" in (out / "frontier.md").read_text()
    toy = tmp_path / "toy"
    cfg = load_config(ROOT / "configs/ring.yaml", ["train.steps=2", f"train.out_dir={toy}"])
    train(cfg, progress=False)
    assert frontier_command.main(["--run", str(toy), "--no-peers"]) == 2


def test_sample_py_with_an_optimized_grid_on_a_conditional_run(tmp_path, monkeypatch):
    """sample.grid=optimized on a class-conditional model: the grid is fitted once on its own calibration batch (with
    its own labels, whatever the sampling batch size), cached in <run>/eval_cache/grids.json, and read back by a
    second sampling, which then gives the same samples."""
    from sdekit import sampling

    monkeypatch.setattr(sampling, "CALIBRATION_BATCH", 24)     # not the sampling batch (40): labels of its own
    run = _tiny_conditional_run(tmp_path)
    first = _sample(run, tmp_path / "a", "sample.grid=optimized")
    cache = json.loads((run / "eval_cache" / "grids.json").read_text())
    assert len(cache["grids"]) == 1 and cache["grids"][0]["sampler"] == "ddim" and len(cache["grids"][0]["ts"]) == 5
    second = _sample(run, tmp_path / "b", "sample.grid=optimized")
    a = load_file(str(tmp_path / "a" / "samples.safetensors"))["samples"]
    b = load_file(str(tmp_path / "b" / "samples.safetensors"))["samples"]
    assert torch.equal(a, b) and first["nfe_per_sample"] == second["nfe_per_sample"] == 4

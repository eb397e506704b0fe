"""Image training through the common loop: labels, label dropout, augmentation, bf16, EDM's loss identity."""
import json
from pathlib import Path

import pytest
import torch

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


@pytest.mark.slow
@pytest.mark.parametrize("config", ["digits", "digits_edm"])
def test_full_digits_config_reaches_the_stated_fd(tmp_path, config):
    """The whole configs/digits*.yaml run (minutes): conditional FD within 1.5x of the held-out split's FD."""
    from sdekit import sampling_cli
    cfg = load_config(ROOT / f"configs/{config}.yaml", [f"train.out_dir={tmp_path}"])
    train(cfg, progress=False)
    assert sampling_cli.main(["--run", str(tmp_path), "--no-progress"]) == 0
    m = json.loads((tmp_path / "samples/metrics.json").read_text())
    assert m["fd"] < 1.5 * m["fd_test_vs_train"] and m["class_accuracy"] > 0.9, m

"""Optimised grids belong to their model: the cache key says what a grid was fitted for, and calibration draws
come from a stream that sampling never uses."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sdekit
from sdekit.rng import derive_seed
from sdekit.samplers import CountingScore, sample
from sdekit.samplers.fingerprint import FingerprintError, fingerprint
from sdekit.samplers.optimize import CALIBRATION_SEED, calibration_seed, optimize_grid

ROOT = Path(__file__).resolve().parents[1]


def two_mixtures(dtype=torch.float64):
    a = sdekit.GaussianMixture(torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]], dtype=dtype),
                               torch.tensor([[0.3, 0.1], [0.2, 0.4], [0.25, 0.25]], dtype=dtype),
                               torch.tensor([0.5, 0.3, 0.2], dtype=dtype))
    b = sdekit.GaussianMixture(torch.tensor([[-1.0, 3.0], [3.0, -1.0], [0.5, 0.5], [-3.0, -2.0]], dtype=dtype),
                               torch.tensor([[0.02, 0.5], [0.4, 0.01], [0.1, 0.1], [0.05, 0.3]], dtype=dtype),
                               torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=dtype))
    return a, b


def test_a_grid_fitted_for_one_mixture_is_not_reused_for_another(tmp_path):
    """The same cache file, sampler and steps, two mixtures: the second gets a grid fitted for itself (it spends
    calibration evaluations and its grid is the one optimize_grid finds for it), and the first still reads its own."""
    sde = sdekit.VPSDE()
    ga, gb = two_mixtures()
    cache = tmp_path / "grids.json"
    x_T = sde.prior_sample((8, 2), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    counted_a, counted_b = CountingScore(ga.score_fn(sde)), CountingScore(gb.score_fn(sde))
    kw = dict(steps=4, grid="optimized", grid_cache=cache, x_T=x_T)
    sample(counted_a, sde, (8, 2), "dpmpp_2m", **kw)
    counted_a.nfe = 0                          # the counter is part of what the fingerprint reads: keep it equal
    sample(counted_b, sde, (8, 2), "dpmpp_2m", **kw)
    assert counted_b.nfe > 100, "mixture b was sampled on a grid fitted for mixture a"
    grids = json.loads(cache.read_text())["grids"]
    assert len(grids) == 2 and grids[0]["ts"] != grids[1]["ts"]
    own = optimize_grid(counted_b, sde, (256, 2), "dpmpp_2m", 4, dtype=torch.float64)
    assert grids[1]["ts"] == pytest.approx(own.ts, rel=1e-12)
    counted_b.nfe = 0
    sample(counted_a, sde, (8, 2), "dpmpp_2m", **kw)
    assert counted_a.nfe == 4 and len(json.loads(cache.read_text())["grids"]) == 2   # read back, not refitted


def test_fingerprint_changes_with_what_the_score_reads():
    sde = sdekit.VPSDE()
    ga, gb = two_mixtures()
    same = two_mixtures()[0]
    assert fingerprint(ga.score_fn(sde)) == fingerprint(ga.score_fn(sde)) == fingerprint(same.score_fn(sde))
    assert fingerprint(ga.score_fn(sde)) != fingerprint(gb.score_fn(sde))
    assert fingerprint(ga.score_fn(sde)) != fingerprint(ga.score_fn(sdekit.VESDE()))
    for name in ("means", "covs", "weights"):
        changed = two_mixtures()[0]
        getattr(changed, name)[0, ...] *= 1 + 1e-9
        assert fingerprint(changed.score_fn(sde)) != fingerprint(ga.score_fn(sde)), name
    assert fingerprint(ga.score) != fingerprint(gb.score)                 # bound methods
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    before = fingerprint(net)
    wrapped = fingerprint(lambda x, t: net(x) / t[:, None])
    with torch.no_grad():
        net[2].bias[1] += 1e-7
    assert fingerprint(net) != before and fingerprint(lambda x, t: net(x) / t[:, None]) != wrapped
    assert fingerprint(lambda x, t: net(x) / t[:, None]) != fingerprint(lambda x, t: net(x) * t[:, None])  # the code
    scale = torch.tensor(2.0)
    f = lambda x, t: scale * x                                            # a closure over a tensor
    g = fingerprint(f)
    scale += 1
    assert fingerprint(f) != g


def test_an_unfingerprintable_score_is_refused_before_any_work_unless_keyed(tmp_path):
    """A score that reads something whose value cannot be hashed for certain (here a file object) is refused with a
    FingerprintError naming it, before a single evaluation; with grid_key it is cached under that key."""
    sde, (ga, _) = sdekit.VPSDE(), two_mixtures()
    handle = open(tmp_path / "log.txt", "w")
    counted = CountingScore(ga.score_fn(sde))

    def score(x, t):
        handle.write(".")
        return counted(x, t)

    cache = tmp_path / "grids.json"
    try:
        with pytest.raises(FingerprintError, match="handle.*grid_key"):
            sample(score, sde, (8, 2), "dpmpp_2m", steps=3, grid="optimized", grid_cache=cache, dtype=torch.float64)
        assert counted.nfe == 0 and not cache.exists()
        sample(score, sde, (8, 2), "dpmpp_2m", steps=3, grid="optimized", grid_cache=cache, grid_key="mixture a, v1",
               dtype=torch.float64)
        entry = json.loads(cache.read_text())["grids"][0]
        assert entry["fitted_for"]["model"] == {"key": "mixture a, v1"}
        assert entry["fitted_for"]["data_shape"] == [2] and entry["fitted_for"]["dtype"] == "float64"
    finally:
        handle.close()
    with pytest.raises(ValueError, match="only apply with grid='optimized'"):
        sample(score, sde, (8, 2), "dpmpp_2m", steps=3, grid_key="k")


def test_a_grid_is_keyed_by_data_dtype(tmp_path):
    sde, (ga, _) = sdekit.VPSDE(), two_mixtures()
    cache = tmp_path / "grids.json"
    score = ga.score_fn(sde)
    for dtype in (torch.float64, torch.float32):
        sample(score, sde, (4, 2), "dpmpp_2m", steps=3, grid="optimized", grid_cache=cache, dtype=dtype)
    assert [g["fitted_for"]["dtype"] for g in json.loads(cache.read_text())["grids"]] == ["float64", "float32"]


def test_calibration_draws_are_not_the_users_draws():
    """sample(grid='optimized') with the user's generator seeded 0 (or any small seed): none of the 256 calibration
    x_T (the first points the calibration reference evaluates at t_max) is among the user's 2048 x_T."""
    sde, (ga, _) = sdekit.VPSDE(), two_mixtures()
    seen = []

    def score(x, t):
        if x.shape[0] == 256 and not seen:
            seen.append(x.detach().clone())             # rk45's first evaluation: the calibration x_T
        return ga.score(x, t, sde)

    sample(score, sde, (2048, 2), "dpmpp_2m", steps=3, grid="optimized", dtype=torch.float64,
           generator=torch.Generator().manual_seed(0))
    calibration = seen[0]
    for seed in (0, 1, 2, 42):
        users = sde.prior_sample((2048, 2), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        shared = (calibration[:, None, :] == users[None, :, :]).all(-1).any(-1)
        assert not bool(shared.any()), f"calibration batch shares {int(shared.sum())} draws with the user's seed {seed}"
    assert CALIBRATION_SEED == derive_seed(0, "grid_calibration") and CALIBRATION_SEED > 2**40
    assert len({calibration_seed(s) for s in range(1000)} & set(range(10**6))) == 0


def test_sample_py_keys_grids_on_weights_ema_and_checkpoint(tmp_path):
    """sdekit sample with sample.grid=optimized: one grid per (EMA or raw weights, checkpoint step); sampling again
    with the same settings reads the grid back; the calibration stream is the run's derived one."""
    from sdekit.commands import sample as sample_command
    from sdekit.config import load_config
    from sdekit.training import train

    run = tmp_path / "ring"
    cfg = load_config(ROOT / "configs/ring.yaml", ["train.steps=2", "train.ckpt_every=1", f"train.out_dir={run}"])
    train(cfg, progress=False)
    cache = run / "eval_cache" / "grids.json"

    def sample_with(*overrides, ckpt=None):
        target = str(ckpt) if ckpt else str(run)
        assert sample_command.main(["--run", target, "--no-progress", "--out", str(tmp_path / "s"),
                                    "sample.n_samples=8", "sample.batch_size=8", "sample.sampler=ddim",
                                    "sample.steps=3", "sample.grid=optimized", *overrides]) == 0
        return json.loads(cache.read_text())["grids"] if cache.exists() else []

    first = sample_with()
    assert len(first) == 1
    assert first[0]["fitted_for"]["use_ema"] is True and first[0]["fitted_for"]["checkpoint_step"] == 2
    assert first[0]["calibration"]["seed"] == calibration_seed(cfg.sample.seed)
    assert len(sample_with()) == 1                                  # read back
    raw = sample_with("sample.use_ema=false")
    assert len(raw) == 2 and raw[1]["fitted_for"]["use_ema"] is False
    assert raw[0]["fitted_for"]["model"] != raw[1]["fitted_for"]["model"]        # the weights' fingerprint too
    older = sorted((run / "checkpoints").iterdir())[0]
    grids = sample_with(ckpt=older)                                 # the same cache (eval_cache_dir of the run)
    assert len(grids) == 3 and grids[2]["fitted_for"]["checkpoint_step"] == 1

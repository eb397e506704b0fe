"""Optimised time grids (sdekit.samplers.optimize) and the low-NFE comparison with the peers (samplers.frontier)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch

import sdekit
from sdekit.samplers import sample
from sdekit.samplers.optimize import CACHE_VERSION, fitted_for, grid_from_theta, load_grid, optimize_grid, optimized_grid


def mixture(dtype=torch.float64) -> sdekit.GaussianMixture:
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]], dtype=dtype)
    covs = torch.tensor([[0.3, 0.1], [0.2, 0.4], [0.25, 0.25]], dtype=dtype)
    return sdekit.GaussianMixture(means, covs, torch.tensor([0.5, 0.3, 0.2], dtype=dtype))


def median_error(score, sde, sampler, ts, x_T, ref, **options) -> float:
    x = sample(score, sde, tuple(x_T.shape), sampler, ts=ts, x_T=x_T, **options)
    return float((x - ref).norm(dim=1).median())


def test_grid_parametrisation_is_a_decreasing_grid_with_fixed_ends():
    sde = sdekit.VPSDE()
    for theta in (torch.zeros(7), torch.randn(7, generator=torch.Generator().manual_seed(0)) * 3):
        ts = grid_from_theta(sde, theta)
        assert ts.shape == (8,) and ts[0] == sde.t_max and ts[-1] == sde.t_min and bool((ts[1:] < ts[:-1]).all())
    uniform_lam = grid_from_theta(sde, torch.zeros(10))
    torch.testing.assert_close(uniform_lam, sdekit.samplers.grids.uniform_log_snr(sde, 10, dtype=torch.float64))


def test_optimized_grid_beats_the_default_on_held_out_draws():
    """unipc at 8 NFE: the grid optimised on 128 calibration draws (30 Adam steps through the sampler) has a lower
    calibration loss than its start, and on 512 other draws of x_T its median error is below a third of the log-SNR
    grid's (measured: 16.6x lower)."""
    sde, gmm = sdekit.VPSDE(), mixture()
    score = gmm.score_fn(sde)
    r = optimize_grid(score, sde, (128, 2), "unipc", 8, iterations=30, dtype=torch.float64, seed=1)
    assert r.loss < r.loss_init and r.nfe > 30 * 8 and r.seconds > 0
    x_T = sde.prior_sample((512, 2), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref = sample(score, sde, (512, 2), "rk45", x_T=x_T, rtol=1e-10, atol=1e-10)
    default = median_error(score, sde, "unipc", sdekit.samplers.grids.uniform_log_snr(sde, 8, dtype=torch.float64), x_T, ref)
    tuned = median_error(score, sde, "unipc", r.grid(torch.float64), x_T, ref)
    assert tuned < default / 3, (tuned, default)


def test_sample_with_an_optimized_grid_uses_and_fills_the_cache(tmp_path):
    """grid='optimized' computes the grid once and caches it as JSON keyed by sampler, steps, options, SDE and what it
    was fitted for; the second call reads it (no calibration evaluations) and gives the same samples; other options
    get their own grid; it works under torch.no_grad()."""
    sde, gmm = sdekit.VPSDE(), mixture(torch.float32)
    calls = sdekit.samplers.CountingScore(gmm.score_fn(sde))
    score = lambda x, t: calls(x, t)    # the fingerprint reads calls.nfe too: it is 0 whenever the cache is looked up
    cache = tmp_path / "grids.json"
    x_T = sde.prior_sample((16, 2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():                                   # the optimisation takes its own gradients
        a, info = sample(score, sde, (16, 2), "dpmpp_2m", steps=5, grid="optimized", grid_cache=cache, x_T=x_T,
                         return_info=True)
    first = calls.nfe
    assert info["nfe"] == 5 and first > 100 and cache.exists()
    calls.nfe = 0
    b = sample(score, sde, (16, 2), "dpmpp_2m", steps=5, grid="optimized", grid_cache=cache, x_T=x_T)
    assert calls.nfe == 5 and torch.equal(a, b)
    calls.nfe = 0
    fitted = fitted_for(score, (16, 2), torch.float32)
    entry = load_grid(cache, "dpmpp_2m", 5, sde, fitted=fitted)
    assert entry is not None and len(entry.ts) == 6 and entry.loss <= entry.loss_init
    sample(score, sde, (16, 2), "dpmpp_2m", steps=5, grid="optimized", grid_cache=cache, x_T=x_T, lower_order_final=False)
    assert len(json.loads(cache.read_text())["grids"]) == 2
    assert load_grid(cache, "dpmpp_2m", 6, sde, fitted=fitted) is None
    assert load_grid(cache, "dpmpp_2m", 5, sdekit.VPSDE(beta_max=10), fitted=fitted) is None


def test_a_cache_written_for_another_objective_is_optimised_again(tmp_path):
    """Grids cached by an older version (version 1 minimised the plain mean distance; version 2 did not record what
    the grid was fitted for) are not reused: the grid is optimised again and the file rewritten as the current
    version."""
    sde, gmm = sdekit.VPSDE(), mixture(torch.float32)
    score = gmm.score_fn(sde)
    cache = tmp_path / "grids.json"
    r = optimize_grid(score, sde, (16, 2), "dpmpp_2m", 4, iterations=2, dtype=torch.float32)
    stale = asdict(r) | {"ts": [1.0, 0.5, 0.1, 0.01, 0.001]}
    fitted = fitted_for(score, (16, 2), torch.float32)
    cache.write_text(json.dumps({"version": 2, "grids": [stale]}))
    assert load_grid(cache, "dpmpp_2m", 4, sde, fitted=fitted) is None
    found = optimized_grid(score, sde, (16, 2), "dpmpp_2m", 4, cache=cache, iterations=2, dtype=torch.float32)
    assert found.ts != stale["ts"]
    assert json.loads(cache.read_text())["version"] == CACHE_VERSION
    assert load_grid(cache, "dpmpp_2m", 4, sde, fitted=fitted) is not None


def test_optimize_refuses_what_it_cannot_optimise():
    sde, gmm = sdekit.VPSDE(), mixture(torch.float32)
    score = gmm.score_fn(sde)
    with pytest.raises(ValueError, match="not a deterministic fixed-step sampler"):
        optimize_grid(score, sde, (8, 2), "euler_maruyama", 5)
    with pytest.raises(ValueError, match="not a deterministic fixed-step sampler"):
        optimize_grid(score, sde, (8, 2), "rk45", 5)
    with pytest.raises(ValueError, match="pass neither ts nor to_zero"):
        sample(score, sde, (8, 2), "unipc", grid="optimized", to_zero=True)
    with pytest.raises(ValueError, match="unknown time grid"):
        sample(score, sde, (8, 2), "unipc", grid="optimised")


def test_frontier_measures_the_peers_on_the_same_oracle():
    """A small run of the low-NFE comparison with diffusers (skipped without it): every library's rows are finite at
    5 and 10 NFE (diffusers' 3M turns NaN on Karras and Lu grids only from 15 steps), the best per budget respects the
    budget, and the ratio is sdekit-best / peer-best."""
    pytest.importorskip("diffusers")
    from sdekit.samplers.frontier import frontier_markdown, run_frontier

    r = run_frontier(budgets=(5, 10), batch=64, optimized=False)
    assert "diffusers" in r["peers_measured"]
    for lib in ["sdekit", *r["peers_measured"]]:
        rows = [q for q in r["rows"] if q["library"] == lib]
        assert rows and all(math.isfinite(q["error"]) for q in rows), lib
    for budget in ("5", "10"):
        best = r["best"][budget]
        assert all(b["nfe"] <= int(budget) for b in best.values() if b)
        peer = min(best[lib]["error"] for lib in r["peers_measured"])
        assert r["ratios"][budget] == pytest.approx(best["sdekit"]["error"] / peer)
    assert frontier_markdown(r).startswith("| NFE | sdekit |")


def test_frontier_mixtures_by_name():
    """The frontier's mixtures: the report's, the named exact ones, and seeded random ones (the same seed, the same
    mixture; positive-definite covariances); anything else is refused by name."""
    from sdekit.samplers.frontier import frontier_mixture

    a, b = frontier_mixture("random:3,4,0"), frontier_mixture("random:3,4,0")
    assert a.dim == 3 and torch.equal(a.means, b.means) and a.means.shape == (4, 3)
    assert bool((torch.linalg.eigvalsh(a.covs) > 0.04).all())
    assert not torch.equal(a.means, frontier_mixture("random:3,4,1").means)
    assert frontier_mixture("ring").dim == 2 and frontier_mixture("default").dim == 2
    for bad in ("random:3,4", "random:0,4,0", "rings"):
        with pytest.raises(ValueError, match="mixture|random"):
            frontier_mixture(bad)


def test_accuracy_report_measures_the_peers_in_the_same_run(tmp_path):
    """`sdekit samplers --peers`: beside samplers.md, peers.md/json/png with diffusers' and k-diffusion's best at the
    report's NFE and the ratio sdekit-best / peer-best (skipped without diffusers); refused before any work for an SDE
    the peers are not wired to."""
    from sdekit.commands import samplers as samplers_command

    with pytest.raises(SystemExit):
        samplers_command.main(["--out", str(tmp_path / "ve"), "--sde", "ve", "--peers"])
    assert not (tmp_path / "ve").exists()
    pytest.importorskip("diffusers")
    out = tmp_path / "report"
    assert samplers_command.main(["--out", str(out), "--nfe", "5", "--batch", "16", "--n-samples", "50", "--quiet",
                                  "--peers"]) == 0
    peers = json.loads((out / "peers.json").read_text())
    assert "diffusers" in peers["peers_measured"] and math.isfinite(peers["ratios"]["5"])
    assert (out / "peers.png").exists() and (out / "samplers.md").exists()


def test_diffusers_is_not_wired_to_an_sde_its_schedules_cannot_express():
    """diffusers' schedulers are variance-preserving: run_scheduler refuses a VE or EDM SDE by name (before importing
    diffusers), and a comparison on such an SDE lists diffusers as skipped with the reason instead of measuring its
    samplers on the wrong ODE."""
    from sdekit.interop.diffusers import check_variance_preserving, run_scheduler
    from sdekit.samplers.frontier import compare_samplers

    check_variance_preserving(sdekit.VPSDE())
    for sde in (sdekit.VESDE(), sdekit.EDM(), sdekit.SubVPSDE()):
        with pytest.raises(ValueError, match="variance-preserving"):
            run_scheduler("DDIMScheduler", {}, lambda x, t: -x, sde, torch.zeros(2, 2), 3)
    sde, gmm = sdekit.EDM(), mixture()
    x_T = sde.prior_sample((8, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = compare_samplers(gmm.score_fn(sde), sde, x_T, lambda x: float(x.norm()), (3,), candidates=[("ddim", "ddim", {})],
                         grids=("edm",))
    assert "diffusers" not in r["peers_measured"] and "variance-preserving" in r["peers_skipped"]["diffusers"]

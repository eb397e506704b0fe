"""The keyed Brownian stream and the exact Monte Carlo reduction (one process; tests/test_montecarlo_distributed.py
runs several)."""
import math

import pytest
import torch

from sdekit import montecarlo
from sdekit.montecarlo import Processes, combine, combine_means, share, unit_stats, units
from sdekit.sensitivity.compare import run
from sdekit.sensitivity.problems import make_problem
from sdekit.solvers.keyed import STREAMS, keyed_chunk_steps, keyed_draw, keyed_increments, keyed_normals, keyed_seed

DT = torch.float64


# --- the keyed stream ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_any_split_of_the_paths_draws_the_same_paths(dtype):
    """Path b's increments depend on (seed, b) only: cut [0, 2600) anywhere (inside blocks too), in any order."""
    ts = torch.linspace(0.0, 1.0, 21, dtype=dtype)
    whole = keyed_increments(ts, 0, 2600, 2, seed=7, block=512)
    gen = torch.Generator().manual_seed(0)
    cuts = sorted(torch.randint(1, 2600, (5,), generator=gen).tolist())
    bounds = list(zip([0, *cuts], [*cuts, 2600]))
    parts = {ab: keyed_increments(ts, *ab, 2, seed=7, block=512) for ab in reversed(bounds)}
    assert torch.equal(torch.cat([parts[ab] for ab in bounds], 1), whole)
    assert whole.dtype == dtype and whole.shape == (20, 2600, 2)
    # another seed, another stream: other numbers
    assert not torch.equal(keyed_increments(ts, 0, 2600, 2, seed=8, block=512), whole)
    assert not torch.equal(keyed_increments(ts, 0, 2600, 2, seed=7, block=512, stream=5), whole)


def test_a_paths_steps_do_not_depend_on_the_grid_length_or_its_neighbours():
    m, block = 1, 256
    c = keyed_chunk_steps(block, m)
    z_long = keyed_normals(3 * c + 5, 100, 900, m, seed=1, block=block, dtype=DT)
    z_short = keyed_normals(c + 2, 300, 301, m, seed=1, block=block, dtype=DT)
    assert torch.equal(z_short[:, 0], z_long[:c + 2, 200])


def test_levy_areas_and_initial_states_are_keyed_too():
    ts = torch.linspace(1.0, 0.0, 9, dtype=DT)                              # a reverse-time grid
    dW, H = keyed_increments(ts, 0, 3000, 1, seed=3, levy_area=True)
    dW2, H2 = keyed_increments(ts, 1000, 2100, 1, seed=3, levy_area=True)
    assert torch.equal(dW[:, 1000:2100], dW2) and torch.equal(H[:, 1000:2100], H2)
    assert torch.equal(dW, keyed_increments(ts, 0, 3000, 1, seed=3))      # the Levy areas leave dW unchanged
    sde = make_problem("diffusion").extra["sde"]

    def draw(n, gen):
        return sde.prior_sample((n, 2), generator=gen, dtype=DT)
    x = keyed_draw(draw, 0, 2500, seed=3)
    assert torch.equal(torch.cat([keyed_draw(draw, 0, 1234, seed=3), keyed_draw(draw, 1234, 2500, seed=3)]), x)
    with pytest.raises(ValueError, match="rows"):
        keyed_draw(lambda n, gen: torch.zeros(n + 1, 2), 0, 10, seed=0)


def test_keyed_increments_have_the_brownian_law():
    """Mean 0, variance |h|, and no correlation between steps, neighbouring paths, blocks, or dW and H (to 4 se)."""
    ts = torch.tensor([0.0, 0.1, 0.35, 1.0], dtype=DT)
    n = 40_000
    dW, H = keyed_increments(ts, 0, n, 1, seed=11, levy_area=True)
    h = (ts[1:] - ts[:-1]).reshape(-1, 1)
    z, zh = dW[..., 0] / h.sqrt(), H[..., 0] / (h / 12).sqrt()               # (3, n), standard normal if right
    se = 1 / math.sqrt(n)
    assert (z.mean(1).abs() < 4 * se).all() and (zh.mean(1).abs() < 4 * se).all()
    assert ((z.var(1) - 1).abs() < 4 * math.sqrt(2) * se).all()
    for a, b in [(z[0], z[1]), (z[0, :-1], z[0, 1:]), (z[0, :-1024], z[0, 1024:]), (z[1], zh[1])]:
        assert abs(float((a * b).mean())) < 4 * se


def test_generator_seeds_are_distinct_for_every_stream_and_block():
    """torch's CPU generator reads 32 bits of its seed; the keyed seeds are injective in (stream, block) instead of
    a hash that would collide (the birthday bound: about one pair in 1e5 blocks)."""
    seeds = {keyed_seed(5, s, b) for s in (0, 1, 2, STREAMS - 1) for b in range(100_000)}
    assert len(seeds) == 400_000 and max(seeds) < 2**32
    with pytest.raises(ValueError, match="stream"):
        keyed_seed(5, STREAMS, 0)


# --- the reduction ------------------------------------------------------------------------------------------------
def test_unit_statistics_combine_to_the_whole_sample_exactly_and_in_any_order():
    gen = torch.Generator().manual_seed(2)
    values = 3.0 + torch.randn(10_007, 3, generator=gen, dtype=DT) * torch.tensor([1e-3, 1.0, 1e3], dtype=DT)
    stats = [unit_stats(values[a:b]) for a, b in units(values.shape[0], 1000)]
    n, mean, var = combine(stats)
    assert n == values.shape[0]
    torch.testing.assert_close(mean, values.mean(0), rtol=1e-14, atol=0)
    torch.testing.assert_close(var, values.var(0), rtol=1e-12, atol=0)
    perm = torch.randperm(len(stats), generator=gen).tolist()
    n2, mean2, var2 = combine([stats[i] for i in perm])
    assert torch.equal(mean2, mean) and torch.equal(var2, var)             # exactly rounded sums: order-free
    # the units processes run: every split gives each unit to exactly one process, in order
    for world in (1, 2, 3, 7):
        runs = [u for r in range(world) for u in share(len(stats), r, world)]
        assert runs == list(range(len(stats)))


def test_group_means_give_the_per_path_variance():
    gen = torch.Generator().manual_seed(4)
    values = torch.randn(20, 50, 2, generator=gen, dtype=DT)                # 20 groups of 50 paths
    means = values.mean(1)
    n, mean, var = combine_means([50] * 20, means)
    torch.testing.assert_close(mean, values.reshape(-1, 2).mean(0), rtol=1e-14, atol=1e-16)
    torch.testing.assert_close(var, means.var(0) * 50, rtol=1e-12, atol=0)


# --- the entry points on one process ------------------------------------------------------------------------------
def _gbm():
    pb = make_problem("gbm")
    return pb, pb.theta, pb.ts(16)


def test_expectation_matches_the_euler_chains_closed_form():
    """E[X_N] of GBM's Euler chain is x0 (1 + mu h)^N exactly: the keyed Monte Carlo is within 4 standard errors."""
    pb, theta, ts = _gbm()
    mu, h = float(theta[0]), float(ts[1] - ts[0])
    est = montecarlo.expectation(pb.f, pb.g, torch.ones(1, dtype=DT), theta, ts, lambda x: x[:, 0], 20_000, seed=0)
    assert est.processes == 1 and est.paths_per_process == [20_000] and est.paths == 20_000
    assert abs(float(est.mean) - (1 + mu * h) ** 16) < 4 * float(est.stderr)
    # the same paths in other units: the same answer to round-off
    other = montecarlo.expectation(pb.f, pb.g, torch.ones(1, dtype=DT), theta, ts, lambda x: x[:, 0], 20_000, seed=0,
                                   batch=3000)
    assert abs(float(other.mean - est.mean)) < 1e-12 and abs(float(other.stderr - est.stderr)) < 1e-12


@pytest.mark.parametrize("method", ["forward", "backprop", "fd_crn"])
def test_gradient_matches_the_discrete_closed_form(method):
    """d/dtheta E[X_N^2] of GBM's Euler chain, E[X_N^2] = x0^2 ((1 + mu h)^2 + sigma^2 h)^N, within 4 se."""
    pb, theta, ts = _gbm()
    mu, sigma, h, N = float(theta[0]), float(theta[1]), float(ts[1] - ts[0]), 16
    base = (1 + mu * h) ** 2 + sigma**2 * h
    exact = [N * base ** (N - 1) * 2 * (1 + mu * h) * h, N * base ** (N - 1) * 2 * sigma * h]
    est = montecarlo.gradient(pb.f, pb.g, torch.ones(1, dtype=DT), theta, ts, pb.loss, 8000, method=method, seed=1)
    assert est.mean.shape == (2,)
    for p in range(2):
        assert abs(float(est.mean[p]) - exact[p]) < 4 * float(est.stderr[p]), (method, p, est.mean, exact)


def test_random_initial_states_are_keyed_by_path():
    """x0 ~ N(0, 1) drawn per path, X_T = x0 + W_T (T=1): E[X_T^2] = 2; the draw is keyed, so any unit size agrees."""
    ts = torch.linspace(0.0, 1.0, 5, dtype=DT)
    f = lambda t, x, th: 0.0 * x
    g = lambda t, x, th: th[0] + 0.0 * x

    def x0(n, gen):
        return torch.randn(n, 1, generator=gen, dtype=DT)
    theta = torch.ones(1, dtype=DT)
    a = montecarlo.expectation(f, g, x0, theta, ts, lambda x: x[:, 0] ** 2, 12_000, seed=5)
    b = montecarlo.expectation(f, g, x0, theta, ts, lambda x: x[:, 0] ** 2, 12_000, seed=5, batch=700)
    assert abs(float(a.mean) - 2.0) < 4 * float(a.stderr)
    assert abs(float(a.mean - b.mean)) < 1e-12


def test_bad_input_is_refused_by_name():
    pb, theta, ts = _gbm()
    with pytest.raises(ValueError, match="x0"):
        montecarlo.expectation(pb.f, pb.g, torch.ones(3, 1, dtype=DT), theta, ts, pb.loss, 10)
    with pytest.raises(ValueError, match="method"):
        montecarlo.gradient(pb.f, pb.g, torch.ones(1, dtype=DT), theta, ts, pb.loss, 10, method="adjoint")
    with pytest.raises(ValueError, match="per-path values"):
        montecarlo.mean(lambda a, b: torch.zeros(3), 10)
    with pytest.raises(ValueError, match="groups"):          # the sensitivity report runs whole groups per process
        run(make_problem("gbm"), paths=8, steps=2, methods=["forward"], groups=2, progress=False,
            procs=Processes(rank=0, world=3))


def test_the_sensitivity_report_records_processes_and_reads_the_keyed_noise():
    """One process: processes = 1 and all paths on it; its noise and random x0 are the keyed streams, so its forward
    estimate is montecarlo.gradient's on the same seed (reverse time, x0 drawn from the prior)."""
    pb = make_problem("diffusion")
    res = run(pb, paths=300, steps=5, methods=["forward"], groups=6, seed=4, progress=False)
    assert res["processes"] == 1 and res["paths_per_process"] == [300] and res["groups"] == 6
    est = montecarlo.gradient(pb.f, pb.g, lambda n, gen: pb.x0(n, gen), pb.theta, pb.ts(5), pb.loss, 300, seed=4)
    torch.testing.assert_close(torch.tensor(res["methods"]["forward"]["estimate"], dtype=DT), est.mean,
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.tensor(res["methods"]["forward"]["stderr"], dtype=DT), est.stderr,
                               rtol=1e-9, atol=0)

"""Brownian paths (`bm=`) and adaptive steps: against the Brownian motion's own laws and closed forms.

Paths: increments and space-time Levy integrals have the right laws (within stated standard errors), sums of
fine increments are the coarse ones (refinement), reverse-time grids read the step convention, and a value is
a function of the seed alone. simulate(bm=): the same answer as dW read from the path, refinement studies
converge to GBM's closed form on the path's own W_T at order 1/2, errors for bad combinations. Adaptive steps:
within tolerance of the closed form on the same path, fewer steps than the best fixed grid for the same error
on a sharply time-varying problem, accepted and rejected counts reported.
"""
from __future__ import annotations

import math

import pytest
import torch

from sdekit.solvers.brownian_path import BrownianGrid, CallablePath, VirtualBrownianTree, as_path


def _has_torchsde() -> bool:
    import importlib.util
    return importlib.util.find_spec("torchsde") is not None


needs_torchsde = pytest.mark.skipif(not _has_torchsde(), reason="torchsde not installed ([torchsde] extra)")

F64 = torch.float64


# --- the paths ------------------------------------------------------------------------------------------------
def _paths(levy: bool, B: int = 4000):
    ts = torch.linspace(0.0, 1.0, 41, dtype=F64)
    grid = BrownianGrid.draw(ts, (B, 1), torch.Generator().manual_seed(1), levy_area=levy)
    tree = VirtualBrownianTree(0.0, 1.0, (B, 1), seed=7, levy_area=levy, dtype=F64)
    return {"grid": grid, "tree": tree}


@pytest.mark.parametrize("kind", ["grid", "tree"])
def test_increments_and_levy_areas_have_the_brownian_laws(kind):
    """Over steps of a coarse sub-grid (sums of the path's own pieces): W ~ N(0, h) and H = U/h - W/2 ~ N(0, h/12),
    uncorrelated with each other and across steps. B = 4000 paths x 4 steps: sample variances within 5 standard
    errors (sd of a variance ratio = sqrt(2/B) = 0.022), correlations within 5/sqrt(B) = 0.08."""
    path = _paths(True)[kind]
    ts = torch.tensor([0.0, 0.25, 0.3, 0.75, 1.0], dtype=F64)
    W, U = path.increments(ts, levy_area=True)
    h = (ts[1:] - ts[:-1]).reshape(-1, 1, 1)
    H = U / h - W / 2
    B = W.shape[1]
    z = torch.cat([W / h.sqrt(), H / (h / 12).sqrt()]).squeeze(-1)       # (8, B) standardised
    var = z.square().mean(1)
    assert ((var - 1).abs() < 5 * math.sqrt(2 / B)).all(), var
    corr = (z @ z.T) / B
    off = corr - torch.diag(torch.diag(corr))
    assert off.abs().max() < 5 / math.sqrt(B), off


@pytest.mark.parametrize("kind", ["grid", "tree"])
@pytest.mark.parametrize("levy", [False, True])
def test_coarse_increments_are_sums_of_fine_ones(kind, levy):
    """W over a coarse step is the sum of the fine W inside it, and U_ac = U_ab + U_bc + (c - b) W_ab (round-off)."""
    path = _paths(levy, B=50)[kind]
    fine = torch.linspace(0.0, 1.0, 41, dtype=F64)
    coarse = fine[::8]
    out_f, out_c = path.increments(fine, levy_area=levy), path.increments(coarse, levy_area=levy)
    Wf, Uf = out_f if levy else (out_f, None)
    Wc, Uc = out_c if levy else (out_c, None)
    torch.testing.assert_close(Wf.reshape(5, 8, 50, 1).sum(1), Wc, rtol=0, atol=1e-13)
    if levy:
        h = float(fine[1] - fine[0])
        Wr, Ur = Wf.reshape(5, 8, 50, 1), Uf.reshape(5, 8, 50, 1)
        before = torch.cat([torch.zeros_like(Wr[:, :1]), Wr.cumsum(1)[:, :-1]], 1)   # W from the coarse start
        torch.testing.assert_close((Ur + h * before).sum(1), Uc, rtol=0, atol=1e-13)


@pytest.mark.parametrize("kind", ["grid", "tree"])
@pytest.mark.parametrize("levy", [False, True])
def test_reverse_grids_read_the_step_convention(kind, levy):
    """On a decreasing grid the n-th step reads dW = W(t_{n+1}) - W(t_n) = -bm(t_{n+1}, t_n) and
    U = int_{t_n}^{t_{n+1}} (W_s - W(t_n)) ds, so U/h - dW/2 (the Levy area schemes read) is the forward one."""
    path = _paths(levy, B=20)[kind]
    ts = torch.linspace(0.0, 1.0, 41, dtype=F64)[::4]
    fwd, back = path.increments(ts, levy_area=levy), path.increments(ts.flip(0), levy_area=levy)
    Wf, Uf = fwd if levy else (fwd, None)
    Wb, Ub = back if levy else (back, None)
    torch.testing.assert_close(Wb, -Wf.flip(0), rtol=0, atol=0)
    for n in range(len(ts) - 1):
        a, b = float(ts.flip(0)[n + 1]), float(ts.flip(0)[n])
        torch.testing.assert_close(Wb[n], -path(a, b), rtol=0, atol=1e-14)
    if levy:
        h = (ts[1:] - ts[:-1]).reshape(-1, 1, 1)
        torch.testing.assert_close((Ub / -h.flip(0)) - Wb / 2, (Uf / h - Wf / 2).flip(0), rtol=0, atol=1e-13)


def test_tree_values_are_a_function_of_the_seed_alone():
    """The same seed gives the same W at a time whatever was queried before and in which order; another seed differs."""
    a = VirtualBrownianTree(0.0, 2.0, (3, 2), seed=11, levy_area=True, dtype=F64)
    b = VirtualBrownianTree(0.0, 2.0, (3, 2), seed=11, levy_area=True, dtype=F64)
    b.increments(torch.linspace(2.0, 0.0, 37, dtype=F64), levy_area=True)      # a different history
    for ta, tb in ((0.3, 1.7), (1.2345, 1.2346), (0.0, 2.0)):
        torch.testing.assert_close(b(ta, tb, return_U=True), a(ta, tb, return_U=True), rtol=0, atol=0)
    c = VirtualBrownianTree(0.0, 2.0, (3, 2), seed=12, dtype=F64)
    assert not torch.allclose(c(0.3, 1.7), a(0.3, 1.7))


def test_tree_below_its_resolution_is_the_bridge_mean_and_stays_additive():
    """Inside a leaf (steps below tol) W is the conditional mean given the leaf's (W, H): increments still add up."""
    tree = VirtualBrownianTree(0.0, 1.0, (5, 1), seed=3, tol=1e-3, levy_area=True, dtype=F64)
    ts = torch.linspace(0.5, 0.5 + 3e-3, 31, dtype=F64)                    # steps of 1e-4 across three leaves
    W, U = tree.increments(ts, levy_area=True)
    Wc, Uc = tree.increments(ts[[0, -1]], levy_area=True)
    torch.testing.assert_close(W.sum(0), Wc[0], rtol=0, atol=1e-14)
    before = torch.cat([torch.zeros_like(W[:1]), W.cumsum(0)[:-1]])
    torch.testing.assert_close((U + 1e-4 * before).sum(0), Uc[0], rtol=0, atol=1e-14)


def test_grid_path_replays_its_increments_bitwise_and_refuses_other_times():
    ts = torch.linspace(0.0, 1.0, 11, dtype=F64)
    dW = torch.randn(10, 4, 2, dtype=F64, generator=torch.Generator().manual_seed(0)) * 0.1
    path = BrownianGrid(ts, dW)
    assert torch.equal(path.increments(ts), dW)
    with pytest.raises(ValueError, match="grid times only"):
        path.increments(torch.tensor([0.0, 0.55, 1.0], dtype=F64))
    with pytest.raises(ValueError, match="queried over"):
        path.increments(torch.tensor([0.0, 1.5], dtype=F64))
    with pytest.raises(ValueError, match="levy_area=True"):
        path.increments(ts, levy_area=True)
    # increments given on a decreasing grid (the step convention) make the same path
    back = BrownianGrid(ts.flip(0), -dW.flip(0))
    torch.testing.assert_close(back.increments(ts), dW, rtol=0, atol=0)


def test_as_path_accepts_sdekit_paths_and_the_torchsde_protocol_only():
    tree = VirtualBrownianTree(0.0, 1.0, (2, 1), seed=0)
    assert as_path(tree) is tree
    with pytest.raises(TypeError, match="Brownian path"):
        as_path(torch.zeros(3))


@needs_torchsde
def test_torchsde_paths_are_read_step_by_step_and_out_of_range_is_an_error():
    import torchsde
    bm = torchsde.BrownianInterval(t0=0.0, t1=1.0, size=(6, 2), dtype=F64, entropy=5,
                                   levy_area_approximation="space-time")
    path = as_path(bm)
    assert isinstance(path, CallablePath) and path.anytime and path.levy_area
    ts = torch.linspace(0.0, 1.0, 9, dtype=F64)
    W, U = path.increments(ts, levy_area=True)
    for n in range(8):
        w, u = bm(float(ts[n]), float(ts[n + 1]), return_U=True)
        assert torch.equal(W[n], w) and torch.equal(U[n], u)
    with pytest.raises(ValueError, match="outside its interval"):
        path.increments(torch.tensor([0.5, 1.5], dtype=F64))


# --- simulate(bm=) ----------------------------------------------------------------------------------------------
import sdekit  # noqa: E402
from sdekit.solvers import SCHEMES  # noqa: E402

MU, SIGMA = 0.3, 0.5


def gbm():
    """dX = mu X dt + sigma X dW: X_T = x0 exp((mu - sigma^2/2) T + sigma W_T); Stratonovich drift (mu - sigma^2/2) X."""
    th = torch.tensor([MU, SIGMA], dtype=F64)
    f = lambda t, x, th: th[0] * x
    f_strat = lambda t, x, th: (th[0] - 0.5 * th[1] ** 2) * x
    g = lambda t, x, th: th[1] * x
    return f, f_strat, g, th


def gbm_exact(x0, W_T, T=1.0):
    return x0 * torch.exp(torch.tensor((MU - 0.5 * SIGMA**2) * T, dtype=F64) + SIGMA * W_T)


def _drift(scheme, f, f_strat):
    return f if SCHEMES[scheme].sde_type == "ito" else f_strat


def _coarse_from_fine(dW, U, h_fine, k):
    """Sum k fine steps into one: W adds, U_coarse = sum (U_j + h_fine * W before step j), H = U/h - W/2."""
    N, B, m = dW.shape
    Wr = dW.reshape(N // k, k, B, m)
    Wc = Wr.sum(1)
    if U is None:
        return Wc, None
    before = torch.cat([torch.zeros_like(Wr[:, :1]), Wr.cumsum(1)[:, :-1]], 1)
    Uc = (U.reshape(N // k, k, B, m) + h_fine * before).sum(1)
    return Wc, Uc / (k * h_fine) - 0.5 * Wc


@pytest.mark.parametrize("kind", ["grid", "tree"])
@pytest.mark.parametrize("scheme", ["euler", "milstein", "heun", "srk", "reversible_heun"])
def test_a_coarse_solve_on_the_path_is_a_solve_on_the_summed_fine_increments(kind, scheme):
    """Refinement consistency: the path's coarse steps are the sums of its fine ones (and for srk the space-time
    Levy areas combine the fine ones), so the coarse solve equals one on hand-summed increments to round-off."""
    f, f_strat, g, th = gbm()
    B, k = 16, 4
    fine = torch.linspace(0.0, 1.0, 65, dtype=F64)
    levy = SCHEMES[scheme].needs_levy_area
    path = (BrownianGrid.draw(fine, (B, 1), torch.Generator().manual_seed(3), levy_area=levy) if kind == "grid" else
            VirtualBrownianTree(0.0, 1.0, (B, 1), seed=3, levy_area=levy, dtype=F64))
    out = path.increments(fine, levy_area=levy)
    dW, U = out if levy else (out, None)
    Wc, Hc = _coarse_from_fine(dW, U, float(fine[1] - fine[0]), k)
    x0 = torch.full((B, 1), 1.5, dtype=F64)
    coarse = fine[::k]
    drift = _drift(scheme, f, f_strat)
    on_path = sdekit.simulate(drift, g, x0, th, coarse, scheme=scheme, bm=path, save="path")
    on_sums = sdekit.simulate(drift, g, x0, th, coarse, dW=Wc, scheme=scheme, levy_area=Hc, save="path")
    torch.testing.assert_close(on_path, on_sums, rtol=1e-12, atol=1e-12)


def test_grid_path_drawn_from_a_generator_is_what_simulate_draws():
    """BrownianGrid.draw(ts, shape, generator) holds the increments (and srk's Levy areas) simulate(generator=) draws:
    the same Euler path bitwise."""
    f, f_strat, g, th = gbm()
    ts = torch.linspace(0.0, 1.0, 41, dtype=F64)
    x0 = torch.ones(8, 1, dtype=F64)
    for scheme in ("euler", "srk"):
        drawn = sdekit.simulate(f, g, x0, th, ts, scheme=scheme, generator=torch.Generator().manual_seed(5))
        path = BrownianGrid.draw(ts, (8, 1), torch.Generator().manual_seed(5), levy_area=SCHEMES[scheme].needs_levy_area)
        tol = 1e-14 if scheme == "srk" else 0.0     # the path stores U = h (dW/2 + H); H comes back to round-off
        torch.testing.assert_close(sdekit.simulate(f, g, x0, th, ts, scheme=scheme, bm=path), drawn, rtol=tol, atol=tol)


@pytest.mark.parametrize("scheme, order", [("euler", 0.5), ("milstein", 1.0)])
def test_refinements_on_one_path_converge_to_the_closed_form_at_the_strong_order(scheme, order):
    """Euler and Milstein on grids N = 8 .. 512, every one reading the same path, against GBM's closed form on the
    path's own W_1: the fitted strong-error slope is the declared order within 0.15 (2000 paths)."""
    f, _, g, th = gbm()
    B = 2000
    fine = torch.linspace(0.0, 1.0, 513, dtype=F64)
    path = BrownianGrid.draw(fine, (B, 1), torch.Generator().manual_seed(11))
    x0 = torch.ones(B, 1, dtype=F64)
    exact = gbm_exact(x0, path(0.0, 1.0))
    Ns = [8, 16, 32, 64, 128, 256, 512]
    errs = [float((sdekit.simulate(f, g, x0, th, fine[::512 // N], scheme=scheme, bm=path) - exact).abs().mean()) for N in Ns]
    slope = -torch.linalg.lstsq(torch.tensor([[math.log(N), 1.0] for N in Ns], dtype=F64),
                                torch.tensor([math.log(e) for e in errs], dtype=F64)[:, None]).solution[0, 0]
    assert abs(float(slope) - order) < 0.15, (errs, float(slope))
    assert errs[-1] < errs[0] / 4


@needs_torchsde
@pytest.mark.parametrize("scheme", ["euler", "heun", "srk"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_torchsde_brownian_interval_gives_the_solve_on_the_increments_read_from_it(scheme, direction):
    """bm=BrownianInterval equals dW (and srk's H = U/h - dW/2) read from it step by step with bm(t_lo, t_hi): on a
    decreasing grid step n reads dW = -bm(t_{n+1}, t_n) and U = (t_n - t_{n+1}) W - U_fwd."""
    import torchsde
    f, f_strat, g, th = gbm()
    B = 6
    levy = SCHEMES[scheme].needs_levy_area
    bm = torchsde.BrownianInterval(t0=0.0, t1=1.0, size=(B, 1), dtype=F64, entropy=7,
                                   levy_area_approximation="space-time" if levy else "none")
    ts = torch.linspace(0.0, 1.0, 21, dtype=F64)
    if direction == "reverse":
        ts = ts.flip(0)
    dW, H = [], []
    for a, b in zip(ts[:-1].tolist(), ts[1:].tolist()):
        lo, hi = min(a, b), max(a, b)
        W, U = bm(lo, hi, return_U=True) if levy else (bm(lo, hi), None)
        if b < a:                                           # the step runs hi -> lo (W, U on the right: forward)
            W, U = -W, (None if U is None else (hi - lo) * W - U)
        dW.append(W)
        H.append(None if U is None else U / (b - a) - 0.5 * W)
    dW = torch.stack(dW)
    H = torch.stack(H) if levy else None
    x0 = torch.ones(B, 1, dtype=F64)
    drift = _drift(scheme, f, f_strat)
    got = sdekit.simulate(drift, g, x0, th, ts, scheme=scheme, bm=bm, save="path")
    want = sdekit.simulate(drift, g, x0, th, ts, dW=dW, levy_area=H, scheme=scheme, save="path")
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("kind", ["grid", "tree"])
def test_reverse_time_solve_on_the_path_retraces_it(kind):
    """dX = sigma dW solved from t = 1 back to 0 on the path: Euler is exact, X(0) = X(1) + sigma (W(0) - W(1)),
    since a decreasing grid reads dW_n = W(t_{n+1}) - W(t_n); a forward solve then a backward one returns to x0."""
    B, sigma = 10, 0.7
    ts = torch.linspace(0.0, 1.0, 33, dtype=F64)
    path = (BrownianGrid.draw(ts, (B, 2), torch.Generator().manual_seed(2)) if kind == "grid" else
            VirtualBrownianTree(0.0, 1.0, (B, 2), seed=2, dtype=F64))
    th = torch.tensor([sigma], dtype=F64)
    f = lambda t, x, th: torch.zeros_like(x)
    g = lambda t, x, th: th[0].expand_as(x)
    x1 = torch.randn(B, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    x0 = sdekit.simulate(f, g, x1, th, ts.flip(0), bm=path)
    torch.testing.assert_close(x0, x1 - sigma * path(0.0, 1.0), rtol=0, atol=1e-13)
    torch.testing.assert_close(sdekit.simulate(f, g, x0, th, ts, bm=path), x1, rtol=0, atol=1e-13)


@pytest.mark.parametrize("noise, m", [("scalar", 1), ("general", 3)])
def test_paths_drive_every_noise_type(noise, m):
    """The path's shape is the noise's (B, m): scalar (B, 1) and general (B, m) noise read it like dW."""
    B, d = 5, 2
    C = torch.tensor([[0.3, -0.2, 0.1], [0.05, 0.4, -0.3]], dtype=F64)[:, :m]
    th = torch.tensor([0.2], dtype=F64)
    f = lambda t, x, th: -th[0] * x
    g = lambda t, x, th: x.unsqueeze(-1) * C
    tree = VirtualBrownianTree(0.0, 1.0, (B, m), seed=4, dtype=F64)
    ts = torch.linspace(0.0, 1.0, 17, dtype=F64)
    x0 = torch.ones(B, d, dtype=F64)
    for scheme in ("euler", "heun"):
        got = sdekit.simulate(f, g, x0, th, ts, scheme=scheme, noise=noise, bm=tree)
        want = sdekit.simulate(f, g, x0, th, ts, dW=tree.increments(ts), scheme=scheme, noise=noise)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=rf"bm has shape \(5, 2\).*\(5, {m}\)"):
        sdekit.simulate(f, g, x0, th, ts, noise=noise, bm=VirtualBrownianTree(0.0, 1.0, (B, d), seed=4, dtype=F64))


def test_bad_combinations_are_errors_that_say_what_to_do():
    f, _, g, th = gbm()
    B = 4
    ts = torch.linspace(0.0, 1.0, 9, dtype=F64)
    x0 = torch.ones(B, 1, dtype=F64)
    grid = BrownianGrid.draw(ts, (B, 1), torch.Generator().manual_seed(0))
    tree = VirtualBrownianTree(0.0, 1.0, (B, 1), seed=0, dtype=F64)
    dW = grid.increments(ts)
    with pytest.raises(ValueError, match="given twice"):
        sdekit.simulate(f, g, x0, th, ts, dW=dW, bm=grid)
    with pytest.raises(ValueError, match="generator= draws the increments and bm= gives them"):
        sdekit.simulate(f, g, x0, th, ts, bm=grid, generator=torch.Generator())
    with pytest.raises(ValueError, match="given twice"):
        sdekit.simulate(f, g, x0, th, ts, scheme="srk", levy_area=dW, bm=tree)
    with pytest.raises(ValueError, match="levy_area=True"):
        sdekit.simulate(f, g, x0, th, ts, scheme="srk", bm=tree)              # srk needs Levy area, tree has none
    with pytest.raises(TypeError, match="dtype"):
        sdekit.simulate(f, g, x0, th, ts, bm=VirtualBrownianTree(0.0, 1.0, (B, 1), seed=0))     # float32 path
    with pytest.raises(ValueError, match="covers"):
        sdekit.simulate(f, g, x0, th, torch.linspace(0.0, 2.0, 9, dtype=F64), bm=tree)
    with pytest.raises(ValueError, match="grid times only"):
        sdekit.simulate(f, g, x0, th, torch.linspace(0.0, 1.0, 7, dtype=F64), bm=grid)
    with pytest.raises(TypeError, match="Brownian path"):
        sdekit.simulate(f, g, x0, th, ts, bm=dW)
    # adaptive steps need a path that answers any time
    with pytest.raises(ValueError, match="adaptive steps choose their own times"):
        sdekit.simulate(f, g, x0, th, ts, dW=dW, adaptive=True)
    with pytest.raises(ValueError, match="queried at any time"):
        sdekit.simulate(f, g, x0, th, ts, bm=grid, adaptive=True)


def test_fixed_grids_report_their_steps():
    f, _, g, th = gbm()
    ts = torch.linspace(0.0, 1.0, 9, dtype=F64)
    x, info = sdekit.simulate(f, g, torch.ones(3, 1, dtype=F64), th, ts, generator=torch.Generator().manual_seed(0),
                              return_info=True)
    assert x.shape == (3, 1) and info == {"accepted": 8, "rejected": 0, "step_evaluations": 8}


# --- adaptive steps -------------------------------------------------------------------------------------------
def stiff_layer(lam=200.0, tau=0.015, sigma=0.3):
    """dX = -lam e^(-t/tau) X dt + sigma X dW: a stiff layer at t = 0 (explicit Euler is unstable there for steps
    above 2/lam = 0.01), then GBM. X_1 = exp(-lam tau (1 - e^(-1/tau)) - sigma^2/2 + sigma W_1)."""
    th = torch.tensor([lam, tau, sigma], dtype=F64)
    f = lambda t, x, th: -th[0] * torch.exp(-t / th[1]) * x
    f_strat = lambda t, x, th: -th[0] * torch.exp(-t / th[1]) * x - 0.5 * th[2] ** 2 * x
    g = lambda t, x, th: th[2] * x
    exact = lambda W1: torch.exp(torch.tensor(-lam * tau * (1 - math.exp(-1 / tau)) - 0.5 * sigma**2, dtype=F64) + sigma * W1)
    return f, f_strat, g, th, exact


@pytest.mark.parametrize("scheme", ["milstein", "heun", "midpoint"])
@pytest.mark.parametrize("problem", ["gbm", "stiff"])
def test_adaptive_error_is_within_the_tolerance_against_the_closed_form(scheme, problem):
    """Strong error E|X_1 - X(1)| of adaptive solves against the closed form on the same path (64 paths), at rtol
    1e-2 and 1e-4 with atol = rtol/100, where max|X| over the path is about 1 (X_0 = 1): at most sqrt(rtol), and
    smaller at the tighter tolerance by at least 100^(1/4). Local errors held at tol add up over the steps;
    sqrt(tol) is the global rate of a scheme whose error in a stiff layer is its first-order drift's (Milstein;
    the noise terms alone give O(tol^(p/(p+1/2))) for strong order p). Measured: 0.1-0.4 of the bound at 1e-2,
    3-13x smaller at 1e-4; uniform steps of dt0 = 1/100 (the first step tried, at explicit Euler's stability edge in
    the layer) leave errors of 0.04 (Milstein), 0.06 (Heun) and 0.27 (midpoint) on the stiff layer, above the
    bound at 1e-4."""
    B = 64
    if problem == "gbm":
        f, f_strat, g, th = gbm()
        exact = lambda W1: gbm_exact(torch.ones(B, 1, dtype=F64), W1)
    else:
        f, f_strat, g, th, exact = stiff_layer()
    tree = VirtualBrownianTree(0.0, 1.0, (B, 1), seed=21, dtype=F64)
    X1 = exact(tree(0.0, 1.0))
    errs = []
    tols = (1e-2, 1e-4)
    for rtol in tols:
        x = sdekit.simulate(_drift(scheme, f, f_strat), g, torch.ones(B, 1, dtype=F64), th,
                            torch.tensor([0.0, 1.0], dtype=F64), scheme=scheme, bm=tree, adaptive=True, rtol=rtol,
                            atol=rtol / 100)
        errs.append(float((x - X1).abs().mean()))
        assert errs[-1] <= math.sqrt(rtol), (rtol, errs)
    assert errs[1] <= errs[0] / (tols[0] / tols[1]) ** 0.25, errs


@pytest.mark.parametrize("scheme", ["milstein", "heun"])
def test_adaptive_reaches_the_error_of_the_best_fixed_grid_with_far_fewer_steps(scheme):
    """On the stiff layer, one Brownian motion (64 paths): the uniform grid (N = 2^5 .. 2^12, read from the same tree)
    needing the fewest steps to reach the adaptive solve's error (rtol 1e-2) takes at least 3x the adaptive solve's
    scheme steps, counting 3 per attempt and the rejected attempts (measured: 10-13x for Milstein, 20-35x for Heun)."""
    B = 64
    f, f_strat, g, th, exact = stiff_layer()
    drift = _drift(scheme, f, f_strat)
    tree = VirtualBrownianTree(0.0, 1.0, (B, 1), seed=8, dtype=F64)
    X1 = exact(tree(0.0, 1.0))
    x0 = torch.ones(B, 1, dtype=F64)
    x, info = sdekit.simulate(drift, g, x0, th, torch.tensor([0.0, 1.0], dtype=F64), scheme=scheme, bm=tree,
                              adaptive=True, rtol=1e-2, atol=1e-4, return_info=True)
    err = float((x - X1).abs().mean())
    fine = torch.linspace(0.0, 1.0, 2**12 + 1, dtype=F64)
    grid = BrownianGrid(fine, tree.increments(fine))                  # dyadic times: the tree's own values
    best = None
    for k in range(5, 13):
        N = 2**k
        xf = sdekit.simulate(drift, g, x0, th, fine[::2 ** (12 - k)], scheme=scheme, bm=grid, check_finite=False)
        if float((xf - X1).abs().mean()) <= err:
            best = N
            break
    assert best is not None and best >= 3 * info["step_evaluations"], (err, best, info)


def test_adaptive_counts_its_steps_and_lands_on_every_output_time():
    f, _, g, th, exact = stiff_layer()
    B = 16
    tree = VirtualBrownianTree(0.0, 1.0, (B, 1), seed=1, dtype=F64)
    ts = torch.tensor([0.0, 0.01, 0.3, 0.55, 1.0], dtype=F64)
    xs, info = sdekit.simulate(f, g, torch.ones(B, 1, dtype=F64), th, ts, scheme="milstein", bm=tree, adaptive=True,
                               rtol=1e-2, atol=1e-4, dt0=0.5, save="path", return_info=True)
    assert xs.shape == (5, B, 1)
    assert info["rejected"] > 0                                       # dt0 = 0.5 cannot pass the stiff layer
    assert info["step_evaluations"] == 3 * (info["accepted"] + info["rejected"])
    assert len(info["t_accepted"]) == info["accepted"] and info["bm"] is tree
    assert all(bool((info["t_accepted"] == t).any()) for t in ts[1:])    # steps land on the output times
    x_end = sdekit.simulate(f, g, torch.ones(B, 1, dtype=F64), th, ts, scheme="milstein", bm=tree, adaptive=True,
                            rtol=1e-2, atol=1e-4, dt0=0.5)
    torch.testing.assert_close(xs[-1], x_end, rtol=0, atol=0)
    torch.testing.assert_close(xs[0], torch.ones(B, 1, dtype=F64))


def test_adaptive_without_a_path_draws_a_tree_from_the_generator():
    f, _, g, th = gbm()
    B = 8
    x0 = torch.ones(B, 1, dtype=F64)
    ends = torch.tensor([0.0, 1.0], dtype=F64)
    run = lambda: sdekit.simulate(f, g, x0, th, ends, scheme="milstein", adaptive=True, rtol=1e-3,
                                  generator=torch.Generator().manual_seed(4), return_info=True)
    (a, info), (b, _) = run(), run()
    assert torch.equal(a, b) and isinstance(info["bm"], VirtualBrownianTree)
    X1 = gbm_exact(x0, info["bm"](0.0, 1.0))
    assert float((a - X1).abs().mean()) < 1e-3 ** 0.5


def test_adaptive_under_autograd_takes_the_same_steps_and_differentiates_them():
    """With theta requiring grad the eager steps give the eager (trace=False) solve's answer and steps, and
    dX_1/dmu = X_1 (GBM: X_1 = x0 exp((mu - sigma^2/2) + sigma W_1)) holds to the solve's accuracy. (The traced step
    rounds differently, and the step-size controller carries a round-off difference into different steps.)"""
    f, _, g, th = gbm()
    B = 16
    tree = VirtualBrownianTree(0.0, 1.0, (B, 1), seed=6, dtype=F64)
    x0 = torch.ones(B, 1, dtype=F64)
    ends = torch.tensor([0.0, 1.0], dtype=F64)
    ref, info_ref = sdekit.simulate(f, g, x0, th, ends, scheme="milstein", bm=tree, adaptive=True, rtol=1e-4,
                                    trace=False, return_info=True)
    thg = th.clone().requires_grad_(True)
    x, info = sdekit.simulate(f, g, x0, thg, ends, scheme="milstein", bm=tree, adaptive=True, rtol=1e-4, return_info=True)
    torch.testing.assert_close(x.detach(), ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(info["t_accepted"], info_ref["t_accepted"]) and info["rejected"] == info_ref["rejected"]
    (grad,) = torch.autograd.grad(x.sum(), thg)
    torch.testing.assert_close(grad[0], x.detach().sum(), rtol=2e-2, atol=0)


@needs_torchsde
def test_adaptive_on_torchsde_brownian_interval():
    """torchsde's BrownianInterval answers any time, so adaptive steps run on it (Heun, the stiff layer)."""
    import torchsde
    f, f_strat, g, th, exact = stiff_layer()
    B = 32
    bm = torchsde.BrownianInterval(t0=0.0, t1=1.0, size=(B, 1), dtype=F64, entropy=3)
    x, info = sdekit.simulate(f_strat, g, torch.ones(B, 1, dtype=F64), th, torch.tensor([0.0, 1.0], dtype=F64),
                              scheme="heun", bm=bm, adaptive=True, rtol=1e-3, atol=1e-5, return_info=True)
    X1 = exact(bm(0.0, 1.0))
    assert float((x - X1).abs().mean() / X1.abs().mean()) < 3 * 1e-3 ** (2 / 3)
    assert info["accepted"] > 0


def test_adaptive_euler_is_refused_unless_the_noise_is_additive():
    """Euler's adaptive solution converges to a wrong limit on non-additive noise (test below): refused, naming the
    schemes to use; with additive noise (dX = -X dt + 0.5 dW, where Euler is Milstein) it runs."""
    f, _, g, th = gbm()
    x0 = torch.ones(4, 1, dtype=F64)
    ends = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(ValueError, match="'euler' on diagonal noise converge to a wrong solution.*milstein"):
        sdekit.simulate(f, g, x0, th, ends, adaptive=True, generator=torch.Generator().manual_seed(0))
    ga = lambda t, x, th: torch.full((x.shape[0], 1, 1), 0.5, dtype=x.dtype)
    fa = lambda t, x, th: -x
    tree = VirtualBrownianTree(0.0, 1.0, (4, 1), seed=0, dtype=F64)
    x = sdekit.simulate(fa, ga, x0, th, ends, noise="additive", bm=tree, adaptive=True, rtol=1e-4)
    fine = torch.linspace(0.0, 1.0, 2**12 + 1, dtype=F64)
    ref = sdekit.simulate(fa, ga, x0, th, fine, noise="additive", scheme="heun", bm=tree)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-2)


@pytest.mark.slow
def test_adaptive_euler_is_biased_and_milstein_is_not():
    """Why adaptive Euler is refused: solves of one GBM path each (so every step decision reads that path's noise),
    200 paths: Euler's mean signed error E[X_1 - X(1)] is 4 (rtol 1e-2) and 8 (1e-3) standard errors from 0 and does
    not shrink (measured 0.037 +- 0.005, 0.063 +- 0.003); Milstein's shrinks towards 0 (-0.008, -0.002) and is under
    a third of Euler's."""
    from sdekit.solvers.adaptive import integrate_adaptive
    from sdekit.solvers.schemes import euler_step, milstein_step
    f, _, g, th = gbm()
    ends = torch.tensor([0.0, 1.0], dtype=F64)
    bias = {}
    for name, step in (("euler", euler_step), ("milstein", milstein_step)):
        run = lambda t, h, x, dw, H, step=step: step(f, g, t, h, x, th, dw)
        for rtol in (1e-2, 1e-3):
            d = []
            for seed in range(200):
                tree = VirtualBrownianTree(0.0, 1.0, (1, 1), seed=5000 + seed, dtype=F64)
                x, _ = integrate_adaptive(run, torch.ones(1, 1, dtype=F64), ends, tree, order=0.5 if name == "euler" else 1.0,
                                          levy=False, rtol=rtol, atol=rtol / 100, dt0=None, dt_min=None, max_steps=10**6,
                                          save="end")
                d.append(float(x - gbm_exact(torch.ones(1, 1, dtype=F64), tree(0.0, 1.0))))
            d = torch.tensor(d, dtype=F64)
            bias[name, rtol] = (float(d.mean()), float(d.std() / math.sqrt(len(d))))
    (e2, s2), (e3, s3) = bias["euler", 1e-2], bias["euler", 1e-3]
    assert e2 > 4 * s2 and e3 > 8 * s3 and e3 > 0.8 * e2, bias
    assert abs(bias["milstein", 1e-3][0]) < abs(bias["milstein", 1e-2][0]) and abs(bias["milstein", 1e-3][0]) < e3 / 3, bias



@needs_torchsde
def test_torchsde_and_sdekit_share_paths_both_ways():
    """interop.torchsde.brownian_interval builds a BrownianInterval over a grid (a seed gives the same path), and
    torchsde.sdeint accepts sdekit's paths as bm: Euler and srk (space-time Levy area) in both libraries on one
    VirtualBrownianTree agree to 1e-12 in float64."""
    import torchsde

    from sdekit.interop.torchsde import brownian_interval
    ts = torch.linspace(1.0, 0.0, 11, dtype=F64)
    a = brownian_interval(ts, (3, 2), generator=torch.Generator().manual_seed(9), levy_area=True)
    b = brownian_interval(ts, (3, 2), generator=torch.Generator().manual_seed(9), levy_area=True)
    assert torch.equal(as_path(a).increments(ts), as_path(b).increments(ts))
    assert a.levy_area_approximation == "space-time" and tuple(a.shape) == (3, 2)

    f, _, g, th = gbm()

    class SDE(torch.nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        def f(self, t, y):
            return f(t, y, th)

        def g(self, t, y):
            return g(t, y, th)

    B = 8
    x0 = torch.ones(B, 1, dtype=F64)
    grid = torch.linspace(0.0, 1.0, 33, dtype=F64)
    for method in ("euler", "srk"):
        tree = VirtualBrownianTree(0.0, 1.0, (B, 1), seed=2, levy_area=method == "srk", dtype=F64)
        theirs = torchsde.sdeint(SDE(), x0, grid, method=method, dt=1 / 32, bm=tree)
        ours = sdekit.simulate(f, g, x0, th, grid, scheme=method, bm=tree, save="path")
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_adaptive_limits_are_reported():
    """max_steps attempts, then a RuntimeError naming how far it got; steps held at dt_min above tolerance are
    accepted, counted and warned about; a state that is not finite even at dt_min is a FloatingPointError."""
    f, _, g, th, _ = stiff_layer()
    B = 8
    x0 = torch.ones(B, 1, dtype=F64)
    ends = torch.tensor([0.0, 1.0], dtype=F64)
    tree = VirtualBrownianTree(0.0, 1.0, (B, 1), seed=0, dtype=F64)
    with pytest.raises(RuntimeError, match="more than max_steps=5 attempts"):
        sdekit.simulate(f, g, x0, th, ends, scheme="milstein", bm=tree, adaptive=True, rtol=1e-4, max_steps=5)
    with pytest.warns(RuntimeWarning, match="minimum size dt_min"):
        _, info = sdekit.simulate(f, g, x0, th, ends, scheme="milstein", bm=tree, adaptive=True, rtol=1e-6, atol=1e-8,
                                  dt_min=0.05, return_info=True)
    assert info["dt_min_steps"] > 0
    blow = lambda t, x, th: torch.where(t > 0.5, torch.full_like(x, float("inf")), -x)
    with pytest.raises(FloatingPointError, match="non-finite"):
        sdekit.simulate(blow, g, x0, th, ends, scheme="milstein", bm=tree, adaptive=True, dt_min=1e-3)

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

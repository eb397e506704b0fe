"""Sensitivity methods on inputs that used to give wrong answers: non-uniform grids through torchsde's adjoint,
the Ito-Stratonovich conversion with a non-diagonal g, and the score function where dg/dtheta vanishes at the start."""
import pytest
import torch

from sdekit.sensitivity import adjoint, backprop, brownian_increments
from sdekit.sensitivity.problems import make_problem


def _nonuniform(N, B, seed, reverse=False, power=2):
    """GBM (mu=0.5, sigma=0.8) on the grid t_n = (n/N)^power (power 2: steps from 1/N^2 to ~2/N), forward or
    reversed."""
    pb = make_problem("gbm", mu=0.5, sigma=0.8)
    ts = torch.linspace(0, 1, N + 1, dtype=torch.float64) ** power
    ts = ts.flip(0) if reverse else ts
    dW = brownian_increments(ts, (B, 1), torch.Generator().manual_seed(seed))
    return pb, pb.x0(B), ts, dW


# --- torchsde's adjoint on a non-uniform grid ---------------------------------------------------------------------
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("power", [2, 1])
def test_torchsde_reversible_adjoint_equals_backprop_on_uniform_and_nonuniform_grids(reverse, power):
    """reversible_heun + adjoint_reversible_heun is algebraically reversible: on the same steps and increments its
    gradient is backprop's through the same discrete solve, to round-off. Only every grid point reaching torchsde
    as a step end gives that (one call over [t0, tN] with dt = min step interpolated the Brownian path: 6% off; on
    a uniform grid (power 1) the summed times missed grid points: 0.1-1% off)."""
    pytest.importorskip("torchsde")
    pb, x0, ts, dW = _nonuniform(24, 16, seed=1, reverse=reverse, power=power)
    a_th, a_x0 = adjoint.mean_gradient(pb.f, pb.g, x0, pb.theta, ts, dW, pb.loss, "reversible_heun",
                                       backend="torchsde", wrt="both")
    b_th, b_x0 = backprop.mean_gradient(pb.f, pb.g, x0, pb.theta, ts, dW, pb.loss, "reversible_heun", wrt="both")
    assert (a_th - b_th).abs().max() < 1e-10 * b_th.abs().max(), (a_th, b_th)
    assert (a_x0 - b_x0).abs().max() < 1e-10 * b_x0.abs().max()


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("power", [2, 1])
def test_torchsde_euler_adjoint_equals_backprop_where_the_discretisations_coincide(reverse, power):
    """dX = (th0 - k X) dt + th1 dW: the adjoint SDE is linear with constant coefficients (df/dx = -k, df/dth and
    dg/dth constant), so torchsde's Euler step of it backwards over [t_n, t_n+1] is exactly backprop's step through
    the Euler map, provided its forward solve stepped on the same grid with the same increments."""
    pytest.importorskip("torchsde")
    k = 1.3
    f = lambda t, x, th: th[0] - k * x                     # noqa: E731
    g = lambda t, x, th: th[1] * torch.ones_like(x)        # noqa: E731
    loss = lambda x: (x**2).sum(-1)                        # noqa: E731
    theta = torch.tensor([0.4, 0.7], dtype=torch.float64)
    _, x0, ts, dW = _nonuniform(24, 16, seed=2, reverse=reverse, power=power)
    x0 = x0 + torch.linspace(-1, 1, 16, dtype=torch.float64)[:, None]
    for scheme in ("euler", "milstein"):                   # milstein is euler for additive noise
        a = adjoint.mean_gradient(f, g, x0, theta, ts, dW, loss, scheme, backend="torchsde", wrt="both")
        b = backprop.mean_gradient(f, g, x0, theta, ts, dW, loss, scheme, wrt="both")
        for u, v in zip(a, b):
            assert (u - v).abs().max() < 1e-10 * v.abs().max(), (scheme, u, v)


@pytest.mark.parametrize("scheme", ["milstein", "midpoint"])
def test_torchsde_adjoint_converges_to_backprop_on_a_nonuniform_grid(scheme):
    """Multiplicative noise: torchsde integrates the adjoint SDE with its own discretisation, so it agrees with
    backprop up to an error that shrinks with the step. Coarse (N=16) and 4x finer (N=64) grids on the same path,
    three seeds: both schemes are strong order 1 on this problem, so the error falls ~4x (asserted: over 2x)."""
    pytest.importorskip("torchsde")
    B, Nf = 32, 64
    rels = []
    for seed in range(3):
        pb, x0, ts_f, dW_f = _nonuniform(Nf, B, seed)
        rel = []
        for c in (4, 1):
            ts, dW = ts_f[::c], dW_f.reshape(Nf // c, c, B, 1).sum(1)
            a = adjoint.mean_gradient(pb.f, pb.g, x0, pb.theta, ts, dW, pb.loss, scheme, backend="torchsde")
            b = backprop.mean_gradient(pb.f, pb.g, x0, pb.theta, ts, dW, pb.loss, scheme)
            rel.append(float((a - b).abs().max() / b.abs().max()))
        rels.append(rel)
    assert all(r[1] < r[0] / 2 for r in rels), rels


def test_torchsde_backend_refuses_reversible_heun_with_another_adjoint_method():
    pytest.importorskip("torchsde")
    pb, x0, ts, dW = _nonuniform(4, 3, seed=0)
    with pytest.raises(ValueError, match="adjoint_reversible_heun"):
        adjoint.mean_gradient(pb.f, pb.g, x0, pb.theta, ts, dW, pb.loss, "reversible_heun", backend="torchsde",
                              adjoint_method="midpoint")

"""Every sensitivity method on every (scheme, noise type), forward and reverse time, on the same discrete solve:
forward mode, backprop, the native adjoint (reversible or checkpointed) and finite differences with common random
numbers agree with each other, for dX/dtheta and dX/dx0 alike.

Tolerances (float64): forward, backprop and the adjoints differentiate the same step maps exactly, so they agree to
round-off (1e-10 relative; measured 1e-16 to 1e-15). Central differences with h = 1e-5 carry O(h^2) truncation and
O(eps/h) round-off: 1e-6 relative (measured 1e-9 to 1e-8).
"""
import math

import pytest
import torch
from _cases import cover_each

from sdekit import sensitivity, simulate
from sdekit.sensitivity import adjoint, backprop, finite_diff
from sdekit.solvers import NOISE_TYPES, SCHEMES
from sdekit.solvers.brownian_path import BrownianGrid

DT = torch.float64
B, d, N = 3, 2, 6
A = torch.tensor([[0.2, -0.5], [0.4, -0.3]], dtype=DT)
G0 = torch.tensor([[1.0, 0.3, -0.2], [0.1, 0.8, 0.5]], dtype=DT)


def drift(t, x, th):
    return th[0] * torch.sin(x) + th[1] * x @ A.T + 0.3 * t


# one diffusion per noise type, each depending on theta, and on x and t where the noise type allows
DIFFUSIONS = {
    "diagonal": lambda t, x, th: th[2] * (1 + 0.5 * torch.cos(x)) + 0.1 * t,
    "scalar": lambda t, x, th: (th[2] * torch.stack([torch.cos(x[:, 0]) + 0.3 * x[:, 1],
                                                     1 + 0.2 * torch.sin(x[:, 1] + x[:, 0])], -1))[..., None],
    "additive": lambda t, x, th: (th[2] * G0 * (1 + t)).expand(x.shape[0], 2, 3),
    "general": lambda t, x, th: th[2] * torch.stack([torch.sin(x), torch.cos(x @ A), 1 + 0.3 * x.flip(-1)], -1),
}
M = {"diagonal": d, "scalar": 1, "additive": 3, "general": 3}
THETA = torch.tensor([0.7, -0.4, 0.3], dtype=DT)


def loss(x):
    return (x ** 2).sum(-1) + torch.sin(x[:, 0])


def _noise(noise, reverse, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ts = torch.linspace(1.0, 0.0, N + 1, dtype=DT) if reverse else torch.linspace(0.0, 1.0, N + 1, dtype=DT)
    x0 = torch.randn(B, d, generator=gen, dtype=DT)
    dW = torch.randn(N, B, M[noise], generator=gen, dtype=DT) / math.sqrt(N)
    H = torch.randn(N, B, M[noise], generator=gen, dtype=DT) / math.sqrt(12 * N)
    return x0, ts, dW, H


CASES = [(scheme, noise) for scheme, s in SCHEMES.items() for noise in NOISE_TYPES if noise in s.orders]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_the_case_table_covers_every_scheme_and_noise_type():
    assert {s for s, _ in CASES} == set(SCHEMES)
    assert {n for _, n in CASES} == set(NOISE_TYPES)
    assert len(CASES) == sum(len(s.orders) for s in SCHEMES.values())


# the default run takes each scheme and each noise type at least once; the other pairs run with -m slow (CI)
@pytest.mark.parametrize("scheme, noise", cover_each(CASES, 0, 1))
def test_forward_backprop_adjoint_and_finite_differences_agree(scheme, noise):
    g = DIFFUSIONS[noise]
    for reverse in (False, True):
        x0, ts, dW, H = _noise(noise, reverse)
        lv = H if SCHEMES[scheme].needs_levy_area else None
        kw = dict(noise=noise, levy_area=lv)
        # forward mode: dX/dtheta and dX/dx0 along the whole path, on the primal solver's own path
        xs, (Jt, Jx) = sensitivity.forward(drift, g, x0, THETA, ts, dW, scheme, wrt="both", **kw)
        torch.testing.assert_close(xs, simulate(drift, g, x0, THETA, ts, dW, scheme, save="path", **kw), rtol=1e-12, atol=1e-13)
        Rt, Rx = backprop.jacobian(drift, g, x0, THETA, ts, dW, scheme, wrt="both", **kw)
        assert _rel(Jt, Rt) < 1e-10 and _rel(Jx, Rx) < 1e-10, (reverse, _rel(Jt, Rt), _rel(Jx, Rx))
        # gradients of mean L(X_T): forward's chain rule, backprop, the native adjoint, checkpointed backprop
        dL = torch.func.vmap(torch.func.grad(lambda v: loss(v[None])[0]))(xs[-1])
        fwd_t, fwd_x = torch.einsum("bd,bdp->p", dL, Jt[-1]) / B, torch.einsum("bd,bdk->bk", dL, Jx[-1]) / B
        bp_t, bp_x = backprop.mean_gradient(drift, g, x0, THETA, ts, dW, loss, scheme, wrt="both", **kw)
        assert _rel(fwd_t, bp_t) < 1e-10 and _rel(fwd_x, bp_x) < 1e-10
        for backend, ck in (("native", None), ("checkpoint", 4)):          # 4: uneven segments of 6 steps
            ad_t, ad_x = adjoint.mean_gradient(drift, g, x0, THETA, ts, dW, loss, scheme, wrt="both", backend=backend,
                                               checkpoints=ck, **kw)
            assert _rel(ad_t, bp_t) < 1e-10 and _rel(ad_x, bp_x) < 1e-10, (backend, ck, reverse, _rel(ad_t, bp_t))
        # central differences on common noise
        Ft, Fx = finite_diff.jacobian(drift, g, x0, THETA, ts, dW, 1e-5, scheme, wrt="both", **kw)
        assert _rel(Ft, Jt[-1]) < 1e-6 and _rel(Fx, Jx[-1]) < 1e-6, (reverse, _rel(Ft, Jt[-1]), _rel(Fx, Jx[-1]))


@pytest.mark.parametrize("scheme", ["reversible_heun", "srk"])
def test_a_brownian_path_gives_the_same_sensitivities_as_its_increments(scheme):
    """bm=: the increments (and Levy areas) are read from the path, so every method sees the numbers dW= would give."""
    gen = torch.Generator().manual_seed(4)
    ts = torch.linspace(0.0, 1.0, N + 1, dtype=DT)
    levy = SCHEMES[scheme].needs_levy_area
    path = BrownianGrid.draw(torch.linspace(0.0, 1.0, 2 * N + 1, dtype=DT), (B, d), gen, levy_area=levy)
    read = path.increments(ts, levy_area=levy)
    dW, H = (read[0], read[1] / (ts[1] - ts[0]) - 0.5 * read[0]) if levy else (read, None)
    x0 = torch.randn(B, d, generator=gen, dtype=DT)
    g = DIFFUSIONS["diagonal"]
    _, J_bm = sensitivity.forward(drift, g, x0, THETA, ts, bm=path, scheme=scheme, save="end")
    _, J_dw = sensitivity.forward(drift, g, x0, THETA, ts, dW, scheme, save="end", levy_area=H)
    assert _rel(J_bm, J_dw) < 1e-12
    a_bm = adjoint.mean_gradient(drift, g, x0, THETA, ts, None, loss, scheme, bm=path)
    a_dw = adjoint.mean_gradient(drift, g, x0, THETA, ts, dW, loss, scheme, levy_area=H)
    assert _rel(a_bm, a_dw) < 1e-12
    fd = finite_diff.path_gradients(drift, g, x0, THETA, ts, None, loss, 1e-5, scheme, bm=path)
    bp = backprop.path_gradients(drift, g, x0, THETA, ts, dW, loss, scheme, levy_area=H)
    assert _rel(fd, bp) < 1e-6
    with pytest.raises(ValueError, match="given twice"):
        sensitivity.forward(drift, g, x0, THETA, ts, dW, scheme, bm=path)


def test_reversible_adjoint_equals_backprop_on_long_solves():
    """The reversible adjoint rebuilds 2000 steps backwards with the inverse step: still backprop's gradient to 1e-10,
    for theta and x0, on a nonlinear drift with multiplicative noise, forward and reverse time."""
    gen = torch.Generator().manual_seed(1)
    steps = 2000
    x0 = torch.randn(16, d, generator=gen, dtype=DT)
    for ts in (torch.linspace(0.0, 1.0, steps + 1, dtype=DT), torch.linspace(1.0, 0.0, steps + 1, dtype=DT)):
        dW = torch.randn(steps, 16, d, generator=gen, dtype=DT) / math.sqrt(steps)
        g = DIFFUSIONS["diagonal"]
        ad = adjoint.mean_gradient(drift, g, x0, THETA, ts, dW, loss, "reversible_heun", wrt="both")
        bp = backprop.mean_gradient(drift, g, x0, THETA, ts, dW, loss, "reversible_heun", wrt="both")
        assert _rel(ad[0], bp[0]) < 1e-10 and _rel(ad[1], bp[1]) < 1e-10, (_rel(ad[0], bp[0]), _rel(ad[1], bp[1]))


def test_per_path_gradients_of_every_method_agree():
    """backprop and finite differences per path, for theta and x0, against forward's chain rule (srk on scalar noise)."""
    x0, ts, dW, H = _noise("scalar", reverse=False, seed=3)
    g = DIFFUSIONS["scalar"]
    kw = dict(noise="scalar", levy_area=H)
    xT, (Jt, Jx) = sensitivity.forward(drift, g, x0, THETA, ts, dW, "srk", save="end", wrt="both", **kw)
    dL = torch.func.vmap(torch.func.grad(lambda v: loss(v[None])[0]))(xT)
    want_t, want_x = torch.einsum("bd,bdp->bp", dL, Jt), torch.einsum("bd,bdk->bk", dL, Jx)
    bp_t, bp_x = backprop.path_gradients(drift, g, x0, THETA, ts, dW, loss, "srk", wrt="both", **kw)
    assert _rel(bp_t, want_t) < 1e-10 and _rel(bp_x, want_x) < 1e-10
    fd_t, fd_x = finite_diff.path_gradients(drift, g, x0, THETA, ts, dW, loss, 1e-5, "srk", wrt="both", **kw)
    assert _rel(fd_t, want_t) < 1e-6 and _rel(fd_x, want_x) < 1e-6


def test_checkpoint_budget_and_backend_errors():
    x0, ts, dW, _ = _noise("diagonal", reverse=False)
    g = DIFFUSIONS["diagonal"]
    bp = backprop.mean_gradient(drift, g, x0, THETA, ts, dW, loss, "heun")
    for ck in (1, 3, N, 10 * N):                 # one segment, uneven segments, one step per segment, more than N
        assert _rel(adjoint.mean_gradient(drift, g, x0, THETA, ts, dW, loss, "heun", checkpoints=ck), bp) < 1e-10
    with pytest.raises(ValueError, match="checkpoints"):
        adjoint.mean_gradient(drift, g, x0, THETA, ts, dW, loss, "heun", checkpoints=0)
    with pytest.raises(ValueError, match="backend"):
        adjoint.mean_gradient(drift, g, x0, THETA, ts, dW, loss, "heun", backend="magic")
    with pytest.raises(ValueError, match="wrt"):
        sensitivity.forward(drift, g, x0, THETA, ts, dW, wrt="everything")
    with pytest.raises(ValueError, match="levy_area"):
        sensitivity.forward(drift, g, x0, THETA, ts, dW, "srk")
    with pytest.raises(ValueError, match="J0"):
        sensitivity.forward(drift, g, x0, THETA, ts, dW, wrt="x0", J0=torch.zeros(B, d, 3, dtype=DT))

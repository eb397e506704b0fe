"""Cached traces (trace=True) catch the common ways fields change between solves; the fusion pass keeps every trace.

A traced step freezes the Python values its fields read besides (t, x, theta): that is trace=True's contract, and
the default solve is eager. On top of the contract the cache re-checks a stored trace against the eager step; each
case below changes such a value between two solves and asserts that the traced solver and the traced forward
sensitivity still give the eager answer (and, where one exists, the closed form), not the first solve's.
"""
import math

import pytest
import torch

from sdekit import sensitivity, simulate
from sdekit.sensitivity import brownian_increments
from sdekit.sensitivity.problems import make_problem
from sdekit.solvers._tracing import field_state

DT = torch.float64


def _decay_inputs(B=4, N=100):
    x0 = torch.ones(B, 1, dtype=DT)
    theta = torch.ones(1, dtype=DT)
    ts = torch.linspace(0.0, 1.0, N + 1, dtype=DT)
    dW = torch.zeros(N, B, 1, dtype=DT)
    return x0, theta, ts, dW


def _zero(t, x, th):
    return 0.0 * x


def _solve_both(f, g=_zero):
    """(traced, eager) end states and (traced, eager) forward sensitivities."""
    x0, theta, ts, dW = _decay_inputs()
    traced = simulate(f, g, x0, theta, ts, dW, trace=True)
    eager = simulate(f, g, x0, theta, ts, dW, trace=False)
    J = sensitivity.forward(f, g, x0, theta, ts, dW, save="end", trace=True)[1]
    J_eager = sensitivity.forward(f, g, x0, theta, ts, dW, save="end", trace=False)[1]
    return traced, eager, J, J_eager


def _euler_decay(k, N=100):
    """Euler on dx = -k theta x dt, x0 = theta = 1, N steps on [0, 1]: x_N and dx_N/dtheta."""
    x = (1 - k / N) ** N
    return x, -k * (1 - k / N) ** (N - 1)


def _assert_decay(k, f):
    traced, eager, J, J_eager = _solve_both(f)
    x_exact, J_exact = _euler_decay(k)
    torch.testing.assert_close(eager, torch.full_like(eager, x_exact), rtol=1e-12, atol=0)
    torch.testing.assert_close(traced, eager, rtol=1e-12, atol=0)
    torch.testing.assert_close(J_eager[..., 0], torch.full_like(eager, J_exact), rtol=1e-12, atol=0)
    torch.testing.assert_close(J, J_eager, rtol=1e-12, atol=0)


def test_closure_value_change_is_not_frozen():
    k = 1.0
    f = lambda t, x, th: -k * th[0] * x                     # noqa: E731 (the user's idiom under test)
    for k in (1.0, 3.0, 1.0):                               # noqa: B007 (f reads k)
        _assert_decay(k, f)


RATE = 1.0


def _global_drift(t, x, th):
    return -RATE * th[0] * x


def test_global_value_change_is_not_frozen():
    global RATE
    try:
        for RATE in (1.0, 2.5):
            _assert_decay(RATE, _global_drift)
    finally:
        RATE = 1.0


class _Decay:
    def __init__(self, k):
        self.k = k

    def __call__(self, t, x, th):
        return -self.k * th[0] * x

    def drift(self, t, x, th):
        return -self.k * th[0] * x


def test_reassigned_attribute_is_not_frozen():
    model = _Decay(1.0)
    for k in (1.0, 4.0):
        model.k = k
        _assert_decay(k, model)                  # a callable object
        _assert_decay(k, model.drift)            # a bound method
    weights = _Decay(torch.tensor(1.0, dtype=DT))
    for k in (1.0, 2.0):
        weights.k = torch.tensor(k, dtype=DT)   # a tensor attribute replaced by a new tensor
        _assert_decay(k, weights)


def test_tensor_updated_in_place_is_read_at_its_current_value():
    rate = torch.tensor([1.0], dtype=DT)
    f = lambda t, x, th: -rate * th[0] * x                  # noqa: E731
    for k in (1.0, 3.0):
        rate.fill_(k)
        _assert_decay(k, f)
    scale = torch.tensor(1.0, dtype=DT)
    f_item = lambda t, x, th: -scale.item() * th[0] * x     # .item() bakes a number into a trace: caught by the check
    for k in (1.0, 2.0):
        scale.fill_(k)
        _assert_decay(k, f_item)


def test_fields_reading_tensors_that_require_grad_are_differentiated():
    """A drift closing over a parameter (not passed as theta) must get its gradient, as eagerly."""
    w = torch.tensor(0.7, dtype=DT, requires_grad=True)
    f = lambda t, x, th: -w * th[0] * x                     # noqa: E731
    x0, theta, ts, dW = _decay_inputs(N=50)
    out = simulate(f, _zero, x0, theta, ts, dW).sum()
    (grad,) = torch.autograd.grad(out, w)
    N = 50
    # d/dw of B (1 - w/N)^N
    expected = x0.shape[0] * N * (1 - 0.7 / N) ** (N - 1) * (-1 / N)
    assert math.isclose(grad.item(), expected, rel_tol=1e-12)


def test_field_state_fingerprint_tracks_reads():
    k = 1.0
    f = lambda t, x, th: -k * x                             # noqa: E731
    before = field_state(f)[0]
    assert field_state(f)[0] == before
    k = 2.0                                                 # noqa: F841 (read by f)
    assert field_state(f)[0] != before
    w = torch.zeros(1, requires_grad=True)
    assert field_state(lambda t, x, th: w * x)[1]
    assert not field_state(f)[1]


@pytest.mark.parametrize("scheme", ["euler", "milstein", "heun"])
@pytest.mark.parametrize("name", ["gbm", "neural", "diffusion_mlp"])
def test_every_problem_and_scheme_traces_without_falling_back(name, scheme, recwarn):
    """The neural drift with heun used to fail the fusion pass (add(p, p) after CSE) and run eagerly."""
    pb = make_problem(name)
    gen = torch.Generator().manual_seed(0)
    x0 = pb.x0(5, gen)
    ts = pb.ts(8)
    dW = brownian_increments(ts, tuple(x0.shape), gen)
    f = pb.drift(scheme)
    xs, J = sensitivity.forward(f, pb.g, x0, pb.theta, ts, dW, scheme=scheme)
    x_end = simulate(f, pb.g, x0, pb.theta, ts, dW, scheme)
    torch.testing.assert_close(xs[-1], x_end, rtol=1e-12, atol=1e-13)
    fallbacks = [w for w in recwarn if "could not be traced" in str(w.message)]
    assert not fallbacks, fallbacks[0].message


def test_fusion_keeps_a_product_added_to_itself():
    import warnings

    from sdekit.solvers._tracing import trace_step

    def step(x, y):
        p = x * y
        return p + p                                        # add(p, p): p cannot be fused into the add
    x, y = torch.randn(3, dtype=DT), torch.randn(3, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        bind = trace_step(step, (x, y), (x + 1, y - 1))
    torch.testing.assert_close(bind()(x, y), 2 * x * y, rtol=1e-15, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_folded_scalar_products_are_bitwise_the_unfused_ones(dtype):
    """addcmul(acc, mul(theta_k, x), y) runs as addcmul(acc, x, y, value=theta_k): one op less, the same bits.

    The tail lengths (7, 1003) reach the kernels' scalar loops as well as their vector ones, and the theta read as
    a Python number is the one of this solve (changed between two calls of bind)."""
    from sdekit.solvers._tracing import _simplify, _to_python

    def step(t, h, x, dw, th):                              # GBM's Euler step: x + th0 x h + th1 x dw
        return x + th[0] * x * h + th[1] * x * dw
    for B in (7, 1003):
        gen = torch.Generator().manual_seed(B)
        x, dw = torch.rand(B, 3, generator=gen, dtype=dtype) + 0.5, torch.randn(B, 3, generator=gen, dtype=dtype)
        t, h = torch.tensor(0.3, dtype=dtype), torch.tensor(0.01, dtype=dtype)
        gm = _simplify(torch.fx.experimental.proxy_tensor.make_fx(step)(t, h, x, dw, torch.ones(2, dtype=dtype)), (4,))
        ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        assert ops.count(torch.ops.aten.addcmul.default) == 2 and torch.ops.aten.mul.Tensor not in ops, gm.code
        bind = _to_python(gm, (4,))
        for th in (torch.tensor([0.05, 0.2], dtype=dtype), torch.tensor([-1.5, 0.7], dtype=dtype)):
            unfused = torch.addcmul(torch.addcmul(x, torch.mul(th[0], x), h), torch.mul(th[1], x), dw)
            assert torch.equal(bind(th)(t, h, x, dw), unfused)


def _swap_diffusion(t, x, th):
    """g = 0.5 (x2, x1): g_1 depends on x_2, so the noise is not diagonal in torchsde's sense."""
    return 0.5 * x.flip(-1)


def test_milstein_refuses_a_diffusion_that_is_not_diagonal():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.ones(8, 2, dtype=DT)
    theta = torch.zeros(1, dtype=DT)
    ts = torch.linspace(0, 1, 17, dtype=DT)
    dW = brownian_increments(ts, (8, 2), gen)
    f = lambda t, x, th: th[0] * x                          # noqa: E731
    with pytest.raises(ValueError, match="diagonal noise.*g_0 changes with other components"):
        simulate(f, _swap_diffusion, x0, theta, ts, dW, "milstein")
    with pytest.raises(ValueError, match="diagonal noise"):
        sensitivity.forward(f, _swap_diffusion, x0, theta, ts, dW, "milstein")
    with pytest.raises(ValueError, match="diagonal noise"):     # checked before vmap over the paths
        from sdekit.sensitivity import backprop
        backprop.path_gradients(f, _swap_diffusion, x0, theta, ts, dW, lambda x: x.sum(-1), "milstein")
    with pytest.raises(ValueError, match="diagonal noise"):     # a dg argument does not make g diagonal
        simulate(f, _swap_diffusion, x0, theta, ts, dW, "milstein", dg=lambda t, x, th: 0 * x)
    # Euler and Heun are valid schemes for this g; their one-step maps are checked elsewhere
    for scheme in ("euler", "heun"):
        assert torch.isfinite(simulate(f, _swap_diffusion, x0, theta, ts, dW, scheme)).all()
    # diagonal fields pass, including ones whose g_i is constant or zero in x
    for g in (lambda t, x, th: 0.3 * x, lambda t, x, th: torch.tanh(x) + 1, lambda t, x, th: 0 * x + 0.2):
        simulate(f, g, x0, theta, ts, dW, "milstein")
    for g in (lambda t, x, th: 0.3 * x, lambda t, x, th: torch.tanh(x) + 1):
        simulate(f, g, x0.float(), theta.float(), ts.float(), dW.float(), "milstein")

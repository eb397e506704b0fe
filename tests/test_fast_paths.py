"""Every fast path equals its reference implementation to round-off on the same increments.

sdekit.simulate (traced, eager, autograd and torch.compile) against the textbook scheme maps;
sensitivity.forward (traced and eager, with and without Milstein's dg) against autograd through the same
discrete scheme (float64, 1e-10).
"""
import math
import sys
from pathlib import Path

import pytest
import torch

from sdekit import sensitivity
from sdekit.solvers import SCHEMES, chunk_steps, normal_chunks, simulate

B, N, D = 6, 40, 3


def _fields():
    f = lambda t, x, th: th[0] * x * torch.cos(t) + th[2] * torch.tanh(x)
    g = lambda t, x, th: th[1] * torch.sin(x) + 0.3
    dg = lambda t, x, th: th[1] * torch.cos(x)
    return f, g, dg


def _inputs(seed=0, dtype=torch.float64, n=N):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, D, generator=gen, dtype=dtype)
    theta = torch.tensor([0.4, 0.5, -0.3], dtype=dtype)
    ts = torch.linspace(0.0, 1.0, n + 1, dtype=dtype) ** 1.5          # non-uniform grid
    dW = torch.randn(n, B, D, generator=gen, dtype=dtype) * (ts[1:] - ts[:-1]).sqrt()[:, None, None]
    return x0, theta, ts, dW


def _reference_path(f, g, x0, theta, ts, dW, scheme):
    """The textbook maps, out of place, differentiable in (x0, theta)."""
    x, xs = x0, [x0]
    for n in range(ts.shape[0] - 1):
        t, h, dw = ts[n], ts[n + 1] - ts[n], dW[n]
        fx, gx = f(t, x, theta), g(t, x, theta)
        if scheme == "euler":
            x = x + fx * h + gx * dw
        elif scheme == "milstein":
            _, gdg = torch.func.jvp(lambda y: g(t, y, theta), (x,), (gx,))
            x = x + fx * h + gx * dw + 0.5 * gdg * (dw * dw - h.abs())
        else:
            xp = x + fx * h + gx * dw
            x = x + 0.5 * (fx + f(ts[n + 1], xp, theta)) * h + 0.5 * (gx + g(ts[n + 1], xp, theta)) * dw
        xs.append(x)
    return torch.stack(xs)


@pytest.mark.parametrize("scheme", ["euler", "milstein", "heun"])
@pytest.mark.parametrize("save", ["end", "path"])
def test_simulate_equals_reference(scheme, save):
    f, g, dg = _fields()
    x0, theta, ts, dW = _inputs()
    ref = _reference_path(f, g, x0, theta, ts, dW, scheme)
    ref = ref if save == "path" else ref[-1]
    for kw in ({}, {"dg": dg}) if scheme == "milstein" else ({},):
        for trace in (True, False):
            out = simulate(f, g, x0, theta, ts, dW, scheme, save=save, trace=trace, **kw)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scheme", ["euler", "milstein", "heun"])
def test_simulate_differentiable_path_is_the_scheme_map(scheme):
    """With theta requiring grad the solver runs the step map eagerly: autograd gives the reference's gradient."""
    f, g, _ = _fields()
    x0, theta, ts, dW = _inputs(n=10)
    th = theta.clone().requires_grad_(True)
    out = simulate(f, g, x0, th, ts, dW, scheme)
    assert out.requires_grad
    grad = torch.autograd.grad(out.sum(), th)[0]
    ref = torch.autograd.grad(_reference_path(f, g, x0, th, ts, dW, scheme)[-1].sum(), th)[0]
    torch.testing.assert_close(out.detach(), _reference_path(f, g, x0, theta, ts, dW, scheme)[-1], rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, ref, rtol=0, atol=1e-10)


def test_simulate_fields_returning_x_itself():
    """In-place updates must not clobber a field value that aliases x (f = g = identity)."""
    ident = lambda t, x, th: x
    x0, theta, ts, dW = _inputs()
    ref = _reference_path(ident, ident, x0, theta, ts, dW, "euler")[-1]
    for trace in (True, False):
        torch.testing.assert_close(simulate(ident, ident, x0, theta, ts, dW, trace=trace), ref, rtol=0, atol=1e-12)


def test_simulate_drawn_increments_are_the_documented_chunks(monkeypatch):
    """dW=None means dW[n] = sqrt(|h_n|) z[n] with z the concatenated normal_chunks of the generator."""
    import sdekit.solvers.brownian as brownian
    monkeypatch.setattr(brownian, "_CHUNK_ELEMENTS", 7 * B * D)   # 7 steps a chunk: several chunks and a ragged last one
    f, g, _ = _fields()
    x0, theta, ts, _ = _inputs(n=300)
    z = torch.cat(list(normal_chunks(300, (B, D), torch.Generator().manual_seed(3), torch.float64, "cpu")))
    assert chunk_steps((B, D)) < 300          # several chunks are exercised
    dW = z * (ts[1:] - ts[:-1]).abs().sqrt()[:, None, None]
    for trace in (True, False):
        a = simulate(f, g, x0, theta, ts, scheme="euler", generator=torch.Generator().manual_seed(3), trace=trace)
        torch.testing.assert_close(a, _reference_path(f, g, x0, theta, ts, dW, "euler")[-1], rtol=0, atol=1e-12)


def test_simulate_reverse_time_grid():
    f, g, _ = _fields()
    x0, theta, ts, dW = _inputs()
    ts = ts.flip(0)
    ref = _reference_path(f, g, x0, theta, ts, dW, "milstein")[-1]
    for trace in (True, False):
        torch.testing.assert_close(simulate(f, g, x0, theta, ts, dW, "milstein", trace=trace), ref, rtol=0, atol=1e-12)


def _compile_works() -> bool:
    """Whether inductor builds kernels here: a small compiled solve of this file's own kind (float64, 6 x 3, with
    tails). A plain `x + 1` is not enough: under ATEN_CPU_CAPABILITY=default torch 2.13's inductor writes vectorised
    float64 code that its own headers do not declare (`at::vec` undeclared), while small float32 kernels build."""
    try:
        f, g, _ = _fields()
        x0, theta, ts, dW = _inputs(n=2)
        out = simulate(f, g, x0, theta, ts, dW, compile=True)
        return bool(torch.allclose(out, simulate(f, g, x0, theta, ts, dW)))
    except Exception:  # noqa: BLE001 - no working C++ toolchain (or headers) for inductor on this machine
        return False


needs_compile = pytest.mark.skipif(not _compile_works(), reason="torch.compile cannot build kernels here")


@needs_compile
@pytest.mark.parametrize("scheme", ["euler", "milstein", "heun"])
def test_simulate_compiled_equals_eager(scheme):
    f, g, dg = _fields()
    x0, theta, ts, dW = _inputs(n=8)
    out = simulate(f, g, x0, theta, ts, dW, scheme, save="path", dg=dg if scheme == "milstein" else None, compile=True)
    ref = _reference_path(f, g, x0, theta, ts, dW, scheme)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


_slow = pytest.mark.slow       # each variant compiles afresh (seconds); the default run keeps one of each kind


@needs_compile
@pytest.mark.parametrize("scheme, batch, save", [
    ("euler", (20000, 2), "end"), ("reversible_heun", (7, 3), "path"), ("srk", (20000, 2), "end"),
    pytest.param("euler", (7, 3), "end", marks=_slow), pytest.param("euler", (20000, 2), "path", marks=_slow),
    pytest.param("reversible_heun", (7, 3), "end", marks=_slow), pytest.param("reversible_heun", (20000, 2), "end", marks=_slow),
    pytest.param("srk", (7, 3), "end", marks=_slow), pytest.param("heun", (20000, 2), "end", marks=_slow)])
def test_simulate_compiled_blocks_equal_eager(scheme, batch, save):
    """compile=True runs several steps per compiled call (`simulation.BLOCK`): on a grid and on its reverse, with the
    blocks made of views of one long chunk of normals plus single steps at the end (7 x 3), and of several short
    chunks drawn in place (20000 x 2: 6 steps per chunk; srk's dW and Levy areas copied into the block), it gives the
    eager solve's answer, end or path."""
    from sdekit.solvers.compiled import BLOCK
    f, g, _ = _fields()
    theta = torch.tensor([0.4, 0.5, -0.3], dtype=torch.float64)
    x0 = torch.randn(*batch, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    c = chunk_steps(batch)
    n = 3 * BLOCK + 5 if c > BLOCK else 4 * c + 1
    assert (c > BLOCK) == (batch == (7, 3))
    for ts in (torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64) ** 1.5, torch.linspace(1.0, 0.2, n + 1, dtype=torch.float64)):
        run = lambda **kw: simulate(f, g, x0, theta, ts, scheme=scheme, generator=torch.Generator().manual_seed(2), save=save, **kw)
        torch.testing.assert_close(run(compile=True), run(trace=False), rtol=0, atol=1e-12)


@needs_compile
def test_simulate_compiled_blocks_on_given_increments_and_paths():
    """Given dW (blocks are its views) and a Brownian path (blocks are copied out of the path's chunks)."""
    from sdekit.solvers import BrownianGrid
    f, g, _ = _fields()
    x0, theta, ts, dW = _inputs(n=21)
    torch.testing.assert_close(simulate(f, g, x0, theta, ts, dW, compile=True), _reference_path(f, g, x0, theta, ts, dW, "euler")[-1],
                               rtol=0, atol=1e-12)
    bm = BrownianGrid.draw(ts, (B, D), torch.Generator().manual_seed(4))
    torch.testing.assert_close(simulate(f, g, x0, theta, ts, bm=bm, compile=True), simulate(f, g, x0, theta, ts, bm=bm, trace=False),
                               rtol=0, atol=1e-12)


SCALE = 0.5


@needs_compile
def test_simulate_compiled_blocks_follow_what_the_fields_read():
    """A global and a closed-over tensor changed between compiled solves: each solve answers for the new values."""
    global SCALE
    shift = torch.tensor(0.1, dtype=torch.float64)
    f = lambda t, x, th: -th[0] * x * SCALE + shift
    g = lambda t, x, th: th[1] * torch.ones_like(x)
    x0, theta, ts, dW = _inputs(n=3 * 8)
    try:
        for scale, sh in ((0.5, 0.1), (2.0, 0.1), (2.0, -1.0)):
            SCALE = scale
            shift.fill_(sh)
            torch.testing.assert_close(simulate(f, g, x0, theta, ts, dW, compile=True), simulate(f, g, x0, theta, ts, dW, trace=False),
                                       rtol=0, atol=1e-12)
    finally:
        SCALE = 0.5


@needs_compile
@pytest.mark.parametrize("n", [20, 5])
def test_simulate_compiled_refuses_steps_that_disagree_with_the_eager_ones(n):
    """A compiled step left stale (here: the block compiled for another drift, put in the cache in place of this
    drift's) is caught by the per-solve comparison with the eager steps and refused by name, whether the solve runs
    whole blocks (20 steps) or only single steps (5 < BLOCK)."""
    from sdekit.solvers import compiled as simulation
    g = lambda t, x, th: th[1] * torch.ones_like(x)
    f_old = lambda t, x, th: -th[0] * x
    f_new = lambda t, x, th: -3.0 * th[0] * x
    x0, theta = torch.ones(4, 2, dtype=torch.float64), torch.tensor([1.0, 0.3], dtype=torch.float64)
    ts = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)
    simulate(f_old, g, x0, theta, ts, generator=torch.Generator().manual_seed(0), compile=True)
    stale = {k: v for k, v in simulation._COMPILED.items() if k[1] is f_old}
    assert stale
    try:
        for k, v in stale.items():
            simulation._COMPILED[(k[0], f_new, *k[2:])] = v
        with pytest.raises(RuntimeError, match="compiled 'euler' steps disagree with the eager ones"):
            simulate(f_new, g, x0, theta, ts, generator=torch.Generator().manual_seed(0), compile=True)
    finally:
        for k in stale:
            simulation._COMPILED.pop((k[0], f_new, *k[2:]), None)


@needs_compile
def test_simulate_compiled_blocks_report_a_path_that_becomes_non_finite():
    f = lambda t, x, th: th[0] * x * x
    g = lambda t, x, th: th[1] * torch.ones_like(x)
    x0 = torch.full((4, 2), 2.0, dtype=torch.float64)
    theta = torch.tensor([50.0, 0.0], dtype=torch.float64)
    ts = torch.linspace(0.0, 1.0, 41, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="non-finite at step"):
        simulate(f, g, x0, theta, ts, generator=torch.Generator().manual_seed(0), compile=True)


def _autograd_jacobian(f, g, x0, theta, ts, dW, scheme):
    """(N+1, B, d, P) by reverse-mode autograd through the reference path."""
    return torch.autograd.functional.jacobian(lambda th: _reference_path(f, g, x0, th, ts, dW, scheme), theta)


@pytest.mark.parametrize("scheme", ["euler", "milstein", "heun"])
@pytest.mark.parametrize("save", ["end", "path"])
def test_forward_equals_autograd(scheme, save):
    f, g, dg = _fields()
    x0, theta, ts, dW = _inputs(n=25)
    J_ref = _autograd_jacobian(f, g, x0, theta, ts, dW, scheme)
    x_ref = _reference_path(f, g, x0, theta, ts, dW, scheme)
    for fn in (lambda: sensitivity.forward(f, g, x0, theta, ts, dW, scheme, save, dg=dg, trace=True),
               lambda: sensitivity.forward(f, g, x0, theta, ts, dW, scheme, save, trace=True),   # milstein: nested jvp
               lambda: sensitivity.forward(f, g, x0, theta, ts, dW, scheme, save, trace=False)):
        xs, J = fn()
        if save == "end":
            torch.testing.assert_close(xs, x_ref[-1], rtol=0, atol=1e-10)
            torch.testing.assert_close(J, J_ref[-1], rtol=0, atol=1e-10)
        else:
            assert J.shape == (ts.shape[0], B, D, 3)
            torch.testing.assert_close(xs, x_ref, rtol=0, atol=1e-10)
            torch.testing.assert_close(J, J_ref, rtol=0, atol=1e-10)


def test_forward_initial_sensitivity_and_constant_fields():
    """J0 is carried; a field independent of (x, theta) has no tangent and counts as zero."""
    f = lambda t, x, th: th[0] * x
    g = lambda t, x, th: torch.full_like(x, 0.2)
    x0, _, ts, dW = _inputs()
    theta = torch.tensor([0.7], dtype=torch.float64)
    J0 = torch.randn(B, D, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    _, J = sensitivity.forward(f, g, x0, theta, ts, dW, save="end", J0=J0)
    # linear in x: J_N = prod(1 + th h) J0 + d/dth of the path, checked against autograd with x0 moved along J0
    def end(th, eps):
        return _reference_path(f, g, x0 + eps * J0[..., 0], th, ts, dW, "euler")[-1]
    jt = torch.autograd.functional.jacobian(lambda th: end(th, torch.zeros((), dtype=torch.float64)), theta)[..., 0]
    je = torch.autograd.functional.jacobian(lambda e: end(theta, e), torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(J[..., 0], jt + je, rtol=0, atol=1e-10)


def test_forward_gbm_closed_form():
    """GBM under Euler: X_N = x0 prod(1 + mu h + sigma dW), so dX_N/dmu = X_N sum h / (1 + mu h + sigma dW)."""
    mu, sigma = 0.3, 0.5
    theta = torch.tensor([mu, sigma], dtype=torch.float64)
    x0 = torch.ones(B, 1, dtype=torch.float64)
    ts = torch.linspace(0, 1, N + 1, dtype=torch.float64)
    dW = torch.randn(N, B, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * math.sqrt(1 / N)
    x, J = sensitivity.forward(lambda t, x, th: th[0] * x, lambda t, x, th: th[1] * x, x0, theta, ts, dW, save="end")
    factors = 1 + mu / N + sigma * dW
    torch.testing.assert_close(x, factors.prod(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(J[..., 0], x * (1 / N / factors).sum(0), rtol=1e-10, atol=0)
    torch.testing.assert_close(J[..., 1], x * (dW / factors).sum(0), rtol=1e-10, atol=0)


def test_benchmark_baselines_agree_with_fast_paths():
    """The benchmark's own baselines compute the same numbers as the fast paths they are compared with."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))     # benchmarks/ is not installed
    from benchmarks.sensitivity import backprop, straightforward_forward
    f, g, _ = _fields()
    x0, theta, ts, dW = _inputs(n=15)
    xs, J = sensitivity.forward(f, g, x0, theta, ts, dW)
    xs2, J2 = straightforward_forward(f, g, x0, theta, ts, dW)
    torch.testing.assert_close(J, J2, rtol=0, atol=1e-10)
    torch.testing.assert_close(backprop(f, g, x0, theta, ts, dW), J[-1].mean((0, 1)), rtol=0, atol=1e-10)


@pytest.mark.parametrize("milstein", [False, True])
def test_benchmark_plain_loops_are_the_textbook_schemes(milstein):
    """The simulation benchmark's plain Euler and Milstein loops (the ratios' baselines) are the textbook maps."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import problems
    p = problems.neural(P=2, d=3, hidden=8, dtype=torch.float64)
    n, T = 25, 1.0
    x0 = p.x0(B)
    got = problems.plain_loop(p, x0, T, n, torch.Generator().manual_seed(3), milstein=milstein)
    gen = torch.Generator().manual_seed(3)                          # the loop's draws, one step at a time
    dW = torch.stack([torch.randn(x0.shape, generator=gen, dtype=x0.dtype) for _ in range(n)]) * math.sqrt(T / n)
    ts = torch.linspace(0.0, T, n + 1, dtype=x0.dtype)
    want = _reference_path(p.f, p.g, x0, p.theta, ts, dW, "milstein" if milstein else "euler")[-1]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _traced_graph(step, *example):
    from sdekit.solvers import _tracing
    return _tracing._simplify(torch.fx.experimental.proxy_tensor.make_fx(step)(*example))


def test_tracing_computes_shared_subexpressions_once():
    """g and dg share sigmoid(c x + e): the traced Milstein step evaluates it once and still equals the eager step."""
    from sdekit.solvers import step_map
    c, e = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    f = lambda t, x, th: th[0] * torch.sigmoid(c * x + e)
    g = lambda t, x, th: th[1] * torch.sigmoid(c * x + e)
    dg = lambda t, x, th: th[1] * c * torch.sigmoid(c * x + e) * (1 - torch.sigmoid(c * x + e))
    x0, theta, ts, dW = _inputs()
    step = step_map("milstein", f, g, dg)
    gm = _traced_graph(step, ts[0], ts[1] - ts[0], x0, dW[0], theta)
    assert sum(n.target == torch.ops.aten.sigmoid.default for n in gm.graph.nodes) == 1
    want = _reference_path(f, g, x0, theta, ts, dW, "milstein")[-1]
    torch.testing.assert_close(simulate(f, g, x0, theta, ts, dW, scheme="milstein", dg=dg, trace=True), want, rtol=1e-12,
                               atol=1e-12)


def test_tracing_leaves_in_place_fields_correct():
    """A field that writes into its intermediates in place: equal-looking nodes are not merged, the path is exact."""
    def f(t, x, th):
        y = x * 2.0
        y.add_(th[0])                     # y now differs from the x * 2.0 that g computes
        return y
    g = lambda t, x, th: 0.1 * (x * 2.0)
    x0, theta, ts, dW = _inputs()
    gm = _traced_graph(lambda t, h, x, dw, th: x + f(t, x, th) * h + g(t, x, th) * dw, ts[0], ts[1] - ts[0], x0, dW[0], theta)
    assert sum(n.target == torch.ops.aten.mul.Tensor and n.args[1] == 2.0 for n in gm.graph.nodes) == 2
    want = _reference_path(f, g, x0, theta, ts, dW, "euler")[-1]
    torch.testing.assert_close(simulate(f, g, x0, theta, ts, dW, trace=True), want, rtol=1e-12, atol=1e-12)


def test_traced_solver_launches_fewer_ops_per_step_than_the_plain_loop(tmp_path):
    """What trace=True is for, counted (not timed): GBM's step runs in fewer aten calls than a plain loop's."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import profile
    profile.main(["--problem", "gbm", "--batch", "100", "--steps", "50", "--out", str(tmp_path)])
    import json
    r = json.loads((tmp_path / "profile.json").read_text())["methods"]
    assert r["sdekit.simulate(trace=True)"]["ops_per_step"] < 0.7 * r["plain torch loop"]["ops_per_step"], r


def test_memory_of_end_solves_does_not_grow_with_steps():
    """save="end" holds O(1) state in N: at N=10000 the per-step views alone would take ~7 MiB if made all at once
    (and a tape or a kept path far more). The bound leaves room for the ~1 MiB chunk of normals (51 kB at N=200) and
    for the allocator's own moods. The forward sensitivity runs traced here (its eager loop is the same loop, at
    milliseconds per step)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.timing import peak_memory_mib
    f, g, _ = _fields()
    theta = torch.tensor([0.4, 0.5, -0.3])
    x0 = torch.ones(64, 1)
    peaks = {}
    for n in (200, 10_000):
        ts = torch.linspace(0.0, 1.0, n + 1)
        dW = torch.randn(n, 64, 1) / math.sqrt(n)
        solves = {"given": lambda: simulate(f, g, x0, theta, ts, dW),
                  "drawn": lambda: simulate(f, g, x0, theta, ts, generator=torch.Generator().manual_seed(0)),
                  "traced": lambda: simulate(f, g, x0, theta, ts, dW, trace=True),
                  "forward": lambda: sensitivity.forward(f, g, x0, theta, ts, dW, save="end", trace=True)}
        for name, fn in solves.items():
            fn()                                                     # trace outside the measurement
            peaks[name, n] = min(peak_memory_mib(fn) for _ in range(2))
    growth = {k: peaks[k, 10_000] - peaks[k, 200] for k in ("given", "drawn", "traced", "forward")}
    assert max(growth.values()) < 5.0, (growth, peaks)


def _noise_fields(noise, d=4, m=3):
    """Fields for noise types other than diagonal (float64), with a g that reads x where the type allows it."""
    C = torch.randn(d, m, generator=torch.Generator().manual_seed(5), dtype=torch.float64) / math.sqrt(m)
    f = lambda t, x, th: th[0] * torch.tanh(x) * torch.cos(t)
    if noise == "scalar":
        g = lambda t, x, th: (th[1] * torch.sin(x) + 0.3).unsqueeze(-1)
    elif noise == "additive":
        g = lambda t, x, th: (th[1] * C * torch.cos(t)).expand(x.shape[0], d, m)
    else:
        g = lambda t, x, th: (th[1] * torch.sin(x) + 0.3).unsqueeze(-1) * C
    return f, g, (1 if noise == "scalar" else m)


@pytest.mark.parametrize("noise,scheme", [(n, s) for n in ("scalar", "additive", "general")
                                          for s in ("euler", "milstein", "srk", "heun", "reversible_heun")
                                          if n in SCHEMES[s].orders])
@pytest.mark.parametrize("save", ["end", "path"])
def test_batch_innermost_loop_equals_the_eager_solve(noise, scheme, save):
    """With noise other than diagonal the traced loop keeps states and increments batch-innermost; it returns what
    the eager loop returns (to round-off; stored batch-first, contiguous), for increments given and drawn."""
    f, g, m = _noise_fields(noise)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(300, 4, generator=gen, dtype=torch.float64)
    theta = torch.tensor([0.7, 0.4], dtype=torch.float64)
    ts = torch.linspace(0.0, 1.0, 31, dtype=torch.float64)
    dW = torch.randn(30, 300, m, generator=gen, dtype=torch.float64) * 0.2
    extra = dict(levy_area=0.1 * torch.randn(30, 300, m, generator=gen, dtype=torch.float64)) if scheme == "srk" else {}
    kw = dict(scheme=scheme, noise=noise, save=save)
    traced = simulate(f, g, x0, theta, ts, dW, trace=True, **kw, **extra)
    eager = simulate(f, g, x0, theta, ts, dW, trace=False, **kw, **extra)
    assert traced.is_contiguous()
    torch.testing.assert_close(traced, eager, rtol=1e-12, atol=1e-12)
    drawn = simulate(f, g, x0, theta, ts, generator=torch.Generator().manual_seed(2), trace=True, **kw)
    drawn_eager = simulate(f, g, x0, theta, ts, generator=torch.Generator().manual_seed(2), trace=False, **kw)
    torch.testing.assert_close(drawn, drawn_eager, rtol=1e-12, atol=1e-12)


def test_batch_innermost_loop_steps_aside_for_fields_that_need_batch_first_storage(recwarn):
    """A g that reshapes x with .view cannot take a batch-innermost x: the loop keeps the usual layout, no warning."""
    from sdekit.solvers import traced as simulation
    from sdekit.solvers._tracing import field_state
    C = torch.randn(4, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    f = lambda t, x, th: -th[0] * x
    g = lambda t, x, th: th[1] * x.view(-1).view(x.shape[0], 4, 1) * C        # flattening needs batch-first storage
    x0 = torch.randn(50, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    theta = torch.tensor([0.7, 0.4], dtype=torch.float64)
    ts = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    dW = 0.3 * torch.randn(10, 50, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    traced = simulate(f, g, x0, theta, ts, dW, noise="general", trace=True)
    torch.testing.assert_close(traced, simulate(f, g, x0, theta, ts, dW, noise="general", trace=False), rtol=1e-12, atol=0)
    assert not [w for w in recwarn if "could not be traced" in str(w.message)]
    assert [ok for key, ok in simulation._INNER.items() if key[2] == field_state(f, g, None)[0]] == [False]


def test_batch_inner_layout_keeps_values_and_shape():
    from sdekit.solvers.traced import batch_inner as _batch_inner
    v = torch.randn(5, 7, 3)
    w = _batch_inner(v, 1)
    assert torch.equal(w, v) and w.stride(1) == 1
    col = torch.randn(9, 1)
    assert _batch_inner(col) is col                   # one value per path: already batch-innermost


@pytest.mark.parametrize("m", [1, 3, 8, 12])
def test_g_prod_sums_columns_like_a_matmul(m):
    """g . v for (B, d, m) g: column sums for m <= 8 and a batched matmul beyond, with and without acc."""
    from sdekit.solvers import g_prod
    gen = torch.Generator().manual_seed(m)
    G, v, acc = (torch.randn(s, generator=gen, dtype=torch.float64) for s in ((6, 4, m), (6, m), (6, 4)))
    want = (G @ v.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(g_prod(G, v, "general"), want, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(g_prod(G, v, "general", acc=acc), acc + want, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(g_prod(G[..., :1], v[..., :1], "scalar", acc=acc), acc + G[..., 0] * v[..., :1], rtol=0, atol=0)


def test_fusion_skips_products_broadcast_along_a_short_inner_axis():
    """add(acc, mul(a, b)) becomes addcmul unless b is broadcast along a short innermost axis of a large tensor
    (there the fused three-operand loop is slower than the two it replaces); either way the step is exact."""
    def step(acc, a, b):
        return acc + a * b
    big, small = torch.randn(10_000, 4, dtype=torch.float64), torch.randn(100, 4, dtype=torch.float64)
    for acc, b, fused in ((big, torch.randn(10_000, 1, dtype=torch.float64), False),
                          (big, torch.randn(10_000, 4, dtype=torch.float64), True),
                          (big.t().contiguous().t(), torch.randn(1, 10_000, dtype=torch.float64).t(), True),  # batch-innermost
                          (small, torch.randn(100, 1, dtype=torch.float64), True)):
        gm = _traced_graph(step, acc, acc * 2, b)
        has = any(n.target == torch.ops.aten.addcmul.default for n in gm.graph.nodes)
        assert has == fused, (acc.shape, acc.stride(), b.shape, gm.code)
        torch.testing.assert_close(gm(acc, acc * 2, b), acc + 2 * acc * b, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("noise,scheme", [("diagonal", "euler"), ("diagonal", "reversible_heun"), ("diagonal", "srk"),
                                          ("general", "heun"), ("additive", "reversible_heun")])
def test_double_buffered_steps_give_the_fresh_results_bitwise(noise, scheme, monkeypatch):
    """The traced loop writes each step's results into two alternating buffer sets: the solve is bitwise the one
    with fresh tensors every step, the path keeps every state, and the returned x is no longer written."""
    from sdekit.solvers import traced as simulation
    from sdekit.solvers._tracing import double_buffered
    if noise == "diagonal":
        f, g, _ = _fields()
        x0, theta, ts, _ = _inputs(n=12)
        m = D
    else:
        f, g, m = _noise_fields(noise)
        x0 = torch.randn(B, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        theta, ts = torch.tensor([0.7, 0.4], dtype=torch.float64), torch.linspace(0.0, 1.0, 13, dtype=torch.float64)
    buffered = []
    monkeypatch.setattr(simulation, "double_buffered", lambda step: buffered.append(getattr(step, "into", None)) or double_buffered(step))
    got = {save: simulate(f, g, x0, theta, ts, scheme=scheme, noise=noise, save=save, trace=True,
                          generator=torch.Generator().manual_seed(4)) for save in ("end", "path")}
    assert len(buffered) == 2 and all(into is not None for into in buffered)       # the traced steps have buffers
    monkeypatch.setattr(simulation, "double_buffered", lambda step: step)
    for save in ("end", "path"):
        want = simulate(f, g, x0, theta, ts, scheme=scheme, noise=noise, save=save, trace=True,
                        generator=torch.Generator().manual_seed(4))
        assert torch.equal(got[save], want), save
    assert torch.equal(got["path"][-1], got["end"])

    calls = []                                           # the wrapper itself: results of step n survive step n + 1
    step = lambda a: calls.append(a) or a * 2            # noqa: E731
    step.into = lambda a, o: torch.mul(a, 2, out=o[0])
    step.into.slots = (0,)
    run, x, seen = double_buffered(step), torch.ones(3), []
    for _ in range(5):
        x = run(x)
        seen.append(x)
    assert [float(v[0]) for v in seen[-2:]] == [16.0, 32.0] and seen[-1].data_ptr() != seen[-2].data_ptr()
    assert seen[-1].data_ptr() == seen[-3].data_ptr()   # reused two steps later

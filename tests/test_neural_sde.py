"""Neural SDEs: whatever the fields read that requires grad gets its gradient, the default solve is never stale, and
simulate(adjoint=True) gives backprop's gradients for network weights (torchsde's adjoint_params convention).

Ground truth throughout: a plain autograd loop over the scheme's documented one-step map on the same increments.
"""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from sdekit import sensitivity, simulate
from sdekit.solvers import SCHEMES, init_state, step_map

DT = torch.float64
B, D, M, N = 4, 2, 3, 6
CASES = [(s, n) for s in SCHEMES for n in SCHEMES[s].orders]


class Drift(nn.Module):
    def __init__(self, d=D, width=8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d + 1, width), nn.Tanh(), nn.Linear(width, d))
        self.register_buffer("scale", torch.tensor(0.9))

    def forward(self, t, x, th):
        tt = t.expand(x.shape[0], 1).to(x.dtype)
        return self.scale * self.net(torch.cat([x, tt], -1)) * th[0]


class Diffusion(nn.Module):
    """g for every noise type: diagonal (B, d) elementwise in x; scalar (B, d, 1); additive (B, d, m), no x;
    general (B, d, m) from a linear map of x."""

    def __init__(self, noise, d=D, m=M):
        super().__init__()
        self.noise, self.d, self.m = noise, d, m
        self.w = nn.Parameter(torch.linspace(0.2, 0.6, d))
        self.b = nn.Parameter(torch.linspace(-0.3, 0.1, d))
        self.A = nn.Parameter(torch.linspace(-0.5, 0.5, d * m).reshape(d, m))
        self.lin = nn.Linear(d, d * m)

    def forward(self, t, x, th):
        if self.noise == "diagonal":
            return th[1] * torch.sigmoid(self.w * x + self.b)
        if self.noise == "scalar":
            return (th[1] * torch.sigmoid(self.w * x + self.b)).unsqueeze(-1)
        if self.noise == "additive":
            return (th[1] * self.A * (1 + 0.1 * t)).expand(x.shape[0], self.d, self.m)
        return th[1] * 0.3 * torch.tanh(self.lin(x)).view(x.shape[0], self.d, self.m)


def _problem(scheme, noise, n=N, seed=0):
    torch.manual_seed(seed)
    f, g = Drift().to(DT), Diffusion(noise).to(DT)
    m = D if noise == "diagonal" else 1 if noise == "scalar" else M
    gen = torch.Generator().manual_seed(seed + 1)
    x0 = torch.randn(B, D, generator=gen, dtype=DT)
    theta = torch.tensor([1.0, 0.7], dtype=DT)
    ts = torch.linspace(0.0, 1.0, n + 1, dtype=DT) ** 1.3
    h = (ts[1:] - ts[:-1])[:, None, None]
    dW = torch.randn(n, B, m, generator=gen, dtype=DT) * h.sqrt()
    H = torch.randn(n, B, m, generator=gen, dtype=DT) * (h / 12).sqrt() if SCHEMES[scheme].needs_levy_area else None
    return f, g, x0, theta, ts, dW, H


def _plain_loop(f, g, x0, theta, ts, dW, H, scheme, noise):
    """The scheme's map run step by step, out of place: what a user's own autograd loop does."""
    step = step_map(scheme, f, g, noise=noise)
    y = init_state(scheme, f, g, ts[0], x0, theta, noise=noise)
    for n in range(ts.shape[0] - 1):
        w = (dW[n],) if H is None else (dW[n], H[n])
        y = step(ts[n], ts[n + 1] - ts[n], *(y if isinstance(y, tuple) else (y,)), *w, theta)
    return y[0] if isinstance(y, tuple) else y


def _grads(out, tensors):
    grads = torch.autograd.grad((out ** 2).sum(), tensors, allow_unused=True)
    return [torch.zeros_like(t) if gr is None else gr for t, gr in zip(tensors, grads)]


@pytest.mark.parametrize("scheme,noise", CASES)
def test_module_weights_get_the_plain_loops_gradient(scheme, noise):
    """Every parameter and x0, theta of an nn.Module drift and diffusion, called through closures: the default
    solve's gradient is the plain autograd loop's (float64, round-off), on a forward grid and on its reverse."""
    f, g, x0, theta, ts, dW, H = _problem(scheme, noise)
    model = nn.ModuleDict({"f": f, "g": g})                              # the networks reached through a closure
    f_closure = lambda t, x, th: model["f"](t, x, th)                     # noqa: E731
    g_closure = lambda t, x, th: model["g"](t, x, th)                     # noqa: E731
    for with_inputs in (False, True):                                    # the weights alone, then x0 and theta too
        x = x0.clone().requires_grad_(with_inputs)
        th = theta.clone().requires_grad_(with_inputs)
        params = [*f.parameters(), *g.parameters()] + ([x, th] if with_inputs else [])
        for grid in (ts, ts.flip(0)):
            out = simulate(f_closure, g_closure, x, th, grid, dW, scheme, noise=noise, levy_area=H)
            assert out.requires_grad
            got = _grads(out, params)
            want = _grads(_plain_loop(f, g, x, th, grid, dW, H, scheme, noise), params)
            assert any(float(w.abs().max()) > 0 for w in want)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_closure_over_a_network_gets_its_gradient_with_another_loss_term():
    """The reported case: f = lambda over nn.Sequential, loss = solve + another term: the network's .grad holds both."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).to(DT)
    f = lambda t, x, th: net(x)                                          # noqa: E731
    g = lambda t, x, th: 0.2 * torch.ones_like(x)                        # noqa: E731
    x0, theta = torch.ones(3, 2, dtype=DT), torch.zeros(1, dtype=DT)
    ts = torch.linspace(0, 1, 5, dtype=DT)
    dW = torch.full((4, 3, 2), 0.1, dtype=DT)
    for trace in (False,):
        net.zero_grad()
        (simulate(f, g, x0, theta, ts, dW, trace=trace).sum() + sum(p.sum() for p in net.parameters())).backward()
        got = [p.grad.clone() for p in net.parameters()]
        net.zero_grad()
        (_plain_loop(f, g, x0, theta, ts, dW, None, "euler", "diagonal").sum()
         + sum(p.sum() for p in net.parameters())).backward()
        for a, p in zip(got, net.parameters()):
            torch.testing.assert_close(a, p.grad, rtol=1e-12, atol=1e-12)


class _Cfg:
    K = 1.0


class _ClassAttr:
    k = 1.0

    def __call__(self, t, x, th):
        return -self.k * x + th[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_changes_between_solves_are_never_stale(dtype):
    """A class attribute, a module-level attribute and a time-gated drift changed by 8% between two solves: the default
    solve gives the plain loop's answer both times (float32 and float64)."""
    x0, theta = torch.ones(8, 1, dtype=dtype), torch.zeros(1, dtype=dtype)
    ts = torch.linspace(0, 1, 101, dtype=dtype)
    dW = torch.zeros(100, 8, 1, dtype=dtype)
    zero = lambda t, x, th: 0 * x                                         # noqa: E731
    obj = _ClassAttr()
    cfg_drift = lambda t, x, th: -_Cfg.K * x + th[0]                     # noqa: E731
    gated = lambda t, x, th: torch.where(t > 0.5, -_Cfg.K * x, 0 * x)   # noqa: E731
    eps = torch.finfo(dtype).eps
    for f in (obj, cfg_drift, gated):
        for k in (1.0, 1.08):
            _ClassAttr.k = _Cfg.K = k
            try:
                got = simulate(f, zero, x0, theta, ts, dW)
                want = _plain_loop(f, zero, x0, theta, ts, dW, None, "euler", "diagonal")
            finally:
                _ClassAttr.k = _Cfg.K = 1.0
            torch.testing.assert_close(got, want, rtol=16 * eps, atol=0)   # ~100 steps' rounding of O(1) values


def test_trace_true_refuses_fields_that_read_tensors_requiring_grad():
    """trace=True freezes what the fields read besides (t, x, theta): a network weight's gradient would be lost."""
    f, g, x0, theta, ts, dW, _ = _problem("euler", "diagonal")
    with pytest.raises(ValueError, match="trace=True.*require grad"):
        simulate(f, g, x0, theta, ts, dW, trace=True)
    with torch.no_grad():                                                # no gradient asked: traced is fine
        torch.testing.assert_close(simulate(f, g, x0, theta, ts, dW, trace=True), simulate(f, g, x0, theta, ts, dW),
                                   rtol=1e-12, atol=1e-12)


# --- simulate(adjoint=True) ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["reversible_heun", "euler", "milstein", "heun", "midpoint", "srk", "euler_heun"])
@pytest.mark.parametrize("save", ["end", "path"])
def test_adjoint_gives_backprops_gradient_for_network_weights(scheme, save):
    """adjoint=True fills x0, theta and every parameter of f and g with backprop's gradient (float64, round-off),
    forward and reverse grids; reversible_heun by its exact inverse, the others checkpointed."""
    f, g, x0, theta, ts, dW, H = _problem(scheme, "diagonal", n=12)
    x0 = x0.requires_grad_(True)
    th = theta.clone().requires_grad_(True)
    params = [*f.parameters(), *g.parameters(), x0, th]
    for grid in (ts, ts.flip(0)):
        outs = [simulate(f, g, x0, th, grid, dW, scheme, levy_area=H, save=save, adjoint=adj) for adj in (False, True)]
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
        want, got = (_grads(o, params) for o in outs)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("noise", ["scalar", "additive", "general"])
def test_adjoint_every_noise_type(noise):
    f, g, x0, theta, ts, dW, _ = _problem("reversible_heun", noise, n=10)
    params = [*f.parameters(), *g.parameters()]
    outs = [simulate(f, g, x0, theta, ts, dW, "reversible_heun", noise=noise, adjoint=adj) for adj in (False, True)]
    for a, b in zip(_grads(outs[1], params), _grads(outs[0], params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_adjoint_with_drawn_increments_and_a_brownian_path():
    """Drawn increments are redrawn chunk by chunk in the backward pass; a Brownian path is queried again."""
    import sdekit.solvers.brownian as brownian
    from sdekit.solvers import VirtualBrownianTree
    f, g, x0, theta, ts, _, _ = _problem("reversible_heun", "diagonal", n=40)
    params = list(f.parameters())
    old = brownian._CHUNK_ELEMENTS
    brownian._CHUNK_ELEMENTS = 7 * B * D                                  # several chunks and a ragged last one
    try:
        outs = [simulate(f, g, x0, theta, ts, scheme="reversible_heun", generator=torch.Generator().manual_seed(5),
                         adjoint=adj) for adj in (False, True)]
    finally:
        brownian._CHUNK_ELEMENTS = old
    for a, b in zip(_grads(outs[1], params), _grads(outs[0], params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    bm = VirtualBrownianTree(0.0, 1.0, (B, D), seed=3, dtype=DT)
    outs = [simulate(f, g, x0, theta, ts, scheme="euler", bm=bm, adjoint=adj) for adj in (False, True)]
    for a, b in zip(_grads(outs[1], params), _grads(outs[0], params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_adjoint_params_named_explicitly_and_unlisted_reads_refused():
    f, g, x0, theta, ts, dW, _ = _problem("reversible_heun", "diagonal")
    only_f = tuple(f.parameters())
    out = simulate(f, g, x0, theta, ts, dW, "reversible_heun", adjoint=True, adjoint_params=only_f)
    with pytest.raises(ValueError, match="not among the differentiated inputs"):
        out.sum().backward()
    for p in g.parameters():
        p.requires_grad_(False)
    out = simulate(f, g, x0, theta, ts, dW, "reversible_heun", adjoint=True, adjoint_params=only_f)
    got = _grads(out, list(only_f))
    want = _grads(simulate(f, g, x0, theta, ts, dW, "reversible_heun"), list(only_f))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from torch import nn
    sys.path.insert(0, sys.argv[1])
    from benchmarks.timing import peak_memory_mib
    import sdekit
    torch.manual_seed(0)
    B, d = 512, 16
    net = nn.Sequential(nn.Linear(d, 32), nn.Tanh(), nn.Linear(32, d)).double()
    f = lambda t, x, th: net(x) * th[0]
    g = lambda t, x, th: 0.1 * torch.ones_like(x) * th[1]
    x0, th = torch.randn(B, d, dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)
    out = {}
    for n in (100, 800):
        ts = torch.linspace(0, 1, n + 1, dtype=torch.float64)
        for adj in (True, False):
            def run():
                x = sdekit.simulate(f, g, x0, th, ts, scheme="reversible_heun", adjoint=adj,
                                    generator=torch.Generator().manual_seed(1))
                x.square().sum().backward()
            run()
            out[f"{'adjoint' if adj else 'backprop'} {n}"] = min(peak_memory_mib(run) for _ in range(2))
    print(json.dumps(out))
""")


def test_adjoint_memory_does_not_grow_with_steps():
    """Peak memory of solve + backward at N = 100 and 800 (a subprocess, resident set): the adjoint's stays flat
    while backprop's tape grows by ~N states x the network's intermediates (about 100 MiB here)."""
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(root)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    peaks = json.loads(res.stdout.strip().splitlines()[-1])
    adjoint_growth = peaks["adjoint 800"] - peaks["adjoint 100"]
    backprop_growth = peaks["backprop 800"] - peaks["backprop 100"]
    assert backprop_growth > 40, peaks                # the measurement sees a tape (the test can fail)
    assert adjoint_growth < 0.05 * backprop_growth, peaks   # flat: 8x the steps cost < 5% of the tape's growth
                                                            # (one chunk of increments and the allocator's moods)


# --- inputs that were refused or silently wrong --------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["milstein", "srk", "euler", "reversible_heun"])
def test_expanded_x0_is_accepted(scheme):
    f = lambda t, x, th: -th[0] * x                                       # noqa: E731
    g = lambda t, x, th: th[1] * torch.sin(x)                             # noqa: E731
    row = torch.tensor([[0.5, -0.2]], dtype=DT)
    theta = torch.tensor([0.5, 0.3], dtype=DT)
    ts = torch.linspace(0, 1, 9, dtype=DT)
    kw = dict(scheme=scheme, generator=None)
    gen = lambda: torch.Generator().manual_seed(0)                         # noqa: E731
    got = simulate(f, g, row.expand(5, 2), theta, ts, **{**kw, "generator": gen()})
    want = simulate(f, g, row.repeat(5, 1), theta, ts, **{**kw, "generator": gen()})
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["milstein", "euler", "heun"])
def test_per_path_forcing_tensor_is_accepted(scheme):
    """A drift and diffusion reading a per-path (B, d) forcing tensor beside x."""
    forcing = torch.linspace(-1, 1, 10, dtype=DT).reshape(5, 2)
    f = lambda t, x, th: -th[0] * x + forcing                             # noqa: E731
    g = lambda t, x, th: th[1] * torch.sin(x) * (1 + 0.1 * forcing)       # noqa: E731
    x0 = torch.zeros(5, 2, dtype=DT)
    theta = torch.tensor([0.5, 0.3], dtype=DT)
    ts = torch.linspace(0, 1, 9, dtype=DT)
    dW = 0.1 * torch.randn(8, 5, 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    torch.testing.assert_close(simulate(f, g, x0, theta, ts, dW, scheme),
                               _plain_loop(f, g, x0, theta, ts, dW, None, scheme, "diagonal"), rtol=1e-13, atol=1e-13)


def test_reversible_heun_says_when_a_stiff_drift_makes_it_unstable():
    """dx = -50 x dt on 20 steps of [0, 1] (lambda h = -2.5): the parasitic mode grows by |lambda h| + sqrt(1 +
    (lambda h)^2) ~ 5.2 a step, so the half-states separate; a warning says so. A mild drift (lambda h = -0.05 over
    T = 1, growth e^1) stays silent (the suite turns warnings into errors)."""
    g = lambda t, x, th: 0.1 * torch.ones_like(x)                         # noqa: E731
    x0, theta = torch.ones(4, 1, dtype=DT), torch.zeros(1, dtype=DT)
    stiff = lambda t, x, th: -50.0 * x                                    # noqa: E731
    mild = lambda t, x, th: -1.0 * x                                      # noqa: E731
    ts = torch.linspace(0, 1, 21, dtype=DT)
    with pytest.warns(RuntimeWarning, match="reversible_heun is unstable"):
        simulate(stiff, g, x0, theta, ts, generator=torch.Generator().manual_seed(0), scheme="reversible_heun")
    simulate(mild, g, x0, theta, ts, generator=torch.Generator().manual_seed(0), scheme="reversible_heun")


def test_sensitivity_methods_pass_module_weights_gradients():
    """backprop.mean_gradient and path_gradients differentiate the same taped solve: theta's gradient is the plain
    loop's even when the drift is a network (its weights are read, not frozen)."""
    f, g, x0, theta, ts, dW, _ = _problem("euler", "diagonal")
    loss = lambda x: (x ** 2).sum(-1)                                     # noqa: E731
    got = sensitivity.backprop.mean_gradient(f, g, x0, theta, ts, dW, loss)
    th = theta.clone().requires_grad_(True)
    want = torch.autograd.grad(loss(_plain_loop(f, g, x0, th, ts, dW, None, "euler", "diagonal")).mean(), th)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        for p in f.parameters():
            p.mul_(1.08)                                                  # a small change between calls
    got = sensitivity.adjoint.mean_gradient(f, g, x0, theta, ts, dW, loss, "euler")
    want = torch.autograd.grad(loss(_plain_loop(f, g, x0, th, ts, dW, None, "euler", "diagonal")).mean(), th)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert math.isfinite(float(got.sum()))

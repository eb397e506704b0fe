"""Forward sensitivities against ground truth: autograd through the same scheme, GBM closed forms,
and a differentiable diffusion sampler."""
import pytest
import torch
from _cases import cover_each

import sdekit
from sdekit import sensitivity, simulate
from sdekit.sensitivity import backprop, brownian_increments
from sdekit.sensitivity.compare import strong_errors
from sdekit.sensitivity.problems import make_problem
from sdekit.solvers import SCHEMES as REGISTRY

SCHEMES = ["euler", "milstein", "heun"]


def _setup(name, B=5, N=12, seed=0):
    pb = make_problem(name)
    gen = torch.Generator().manual_seed(seed)
    x0 = pb.x0(B, gen)
    ts = pb.ts(N)
    m = x0.shape[1] if pb.noise == "diagonal" else pb.g(ts[0], x0[:1], pb.theta).shape[-1]
    return pb, x0, ts, brownian_increments(ts, (x0.shape[0], m), gen)


PROBLEM_NAMES = ["gbm", "ou", "linear_scalar", "linear_general", "double_well", "neural", "diffusion_gauss", "diffusion",
                 "diffusion_pf", "diffusion_mlp"]
CASES = [(name, scheme) for name in PROBLEM_NAMES for scheme in SCHEMES
         if make_problem(name).noise in REGISTRY[scheme].orders]


def test_every_problem_is_checked():
    from sdekit.sensitivity.problems import PROBLEMS
    assert sorted(PROBLEM_NAMES) == sorted(PROBLEMS)


# the default run takes each problem and each scheme at least once; the other pairs run with -m slow (CI)
@pytest.mark.parametrize("name, scheme", cover_each(CASES, 0, 1))
def test_forward_equals_autograd_through_same_scheme(name, scheme):
    pb, x0, ts, dW = _setup(name)
    f = pb.drift(scheme)
    xs, J = sensitivity.forward(f, pb.g, x0, pb.theta, ts, dW, scheme=scheme, noise=pb.noise)
    assert J.shape == (len(ts), *x0.shape, pb.P)
    # the forward pass's path is the primal solver's (traced with products fused, so equal to round-off)
    torch.testing.assert_close(xs, simulate(f, pb.g, x0, pb.theta, ts, dW, scheme, save="path", noise=pb.noise),
                               rtol=1e-13, atol=1e-14)
    if name.startswith("diffusion"):
        # the mixture score makes one reverse pass per output slow: compare u . J with one VJP per random
        # cotangent u over the whole path instead (any wrong entry of J changes u . J almost surely)
        th = pb.theta.clone().requires_grad_(True)
        path = simulate(f, pb.g, x0, th, ts, dW, scheme, save="path", noise=pb.noise)
        gen = torch.Generator().manual_seed(7)
        for _ in range(2):
            u = torch.randn(path.shape, generator=gen, dtype=path.dtype)
            vjp = torch.autograd.grad(path, th, u, retain_graph=True)[0]
            fwd = torch.einsum("nbd,nbdp->p", u, J)
            assert ((fwd - vjp).abs().max() / vjp.abs().max()) < 1e-10
    else:
        J_ref = backprop.jacobian(f, pb.g, x0, pb.theta, ts, dW, scheme, noise=pb.noise)
        rel = (J - J_ref).abs().max() / J_ref.abs().max()
        assert rel < 1e-10, rel
    # save="end" returns the last entries of the same computation
    x_end, J_end = sensitivity.forward(f, pb.g, x0, pb.theta, ts, dW, scheme=scheme, save="end", noise=pb.noise)
    assert torch.allclose(x_end, xs[-1], rtol=0, atol=1e-14) and torch.allclose(J_end, J[-1], rtol=1e-12, atol=1e-14)


def test_eager_and_traced_paths_agree():
    pb, x0, ts, dW = _setup("neural", N=4)
    for scheme in SCHEMES:
        _, J1 = sensitivity.forward(pb.drift(scheme), pb.g, x0, pb.theta, ts, dW, scheme, save="end", trace=True)
        _, J2 = sensitivity.forward(pb.drift(scheme), pb.g, x0, pb.theta, ts, dW, scheme, save="end", trace=False)
        assert (J1 - J2).abs().max() <= 1e-12 * J2.abs().max()


def test_gbm_closed_form_matches_forward_at_fine_steps():
    # with 2048 Milstein steps, J_T is within 1% of T X_T and (W_T - sigma T) X_T on the same path
    pb = make_problem("gbm", mu=0.5, sigma=0.8)
    gen = torch.Generator().manual_seed(1)
    x0 = pb.x0(200)
    ts = pb.ts(2048)
    dW = brownian_increments(ts, (200, 1), gen)
    _, J = sensitivity.forward(pb.f, pb.g, x0, pb.theta, ts, dW, "milstein", save="end")
    _, J_exact = pb.exact_J(x0, pb.theta, 1.0, dW.sum(0))
    assert ((J - J_exact).abs().mean() / J_exact.abs().mean()) < 0.01


@pytest.mark.slow   # 400 paths x 6 levels x 7 schemes on the eager path (about 30 s of CPU); CI runs it
def test_strong_order_of_J_on_gbm():
    # mean |J_h - J| at T over 400 paths, h = 1/16 ... 1/512 on one fine Brownian path per sample (with Levy areas,
    # for srk). Tolerance: slope within 0.15 of the strong order each scheme declares in the registry for diagonal
    # noise (measured: euler 0.52, milstein 0.97, srk 1.48, euler_heun 0.97, heun 0.97, midpoint 0.97,
    # reversible_heun 0.96). Every registered scheme is checked.
    res = strong_errors(make_problem("gbm", mu=0.5, sigma=0.8), paths=400, finest=512, levels=6, seed=0)
    for scheme in REGISTRY:
        assert res[scheme]["order"] == REGISTRY[scheme].strong_order
        assert abs(res[scheme]["slope"] - REGISTRY[scheme].strong_order) < 0.15, (scheme, res[scheme])
    # and the higher order schemes are more accurate at the finest step
    assert res["milstein"]["errors"][-1] < 0.2 * res["euler"]["errors"][-1]
    assert res["srk"]["errors"][-1] < 0.1 * res["milstein"]["errors"][-1]


@pytest.mark.parametrize("probability_flow", [False, True])
def test_diffusion_sampler_noise_direction_forward_equals_backprop_jvp(probability_flow):
    pb = make_problem("diffusion_pf" if probability_flow else "diffusion")
    sde = pb.extra["sde"]
    B, N = 6, 25
    gen = torch.Generator().manual_seed(3)
    xT = pb.x0(B, gen)
    ts = pb.ts(N)
    z = torch.randn(N, B, 2, generator=gen, dtype=torch.float64)
    dW = z * (ts[:-1] - ts[1:]).sqrt()[:, None, None]
    v = torch.randn(B, 2, generator=gen, dtype=torch.float64)          # a direction of the initial noise
    theta0 = torch.zeros(1, dtype=torch.float64)                       # no parameters: only the initial direction
    f = lambda t, x, th: pb.f(t, x, pb.theta)
    g = lambda t, x, th: pb.g(t, x, pb.theta)
    x0, J = sensitivity.forward(f, g, xT, theta0, ts, dW, "euler", save="end", J0=v[..., None])
    # the primal is the library's own sampler on the same noise
    score = lambda x, t: pb.extra["score"](x, t, pb.theta)
    sampler = "ode_euler" if probability_flow else "euler_maruyama"
    noise = None if probability_flow else z
    x_ref = sdekit.sample(score, sde, (B, 2), sampler=sampler, x_T=xT, noise=noise, ts=ts, dtype=torch.float64)
    assert torch.allclose(x0, x_ref, rtol=1e-10, atol=1e-10)
    _, jvp_ref = torch.autograd.functional.jvp(lambda x: simulate(f, g, x, theta0, ts, dW, "euler"), xT, v)
    assert (J[..., 0] - jvp_ref).abs().max() <= 1e-12 * jvp_ref.abs().max()


def test_diffusion_sampler_shift_matches_closed_form():
    # d E[x_1 + x_2] / d shift = alpha_{t_min} per component in the continuous limit (probability flow, Heun)
    pb = make_problem("diffusion_pf")
    gen = torch.Generator().manual_seed(0)
    x0 = pb.x0(400, gen)
    ts = pb.ts(40)
    dW = torch.zeros(40, 400, 2, dtype=torch.float64)
    x, J = sensitivity.forward(pb.f, pb.g, x0, pb.theta, ts, dW, "heun", save="end")
    est = J.sum(1).mean(0)
    exact = pb.exact_grad(pb.theta)
    se = J.sum(1).std(0) / 400**0.5
    assert ((est - exact).abs() < 4 * se + 0.02).all(), (est, exact, se)


def test_bad_inputs_are_named():
    pb, x0, ts, dW = _setup("gbm")
    with pytest.raises(ValueError, match="x0"):
        sensitivity.forward(pb.f, pb.g, x0[0], pb.theta, ts, dW)
    with pytest.raises(ValueError, match="theta"):
        sensitivity.forward(pb.f, pb.g, x0, pb.theta[None], ts, dW)
    with pytest.raises(ValueError, match="ts"):
        sensitivity.forward(pb.f, pb.g, x0, pb.theta, ts.flip(0)[[0, 2, 1]], dW[:2])
    with pytest.raises(ValueError, match="dW"):
        sensitivity.forward(pb.f, pb.g, x0, pb.theta, ts, dW[1:])
    with pytest.raises(ValueError, match="scheme"):
        sensitivity.forward(pb.f, pb.g, x0, pb.theta, ts, dW, scheme="rk4")
    with pytest.raises(ValueError, match="J0"):
        sensitivity.forward(pb.f, pb.g, x0, pb.theta, ts, dW, J0=torch.zeros(1, 1, 1, dtype=torch.float64))

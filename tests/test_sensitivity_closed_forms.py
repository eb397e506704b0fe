"""Estimators against closed forms: the discrete closed form (the scheme's own chain, by quadrature) checked against
textbook formulas and Monte Carlo; pathwise and score-function estimates within 4 standard errors of it on forward
and reverse-time problems for every noise type; the comparison report and the command.

Tolerances: |z| < 4 for a Monte Carlo mean against an exact value (a fixed seed; about 50 such comparisons here, so a
correct estimator fails one by chance with probability ~0.3%, a biased one at these path counts fails by far).
"""
import math

import pytest
import torch

from sdekit import sensitivity, simulate
from sdekit.sensitivity import score_function
from sdekit.sensitivity.compare import METHODS, run
from sdekit.sensitivity.finite_diff import fresh_noise
from sdekit.sensitivity.problems import Problem, closed_form, discrete_expectation, make_problem
from sdekit.solvers import SCHEMES

DT = torch.float64
LINEAR = ["gbm", "ou", "linear_scalar", "linear_general", "diffusion_gauss"]


def _m(pb, x0):
    return x0.shape[1] if pb.noise == "diagonal" else pb.g(torch.tensor(pb.t0, dtype=DT), x0[:1], pb.theta).shape[-1]


def test_discrete_closed_form_equals_the_textbook_formulas_on_gbm():
    """E[X_N^2] of Euler on GBM is x0^2 ((1 + mu h)^2 + sigma^2 h)^N; of Milstein, x0^2 ((1 + mu h)^2 + sigma^2 h +
    sigma^4 h^2 / 2)^N (its factor is 1 + mu h + sigma dW + sigma^2 (dW^2 - h) / 2)."""
    mu, sig, N = 0.5, 0.8, 10
    pb = make_problem("gbm", mu=mu, sigma=sig)
    h = 1.0 / N
    assert math.isclose(float(discrete_expectation(pb, "euler", pb.ts(N))), ((1 + mu * h) ** 2 + sig**2 * h) ** N, rel_tol=1e-13)
    want = ((1 + mu * h) ** 2 + sig**2 * h + sig**4 * h**2 / 2) ** N
    assert math.isclose(float(discrete_expectation(pb, "milstein", pb.ts(N))), want, rel_tol=1e-13)
    # and the gradient: d/dmu of the Euler formula
    kind, grad = closed_form(pb, "euler", pb.ts(N))
    assert kind == "discrete"
    base = (1 + mu * h) ** 2 + sig**2 * h
    assert math.isclose(float(grad[0]), N * base ** (N - 1) * 2 * (1 + mu * h) * h, rel_tol=1e-12)


@pytest.mark.parametrize("name", LINEAR)
def test_discrete_closed_form_equals_monte_carlo_for_every_scheme(name):
    """The quadrature oracle against 100000 simulated paths of the same chain, every scheme the noise type takes."""
    pb = make_problem(name)
    N = 16 if pb.reverse_time else 6
    ts = pb.ts(N)
    gen = torch.Generator().manual_seed(11)
    B = 100_000
    for scheme, sch in SCHEMES.items():
        if pb.noise not in sch.orders:
            continue
        x0 = pb.x0(B, gen)
        dW, H = fresh_noise(ts, (B, _m(pb, x0)), sch.needs_levy_area, gen, DT)
        L = pb.loss(simulate(pb.drift(scheme), pb.g, x0, pb.theta, ts, dW, scheme, noise=pb.noise, levy_area=H))
        want = float(discrete_expectation(pb, scheme, ts))
        z = (float(L.mean()) - want) / (float(L.std()) / math.sqrt(B))
        assert abs(z) < 4, (scheme, float(L.mean()), want, z)


@pytest.mark.parametrize("name", LINEAR)
def test_pathwise_gradient_within_4_standard_errors_of_the_discrete_closed_form(name):
    """Forward sensitivities (per path, chain rule) estimate d E[L(X_N)]/dtheta of the scheme's chain: z < 4 for every
    scheme and parameter; the continuous limit, where known, differs from it by the scheme's bias."""
    pb = make_problem(name)
    N, B = 6, 2000
    ts = pb.ts(N)
    gen = torch.Generator().manual_seed(5)
    for scheme, sch in SCHEMES.items():
        if pb.noise not in sch.orders or (pb.reverse_time and scheme == "reversible_heun"):
            continue                                        # reversible Heun is unstable on the stiff reverse SDE at N=8
        x0 = pb.x0(B, gen)
        dW, H = fresh_noise(ts, (B, _m(pb, x0)), sch.needs_levy_area, gen, DT)
        x, J = sensitivity.forward(pb.drift(scheme), pb.g, x0, pb.theta, ts, dW, scheme, save="end", noise=pb.noise,
                                   levy_area=H, trace=False)        # eager: the traced step is checked elsewhere
        dL = torch.func.vmap(torch.func.grad(lambda v: pb.loss(v[None])[0]))(x)
        est = torch.einsum("bd,bdp->bp", dL, J)
        exact = closed_form(pb, scheme, ts)[1]
        # (diffusion_gauss: J does not depend on the path, so the standard error is 0 and round-off is the bound)
        assert ((est.mean(0) - exact).abs() <= 4 * est.std(0) / math.sqrt(B) + 1e-10 * exact.abs()).all(), \
            (scheme, est.mean(0), exact, est.std(0) / math.sqrt(B))


# --- the score-function estimator on every noise type, forward and reverse time -------------------------------------
def _sf_problem(noise, reverse):
    """A linear SDE of the noise type (drift parameters a, b; diffusion scale s), on [0, 1] or from 1 down to 0."""
    A = torch.tensor([[-0.5, 0.8], [-0.6, -0.3]], dtype=DT)
    c = torch.tensor([1.0, -0.5], dtype=DT)
    if noise == "scalar":                                   # d = 1: scalar noise has a density only in d = 1
        f = lambda t, x, th: th[0] + th[1] * x                                         # noqa: E731
        g = lambda t, x, th: (th[2] * (0.5 * x + 1.0))[..., None]                      # noqa: E731
        x0 = torch.tensor([0.5], dtype=DT)
    else:
        f = lambda t, x, th: th[0] * c + th[1] * (x @ A.T)                             # noqa: E731
        x0 = torch.tensor([1.0, 0.5], dtype=DT)
        G0 = torch.tensor([[1.0, 0.3, -0.2], [0.1, 0.8, 0.5]], dtype=DT)
        g = {"diagonal": lambda t, x, th: th[2] * (1 + 0.3 * x),
             "additive": lambda t, x, th: (th[2] * G0).expand(x.shape[0], 2, 3),
             "general": lambda t, x, th: th[2] * (G0 + 0.1 * torch.stack([x, x.flip(-1), -x], -1))}[noise]
    t0, t1 = (1.0, 0.0) if reverse else (0.0, 1.0)
    d = x0.shape[0]
    return Problem(f"sf_{noise}", f, g, torch.tensor([0.6, 0.9, 0.5], dtype=DT), ["a", "b", "s"], t0, t1,
                   lambda B, gen=None: x0.expand(B, d).clone(), lambda x: (x**2).sum(-1), drift_params=(0, 1), noise=noise,
                   x0_moments=(x0, torch.zeros(d, d, dtype=DT)), loss_moments=lambda mean, second: torch.diagonal(second).sum())


@pytest.mark.parametrize("noise", ["diagonal", "scalar", "additive", "general"])
@pytest.mark.parametrize("reverse", [False, True])
def test_score_function_within_4_standard_errors_of_the_discrete_closed_form(noise, reverse):
    """L(X_N) x the Girsanov score of the Euler chain is unbiased for d E[L(X_N)]/dtheta of that chain: the drift
    parameters within 4 standard errors of the closed form (with and without the baseline), the diffusion's NaN."""
    pb = _sf_problem(noise, reverse)
    B, N = 20000, 10
    ts = pb.ts(N)
    gen = torch.Generator().manual_seed(7)
    x0 = pb.x0(B)
    dW, _ = fresh_noise(ts, (B, _m(pb, x0)), False, gen, DT)
    exact = closed_form(pb, "euler", ts)[1]
    for baseline in (False, True):
        est = score_function.path_gradients(pb.f, pb.g, x0, pb.theta, ts, dW, pb.loss, baseline=baseline, noise=noise)
        z = (est[:, :2].mean(0) - exact[:2]) / (est[:, :2].std(0) / math.sqrt(B))
        assert (z.abs() < 4).all(), (baseline, est[:, :2].mean(0), exact[:2], z)
        assert torch.isnan(est[:, 2]).all()                 # s scales g: not a drift parameter


def test_score_function_refuses_what_has_no_density():
    pb = make_problem("linear_scalar")                        # scalar noise in d = 2: g g^T has rank 1
    x0, ts = pb.x0(8), pb.ts(4)
    dW = torch.randn(4, 8, 1, dtype=DT) * 0.5
    with pytest.raises(ValueError, match="singular.*scalar noise in d = 2"):
        score_function.path_gradients(pb.f, pb.g, x0, pb.theta, ts, dW, pb.loss, noise="scalar")
    with pytest.raises(ValueError, match="Euler chain"):
        score_function.path_gradients(pb.f, pb.g, x0, pb.theta, ts, dW, pb.loss, noise="scalar", scheme="heun")
    f = lambda t, x, th: th[0] * x                              # noqa: E731
    g = lambda t, x, th: torch.stack([x[:, 0], x[:, 0]], -1)[..., None].expand(x.shape[0], 2, 3)   # rank 1, m = 3
    with pytest.raises(ValueError, match="g has rank < d"):
        score_function.path_gradients(f, g, x0, pb.theta, ts, torch.randn(4, 8, 3, dtype=DT), pb.loss, noise="general")
    g0 = lambda t, x, th: 0.0 * x                               # noqa: E731  an ODE: no transition density
    with pytest.raises(ValueError, match="g is zero"):
        score_function.path_gradients(f, g0, x0, pb.theta, ts, torch.randn(4, 8, 2, dtype=DT), pb.loss)


# --- the comparison report --------------------------------------------------------------------------------------------
def _check_pathwise_agree(res, names, tol):
    ref = torch.tensor(res["methods"]["backprop"]["estimate"])
    for name in names:
        est = torch.tensor(res["methods"][name]["estimate"])
        assert ((est - ref).abs().max() / ref.abs().max()) < tol, (name, est, ref)


@pytest.mark.parametrize("name, scheme", [("gbm", "reversible_heun"), ("diffusion_gauss", "euler"),
                                          ("linear_general", "heun")])
def test_report_on_forward_and_reverse_time_problems(name, scheme):
    """Every method the report runs: the pathwise methods agree to round-off with backprop, every per-path estimate
    is within 4 standard errors of the discrete closed form, and the columns are filled as documented."""
    methods = [m for m in METHODS if m not in ("diffrax", "adjoint_torchsde", "fd_independent")]
    res = run(make_problem(name), paths=1000, steps=10, scheme=scheme, methods=methods, groups=10, progress=False)
    assert res["closed_form_kind"] == "discrete" and res["reverse_time"] == (name == "diffusion_gauss")
    rows = res["methods"]
    pathwise = ["forward", "adjoint"] + (["checkpoint"] if scheme == "reversible_heun" else [])
    _check_pathwise_agree(res, pathwise, 1e-10)
    _check_pathwise_agree(res, ["fd_crn"], 1e-5)
    for m, row in rows.items():
        if "skipped" in row:
            assert m in ("checkpoint", "score_function", "score_function_baseline"), (m, row)
            continue
        assert row["seconds"] > 0 and row["one_off_seconds"] >= 0 and row["peak_bytes"] >= 0
        # per-path methods: |z| < 4; mean-gradient methods take their standard error from 10 group means, so z is
        # Student-t with 9 degrees of freedom (P(|t| > 6) = 2e-4); their means equal backprop's (checked above)
        bound = 6 if row["variance_from"] == "group-means" else 4
        assert all(abs(z) < bound for z in row["z"]), (m, row["z"])
    if scheme == "euler":                                   # the score function runs on the Euler chain only
        assert "z" in rows["score_function"]
        # the pathwise estimators have far lower variance per path than the score function here
        assert rows["forward"]["per_path_variance"][0] < 0.2 * rows["score_function"]["per_path_variance"][0]
    else:
        assert "euler" in rows["score_function"]["skipped"]


def test_report_states_the_continuous_limit_where_no_discrete_form_exists():
    res = run(make_problem("diffusion"), paths=200, steps=10, methods=["forward"], progress=False)
    assert res["closed_form_kind"] == "continuous" and res["reverse_time"]
    res = run(make_problem("double_well"), paths=50, steps=5, methods=["forward"], progress=False)
    assert res["closed_form_kind"] is None and "z" not in res["methods"]["forward"]


def test_command_help_describes_every_problem_method_and_column(capsys):
    from sdekit.commands.sensitivity import main
    from sdekit.sensitivity.problems import PROBLEMS
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for word in [*PROBLEMS, *METHODS, *SCHEMES, "--threads", "warm s", "one-off s", "peak MiB", "var/path", "discrete",
                 "continuous", "Stratonovich", "reverse"]:
        assert word in text, word


def test_command_prints_the_table_and_writes_files(tmp_path, capsys):
    from sdekit.commands.sensitivity import main
    assert main(["--problem", "diffusion_gauss", "--paths", "400", "--steps", "10", "--strong-paths", "0",
                 "--methods", "forward", "backprop", "adjoint", "score_function", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "z (discrete)" in out and "reverse time" in out and "continuous limit" in out and "1 thread" in out
    assert torch.get_num_threads() == 1
    assert (tmp_path / "results.json").exists() and (tmp_path / "variance.png").exists()
    # a scheme that does not take the problem's noise type is an error message, not a traceback
    assert main(["--problem", "linear_general", "--scheme", "srk", "--paths", "8", "--steps", "2", "--out", str(tmp_path)]) == 2
    assert "general" in capsys.readouterr().err

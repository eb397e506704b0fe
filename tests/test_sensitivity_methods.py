"""The other estimators against the forward sensitivity / backprop and against exact values."""
import pytest
import torch

from sdekit import sensitivity
from sdekit.sensitivity import adjoint, backprop, brownian_increments, finite_diff, score_function
from sdekit.sensitivity.problems import make_problem


def _gbm(B, N, seed=0, **kw):
    pb = make_problem("gbm", **kw)
    gen = torch.Generator().manual_seed(seed)
    ts = pb.ts(N)
    return pb, pb.x0(B), ts, brownian_increments(ts, (B, 1), gen), gen


def _pathwise(pb, x0, ts, dW, scheme="euler"):
    x, J = sensitivity.forward(pb.drift(scheme), pb.g, x0, pb.theta, ts, dW, scheme, save="end")
    return (2 * x[..., None] * J).sum(1)          # d(X_T^2)/dtheta per path: (B, P)


def test_finite_differences_with_crn_converge_to_forward():
    pb, x0, ts, dW, _ = _gbm(500, 50)
    J = sensitivity.forward(pb.f, pb.g, x0, pb.theta, ts, dW, save="end")[1]
    errs = [float((finite_diff.jacobian(pb.f, pb.g, x0, pb.theta, ts, dW, h) - J).abs().max() / J.abs().max())
            for h in (1e-1, 1e-2, 1e-3)]
    # central differences: error O(h^2), i.e. about 100x smaller per decade of h
    assert errs[1] < errs[0] / 30 and errs[2] < errs[1] / 30, errs
    assert errs[2] < 1e-6, errs


def test_finite_differences_without_crn_variance_blows_up():
    pb, x0, ts, dW, gen = _gbm(2000, 20)
    var = {h: finite_diff.path_gradients(pb.f, pb.g, x0, pb.theta, ts, dW, pb.loss, h, crn=False, generator=gen).var(0)
           for h in (1e-1, 1e-2)}
    var_crn = finite_diff.path_gradients(pb.f, pb.g, x0, pb.theta, ts, dW, pb.loss, 1e-2).var(0)
    # independent noise: Var ~ Var(L) / (2 h^2), so 10x smaller h gives ~100x the variance (assert > 50x)
    assert (var[1e-2] > 50 * var[1e-1]).all(), var
    assert (var[1e-2] > 100 * var_crn).all(), (var, var_crn)   # measured ~200x and ~1300x


def test_score_function_unbiased_and_far_noisier_than_pathwise():
    B, N = 20000, 20
    pb, x0, ts, dW, _ = _gbm(B, N, seed=2)
    sf = score_function.path_gradients(pb.f, pb.g, x0, pb.theta, ts, dW, pb.loss)
    pw = _pathwise(pb, x0, ts, dW)
    # exact derivative of E[X_N^2] for the Euler chain: x0^2 ((1 + mu h)^2 + sigma^2 h)^N
    mu, sigma = pb.theta.tolist()
    h = 1.0 / N
    exact_mu = N * 2 * (1 + mu * h) * h * ((1 + mu * h) ** 2 + sigma**2 * h) ** (N - 1)
    se = sf[:, 0].std() / B**0.5
    assert abs(sf[:, 0].mean() - exact_mu) < 4 * se, (sf[:, 0].mean(), exact_mu, se)
    assert abs(pw[:, 0].mean() - exact_mu) < 4 * pw[:, 0].std() / B**0.5
    assert torch.isnan(sf[:, 1]).all()                      # sigma is not a drift parameter
    ratio = sf[:, 0].var() / pw[:, 0].var()
    assert ratio > 10, ratio                                # measured about 20 with these parameters


@pytest.mark.parametrize("t0, t1", [(0.0, 1.0), (1.0, 0.0)])
def test_score_function_sign_on_forward_and_reverse_grids(t0, t1):
    """dX = theta dt + 0.8 dW from t0 to t1: X_t1 = x0 + theta (t1 - t0) + noise, so dE[X_t1]/dtheta = t1 - t0
    exactly, for the Euler chain too (+1 forward in time, -1 on a decreasing grid)."""
    B, N = 20000, 25
    gen = torch.Generator().manual_seed(3)
    f = lambda t, x, th: th[0] + 0.0 * x                   # noqa: E731
    g = lambda t, x, th: 0.8 + 0.0 * x                     # noqa: E731
    x0 = torch.zeros(B, 1, dtype=torch.float64)
    theta = torch.tensor([0.3], dtype=torch.float64)
    ts = torch.linspace(t0, t1, N + 1, dtype=torch.float64)
    dW = brownian_increments(ts, (B, 1), gen)
    loss = lambda x: x[:, 0]                               # noqa: E731
    for baseline in (False, True):
        est = score_function.path_gradients(f, g, x0, theta, ts, dW, loss, baseline=baseline)[:, 0]
        se = est.std() / B**0.5
        assert abs(est.mean() - (t1 - t0)) < 4 * se, (baseline, est.mean().item(), se.item())


def test_backprop_per_path_gradients_equal_forward():
    pb, x0, ts, dW, _ = _gbm(50, 30)
    for scheme in ("euler", "milstein", "heun"):
        bp = backprop.path_gradients(pb.drift(scheme), pb.g, x0, pb.theta, ts, dW, pb.loss, scheme)
        assert (bp - _pathwise(pb, x0, ts, dW, scheme)).abs().max() < 1e-10 * bp.abs().max()


def test_torchsde_adjoint_agrees_with_backprop_up_to_discretisation():
    # torchsde solves its own backward SDE, so agreement is up to discretisation error: within 6% at N=64
    # (measured 4% with sigma=0.8, 7% at N=16), and the mismatch shrinks as the grid is refined
    pb, x0, ts, dW, _ = _gbm(64, 64, mu=0.5, sigma=0.8)
    rel = []
    for coarsen in (4, 1):
        dWc = dW.reshape(64 // coarsen, coarsen, *dW.shape[1:]).sum(1)
        tsc = ts[::coarsen]
        a = adjoint.mean_gradient(pb.f, pb.g, x0, pb.theta, tsc, dWc, pb.loss, "euler", backend="torchsde")
        b = backprop.mean_gradient(pb.f, pb.g, x0, pb.theta, tsc, dWc, pb.loss)
        rel.append(float((a - b).abs().max() / b.abs().max()))
    assert rel[1] < 0.06 and rel[1] < rel[0], rel


def test_diffrax_agrees_with_backprop():
    pytest.importorskip("diffrax")
    from sdekit.interop.diffrax import path_gradients
    pb, x0, ts, dW, _ = _gbm(16, 16)
    for scheme in ("euler", "milstein"):
        jg = path_gradients(pb.xp_fields, x0, pb.theta, ts, dW, pb.loss, scheme)
        bp = backprop.path_gradients(pb.f, pb.g, x0, pb.theta, ts, dW, pb.loss, scheme)
        # same increments, same scheme: round-off agreement (measured ~2e-15)
        assert (jg - bp).abs().max() < 1e-10 * bp.abs().max(), scheme


def test_report_cli_writes_table_json_and_plots(tmp_path, capsys):
    from sdekit.commands.sensitivity import main
    assert main(["--problem", "ou", "--paths", "200", "--steps", "20", "--strong-paths", "50",
                 "--methods", "forward", "fd_crn", "score_function", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "forward" in out and "score_function" in out
    assert (tmp_path / "results.json").exists() and (tmp_path / "variance.png").exists()

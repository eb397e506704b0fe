"""Gradient estimators against closed-form gradients, in standard errors, with fixed seeds."""
import math

import pytest
import torch

from sdekit import estimators as est
from sdekit.estimators.families import CONTINUOUS, Concrete, make_family

Z = 4.0



def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("family", CONTINUOUS + ("categorical",))
@pytest.mark.parametrize("objective", est.OBJECTIVES)
def test_unbiased_estimators_match_closed_form(family, objective):
    fam, f = make_family(family, 3), est.make_objective(objective, 3)
    exact = est.exact_gradient(fam, f)
    assert torch.isfinite(exact).all() and exact.abs().max() > 1e-3
    for i, name in enumerate(est.ESTIMATORS):
        if name == "pathwise" and not fam.reparameterizable:
            continue
        r = est.estimate_gradient(fam, f, name, 6000, generator=gen(10 * i + len(family)))
        z = r.z_scores(exact).abs().max().item()
        assert z < Z, f"{name} on {family}/{objective}: max |z| = {z:.2f}"


@pytest.mark.parametrize("family", CONTINUOUS)
@pytest.mark.parametrize("objective", est.OBJECTIVES)
def test_closed_form_expectations_match_monte_carlo(family, objective):
    # the oracles themselves: E_q[f] in closed form against a plain sample mean
    fam, f = make_family(family, 3), est.make_objective(objective, 3)
    z = fam.sample(fam.theta0.expand(20_000, -1), generator=gen(1))
    fz = f(z)
    assert abs(fz.mean() - est.expectation(fam, f)) < Z * fz.std() / math.sqrt(fz.numel())


def test_pathwise_variance_below_score_and_gap_grows_with_dimension():
    for family in ("gaussian_diag", "gaussian_full"):
        ratios = []
        for d in (1, 4, 16):
            fam, f = make_family(family, d), est.make_objective("quadratic", d)
            v_path = est.estimate_gradient(fam, f, "pathwise", 4000, generator=gen(d)).variance.mean()
            v_score = est.estimate_gradient(fam, f, "score", 4000, generator=gen(d)).variance.mean()
            ratios.append((v_score / v_path).item())
        assert ratios[0] > 2, (family, ratios)
        assert ratios[1] > 2 * ratios[0] and ratios[2] > 2 * ratios[1], (family, ratios)


@pytest.mark.parametrize("family", CONTINUOUS + ("categorical",))
def test_optimal_baseline_never_worse_than_none(family):
    n = 3000
    for objective in est.OBJECTIVES:
        for d in (2, 8):
            fam, f = make_family(family, d), est.make_objective(objective, d)
            # equal seeds: both see the same z (the pilot batch is drawn after the main one), so the
            # per-sample squared deviations can be compared pairwise, in standard errors of the difference
            g_none = est.ESTIMATORS["score"](fam, f, n, generator=gen(d))
            g_opt = est.ESTIMATORS["score_optimal"](fam, f, n, generator=gen(d), n_pilot=n)
            diff = (g_opt - g_opt.mean(0)) ** 2 - (g_none - g_none.mean(0)) ** 2      # (n, P)
            excess = diff.mean(0) / (diff.std(0) / math.sqrt(n)).clamp_min(1e-300)
            assert (excess < Z).all(), (family, objective, d, excess.max().item())
            # and on the whole it helps: the summed variance is lower
            assert g_opt.var(0).sum() <= g_none.var(0).sum() * 1.001


def test_gumbel_softmax_bias_shrinks_with_temperature():
    for objective in ("quadratic", "exponential"):
        f = est.make_objective(objective, 5)
        biases, ses = [], []
        for tau in (2.0, 1.0, 0.5, 0.25):
            fam = Concrete(5, tau)
            r = est.estimate_gradient(fam, f, "pathwise", 20_000, generator=gen(3))
            biases.append((r.mean - est.exact_gradient(fam, f)).norm().item())
            ses.append(r.stderr.norm().item())
        assert biases[0] > 10 * ses[0]                      # the relaxation is biased ...
        for k in range(3):                                   # ... less so at every lower temperature
            assert biases[k + 1] < biases[k] - 2 * math.hypot(ses[k], ses[k + 1]), (objective, biases, ses)
        assert biases[-1] < 0.35 * biases[0]


def test_straight_through_is_one_hot_forward_and_differentiable():
    logits = torch.linspace(-1, 1, 4, dtype=torch.float64).expand(5, -1).clone().requires_grad_(True)
    z = est.gumbel_softmax(logits, 0.5, hard=True, generator=gen(0))
    zd = z.detach()
    torch.testing.assert_close(zd, torch.nn.functional.one_hot(zd.argmax(-1), 4).to(zd.dtype))
    (z * torch.arange(4.0, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_gamma_is_reproducible_from_the_generator_and_leaves_global_rng_alone():
    fam = make_family("gamma", 3)
    th = fam.theta0.expand(5, -1)
    state = torch.random.get_rng_state()
    a, b = fam.rsample(th, generator=gen(7)), fam.rsample(th, generator=gen(7))
    assert torch.equal(a, b)
    assert torch.equal(state, torch.random.get_rng_state())
    # implicit reparameterization: a gradient reaches the concentration
    th = fam.theta0.expand(5, -1).clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fam.rsample(th, generator=gen(7)).sum(), th)
    assert (g[:, :3] > 0).all() and (g[:, 3:] < 0).all()


def test_errors_name_the_problem():
    fam, f = make_family("categorical", 3), est.make_objective("quadratic", 3)
    with pytest.raises(ValueError, match="not reparameterizable"):
        est.estimate_gradient(fam, f, "pathwise", 10)
    with pytest.raises(ValueError, match="unknown estimator"):
        est.estimate_gradient(fam, f, "magic", 10)
    with pytest.raises(ValueError, match="unknown family"):
        make_family("cauchy", 2)
    with pytest.raises(ValueError, match="d=2"):
        est.expectation(make_family("laplace", 3), est.make_objective("sinusoidal", 2))
    with pytest.raises(ValueError, match="a < rate"):
        est.expectation(make_family("exponential", 2, rate=0.1), est.make_objective("exponential", 2))


def test_bounds():
    log_w = torch.randn(16, 7, generator=gen(0), dtype=torch.float64) * 3
    torch.testing.assert_close(est.iwae(log_w[:1]), est.elbo(log_w[:1]))
    assert (est.iwae(log_w) >= est.elbo(log_w)).all()          # Jensen, for every data point
    curve = est.iwae_curve(log_w, [1, 16])
    torch.testing.assert_close(curve[1], est.elbo(log_w))
    torch.testing.assert_close(curve[16], est.iwae(log_w))
    with pytest.raises(ValueError, match="pool size"):
        est.iwae_curve(log_w, [32])


def test_cli_writes_tables_json_and_plots(tmp_path, capsys):
    rc = est.main(["--out", str(tmp_path), "--n", "200", "--dims", "1", "2",
                   "--families", "gaussian_diag", "categorical", "--objectives", "quadratic"])
    assert rc == 0
    assert "| gaussian_diag | quadratic | 2 |" in capsys.readouterr().out
    for name in ("estimators.md", "estimators.json", "estimators.png", "concrete.png"):
        assert (tmp_path / name).stat().st_size > 100

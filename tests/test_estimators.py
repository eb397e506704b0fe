"""Gradient estimators against closed-form gradients, in standard errors, with fixed seeds."""
import math

import pytest
import torch

from sdekit import estimators as est
from sdekit.estimators.failures import ArgmaxCategorical, FloorBernoulli, bonferroni_z, check_pathwise
from sdekit.estimators.families import CONTINUOUS, DISCRETE, Concrete, GaussianDiag, RelaxedBernoulli, make_family
from sdekit.estimators.oracles import floor_gradient_gaussian
from sdekit.estimators.report import expected_max_abs_z, sinusoid_variances, variance_sweep

Z = 4.0


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("family", CONTINUOUS + DISCRETE)
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


@pytest.mark.parametrize("family", CONTINUOUS + DISCRETE)
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
    from sdekit.commands.estimators import main
    rc = main(["--out", str(tmp_path), "--n", "200", "--dims", "1", "2", "--failure-n", "2000",
               "--families", "gaussian_diag", "categorical", "bernoulli", "--objectives", "quadratic"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| gaussian_diag | quadratic | 2 |" in out and "| bernoulli | quadratic | 1 |" in out
    assert "z-scores against the closed forms" in out and "Where the pathwise estimator fails" in out
    for name in ("estimators.md", "estimators.json", "estimators.png", "concrete.png", "failures.png"):
        assert (tmp_path / name).stat().st_size > 100


# --- where pathwise fails, and the detector --------------------------------------------------------------


@pytest.mark.parametrize("mu", [0.0, 0.3, 0.77, -2.4])
def test_floor_gradient_closed_form(mu):
    # sum_k phi(k - mu) = 1 + 2 sum_m exp(-2 pi^2 m^2) cos(2 pi m mu): 1 to 6e-9 at sigma = 1
    d_mu, d_sigma = floor_gradient_gaussian(mu, 1.0)
    assert abs(d_mu - 1.0) < 6e-9 and abs(d_sigma) < 1e-7
    # the autograd gradient of the closed-form E[floor z] (a sum of normal CDFs) agrees, at sigma = 1 and 0.4
    for sigma in (1.0, 0.4):
        exact = est.exact_gradient(GaussianDiag(1, mu=mu, sigma=sigma), est.make_objective("floor", 1))
        torch.testing.assert_close(exact, torch.tensor(floor_gradient_gaussian(mu, sigma), dtype=torch.float64),
                                   rtol=1e-9, atol=1e-12)
    poisson = 1 + 2 * math.exp(-2 * math.pi ** 2 * 0.16) * math.cos(2 * math.pi * mu)   # sigma = 0.4, m = 1 term
    assert abs(floor_gradient_gaussian(mu, 0.4)[0] - poisson) < 1e-5


@pytest.mark.parametrize("family", ["gaussian_diag", "gaussian_full", "laplace", "logistic", "exponential"])
@pytest.mark.parametrize("objective", est.NONSMOOTH)
def test_nonsmooth_expectations_match_monte_carlo(family, objective):
    fam, f = make_family(family, 3), est.make_objective(objective, 3)
    fz = f(fam.sample(fam.theta0.expand(40_000, -1), generator=gen(2)))
    assert abs(fz.mean() - est.expectation(fam, f)) < Z * fz.std() / math.sqrt(fz.numel())
    # the score function (with a baseline) is unbiased for these objectives too
    exact = est.exact_gradient(fam, f)
    r = est.estimate_gradient(fam, f, "score_baseline", 20_000, n_pilot=5000, generator=gen(3))
    assert r.z_scores(exact).abs().max() < Z


def test_floor_pathwise_is_zero_and_the_detector_fires():
    fam, f = GaussianDiag(1, mu=0.3, sigma=1.0), est.make_objective("floor", 1)
    exact = est.exact_gradient(fam, f)
    pw = est.estimate_gradient(fam, f, "pathwise", 20_000, generator=gen(0))
    assert pw.mean.abs().max() == 0 and pw.stderr.max() == 0          # 0 +- 0, silently
    chk = check_pathwise(fam, f, 20_000, generator=gen(0))
    assert chk.fired and chk.verdicts == ["zero", "ok"]                  # loc moves E[floor z]; scale (barely) not
    fd = chk.finite_difference
    assert abs(fd.mean[0] - 1.0) < Z * fd.stderr[0] and fd.mean[0] > 10 * fd.stderr[0]
    sf = est.estimate_gradient(fam, f, "score_baseline", 20_000, n_pilot=20_000, generator=gen(1))
    assert sf.z_scores(exact).abs().max() < Z and abs(sf.mean[0] - 1.0) < 0.05


@pytest.mark.parametrize("case, family, objective, expected", [
    ("indicator", lambda: GaussianDiag(1, mu=0.3), "indicator", ["undefined", "undefined"]),
    ("jump", lambda: GaussianDiag(1, mu=0.3), "jump", ["mismatch", "mismatch"]),
    ("bernoulli", lambda: FloorBernoulli(3), "quadratic", ["zero", "zero", "ok"]),     # logit[2]: true gradient 0
    ("categorical", lambda: ArgmaxCategorical(4), "quadratic", ["undefined"] * 4),
    ("categorical-refuses", lambda: make_family("categorical", 4), "quadratic", ["undefined"] * 4),
])
def test_detector_flags_each_failure_mode(case, family, objective, expected):
    fam = family()
    f = est.make_objective(objective, fam.d)
    exact = est.exact_gradient(fam, f)
    chk = check_pathwise(fam, f, 20_000, generator=gen(4))
    assert chk.verdicts == expected, (case, chk.verdicts, chk.error)
    # the finite difference of the Monte Carlo objective is itself unbiased for the (smooth) expectation
    assert ((chk.finite_difference.mean - exact).abs() < Z * chk.finite_difference.stderr + 2e-3).all()


@pytest.mark.parametrize("family", CONTINUOUS)
@pytest.mark.parametrize("objective", est.OBJECTIVES)
def test_detector_silent_on_smooth_objectives(family, objective):
    fam, f = make_family(family, 3), est.make_objective(objective, 3)
    for seed in range(2):
        chk = check_pathwise(fam, f, 4000, generator=gen(100 + seed))
        assert not chk.fired, (family, objective, chk.summary())
    # a relaxation is a smooth objective too: its (biased) pathwise gradient is the true gradient of what it computes
    chk = check_pathwise(Concrete(4, 0.5), est.make_objective(objective, 4), 4000, generator=gen(7))
    assert not chk.fired, chk.summary()


def test_bernoulli_relaxation_bias_shrinks_with_temperature():
    f = est.make_objective("quadratic", 3)
    exact = est.exact_gradient(make_family("bernoulli", 3), f)
    biases = []
    for tau in (1.0, 0.5, 0.25):
        r = est.estimate_gradient(RelaxedBernoulli(3, tau), f, "pathwise", 20_000, generator=gen(5))
        biases.append(((r.mean - exact).norm() / r.stderr.norm()).item())
    assert biases[0] > 20 and biases[0] > biases[1] > biases[2], biases
    # the hard (straight-through) sample is an exact Bernoulli draw: same counts as Bernoulli.sample on the same noise
    th = make_family("bernoulli", 3).theta0.expand(1000, -1)
    hard = RelaxedBernoulli(3, 0.5, hard=True).sample(th, generator=gen(6))
    torch.testing.assert_close(hard, make_family("bernoulli", 3).sample(th, generator=gen(6)), rtol=0, atol=1e-12)


# --- the variance comparison read correctly: counter-cases and multiple comparisons ----------------------


@pytest.mark.parametrize("w", [0.5, 2.0, 4.0])
def test_sinusoid_variances_match_monte_carlo(w):
    fam = GaussianDiag(1, mu=0.5, sigma=1.0)
    exact = sinusoid_variances(w, 0.5, 1.0)
    n = 200_000
    z = fam.sample(fam.theta0.expand(n, -1), generator=gen(8))[:, 0]
    for name, g in (("pathwise", w * torch.cos(w * z)), ("score", torch.sin(w * z) * (z - 0.5))):
        c = g - g.mean()
        se = torch.sqrt(((c ** 2 - c.pow(2).mean()) ** 2).mean() / n)           # standard error of the variance
        assert abs(c.pow(2).mean() - exact[name]) < Z * se, (name, w)


def test_score_function_beats_pathwise_for_an_oscillating_f_and_loses_as_d_grows():
    exact = [sinusoid_variances(w)["score"] / sinusoid_variances(w)["pathwise"] for w in (0.5, 1.0, 2.0, 4.0)]
    assert exact[0] > 10 and exact[1] > 1 > exact[2] and exact[3] < 0.1       # crossover between w = 1 and 2
    rows = variance_sweep(("exponential",), ("sinusoidal",), (1, 4, 16), 20_000, detect=False, progress=False)
    ratio = {r["d"]: r["variance_mean"] for r in rows if r["estimator"] == "score"}
    ratio = {d: v / next(r["variance_mean"] for r in rows if r["estimator"] == "pathwise" and r["d"] == d)
             for d, v in ratio.items()}
    assert ratio[1] < 0.6 and ratio[4] > 1.5 and ratio[16] > 8 * ratio[4], ratio   # ~0.41, ~3, growth ~d^2


def test_expected_max_abs_z_against_simulation():
    assert abs(expected_max_abs_z(1)[0] - math.sqrt(2 / math.pi)) < 1e-6
    for m in (560, 20_000):
        mean, q95 = expected_max_abs_z(m)
        sims = torch.randn(400, m, generator=gen(9), dtype=torch.float64).abs().max(1).values
        assert abs(sims.mean() - mean) < Z * sims.std() / math.sqrt(400)
        assert 0.9 < (sims < q95).double().mean() <= 1.0
        assert abs(q95 - bonferroni_z(0.05, m)) < 0.01
    assert 3.1 < expected_max_abs_z(560)[0] < 3.4 and 4.1 < expected_max_abs_z(20_000)[0] < 4.3

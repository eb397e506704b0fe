"""Samplers against exact Gaussian-mixture oracles: convergence orders, reproduced mixtures, argument errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sdekit
from sdekit.samplers import SAMPLERS, sample
from sdekit.solvers import dopri5

SDES = {
    "vp": lambda: sdekit.VPSDE(),
    "vp_cosine": lambda: sdekit.VPSDE(schedule="cosine"),
    "subvp": lambda: sdekit.SubVPSDE(),
    "ve": lambda: sdekit.VESDE(),
    "edm": lambda: sdekit.EDM(),
}



def mixture(dtype=torch.float64) -> sdekit.GaussianMixture:
    """Three anisotropic, unequally weighted modes (close enough for curved probability-flow paths)."""
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]], dtype=dtype)
    covs = torch.tensor([[0.3, 0.1], [0.2, 0.4], [0.25, 0.25]], dtype=dtype)
    return sdekit.GaussianMixture(means, covs, torch.tensor([0.5, 0.3, 0.2], dtype=dtype))


def fitted_slope(sampler: str, sde, grid: str, steps: list[int], options: dict | None = None) -> tuple[float, list[float]]:
    """Least-squares slope of log RMS error against log NFE, error against a float64 rk45 reference
    (rtol = atol = 1e-9) from the same 64 draws of x_T."""
    gmm = mixture()
    score = gmm.score_fn(sde)
    x_T = sde.prior_sample((64, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = sample(score, sde, (64, 2), "rk45", x_T=x_T, rtol=1e-9, atol=1e-9)
    nfes, errs = [], []
    for n in steps:
        x, info = sample(score, sde, (64, 2), sampler, steps=n, grid=grid, x_T=x_T, return_info=True, **(options or {}))
        nfes.append(info["nfe"])
        errs.append(float((x - ref).pow(2).sum(1).mean().sqrt()))
    slope = -np.polyfit(np.log(nfes), np.log(errs), 1)[0]
    return float(slope), errs


# (sampler, grid, steps, options), on VPSDE (linear beta); the order checked is the one the sampler declares in
# SAMPLERS (SamplerSpec.order: ode_euler 1, heun 2, rk4 4, ddim 1, dpmpp_2m 2, edm 2). The step ranges are where the asymptotic
# regime holds on this mixture (measured from 8 to 512 steps: below ~32-64 steps the Euler-type errors are pre-asymptotic) while
# the smallest error (rk4 at 256 steps, ~1.5e-8) stays at least ten times the reference's own error (~1e-9).
CONVERGENCE = [
    ("ode_euler", "uniform", [64, 128, 256, 512], {}),
    ("heun", "uniform", [64, 128, 256, 512], {}),
    ("rk4", "uniform", [32, 64, 128, 256], {}),
    ("ddim", "log_snr", [32, 64, 128, 256, 512], {"eta": 0.0}),
    ("dpmpp_2m", "log_snr", [32, 64, 128, 256, 512], {}),
    ("edm", "edm", [32, 64, 128, 256], {"S_churn": 0.0}),
]


@pytest.mark.parametrize("sampler,grid,steps,options", CONVERGENCE, ids=[c[0] for c in CONVERGENCE])
def test_convergence_order_vp(sampler, grid, steps, options):
    """Slope of log error vs log NFE on VPSDE (linear beta), declared order +- 0.3. Grids: uniform t for ode_euler/heun/rk4
    (64..512, 64..512, 32..256 steps), uniform log-SNR for ddim/dpmpp_2m (32..512), EDM rho=7 for edm (32..256).
    Measured: 1.01, 1.97, 3.89, 0.98, 1.96, 2.05."""
    order = SAMPLERS[sampler].order
    slope, errs = fitted_slope(sampler, SDES["vp"](), grid, steps, options)
    assert abs(slope - order) <= 0.3, f"{sampler}: fitted slope {slope:.2f}, declared order {order}; errors {errs}"


@pytest.mark.parametrize("sde_name", ["vp_cosine", "subvp", "ve", "edm"])
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_exponential_integrators_any_sde(sde_name, sampler):
    """ddim and dpmpp_2m read (alpha_t, sigma_t) only, so their declared orders (1, 2) hold under every SDE
    (log-SNR grid, 32..512 steps)."""
    order = SAMPLERS[sampler].order
    slope, errs = fitted_slope(sampler, SDES[sde_name](), "log_snr", [32, 64, 128, 256, 512])
    assert abs(slope - order) <= 0.3, f"{sampler} on {sde_name}: fitted slope {slope:.2f}, declared order {order}; errors {errs}"


def test_rk45_meets_tolerance_and_reports_steps():
    """rk45 at rtol 1e-6 is within ~1e-5 of the 1e-10 solution, and tighter tolerances cost more accepted steps."""
    sde, gmm = SDES["vp"](), mixture()
    x_T = sde.prior_sample((32, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = sample(gmm.score_fn(sde), sde, (32, 2), "rk45", x_T=x_T, rtol=1e-10, atol=1e-10)
    x, info = sample(gmm.score_fn(sde), sde, (32, 2), "rk45", x_T=x_T, rtol=1e-6, atol=1e-6, return_info=True)
    _, tight = sample(gmm.score_fn(sde), sde, (32, 2), "rk45", x_T=x_T, rtol=1e-9, atol=1e-9, return_info=True)
    assert float((x - ref).abs().max()) < 1e-4
    assert info["accepted"] > 0 and info["rejected"] >= 0
    assert info["nfe"] == 2 + 6 * (info["accepted"] + info["rejected"])
    assert tight["accepted"] > 2 * info["accepted"]


def test_dopri5_batched_exact_solution():
    """Batched dopri5 on dy/dt = -k y (k per sample) matches exp(-k t) at rtol 1e-8, in both time directions."""
    k = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)[:, None]
    f = lambda t, y: -k * y
    y0 = torch.ones(3, 1, dtype=torch.float64)
    y1 = dopri5(f, y0, torch.tensor([0.0, 2.0]), rtol=1e-8, atol=1e-10)
    assert torch.allclose(y1, torch.exp(-2 * k), rtol=1e-7)
    back = dopri5(f, y1, torch.tensor([2.0, 0.0]), rtol=1e-8, atol=1e-10)
    assert torch.allclose(back, y0, rtol=1e-6)


# --- stochastic samplers reproduce the mixture -------------------------------------------------------
def separated_mixture(dtype=torch.float32) -> sdekit.GaussianMixture:
    """Modes > 7 standard deviations apart, so assigning samples by responsibility misclassifies < 1e-4."""
    means = torch.tensor([[-3.0, 0.0], [3.0, 1.0], [0.0, -3.5]], dtype=dtype)
    covs = torch.tensor([[0.3, 0.1], [0.2, 0.4], [0.25, 0.25]], dtype=dtype)
    return sdekit.GaussianMixture(means, covs, torch.tensor([0.5, 0.3, 0.2], dtype=dtype))


STOCHASTIC = [
    ("euler_maruyama", "vp", {}, 500),
    ("pc", "vp", {"snr": 0.16, "n_corrector": 1}, 250),
    ("pc", "ve", {"snr": 0.16, "n_corrector": 1}, 250),
    ("ddim", "vp", {"eta": 1.0}, 200),
    ("edm", "edm", {"S_churn": 40.0, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.0}, 64),
]


@pytest.mark.parametrize("sampler,sde_name,options,steps", STOCHASTIC, ids=[f"{s[0]}-{s[1]}" for s in STOCHASTIC])
def test_stochastic_sampler_reproduces_mixture(sampler, sde_name, options, steps):
    """n = 6000 samples with the exact score: per-mode weights, means and variances within 4.5 standard errors
    of the mixture diffused to t_min (binomial SE for weights, sqrt(var/n_k) for means, var sqrt(2/n_k) for variances)."""
    sde, gmm = SDES[sde_name](), separated_mixture()
    n = 6000
    x = sample(gmm.score_fn(sde), sde, (n, 2), sampler, steps=steps, generator=torch.Generator().manual_seed(3), **options)
    assert torch.isfinite(x).all()
    t_min = torch.tensor(sde.t_min)
    alpha, sigma = (float(v) for v in sde.marginal(t_min))
    labels = gmm.responsibilities(x, t_min, sde).argmax(1)
    for k in range(gmm.n_components):
        w = float(gmm.weights[k])
        nk = int((labels == k).sum())
        assert abs(nk / n - w) <= 4.5 * math.sqrt(w * (1 - w) / n), f"{sampler}: mode {k} weight {nk / n:.4f} vs {w}"
        xk = x[labels == k].double()
        mean = alpha * gmm.means[k].double()
        var = alpha**2 * torch.diagonal(gmm.covs[k]).double() + sigma**2
        se_mean = (var / nk).sqrt()
        assert ((xk.mean(0) - mean).abs() <= 4.5 * se_mean).all(), f"{sampler}: mode {k} mean {xk.mean(0)} vs {mean}"
        se_var = var * math.sqrt(2 / nk)
        assert ((xk.var(0) - var).abs() <= 4.5 * se_var).all(), f"{sampler}: mode {k} variance {xk.var(0)} vs {var}"


def test_wrong_sampler_fails_the_mixture_check():
    """The check above can fail: a score at the wrong scale (x2) gives too-narrow modes."""
    sde, gmm = SDES["vp"](), separated_mixture()
    wrong = lambda x, t: 2.0 * gmm.score(x, t, sde)
    x = sample(wrong, sde, (2000, 2), "euler_maruyama", steps=200, generator=torch.Generator().manual_seed(0))
    labels = gmm.responsibilities(x).argmax(1)
    assert float(x[labels == 0].var(0)[0]) < 0.8 * float(gmm.covs[0, 0, 0])


# --- explicit noise, bookkeeping --------------------------------------------------------------------
@pytest.mark.parametrize("sampler,options", [("euler_maruyama", {}), ("pc", {"n_corrector": 2}), ("ddim", {"eta": 0.5}),
                                             ("edm", {"S_churn": 10.0})])
def test_explicit_noise_makes_sampler_deterministic(sampler, options):
    sde, gmm = SDES["vp"](), separated_mixture()
    steps = 20
    draws = SAMPLERS[sampler].noise_draws(steps, options)
    noise = torch.randn(draws, 16, 2, generator=torch.Generator().manual_seed(5))
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(6))
    a = sample(gmm.score_fn(sde), sde, (16, 2), sampler, steps=steps, x_T=x_T, noise=noise, **options)
    b = sample(gmm.score_fn(sde), sde, (16, 2), sampler, steps=steps, x_T=x_T, noise=noise.clone(),
               generator=torch.Generator().manual_seed(99), **options)
    c = sample(gmm.score_fn(sde), sde, (16, 2), sampler, steps=steps, x_T=x_T, noise=torch.randn_like(noise), **options)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("sampler,per_step", [("euler_maruyama", 1), ("pc", 2), ("ode_euler", 1), ("heun", 2), ("rk4", 4),
                                              ("ddim", 1), ("dpmpp_2m", 1), ("edm", 2)])
def test_nfe_and_trajectory(sampler, per_step):
    sde, gmm = SDES["vp"](), separated_mixture()
    seen = []
    x, traj, info = sample(gmm.score_fn(sde), sde, (8, 2), sampler, steps=7, return_trajectory=True, return_info=True,
                           generator=torch.Generator().manual_seed(0), callback=lambda i, t, x: seen.append(i))
    assert info["nfe"] == 7 * per_step
    assert traj.shape == (8, 8, 2) and torch.equal(traj[-1], x)
    assert seen == list(range(7))


def test_every_registered_sampler_runs_every_sde():
    for sde_name, make in SDES.items():
        sde, gmm = make(), separated_mixture()
        for name in SAMPLERS:
            x = sample(gmm.score_fn(sde), sde, (4, 2), name, steps=5, generator=torch.Generator().manual_seed(0))
            assert x.shape == (4, 2) and torch.isfinite(x).all(), f"{name} on {sde_name}"


# --- bad arguments --------------------------------------------------------------------------------------
def test_bad_arguments_raise_clear_errors():
    sde, gmm = SDES["vp"](), separated_mixture()
    score = gmm.score_fn(sde)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        sample(score, sde, (4, 2), "heun", steps=0)
    with pytest.raises(ValueError, match="rtol must be"):
        sample(score, sde, (4, 2), "rk45", rtol=0.0)
    with pytest.raises(ValueError, match="rtol must be"):
        sample(score, sde, (4, 2), "rk45", rtol=-1e-3)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['snr'\]"):
        sample(score, sde, (4, 2), "ddim", snr=0.1)
    with pytest.raises(TypeError, match="unknown option"):
        sample(score, sde, (4, 2), "rk4", info={})
    with pytest.raises(ValueError, match=r"noise for sampler 'euler_maruyama' must have shape \(10, 4, 2\)"):
        sample(score, sde, (4, 2), "euler_maruyama", steps=10, noise=torch.randn(10, 4, 3))
    with pytest.raises(ValueError, match=r"must have shape \(20, 4, 2\)"):
        sample(score, sde, (4, 2), "pc", steps=10, noise=torch.randn(10, 4, 2))
    with pytest.raises(ValueError, match="deterministic and takes no noise"):
        sample(score, sde, (4, 2), "heun", steps=10, noise=torch.randn(10, 4, 2))
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(score, sde, (4, 2), "dpm3")
    with pytest.raises(ValueError, match="eta must be in"):
        sample(score, sde, (4, 2), "ddim", eta=1.5)
    with pytest.raises(ValueError, match="n_corrector"):
        sample(score, sde, (4, 2), "pc", n_corrector=-1)
    with pytest.raises(ValueError, match="noise must have shape"):
        SAMPLERS["euler_maruyama"].fn(score, sde, torch.zeros(4, 2), torch.linspace(1, 0.01, 6), noise=torch.randn(3, 4, 2))


def test_samplers_report_cli(tmp_path):
    """`sdekit samplers` writes JSON, markdown and PNG covering every registered sampler; deterministic errors fall with NFE."""
    import json

    from sdekit.commands import main

    n = torch.get_num_threads()
    try:
        rc = main(["samplers", "--out", str(tmp_path), "--nfe", "8,32", "--batch", "16", "--n-samples", "300", "--quiet"])
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    result = json.loads((tmp_path / "samplers.json").read_text())
    assert {r["sampler"] for r in result["rows"]} == set(SAMPLERS)
    assert result["orders"]["heun"] == SAMPLERS["heun"].order and result["orders"]["ddim"] == SAMPLERS["ddim"].order
    md = (tmp_path / "samplers.md").read_text()
    assert md.startswith("# Sampler accuracy") and "| heun | 2 |" in md              # declared order beside the slope
    assert (tmp_path / "samplers.png").stat().st_size > 10_000
    for label in ("ode_euler", "heun", "dpmpp_2m"):
        errs = [r["error"] for r in result["rows"] if r["label"] == label]
        assert errs[-1] < errs[0], (label, errs)


# --- default time grids follow the SDE --------------------------------------------------------------------
def rice_moments(radius: float, std: float) -> tuple[float, float]:
    """Mean and std of |x| for x ~ N(m, std^2 I_2) with |m| = radius (the Rice distribution), in closed form:
    E|x| = std sqrt(pi/2) L_{1/2}(-v), v = radius^2 / (2 std^2), with L_{1/2}(-v) = e^{-v/2} [(1+v) I0(v/2) + v I1(v/2)];
    E|x|^2 = radius^2 + 2 std^2."""
    v = torch.tensor(radius**2 / (2 * std**2), dtype=torch.float64)
    mean = std * math.sqrt(math.pi / 2) * float((1 + v) * torch.special.i0e(v / 2) + v * torch.special.i1e(v / 2))
    return mean, math.sqrt(radius**2 + 2 * std**2 - mean**2)


@pytest.mark.parametrize("sampler", ["euler_maruyama", "pc", "ode_euler", "heun", "rk4", "rk45", "ddim", "dpmpp_2m", "edm"])
def test_default_grid_under_edm_reproduces_ring_radii(sampler):
    """Under EDM (sigma = t from 0.002 to 80) with each sampler's default steps and grid, the exact ring score
    (8 modes at radius 2, std 0.1) must give radii whose mean and spread match the ring diffused to t_min
    (Rice moments, closed form): each within 4 standard errors plus a discretisation allowance of 5% of the
    radius std (the largest bias measured, ddim's first-order shrinkage, is -0.01 in the mean). Equal steps of
    sigma give a radius std of 0.27-0.78 instead of 0.10 for euler_maruyama, pc, heun and rk4 and 0.07 for
    ode_euler; the mode-weight check alone does not notice."""
    sde = sdekit.EDM()
    gmm = sdekit.data.ring()
    n = 2000
    x = sample(gmm.score_fn(sde), sde, (n, 2), sampler, generator=torch.Generator().manual_seed(0))
    r = x.double().norm(dim=1)
    std_t = math.sqrt(0.1**2 + sde.t_min**2)             # per-mode std at t_min (alpha = 1, sigma = t_min)
    mean_true, std_true = rice_moments(2.0, std_t)
    se_mean, se_std = std_true / math.sqrt(n), std_true / math.sqrt(2 * n)
    assert abs(float(r.mean()) - mean_true) <= 4 * se_mean + 0.05 * std_true, \
        f"{sampler}: radius mean {float(r.mean()):.4f} vs {mean_true:.4f}"
    assert abs(float(r.std()) - std_true) <= 4 * se_std + 0.05 * std_true, f"{sampler}: radius std {float(r.std()):.4f} vs {std_true:.4f}"


def test_each_sde_names_its_default_grid():
    """EDM's samplers default to its rho grid; the VP family and VE keep uniform t (their numbers are unchanged)."""
    assert sdekit.EDM().default_grid == "edm"
    for sde in (sdekit.VPSDE(), sdekit.VPSDE(schedule="cosine"), sdekit.SubVPSDE(), sdekit.VESDE()):
        assert sde.default_grid == "uniform"
    sde, gmm = sdekit.EDM(rho=5.0), separated_mixture()
    seen = []
    sample(gmm.score_fn(sde), sde, (4, 2), "heun", steps=6, callback=lambda i, t, x: seen.append(float(t)))
    expected = sdekit.samplers.grids.edm_rho(sde, 6, rho=5.0)[1:]
    torch.testing.assert_close(torch.tensor(seen), expected)


# --- the predictor-corrector's Langevin step -----------------------------------------------------------
def _signal_decay(sde, t, t_next) -> float:
    """Closed-form per-step signal decay a_i = exp(-int_{t_next}^{t} beta(s) ds) of the VP family (the continuous
    counterpart of score_sde's alpha_i = 1 - beta_i for a step of length t - t_next), and 1 for VE and EDM."""
    if isinstance(sde, sdekit.VPSDE) and sde.schedule == "linear":      # SubVPSDE too: same beta(t)
        return math.exp(-(sde.beta_min * (t - t_next) + 0.5 * (sde.beta_max - sde.beta_min) * (t**2 - t_next**2)))
    if isinstance(sde, sdekit.VPSDE):                                  # cosine: alpha_t = cos(phase(t)) / cos(phase(0))
        phase = lambda u: math.pi / 2 * (u + sde.cosine_s) / (1 + sde.cosine_s)
        return (math.cos(phase(t)) / math.cos(phase(t_next))) ** 2
    return 1.0


@pytest.mark.parametrize("sde_name", ["vp", "vp_cosine", "subvp", "ve", "edm"])
@pytest.mark.parametrize("frac", [0.5, 0.9])
def test_pc_corrector_step_is_score_sdes(sde_name, frac, float64):
    """One pc step from t to t_next: the corrector must move x_pred (the predictor's output) to
    x_pred + eps s + sqrt(2 eps) z with eps = 2 a (snr mean||z|| / mean||s||)^2 (Song et al. 2021, Algorithms 4-5),
    a = exp(-int beta) < 1 for the VP family (score_sde: alpha_i = 1 - beta_i) and a = 1 for VE/EDM. The inverted
    factor exp(+int beta) made eps 44x too large at the first of 10 steps on VPSDE."""
    sde, gmm = SDES[sde_name](), mixture()
    t = sde.t_min + frac * (sde.t_max - sde.t_min)
    t_next = t - 0.1 * (sde.t_max - sde.t_min)
    calls = []

    def score(x, tt):
        s = gmm.score(x, tt, sde)
        calls.append((x.clone(), s))
        return s

    noise = torch.randn(2, 64, 2, generator=torch.Generator().manual_seed(0))
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(1)) * 2
    out = sample(score, sde, (64, 2), "pc", ts=torch.tensor([t, t_next]), x_T=x_T, noise=noise, snr=0.16, n_corrector=1)
    (x_pred, s), z = calls[1], noise[1]
    a = _signal_decay(sde, t, t_next)
    assert 0 < a <= 1
    eps = 2 * a * (0.16 * z.norm(dim=1).mean() / s.norm(dim=1).mean()) ** 2
    torch.testing.assert_close(out, x_pred + eps * s + torch.sqrt(2 * eps) * z, rtol=1e-10, atol=1e-10)


def test_signal_decay_is_score_sdes_alpha_i():
    """The closed form used above is score_sde's discrete alpha_i = 1 - beta(t_i) dt up to O(dt^2)
    (dt = 1/1000; the remainder is (beta^2 + beta') dt^2 / 2 at most, beta' = beta_max - beta_min)."""
    sde, dt = sdekit.VPSDE(), 1e-3
    for t in (0.1, 0.5, 1.0):
        beta = float(sde.beta(torch.tensor(t)))
        assert abs(_signal_decay(sde, t, t - dt) - (1 - beta * dt)) <= (beta**2 + sde.beta_max - sde.beta_min) * dt**2


# --- a generator run can be replayed through noise= -------------------------------------------------------
STOCHASTIC_OPTIONS = {"euler_maruyama": {}, "pc": {"n_corrector": 2}, "ddim": {"eta": 0.7},
                      "edm": {"S_churn": 5.0, "S_tmin": 0.05, "S_tmax": 50.0}}


@pytest.mark.parametrize("sde_name", ["vp", "edm"])
@pytest.mark.parametrize("sampler", sorted(n for n, s in SAMPLERS.items() if s.stochastic))
def test_generator_run_replays_through_noise(sampler, sde_name):
    """Row k of `noise` is the k-th standard normal a sampler draws from its generator (after x_T), so drawing
    x_T and then the rows one by one from the same seed and passing them as noise= reproduces the generator run
    exactly, for every stochastic sampler. (edm drew nothing at its first step, which never churns, so its
    step i used generator draw i - 1 but noise row i: the replay differed by up to 6.5 here at S_churn = 5.)"""
    assert sampler in STOCHASTIC_OPTIONS, f"add stochastic options for the new sampler {sampler!r}"
    sde, gmm = SDES[sde_name](), separated_mixture()
    options, steps, shape = STOCHASTIC_OPTIONS[sampler], 12, (16, 2)
    score = gmm.score_fn(sde)
    run = sample(score, sde, shape, sampler, steps=steps, generator=torch.Generator().manual_seed(7), **options)
    gen = torch.Generator().manual_seed(7)
    x_T = sde.prior_sample(shape, generator=gen)
    noise = torch.stack([torch.randn(shape, generator=gen) for _ in range(SAMPLERS[sampler].noise_draws(steps, options))])
    replay = sample(score, sde, shape, sampler, steps=steps, x_T=x_T, noise=noise, **options)
    assert torch.equal(run, replay), f"{sampler}: max difference {float((run - replay).abs().max()):.3g}"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_x_T_and_noise_are_refused_by_name_and_index(bad):
    """A NaN/Inf in x_T or in noise is a ValueError naming the argument and its first bad index, before any
    network evaluation (a NaN x_T used to be integrated into NaN samples without a word)."""
    sde, gmm = SDES["vp"](), separated_mixture()
    calls = []
    score = lambda x, t: calls.append(1) or gmm.score(x, t, sde)
    x_T = torch.zeros(4, 2)
    x_T[1, 1] = bad
    for sampler in SAMPLERS:
        with pytest.raises(ValueError, match=r"x_T contains 1 NaN/Inf value\(s\), first at index \(1, 1\)"):
            sample(score, sde, (4, 2), sampler, steps=3, x_T=x_T)
    noise = torch.zeros(3, 4, 2)
    noise[2, 0, 1] = bad
    with pytest.raises(ValueError, match=r"noise contains 1 NaN/Inf value\(s\), first at index \(2, 0, 1\)"):
        sample(score, sde, (4, 2), "euler_maruyama", steps=3, noise=noise)
    assert calls == []

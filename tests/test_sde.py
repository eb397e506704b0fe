"""Each SDE's closed-form marginal against its own drift and diffusion: exactly (ODEs for the moments)
and statistically (Monte Carlo of the SDE)."""
import math

import pytest
import torch

from sdekit.sde import EDM, VESDE, VPSDE, SubVPSDE

SDES = {
    "vp_linear": lambda: VPSDE(0.1, 20.0),
    "vp_cosine": lambda: VPSDE(schedule="cosine"),
    "subvp": lambda: SubVPSDE(0.1, 20.0),
    "ve": lambda: VESDE(0.01, 50.0),
    "edm": lambda: EDM(0.002, 80.0),
}


@pytest.mark.parametrize("name", SDES)
def test_moment_odes_hold_exactly(name, float64):
    """x_t | x0 = N(alpha x0, sigma^2) solves dx = f x dt + g dW iff d log alpha/dt = f and d sigma^2/dt = 2 f sigma^2 + g^2."""
    sde = SDES[name]()
    t = torch.linspace(sde.t_min, sde.t_max, 50)[1:-1].clone().requires_grad_()
    alpha, sigma = sde.marginal(t)
    if alpha.requires_grad:
        dlog_alpha, = torch.autograd.grad(torch.log(alpha).sum(), t, retain_graph=True)
    else:  # alpha is constant in t (VE, EDM)
        dlog_alpha = torch.zeros_like(t)
    dvar, = torch.autograd.grad((sigma**2).sum(), t)
    f, g = sde.drift_coef(t).detach(), sde.diffusion(t).detach()
    torch.testing.assert_close(dlog_alpha, f, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dvar, 2 * f * sigma.detach() ** 2 + g**2, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", SDES)
def test_marginal_matches_monte_carlo(name, float64):
    """Simulate the forward SDE from t=0 with fine Euler-Maruyama steps; mean and std of x_t agree within 4 SE."""
    sde = SDES[name]()
    t_end = 0.5 if name != "edm" else 3.0
    n_paths, n_steps, x0 = 20000, 2000, 1.5
    gen = torch.Generator().manual_seed(0)
    ts = torch.linspace(0.0, t_end, n_steps + 1)
    x = torch.full((n_paths,), x0)
    for i in range(n_steps):
        dt = ts[i + 1] - ts[i]
        x = x + sde.drift_coef(ts[i]) * x * dt + sde.diffusion(ts[i]) * dt.sqrt() * torch.randn(n_paths, generator=gen)
    alpha, sigma = sde.marginal(torch.tensor(t_end))
    se_mean = sigma / math.sqrt(n_paths)
    se_std = sigma / math.sqrt(2 * n_paths)
    assert abs(x.mean() - alpha * x0) < 4 * se_mean + 1e-3 * sigma
    assert abs(x.std() - sigma) < 4 * se_std + 1e-3 * sigma  # + O(dt) scheme bias, far below the SE here
    # the test can fail: a 5% error in sigma is many standard errors away
    assert abs(1.05 * sigma - sigma) > 4 * se_std


@pytest.mark.parametrize("name", SDES)
def test_log_snr_and_sigma_ratio_invert(name, float64):
    sde = SDES[name]()
    t = torch.linspace(sde.t_min, sde.t_max, 101)
    torch.testing.assert_close(sde.t_from_log_snr(sde.log_snr(t)), t, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(sde.t_from_sigma_ratio(sde.sigma_ratio(t)), t, rtol=1e-8, atol=1e-9)
    assert (sde.log_snr(t)[1:] < sde.log_snr(t)[:-1]).all(), "log-SNR must decrease in t"


def test_ve_default_t_min_is_sigma_min(float64):
    sde = VESDE(0.01, 50.0)
    assert abs(float(sde.marginal(torch.tensor(sde.t_min))[1]) - 0.01) < 1e-12


def test_drift_broadcasts_per_sample_time():
    sde = VPSDE()
    x = torch.randn(4, 3, 5, 5)
    t = torch.rand(4)
    expected = torch.stack([-0.5 * sde.beta(t[i]) * x[i] for i in range(4)])
    torch.testing.assert_close(sde.drift(x, t), expected)
    with pytest.raises(ValueError, match="does not match batch"):
        sde.drift(x, torch.rand(3))


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="beta_min"):
        VPSDE(beta_min=5.0, beta_max=1.0)
    with pytest.raises(ValueError, match="schedule"):
        VPSDE(schedule="quadratic")
    with pytest.raises(ValueError, match="sigma_min"):
        VESDE(sigma_min=2.0, sigma_max=1.0)


def test_prior_sample_uses_generator():
    sde = EDM()
    a = sde.prior_sample((3, 2), generator=torch.Generator().manual_seed(5))
    b = sde.prior_sample((3, 2), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (3, 2)

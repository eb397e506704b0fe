"""Each SDE's closed-form marginal against its own drift and diffusion: exactly (ODEs for the moments)
and statistically (Monte Carlo of the SDE)."""
import math

import pytest
import torch
from _tolerance import roundoff

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
    # float32, the same few roundings of beta(t) and two products per element, per sample or batched
    torch.testing.assert_close(sde.drift(x, t), expected, rtol=roundoff(torch.float32, ops=4), atol=0)
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


# --- inverses of log-SNR over the whole range -----------------------------------------------------------
# t from far below t_min to past t_max (the forward SDE is defined there; lognormal training times and
# log-SNR grids reach both ends): log-SNR from about +30 down to about -40.
RANGES = {
    "vp_linear": (1e-6, 2.0),
    "vp_cosine": (1e-6, 0.9946),
    "subvp": (1e-6, 2.0),
    "ve": (1e-6, 1.5),
    "edm": (1e-4, 500.0),
}


def _close_to_float64(t32: torch.Tensor, t64: torch.Tensor, lam: torch.Tensor) -> None:
    """float32 result within 4 u (1 + |lambda|) relative of the float64 one, u = 6e-8 float32's unit roundoff:
    t depends on lambda like e^-lambda/2 or e^-lambda at the ends (relative condition number <= 1 + |lambda|)."""
    rel = (t32.double() - t64).abs() / t64.abs().clamp_min(1e-300)
    bound = 4 * 2.0**-24 * (1 + lam.double().abs())
    worst = int(torch.argmax(rel / bound))
    assert bool((rel <= bound).all()), f"lambda = {float(lam[worst]):.4g}: t = {float(t32[worst]):.8g} (float32) vs {float(t64[worst]):.8g}"


def _times(name: str) -> torch.Tensor:
    lo, hi = RANGES[name]
    return torch.cat([torch.logspace(math.log10(lo), math.log10(hi), 200, dtype=torch.float64),
                      torch.linspace(lo, hi, 200, dtype=torch.float64)]).sort().values


@pytest.mark.parametrize("name", SDES)
def test_t_from_log_snr_round_trips_over_the_whole_range(name):
    """t -> log_snr -> t: in float64 to 1e-9 relative; in float32 the inverse at the float32 log-SNR agrees with
    the float64 inverse at the same input to 4 u (1 + |lambda|) relative (u = 6e-8), never NaN. SubVPSDE's root formula
    (2e + 1 - sqrt(4e + 1)) / 2e, e = e^lambda,
    cancelled: NaN at lambda = -20, t = 1.034 for lambda = -26 (true 1.61), and 0.88843 for 0.89170 in float32 at -8."""
    sde = SDES[name]()
    t = _times(name)
    back = sde.t_from_log_snr(sde.log_snr(t))
    assert bool(torch.isfinite(back).all()), f"{name}: non-finite at t = {t[~torch.isfinite(back)][:3].tolist()}"
    torch.testing.assert_close(back, t, rtol=1e-9, atol=0)
    lam32 = sde.log_snr(t.float())
    assert bool(torch.isfinite(lam32).all()) and lam32.dtype == torch.float32
    back32 = sde.t_from_log_snr(lam32)
    assert back32.dtype == torch.float32 and bool(torch.isfinite(back32).all())
    _close_to_float64(back32, sde.t_from_log_snr(lam32.double()), lam32)


@pytest.mark.parametrize("name", SDES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_t_from_log_snr_at_extreme_log_snr(name, dtype):
    """log-SNR from -80 to 80: finite, non-negative, non-increasing in lambda, and in float32 within
    4 u (1 + |lambda|) of the float64 answer (which the round trip above pins down)."""
    sde = SDES[name]()
    lam = torch.linspace(-80.0, 80.0, 321, dtype=dtype)
    t = sde.t_from_log_snr(lam)
    assert bool(torch.isfinite(t).all() and (t >= 0).all()), f"{name}: {t[~torch.isfinite(t) | (t < 0)][:3].tolist()}"
    assert bool((t[1:] <= t[:-1]).all()), f"{name}: t_from_log_snr is not monotone"
    _close_to_float64(t, sde.t_from_log_snr(lam.double()), lam)


def test_subvp_inverse_matches_bisection():
    """SubVPSDE.t_from_log_snr against bisection on its own log_snr (float64), at the values that failed."""
    sde = SubVPSDE(0.1, 20.0)
    for lam in (-26.0, -20.0, -8.0, 0.0, 8.0, 20.0):
        lo, hi = 1e-12, 10.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if float(sde.log_snr(torch.tensor(mid, dtype=torch.float64))) > lam else (lo, mid)
        t_ref = 0.5 * (lo + hi)
        for dtype in (torch.float64, torch.float32):
            got = float(sde.t_from_log_snr(torch.tensor(lam, dtype=dtype)))
            # float32: the bound of _close_to_float64, 4 u (1 + |lambda|) relative
            rel = 1e-12 if dtype == torch.float64 else 4 * 2.0**-24 * (1 + abs(lam))
            assert abs(got - t_ref) <= rel * t_ref, (lam, dtype, got, t_ref)

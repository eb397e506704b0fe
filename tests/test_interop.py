"""torchsde and diffrax backends agree with sdekit's native solvers; the JAX export of a trained MLP equals torch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import sdekit
from sdekit.interop import torchsde as tsde_backend
from sdekit.samplers import sample
from sdekit.samplers.grids import make_grid
from sdekit.samplers.reverse_sde import euler_maruyama

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)   # float64 comparisons to round-off; affects only JAX users
from sdekit.interop import diffrax as dfx_backend  # noqa: E402



def mixture() -> sdekit.GaussianMixture:
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]], dtype=torch.float64)
    covs = torch.tensor([[0.3, 0.1], [0.2, 0.4], [0.25, 0.25]], dtype=torch.float64)
    return sdekit.GaussianMixture(means, covs, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))


ALL_SDES = [sdekit.VPSDE(), sdekit.VPSDE(schedule="cosine"), sdekit.SubVPSDE(), sdekit.VESDE(), sdekit.EDM()]


def increments(n_steps: int, batch: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, generator=g, dtype=torch.float64), torch.randn(n_steps, batch, 2, generator=g, dtype=torch.float64)


# --- torchsde ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sde", [ALL_SDES[0], ALL_SDES[3], ALL_SDES[4]], ids=lambda s: type(s).__name__)
def test_torchsde_euler_equals_native_em(sde):
    """Same Brownian increments, non-uniform (EDM rho) grid: torchsde 'euler' and sdekit EM agree to round-off."""
    gmm = mixture()
    ts = make_grid("edm", sde, 30, dtype=torch.float64)
    x_T, noise = increments(30)
    x_T = x_T * sde.prior_std
    native = euler_maruyama(gmm.score_fn(sde), sde, x_T, ts, noise=noise)
    other = tsde_backend.reverse_sde(gmm.score_fn(sde), sde, x_T, ts, method="euler", noise=noise)
    assert torch.allclose(native, other, rtol=1e-12, atol=1e-12 * sde.prior_std)


def test_torchsde_stratonovich_heun_agrees_for_additive_noise():
    """Additive noise: Stratonovich Heun solves the same SDE; on the same increments it is close to EM and converges with it."""
    sde, gmm = sdekit.VPSDE(), mixture()
    errs = []
    for n in (100, 400):
        ts = make_grid("uniform", sde, n, dtype=torch.float64)
        x_T, noise = increments(n, seed=1)
        em = euler_maruyama(gmm.score_fn(sde), sde, x_T, ts, noise=noise)
        heun = tsde_backend.reverse_sde(gmm.score_fn(sde), sde, x_T, ts, method="heun", noise=noise)
        errs.append(float((em - heun).abs().mean()))
    assert errs[1] < errs[0] < 0.2


def test_torchsde_reproduces_mixture_with_its_own_brownian_motion():
    """srk (needs Levy area, so torchsde's own BrownianInterval) with the exact score: mode weights within 4.5 SE."""
    sde, gmm = sdekit.VPSDE(), mixture().to(torch.float32)
    n = 2000
    x_T = sde.prior_sample((n, 2), generator=torch.Generator().manual_seed(2))
    ts = make_grid("uniform", sde, 100)
    x = tsde_backend.reverse_sde(gmm.score_fn(sde), sde, x_T, ts, method="srk", generator=torch.Generator().manual_seed(3))
    frac = torch.bincount(gmm.responsibilities(x).argmax(1), minlength=3).double() / n
    w = gmm.weights.double()
    assert ((frac - w).abs() <= 4.5 * (w * (1 - w) / n).sqrt()).all(), frac


def test_torchsde_bad_arguments():
    sde, gmm = sdekit.VPSDE(), mixture()
    ts = make_grid("uniform", sde, 5, dtype=torch.float64)
    x_T, noise = increments(5)
    with pytest.raises(ValueError, match="unknown torchsde method"):
        tsde_backend.reverse_sde(gmm.score_fn(sde), sde, x_T, ts, method="rk4")
    with pytest.raises(ValueError, match="noise must have shape"):
        tsde_backend.reverse_sde(gmm.score_fn(sde), sde, x_T, ts, noise=noise[:4])
    with pytest.raises(ValueError, match="Levy area"):
        tsde_backend.reverse_sde(gmm.score_fn(sde), sde, x_T, ts, method="srk", noise=noise)


# --- diffrax ---------------------------------------------------------------------------------------------------
def test_jax_schedules_and_mixture_score_equal_torch():
    gmm = mixture()
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sde in ALL_SDES:
        coef = dfx_backend.sde_coefficients(sde)
        t = torch.linspace(sde.t_min, sde.t_max, 9, dtype=torch.float64)
        a, s = sde.marginal(t)
        ja, js = coef["marginal"](dfx_backend.to_jax(t))
        np.testing.assert_allclose(np.asarray(ja), a.numpy(), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(js), s.numpy(), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(coef["diffusion"](dfx_backend.to_jax(t))), sde.diffusion(t).numpy(), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(coef["drift_coef"](dfx_backend.to_jax(t))), sde.drift_coef(t).numpy(), rtol=1e-12)
        for tt in (sde.t_min, 0.3 * sde.t_max, sde.t_max):
            js = dfx_backend.mixture_score(gmm, sde)(dfx_backend.to_jax(x * float(sde.marginal(torch.tensor(tt))[1] + 1)), tt)
            ts_ = gmm.score(x * float(sde.marginal(torch.tensor(tt))[1] + 1), torch.tensor(tt, dtype=torch.float64), sde)
            np.testing.assert_allclose(np.asarray(js), ts_.numpy(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sde", [ALL_SDES[0], ALL_SDES[4]], ids=lambda s: type(s).__name__)
def test_diffrax_euler_equals_native_em(sde):
    """Same increments on a log-SNR grid: diffrax Euler (StepTo on the grid) equals sdekit EM to round-off."""
    gmm = mixture()
    ts = make_grid("log_snr", sde, 30, dtype=torch.float64)
    x_T, noise = increments(30, seed=4)
    x_T = x_T * sde.prior_std
    native = euler_maruyama(gmm.score_fn(sde), sde, x_T, ts, noise=noise)
    other = dfx_backend.reverse_sde(dfx_backend.mixture_score(gmm, sde), sde, x_T, ts, noise=noise)
    np.testing.assert_allclose(np.asarray(other), native.numpy(), rtol=1e-10, atol=1e-10 * sde.prior_std)


def test_diffrax_probability_flow_equals_rk45_reference():
    """Dopri5 with a PID controller at rtol 1e-9 lands within 1e-6 of sdekit's rk45 at rtol 1e-10, from the same x_T."""
    sde, gmm = sdekit.VPSDE(), mixture()
    x_T, _ = increments(1, seed=5)
    ref = sample(gmm.score_fn(sde), sde, (16, 2), "rk45", x_T=x_T, rtol=1e-10, atol=1e-10)
    out, stats = dfx_backend.probability_flow(dfx_backend.mixture_score(gmm, sde), sde, x_T, rtol=1e-9, atol=1e-9,
                                              return_stats=True)
    assert int(stats["num_accepted_steps"]) > 10
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=1e-6)


@pytest.fixture(scope="module")
def trained():
    """A models.mlp.MLP trained for 150 Adam steps of denoising score matching on the mixture."""
    from models.mlp import MLP
    from sdekit.losses import dsm_loss
    from sdekit.precond import Denoiser

    torch.manual_seed(0)
    sde, gmm = sdekit.VPSDE(), mixture().to(torch.float32)
    den = Denoiser(MLP(2, hidden=64, depth=3), sde, prediction="eps")
    opt = torch.optim.Adam(den.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        x0 = gmm.sample(256, generator=g)
        t = sde.t_min + (sde.t_max - sde.t_min) * torch.rand(256, generator=g)
        loss = dsm_loss(den, x0, t, torch.randn(256, 2, generator=g)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    den.requires_grad_(False)
    assert float(den.net.out.weight.abs().max()) > 0   # no longer the zero-initialised output layer
    return den, sde


def test_exported_mlp_equals_torch(trained):
    """The exported network and the exported score of the trained Denoiser equal torch within 1e-5 (float32)."""
    den, sde = trained
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    c = torch.linspace(-2.0, 1.5, 64)
    params, apply = dfx_backend.export_mlp(den.net)
    with torch.no_grad():
        want = den.net(x, c).numpy()
    got = np.asarray(apply(params, dfx_backend.to_jax(x), dfx_backend.to_jax(c)))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    score_jax = dfx_backend.export_denoiser(den)
    for t in (0.05, 0.3, 0.9):
        with torch.no_grad():
            want = den(x, torch.tensor(t)).numpy()
        got = np.asarray(score_jax(dfx_backend.to_jax(x), np.float32(t)))
        np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, float(np.abs(want).max())), rtol=0)


@pytest.mark.parametrize("prediction", ["x0", "v", "edm"])
def test_exported_denoiser_every_prediction_type(prediction):
    from models.mlp import MLP
    from sdekit.precond import Denoiser

    torch.manual_seed(1)
    net = MLP(2, hidden=32, depth=2)
    torch.nn.init.normal_(net.out.weight, std=0.3)
    den = Denoiser(net, sdekit.VPSDE(), prediction=prediction, sigma_data=0.7)
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = den(x, torch.tensor(0.4)).numpy()
    got = np.asarray(dfx_backend.export_denoiser(den)(dfx_backend.to_jax(x), np.float32(0.4)))
    np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, float(np.abs(want).max())), rtol=0)


def test_diffrax_pf_ode_with_exported_mlp_matches_torch(trained):
    """End to end in float64: PF-ODE of the exported trained MLP (diffrax Dopri5) vs the torch model (sdekit rk45),
    both at rtol = atol = 1e-8, agree within 1e-5."""
    import copy

    den, sde = trained
    den = copy.deepcopy(den).double()
    x_T, _ = increments(1, seed=6)
    with torch.no_grad():
        ref = sample(den, sde, (16, 2), "rk45", x_T=x_T, rtol=1e-8, atol=1e-8)
    out = dfx_backend.probability_flow(dfx_backend.export_denoiser(den), sde, x_T, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=1e-5)


def test_diffrax_bad_arguments():
    sde, gmm = sdekit.VPSDE(), mixture()
    ts = make_grid("uniform", sde, 5, dtype=torch.float64)
    x_T, noise = increments(5)
    score = dfx_backend.mixture_score(gmm, sde)
    with pytest.raises(ValueError, match="noise must have shape"):
        dfx_backend.reverse_sde(score, sde, x_T, ts, noise=noise[:, :3])
    with pytest.raises(ValueError, match="needs noise= or key="):
        dfx_backend.reverse_sde(score, sde, x_T, ts)
    with pytest.raises(ValueError, match="rtol"):
        dfx_backend.probability_flow(score, sde, x_T, rtol=0.0)
    with pytest.raises(TypeError, match="expects a models.mlp.MLP"):
        dfx_backend.export_mlp(torch.nn.Linear(2, 2))

"""sdekit.interop.diffusers: a diffusers UNet2DModel and its discrete schedule as an sdekit score function and SDE
(randomly initialised; nothing is downloaded)."""
from __future__ import annotations

import pytest
import torch
from _tolerance import SCHEDULE_OPS, roundoff

import sdekit
from sdekit.samplers import sample

diffusers = pytest.importorskip("diffusers")
from sdekit.interop.diffusers import DiscreteVPSDE, from_diffusers  # noqa: E402


def small_unet(seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()


def test_discrete_schedule_is_exact_at_every_timestep():
    """alpha, sigma and log-SNR of the SDE equal the scheduler's at t = (k + 1) / T; t_from_log_snr inverts log_snr;
    the marginal is variance preserving and the forward SDE's (f, g) reproduce d sigma^2 / dt = 2 f sigma^2 + g^2."""
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    sde = DiscreteVPSDE(sched.alphas_cumprod)
    k = torch.tensor([0, 1, 10, 500, 998, 999])
    t = sde.t_of_timestep(k)
    alpha, sigma = sde.marginal(t)
    ac = sched.alphas_cumprod.double()[k]
    torch.testing.assert_close(alpha**2, ac, rtol=1e-12, atol=0)
    torch.testing.assert_close(sigma**2, 1 - ac, rtol=1e-12, atol=1e-15)
    tt = torch.linspace(sde.t_min, 1.0, 777, dtype=torch.float64)
    torch.testing.assert_close(sde.t_from_log_snr(sde.log_snr(tt)), tt, rtol=1e-9, atol=1e-12)
    mid = (tt[1:] + tt[:-1]) / 2
    h = 1e-7
    ds2 = (sde.marginal(mid + h)[1] ** 2 - sde.marginal(mid - h)[1] ** 2) / (2 * h)
    interior = (mid * 1000 - torch.round(mid * 1000)).abs() > 1e-3       # away from the knots, where f jumps
    expected = 2 * sde.drift_coef(mid) * sde.marginal(mid)[1] ** 2 + sde.diffusion(mid) ** 2
    torch.testing.assert_close(ds2[interior], expected[interior], rtol=1e-5, atol=1e-8)
    assert sde.marginal(torch.tensor(0.0, dtype=torch.float64))[1] == 0


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_sdekit_ddim_equals_diffusers_ddim(set_alpha_to_one):
    """A random UNet2DModel: sdekit's ddim (eta = 0) on diffusers' DDIM timesteps (t = (k + 1) / T, ending at t = 0,
    sigma = 0, with set_alpha_to_one, else at timestep 0) equals DDIMScheduler's loop to float32 round-off
    (measured: max difference 3.8e-5 on values up to 184, a random UNet's x0 predictions being large)."""
    steps = 10
    unet = small_unet()
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, set_alpha_to_one=set_alpha_to_one, clip_sample=False)
    sched.set_timesteps(steps)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x = x_T.clone()
    with torch.no_grad():
        for k in sched.timesteps:
            x = sched.step(unet(x, k).sample, k, x).prev_sample
        score, sde = from_diffusers(unet, sched)
        # diffusers' last step goes from timestep 0 to alpha = 1 (t = 0), or, without set_alpha_to_one, from timestep 0
        # to alphas_cumprod[0], i.e. nowhere (an NFE spent on a step of zero length)
        ts = sde.t_of_timestep(sched.timesteps).tolist() + ([0.0] if set_alpha_to_one else [])
        ours = sample(score, sde, tuple(x_T.shape), "ddim", ts=torch.tensor(ts), x_T=x_T)
    assert ours.dtype == torch.float32
    # both call the same UNet; they differ in the update's coefficients and their ~8 roundings per step, at the size
    # of the terms they combine (|x| up to ~184); a wrong coefficient is off by O(|x|)
    torch.testing.assert_close(ours, x, rtol=0, atol=roundoff(torch.float32, float(x.abs().max()), ops=8 * steps))


def test_every_kind_of_sampler_runs_on_a_diffusers_model():
    """eps, v and x0 models with multistep and Runge-Kutta samplers, grids ending at t_min or at sigma = 0: finite."""
    unet = small_unet()
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for prediction in ("epsilon", "v_prediction", "sample"):
            sched = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction)
            score, sde = from_diffusers(unet, sched)
            for name, kw in (("unipc", dict(steps=4, to_zero=True)), ("dpmpp_3m", dict(steps=4)), ("heun", dict(steps=2))):
                x = sample(score, sde, (2, 1, 8, 8), name, x_T=x_T, **kw)
                assert torch.isfinite(x).all(), (prediction, name)


@pytest.mark.slow
def test_log_likelihood_runs_on_a_diffusers_model():
    """The probability-flow log-likelihood (Hutchinson) of a random UNet: finite (about 30 s on 2 cores)."""
    score, sde = from_diffusers(small_unet(), diffusers.DDPMScheduler(num_train_timesteps=1000))
    with torch.no_grad():
        logp = sdekit.log_likelihood(score, sde, torch.zeros(1, 1, 8, 8), method="hutchinson",
                                     generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(logp).all()


def test_v_and_x0_predictions_give_the_same_score():
    """The three read-outs of one model are consistent: a model whose eps output is E gives the same score as the v
    model returning alpha E - sigma x0(E) and the x0 model returning x0(E)."""
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    sde = DiscreteVPSDE(sched.alphas_cumprod)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    a, s = (v.reshape(-1, 1, 1, 1) for v in sde.marginal(t))
    eps_model = lambda x, k: torch.sin(x) + k.reshape(-1, 1, 1, 1) / 1000
    x0 = lambda x, k: (x - s * eps_model(x, k)) / a
    scores = [from_diffusers(m, alphas_cumprod=sched.alphas_cumprod, prediction_type=p)[0](x, t) for m, p in
              ((eps_model, "epsilon"), (lambda x, k: a * eps_model(x, k) - s * x0(x, k), "v_prediction"), (x0, "sample"))]
    torch.testing.assert_close(scores[1], scores[0])
    torch.testing.assert_close(scores[2], scores[0])


@pytest.mark.parametrize("steps", [5, 10])
def test_deis_log_rho_equals_diffusers_deis(steps):
    """diffusers' DEISMultistepScheduler (order 3) extrapolates eps in log rho: sdekit's deis with basis='log_rho' on
    the scheduler's own sigmas reproduces it on an exact mixture score, to its float32 coefficients (measured
    7e-6 at 5 and 10 steps against samples of size 3; at 20 steps their float32 round-off grows to 3e-4)."""
    from sdekit.data import GaussianMixture
    from sdekit.interop.diffusers import numpy2_array_warnings_muted, run_scheduler, vp_trained_betas
    from sdekit.samplers import sample
    from sdekit.sde import VPSDE

    sde = VPSDE()
    gmm = GaussianMixture(torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=torch.float64),
                          torch.tensor([[0.3, 0.1], [0.2, 0.4]], dtype=torch.float64),
                          torch.tensor([0.6, 0.4], dtype=torch.float64))
    score = gmm.score_fn(sde)
    x_T = sde.prior_sample((128, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_peer, nfe = run_scheduler("DEISMultistepScheduler", dict(solver_order=3), score, sde, x_T, steps)
    with numpy2_array_warnings_muted():
        sched = diffusers.DEISMultistepScheduler(num_train_timesteps=1000, solver_order=3,
                                                 trained_betas=vp_trained_betas(sde, 1000).numpy())
        sched.set_timesteps(steps)
    sigmas = torch.as_tensor(sched.sigmas, dtype=torch.float64)
    ts = sde.t_from_sigma_ratio(sigmas).clamp(sde.t_min, sde.t_max)   # float32 sigmas round t_max, t_min outwards
    x_ours = sample(score, sde, (128, 2), "deis", ts=ts, x_T=x_T, basis="log_rho", lower_order_final=True)
    assert nfe == steps
    # diffusers' float32 sigmas and coefficients (each some SCHEDULE_OPS roundings) enter each of `steps` updates, on
    # samples of size |x|; the other basis below differs by > 1e-3
    assert (x_ours - x_peer).abs().max() < roundoff(torch.float32, float(x_peer.abs().max()), ops=SCHEDULE_OPS * steps)
    tab = sample(score, sde, (128, 2), "deis", ts=ts, x_T=x_T, basis="t", lower_order_final=True)   # another method
    assert (tab - x_peer).abs().max() > 1e-3

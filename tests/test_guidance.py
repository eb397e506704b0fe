"""Classifier-free guidance: scale 0 is exactly the unconditional model, 1 exactly the conditional one, for any sampler."""
import pytest
import torch
from _tolerance import fan_in_ops, roundoff

import sdekit
from sdekit.guidance import guided_score
from sdekit.precond import Denoiser
from sdekit_models.unet import UNet


def _denoiser(num_classes=10, sde=None):
    torch.manual_seed(0)
    net = UNet((1, 8, 8), channels=8, channel_mult=(1, 2), num_res_blocks=1, num_classes=num_classes)
    for p in net.parameters():   # away from the zero initialisation, so that labels matter
        p.data.add_(0.05 * torch.randn_like(p))
    return Denoiser(net, sde or sdekit.VPSDE(), "eps").eval()


def test_scales_zero_and_one_are_exact_and_others_interpolate():
    # float64: other scales batch [x; x] into one call of 2B, whose kernels may sum in another order than the two
    # calls of B; in float64 that round-off is far below any mistake in the combination
    den = _denoiser().double()
    x, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.arange(6)
    t = torch.rand(6, dtype=torch.float64) * 0.9 + 0.05
    with torch.no_grad():
        uncond, cond = den(x, t), den(x, t, labels=y)
        assert (cond - uncond).abs().max() > 1e-3          # the labels matter, so the checks below can fail
        assert torch.equal(guided_score(den, y, 0.0)(x, t), uncond)
        assert torch.equal(guided_score(den, y, 1.0)(x, t), cond)
        for w in (0.5, 2.0, 4.0):
            tol = roundoff(torch.float64, (1 + 2 * w) * float(torch.maximum(uncond.abs(), cond.abs()).max()),
                           ops=fan_in_ops(den.net))
            torch.testing.assert_close(guided_score(den, y, w)(x, t), uncond + w * (cond - uncond), rtol=0, atol=tol)


@pytest.mark.parametrize("sampler", ["euler_maruyama", "heun", "ddim", "dpmpp_2m", "pc", "edm"])
def test_any_sampler_reproduces_the_unconditional_and_conditional_models(sampler):
    sde = sdekit.EDM(sigma_max=20.0) if sampler == "edm" else sdekit.VPSDE()
    den = _denoiser(sde=sde)
    y = torch.arange(4)
    cond = lambda x, t: den(x, t, labels=y)  # noqa: E731

    def run(fn):
        with torch.no_grad():
            return sdekit.sample(fn, sde, (4, 1, 8, 8), sampler=sampler, steps=4, generator=torch.Generator().manual_seed(3))

    assert torch.equal(run(guided_score(den, y, 0.0)), run(den))
    assert torch.equal(run(guided_score(den, y, 1.0)), run(cond))
    assert not torch.allclose(run(guided_score(den, y, 3.0)), run(cond))


def test_guidance_errors():
    uncond_net = _denoiser(num_classes=None)
    with pytest.raises(ValueError, match="class-conditional"):
        guided_score(uncond_net, torch.arange(2), 2.0)
    with pytest.raises(ValueError, match="finite"):
        guided_score(_denoiser(), torch.arange(2), float("nan"))
    fn = guided_score(_denoiser(), torch.arange(3), 2.0)
    with pytest.raises(ValueError, match="3 labels"):
        fn(torch.randn(2, 1, 8, 8), torch.rand(2))

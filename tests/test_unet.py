"""U-Net: output shapes over resolutions and channel counts, conditioning, clear errors, and capacity to overfit."""
import pytest
import torch

from sdekit_models.unet import UNet


@pytest.mark.parametrize("shape, options", [
    ((1, 8, 8), dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))),
    ((3, 16, 16), dict(channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), heads=2)),
    ((3, 32, 32), dict(channels=8, channel_mult=(1, 2, 2, 2), num_res_blocks=1, attn_resolutions=(8, 4))),
    ((1, 28, 28), dict(channels=8, channel_mult=(1, 2, 2), num_res_blocks=2)),
    ((2, 12, 20), dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, num_classes=3)),
], ids=["digits8", "rgb16", "rgb32", "mnist28", "nonsquare"])
def test_output_has_the_input_shape(shape, options):
    torch.manual_seed(0)
    net = UNet(shape, **options)
    for p in net.parameters():   # the output layers start at zero; perturb so that the check sees real values
        p.data.add_(0.01 * torch.randn_like(p))
    x = torch.randn(3, *shape)
    out = net(x, torch.rand(3))
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().sum() > 0
    assert net(x, torch.tensor(0.3)).shape == x.shape          # a scalar noise level is broadcast
    if options.get("num_classes"):
        y = torch.tensor([0, 1, 2])
        assert not torch.allclose(net(x, torch.rand(3), labels=y), net(x, torch.rand(3)))


def test_zero_output_at_initialisation():
    net = UNet((1, 8, 8), channels=16, channel_mult=(1, 2), num_res_blocks=1)
    assert net(torch.randn(2, 1, 8, 8), torch.rand(2)).abs().max() == 0


def test_labels_change_the_output_and_null_is_the_default():
    torch.manual_seed(0)
    net = UNet((1, 8, 8), channels=16, channel_mult=(1, 2), num_res_blocks=1, num_classes=10)
    for p in net.parameters():   # zero-initialised output layers would hide the labels
        p.data.add_(0.02 * torch.randn_like(p))
    x, c = torch.randn(4, 1, 8, 8), torch.rand(4)
    null = torch.full((4,), 10)
    assert torch.equal(net(x, c), net(x, c, labels=null))
    assert not torch.allclose(net(x, c, labels=torch.tensor([0, 1, 2, 3])), net(x, c))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="divide by"):
        UNet((1, 10, 10), channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        UNet((64,))
    net = UNet((1, 8, 8), channels=8, channel_mult=(1, 2), num_res_blocks=1)
    with pytest.raises(ValueError, match="expects x of shape"):
        net(torch.randn(2, 3, 8, 8), torch.rand(2))
    with pytest.raises(ValueError, match="without num_classes"):
        net(torch.randn(2, 1, 8, 8), torch.rand(2), labels=torch.tensor([0, 1]))
    cond = UNet((1, 8, 8), channels=8, channel_mult=(1, 2), num_res_blocks=1, num_classes=10)
    with pytest.raises(ValueError, match="null class"):
        cond(torch.randn(2, 1, 8, 8), torch.rand(2), labels=torch.tensor([0, 11]))


def test_overfits_a_tiny_batch():
    """Eight digits, each at a fixed noise level: the network must learn to denoise them almost exactly."""
    from sdekit.images import load_digits
    torch.manual_seed(0)
    x0 = load_digits().x[:8]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    c = torch.linspace(-1, 0.5, 8)
    x_in = x0 + 0.5 * noise
    net = UNet((1, 8, 8), channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_classes=10)
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    labels = torch.arange(8)
    first = None
    for _ in range(200):
        loss = (net(x_in, c, labels=labels) - x0).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.02 * first, (first, loss.item())


@pytest.mark.parametrize("channels, channel_mult", [(4, [1]), (8, [1]), (8, [1, 2]), (16, [1]), (6, [1, 1, 1, 1])])
def test_output_depends_on_noise_level_and_class_at_any_width(channels, channel_mult):
    """The noise level and the class must reach the output for narrow nets too (not only where GroupNorm groups
    hold several channels): changing either moves the output by a fair share of its size, as changing x does."""
    torch.manual_seed(0)
    net = UNet((1, 8, 8), channels=channels, channel_mult=channel_mult, num_res_blocks=1, num_classes=10)
    for p in net.parameters():   # random weights everywhere (the zero-initialised output layers would hide everything)
        p.data.add_(0.1 * torch.randn_like(p))
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        base = net(x, torch.full((4,), 0.1), labels=y)
        scale = base.abs().amax(dim=(1, 2, 3))
        moved = {"c_noise": net(x, torch.full((4,), 5.0), labels=y),
                 "labels": net(x, torch.full((4,), 0.1), labels=torch.tensor([4, 5, 6, 7])),
                 "x": net(torch.randn(4, 1, 8, 8), torch.full((4,), 0.1), labels=y)}
    for name, out in moved.items():
        change = (out - base).abs().amax(dim=(1, 2, 3)) / scale
        assert (change > 0.05).all(), (name, change.tolist())

"""The digits VAE example: estimator agreement, IWAE-K ordering on held-out digits, safe scales."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from sdekit.estimators import clamped_logvar_scale, softplus_scale

Z = 4.0
_spec = importlib.util.spec_from_file_location("vae_digits", Path(__file__).parents[1] / "examples" / "vae_digits.py")
vae = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vae)



@pytest.fixture(scope="module")
def digits():
    return vae.load_digits_binary(seed=0)


@pytest.mark.parametrize("kind", ["gaussian-pathwise", "concrete"])
def test_iwae_nondecreasing_in_K_and_above_elbo_on_held_out(digits, kind):
    x_train, x_test = digits
    with torch.random.fork_rng():
        model, curve = vae.train(kind, x_train, x_test, steps=300, eval_every=150, progress=False)
    assert curve["test_elbo"][-1] > curve["test_elbo"][0]          # it learned something
    log_w = model.log_weights(x_test, 200, torch.Generator().manual_seed(1))
    per_point = vae.iwae_curve(log_w, [1, 5, 25, 100])
    n = x_test.shape[0]
    ks = sorted(per_point)
    for k1, k2 in zip(ks, ks[1:]):
        d = per_point[k2] - per_point[k1]                             # paired over digits
        assert d.mean() > -Z * d.std() / math.sqrt(n), (k1, k2, d.mean().item())
    gap = per_point[100] - vae.elbo(log_w)
    assert gap.mean() > Z * gap.std() / math.sqrt(n) and (gap >= -1e-5).all()


def test_score_function_and_pathwise_agree_on_the_encoder_gradient(digits):
    x = digits[0][:32]
    torch.manual_seed(0)
    model = vae.VAE("gaussian")
    bias = model.encoder[-1].bias                                   # (2L,): mean and scale heads

    def grads(loss_fn, R, seed):
        gen, out = torch.Generator().manual_seed(seed), []
        for _ in range(R):
            model.zero_grad()
            loss_fn(model, x, gen).backward()
            out.append(bias.grad.clone())
        return torch.stack(out)                                      # (R, 2L)

    g_pw = grads(vae.loss_pathwise, 300, 1)
    g_sf = grads(lambda m, xb, g: vae.ScoreFunctionLoss()(m, xb, g), 300, 2)   # fresh: no baseline, plain REINFORCE
    se = torch.sqrt(g_pw.var(0) / len(g_pw) + g_sf.var(0) / len(g_sf))
    assert ((g_pw.mean(0) - g_sf.mean(0)).abs() / se).max() < Z
    assert g_sf.var(0).sum() > 10 * g_pw.var(0).sum()


@pytest.mark.parametrize("scale", ["softplus", "clamped_logvar"])
@pytest.mark.parametrize("raw_bias", [-1e4, 1e4])
def test_extreme_raw_scales_give_finite_gradients(digits, scale, raw_bias):
    x = digits[0][:16]
    torch.manual_seed(0)
    model = vae.VAE("gaussian", scale=scale)
    with torch.no_grad():
        last = model.encoder[-1]
        last.weight[model.dim:] = 0
        last.bias[model.dim:] = raw_bias                            # scale head pinned far out
    for loss_fn in (vae.loss_pathwise, vae.ScoreFunctionLoss()):
        model.zero_grad()
        loss = loss_fn(model, x, torch.Generator().manual_seed(0))
        loss.backward()
        assert torch.isfinite(loss)
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_the_naive_scale_is_what_breaks():
    raw = torch.tensor([-1e4, 0.0, 1e4], requires_grad=True)
    naive = torch.exp(0.5 * raw)                                    # 0 and inf: log sigma and 1/sigma blow up
    assert not torch.isfinite(torch.log(naive)).all()
    for safe in (softplus_scale(raw), clamped_logvar_scale(raw)):
        lp = (-0.5 * (0.3 / safe) ** 2 - torch.log(safe)).sum()
        (g,) = torch.autograd.grad(lp, raw)
        assert torch.isfinite(lp) and torch.isfinite(g).all() and (safe > 0).all()
    with pytest.raises(ValueError, match="min_scale"):
        softplus_scale(raw, min_scale=0.0)

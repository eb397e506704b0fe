"""Gaussian mixtures: the exact diffused score and density against autograd, quadrature and sampling."""
import pytest
import torch

from sdekit.data import TOY_DATASETS, GaussianMixture, check_finite, load_dataset, make_toy, ring
from sdekit.sde import EDM, VESDE, VPSDE, SubVPSDE


def _mixture():
    means = torch.tensor([[-1.0, 0.5], [1.5, -0.5], [0.0, 2.0]])
    covs = torch.stack([torch.tensor([[0.3, 0.1], [0.1, 0.2]]), torch.eye(2) * 0.05, torch.tensor([[0.5, -0.2], [-0.2, 0.4]])])
    return GaussianMixture(means, covs, torch.tensor([0.5, 0.2, 0.3]))


@pytest.mark.parametrize("sde", [VPSDE(), VPSDE(schedule="cosine"), SubVPSDE(), VESDE(), EDM()], ids=lambda s: repr(s)[:12])
def test_score_equals_autograd_of_log_density(sde, float64):
    gmm = _mixture()
    gen = torch.Generator().manual_seed(0)
    x = gmm.sample(64, generator=gen) * 1.3
    t = sde.t_min + (sde.t_max - sde.t_min) * torch.rand(64, generator=gen)
    xr = x.clone().requires_grad_()
    grad, = torch.autograd.grad(gmm.log_prob(xr, t, sde).sum(), xr)
    torch.testing.assert_close(gmm.score(x, t, sde), grad, rtol=1e-10, atol=1e-12)


def test_diffused_density_is_the_convolution(float64):
    """p_t(x) = E_{x0}[N(x; alpha x0, sigma^2 I)]: Monte Carlo over x0 against the closed form."""
    gmm, sde, t = _mixture(), VPSDE(), torch.tensor(0.3)
    alpha, sigma = sde.marginal(t)
    x0 = gmm.sample(200000, generator=torch.Generator().manual_seed(1))
    pts = torch.tensor([[0.0, 0.0], [1.0, -0.3], [-0.5, 1.2]])
    d2 = ((pts[:, None, :] - alpha * x0[None]) ** 2).sum(-1)
    kernel = torch.exp(-0.5 * d2 / sigma**2) / (2 * torch.pi * sigma**2)
    mc, se = kernel.mean(1), kernel.std(1) / 200000**0.5
    exact = gmm.log_prob(pts, t, sde).exp()
    assert ((mc - exact).abs() < 4 * se).all(), (mc, exact, se)


def test_log_prob_integrates_to_one(float64):
    gmm = _mixture()
    g = torch.linspace(-5, 5, 401)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    p = gmm.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).exp()
    assert abs(float(p.sum() * (g[1] - g[0]) ** 2) - 1.0) < 1e-6


def test_sample_moments(float64):
    gmm = _mixture()
    x = gmm.sample(200000, generator=torch.Generator().manual_seed(2))
    cov = gmm.covariance()
    se = (torch.diagonal(cov) / 200000).sqrt()
    assert ((x.mean(0) - gmm.mean()).abs() < 4 * se).all()
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.02, rtol=0.02)


def test_bad_mixture_inputs():
    with pytest.raises(ValueError, match="means"):
        GaussianMixture(torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.zeros(2, 2), 1.0, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        ring().score(torch.zeros(4, 3))


@pytest.mark.parametrize("name", sorted(TOY_DATASETS))
def test_toy_sets_are_seeded_and_finite(name):
    a = make_toy(name, 500, generator=torch.Generator().manual_seed(3))
    b = make_toy(name, 500, generator=torch.Generator().manual_seed(3))
    assert a.shape == (500, 2) and torch.equal(a, b) and torch.isfinite(a).all()
    assert a.abs().max() < 6


def test_dataset_errors():
    with pytest.raises(ValueError, match="unknown data set 'rings'"):
        load_dataset("rings", 10)
    with pytest.raises(ValueError, match="NaN/Inf"):
        check_finite(torch.tensor([[1.0, float("nan")]]), "data")

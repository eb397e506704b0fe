"""Probability-flow ODE likelihoods against exact Gaussian-mixture densities; bits/dim against exact discrete probabilities."""
from __future__ import annotations

import math

import pytest
import torch

import sdekit
from sdekit.likelihood import bits_per_dim, dequantize, log_likelihood


def mixture3d() -> sdekit.GaussianMixture:
    """Full-covariance 3-D mixture (so the Jacobian has off-diagonal terms)."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 3, 3, generator=g, dtype=torch.float64) * 0.4
    covs = A @ A.transpose(1, 2) + 0.1 * torch.eye(3, dtype=torch.float64)
    means = torch.tensor([[-1.5, 0.5, 0.0], [1.0, -1.0, 1.0]], dtype=torch.float64)
    return sdekit.GaussianMixture(means, covs, torch.tensor([0.6, 0.4], dtype=torch.float64))


def mixture2d() -> sdekit.GaussianMixture:
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]], dtype=torch.float64)
    covs = torch.tensor([[0.3, 0.1], [0.2, 0.4], [0.25, 0.25]], dtype=torch.float64)
    return sdekit.GaussianMixture(means, covs, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))


@pytest.mark.parametrize("sde", [sdekit.VPSDE(), sdekit.VESDE(), sdekit.EDM(), sdekit.SubVPSDE()], ids=lambda s: type(s).__name__)
def test_exact_divergence_matches_mixture_log_prob(sde):
    """With the exact score and exact p_{t_max} as the prior, log p_{t_min}(x) matches log_prob within 1e-3 nats
    (measured ~1e-7 at rtol = atol = 1e-7): what remains is the ODE solver's error only."""
    gmm = mixture3d()
    x = gmm.sample(24, generator=torch.Generator().manual_seed(1))
    prior = lambda z: gmm.log_prob(z, torch.tensor(sde.t_max, dtype=torch.float64), sde)
    logp = log_likelihood(gmm.score_fn(sde), sde, x, method="exact", rtol=1e-7, atol=1e-7, prior_log_prob=prior)
    exact = gmm.log_prob(x, torch.tensor(sde.t_min, dtype=torch.float64), sde)
    assert logp.shape == (24,)
    assert float((logp - exact).abs().max()) < 1e-3


def test_default_prior_is_the_sdes():
    """Without prior_log_prob the prior is sde.prior_log_prob; the difference is exactly the prior mismatch at t_max."""
    sde, gmm = sdekit.VPSDE(), mixture2d()
    x = gmm.sample(8, generator=torch.Generator().manual_seed(2))
    logp, info = log_likelihood(gmm.score_fn(sde), sde, x, rtol=1e-7, atol=1e-7, return_info=True)
    exact_prior = gmm.log_prob(info["x_T"], torch.tensor(sde.t_max, dtype=torch.float64), sde)
    exact = gmm.log_prob(x, torch.tensor(sde.t_min, dtype=torch.float64), sde)
    assert torch.allclose(logp - info["prior_log_prob"] + exact_prior, exact, atol=1e-3)
    assert info["nfe"] > 0 and info["accepted"] > 0


def test_wrong_score_gives_wrong_likelihood():
    """The comparison can fail: a score scaled by 1.1 is off by far more than 1e-3 nats."""
    sde, gmm = sdekit.VPSDE(), mixture2d()
    x = gmm.sample(8, generator=torch.Generator().manual_seed(3))
    prior = lambda z: gmm.log_prob(z, torch.tensor(sde.t_max, dtype=torch.float64), sde)
    logp = log_likelihood(lambda y, t: 1.1 * gmm.score(y, t, sde), sde, x, rtol=1e-6, atol=1e-6, prior_log_prob=prior)
    exact = gmm.log_prob(x, torch.tensor(sde.t_min, dtype=torch.float64), sde)
    assert float((logp - exact).abs().max()) > 0.05


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_agrees_within_standard_error(probe):
    """R = 48 independent probes per point: the mean estimate is within 4 standard errors of the exact value,
    and the standard error is not zero (the estimator is really random)."""
    sde, gmm = sdekit.VPSDE(), mixture3d()
    x = gmm.sample(4, generator=torch.Generator().manual_seed(4))
    R = 48
    xr = x.repeat_interleave(R, 0)
    prior = lambda z: gmm.log_prob(z, torch.tensor(sde.t_max, dtype=torch.float64), sde)
    est = log_likelihood(gmm.score_fn(sde), sde, xr, method="hutchinson", probe=probe,
                         generator=torch.Generator().manual_seed(5), rtol=1e-6, atol=1e-6, prior_log_prob=prior).reshape(4, R)
    exact = gmm.log_prob(x, torch.tensor(sde.t_min, dtype=torch.float64), sde)
    se = est.std(1) / math.sqrt(R)
    assert (se > 1e-4).all()
    assert ((est.mean(1) - exact).abs() <= 4 * se).all(), f"{est.mean(1)} vs {exact} (se {se})"


def test_hutchinson_with_explicit_probe_is_deterministic():
    sde, gmm = sdekit.VPSDE(), mixture2d()
    x = gmm.sample(4, generator=torch.Generator().manual_seed(6))
    probe = torch.randn(4, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    a = log_likelihood(gmm.score_fn(sde), sde, x, method="hutchinson", noise=probe, rtol=1e-5, atol=1e-5)
    b = log_likelihood(gmm.score_fn(sde), sde, x, method="hutchinson", noise=probe.clone(), rtol=1e-5, atol=1e-5)
    assert torch.equal(a, b)


def test_bad_likelihood_arguments():
    sde, gmm = sdekit.VPSDE(), mixture2d()
    x = gmm.sample(4)
    with pytest.raises(ValueError, match="unknown likelihood method"):
        log_likelihood(gmm.score_fn(sde), sde, x, method="trace")
    with pytest.raises(ValueError, match="unknown Hutchinson probe"):
        log_likelihood(gmm.score_fn(sde), sde, x, method="hutchinson", probe="sphere")
    with pytest.raises(ValueError, match="rtol must be"):
        log_likelihood(gmm.score_fn(sde), sde, x, rtol=0.0)
    with pytest.raises(ValueError, match="noise must have shape"):
        log_likelihood(gmm.score_fn(sde), sde, x, method="hutchinson", noise=torch.randn(4, 3, dtype=torch.float64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("method", ["exact", "hutchinson"])
def test_non_finite_data_is_refused_by_name_and_index(bad, method):
    """NaN/Inf in x (or in given Hutchinson probes) is a ValueError naming the argument and the first bad index,
    raised before any solving (it surfaced as a Cholesky failure or a FloatingPointError inside dopri5)."""
    sde, gmm = sdekit.VPSDE(), mixture2d()
    x = gmm.sample(4, generator=torch.Generator().manual_seed(0))
    x[2, 1] = bad
    calls = []
    score = lambda y, t: calls.append(1) or gmm.score(y, t, sde)
    with pytest.raises(ValueError, match=r"log_likelihood: x contains 1 NaN/Inf value\(s\), first at index \(2, 1\)"):
        log_likelihood(score, sde, x, method=method, generator=torch.Generator().manual_seed(0))
    assert calls == []
    if method == "hutchinson":
        probe = torch.ones(4, 2, dtype=torch.float64)
        probe[3, 0] = bad
        with pytest.raises(ValueError, match=r"log_likelihood: noise .*first at index \(3, 0\)"):
            log_likelihood(score, sde, x.nan_to_num(0.0, 0.0, 0.0), method=method, noise=probe)


# --- bits per dimension -----------------------------------------------------------------------------------
def test_bits_per_dim_uniform_density_is_log2_bins():
    """A uniform density on data_range makes every bin equally likely: exactly log2(n_bins) bits per dim."""
    D = 5
    for a, b in [(-1.0, 1.0), (0.0, 1.0), (0.0, 256.0)]:
        logp = torch.full((3,), -D * math.log(b - a), dtype=torch.float64)
        assert torch.allclose(bits_per_dim(logp, D, 256, (a, b)), torch.full((3,), 8.0, dtype=torch.float64))
    assert torch.allclose(bits_per_dim(torch.zeros(1, dtype=torch.float64), D, 256, (-1.0, 1.0)),
                          torch.tensor([7.0], dtype=torch.float64))  # the documented "+7" offset


def test_bits_per_dim_is_an_upper_bound_of_the_exact_discrete_probability():
    """Dequantized density N(0, 0.3^2) per dim on [-1, 1] with 16 bins: E_u[bpd] >= -log2 P(bin) / D (Jensen),
    and within 0.05 bits of it (the bins are narrow relative to the density)."""
    n_bins, s = 16, 0.3
    x_int = torch.tensor([[3, 8, 12], [7, 7, 8]])
    u = dequantize(x_int.repeat(4000, 1), n_bins, (-1.0, 1.0), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logp = (-0.5 * (u / s) ** 2 - math.log(s * math.sqrt(2 * math.pi))).sum(1)
    bpd = bits_per_dim(logp, 3, n_bins, (-1.0, 1.0)).reshape(4000, 2).mean(0)
    edges = lambda k: (torch.tensor(-1.0 + 2.0 * k / n_bins, dtype=torch.float64),
                       torch.tensor(-1.0 + 2.0 * (k + 1) / n_bins, dtype=torch.float64))
    cdf = lambda z: 0.5 * (1 + torch.erf(z / (s * math.sqrt(2))))
    for row in range(2):
        logP = sum(math.log(float(cdf(edges(k)[1]) - cdf(edges(k)[0]))) for k in x_int[row].tolist())
        exact_bpd = -logP / (3 * math.log(2))
        assert exact_bpd - 1e-3 <= float(bpd[row]) <= exact_bpd + 0.05, (float(bpd[row]), exact_bpd)


def test_dequantize_ranges_and_errors():
    y = dequantize(torch.tensor([0, 255]), 256, (-1.0, 1.0), generator=torch.Generator().manual_seed(0))
    assert -1.0 <= float(y[0]) < -1.0 + 2 / 256 and 1.0 - 2 / 256 <= float(y[1]) < 1.0
    with pytest.raises(ValueError, match="values must lie in"):
        dequantize(torch.tensor([256]), 256)

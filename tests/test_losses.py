"""DSM losses and preconditioning: exact-score optimality, prediction-type equivalences, EDM identities."""
import pytest
import torch
from torch import nn

from sdekit.data import GaussianMixture
from sdekit.losses import dsm_loss, loss_weight, sample_t
from sdekit.precond import PREDICTIONS, Denoiser
from sdekit.sde import EDM, VESDE, VPSDE


class ExactScoreNet(nn.Module):
    """Inverts the Denoiser's input scaling and returns the exact mixture score (prediction='score'), times `scale`."""

    def __init__(self, gmm, sde, sigma_data=1.0, scale=1.0, shift=0.0):
        super().__init__()
        self.gmm, self.sde, self.sigma_data, self.scale, self.shift = gmm, sde, sigma_data, scale, shift

    def forward(self, x_in, c_noise):
        ratio = torch.exp(4 * c_noise)
        t = self.sde.t_from_sigma_ratio(ratio)
        alpha, _ = self.sde.marginal(t)
        c_in = 1 / (ratio**2 + self.sigma_data**2).sqrt()
        x = x_in / c_in[:, None] * alpha[:, None]
        return self.scale * self.gmm.score(x, t, self.sde) + self.shift


@pytest.mark.parametrize("weighting", ["uniform", "likelihood", "snr", "min_snr", "edm"])
def test_dsm_is_minimised_by_the_exact_score(weighting, float64):
    gmm = GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.5]]), torch.tensor([0.1, 0.2]))
    sde = VPSDE()
    gen = torch.Generator().manual_seed(0)
    n = 50000
    x0 = gmm.sample(n, generator=gen)
    t = sample_t(sde, n, gen)
    noise = torch.randn(n, 2, generator=gen)

    def loss(**kw):
        return dsm_loss(Denoiser(ExactScoreNet(gmm, sde, **kw), sde, "score"), x0, t, noise, weighting)

    exact = loss()
    for kw in ({"scale": 0.9}, {"scale": 1.1}, {"shift": 0.05}, {"shift": -0.05}):
        diff = loss(**kw) - exact  # common random numbers: the difference has small variance
        assert diff.mean() > 4 * diff.std() / n**0.5, (kw, diff.mean(), diff.std())


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("sde", [VPSDE(), VESDE(), EDM()], ids=["vp", "ve", "edm"])
def test_prediction_types_read_out_consistently(prediction, sde, float64):
    """Whatever F outputs, x_t = alpha x0_hat + sigma eps_hat must hold exactly, and score = -eps_hat / sigma."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3))
    wrapped = lambda x, c: net(torch.cat([x, c[:, None]], 1))[:, :2]  # noqa: E731

    class Net(nn.Module):
        def forward(self, x, c):
            return wrapped(x, c)

    den = Denoiser(Net(), sde, prediction, sigma_data=0.5)
    x = torch.randn(16, 2) * 3
    t = sde.t_min + (sde.t_max - sde.t_min) * torch.rand(16)
    x0, eps = den.predict(x, t)
    alpha, sigma = sde.marginal(t)
    torch.testing.assert_close(alpha[:, None] * x0 + sigma[:, None] * eps, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(den.score(x, t), -eps / sigma[:, None])


def test_edm_denoiser_is_identity_as_sigma_goes_to_zero(float64):
    """c_skip -> 1 and c_out -> 0 as sigma -> 0, whatever the network's output scale."""
    sde = EDM()

    class Big(nn.Module):
        def forward(self, x, c):
            return 1e3 * torch.ones_like(x)

    den = Denoiser(Big(), sde, "edm", sigma_data=0.5)
    x = torch.randn(8, 2)
    for s, tol in ((1e-4, 0.3), (1e-7, 3e-4)):
        x0, _ = den.predict(x, torch.full((8,), s))
        assert (x0 - x).abs().max() < tol


def test_c_in_gives_unit_variance_input(float64):
    sde = EDM()
    seen = {}

    class Probe(nn.Module):
        def forward(self, x, c):
            seen["x"] = x
            return torch.zeros_like(x)

    den = Denoiser(Probe(), sde, "edm", sigma_data=0.5)
    for sigma in (0.01, 1.0, 50.0):
        x0 = 0.5 * torch.randn(200000, 1, generator=torch.Generator().manual_seed(1))
        x = x0 + sigma * torch.randn(200000, 1, generator=torch.Generator().manual_seed(2))
        den.predict(x, torch.full((200000,), sigma))
        assert abs(float(seen["x"].var()) - 1.0) < 0.02


def test_weights_match_their_definitions(float64):
    sde = VPSDE()
    t = torch.linspace(0.01, 1.0, 20)
    alpha, sigma = sde.marginal(t)
    snr = alpha**2 / sigma**2
    torch.testing.assert_close(loss_weight(sde, t, "snr"), 1 / snr)
    torch.testing.assert_close(loss_weight(sde, t, "likelihood"), sde.beta(t) / sigma**2)
    torch.testing.assert_close(loss_weight(sde, t, "min_snr", min_snr_gamma=5.0), snr.clamp(max=5) / snr)
    with pytest.raises(ValueError, match="unknown loss weighting"):
        loss_weight(sde, t, "nope")


def test_lognormal_times_have_the_requested_noise_levels(float64):
    sde = VPSDE()
    t = sample_t(sde, 100000, torch.Generator().manual_seed(0), "lognormal", P_mean=-1.2, P_std=1.2)
    log_sigma = torch.log(sde.sigma_ratio(t))
    assert abs(float(log_sigma.mean()) + 1.2) < 4 * 1.2 / 100000**0.5
    assert abs(float(log_sigma.std()) - 1.2) < 0.01


# --- sigma_data comes from the SDE ------------------------------------------------------------------------
class _Constant(nn.Module):
    """Records its input and returns a fixed output, so a denoiser's read-out coefficients can be read off."""

    def __init__(self, value: float = 0.7):
        super().__init__()
        self.value, self.seen = value, {}

    def forward(self, x, c):
        self.seen["x"], self.seen["c"] = x, c
        return torch.full_like(x, self.value)


@pytest.mark.parametrize("sigma_data", [0.5, 0.25])
def test_edm_preconditioning_uses_the_sdes_sigma_data(sigma_data, float64):
    """Denoiser(net, EDM(sigma_data=s), 'edm') must apply Karras et al.'s (2022, Table 1) closed forms with s:
    c_in = 1 / sqrt(sigma^2 + s^2), c_skip = s^2 / (sigma^2 + s^2), c_out = sigma s / sqrt(sigma^2 + s^2),
    c_noise = log(sigma) / 4, and the 'edm' loss weight (sigma^2 + s^2) / s^2 (default EDM() has s = 0.5;
    the denoiser used 1.0 unless told the value a second time)."""
    sde = EDM(sigma_data=sigma_data)
    net = _Constant(0.7)
    den = Denoiser(net, sde, "edm")
    assert den.sigma_data == sigma_data
    sigma = torch.tensor([0.01, 0.3, 1.0, 7.0, 80.0])
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    x0, _ = den.predict(x, sigma)
    var = sigma**2 + sigma_data**2
    c_in, c_skip, c_out = 1 / var.sqrt(), sigma_data**2 / var, sigma * sigma_data / var.sqrt()
    torch.testing.assert_close(net.seen["x"], c_in[:, None] * x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net.seen["c"], torch.log(sigma) / 4, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x0, c_skip[:, None] * x + c_out[:, None] * 0.7, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss_weight(sde, sigma, "edm"), var / sigma_data**2, rtol=1e-12, atol=1e-12)
    # dsm_loss weights by the same value: with eps_hat - eps known, the loss is w * mean (eps_hat - eps)^2
    x0_data, noise = torch.zeros(5, 3), torch.zeros(5, 3)
    x_t = sde.perturb(x0_data, sigma, noise)
    _, eps_hat = den.predict(x_t, sigma)
    torch.testing.assert_close(dsm_loss(den, x0_data, sigma, noise, "edm"), var / sigma_data**2 * eps_hat.pow(2).mean(1))


def test_sigma_data_defaults_and_contradictions():
    """No sigma_data: the SDE's (EDM) or 1.0 (SDEs without one). An explicit value is honoured where the SDE has
    none and must equal the SDE's where it has one; a different value is an error naming both."""
    assert Denoiser(_Constant(), EDM(), "edm").sigma_data == 0.5
    assert Denoiser(_Constant(), EDM(), "eps").sigma_data == 0.5
    assert Denoiser(_Constant(), EDM(sigma_data=0.75), "edm", sigma_data=0.75).sigma_data == 0.75
    assert Denoiser(_Constant(), VPSDE(), "edm").sigma_data == 1.0
    assert Denoiser(_Constant(), VPSDE(), "edm", sigma_data=0.7).sigma_data == 0.7
    with pytest.raises(ValueError, match=r"sigma_data=1.0 .*EDM's sigma_data=0.5"):
        Denoiser(_Constant(), EDM(), "edm", sigma_data=1.0)
    with pytest.raises(ValueError, match=r"sigma_data=1.0 .*EDM's sigma_data=0.5"):
        loss_weight(EDM(), torch.ones(3), "edm", sigma_data=1.0)
    torch.testing.assert_close(loss_weight(VPSDE(), torch.full((3,), 0.5), "edm", sigma_data=0.7),
                               loss_weight(VPSDE(), torch.full((3,), 0.5), "edm", sigma_data=0.7))

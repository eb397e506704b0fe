"""The torchsde and diffrax adapters agree with sdekit's native solvers; the JAX evaluation of every SDE's closed
forms, the exact mixture score and the export of a trained MLP equal torch; the replay of given increments is exact."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from _tolerance import SCHEDULE_OPS, mlp_roundoff, roundoff

import sdekit
from sdekit.precond import PREDICTIONS
from sdekit.samplers import sample
from sdekit.samplers.grids import make_grid
from sdekit.samplers.reverse_sde import euler_maruyama

pytest.importorskip("torchsde")
jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)   # float64 comparisons to round-off; affects only JAX users
import jax.numpy as jnp  # noqa: E402

from sdekit.interop import diffrax as dfx_interop  # noqa: E402
from sdekit.interop import torchsde as tsde_interop  # noqa: E402


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
    other = tsde_interop.reverse_sde(gmm.score_fn(sde), sde, x_T, ts, method="euler", noise=noise)
    assert torch.allclose(native, other, rtol=1e-12, atol=1e-12 * sde.prior_std)


def test_torchsde_stratonovich_heun_agrees_for_additive_noise():
    """Additive noise: Stratonovich Heun solves the same SDE; on the same increments it is close to EM and converges with it."""
    sde, gmm = sdekit.VPSDE(), mixture()
    errs = []
    for n in (100, 400):
        ts = make_grid("uniform", sde, n, dtype=torch.float64)
        x_T, noise = increments(n, seed=1)
        em = euler_maruyama(gmm.score_fn(sde), sde, x_T, ts, noise=noise)
        heun = tsde_interop.reverse_sde(gmm.score_fn(sde), sde, x_T, ts, method="heun", noise=noise)
        errs.append(float((em - heun).abs().mean()))
    assert errs[1] < errs[0] < 0.2


def test_torchsde_reproduces_mixture_with_its_own_brownian_motion():
    """srk (needs Levy area, so torchsde's own BrownianInterval) with the exact score: mode weights within 4.5 SE."""
    sde, gmm = sdekit.VPSDE(), mixture().to(torch.float32)
    n = 2000
    x_T = sde.prior_sample((n, 2), generator=torch.Generator().manual_seed(2))
    ts = make_grid("uniform", sde, 100)
    x = tsde_interop.reverse_sde(gmm.score_fn(sde), sde, x_T, ts, method="srk", generator=torch.Generator().manual_seed(3))
    frac = torch.bincount(gmm.responsibilities(x).argmax(1), minlength=3).double() / n
    w = gmm.weights.double()
    assert ((frac - w).abs() <= 4.5 * (w * (1 - w) / n).sqrt()).all(), frac


def test_torchsde_bad_arguments():
    sde, gmm = sdekit.VPSDE(), mixture()
    ts = make_grid("uniform", sde, 5, dtype=torch.float64)
    x_T, noise = increments(5)
    with pytest.raises(ValueError, match="unknown torchsde method"):
        tsde_interop.reverse_sde(gmm.score_fn(sde), sde, x_T, ts, method="rk4")
    with pytest.raises(ValueError, match="noise must have shape"):
        tsde_interop.reverse_sde(gmm.score_fn(sde), sde, x_T, ts, noise=noise[:4])
    with pytest.raises(ValueError, match="Levy area"):
        tsde_interop.reverse_sde(gmm.score_fn(sde), sde, x_T, ts, method="srk", noise=noise)


# --- diffrax ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sde", ALL_SDES, ids=lambda s: repr(s).partition("(")[0] + getattr(s, "schedule", ""))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sde_closed_forms_in_jax_equal_torch(sde, dtype):
    """One definition, two namespaces: every closed form of sdekit.sde evaluated with xp=jax.numpy equals torch,
    over the whole time range and, for the log-SNR inverse, over log-SNR in [-40, 40] (the softplus threshold
    and the SubVP branch point included)."""
    rtol = 1e-12 if dtype == torch.float64 else roundoff(torch.float32, ops=SCHEDULE_OPS)
    t = torch.linspace(sde.t_min, sde.t_max, 257, dtype=dtype)
    lam = torch.cat([torch.linspace(-40.0, 40.0, 801, dtype=dtype), torch.tensor([-20.0, 0.0, 20.0], dtype=dtype)])
    jt, jlam = dfx_interop.to_jax(t), dfx_interop.to_jax(lam)
    pairs = {"marginal": (sde.marginal(t), sde.marginal(jt, xp=jnp)),
             "drift_coef": (sde.drift_coef(t), sde.drift_coef(jt, xp=jnp)),
             "diffusion": (sde.diffusion(t), sde.diffusion(jt, xp=jnp)),
             "log_snr": (sde.log_snr(t), sde.log_snr(jt, xp=jnp)),
             "sigma_ratio": (sde.sigma_ratio(t), sde.sigma_ratio(jt, xp=jnp)),
             "t_from_log_snr": (sde.t_from_log_snr(lam), sde.t_from_log_snr(jlam, xp=jnp))}
    if hasattr(sde, "beta"):
        pairs["beta"] = (sde.beta(t), sde.beta(jt, xp=jnp))
    x = torch.randn(257, 3, generator=torch.Generator().manual_seed(0), dtype=dtype)
    score = torch.randn(257, 3, generator=torch.Generator().manual_seed(1), dtype=dtype)
    for pf in (False, True):
        pairs[f"reverse_drift pf={pf}"] = (sde.reverse_drift(x, t, score, pf),
                                           sde.reverse_drift(dfx_interop.to_jax(x), jt, dfx_interop.to_jax(score), pf, xp=jnp))
    for name, (want, got) in pairs.items():
        want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
        for w, g in zip(want, got):
            assert np.asarray(g).dtype == w.numpy().dtype, name
            # atol at the array's scale: the reverse drift f - g^2 score cancels where the two terms are close
            np.testing.assert_allclose(np.asarray(g), w.numpy(), rtol=rtol, atol=rtol * float(w.abs().max()), err_msg=name)


def test_jax_mixture_score_equals_torch():
    gmm = mixture()
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sde in ALL_SDES:
        for tt in (sde.t_min, 0.3 * sde.t_max, sde.t_max):
            js = dfx_interop.mixture_score(gmm, sde)(dfx_interop.to_jax(x * float(sde.marginal(torch.tensor(tt))[1] + 1)), tt)
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
    other = dfx_interop.reverse_sde(dfx_interop.mixture_score(gmm, sde), sde, x_T, ts, noise=noise)
    np.testing.assert_allclose(np.asarray(other), native.numpy(), rtol=1e-10, atol=1e-10 * sde.prior_std)


def test_diffrax_probability_flow_equals_rk45_reference():
    """Dopri5 with a PID controller at rtol 1e-9 lands within 1e-6 of sdekit's rk45 at rtol 1e-10, from the same x_T."""
    sde, gmm = sdekit.VPSDE(), mixture()
    x_T, _ = increments(1, seed=5)
    ref = sample(gmm.score_fn(sde), sde, (16, 2), "rk45", x_T=x_T, rtol=1e-10, atol=1e-10)
    out, stats = dfx_interop.probability_flow(dfx_interop.mixture_score(gmm, sde), sde, x_T, rtol=1e-9, atol=1e-9,
                                              return_stats=True)
    assert int(stats["num_accepted_steps"]) > 10
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=1e-6)


@pytest.fixture(scope="module")
def trained():
    """A sdekit_models.mlp.MLP trained for 150 Adam steps of denoising score matching on the mixture."""
    from sdekit.losses import dsm_loss
    from sdekit.precond import Denoiser
    from sdekit_models.mlp import MLP

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
    """The exported network and the exported score of the trained Denoiser equal torch: in float64 within the
    first-order round-off bound (about 1e-11 for the network, 1e-9 for the score; measured 1e-15), and in float32
    they stay float32 and within that bound at float32's eps. The bound follows each layer's fan-in and the Fourier
    features' argument size, so it holds whatever order a CPU's kernels sum in; in float32 it is wide (1e-3 to 2e-2
    for the network at given c_noise, a tenth of |score| for the score, whose c_noise = log(sigma/alpha)/4 may
    differ by an ulp, i.e. 1e-4 rad at the 2^8 pi frequency), so float64 is the sharp check."""
    import copy

    den32, sde = trained
    for dtype in (torch.float64, torch.float32):
        den = copy.deepcopy(den32).to(dtype)
        x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=dtype)
        c = torch.linspace(-2.0, 1.5, 64, dtype=dtype)
        params, apply = dfx_interop.export_mlp(den.net)
        with torch.no_grad():
            want = den.net(x, c).numpy()
        got = np.asarray(apply(params, dfx_interop.to_jax(x), dfx_interop.to_jax(c)))
        assert got.dtype == want.dtype == torch.empty((), dtype=dtype).numpy().dtype
        bound = 2 * mlp_roundoff(den.net, x, c, dtype).numpy()   # two evaluations, each within the bound
        assert (np.abs(got - want) <= bound).all(), (dtype, float(np.abs(got - want).max()), float(bound.min()))
        score_jax = dfx_interop.export_denoiser(den)
        for t in (0.05, 0.3, 0.9):
            with torch.no_grad():
                want = den(x, torch.tensor(t, dtype=dtype)).numpy()
            got = np.asarray(score_jax(dfx_interop.to_jax(x), np.dtype(want.dtype).type(t)))
            assert got.dtype == want.dtype
            np.testing.assert_allclose(got, want, rtol=0, atol=denoiser_roundoff(den, x, t, want, dtype))


def denoiser_roundoff(den, x: torch.Tensor, t: float, score: np.ndarray, dtype) -> float:
    """Round-off bound for two evaluations of Denoiser.score: the network's bound (its inputs x / alpha and
    log(sigma / alpha) / 4 carrying SCHEDULE_OPS roundings of the schedule's exp/expm1/sqrt/log) times the read-out's
    slope, plus its roundings on the terms it combines (x / sigma^2 and the output / sigma), whichever prediction."""
    from sdekit.precond import edm_coefficients

    tt = torch.tensor(t, dtype=torch.float64)
    alpha, sigma = (float(v) for v in den.sde.marginal(tt))
    c_in = float(edm_coefficients(torch.tensor(sigma / alpha, dtype=torch.float64), den.sigma_data)[2])
    x_in, c_noise = c_in * x.double() / alpha, torch.log(tt.new_tensor(sigma / alpha)) / 4
    with torch.no_grad():
        out = den.net(x_in.to(dtype), c_noise.to(dtype).expand(x.shape[0]))
        net_err = float(mlp_roundoff(den.net, x_in, c_noise, dtype,
                                     input_error=roundoff(dtype, x_in.abs(), SCHEDULE_OPS),
                                     c_noise_error=roundoff(dtype, 1.0 + c_noise.abs(), SCHEDULE_OPS)).max())
    terms = max(float(np.abs(score).max()), float(x.abs().max()) / sigma**2, float(out.abs().max()) / sigma)
    # |d score / d output| <= 1/sigma (eps, v, edm: c_out <= sigma/alpha), alpha/sigma^2 (x0), 1 (score)
    slope = {"x0": alpha / sigma**2, "score": 1.0}.get(den.prediction, 1 / sigma)
    return 2 * (net_err * slope + roundoff(dtype, terms, SCHEDULE_OPS))


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("sde", [sdekit.VPSDE(), sdekit.VESDE(sigma_max=5.0), sdekit.EDM(sigma_max=5.0)],
                         ids=lambda s: type(s).__name__)
def test_exported_denoiser_every_prediction_type(prediction, sde):
    """Every prediction type sdekit.precond knows (a new one fails here until the export mirrors it), under SDEs
    with and without signal decay, at small, middle and large noise."""
    from sdekit.precond import Denoiser
    from sdekit_models.mlp import MLP

    torch.manual_seed(1)
    net = MLP(2, hidden=32, depth=2)
    torch.nn.init.normal_(net.out.weight, std=0.3)
    den = Denoiser(net, sde, prediction=prediction, sigma_data=None if isinstance(sde, sdekit.EDM) else 0.7)
    den = den.double()   # the read-out formula is the point, so float64: round-off ~1e-14, any slip O(1)
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * float(sde.prior_std)
    export = dfx_interop.export_denoiser(den)
    for t in (sde.t_min + 0.05 * (sde.t_max - sde.t_min), 0.4 * sde.t_max, sde.t_max):
        with torch.no_grad():
            want = den(x, torch.tensor(t, dtype=torch.float64)).numpy()
        got = np.asarray(export(dfx_interop.to_jax(x), np.float64(t)))
        np.testing.assert_allclose(got, want, rtol=0, atol=denoiser_roundoff(den, x, t, want, torch.float64))


def test_diffrax_pf_ode_with_exported_mlp_matches_torch(trained):
    """End to end in float64: PF-ODE of the exported trained MLP (diffrax Dopri5) vs the torch model (sdekit rk45),
    both at rtol = atol = 1e-8, agree within 1e-5."""
    import copy

    den, sde = trained
    den = copy.deepcopy(den).double()
    x_T, _ = increments(1, seed=6)
    with torch.no_grad():
        ref = sample(den, sde, (16, 2), "rk45", x_T=x_T, rtol=1e-8, atol=1e-8)
    out = dfx_interop.probability_flow(dfx_interop.export_denoiser(den), sde, x_T, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=1e-5)


def test_diffrax_bad_arguments():
    sde, gmm = sdekit.VPSDE(), mixture()
    ts = make_grid("uniform", sde, 5, dtype=torch.float64)
    x_T, noise = increments(5)
    score = dfx_interop.mixture_score(gmm, sde)
    with pytest.raises(ValueError, match="noise must have shape"):
        dfx_interop.reverse_sde(score, sde, x_T, ts, noise=noise[:, :3])
    with pytest.raises(ValueError, match="needs noise= or key="):
        dfx_interop.reverse_sde(score, sde, x_T, ts)
    with pytest.raises(ValueError, match="rtol"):
        dfx_interop.probability_flow(score, sde, x_T, rtol=0.0)
    with pytest.raises(TypeError, match="expects a sdekit_models.mlp.MLP"):
        dfx_interop.export_mlp(torch.nn.Linear(2, 2))


# --- given increments: one replay per framework ---------------------------------------------------------------
def test_given_increments_replay_exactly_in_both_frameworks():
    """Over each grid interval both replays return the stored increment itself (bit for bit), between grid points
    they interpolate the cumulative sums, and a strict torchsde replay refuses a query off the grid."""
    ts = torch.tensor([0.0, 0.1, 0.25, 0.7, 1.0], dtype=torch.float64)
    dW = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    W = torch.cat([torch.zeros_like(dW[:1]), dW.cumsum(0)])
    tbm = tsde_interop.GridBrownian(ts, dW, strict=False)
    jbm = dfx_interop.GivenIncrements(dfx_interop.to_jax(ts), dfx_interop.to_jax(dW))
    for i in range(4):
        assert torch.equal(tbm(ts[i], ts[i + 1]), dW[i])
        assert np.array_equal(np.asarray(jbm.evaluate(ts[i].item(), ts[i + 1].item())), dW[i].numpy())
    mid = 0.5 * (ts[2] + ts[3])
    want = 0.5 * (W[2] + W[3])
    torch.testing.assert_close(tbm(mid), want, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(np.asarray(jbm.evaluate(mid.item())), want.numpy(), rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(np.asarray(jbm.evaluate(ts[1].item(), mid.item())), (want - W[1]).numpy(), rtol=1e-13, atol=1e-14)
    with pytest.raises(ValueError, match="not one grid interval"):
        tsde_interop.GridBrownian(ts, dW, strict=True)(ts[1], mid)


def test_diffrax_path_gradients_bad_arguments():
    from sdekit.sensitivity.problems import make_problem

    pb = make_problem("gbm")
    ts = pb.ts(4)
    x0 = pb.x0(3, torch.Generator().manual_seed(0))
    dW = torch.randn(4, 3, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown scheme"):
        dfx_interop.path_gradients(pb.xp_fields, x0, pb.theta, ts, dW, pb.loss, "rk4")
    with pytest.raises(ValueError, match="increasing"):
        dfx_interop.path_gradients(pb.xp_fields, x0, pb.theta, ts.flip(0), dW, pb.loss)
    with pytest.raises(ValueError, match="dW must be"):
        dfx_interop.path_gradients(pb.xp_fields, x0, pb.theta, ts, dW[:3], pb.loss)


# --- each adapter is the only importer of its framework, and names its extra when it is missing -----------------
@pytest.mark.parametrize("adapter, blocked, extra", [("sdekit.interop.diffrax", "diffrax", "jax"),
                                                    ("sdekit.interop.diffrax", "jax", "jax"),
                                                    ("sdekit.interop.torchsde", "torchsde", "torchsde")])
def test_adapter_without_its_extra_names_it(monkeypatch, adapter, blocked, extra):
    import importlib

    monkeypatch.setitem(sys.modules, blocked, None)          # `import blocked` now fails as if not installed
    monkeypatch.delitem(sys.modules, adapter, raising=False)
    with pytest.raises(ImportError, match=rf"{adapter} needs .*pip install 'sdekit\[{extra}\]'"):
        importlib.import_module(adapter)


def test_adjoint_without_torchsde_names_the_extra(monkeypatch):
    from sdekit.sensitivity import adjoint
    from sdekit.sensitivity.problems import make_problem

    pb = make_problem("gbm")
    ts, x0 = pb.ts(4), pb.x0(3, torch.Generator().manual_seed(0))
    dW = torch.randn(4, 3, 1, dtype=torch.float64)
    monkeypatch.setitem(sys.modules, "torchsde", None)
    monkeypatch.delitem(sys.modules, "sdekit.interop.torchsde", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'sdekit\[torchsde\]'"):
        adjoint.mean_gradient(pb.f, pb.g, x0, pb.theta, ts, dW, pb.loss, "euler", backend="torchsde")


def test_only_the_adapters_import_their_frameworks():
    """Source check: outside sdekit/interop/, no module of the library imports jax, diffrax, lineax or torchsde."""
    import ast
    from pathlib import Path

    root = Path(sdekit.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.parent.name == "interop":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{path.relative_to(root)}: {n}" for n in names
                          if n.partition(".")[0] in ("jax", "jaxlib", "diffrax", "lineax", "equinox", "torchsde")]
    assert not offenders, offenders

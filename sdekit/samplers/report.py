"""Accuracy per network evaluation of every sampler, on an exact Gaussian-mixture oracle (`run_report`).

Deterministic samplers (probability-flow ODE solvers, ddim at eta=0, edm without churn) are compared
with a float64 rk45 reference at rtol = atol = 1e-9 started from the same x_T: the error is the RMS
over the batch of ||x - x_ref||. Their fitted log-log slope is the observed convergence order, shown
beside the order each sampler declares in the registry (`SamplerSpec.order`).
Stochastic samplers are compared with the mixture itself (diffused to t_min) by the sliced
Wasserstein distance; the distance between two exact sample sets of the same size is reported as
the noise floor below which no sampler can be told apart from exact sampling.

`run_report` returns the rows (sampler, label, kind, steps, nfe, error, time_s), the slopes and the declared
orders; `sdekit samplers` (sdekit.commands.samplers) writes them as samplers.json, samplers.md (the table) and
samplers.png (log-log error against NFE).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..data import EXACT_MIXTURES, GaussianMixture
from ..sde import make_sde
from . import SAMPLERS, sample

__all__ = ["run_report", "default_mixture", "VARIANTS"]

# (label, sampler, options, kind): every registered sampler at least once.
VARIANTS = [
    ("ode_euler", "ode_euler", {}, "deterministic"),
    ("heun", "heun", {}, "deterministic"),
    ("rk4", "rk4", {}, "deterministic"),
    ("rk45", "rk45", {}, "deterministic"),
    ("ddim", "ddim", {"eta": 0.0}, "deterministic"),
    ("dpmpp_2m", "dpmpp_2m", {}, "deterministic"),
    ("dpmpp_3m", "dpmpp_3m", {}, "deterministic"),
    ("unipc", "unipc", {}, "deterministic"),
    ("unipc (bh1)", "unipc", {"variant": "bh1"}, "deterministic"),
    ("deis", "deis", {}, "deterministic"),
    ("edm (S_churn=0)", "edm", {"S_churn": 0.0}, "deterministic"),
    ("euler_maruyama", "euler_maruyama", {}, "stochastic"),
    ("pc (snr=0.16)", "pc", {"snr": 0.16, "n_corrector": 1}, "stochastic"),
    ("ddim (eta=1)", "ddim", {"eta": 1.0}, "stochastic"),
    ("edm (S_churn=40)", "edm", {"S_churn": 40.0, "S_tmin": 0.05, "S_tmax": 50.0}, "stochastic"),
]
RK45_TOLERANCES = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)


def default_mixture(dtype=torch.float64) -> GaussianMixture:
    """Three anisotropic, unequally weighted 2-D modes: curved probability-flow paths, exact score."""
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]], dtype=dtype)
    covs = torch.tensor([[0.3, 0.1], [0.2, 0.4], [0.25, 0.25]], dtype=dtype)
    return GaussianMixture(means, covs, torch.tensor([0.5, 0.3, 0.2], dtype=dtype))


def _sliced_wasserstein(x, y, generator):
    from ..metrics import sliced_wasserstein
    return sliced_wasserstein(x, y, n_projections=128, generator=generator)


def _nfe_per_step(name: str, options: dict, score, sde) -> int:
    _, info = sample(score, sde, (1, 2), name, steps=1, return_info=True, dtype=torch.float64,
                     generator=torch.Generator().manual_seed(0), **options)
    return info["nfe"]


def _slope(rows: list[dict]) -> float | None:
    pts = [(r["nfe"], r["error"]) for r in rows if r["error"] > 0]
    if len(pts) < 2:
        return None
    n, e = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(-np.polyfit(n, e, 1)[0])


def run_report(sde_name: str = "vp", nfes=(10, 20, 40, 80, 160, 320), batch: int = 256, n_samples: int = 4000,
               seed: int = 0, mixture: str = "default", progress: bool = True) -> dict:
    """Run every variant over the NFE budgets; returns the JSON-ready result dict."""
    from tqdm.auto import tqdm

    sde = make_sde(sde_name)
    gmm = default_mixture() if mixture == "default" else EXACT_MIXTURES[mixture]().to(torch.float64)
    score = gmm.score_fn(sde)
    d = gmm.dim
    gen = lambda k: torch.Generator().manual_seed(seed + k)
    x_T = sde.prior_sample((batch, d), generator=gen(0), dtype=torch.float64)
    ref = sample(score, sde, (batch, d), "rk45", x_T=x_T, rtol=1e-9, atol=1e-9)
    # Exact samples of p_{t_min}: mixture samples pushed through the forward marginal.
    t_min = torch.tensor(sde.t_min, dtype=torch.float64)
    alpha, sigma = sde.marginal(t_min)
    exact = lambda k: (alpha * gmm.sample(n_samples, generator=gen(k))                          # noqa: E731
                       + sigma * torch.randn(n_samples, d, generator=gen(k + 1), dtype=torch.float64))
    floor = _sliced_wasserstein(exact(10), exact(20), gen(30))

    rows = []
    jobs = []
    for label, name, options, kind in VARIANTS:
        if name == "rk45":
            jobs += [(label, name, {**options, "rtol": tol, "atol": tol}, kind, None) for tol in RK45_TOLERANCES]
            continue
        per_step = _nfe_per_step(name, options, score, sde)
        steps = sorted({max(1, round(n / per_step)) for n in nfes})
        jobs += [(label, name, options, kind, s) for s in steps]
    for label, name, options, kind, steps in tqdm(jobs, desc="samplers", disable=not progress):
        t0 = time.perf_counter()
        if kind == "deterministic":
            x, info = sample(score, sde, (batch, d), name, steps=steps, x_T=x_T, return_info=True, **options)
            error = float((x - ref).pow(2).sum(1).mean().sqrt())
        else:
            x, info = sample(score, sde, (n_samples, d), name, steps=steps, generator=gen(100), dtype=torch.float64,
                             return_info=True, **options)
            error = _sliced_wasserstein(x, exact(200), gen(300))
        rows.append(dict(label=label, sampler=name, kind=kind, options={k: v for k, v in options.items()},
                         steps=steps, nfe=info["nfe"], error=error, time_s=time.perf_counter() - t0,
                         **({"accepted": info["accepted"], "rejected": info["rejected"]} if "accepted" in info else {})))
    slopes, orders = {}, {}
    for label, name, _, kind in VARIANTS:
        if kind == "deterministic" and name != "rk45":
            slopes[label] = _slope([r for r in rows if r["label"] == label])
            orders[label] = SAMPLERS[name].order
    return dict(config=dict(sde=sde.config(), mixture=mixture, nfes=list(nfes), batch=batch, n_samples=n_samples, seed=seed,
                            reference="rk45 float64 rtol=atol=1e-9 from the same x_T",
                            stochastic_metric="sliced Wasserstein (128 projections) to exact samples of p_{t_min}"),
                rows=rows, slopes=slopes, orders=orders, sw_noise_floor=floor)

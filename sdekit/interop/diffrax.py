"""Reverse SDE and probability-flow ODE in JAX with diffrax solvers and step-size controllers.

JAX is imported here and nowhere else in sdekit. What is provided:
  - `sde_coefficients(sde)`: alpha_t, sigma_t, f(t), g(t) of every sdekit SDE as JAX functions;
  - `mixture_score(gmm, sde)`: the exact diffused score of a GaussianMixture, in JAX;
  - `export_mlp(net)` / `export_denoiser(denoiser)`: a trained `models.mlp.MLP` (and the
    `sdekit.precond.Denoiser` around it) as pure JAX functions of the copied torch weights;
  - `reverse_sde(...)` and `probability_flow(...)`: diffeqsolve in s = -t (forward time), so any
    diffrax solver and controller applies. With explicit `noise` the Brownian increment over grid
    interval i is sqrt(t_i - t_{i+1}) noise[i], as in `sdekit.samplers.euler_maruyama`.

JAX score functions have the signature score(x: (B, *S), t: () scalar) -> (B, *S). Use float64
(`jax.config.update("jax_enable_x64", True)`) to compare with torch float64 to round-off.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import diffrax
import jax
import jax.numpy as jnp
import lineax
import numpy as np

from ..sde import EDM, SDE, VESDE, SubVPSDE, VPSDE

__all__ = ["sde_coefficients", "mixture_score", "export_mlp", "export_denoiser", "reverse_sde", "probability_flow",
           "to_jax"]


def to_jax(a) -> jax.Array:
    """A torch tensor (any device), numpy array or JAX array as a JAX array (dtype kept where x64 allows)."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return jnp.asarray(a)


# --- schedules ------------------------------------------------------------------------------------------
def sde_coefficients(sde: SDE) -> dict[str, Callable]:
    """JAX versions of sde.marginal (-> (alpha, sigma)), sde.drift_coef and sde.diffusion for scalar or array t."""
    if isinstance(sde, VPSDE):  # includes SubVPSDE
        b0, db, s = sde.beta_min, sde.beta_max - sde.beta_min, sde.cosine_s
        cosine = sde.schedule == "cosine"
        tan0 = math.tan(math.pi / 2 * s / (1 + s))

        def log_alpha(t):
            if cosine:  # log(cos(phase_0 + d) / cos(phase_0)) without cancellation, as in sdekit.sde.VPSDE
                d = math.pi / 2 / (1 + s) * t
                return jnp.log1p(-2.0 * jnp.sin(0.5 * d) ** 2 - tan0 * jnp.sin(d))
            return -0.5 * (b0 * t + 0.5 * db * t**2)

        def beta(t):
            if cosine:
                return math.pi / (1 + s) * jnp.tan(math.pi / 2 * (t + s) / (1 + s))
            return b0 + t * db

        if isinstance(sde, SubVPSDE):
            marginal = lambda t: (jnp.exp(log_alpha(t)), -jnp.expm1(2 * log_alpha(t)))
            diffusion = lambda t: jnp.sqrt(beta(t) * -jnp.expm1(4 * log_alpha(t)))
        else:
            marginal = lambda t: (jnp.exp(log_alpha(t)), jnp.sqrt(-jnp.expm1(2 * log_alpha(t))))
            diffusion = lambda t: jnp.sqrt(beta(t))
        return dict(marginal=marginal, drift_coef=lambda t: -0.5 * beta(t), diffusion=diffusion)
    if isinstance(sde, VESDE):
        lr, smin = math.log(sde.sigma_max / sde.sigma_min), sde.sigma_min
        return dict(marginal=lambda t: (jnp.ones_like(t), smin * jnp.sqrt(jnp.expm1(2 * t * lr))),
                    drift_coef=lambda t: jnp.zeros_like(t), diffusion=lambda t: smin * jnp.exp(t * lr) * math.sqrt(2 * lr))
    if isinstance(sde, EDM):
        return dict(marginal=lambda t: (jnp.ones_like(t), t), drift_coef=lambda t: jnp.zeros_like(t),
                    diffusion=lambda t: jnp.sqrt(2 * t))
    raise TypeError(f"no JAX coefficients for SDE type {type(sde).__name__}; expected VPSDE, SubVPSDE, VESDE or EDM")


# --- score functions ---------------------------------------------------------------------------------------
def mixture_score(gmm, sde: SDE) -> Callable:
    """Exact grad_x log p_t(x) of a GaussianMixture diffused by sde: score(x: (B, d), t: ()) -> (B, d)."""
    coef = sde_coefficients(sde)
    means, covs, logw = to_jax(gmm.means), to_jax(gmm.covs), jnp.log(to_jax(gmm.weights))
    eye = jnp.eye(means.shape[1], dtype=means.dtype)

    def score(x, t):
        alpha, sigma = coef["marginal"](jnp.asarray(t, x.dtype))
        cov_t = alpha**2 * covs + sigma**2 * eye                            # (K, d, d)
        prec = jnp.linalg.inv(cov_t)
        _, logdet = jnp.linalg.slogdet(cov_t)
        diff = x[:, None, :] - alpha * means                                # (B, K, d)
        prec_diff = jnp.einsum("kij,bkj->bki", prec, diff)
        log_terms = logw - 0.5 * (diff * prec_diff).sum(-1) - 0.5 * logdet   # constants cancel in the softmax
        r = jax.nn.softmax(log_terms, axis=1)
        return -(r[..., None] * prec_diff).sum(1)

    return score


def _linear(layer) -> dict:
    return {"w": to_jax(layer.weight).T, "b": to_jax(layer.bias)}


def export_mlp(net) -> tuple[dict, Callable]:
    """Copy a `models.mlp.MLP` into (params, apply) with apply(params, x: (B, d), c_noise: (B,) or ()) -> (B, d).

    The architecture is read from the module (Fourier features of c_noise, input layer on [x, emb],
    time projections re-injected before each hidden layer, SiLU, linear output), so the JAX function
    computes the same numbers as net.forward up to floating-point reassociation.
    """
    needed = ("time", "inp", "time_proj", "hidden_layers", "out")
    if not all(hasattr(net, n) for n in needed):
        raise TypeError(f"export_mlp expects a models.mlp.MLP (attributes {needed}), got {type(net).__name__}")
    params = {
        "freqs": to_jax(net.time.freqs),
        "inp": _linear(net.inp),
        "time_proj": [_linear(l) for l in net.time_proj],
        "hidden": [_linear(l) for l in net.hidden_layers],
        "out": _linear(net.out),
    }

    def apply(p, x, c_noise):
        c = jnp.broadcast_to(jnp.asarray(c_noise, x.dtype), (x.shape[0],))
        angles = c[:, None] * p["freqs"].astype(x.dtype)[None, :] * math.pi
        emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1)
        dense = lambda l, h: h @ l["w"].astype(x.dtype) + l["b"].astype(x.dtype)
        h = jax.nn.silu(dense(p["inp"], jnp.concatenate([x, emb], -1)))
        for lin, proj in zip(p["hidden"], p["time_proj"]):
            h = jax.nn.silu(dense(lin, h) + dense(proj, emb))
        return dense(p["out"], h)

    return params, apply


def export_denoiser(denoiser) -> Callable:
    """A `sdekit.precond.Denoiser` wrapping an MLP as a JAX score(x: (B, d), t: ()) -> (B, d).

    Mirrors Denoiser.predict: network input c_in x / alpha and c_noise = log(sigma/alpha) / 4, then the
    prediction type's read-out to eps_hat, and score = -eps_hat / sigma_t.
    """
    params, apply = export_mlp(denoiser.net)
    coef = sde_coefficients(denoiser.sde)
    kind, sd = denoiser.prediction, denoiser.sigma_data

    def score(x, t):
        a, s = coef["marginal"](jnp.asarray(t, x.dtype))
        ratio = s / a
        var = ratio**2 + sd**2
        c_skip, c_out, c_in = sd**2 / var, ratio * sd / jnp.sqrt(var), 1 / jnp.sqrt(var)
        out = apply(params, c_in * (x / a), jnp.log(ratio) / 4)
        if kind == "eps":
            eps = out
        elif kind == "x0":
            eps = (x - a * out) / s
        elif kind == "v":
            eps = (s * x + a * out) / (a**2 + s**2)
        elif kind == "score":
            eps = -s * out
        elif kind == "edm":
            eps = (x - a * (c_skip * (x / a) + c_out * out)) / s
        else:
            raise ValueError(f"unknown prediction type {kind!r}")
        return -eps / s

    return score


# --- solves -------------------------------------------------------------------------------------------------
class _GivenIncrements(diffrax.AbstractPath):
    """Control path whose increment over grid interval [s_i, s_{i+1}] is dW[i]; W is piecewise linear between."""

    grid: jax.Array      # (N+1,) increasing
    dW: jax.Array        # (N, D)

    @property
    def t0(self):
        return self.grid[0]

    @property
    def t1(self):
        return self.grid[-1]

    def _index(self, t):
        return jnp.clip(jnp.searchsorted(self.grid, t, side="right") - 1, 0, self.dW.shape[0] - 1)

    def evaluate(self, t0, t1=None, left=True):
        del left
        if t1 is not None:
            i = self._index(t0)
            # One step per interval (StepTo on the grid): return the stored increment itself, not a difference of sums.
            exact = jnp.isclose(t1, self.grid[i + 1], rtol=1e-12, atol=0) & jnp.isclose(t0, self.grid[i], rtol=1e-12, atol=0)
            return jnp.where(exact, self.dW[i], self.evaluate(t1) - self.evaluate(t0))
        W = jnp.concatenate([jnp.zeros_like(self.dW[:1]), jnp.cumsum(self.dW, 0)], 0)
        i = self._index(t0)
        frac = (t0 - self.grid[i]) / (self.grid[i + 1] - self.grid[i])
        return W[i] + frac * self.dW[i]


def _reverse_terms(score: Callable, sde: SDE, shape: tuple, probability_flow: bool):
    coef = sde_coefficients(sde)
    half = 0.5 if probability_flow else 1.0

    def drift(s, y, args):
        t = -s
        x = y.reshape(shape)
        v = coef["drift_coef"](t) * x - half * coef["diffusion"](t) ** 2 * score(x, t)
        return -v.reshape(-1)                                      # d/ds = -d/dt

    def diffusion(s, y, args):
        return lineax.DiagonalLinearOperator(coef["diffusion"](-s) * jnp.ones_like(y))

    return drift, diffusion


def reverse_sde(score: Callable, sde: SDE, x, ts, *, noise=None, key: jax.Array | None = None,
                solver: diffrax.AbstractSolver | None = None, stepsize_controller=None, dt0: float | None = None,
                brownian_tol: float | None = None, max_steps: int = 100_000) -> jax.Array:
    """Reverse SDE from ts[0] to ts[-1] with diffrax; returns x at ts[-1] as a JAX array.

    score: JAX score(x: (B, *S), t: ()); x: (B, *S) (torch, numpy or JAX); ts: (N+1,) decreasing.
    noise: (N, B, *S) standard normals -> increments sqrt(t_i - t_{i+1}) noise[i], stepping exactly on
    the grid (StepTo). Otherwise a VirtualBrownianTree from key, stepping on the grid unless
    stepsize_controller/dt0 say otherwise. solver defaults to diffrax.Euler() (Euler-Maruyama).
    """
    x, ts = to_jax(x), to_jax(ts).astype(to_jax(x).dtype)
    if ts.ndim != 1 or ts.shape[0] < 2 or not bool(jnp.all(ts[1:] < ts[:-1])):
        raise ValueError(f"ts must be a strictly decreasing 1-D grid with at least 2 points, got shape {ts.shape}")
    shape, grid, n = x.shape, -ts, ts.shape[0] - 1
    drift, diffusion = _reverse_terms(score, sde, shape, probability_flow=False)
    if noise is not None:
        noise = to_jax(noise).astype(x.dtype)
        if noise.shape != (n, *shape):
            raise ValueError(f"noise must have shape ({n}, {', '.join(map(str, shape))}), got {noise.shape}")
        control = _GivenIncrements(grid, jnp.sqrt(grid[1:] - grid[:-1])[:, None] * noise.reshape(n, -1))
        stepsize_controller, dt0 = diffrax.StepTo(ts=grid), None
    else:
        if key is None:
            raise ValueError("reverse_sde needs noise= or key= (a jax.random key) for the Brownian motion")
        tol = brownian_tol if brownian_tol is not None else float(jnp.min(grid[1:] - grid[:-1])) / 8
        control = diffrax.VirtualBrownianTree(grid[0], grid[-1], tol=tol, shape=(int(np.prod(shape)),), key=key)
        if stepsize_controller is None and dt0 is None:
            stepsize_controller = diffrax.StepTo(ts=grid)
    terms = diffrax.MultiTerm(diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion, control))
    sol = diffrax.diffeqsolve(terms, solver or diffrax.Euler(), t0=grid[0], t1=grid[-1], dt0=dt0, y0=x.reshape(-1),
                              stepsize_controller=stepsize_controller or diffrax.ConstantStepSize(),
                              saveat=diffrax.SaveAt(t1=True), max_steps=max_steps)
    return sol.ys[-1].reshape(shape)


def probability_flow(score: Callable, sde: SDE, x, *, t_start: float | None = None, t_end: float | None = None,
                     solver: diffrax.AbstractSolver | None = None, rtol: float = 1e-5, atol: float = 1e-5,
                     stepsize_controller=None, dt0: float | None = None, max_steps: int = 100_000,
                     return_stats: bool = False) -> Any:
    """Probability-flow ODE from t_start (default sde.t_max) to t_end (default sde.t_min) with diffrax.

    solver defaults to diffrax.Dopri5() with a PIDController(rtol, atol); pass any solver/controller
    (e.g. diffrax.Heun() with ConstantStepSize and dt0). Returns x at t_end (and diffrax's stats).
    """
    if not rtol > 0 or not atol >= 0:
        raise ValueError(f"need rtol > 0 and atol >= 0, got rtol={rtol}, atol={atol}")
    x = to_jax(x)
    t_start = sde.t_max if t_start is None else float(t_start)
    t_end = sde.t_min if t_end is None else float(t_end)
    drift, _ = _reverse_terms(score, sde, x.shape, probability_flow=True)
    controller = stepsize_controller or diffrax.PIDController(rtol=rtol, atol=atol)
    sol = diffrax.diffeqsolve(diffrax.ODETerm(drift), solver or diffrax.Dopri5(), t0=-t_start, t1=-t_end, dt0=dt0,
                              y0=x.reshape(-1), stepsize_controller=controller, saveat=diffrax.SaveAt(t1=True),
                              max_steps=max_steps)
    out = sol.ys[-1].reshape(x.shape)
    return (out, dict(sol.stats)) if return_stats else out

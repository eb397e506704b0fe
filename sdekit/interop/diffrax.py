"""The JAX adapter: sdekit's SDEs, exact scores and trained MLPs as JAX functions, solved with diffrax.

The only module in sdekit that imports jax, diffrax and lineax; without the [jax] extra, importing it raises
an ImportError that says so. What is here:
  - no schedules: every SDE evaluates its own closed forms in jax.numpy, `sde.marginal(t, xp=jnp)`,
    `sde.diffusion(t, xp=jnp)`, `sde.reverse_drift(x, t, score, xp=jnp)` (one definition, in `sdekit.sde`);
  - `mixture_score(gmm, sde)`: the exact diffused score of a GaussianMixture, in JAX;
  - `export_mlp(net)` / `export_denoiser(denoiser)`: a trained `sdekit_models.mlp.MLP` (and the
    `sdekit.precond.Denoiser` around it) as pure JAX functions of the copied torch weights. These two and
    `mixture_score` mirror torch code line by line; tests/test_interop.py checks each against its torch original;
  - `GivenIncrements`: given Brownian increments on a grid as a diffrax Brownian path;
  - `reverse_sde(...)` and `probability_flow(...)`: diffeqsolve in s = -t (forward time), so any diffrax solver
    and controller applies. With explicit `noise` the Brownian increment over grid interval i is
    sqrt(t_i - t_{i+1}) noise[i], as in `sdekit.samplers.euler_maruyama`;
  - `path_gradients(xp_fields, ...)`: per-path d L(X_T)/dtheta by JAX autodiff through diffeqsolve on the same
    increments as sdekit's own solvers (the `diffrax` method of `sdekit.sensitivity.compare`).

JAX score functions have the signature score(x: (B, *S), t: () scalar) -> (B, *S). Use float64
(`jax.config.update("jax_enable_x64", True)`) to compare with torch float64 to round-off.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .._imports import require
from ..precond import PREDICTIONS
from ..sde import SDE

jax = require("jax", __name__)
jnp = require("jax.numpy", __name__)
diffrax = require("diffrax", __name__)
lineax = require("lineax", __name__)

__all__ = ["to_jax", "mixture_score", "export_mlp", "export_denoiser", "GivenIncrements", "reverse_sde",
           "probability_flow", "path_gradients"]


def to_jax(a) -> jax.Array:
    """A torch tensor (any device), numpy array or JAX array as a JAX array (dtype kept where x64 allows)."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return jnp.asarray(a)


# --- score functions ---------------------------------------------------------------------------------------
def mixture_score(gmm, sde: SDE) -> Callable:
    """Exact grad_x log p_t(x) of a GaussianMixture diffused by sde: score(x: (B, d), t: ()) -> (B, d)."""
    means, covs, logw = to_jax(gmm.means), to_jax(gmm.covs), jnp.log(to_jax(gmm.weights))
    eye = jnp.eye(means.shape[1], dtype=means.dtype)

    def score(x, t):
        alpha, sigma = sde.marginal(jnp.asarray(t, x.dtype), xp=jnp)
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
    """Copy a `sdekit_models.mlp.MLP` into (params, apply) with apply(params, x: (B, d), c_noise: (B,) or ()) -> (B, d).

    The architecture is read from the module (Fourier features of c_noise, input layer on [x, emb],
    time projections re-injected before each hidden layer, SiLU, linear output), so the JAX function
    computes the same numbers as net.forward up to floating-point reassociation.
    """
    needed = ("time", "inp", "time_proj", "hidden_layers", "out")
    if not all(hasattr(net, n) for n in needed):
        raise TypeError(f"export_mlp expects a sdekit_models.mlp.MLP (attributes {needed}), got {type(net).__name__}")
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
    prediction type's read-out to eps_hat, and score = -eps_hat / sigma_t. alpha and sigma are the SDE's own
    closed forms evaluated in jax.numpy.
    """
    kind, sd, sde = denoiser.prediction, denoiser.sigma_data, denoiser.sde
    if kind not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {kind!r}; expected one of {PREDICTIONS}")
    params, apply = export_mlp(denoiser.net)

    def score(x, t):
        a, s = sde.marginal(jnp.asarray(t, x.dtype), xp=jnp)
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
        else:  # edm
            eps = (x - a * (c_skip * (x / a) + c_out * out)) / s
        return -eps / s

    return score


# --- given Brownian increments ------------------------------------------------------------------------------
class GivenIncrements(diffrax.AbstractBrownianPath):
    """Brownian increments dW: (N, *shape) on an increasing grid: (N+1,) as a diffrax Brownian path.

    The increment over one grid interval [grid[i], grid[i+1]] is dW[i] itself, so a solve stepping on the
    grid (`diffrax.StepTo(ts=grid)`) uses exactly these increments, as sdekit's own solvers do; W at other
    times interpolates the cumulative sums linearly. No Levy area (solvers that need it are refused by diffrax).
    """

    grid: jax.Array      # (N+1,) increasing
    dW: jax.Array        # (N, *shape)
    W: jax.Array         # (N+1, *shape), W[0] = 0
    levy_area = diffrax.BrownianIncrement

    def __init__(self, grid, dW):
        self.grid, self.dW = grid, dW
        self.W = jnp.concatenate([jnp.zeros_like(dW[:1]), jnp.cumsum(dW, 0)], 0)

    @property
    def t0(self):
        return self.grid[0]

    @property
    def t1(self):
        return self.grid[-1]

    def _index(self, t):
        return jnp.clip(jnp.searchsorted(self.grid, t, side="right") - 1, 0, self.dW.shape[0] - 1)

    def _at(self, t):
        i = self._index(t)
        return self.W[i] + (t - self.grid[i]) / (self.grid[i + 1] - self.grid[i]) * self.dW[i]

    def evaluate(self, t0, t1=None, left=True, use_levy=False):
        del left
        if t1 is None:
            return self._at(t0)
        i = self._index(t0)
        # One step per interval: the stored increment itself, not a difference of cumulative sums.
        exact = jnp.isclose(t0, self.grid[i], rtol=1e-12, atol=0) & jnp.isclose(t1, self.grid[i + 1], rtol=1e-12, atol=0)
        inc = jnp.where(exact, self.dW[i], self._at(t1) - self._at(t0))
        return diffrax.BrownianIncrement(dt=t1 - t0, W=inc) if use_levy else inc


# --- solves -------------------------------------------------------------------------------------------------
def _reverse_terms(score: Callable, sde: SDE, shape: tuple, probability_flow: bool):
    def drift(s, y, args):
        x = y.reshape(shape)
        return -sde.reverse_drift(x, -s, score(x, -s), probability_flow, xp=jnp).reshape(-1)   # d/ds = -d/dt

    def diffusion(s, y, args):
        return lineax.DiagonalLinearOperator(sde.diffusion(-s, xp=jnp) * jnp.ones_like(y))

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
        control = GivenIncrements(grid, jnp.sqrt(grid[1:] - grid[:-1])[:, None] * noise.reshape(n, -1))
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


# --- pathwise gradients ---------------------------------------------------------------------------------------
_GRADIENT_SOLVERS = {"euler": "Euler", "milstein": "ItoMilstein", "heun": "Heun"}


def path_gradients(xp_fields: Callable, x0: torch.Tensor, theta: torch.Tensor, ts: torch.Tensor, dW: torch.Tensor,
                   loss_xp: Callable, scheme: str = "euler") -> torch.Tensor:
    """Per-path d L(X_T^b)/dtheta: (B, P) as a torch tensor, by jax.vmap(jax.grad(...)) through diffeqsolve.

    xp_fields(xp) -> (f, g) written against the array namespace xp (here jax.numpy), with the shapes of
    `sdekit.sensitivity.forward` (f, g: (t, x: (B, d), theta: (P,)) -> (B, d), diagonal noise); loss_xp(x: (1, d))
    -> (1,) in the same namespace. x0: (B, d); theta: (P,); ts: (N+1,) increasing; dW: (N, B, d), the increments
    stepped exactly (`GivenIncrements`, StepTo on ts). scheme: euler (diffrax.Euler), milstein (diffrax.ItoMilstein)
    or heun (diffrax.Heun, Stratonovich). Enables float64 in JAX (jax_enable_x64), a process-wide JAX setting.
    """
    if scheme not in _GRADIENT_SOLVERS:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {sorted(_GRADIENT_SOLVERS)}")
    if ts.ndim != 1 or len(ts) < 2 or not bool((ts[1:] > ts[:-1]).all()):
        raise ValueError(f"path_gradients needs an increasing 1-D ts with at least 2 points, got {tuple(ts.shape)}")
    if tuple(dW.shape[:2]) != (len(ts) - 1, x0.shape[0]):
        raise ValueError(f"dW must be ({len(ts) - 1}, {x0.shape[0]}, d) for ts {tuple(ts.shape)} and x0 {tuple(x0.shape)}, "
                         f"got {tuple(dW.shape)}")
    jax.config.update("jax_enable_x64", True)           # before any array is made, so float64 stays float64
    solver = getattr(diffrax, _GRADIENT_SOLVERS[scheme])
    f, g = xp_fields(jnp)
    ts_j = to_jax(ts)

    def one_path(th, y0, w):
        drift = diffrax.ODETerm(lambda t, y, args: f(t, y[None], th)[0])
        diffusion = diffrax.ControlTerm(lambda t, y, args: lineax.DiagonalLinearOperator(g(t, y[None], th)[0]),
                                        GivenIncrements(ts_j, w))
        sol = diffrax.diffeqsolve(diffrax.MultiTerm(drift, diffusion), solver(), ts_j[0], ts_j[-1],
                                  dt0=None, y0=y0, stepsize_controller=diffrax.StepTo(ts=ts_j),
                                  saveat=diffrax.SaveAt(t1=True), max_steps=len(ts_j) + 1,
                                  adjoint=diffrax.DirectAdjoint())
        return loss_xp(sol.ys[-1][None])[0]

    grads = jax.jit(jax.vmap(jax.grad(one_path), in_axes=(None, 0, 0)))(
        to_jax(theta), to_jax(x0), jnp.moveaxis(to_jax(dW), 1, 0))             # dW per path: (B, N, d)
    return torch.tensor(np.asarray(grads), dtype=theta.dtype)

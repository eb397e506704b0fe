"""The benchmark SDEs in JAX: a jitted lax.scan loop and diffrax (vmapped over paths), for throughput and gradients.

Imported only when the JAX rows run. Brownian motion either from a VirtualBrownianTree per path or from
increments generated beforehand, as diffrax users do for fixed-step solves.
"""
from __future__ import annotations

import math

import diffrax
import jax
import jax.numpy as jnp
import lineax


def fields(name: str, params: dict):
    """(f(x, theta), g(x, theta)) for one path x: (d,), in JAX."""
    if name == "gbm":
        return (lambda x, th: th[0] * x), (lambda x, th: th[1] * x), jnp.array([params["mu"], params["sigma"]], jnp.float32)
    P = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    hidden, d = P["W2"].shape

    def f(x, th):
        return jnp.tanh(x @ P["W1"] + P["b1"]) @ (P["W2"] + (th @ P["M"]).reshape(hidden, d))

    def g(x, th):
        return 0.1 * jax.nn.sigmoid(P["c"] * x + P["e"])

    return f, g, P["theta"]


def scan_solver(f, g, T: float, N: int):
    """jit(x0 (B, d), theta, key) -> X_T: lax.scan over steps, normals drawn per step (the JAX plain loop)."""
    h = T / N

    @jax.jit
    def run(x0, th, key):
        def step(x, k):
            dw = jax.random.normal(k, x.shape, x.dtype) * math.sqrt(h)
            fx = jax.vmap(lambda y: f(y, th))(x)
            gx = jax.vmap(lambda y: g(y, th))(x)
            return x + fx * h + gx * dw, None
        x, _ = jax.lax.scan(step, x0, jax.random.split(key, N))
        return x
    return run


class _Increments(diffrax.AbstractPath):
    """Given increments dW (N, d) on a uniform grid: the increment over step i is dW[i]."""

    t0: float
    t1: float
    dW: jax.Array

    def evaluate(self, t0, t1=None, left=True):
        del left
        h = (self.t1 - self.t0) / self.dW.shape[0]
        i = jnp.clip(jnp.round((t0 - self.t0) / h).astype(jnp.int32), 0, self.dW.shape[0] - 1)
        return self.dW[i]


def diffrax_solver(f, g, T: float, N: int, brownian: str):
    """jit(x0 (B, d), theta, key_or_dW) -> X_T with diffrax Euler, vmapped over paths.

    brownian: "vbt" (VirtualBrownianTree per path, tol h/2, from a key) or "increments" (dW (B, N, d) given).
    """
    h = T / N

    def one(x0, th, noise):
        drift = lambda t, y, args: f(y, th)
        diff = lambda t, y, args: lineax.DiagonalLinearOperator(g(y, th))
        if brownian == "vbt":
            bm = diffrax.VirtualBrownianTree(0.0, T, tol=h / 2, shape=x0.shape, key=noise)
        else:
            bm = _Increments(0.0, T, noise)
        terms = diffrax.MultiTerm(diffrax.ODETerm(drift), diffrax.ControlTerm(diff, bm))
        sol = diffrax.diffeqsolve(terms, diffrax.Euler(), 0.0, T, h, x0, saveat=diffrax.SaveAt(t1=True), max_steps=N + 1)
        return sol.ys[-1]

    @jax.jit
    def run(x0, th, noise):
        if brownian == "vbt":
            keys = jax.random.split(noise, x0.shape[0])
            return jax.vmap(one, in_axes=(0, None, 0))(x0, th, keys)
        return jax.vmap(one, in_axes=(0, None, 0))(x0, th, noise)
    return run


def diffrax_grad(f, g, T: float, N: int):
    """jit(x0, theta, dW (B, N, d)) -> d mean(X_T) / d theta, by diffrax's default RecursiveCheckpointAdjoint."""
    solve = diffrax_solver(f, g, T, N, "increments")
    return jax.jit(jax.grad(lambda th, x0, dW: solve(x0, th, dW).mean()))


def block(x):
    return jax.block_until_ready(x)

"""One adapter per framework, each the only module in sdekit that imports it.

torchsde   `sdekit.interop.torchsde`: the reverse SDE through `torchsde.sdeint` (any method), and `GridBrownian`,
           given Brownian increments as a torchsde path (used by the reverse SDE and by `sensitivity.adjoint`).
           Needs the [torchsde] extra.
diffrax    `sdekit.interop.diffrax`: JAX. The SDE schedules are sdekit's own, evaluated in jax.numpy
           (`sde.marginal(t, xp=jnp)`); the exact mixture score, the MLP / Denoiser export, the reverse SDE and the
           probability-flow ODE through `diffrax.diffeqsolve`, per-path gradients by JAX autodiff, and
           `GivenIncrements`, given Brownian increments as a diffrax path. Needs the [jax] extra.

Importing an adapter whose extra is missing raises an ImportError naming it; `import sdekit` imports neither.
"""

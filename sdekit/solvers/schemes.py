"""One-step maps of the SDE schemes, their registry, the Ito/Stratonovich conversion and the input checks.

The SDE is dX = f(t, X, theta) dt + g(t, X, theta) dW with W an m-dimensional Brownian motion. Noise types
(torchsde's names and shapes; x is (B, d)):

    noise        g(t, x, theta)   dW, levy_area   g . dW
    "diagonal"   (B, d)           (B, d)          g * dW        (g_i may depend on x_i only, as in torchsde)
    "scalar"     (B, d, 1)        (B, 1)          g[..., 0] * dW
    "additive"   (B, d, m)        (B, m)          g @ dW        (g does not depend on x)
    "general"    (B, d, m)        (B, m)          g @ dW

Schemes, the calculus each converges to, and strong orders (E|X_N - X(T)| = O(h^order)) per noise type
(a blank: refused with a ValueError that names the alternatives):

    scheme            sde_type        diagonal  scalar  additive  general   extra input / state
    euler             ito             0.5       0.5     1.0       0.5
    milstein          ito             1.0       1.0     1.0       -         (general needs Levy areas)
    srk               ito             1.5       1.5     1.5       -         space-time Levy area H
    euler_heun        stratonovich    1.0       1.0     1.0       0.5
    heun              stratonovich    1.0       1.0     1.0       0.5
    midpoint          stratonovich    1.0       1.0     1.0       0.5
    reversible_heun   stratonovich    1.0       1.0     1.0       0.5       state (x, z, f(z), g(z)); exact inverse

srk is Rossler's (2010) stochastic Runge-Kutta: SRA1 for additive noise and SRID2 for diagonal and scalar
noise, the tableaus torchsde uses (order 1.5 on all three, as Rossler and torchsde state). tests/test_sde_schemes.py
fits every entry on problems with closed forms or fine references on the same Brownian path (each slope within 0.2
of the table; measured over three seeds: srk 1.39-1.51, the order-1 entries 0.94-1.02, the order-1/2 ones 0.46-0.54).
reversible_heun: Kidger et al. (2021) prove order 1/2 in general and 1 for additive noise (torchsde declares 1/2
for diagonal and scalar noise); on diagonal and scalar noise it measures 0.95-0.98, like Heun's 1, and the table
says so. Euler, Milstein and the Heun family converge faster on special problems (e.g. srk and Heun at order 2 on
additive noise with a linear drift), never slower.
A Stratonovich scheme solves an Ito SDE when given the Stratonovich drift: `ito_to_stratonovich(f, g, noise)`.
milstein and the Ito/Stratonovich conversion take JVPs of g (one per noise column for general noise), never a
Jacobian.

Step maps. Every registered step has the signature

    step(f, g, t, h, y, theta, dW, H=None, *, noise="diagonal") -> y_next

  t, h    0-d tensors: the step goes from t to t + h (h < 0 on decreasing grids);
  y       the scheme's state: x (B, d) itself, or for a stateful scheme a tuple whose first entry is x
          (`Scheme.state_names`; reversible_heun: (x, z, f(t, z), g(t, z))), made by `Scheme.init`;
  dW      (B, m) the Brownian increment over the step;
  H       (B, m) the space-time Levy area over the step, used by schemes with `Scheme.needs_levy_area`
          (srk) and ignored by the others. In torchsde's convention: with U = int_t^{t+|h|} (W_s - W_t) ds
          (`BrownianInterval(..., levy_area_approximation="space-time")(ta, tb, return_U=True)` returns
          (dW, U)), H = U / |h| - dW / 2, which is N(0, |h|/12) and independent of dW.
  milstein also takes dg=: dg_i/dx_i (B, d) for diagonal noise, replacing the JVP of g it otherwise takes.

Steps are differentiable functions of (y, theta). `Scheme.inverse(f, g, t, h, y_next, theta, dW, H, noise=)`,
where a scheme has one, returns the state at t from the state at t + h (the same t, h, dW as the forward step).
`step_map` binds the fields and flattens the state into a positional map for solvers and tracing:

    (t, h, *state, dW, [H if needs_levy_area], theta) -> state     (theta last: solvers hold it fixed)

which for the stateless schemes without Levy area is today's (t, h, x, dW, theta) -> x.

Reverse time (decreasing grids, h < 0): drift terms take the signed h and stage times t + c h; the noise
terms take the increments of the reverse-time Brownian motion, whose quadratic variation over a step is |h|
(sqrt(|h|), I_kk = (dW^2 - |h|) / 2, H ~ N(0, |h|/12)). That is the forward scheme in s = -t applied to
dX = -f(-s, X) ds + g(-s, X) dW(s) (tested to round-off), so every scheme keeps its order in both directions, in
its own calculus: an Ito scheme solves that SDE in the Ito sense (the reverse-time SDEs of diffusion samplers), a
Stratonovich scheme in the Stratonovich sense, whose flow run backwards on the same Brownian path retraces the
forward one. Hence the Ito correction changes sign with the direction of time: to solve the Ito SDE of the
reversed time with a Stratonovich scheme on a decreasing grid, pass `stratonovich_to_ito(f, g, noise)` (f + c), not
`ito_to_stratonovich` (f - c). For additive noise c = 0 and the two coincide.

These maps are the only definition of the schemes: the primal solver `sdekit.simulate` runs them (traced
once into straight-line code when no gradient is needed), forward sensitivities are their Jacobian-vector
products and backprop their vector-Jacobian products.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["NOISE_TYPES", "euler_step", "milstein_step", "srk_step", "euler_heun_step", "heun_step", "midpoint_step",
           "reversible_heun_step", "reversible_heun_init", "reversible_heun_inverse", "Scheme", "SCHEMES",
           "STRONG_ORDER", "get_scheme", "step_map", "inverse_map", "init_state", "g_prod", "ito_correction",
           "ito_to_stratonovich", "stratonovich_to_ito", "check_inputs", "check_diagonal_noise", "check_additive_noise",
           "check_noise_structure", "check_finite"]

Field = Callable[[Tensor, Tensor, Tensor], Tensor]
NOISE_TYPES = ("diagonal", "scalar", "additive", "general")


# --- noise products -------------------------------------------------------------------------------------
_COLUMNS_MAX = 8     # g @ v as a sum of column products up to this m; a batched matmul beyond


def g_prod(g: Tensor, v: Tensor, noise: str, acc: Tensor | None = None) -> Tensor:
    """g . v for the noise type: g * v (diagonal), g[..., 0] * v (scalar), g @ v (additive, general): (B, d);
    acc + g . v when acc is given.

    On the CPU, for m <= 8 columns g @ v is summed column by column into acc, acc + g[..., 0] v[..., 0] + g[..., 1] v[..., 1]
    + ...: elementwise ops over the batch, where a batched matmul of (d, m) matrices costs ~4x as much (B = 1e4,
    d = 4, m = 3; a per-matrix call each). Summing into acc (x and the drift term, say) keeps the products in
    acc's memory layout when g is the same for every path (additive noise, an expanded (d, m) matrix).
    """
    if noise == "diagonal":
        return g * v if acc is None else acc + g * v
    if noise == "scalar":
        return g[..., 0] * v if acc is None else acc + g[..., 0] * v
    m = g.shape[-1]
    if m > _COLUMNS_MAX or g.device.type != "cpu":         # on a GPU one bmm launch beats m elementwise ones
        out = torch.matmul(g, v.unsqueeze(-1)).squeeze(-1)
        return out if acc is None else acc + out
    out = g[..., 0] * v[..., :1] if acc is None else acc + g[..., 0] * v[..., :1]
    for j in range(1, m):
        out = out + g[..., j] * v[..., j:j + 1]
    return out


def _column(g: Field, noise: str) -> Field:
    """The diffusion as a (B, d) field: g itself (diagonal) or its only column (scalar)."""
    return g if noise == "diagonal" else (lambda t, x, th: g(t, x, th)[..., 0])


# --- Ito schemes ----------------------------------------------------------------------------------------
def euler_step(f: Field, g: Field, t: Tensor, h: Tensor, x: Tensor, theta: Tensor, dW: Tensor, H: Tensor | None = None,
               *, noise: str = "diagonal") -> Tensor:
    """Euler-Maruyama (Ito): x + f h + g . dW."""
    if noise == "diagonal":
        return x + f(t, x, theta) * h + g(t, x, theta) * dW
    return g_prod(g(t, x, theta), dW, noise, acc=x + f(t, x, theta) * h)


def milstein_step(f: Field, g: Field, t: Tensor, h: Tensor, x: Tensor, theta: Tensor, dW: Tensor,
                  H: Tensor | None = None, *, noise: str = "diagonal", dg: Field | None = None) -> Tensor:
    """Milstein (Ito): x + f h + g . dW + 1/2 (dg/dx g) (dW^2 - |h|) for diagonal and scalar noise.

    Diagonal: the correction is g_i dg_i/dx_i, one JVP of g along g itself ((dg/dx) g, whose i-th entry is
    g_i dg_i/dx_i for diagonal noise), or g * dg(t, x, theta) when dg = dg_i/dx_i (B, d) is given.
    Scalar: (d b/dx) b for the single column b = g[..., 0] (one JVP), times dW^2 - |h| (B, 1). (torchsde's
    Milstein contracts the other index, sum_k b_k db_k/dx_i, which agrees only where db/dx is symmetric; its
    strong order drops to 1/2 otherwise, tests/test_sde_schemes.py.)
    Additive: dg/dx = 0, so the step is Euler's (strong order 1 on additive noise).
    General noise needs the Levy areas int dW_j dW_k (j != k) and is refused by `Scheme.check_noise`.
    """
    if noise == "additive":
        return g_prod(g(t, x, theta), dW, noise, acc=x + f(t, x, theta) * h)
    if noise == "scalar":
        col = _column(g, noise)
        b = col(t, x, theta)
        _, bdb = torch.func.jvp(lambda y: col(t, y, theta), (x,), (b,))
        return x + f(t, x, theta) * h + b * dW + 0.5 * bdb * (dW * dW - h.abs())
    gx = g(t, x, theta)
    if dg is not None:
        gdg = gx * dg(t, x, theta)
    else:
        _, gdg = torch.func.jvp(lambda y: g(t, y, theta), (x,), (gx,))
    return x + f(t, x, theta) * h + gx * dW + 0.5 * gdg * (dW * dW - h.abs())


# Rossler (2010) tableaus: SRA1 (additive noise) and SRID2 (diagonal noise), as in torchsde.
_SRA1 = dict(c0=(0.0, 3 / 4), c1=(1.0, 0.0), a0=((), (3 / 4,)), b0=((), (3 / 2,)), alpha=(1 / 3, 2 / 3),
             beta1=(1.0, 0.0), beta2=(-1.0, 1.0))
_SRID2 = dict(c0=(0.0, 1.0, 1 / 2, 0.0), c1=(0.0, 1 / 4, 1.0, 1 / 4),
              a0=((), (1.0,), (1 / 4, 1 / 4), (0.0, 0.0, 0.0)), a1=((), (1 / 4,), (1.0, 0.0), (0.0, 0.0, 1 / 4)),
              b0=((), (0.0,), (1.0, 1 / 2), (0.0, 0.0, 0.0)), b1=((), (-1 / 2,), (1.0, 0.0), (2.0, -1.0, 1 / 2)),
              alpha=(1 / 6, 1 / 6, 2 / 3, 0.0), beta1=(-1.0, 4 / 3, 2 / 3, 0.0), beta2=(1.0, -4 / 3, 1 / 3, 0.0),
              beta3=(2.0, -4 / 3, -2 / 3, 0.0), beta4=(-2.0, 5 / 3, -2 / 3, 1.0))


def srk_step(f: Field, g: Field, t: Tensor, h: Tensor, x: Tensor, theta: Tensor, dW: Tensor, H: Tensor | None = None,
             *, noise: str = "diagonal") -> Tensor:
    """Rossler's stochastic Runge-Kutta (Ito): SRA1 for additive noise, SRID2 for diagonal and scalar noise.

    Needs the space-time Levy area H over the step; J = dW/2 + H is torchsde's I_k0 / |h|, the time
    integral of the Brownian path over the step divided by its length.
    """
    if H is None:
        raise ValueError("scheme 'srk' needs the space-time Levy area H of every step (pass levy_area= with dW, "
                         "or bm=, or neither to draw both)")
    J = 0.5 * dW + H
    if noise == "additive":
        T = _SRA1
        g1, g0 = g(t + T["c1"][0] * h, x, theta), g(t + T["c1"][1] * h, x, theta)      # g at t + h and at t
        f0 = f(t + T["c0"][0] * h, x, theta)
        x1 = g_prod(g1, T["b0"][1][0] * J, noise, acc=x + (T["a0"][1][0] * h) * f0)
        f1 = f(t + T["c0"][1] * h, x1, theta)
        out = g_prod(g1, T["beta1"][0] * dW + T["beta2"][0] * J, noise, acc=x + (T["alpha"][0] * h) * f0)
        return g_prod(g0, T["beta1"][1] * dW + T["beta2"][1] * J, noise, acc=out + (T["alpha"][1] * h) * f1)
    T = _SRID2
    col = _column(g, noise)
    habs = h.abs()
    sqrt_h = habs.sqrt()
    sq = dW * dW
    # the noise weights of the stages are combinations of dW, I_kk/sqrt|h|, I_k0/|h| = J and I_kkk/|h|, with
    # I_kk = (dW^2 - |h|)/2 and I_kkk = (dW^3 - 3 |h| dW)/6
    basis = (dW, (sq - habs) * (0.5 / sqrt_h), J, (sq - 3 * habs) * dW / (6 * habs))
    fs, gs = [], []
    out = x
    for s in range(4):
        H0, H1 = x, x
        for j in range(s):
            H0 = _axpy(_axpy(H0, T["a0"][s][j], fs[j], h), T["b0"][s][j], gs[j] * J)
            H1 = _axpy(_axpy(H1, T["a1"][s][j], fs[j], h), T["b1"][s][j], gs[j], sqrt_h)
        fs.append(f(t + T["c0"][s] * h, H0, theta) if T["alpha"][s] or s < 3 else None)   # f of stage 3 is unused
        gs.append(col(t + T["c1"][s] * h, H1, theta))
        weight = None
        for c, b in zip((T["beta1"][s], T["beta2"][s], T["beta3"][s], T["beta4"][s]), basis):
            weight = _axpy(weight, c, b)
        out = _axpy(out, T["alpha"][s], fs[s], h)
        out = out + gs[s] * weight
    return out


def _axpy(acc: Tensor | None, c: float, v: Tensor, scale: Tensor | None = None) -> Tensor | None:
    """acc + c v (times scale, a 0-d tensor, if given), skipping c = 0 and multiplying by c = 1 not at all."""
    if c == 0:
        return acc
    if scale is None:
        term = v if c == 1 else v * c
    else:
        term = (scale if c == 1 else c * scale) * v
    return term if acc is None else acc + term


# --- Stratonovich schemes -------------------------------------------------------------------------------
def euler_heun_step(f: Field, g: Field, t: Tensor, h: Tensor, x: Tensor, theta: Tensor, dW: Tensor,
                    H: Tensor | None = None, *, noise: str = "diagonal") -> Tensor:
    """Euler-Heun (Stratonovich): Euler in the drift, the trapezoidal rule in the noise.

    x' = x + g . dW, x + f h + (g + g(t + h, x')) . dW / 2.
    """
    gdw = g_prod(g(t, x, theta), dW, noise)
    gdw1 = g_prod(g(t + h, x + gdw, theta), dW, noise)
    return x + f(t, x, theta) * h + 0.5 * (gdw + gdw1)


def heun_step(f: Field, g: Field, t: Tensor, h: Tensor, x: Tensor, theta: Tensor, dW: Tensor, H: Tensor | None = None,
              *, noise: str = "diagonal") -> Tensor:
    """Stochastic Heun: converges to the **Stratonovich** solution of dX = f dt + g o dW.

    Predictor x~ = x + f h + g . dW, corrector x + (f + f~) h/2 + (g + g~) . dW/2. To approximate an Ito
    SDE with it, pass the Stratonovich drift (`ito_to_stratonovich`).
    """
    f0, g0 = f(t, x, theta), g(t, x, theta)
    t1 = t + h
    if noise == "diagonal":
        x_pred = x + f0 * h + g0 * dW
        return x + 0.5 * (f0 + f(t1, x_pred, theta)) * h + 0.5 * (g0 + g(t1, x_pred, theta)) * dW
    gdw = g_prod(g0, dW, noise)
    x_pred = x + f0 * h + gdw
    return x + 0.5 * (f0 + f(t1, x_pred, theta)) * h + 0.5 * (gdw + g_prod(g(t1, x_pred, theta), dW, noise))


def midpoint_step(f: Field, g: Field, t: Tensor, h: Tensor, x: Tensor, theta: Tensor, dW: Tensor,
                  H: Tensor | None = None, *, noise: str = "diagonal") -> Tensor:
    """Stochastic midpoint (Stratonovich): x' = x + f h/2 + g . dW/2 at t + h/2, then x + f' h + g' . dW."""
    half = 0.5 * h
    x_mid = x + f(t, x, theta) * half + 0.5 * g_prod(g(t, x, theta), dW, noise)
    t_mid = t + half
    return g_prod(g(t_mid, x_mid, theta), dW, noise, acc=x + f(t_mid, x_mid, theta) * h)


def reversible_heun_init(f: Field, g: Field, t0: Tensor, x0: Tensor, theta: Tensor, *,
                         noise: str = "diagonal") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The state (x, z, f(t0, z), g(t0, z)) with z = x0."""
    return x0, x0, f(t0, x0, theta), g(t0, x0, theta)


def reversible_heun_step(f: Field, g: Field, t: Tensor, h: Tensor, y: tuple, theta: Tensor, dW: Tensor,
                         H: Tensor | None = None, *, noise: str = "diagonal") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reversible Heun (Stratonovich; Kidger, Foster, Li, Lyons 2021), algebraically reversible.

    State (x, z, fz, gz), fz and gz the fields at (t, z):
        z1 = 2 x - z + fz h + gz . dW,   f1, g1 = f(t + h, z1), g(t + h, z1),
        x1 = x + (fz + f1) h/2 + (gz + g1) . dW/2.
    One evaluation of f and g per step. `reversible_heun_inverse` recovers the state exactly in exact arithmetic.
    """
    x, z, fz, gz = y
    z1 = g_prod(gz, dW, noise, acc=2 * x - z + fz * h)
    t1 = t + h
    f1, g1 = f(t1, z1, theta), g(t1, z1, theta)
    x1 = g_prod(gz + g1, 0.5 * dW, noise, acc=x + (fz + f1) * (0.5 * h))
    return x1, z1, f1, g1


def reversible_heun_inverse(f: Field, g: Field, t: Tensor, h: Tensor, y1: tuple, theta: Tensor, dW: Tensor,
                            H: Tensor | None = None, *, noise: str = "diagonal") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The state at t from the state y1 at t + h that `reversible_heun_step(.., t, h, .., dW)` returned:
        z = 2 x1 - z1 - f1 h - g1 . dW,   fz, gz = f(t, z), g(t, z),   x = x1 - (fz + f1) h/2 - (gz + g1) . dW/2.
    """
    x1, z1, f1, g1 = y1
    z = 2 * x1 - z1 - f1 * h - g_prod(g1, dW, noise)
    fz, gz = f(t, z, theta), g(t, z, theta)
    x = x1 - (fz + f1) * (0.5 * h) - g_prod(gz + g1, 0.5 * dW, noise)
    return x, z, fz, gz


# --- the registry ---------------------------------------------------------------------------------------
_GENERAL_ALTERNATIVES = ("use a scheme that needs no Levy areas for general noise: 'euler' (Ito), or 'euler_heun', "
                         "'heun', 'midpoint', 'reversible_heun' (Stratonovich; `ito_to_stratonovich` converts the drift)")


@dataclass(frozen=True)
class Scheme:
    """A registered scheme: its one-step map, what it converges to, and what it needs (calling it calls `step`).

    step: `step(f, g, t, h, y, theta, dW, H=None, *, noise=...) -> y_next` (module docstring).
    sde_type: "ito" or "stratonovich", the solution the scheme converges to.
    orders: strong order per supported noise type; the keys are the noise types the scheme accepts.
    needs_levy_area: the step reads the space-time Levy area H of each step (srk).
    init: `init(f, g, t0, x0, theta, *, noise=) -> state` for a stateful scheme (None: the state is x itself);
    state_names: the entries of the state, x first (what `step_map` flattens).
    inverse: `inverse(f, g, t, h, y_next, theta, dW, H=None, *, noise=) -> y`, the exact inverse of step, or None.
    refused: noise type -> why the scheme refuses it (the error text names the alternatives).
    contract: noise types whose structure the step relies on (diagonal: g_i reads x_i only; additive: g reads
    no x), checked once per solve by `check_noise_structure`.
    """

    step: Callable[..., Tensor]
    sde_type: str
    orders: Mapping[str, float]
    needs_levy_area: bool = False
    init: Callable | None = None
    state_names: tuple[str, ...] = ("x",)
    inverse: Callable | None = None
    refused: Mapping[str, str] = field(default_factory=dict)
    contract: tuple[str, ...] = ()

    def __call__(self, *args, **kwargs):
        return self.step(*args, **kwargs)

    @property
    def strong_order(self) -> float:
        """The strong order for diagonal noise (the default noise type)."""
        return self.orders["diagonal"]

    @property
    def noise_types(self) -> tuple[str, ...]:
        return tuple(self.orders)

    @property
    def stateful(self) -> bool:
        return self.init is not None

    def order(self, noise: str) -> float:
        self.check_noise(noise)
        return self.orders[noise]

    def check_noise(self, noise: str, name: str = "this scheme") -> None:
        """ValueError unless the scheme accepts the noise type (the message says why not and what to use)."""
        if noise not in NOISE_TYPES:
            raise ValueError(f"unknown noise {noise!r}; expected one of {list(NOISE_TYPES)}")
        if noise not in self.orders:
            why = self.refused.get(noise, f"it supports {list(self.orders)}")
            raise ValueError(f"scheme {name!r} does not support noise={noise!r}: {why}")


SCHEMES: dict[str, Scheme] = {
    "euler": Scheme(euler_step, "ito", {"diagonal": 0.5, "scalar": 0.5, "additive": 1.0, "general": 0.5}),
    "milstein": Scheme(milstein_step, "ito", {"diagonal": 1.0, "scalar": 1.0, "additive": 1.0},
                       refused={"general": "Milstein's correction for general (non-commutative) noise needs the Levy "
                                           "areas int dW_j dW_k (j != k), which it does not take; " + _GENERAL_ALTERNATIVES},
                       contract=("diagonal", "additive")),
    "srk": Scheme(srk_step, "ito", {"diagonal": 1.5, "scalar": 1.5, "additive": 1.5}, needs_levy_area=True,
                  refused={"general": "Rossler's SRA1/SRID2 tableaus cover additive, diagonal and scalar noise only "
                                      "(general noise needs Levy areas int dW_j dW_k); " + _GENERAL_ALTERNATIVES},
                  contract=("diagonal", "additive")),
    "euler_heun": Scheme(euler_heun_step, "stratonovich",
                         {"diagonal": 1.0, "scalar": 1.0, "additive": 1.0, "general": 0.5}),
    "heun": Scheme(heun_step, "stratonovich", {"diagonal": 1.0, "scalar": 1.0, "additive": 1.0, "general": 0.5}),
    "midpoint": Scheme(midpoint_step, "stratonovich", {"diagonal": 1.0, "scalar": 1.0, "additive": 1.0, "general": 0.5}),
    "reversible_heun": Scheme(reversible_heun_step, "stratonovich",
                              {"diagonal": 1.0, "scalar": 1.0, "additive": 1.0, "general": 0.5},
                              init=reversible_heun_init, state_names=("x", "z", "f", "g"), inverse=reversible_heun_inverse),
}
STRONG_ORDER = {name: s.strong_order for name, s in SCHEMES.items()}   # a view of SCHEMES (diagonal noise)


def get_scheme(name: str) -> Scheme:
    """The registered scheme called `name`; ValueError naming the registered ones otherwise."""
    if name not in SCHEMES:
        raise ValueError(f"unknown scheme {name!r}; expected one of {sorted(SCHEMES)}")
    return SCHEMES[name]


def step_map(scheme: str, f: Field, g: Field, dg: Field | None = None, *, noise: str = "diagonal") -> Callable:
    """The scheme's map with the fields bound and the state flattened:
    (t, h, *state, dW, [H if the scheme needs Levy area], theta) -> state (a tensor, or a tuple for stateful schemes).
    dg (milstein on diagonal noise only; ignored by the other schemes) is dg_i/dx_i (B, d)."""
    sch = get_scheme(scheme)
    sch.check_noise(noise, scheme)
    step = sch.step
    if dg is not None and scheme == "milstein":             # other schemes ignore dg
        if noise != "diagonal":
            raise ValueError(f"dg (dg_i/dx_i, (B, d)) is an option of milstein on diagonal noise; with noise={noise!r} "
                             "leave it out (the correction is a JVP of g)")
        return lambda t, h, x, dw, th: milstein_step(f, g, t, h, x, th, dw, dg=dg)
    if noise == "diagonal" and not sch.stateful and not sch.needs_levy_area:
        return lambda t, h, x, dw, th: step(f, g, t, h, x, th, dw)          # today's map, unchanged
    k = len(sch.state_names)
    if sch.needs_levy_area:
        if sch.stateful:
            return lambda t, h, *a: step(f, g, t, h, a[:k], a[-1], a[k], a[k + 1], noise=noise)
        return lambda t, h, x, dw, H, th: step(f, g, t, h, x, th, dw, H, noise=noise)
    if sch.stateful:
        return lambda t, h, *a: step(f, g, t, h, a[:k], a[-1], a[k], noise=noise)
    return lambda t, h, x, dw, th: step(f, g, t, h, x, th, dw, noise=noise)


def inverse_map(scheme: str, f: Field, g: Field, *, noise: str = "diagonal") -> Callable:
    """The flattened inverse, (t, h, *state_next, dW, [H], theta) -> state at t; ValueError if the scheme has none."""
    sch = get_scheme(scheme)
    sch.check_noise(noise, scheme)
    if sch.inverse is None:
        raise ValueError(f"scheme {scheme!r} is not algebraically reversible; "
                         f"{[n for n, s in SCHEMES.items() if s.inverse is not None]} are")
    k, lev = len(sch.state_names), int(sch.needs_levy_area)
    inv = sch.inverse

    def run(t, h, *a):
        y = a[:k] if sch.stateful else a[0]
        return inv(f, g, t, h, y, a[-1], a[k], a[k + 1] if lev else None, noise=noise)
    return run


def init_state(scheme: str, f: Field, g: Field, t0: Tensor, x0: Tensor, theta: Tensor, *, noise: str = "diagonal"):
    """The scheme's state at (t0, x0): x0 itself, or the tuple `Scheme.init` makes (x0 first)."""
    sch = get_scheme(scheme)
    return x0 if sch.init is None else tuple(sch.init(f, g, t0, x0, theta, noise=noise))


# --- Ito <-> Stratonovich -------------------------------------------------------------------------------
def ito_correction(g: Field, noise: str = "diagonal") -> Field:
    """c(t, x, theta) = 1/2 sum_{j,k} g_kj d_k g_ij (B, d): Ito drift = Stratonovich drift + c.

    By JVPs of g, never a Jacobian: diagonal, one JVP of g along g ((dg/dx) g = g_i dg_i/dx_i under the diagonal
    contract); scalar, one JVP of the column b along b; general, one JVP of g along each column g_j (vmapped),
    of which column j is kept; additive, zero.
    """
    if noise not in NOISE_TYPES:
        raise ValueError(f"unknown noise {noise!r}; expected one of {list(NOISE_TYPES)}")
    if noise == "additive":
        return lambda t, x, th: torch.zeros_like(x)
    if noise in ("diagonal", "scalar"):
        col = _column(g, noise)

        def c(t, x, th):
            b = col(t, x, th)
            return 0.5 * torch.func.jvp(lambda y: col(t, y, th), (x.contiguous(),), (b,))[1]   # (an expanded x: no tangent)
        return c

    def c_general(t, x, th):
        G = g(t, x, th)                                                        # (B, d, m)
        jvp = lambda v: torch.func.jvp(lambda y: g(t, y, th), (x.contiguous(),), (v,))[1]  # noqa: E731  (B, d, m)
        D = torch.func.vmap(jvp)(G.movedim(-1, 0))                             # (m, B, d, m): D[j] = (dg/dx) g_j
        return 0.5 * D.diagonal(dim1=0, dim2=-1).sum(-1)                       # sum_j D[j][..., j]
    return c_general


def _diagonal_checked(c: Field, g: Field, noise: str, name: str) -> Field:
    """c with the diagonal-noise contract of g checked at the first call outside a functorch transform (as Milstein
    checks it at x0): the diagonal correction 1/2 g_i dg_i/dx_i is taken as the JVP (dg/dx) g, which adds
    sum_{k != i} g_k dg_i/dx_k where g_i reads other components, converging to a wrong Ito solution."""
    if noise != "diagonal":
        return c
    checked = False

    def checked_c(t, x, th):
        nonlocal checked
        if not checked and not _transformed():
            p = th.detach() if isinstance(th, Tensor) else th
            try:                                   # t and theta passed through as given (either may be None)
                check_diagonal_noise(lambda _t, y, _p: g(t, y, p), x.new_zeros(()), x, x.new_zeros(0), name)
            except ValueError as err:
                raise ValueError(
                    f"{name}(f, g, 'diagonal') needs g_i(t, x, theta) to depend on x_i only (the correction is "
                    "1/2 g_i dg_i/dx_i), but g_i changes with other components of x. Use "
                    f"{name}(f, G, 'general') with G(t, x, theta) = torch.diag_embed(g(t, x, theta)) (B, d, d) and "
                    "noise='general', or solve the Ito SDE with 'euler', which needs no correction.") from err
            checked = True
        return c(t, x, th)
    return checked_c


def ito_to_stratonovich(f: Field, g: Field, noise: str = "diagonal") -> Field:
    """The Stratonovich drift of the Ito SDE dX = f dt + g dW: f - 1/2 sum_{j,k} g_kj d_k g_ij (f itself for additive noise).

    For increasing grids. On a decreasing grid the correction enters with the other sign (module docstring):
    a Stratonovich scheme solving the reverse-time Ito SDE takes `stratonovich_to_ito(f, g, noise)`.
    noise="diagonal" needs g_i to read x_i only: the first call (outside vmap/grad) checks it at its x, like
    Milstein's check at x0, and raises ValueError naming noise="general" with diag(g) as the way for any other g.
    """
    if noise == "additive":
        ito_correction(g, noise)
        return f
    c = _diagonal_checked(ito_correction(g, noise), g, noise, "ito_to_stratonovich")
    return lambda t, x, th: f(t, x, th) - c(t, x, th)


def stratonovich_to_ito(f: Field, g: Field, noise: str = "diagonal") -> Field:
    """The Ito drift of the Stratonovich SDE dX = f dt + g o dW: f + 1/2 sum_{j,k} g_kj d_k g_ij (diagonal noise: g_i
    must read x_i only, checked as in `ito_to_stratonovich`)."""
    if noise == "additive":
        ito_correction(g, noise)
        return f
    c = _diagonal_checked(ito_correction(g, noise), g, noise, "stratonovich_to_ito")
    return lambda t, x, th: f(t, x, th) + c(t, x, th)


# --- input checks ---------------------------------------------------------------------------------------
def _transformed() -> bool:
    """Inside vmap/grad no value can be branched on; solvers that vmap check before they do."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def check_finite(name: str, v: Tensor) -> None:
    """ValueError naming `name` and the first non-finite index unless every entry of v is finite."""
    if _transformed() or v is None:
        return
    v = v.detach()
    if torch.isfinite(v.sum()):                  # one pass, no temporary of v's size; NaN and inf survive a sum
        return
    flat = v.reshape(-1)
    for start in range(0, flat.numel(), 1 << 16):              # locate in blocks (an overflowing sum finds none)
        bad = ~torch.isfinite(flat[start:start + (1 << 16)])
        if not bad.any():
            continue
        idx = tuple(int(i) for i in torch.unravel_index(start + bad.nonzero()[0, 0], v.shape))
        raise ValueError(f"{name} must be finite, but {name}[{', '.join(map(str, idx))}] = {v.detach()[idx].item()}")


def _noise_shape_text(noise: str) -> str:
    return {"diagonal": "g -> (B, d) and dW (N, B, d)", "scalar": "g -> (B, d, 1) and dW (N, B, 1)",
            "additive": "g -> (B, d, m) and dW (N, B, m)", "general": "g -> (B, d, m) and dW (N, B, m)"}[noise]


def check_inputs(f: Field, g: Field, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor | None, scheme: str,
                 save: str = "end", *, noise: str = "diagonal", levy_area: Tensor | None = None,
                 finite_increments: bool = True) -> int:
    """Raise early, naming the bad input, unless x0 (B, d), theta (P,), ts (N+1,), f -> (B, d) and g, dW
    (or None) and levy_area (or None) have the shapes of the noise type; returns m, the noise dimension.

    Also refuses non-finite x0, theta, ts, dW, levy_area, a scheme that does not take the noise type, and (for
    schemes that rely on it) a g that breaks the diagonal or additive contract. finite_increments=False leaves
    dW and levy_area (a pass over N B m values) to the caller, e.g. a solver that checks them only when its
    path turns out non-finite.
    """
    sch = get_scheme(scheme)
    sch.check_noise(noise, scheme)
    if save not in ("path", "end"):
        raise ValueError(f"unknown save {save!r}; expected 'path' or 'end'")
    for name, v in (("x0", x0), ("theta", theta), ("ts", ts), ("dW", dW), ("levy_area", levy_area)):
        if v is None and name in ("dW", "levy_area"):
            continue
        if not isinstance(v, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
        if not v.is_floating_point():
            raise TypeError(f"{name} must be floating point, got dtype {v.dtype}")
    if x0.ndim != 2:
        raise ValueError(f"x0 must be (B, d), got shape {tuple(x0.shape)}")
    if theta.ndim != 1:
        raise ValueError(f"theta must be (P,), got shape {tuple(theta.shape)}")
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"ts must be (N+1,) with N >= 1, got shape {tuple(ts.shape)}")
    for name, v in (("x0", x0), ("theta", theta), ("ts", ts)):
        check_finite(name, v)
    steps = ts[1:] - ts[:-1]
    if not ((steps > 0).all() or (steps < 0).all()):
        raise ValueError("ts must be strictly monotone (increasing, or decreasing for reverse-time solves)")
    N = ts.shape[0] - 1
    B, d = x0.shape
    tensors = {"x0": x0, "theta": theta, "ts": ts, "dW": dW, "levy_area": levy_area}
    dtypes = {v.dtype for v in tensors.values() if v is not None}
    if len(dtypes) != 1:
        raise TypeError("x0, theta, ts, dW and levy_area must share one dtype, got "
                        + ", ".join(f"{k} {None if v is None else v.dtype}" for k, v in tensors.items()))
    with torch.no_grad():              # on the whole batch: a field may read per-path tensors (B, d) beside x
        out = f(ts[0], x0, theta)
        if not isinstance(out, Tensor) or out.shape != x0.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"f(t, x, theta) must return x's shape (B, d); for x of shape {tuple(x0.shape)} it "
                             f"returned {got}")
        gout = g(ts[0], x0, theta)
    got = tuple(gout.shape) if isinstance(gout, Tensor) else type(gout).__name__
    if noise == "diagonal":
        if not isinstance(gout, Tensor) or gout.shape != (B, d):
            hint = (" (a (B, d, m) g is noise='general', or 'additive' if it does not depend on x, or 'scalar' if m = 1)"
                    if isinstance(gout, Tensor) and gout.ndim == 3 else "")
            raise ValueError(f"g(t, x, theta) must return (B, d) for noise='diagonal' ({_noise_shape_text(noise)}); "
                             f"for x of shape {(B, d)} it returned {got}{hint}")
        m = d
    else:
        want = "(B, d, 1)" if noise == "scalar" else "(B, d, m)"
        if (not isinstance(gout, Tensor) or gout.ndim != 3 or gout.shape[:2] != (B, d)
                or (noise == "scalar" and gout.shape[2] != 1)):
            hint = " (a (B, d) g is noise='diagonal')" if isinstance(gout, Tensor) and gout.shape == (B, d) else ""
            raise ValueError(f"g(t, x, theta) must return {want} for noise={noise!r} ({_noise_shape_text(noise)}); "
                             f"for x of shape {(B, d)} it returned {got}{hint}")
        m = gout.shape[2]
    for name, v in (("dW", dW), ("levy_area", levy_area)):
        if v is not None and v.shape != (N, B, m):
            raise ValueError(f"{name} must be (N, B, {'d' if noise == 'diagonal' else 'm' if noise != 'scalar' else '1'}) = "
                             f"({N}, {B}, {m}) for noise={noise!r} ({_noise_shape_text(noise)}), ts of length {N + 1} "
                             f"and x0 of shape {tuple(x0.shape)}; got {tuple(v.shape)}")
    if levy_area is not None and not sch.needs_levy_area:
        raise ValueError(f"levy_area is read by schemes that need it ({[n for n, s in SCHEMES.items() if s.needs_levy_area]}), "
                         f"not by {scheme!r}")
    for name, v in (("dW", dW), ("levy_area", levy_area)):
        if v is not None and finite_increments:
            check_finite(name, v)
    check_noise_structure(g, ts[0], x0, theta, scheme, noise)
    return m


def check_noise_structure(g: Field, t: Tensor, x0: Tensor, theta: Tensor, scheme: str, noise: str) -> None:
    """The diagonal or additive contract, where the scheme relies on it (`Scheme.contract`)."""
    if noise in get_scheme(scheme).contract:
        (check_diagonal_noise if noise == "diagonal" else check_additive_noise)(g, t, x0, theta, scheme)


def _directions(x: Tensor) -> tuple[Tensor, Tensor]:
    """Two fixed, irregular direction fields in [0.5, 1.5) shaped like x (no random draw: this may run under vmap)."""
    k = torch.arange(1, x.numel() + 1, dtype=torch.float64, device=x.device).reshape(x.shape)
    u, w = ((k * c).frac().add(0.5).to(x.dtype) for c in (0.6180339887498949, 0.41421356237309515))
    return u, w


def check_diagonal_noise(g: Field, t: Tensor, x0: Tensor, theta: Tensor, scheme: str) -> None:
    """Raise ValueError unless g_i(t, x, theta) depends on x_i only, at every row of x0 (the whole batch: g may read
    per-path tensors beside x).

    The Jacobian dg/dx is diagonal exactly when its products with any two directions u, w satisfy
    (J u) w = (J w) u elementwise, so two JVPs test it whatever d is.
    """
    if _transformed():
        return
    x = x0.detach().contiguous()       # an expanded x0 (one row for all paths) cannot carry a tangent
    th = theta.detach()
    u, w = _directions(x)
    field_ = lambda y: g(t.detach(), y, th)                # noqa: E731
    ju = torch.func.jvp(field_, (x,), (u,))[1]
    jw = torch.func.jvp(field_, (x,), (w,))[1]
    lhs, rhs = ju * w, jw * u
    bad = (lhs - rhs).abs() > 1e3 * torch.finfo(x.dtype).eps * (lhs.abs() + rhs.abs())
    if bad.any():
        b, i = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"scheme {scheme!r} needs diagonal noise: g_i(t, x, theta) may depend on x_i only (its correction "
            f"term is g_i dg_i/dx_i), but g_{i} changes with other components of x (sample {b} of x0). "
            "Use noise='general' with g returning the (B, d, d) matrix diag(g), or 'euler' or 'heun', which accept "
            "such a g with noise='diagonal'.")


def check_additive_noise(g: Field, t: Tensor, x0: Tensor, theta: Tensor, scheme: str) -> None:
    """Raise ValueError unless g(t, x, theta) does not depend on x (two JVPs at every row of x0)."""
    if _transformed():
        return
    x = x0.detach().contiguous()       # an expanded x0 (one row for all paths) cannot carry a tangent
    th = theta.detach()
    field_ = lambda y: g(t.detach(), y, th)                # noqa: E731
    gx = field_(x)
    scale = 1e3 * torch.finfo(x.dtype).eps * (gx.abs().max() + 1)
    for u in _directions(x):
        ju = torch.func.jvp(field_, (x,), (u,))[1]
        if (ju.abs() > scale).any():
            b = int((ju.abs() > scale).nonzero()[0][0])
            raise ValueError(
                f"scheme {scheme!r} relies on additive noise, but g(t, x, theta) changes with x (sample {b} of x0). "
                "Use noise='general' (or 'diagonal' / 'scalar' if g has that shape), which this scheme takes "
                "with its correction terms, or a scheme that accepts any g for general noise ('euler', 'heun').")

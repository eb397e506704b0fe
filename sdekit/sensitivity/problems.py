"""Problems with known answers: (f, g, x0, theta, time grid, loss) and closed forms where they exist.

Two kinds of closed form, and the comparison report says which one it used:
  - **discrete**: d E[L(X_N)]/dtheta of the scheme's own chain on the run's grid, exact up to round-off
    (`discrete_expectation`). Every pathwise method estimates exactly this, so its error in standard errors is a
    fair test at any step count. It exists for the linear problems (f and g affine in x, L quadratic or linear):
    each step of every scheme is then an affine map of the scheme's state whose coefficients are polynomials in the
    step's Brownian increment (and Levy area), so the second moments of the state follow a linear recursion whose
    one-step expectation Gauss-Hermite quadrature evaluates exactly (5 nodes per noise dimension: exact to degree 9,
    the steps here are of degree <= 6 once squared). The state is the scheme's whole state (reversible_heun's
    (x, z, f(z), g(z)) too), and the recursion runs the scheme's registered step map itself, so the oracle cannot
    drift from the solver.
  - **continuous**: d E[L(X_T)]/dtheta of the SDE itself. A scheme's estimate differs from it by the scheme's
    weak error, O(h) for every scheme here, which at 1e4 paths is often many standard errors; it is the right
    reference for "how far is my discretisation from the truth", not for "is this estimator unbiased".

The drift and diffusion of some problems are written once against an array namespace `xp` (torch or jax.numpy:
only arithmetic, indexing, reshape, @ and xp.tanh are used), so the diffrax method integrates the very same fields.

Forward in time:
- gbm:           dX = mu X dt + sigma X dW. X_T = x0 exp((mu - sigma^2/2) T + sigma W_T), so dX_T/dmu = T X_T and
                 dX_T/dsigma = (W_T - sigma T) X_T; L = X_T^2, E L = x0^2 e^{(2 mu + sigma^2) T}. Diagonal noise.
- ou:            dX = kappa (m - X) dt + s dW; Gaussian with closed-form mean and variance; L = X_T^2.
- linear_scalar: 2-d linear SDE driven by one Brownian motion, dX = (a c + b A X) dt + s (D X + e) dW; L = |X_T|^2.
- linear_general: 2-d linear SDE with 3 Brownian motions, g = s (G0 + eps [D_j X]_j); L = |X_T|^2.
- double_well:   Langevin dX = (a X - b X^3) dt + s dW (potential b x^4/4 - a x^2/2); no closed form; L = X_T.
- neural:        2-d neural SDE, drift a tanh MLP (its weights are theta), diagonal g = s (1 + tanh(x)/2); L = |X_T|^2.
Reverse time (t_max -> t_min, decreasing grid), VP diffusion samplers:
- diffusion_gauss: the reverse SDE with the exact score of Gaussian data N(mu + theta, 0.3^2 I): the drift is affine
                 in x, so the discrete closed form exists; continuous limit E[x_0] = alpha_{t_min} (mu + theta).
- diffusion / diffusion_pf: reverse SDE / probability-flow ODE with the exact score of a 2-component Gaussian mixture
                 shifted by theta (2,). Shifting the data by theta shifts p_t by alpha_t theta, so in the continuous
                 limit E[x_0] = alpha_{t_min} (mean + theta) and dE[L]/dtheta = alpha_{t_min} (1, 1) for L = x_1 + x_2.
- diffusion_mlp: the probability-flow sampler with a small tanh MLP as the score; theta are its weights (no closed form).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..data import GaussianMixture
from ..sde import VPSDE
from ..solvers import get_scheme, init_state, ito_to_stratonovich, step_map

__all__ = ["Problem", "PROBLEMS", "make_problem", "discrete_expectation", "closed_form"]


@dataclass
class Problem:
    """One sensitivity problem. Shapes: theta (P,), x0 (B, d), loss (B, d) -> (B,); g shaped by `noise`."""
    name: str
    f: Callable                      # Ito drift f(t, x, theta) -> (B, d)
    g: Callable                      # diffusion g(t, x, theta): (B, d) diagonal, (B, d, m) otherwise
    theta: Tensor
    param_names: list[str]
    t0: float
    t1: float
    x0_fn: Callable[[int, torch.Generator | None], Tensor]
    loss: Callable[[Tensor], Tensor]
    f_strat: Callable | None = None  # the drift a Stratonovich scheme needs to solve the same Ito SDE: f - c forward in
    # time, f + c on a decreasing grid (c the Ito correction; see sdekit.solvers.schemes); c = 0 for every reverse-time
    # problem here (g does not depend on x)
    exact_grad: Callable[[Tensor], Tensor] | None = None        # theta -> dE[L(X_T)]/dtheta (P,), continuous limit
    exact_J: Callable[..., Tensor] | None = None               # (x0, theta, T, W_T) -> (X_T, dX_T/dtheta (B, d, P))
    drift_params: tuple[int, ...] = ()                          # parameters that enter f only (score function)
    xp_fields: Callable | None = None                           # xp -> (f, g): the same fields in another namespace
    description: str = ""
    noise: str = "diagonal"
    # the discrete closed form: f and g affine in x, x0 ~ (mean (d,), covariance (d, d)), E[L] from the moments of X_N
    x0_moments: tuple[Tensor, Tensor] | None = None
    loss_moments: Callable[[Tensor, Tensor], Tensor] | None = None   # (E[X] (d,), E[X X^T] (d, d)) -> E[L]
    paths: int = 10000               # the comparison report's defaults for this problem
    steps: int = 200
    extra: dict = field(default_factory=dict)

    @property
    def P(self) -> int:
        return self.theta.shape[0]

    @property
    def reverse_time(self) -> bool:
        return self.t1 < self.t0

    @property
    def linear(self) -> bool:
        """Whether the discrete closed form exists (`discrete_expectation`)."""
        return self.x0_moments is not None and self.loss_moments is not None

    def ts(self, steps: int, dtype=torch.float64) -> Tensor:
        return torch.linspace(self.t0, self.t1, steps + 1, dtype=dtype)

    def x0(self, B: int, generator: torch.Generator | None = None) -> Tensor:
        return self.x0_fn(B, generator)

    def drift(self, scheme: str) -> Callable:
        """The drift a scheme needs: Ito f for an Ito scheme, the Stratonovich drift of the same SDE for a
        Stratonovich scheme, as the registry declares it; every scheme then targets the same SDE."""
        stratonovich = get_scheme(scheme).sde_type == "stratonovich"
        return self.f_strat if stratonovich and self.f_strat is not None else self.f


# --- the discrete closed form ----------------------------------------------------------------------------------
def _gauss_hermite(dims: int, nodes: int, dtype) -> tuple[Tensor, Tensor]:
    """Tensor-product Gauss-Hermite rule for N(0, I_dims): points (K, dims), weights (K,) summing to 1."""
    z, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / w.sum()
    grids = np.meshgrid(*([z] * dims), indexing="ij")
    wg = np.meshgrid(*([w] * dims), indexing="ij")
    pts = np.stack([gr.reshape(-1) for gr in grids], -1)
    wts = np.prod(np.stack([gr.reshape(-1) for gr in wg], -1), -1)
    return torch.tensor(pts, dtype=dtype), torch.tensor(wts, dtype=dtype)


def _flat(y: tuple[Tensor, ...]) -> Tensor:
    return torch.cat([v.reshape(v.shape[0], -1) for v in y], -1)


def _unflat(v: Tensor, like: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    out, i = [], 0
    for u in like:
        k = u[0].numel()
        out.append(v[:, i:i + k].reshape(v.shape[0], *u.shape[1:]))
        i += k
    return tuple(out)


def _affine(fn: Callable[[tuple], tuple], like: tuple[Tensor, ...], reps: int) -> tuple[Tensor, Tensor]:
    """(M (reps, D, D), c (reps, D)) with fn(y) = M y + c, per each of `reps` blocks of rows, evaluated at 0 and at
    the D unit states (fn maps a batch of reps * (D + 1) states; its rows are grouped block by block)."""
    D = _flat(like).shape[1]
    basis = torch.cat([torch.zeros(1, D, dtype=like[0].dtype), torch.eye(D, dtype=like[0].dtype)])   # (D+1, D)
    ys = _unflat(basis.repeat(reps, 1), like)
    out = _flat(fn(ys)).reshape(reps, D + 1, -1)
    c = out[:, 0]
    return (out[:, 1:] - c[:, None]).transpose(1, 2), c


def discrete_expectation(problem: Problem, scheme: str, ts: Tensor, theta: Tensor | None = None, nodes: int = 5) -> Tensor:
    """E[L(X_N)] of the scheme's chain on the grid ts, exactly (to round-off), differentiable in theta.

    Needs a linear problem (`Problem.linear`: f and g affine in x, L given by the first two moments). The scheme's
    state s (x, or the scheme's tuple, flattened to D numbers) obeys s' = M s + c with (M, c) depending on the
    step's increments, independent of s; the augmented second moment E[(s, 1)(s, 1)^T] therefore evolves by the
    quadrature average of M~ S M~^T, with M~ read off the registered step map at the unit states.
    """
    if not problem.linear:
        raise ValueError(f"problem {problem.name!r} has no discrete closed form (its fields are not affine in x)")
    theta = problem.theta if theta is None else theta
    sch = get_scheme(scheme)
    f, g, noise = problem.drift(scheme), problem.g, problem.noise
    dtype = theta.dtype
    mean0, cov0 = (v.to(dtype) for v in problem.x0_moments)
    d = mean0.shape[0]
    x_probe = mean0[None]
    m = d if noise == "diagonal" else g(ts[0], x_probe, theta).shape[-1]
    levy = sch.needs_levy_area
    pts, wts = _gauss_hermite(m * (2 if levy else 1), nodes, dtype)
    K = pts.shape[0]
    step = step_map(scheme, f, g, noise=noise)
    wrap = (lambda y: tuple(y)) if sch.stateful else (lambda y: (y,))
    like0 = wrap(init_state(scheme, f, g, ts[0], x_probe, theta, noise=noise))
    # the initial state: s0 = M0 x0 + c0 (init is affine in x0), x0 ~ (mean0, cov0)
    xbasis = torch.cat([torch.zeros(1, d, dtype=dtype), torch.eye(d, dtype=dtype)])
    s0 = _flat(wrap(init_state(scheme, f, g, ts[0], xbasis, theta, noise=noise)))
    c0, M0 = s0[0], (s0[1:] - s0[0]).T                                  # (D,), (D, d)
    D = c0.shape[0]
    X0 = torch.zeros(d + 1, d + 1, dtype=dtype)
    X0[:d, :d] = cov0 + torch.outer(mean0, mean0)
    X0[:d, d], X0[d, :d], X0[d, d] = mean0, mean0, 1.0
    A0 = torch.zeros(D + 1, d + 1, dtype=dtype)
    A0[:D, :d], A0[:D, d], A0[D, d] = M0, c0, 1.0
    S = A0 @ X0 @ A0.T
    h = ts[1:] - ts[:-1]
    for n in range(h.shape[0]):
        sd = h[n].abs().sqrt()
        dw = pts[:, :m] * sd
        H = pts[:, m:] * (h[n].abs() / 12).sqrt() if levy else None
        rows = D + 1
        dw_rows = dw.repeat_interleave(rows, 0)
        H_rows = None if H is None else H.repeat_interleave(rows, 0)

        def one(ys, n=n, dw_rows=dw_rows, H_rows=H_rows):          # (called within this iteration)
            args = (*ys, dw_rows) + ((H_rows,) if levy else ()) + (theta,)
            return wrap(step(ts[n], h[n], *args))
        M, c = _affine(one, like0, K)                                   # (K, D, D), (K, D)
        At = torch.zeros(K, D + 1, D + 1, dtype=dtype)
        At[:, :D, :D], At[:, :D, D], At[:, D, D] = M, c, 1.0
        S = torch.einsum("k,kij,jl,kml->im", wts, At, S, At)
    mean, second = S[:d, D], S[:d, :d]
    return problem.loss_moments(mean, second)


def closed_form(problem: Problem, scheme: str, ts: Tensor) -> tuple[str, Tensor] | None:
    """("discrete", dE[L(X_N)]/dtheta of the scheme's chain on ts) where that exists, else ("continuous",
    dE[L(X_T)]/dtheta of the SDE) where that exists, else None."""
    if problem.linear:
        th = problem.theta.detach().clone().requires_grad_(True)
        return "discrete", torch.autograd.grad(discrete_expectation(problem, scheme, ts, th), th)[0]
    if problem.exact_grad is not None:
        return "continuous", problem.exact_grad(problem.theta)
    return None


def _torch_fields(xp_fields):
    f, g = xp_fields(torch)
    return f, g


def _second(mean: Tensor, second: Tensor) -> Tensor:
    return torch.diagonal(second).sum()                                  # E|X|^2


def _deterministic(x0: Tensor) -> tuple[Tensor, Tensor]:
    return x0, torch.zeros(x0.shape[0], x0.shape[0], dtype=x0.dtype)


# --- geometric Brownian motion ------------------------------------------------------------------------
def gbm(mu: float = 0.3, sigma: float = 0.3, x0: float = 1.0, T: float = 1.0) -> Problem:
    def xp_fields(xp):
        return (lambda t, x, th: th[0] * x), (lambda t, x, th: th[1] * x)

    f, g = _torch_fields(xp_fields)

    def exact_J(x0_, th, T_, W_T):
        X_T = x0_ * torch.exp((th[0] - 0.5 * th[1] ** 2) * T_ + th[1] * W_T)
        return X_T, torch.stack([T_ * X_T, (W_T - th[1] * T_) * X_T], -1)

    def exact_grad(th):
        E = x0**2 * torch.exp((2 * th[0] + th[1] ** 2) * T)
        return torch.stack([2 * T * E, 2 * th[1] * T * E])

    return Problem("gbm", f, g, torch.tensor([mu, sigma], dtype=torch.float64), ["mu", "sigma"], 0.0, T,
                   lambda B, gen=None: torch.full((B, 1), x0, dtype=torch.float64), lambda x: (x**2).sum(-1),
                   f_strat=lambda t, x, th: (th[0] - 0.5 * th[1] ** 2) * x, exact_grad=exact_grad, exact_J=exact_J,
                   drift_params=(0,), xp_fields=xp_fields, description="geometric Brownian motion, L = X_T^2",
                   x0_moments=_deterministic(torch.tensor([x0], dtype=torch.float64)), loss_moments=_second)


# --- Ornstein-Uhlenbeck ----------------------------------------------------------------------------------
def ou(kappa: float = 1.5, m: float = 0.5, s: float = 0.6, x0: float = 2.0, T: float = 1.0) -> Problem:
    def xp_fields(xp):
        return (lambda t, x, th: th[0] * (th[1] - x)), (lambda t, x, th: th[2] + 0.0 * x)

    f, g = _torch_fields(xp_fields)

    def second_moment(th):
        kappa_, m_, s_ = th[0], th[1], th[2]
        mean = m_ + (x0 - m_) * torch.exp(-kappa_ * T)
        var = s_**2 * (1 - torch.exp(-2 * kappa_ * T)) / (2 * kappa_)
        return mean**2 + var

    def exact_grad(th):
        th = th.detach().clone().requires_grad_(True)
        return torch.autograd.grad(second_moment(th), th)[0]   # derivative of the closed form itself

    return Problem("ou", f, g, torch.tensor([kappa, m, s], dtype=torch.float64), ["kappa", "m", "s"], 0.0, T,
                   lambda B, gen=None: torch.full((B, 1), x0, dtype=torch.float64), lambda x: (x**2).sum(-1),
                   f_strat=f, exact_grad=exact_grad, drift_params=(0, 1), xp_fields=xp_fields,
                   description="Ornstein-Uhlenbeck, L = X_T^2 (closed-form mean and variance)",
                   x0_moments=_deterministic(torch.tensor([x0], dtype=torch.float64)), loss_moments=_second,
                   extra={"second_moment": second_moment})


# --- linear SDEs with scalar and general noise ---------------------------------------------------------------
_A = torch.tensor([[-0.5, 0.8], [-0.6, -0.3]], dtype=torch.float64)
_C = torch.tensor([1.0, -0.5], dtype=torch.float64)


def _linear(name: str, g: Callable, noise: str, theta: list[float], T: float, description: str) -> Problem:
    """The 2-d linear SDE dX = (a c + b A X) dt + g dW from x0 = (1, 0.5), L = |X_T|^2, with the given diffusion."""
    f = lambda t, x, th: th[0] * _C + th[1] * (x @ _A.T)                       # noqa: E731
    x0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    return Problem(name, f, g, torch.tensor(theta, dtype=torch.float64), ["a", "b", "s"], 0.0, T,
                   lambda B, gen=None: x0.expand(B, 2).clone(), lambda x: (x**2).sum(-1),
                   f_strat=ito_to_stratonovich(f, g, noise), drift_params=(0, 1), noise=noise,
                   description=description, x0_moments=_deterministic(x0), loss_moments=_second)


def linear_scalar(a: float = 0.6, b: float = 1.0, s: float = 0.5, T: float = 1.0) -> Problem:
    D = torch.tensor([[0.4, 0.2], [-0.1, 0.5]], dtype=torch.float64)
    e = torch.tensor([0.3, 0.6], dtype=torch.float64)
    g = lambda t, x, th: (th[2] * (x @ D.T + e))[..., None]                  # noqa: E731  (B, 2, 1)
    return _linear("linear_scalar", g, "scalar", [a, b, s], T,
                   "2-d linear SDE, one Brownian motion (scalar noise), L = |X_T|^2")


def linear_general(a: float = 0.6, b: float = 1.0, s: float = 0.4, eps: float = 0.15, T: float = 1.0) -> Problem:
    G0 = torch.tensor([[1.0, 0.3, -0.2], [0.1, 0.8, 0.5]], dtype=torch.float64)
    Ds = torch.tensor([[[0.5, 0.0], [0.0, -0.4]], [[0.0, 0.3], [0.2, 0.0]], [[-0.2, 0.1], [0.0, 0.4]]],
                      dtype=torch.float64)                                   # (m, d, d): column j is D_j x
    g = lambda t, x, th: th[2] * (G0 + eps * torch.einsum("jik,bk->bij", Ds, x))   # noqa: E731  (B, 2, 3)
    return _linear("linear_general", g, "general", [a, b, s], T,
                   "2-d linear SDE, 3 Brownian motions (general noise), L = |X_T|^2")


# --- double-well Langevin ----------------------------------------------------------------------------------
def double_well(a: float = 1.0, b: float = 1.0, s: float = 0.7, x0: float = 0.3, T: float = 2.0) -> Problem:
    def xp_fields(xp):
        return (lambda t, x, th: th[0] * x - th[1] * x * x * x), (lambda t, x, th: th[2] + 0.0 * x)

    f, g = _torch_fields(xp_fields)
    return Problem("double_well", f, g, torch.tensor([a, b, s], dtype=torch.float64), ["a", "b", "s"], 0.0, T,
                   lambda B, gen=None: torch.full((B, 1), x0, dtype=torch.float64), lambda x: x.sum(-1),
                   f_strat=f, drift_params=(0, 1), xp_fields=xp_fields, description="double-well Langevin, L = X_T")


# --- neural SDE ------------------------------------------------------------------------------------------------
def neural(hidden: int = 8, d: int = 2, s: float = 0.4, T: float = 1.0, seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    sizes = [(hidden, d), (hidden,), (d, hidden), (d,)]
    params = [torch.randn(sz, generator=gen, dtype=torch.float64) / math.sqrt(sz[-1] if len(sz) > 1 else hidden)
              for sz in sizes]
    theta = torch.cat([p.reshape(-1) for p in params] + [torch.tensor([s], dtype=torch.float64)])
    offsets = [0]
    for sz in sizes:
        offsets.append(offsets[-1] + math.prod(sz))

    def xp_fields(xp):
        def unpack(th):
            return [th[offsets[i]:offsets[i + 1]].reshape(sz) for i, sz in enumerate(sizes)]

        def f(t, x, th):
            W1, b1, W2, b2 = unpack(th)
            return xp.tanh(x @ W1.T + b1) @ W2.T + b2

        def g(t, x, th):
            return th[-1] * (1.0 + 0.5 * xp.tanh(x))

        def f_strat(t, x, th):
            y = xp.tanh(x)
            return f(t, x, th) - 0.5 * g(t, x, th) * th[-1] * 0.5 * (1.0 - y * y)

        return f, g, f_strat

    f, g, f_strat = xp_fields(torch)
    names = [f"w{i}" for i in range(theta.shape[0] - 1)] + ["s"]
    x0 = torch.tensor([[0.5, -0.5]], dtype=torch.float64)[:, :d]
    return Problem("neural", f, g, theta, names, 0.0, T, lambda B, gen=None: x0.expand(B, d).clone(),
                   lambda x: (x**2).sum(-1), f_strat=f_strat, drift_params=tuple(range(theta.shape[0] - 1)),
                   xp_fields=lambda xp: xp_fields(xp)[:2], description=f"neural SDE, tanh MLP drift ({hidden} hidden), L = |X_T|^2",
                   paths=1000, steps=100)


# --- diffusion samplers -------------------------------------------------------------------------------------------
def _mixture() -> GaussianMixture:
    means = torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=torch.float64)
    return GaussianMixture(means, torch.tensor([0.1, 0.2], dtype=torch.float64), torch.tensor([0.4, 0.6], dtype=torch.float64))


def diffusion(probability_flow: bool = False, sde: VPSDE | None = None) -> Problem:
    sde = sde or VPSDE(t_min=1e-3)
    gmm = _mixture()

    def score(x, t, th):
        alpha, _ = sde.marginal(t)
        return gmm.score(x - alpha.reshape(-1, 1) * th, t, sde)   # shifting the data by theta shifts p_t by alpha_t theta

    def f(t, x, th):
        return sde.reverse_drift(x, t, score(x, t, th), probability_flow=probability_flow)

    def g(t, x, th):
        return (0.0 if probability_flow else sde.diffusion(t)) + 0.0 * x

    alpha_min = float(sde.marginal(torch.tensor(sde.t_min, dtype=torch.float64))[0])
    name = "diffusion_pf" if probability_flow else "diffusion"
    kind = "probability-flow ODE" if probability_flow else "reverse SDE"
    return Problem(name, f, g, torch.zeros(2, dtype=torch.float64), ["shift_x", "shift_y"], sde.t_max, sde.t_min,
                   lambda B, gen=None: sde.prior_sample((B, 2), generator=gen, dtype=torch.float64),
                   lambda x: x.sum(-1), f_strat=f, exact_grad=lambda th: torch.full((2,), alpha_min, dtype=torch.float64),
                   drift_params=() if probability_flow else (0, 1),
                   description=f"VP {kind} sampler, exact mixture score shifted by theta, L = x_1 + x_2",
                   paths=2000, steps=100, extra={"sde": sde, "mixture": gmm, "score": score})


def diffusion_gauss(sde: VPSDE | None = None, std: float = 0.3) -> Problem:
    """The reverse SDE sampler of Gaussian data N(mu + theta, std^2 I): the exact score is affine in x."""
    sde = sde or VPSDE(t_min=1e-3)
    mu = torch.tensor([0.8, -0.4], dtype=torch.float64)

    def score(x, t, th):
        alpha, sigma = sde.marginal(t)
        return -(x - alpha * (mu + th)) / (alpha**2 * std**2 + sigma**2)

    def f(t, x, th):
        return sde.reverse_drift(x, t, score(x, t, th))

    def g(t, x, th):
        return sde.diffusion(t) + 0.0 * x

    alpha_min = float(sde.marginal(torch.tensor(sde.t_min, dtype=torch.float64))[0])
    prior = sde.prior_std
    return Problem("diffusion_gauss", f, g, torch.zeros(2, dtype=torch.float64), ["shift_x", "shift_y"], sde.t_max,
                   sde.t_min, lambda B, gen=None: sde.prior_sample((B, 2), generator=gen, dtype=torch.float64),
                   lambda x: x.sum(-1), f_strat=f, exact_grad=lambda th: torch.full((2,), alpha_min, dtype=torch.float64),
                   drift_params=(0, 1), description="VP reverse SDE sampler, exact score of Gaussian data shifted by "
                   "theta, L = x_1 + x_2", x0_moments=(torch.zeros(2, dtype=torch.float64),
                                                       prior**2 * torch.eye(2, dtype=torch.float64)),
                   loss_moments=lambda mean, second: mean.sum(), steps=100, extra={"sde": sde, "score": score})


def diffusion_mlp(hidden: int = 16, seed: int = 0, sde: VPSDE | None = None) -> Problem:
    sde = sde or VPSDE(t_min=1e-3)
    gen = torch.Generator().manual_seed(seed)
    sizes = [(hidden, 3), (hidden,), (2, hidden), (2,)]
    params = [0.5 * torch.randn(sz, generator=gen, dtype=torch.float64) for sz in sizes]
    theta = torch.cat([p.reshape(-1) for p in params])
    offsets = [0]
    for sz in sizes:
        offsets.append(offsets[-1] + math.prod(sz))

    def score(x, t, th):
        W1, b1, W2, b2 = [th[offsets[i]:offsets[i + 1]].reshape(sz) for i, sz in enumerate(sizes)]
        tx = torch.cat([x, (t + 0.0 * x[:, :1])], -1)
        return torch.tanh(tx @ W1.T + b1) @ W2.T + b2 - x      # -x: a Gaussian prior score plus a learned part

    f = lambda t, x, th: sde.reverse_drift(x, t, score(x, t, th), probability_flow=True)
    g = lambda t, x, th: 0.0 * x
    return Problem("diffusion_mlp", f, g, theta, [f"w{i}" for i in range(theta.shape[0])], sde.t_max, sde.t_min,
                   lambda B, gen=None: sde.prior_sample((B, 2), generator=gen, dtype=torch.float64),
                   lambda x: x.sum(-1), f_strat=f,
                   description=f"probability-flow sampler with a tanh MLP score ({hidden} hidden); theta = its weights",
                   paths=2000, steps=100, extra={"sde": sde, "score": score})


PROBLEMS: dict[str, Callable[..., Problem]] = {
    "gbm": gbm, "ou": ou, "linear_scalar": linear_scalar, "linear_general": linear_general, "double_well": double_well,
    "neural": neural, "diffusion_gauss": diffusion_gauss, "diffusion": diffusion,
    "diffusion_pf": lambda **kw: diffusion(probability_flow=True, **kw), "diffusion_mlp": diffusion_mlp,
}


def make_problem(name: str, **kwargs) -> Problem:
    if name not in PROBLEMS:
        raise ValueError(f"unknown sensitivity problem {name!r}; expected one of {sorted(PROBLEMS)}")
    return PROBLEMS[name](**kwargs)

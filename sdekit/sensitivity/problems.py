"""Problems with known answers: (f, g, x0, theta, time grid, loss) and closed forms where they exist.

The drift and diffusion of the SDE problems are written once against an array namespace `xp`
(torch or jax.numpy: only arithmetic, indexing, reshape, @ and xp.tanh are used), so the diffrax
method integrates the very same fields in JAX.

- gbm:          dX = mu X dt + sigma X dW. X_T = x0 exp((mu - sigma^2/2) T + sigma W_T), so
                dX_T/dmu = T X_T and dX_T/dsigma = (W_T - sigma T) X_T; L = X_T^2, E L = x0^2 e^{(2 mu + sigma^2) T}.
- ou:           dX = kappa (m - X) dt + s dW; Gaussian with closed-form mean and variance; L = X_T^2.
- double_well:  Langevin dX = (a X - b X^3) dt + s dW (potential b x^4/4 - a x^2/2); no closed form; L = X_T.
- neural:       2-d neural SDE, drift a tanh MLP (its weights are theta), diagonal g = s (1 + tanh(x)/2); L = |X_T|^2.
- diffusion / diffusion_pf: a VP diffusion sampler (reverse SDE / probability-flow ODE, t_max -> t_min) driven by
                the exact score of a 2-component Gaussian mixture shifted by theta (2,). Shifting the data by theta
                shifts p_t by alpha_t theta, so in the continuous limit E[x_0] = alpha_{t_min} (mean + theta) and
                dE[L]/dtheta = alpha_{t_min} (1, 1) for L = x_1 + x_2.
- diffusion_mlp: the probability-flow sampler with a small tanh MLP as the score; theta are its weights (no closed form).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..data import GaussianMixture
from ..sde import VPSDE
from ..solvers import get_scheme

__all__ = ["Problem", "PROBLEMS", "make_problem"]


@dataclass
class Problem:
    """One sensitivity problem. Shapes: theta (P,), x0 (B, d), loss (B, d) -> (B,)."""
    name: str
    f: Callable                      # Ito drift f(t, x, theta) -> (B, d)
    g: Callable                      # diagonal diffusion g(t, x, theta) -> (B, d)
    theta: Tensor
    param_names: list[str]
    t0: float
    t1: float
    x0_fn: Callable[[int, torch.Generator | None], Tensor]
    loss: Callable[[Tensor], Tensor]
    f_strat: Callable | None = None  # Stratonovich drift f - g dg/dx / 2 (for Stratonovich schemes: Heun)
    exact_grad: Callable[[Tensor], Tensor] | None = None        # theta -> dE[L(X_T)]/dtheta (P,)
    exact_J: Callable[..., Tensor] | None = None               # (x0, theta, T, W_T) -> (X_T, dX_T/dtheta (B, d, P))
    drift_params: tuple[int, ...] = ()                          # parameters that enter f only (score function)
    xp_fields: Callable | None = None                           # xp -> (f, g): the same fields in another namespace
    description: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def P(self) -> int:
        return self.theta.shape[0]

    def ts(self, steps: int, dtype=torch.float64) -> Tensor:
        return torch.linspace(self.t0, self.t1, steps + 1, dtype=dtype)

    def x0(self, B: int, generator: torch.Generator | None = None) -> Tensor:
        return self.x0_fn(B, generator)

    def drift(self, scheme: str) -> Callable:
        """The drift a scheme needs: Ito f for an Ito scheme (euler, milstein), the Stratonovich drift for a
        Stratonovich scheme (heun), as the registry declares it."""
        stratonovich = get_scheme(scheme).sde_type == "stratonovich"
        return self.f_strat if stratonovich and self.f_strat is not None else self.f


def _torch_fields(xp_fields):
    f, g = xp_fields(torch)
    return f, g


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
                   drift_params=(0,), xp_fields=xp_fields, description="geometric Brownian motion, L = X_T^2")


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
                   extra={"second_moment": second_moment})


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
                   xp_fields=lambda xp: xp_fields(xp)[:2], description=f"neural SDE, tanh MLP drift ({hidden} hidden), L = |X_T|^2")


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
                   extra={"sde": sde, "mixture": gmm, "score": score})


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
                   extra={"sde": sde, "score": score})


PROBLEMS: dict[str, Callable[..., Problem]] = {
    "gbm": gbm, "ou": ou, "double_well": double_well, "neural": neural,
    "diffusion": diffusion, "diffusion_pf": lambda **kw: diffusion(probability_flow=True, **kw),
    "diffusion_mlp": diffusion_mlp,
}


def make_problem(name: str, **kwargs) -> Problem:
    if name not in PROBLEMS:
        raise ValueError(f"unknown sensitivity problem {name!r}; expected one of {sorted(PROBLEMS)}")
    return PROBLEMS[name](**kwargs)

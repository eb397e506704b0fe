"""Forward noising processes dx = f(t) x dt + g(t) dW with closed-form Gaussian marginals.

Every process here is linear in x, so x_t | x_0 ~ N(alpha_t x_0, sigma_t^2 I). Training, the
samplers and the likelihood all read (alpha_t, sigma_t) and (f, g) from one of these objects.

The marginals are exact solutions of the stated SDE (not approximations of a discrete chain):
`tests/test_sde.py` checks each against a Monte Carlo simulation of its own drift and diffusion.

Every closed form is written once against an array namespace `xp` (default torch): `sde.marginal(t)`
evaluates it in torch, `sde.marginal(t, xp=jax.numpy)` in JAX (`sdekit.interop.diffrax` does so), with the
same operations in the same order. The formulas use only arithmetic and the functions both namespaces
share (exp, expm1, log, log1p, sqrt, sin, tan, arctan2, logaddexp, clip, where, ones_like, zeros_like),
plus `_sigmoid` and `_softplus` below.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from .rng import draw

__all__ = ["SDE", "VPSDE", "SubVPSDE", "VESDE", "EDM", "SDES", "VP_SCHEDULES", "make_sde", "broadcast_like", "per_sample_t"]


def _as_tensor(t, like: Tensor | None = None) -> Tensor:
    if isinstance(t, Tensor):
        return t
    dtype = like.dtype if like is not None else torch.get_default_dtype()
    device = like.device if like is not None else None
    return torch.as_tensor(t, dtype=dtype, device=device)


def _arr(t, xp):
    """t in namespace xp: floats become torch tensors (default dtype); other namespaces take t as given."""
    return _as_tensor(t) if xp is torch else t


def _sigmoid(x, xp):
    return torch.sigmoid(x) if xp is torch else 1.0 / (1.0 + xp.exp(-x))


def _softplus(x, xp):
    """log(1 + e^x), as torch.nn.functional.softplus (which returns x itself above x = 20)."""
    if xp is torch:
        return torch.nn.functional.softplus(x)
    return xp.where(x > 20.0, x, xp.log1p(xp.exp(xp.clip(x, max=20.0))))


def _per_sample(c, x, xp):
    """broadcast_like in namespace xp (a scalar coefficient as is, a (B,) one reshaped to (B, 1, ...))."""
    if xp is torch:
        return broadcast_like(c, x)
    return c if getattr(c, "ndim", 0) == 0 else c.reshape(-1, *([1] * (x.ndim - 1)))


def broadcast_like(c: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample coefficient c: () or (B,) so it broadcasts against x: (B, *S)."""
    c = _as_tensor(c, x)
    if c.ndim == 0:
        return c
    if c.ndim != 1 or c.shape[0] != x.shape[0]:
        raise ValueError(f"coefficient of shape {tuple(c.shape)} does not match batch of x {tuple(x.shape)}; "
                         f"expected () or ({x.shape[0]},)")
    return c.reshape(-1, *([1] * (x.ndim - 1)))


def per_sample_t(t, x: Tensor) -> Tensor:
    """t as a (B,) tensor on x's dtype and device, from a float, a () tensor or a (B,) tensor."""
    t = _as_tensor(t, x).to(dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be () or (B,)=({x.shape[0]},), got {tuple(t.shape)}")
    return t


class SDE(ABC):
    """Base class: a linear forward SDE dx = f(t) x dt + g(t) dW on [t_min, t_max].

    Subclasses implement `marginal`, `drift_coef`, `diffusion`, `log_snr` and `t_from_log_snr`, each taking
    the array namespace as `xp=torch` and using only functions torch and jax.numpy share (see the module doc).
    """

    t_min: float
    t_max: float
    prior_std: float = 1.0
    name: str = "sde"
    # The time grid (a name in sdekit.samplers.grids.GRIDS) that samplers stepping in t use when none is given:
    # equal steps of this SDE's own time variable suit the VP family and VE; EDM (sigma = t) overrides it.
    default_grid: str = "uniform"

    # --- the closed forms a subclass provides -------------------------------------------------
    @abstractmethod
    def marginal(self, t, xp=torch) -> tuple[Tensor, Tensor]:
        """x_t | x_0 ~ N(alpha x_0, sigma^2 I). t: () or (B,) -> alpha, sigma of t's shape."""

    @abstractmethod
    def drift_coef(self, t, xp=torch) -> Tensor:
        """f(t) with drift f(t) x. t: () or (B,) -> same shape."""

    @abstractmethod
    def diffusion(self, t, xp=torch) -> Tensor:
        """g(t). t: () or (B,) -> same shape."""

    @abstractmethod
    def t_from_log_snr(self, lam, xp=torch) -> Tensor:
        """Inverse of `log_snr`: the time at which log(alpha^2 / sigma^2) equals lam."""

    # --- derived quantities ---------------------------------------------------------------------
    def drift(self, x: Tensor, t, xp=torch) -> Tensor:
        """f(x, t) = f(t) x. x: (B, *S), t: () or (B,)."""
        t = _as_tensor(t, x) if xp is torch else t
        return _per_sample(self.drift_coef(t, xp=xp), x, xp) * x

    def log_snr(self, t, xp=torch) -> Tensor:
        """lambda(t) = log(alpha_t^2 / sigma_t^2), decreasing in t."""
        alpha, sigma = self.marginal(t, xp=xp)
        return 2.0 * (xp.log(alpha) - xp.log(sigma))

    def sigma_ratio(self, t, xp=torch) -> Tensor:
        """sigma_t / alpha_t, the noise level of x_t / alpha_t (EDM's sigma)."""
        alpha, sigma = self.marginal(t, xp=xp)
        return sigma / alpha

    def t_from_sigma_ratio(self, s, xp=torch) -> Tensor:
        """Time at which sigma_t / alpha_t equals s."""
        s = _arr(s, xp)
        return self.t_from_log_snr(-2.0 * xp.log(s), xp=xp)

    def perturb(self, x0: Tensor, t, noise: Tensor) -> Tensor:
        """x_t = alpha_t x0 + sigma_t noise. x0, noise: (B, *S); t: () or (B,)."""
        alpha, sigma = self.marginal(_as_tensor(t, x0))
        return broadcast_like(alpha, x0) * x0 + broadcast_like(sigma, x0) * noise

    def prior_sample(self, shape: Sequence[int], generator: torch.Generator | None = None,
                     dtype: torch.dtype | None = None, device=None) -> Tensor:
        """x_T ~ N(0, prior_std^2 I) of the given shape."""
        return self.prior_std * draw(torch.randn, tuple(shape), generator=generator, dtype=dtype, device=device)

    def prior_log_prob(self, x: Tensor) -> Tensor:
        """log N(x; 0, prior_std^2 I) per sample. x: (B, *S) -> (B,)."""
        d = x[0].numel()
        sq = x.reshape(x.shape[0], -1).pow(2).sum(1)
        return -0.5 * sq / self.prior_std**2 - 0.5 * d * math.log(2 * math.pi * self.prior_std**2)

    def reverse_drift(self, x: Tensor, t, score: Tensor, probability_flow: bool = False, xp=torch) -> Tensor:
        """Drift of the reverse-time SDE (or of the probability-flow ODE) at (x, t)."""
        t = _as_tensor(t, x) if xp is torch else t
        g2 = _per_sample(self.diffusion(t, xp=xp) ** 2, x, xp)
        return self.drift(x, t, xp=xp) - (0.5 if probability_flow else 1.0) * g2 * score

    @abstractmethod
    def config(self) -> dict:
        """Keyword arguments that rebuild this SDE with `make_sde`."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


VP_SCHEDULES = ("linear", "cosine")     # VPSDE(schedule=...)


class VPSDE(SDE):
    """Variance preserving SDE (DDPM in continuous time): f = -beta(t)/2, g = sqrt(beta(t)).

    schedule="linear": beta(t) = beta_min + t (beta_max - beta_min) on [t_min, 1].
    schedule="cosine": alpha_t = cos(pi/2 (t+s)/(1+s)) / cos(pi/2 s/(1+s)), beta = -2 d log alpha / dt;
    beta blows up at t=1, so the default t_max is 0.9946 (log-SNR about -10), as in DPM-Solver.
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, schedule: str = "linear",
                 cosine_s: float = 0.008, t_min: float = 1e-3, t_max: float | None = None):
        if schedule not in VP_SCHEDULES:
            raise ValueError(f"unknown VPSDE schedule {schedule!r}; expected one of {list(VP_SCHEDULES)}")
        if schedule == "linear" and not (0 <= beta_min < beta_max):
            raise ValueError(f"VPSDE needs 0 <= beta_min < beta_max, got beta_min={beta_min}, beta_max={beta_max}")
        self.beta_min, self.beta_max, self.schedule, self.cosine_s = float(beta_min), float(beta_max), schedule, float(cosine_s)
        self.t_min = float(t_min)
        self.t_max = float(t_max if t_max is not None else (1.0 if schedule == "linear" else 0.9946))
        if not 0 < self.t_min < self.t_max:
            raise ValueError(f"need 0 < t_min < t_max, got t_min={self.t_min}, t_max={self.t_max}")
        self._cos0 = math.cos(math.pi / 2 * self.cosine_s / (1 + self.cosine_s))

    def _log_alpha(self, t: Tensor, xp=torch) -> Tensor:
        if self.schedule == "linear":
            return -0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)
        # log(cos(phase_0 + d) / cos(phase_0)) = log1p(cos d - 1 - tan(phase_0) sin d), d = pi/2 t / (1 + s):
        # the difference log cos(phase) - log cos0 would lose every digit of a tiny log alpha at small t.
        d = (math.pi / 2 / (1 + self.cosine_s)) * t
        tan0 = math.tan(math.pi / 2 * self.cosine_s / (1 + self.cosine_s))
        return xp.log1p(-2.0 * xp.sin(0.5 * d) ** 2 - tan0 * xp.sin(d))

    def beta(self, t, xp=torch) -> Tensor:
        t = _arr(t, xp)
        if self.schedule == "linear":
            return self.beta_min + t * (self.beta_max - self.beta_min)
        phase = math.pi / 2 * (t + self.cosine_s) / (1 + self.cosine_s)
        return math.pi / (1 + self.cosine_s) * xp.tan(phase)

    def marginal(self, t, xp=torch):
        log_alpha = self._log_alpha(_arr(t, xp), xp)
        # sigma^2 = 1 - alpha^2 = -expm1(2 log alpha): accurate at small t.
        return xp.exp(log_alpha), xp.sqrt(-xp.expm1(2.0 * log_alpha))

    def drift_coef(self, t, xp=torch):
        return -0.5 * self.beta(t, xp=xp)

    def diffusion(self, t, xp=torch):
        return xp.sqrt(self.beta(t, xp=xp))

    def log_snr(self, t, xp=torch):
        two_log_alpha = 2.0 * self._log_alpha(_arr(t, xp), xp)
        return two_log_alpha - xp.log(-xp.expm1(two_log_alpha))

    def _t_from_neg_two_log_alpha(self, neg_two_log_alpha: Tensor, xp=torch) -> Tensor:
        """Linear schedule: the root t >= 0 of beta_min t + (beta_max - beta_min) t^2 / 2 = -2 log alpha,
        in the form without cancellation (2c / (b + sqrt(b^2 + 2ac)) rather than (-b + sqrt(...)) / a)."""
        b0, db = self.beta_min, self.beta_max - self.beta_min
        return 2.0 * neg_two_log_alpha / (b0 + xp.sqrt(b0**2 + 2.0 * db * neg_two_log_alpha))

    def t_from_log_snr(self, lam, xp=torch):
        lam = _arr(lam, xp)
        if self.schedule == "linear":
            # alpha^2 = sigmoid(lam), so -2 log alpha = softplus(-lam)
            return self._t_from_neg_two_log_alpha(_softplus(-lam, xp), xp)
        # cos(phase_t) = alpha_t cos(phase_0) with t = (phase_t - phase_0) 2 (1 + s) / pi. Solve for the
        # difference d = phase_t - phase_0 directly (arccos, then subtracting phase_0, cancels at small t):
        # with S = sin(phase_t) = sqrt(1 - alpha^2 cos0^2) = sqrt(sigma^2 cos0^2 + sin0^2),
        # sin d = cos0 sigma^2 / (S + alpha sin0) and cos d = alpha cos0^2 + S sin0.
        cos0 = self._cos0
        sin0 = math.sin(math.pi / 2 * self.cosine_s / (1 + self.cosine_s))
        alpha, sigma2 = xp.sqrt(_sigmoid(lam, xp)), _sigmoid(-lam, xp)
        S = xp.sqrt(sigma2 * cos0**2 + sin0**2)
        d = xp.arctan2(cos0 * sigma2 / (S + alpha * sin0), alpha * cos0**2 + S * sin0)
        return d * (2.0 * (1 + self.cosine_s) / math.pi)

    def config(self):
        return dict(name="vp", beta_min=self.beta_min, beta_max=self.beta_max, schedule=self.schedule,
                    cosine_s=self.cosine_s, t_min=self.t_min, t_max=self.t_max)


class SubVPSDE(VPSDE):
    """Sub-VP SDE (Song et al. 2021): f = -beta/2, g^2 = beta (1 - alpha^4), sigma_t = 1 - alpha_t^2."""

    name = "subvp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0):
        super().__init__(beta_min, beta_max, "linear", t_min=t_min, t_max=t_max)

    def marginal(self, t, xp=torch):
        log_alpha = self._log_alpha(_arr(t, xp), xp)
        return xp.exp(log_alpha), -xp.expm1(2.0 * log_alpha)

    def diffusion(self, t, xp=torch):
        t = _arr(t, xp)
        return xp.sqrt(self.beta(t, xp=xp) * -xp.expm1(4.0 * self._log_alpha(t, xp)))

    def log_snr(self, t, xp=torch):
        two_log_alpha = 2.0 * self._log_alpha(_arr(t, xp), xp)
        return two_log_alpha - 2.0 * xp.log(-xp.expm1(two_log_alpha))

    def t_from_log_snr(self, lam, xp=torch):
        lam = _arr(lam, xp)
        # a = alpha^2 solves e^lam (1 - a)^2 = a; its root in (0, 1) has (1 - a) / a = q / 2 + sqrt(q + q^2 / 4),
        # q = e^-lam, so -log a = log1p(q / 2 + sqrt(q) sqrt(1 + q / 4)) (no cancellation; for lam >= 0, q <= 1),
        # = -lam + log(e^lam + 1/2 + sqrt(e^lam + 1/4)) (for lam < 0, where q would overflow).
        # (The textbook root (2e + 1 - sqrt(4e + 1)) / (2e), e = e^lam, cancels: NaN below lam ~ -19 in float64.)
        neg, pos = xp.clip(lam, max=0.0), xp.clip(lam, min=0.0)
        e, q = xp.exp(neg), xp.exp(-pos)
        from_neg = -neg + xp.log(e + 0.5 + xp.sqrt(e + 0.25))
        from_pos = xp.log1p(0.5 * q + xp.exp(-0.5 * pos) * xp.sqrt(1.0 + 0.25 * q))
        return self._t_from_neg_two_log_alpha(xp.where(lam < 0, from_neg, from_pos), xp)

    def config(self):
        return dict(name="subvp", beta_min=self.beta_min, beta_max=self.beta_max, t_min=self.t_min, t_max=self.t_max)


class VESDE(SDE):
    """Variance exploding SDE: f = 0, g(t) = s(t) sqrt(2 log(sigma_max/sigma_min)), s(t) = sigma_min (sigma_max/sigma_min)^t.

    The exact marginal of this SDE started at t=0 has sigma_t^2 = s(t)^2 - sigma_min^2 (the integral
    of g^2); the default t_min = log 2 / (2 log(sigma_max/sigma_min)) is where sigma_t = sigma_min.
    """

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float | None = None, t_max: float = 1.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"VESDE needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)
        self.t_min = float(t_min if t_min is not None else math.log(2.0) / (2 * self._log_ratio))
        self.t_max = float(t_max)
        if not 0 < self.t_min < self.t_max:
            raise ValueError(f"need 0 < t_min < t_max, got t_min={self.t_min}, t_max={self.t_max}")
        self.prior_std = float(self.marginal(torch.tensor(self.t_max, dtype=torch.float64))[1])

    def marginal(self, t, xp=torch):
        t = _arr(t, xp)
        sigma = self.sigma_min * xp.sqrt(xp.expm1(2.0 * t * self._log_ratio))
        return xp.ones_like(t), sigma

    def drift_coef(self, t, xp=torch):
        return xp.zeros_like(_arr(t, xp))

    def diffusion(self, t, xp=torch):
        t = _arr(t, xp)
        return self.sigma_min * xp.exp(t * self._log_ratio) * math.sqrt(2 * self._log_ratio)

    def t_from_log_snr(self, lam, xp=torch):
        lam = _arr(lam, xp)
        # sigma^2 = exp(-lam) = sigma_min^2 (exp(2 t L) - 1), so 2 t L = log1p(exp(-lam - 2 log sigma_min)),
        # a softplus (written so that exp(-lam) cannot overflow at very negative lam)
        x = -lam - 2.0 * math.log(self.sigma_min)
        return xp.logaddexp(x, xp.zeros_like(x)) / (2 * self._log_ratio)

    def config(self):
        return dict(name="ve", sigma_min=self.sigma_min, sigma_max=self.sigma_max, t_min=self.t_min, t_max=self.t_max)


class EDM(SDE):
    """Karras et al. (2022): sigma_t = t, alpha_t = 1, so f = 0 and g = sqrt(2 t); t runs over [sigma_min, sigma_max].

    rho sets the default time grid of the samplers (default_grid = "edm": sigma_i^(1/rho) uniformly spaced),
    which every sampler that steps in t uses unless given `grid` or `ts` (equal steps of t = sigma would spend
    almost every step at large sigma); sigma_data is the data scale used by the preconditioning
    (`sdekit.precond.Denoiser`) and the "edm" loss weighting, both of which read it from here by default.
    """

    name = "edm"
    default_grid = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, sigma_data: float = 0.5):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"EDM needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if rho <= 0 or sigma_data <= 0:
            raise ValueError(f"EDM needs rho > 0 and sigma_data > 0, got rho={rho}, sigma_data={sigma_data}")
        self.sigma_min, self.sigma_max, self.rho, self.sigma_data = float(sigma_min), float(sigma_max), float(rho), float(sigma_data)
        self.t_min, self.t_max = self.sigma_min, self.sigma_max
        self.prior_std = self.sigma_max

    def marginal(self, t, xp=torch):
        t = _arr(t, xp)
        return xp.ones_like(t), t

    def drift_coef(self, t, xp=torch):
        return xp.zeros_like(_arr(t, xp))

    def diffusion(self, t, xp=torch):
        return xp.sqrt(2.0 * _arr(t, xp))

    def t_from_log_snr(self, lam, xp=torch):
        return xp.exp(-0.5 * _arr(lam, xp))

    def config(self):
        return dict(name="edm", sigma_min=self.sigma_min, sigma_max=self.sigma_max, rho=self.rho, sigma_data=self.sigma_data)


SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE, "edm": EDM}


def make_sde(name: str, **kwargs) -> SDE:
    """Build an SDE by name ('vp', 'subvp', 've', 'edm') from keyword arguments."""
    if name not in SDES:
        raise ValueError(f"unknown SDE {name!r}; expected one of {sorted(SDES)}")
    return SDES[name](**kwargs)

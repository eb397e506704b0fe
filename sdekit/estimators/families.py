"""Distribution families q_phi(z) with a flat parameter vector, for comparing gradient estimators.

Every family maps parameters theta: (n, P) -- one row per sample, so that autograd of a sum gives
per-sample gradients -- and a generator to samples z: (n, d). Continuous families sample by an
explicit reparameterization z = g_theta(eps) with eps drawn from `generator` (so `rsample` is
differentiable in theta); Gamma uses implicit reparameterization through torch's
`Gamma.rsample`; Categorical and Bernoulli are discrete and can only be used through their score
(their relaxations Concrete and RelaxedBernoulli are reparameterizable, at a bias).

    fam = make_family("laplace", d=4)
    theta = fam.theta0.expand(n, -1)          # (n, P)
    z = fam.rsample(theta, generator=gen)     # (n, d), differentiable in theta
    logq = fam.log_prob(theta, z)             # (n,)
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .relaxed import gumbel_noise, gumbel_softmax

__all__ = ["Family", "GaussianDiag", "GaussianFull", "Laplace", "Logistic", "Exponential", "Gamma",
           "Categorical", "Concrete", "Bernoulli", "RelaxedBernoulli", "FAMILIES", "CONTINUOUS", "DISCRETE",
           "make_family", "uniform_open"]

DTYPE = torch.float64


def uniform_open(shape, *, generator: torch.Generator | None, dtype=DTYPE) -> Tensor:
    """U(0, 1) strictly inside the interval, so that log(u) and log(1 - u) are finite."""
    eps = torch.finfo(dtype).eps
    return torch.rand(shape, generator=generator, dtype=dtype).clamp(eps, 1 - eps)


class Family(ABC):
    """Base class. Subclasses set name, d, theta0: (P,), labels: list of P names, and implement
    `split`, `log_prob`, and `rsample` (reparameterizable) or `sample` (discrete)."""

    name: str = "family"
    reparameterizable: bool = True
    discrete: bool = False

    def __init__(self, d: int, theta0: Tensor, labels: list[str]):
        if d < 1:
            raise ValueError(f"{self.name}: dimension d must be >= 1, got {d}")
        self.d, self.theta0, self.labels = d, theta0, labels
        if theta0.shape != (len(labels),):
            raise ValueError(f"{self.name}: theta0 has shape {tuple(theta0.shape)}, expected ({len(labels)},)")

    @property
    def n_params(self) -> int:
        return self.theta0.numel()

    def check(self, theta: Tensor) -> Tensor:
        if theta.ndim != 2 or theta.shape[1] != self.n_params:
            raise ValueError(f"{self.name}: theta must be (n, {self.n_params}), got {tuple(theta.shape)}")
        return theta

    def rsample(self, theta: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """z: (n, d) as a differentiable function of theta: (n, P)."""
        raise ValueError(f"family {self.name!r} is not reparameterizable; use a score-function estimator")

    def sample(self, theta: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """z: (n, d) with no gradient path to theta (what the score-function estimator sees)."""
        with torch.no_grad():
            return self.rsample(theta.detach(), generator=generator)

    @abstractmethod
    def log_prob(self, theta: Tensor, z: Tensor) -> Tensor:
        """log q_theta(z): (n,) for theta: (n, P), z: (n, d)."""

    def mean(self, theta: Tensor) -> Tensor:
        """E[z]: (d,) for one parameter vector theta: (P,), differentiable (used by control variates)."""
        raise NotImplementedError(f"family {self.name!r} has no closed-form mean")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(d={self.d}, P={self.n_params})"


class _LocScale(Family):
    """theta = [loc (d), scale (d)]; z = loc + scale * eps with eps from a fixed base law."""

    def split(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        theta = self.check(theta)
        return theta[:, : self.d], theta[:, self.d:]

    @abstractmethod
    def base(self, shape, generator) -> Tensor:
        """Standard draws eps of the family's base law, of the given shape."""

    def rsample(self, theta, *, generator=None):
        loc, scale = self.split(theta)
        return loc + scale * self.base(loc.shape, generator)

    def mean(self, theta):
        return theta[: self.d]

    @staticmethod
    def default(d: int, loc: float, scale: float) -> tuple[Tensor, list[str]]:
        theta = torch.cat([torch.full((d,), loc, dtype=DTYPE), torch.full((d,), scale, dtype=DTYPE)])
        return theta, [f"loc[{i}]" for i in range(d)] + [f"scale[{i}]" for i in range(d)]


class GaussianDiag(_LocScale):
    """N(mu, diag(sigma^2)); theta = [mu, sigma]."""

    name = "gaussian_diag"

    def __init__(self, d: int, mu: float = 0.5, sigma: float = 1.0):
        super().__init__(d, *self.default(d, mu, sigma))

    def base(self, shape, generator):
        return torch.randn(shape, generator=generator, dtype=DTYPE)

    def log_prob(self, theta, z):
        mu, sigma = self.split(theta)
        return (-0.5 * ((z - mu) / sigma) ** 2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)).sum(-1)


class Laplace(_LocScale):
    """Laplace(loc, b): density exp(-|z - loc| / b) / (2b); eps by the inverse CDF."""

    name = "laplace"

    def __init__(self, d: int, loc: float = 0.5, scale: float = 0.8):
        super().__init__(d, *self.default(d, loc, scale))

    def base(self, shape, generator):
        u = uniform_open(shape, generator=generator) - 0.5
        return -torch.sign(u) * torch.log1p(-2 * u.abs())

    def log_prob(self, theta, z):
        loc, b = self.split(theta)
        return (-(z - loc).abs() / b - torch.log(2 * b)).sum(-1)


class Logistic(_LocScale):
    """Logistic(loc, s): eps = log u - log(1 - u)."""

    name = "logistic"

    def __init__(self, d: int, loc: float = 0.5, scale: float = 0.5):
        super().__init__(d, *self.default(d, loc, scale))

    def base(self, shape, generator):
        u = uniform_open(shape, generator=generator)
        return torch.log(u) - torch.log1p(-u)

    def log_prob(self, theta, z):
        loc, s = self.split(theta)
        y = (z - loc) / s
        return (-y - 2 * F.softplus(-y) - torch.log(s)).sum(-1)


class GaussianFull(Family):
    """N(mu, L L^T) with L lower triangular; theta = [mu (d), the d(d+1)/2 entries of L by rows].

    Default L has 1 on the diagonal and 0.1 below it, so the coordinates are correlated.
    """

    name = "gaussian_full"

    def __init__(self, d: int, mu: float = 0.5, diag: float = 1.0, off: float = 0.1):
        rows, cols = torch.tril_indices(d, d)
        self.rows, self.cols = rows, cols
        tril = torch.where(rows == cols, torch.tensor(diag, dtype=DTYPE), torch.tensor(off, dtype=DTYPE))
        theta = torch.cat([torch.full((d,), mu, dtype=DTYPE), tril])
        super().__init__(d, theta, [f"mu[{i}]" for i in range(d)] + [f"L[{r},{c}]" for r, c in zip(rows.tolist(), cols.tolist())])

    def split(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        theta = self.check(theta)
        n, d = theta.shape[0], self.d
        L = theta.new_zeros(n, d, d)
        L[:, self.rows, self.cols] = theta[:, d:]
        return theta[:, :d], L

    def rsample(self, theta, *, generator=None):
        mu, L = self.split(theta)
        eps = torch.randn(mu.shape, generator=generator, dtype=DTYPE)
        return mu + (L @ eps.unsqueeze(-1)).squeeze(-1)

    def log_prob(self, theta, z):
        mu, L = self.split(theta)
        y = torch.linalg.solve_triangular(L, (z - mu).unsqueeze(-1), upper=False).squeeze(-1)
        logdet = torch.log(torch.diagonal(L, dim1=-2, dim2=-1).abs()).sum(-1)
        return -0.5 * (y ** 2).sum(-1) - logdet - 0.5 * self.d * math.log(2 * math.pi)

    def mean(self, theta):
        return theta[: self.d]

    def covariance(self, theta: Tensor) -> Tensor:
        """L L^T: (d, d) for theta: (P,)."""
        _, L = self.split(theta.unsqueeze(0))
        return (L @ L.transpose(-1, -2))[0]


class Exponential(Family):
    """Exponential(rate); z = -log(1 - u) / rate."""

    name = "exponential"

    def __init__(self, d: int, rate: float = 1.0):
        super().__init__(d, torch.full((d,), rate, dtype=DTYPE), [f"rate[{i}]" for i in range(d)])

    def rsample(self, theta, *, generator=None):
        rate = self.check(theta)
        return -torch.log1p(-uniform_open(rate.shape, generator=generator)) / rate

    def log_prob(self, theta, z):
        rate = self.check(theta)
        return (torch.log(rate) - rate * z).sum(-1)

    def mean(self, theta):
        return 1.0 / theta


class Gamma(Family):
    """Gamma(concentration alpha, rate beta); theta = [alpha (d), beta (d)].

    There is no closed-form inverse CDF, so the gradient in alpha is the implicit one
    dz/dalpha = -(dF/dalpha) / q(z) (Figurnov et al. 2018), which torch's `Gamma.rsample` implements.
    That sampler reads the global RNG, so a seed is drawn from `generator` and the global state is
    forked around the call: results stay a function of the generator and nothing else leaks.
    """

    name = "gamma"

    def __init__(self, d: int, concentration: float = 2.0, rate: float = 1.5):
        theta = torch.cat([torch.full((d,), concentration, dtype=DTYPE), torch.full((d,), rate, dtype=DTYPE)])
        super().__init__(d, theta, [f"alpha[{i}]" for i in range(d)] + [f"beta[{i}]" for i in range(d)])

    def split(self, theta):
        theta = self.check(theta)
        return theta[:, : self.d], theta[:, self.d:]

    def rsample(self, theta, *, generator=None):
        alpha, beta = self.split(theta)
        dist = torch.distributions.Gamma(alpha, beta, validate_args=False)
        if generator is None:
            return dist.rsample()
        seed = int(torch.randint(0, 2 ** 62, (), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return dist.rsample()

    def log_prob(self, theta, z):
        alpha, beta = self.split(theta)
        return torch.distributions.Gamma(alpha, beta, validate_args=False).log_prob(z).sum(-1)

    def mean(self, theta):
        return theta[: self.d] / theta[self.d:]


class Categorical(Family):
    """Categorical(softmax(logits)) over K = d outcomes, as one-hot z: (n, K). Not reparameterizable."""

    name = "categorical"
    reparameterizable = False
    discrete = True

    def __init__(self, d: int, logits: Tensor | None = None):
        logits = torch.linspace(-1.0, 1.0, d, dtype=DTYPE) if logits is None else logits.to(DTYPE)
        super().__init__(d, logits, [f"logit[{i}]" for i in range(d)])

    def sample(self, theta, *, generator=None):
        with torch.no_grad():
            logits = self.check(theta).detach()
            k = torch.argmax(logits + gumbel_noise(logits.shape, generator=generator, dtype=logits.dtype), -1)  # Gumbel-max
            return F.one_hot(k, self.d).to(logits.dtype)

    def log_prob(self, theta, z):
        return (z * torch.log_softmax(self.check(theta), -1)).sum(-1)

    def mean(self, theta):
        return torch.softmax(theta, -1)

    def probs(self, theta: Tensor) -> Tensor:
        return torch.softmax(theta, -1)


class _Relaxation:
    """A continuous relaxation of a discrete family at a temperature; hard=True is its straight-through variant.
    Holds what Concrete and RelaxedBernoulli share: the temperature check and sampling without a gradient."""

    def __init__(self, d: int, temperature: float = 0.5, hard: bool = False, logits: Tensor | None = None):
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        super().__init__(d, logits)
        self.temperature, self.hard = float(temperature), hard

    def sample(self, theta, *, generator=None):
        with torch.no_grad():
            return self.rsample(theta.detach(), generator=generator)


class Concrete(_Relaxation, Categorical):
    """Gumbel-softmax / Concrete relaxation of `Categorical` at a temperature (Jang et al. 2017;
    Maddison et al. 2017). rsample is a point of the simplex; hard=True gives the straight-through
    variant (one-hot forward, relaxed backward). Both give biased gradients of the categorical
    expectation; the bias vanishes as temperature -> 0 while the variance grows."""

    name = "concrete"
    reparameterizable = True

    def rsample(self, theta, *, generator=None):
        return gumbel_softmax(self.check(theta), self.temperature, hard=self.hard, generator=generator)

    def log_prob(self, theta, z):
        if self.hard:
            raise ValueError("the straight-through Concrete sample has no density; use hard=False")
        dist = torch.distributions.RelaxedOneHotCategorical(torch.tensor(self.temperature, dtype=DTYPE),
                                                            logits=self.check(theta), validate_args=False)
        return dist.log_prob(z)

    def mean(self, theta):
        raise NotImplementedError("the Concrete distribution has no closed-form mean")

    def __repr__(self) -> str:
        return f"Concrete(K={self.d}, temperature={self.temperature}, hard={self.hard})"


class Bernoulli(Family):
    """d independent Bernoulli(sigmoid(logit_i)) as z in {0, 1}^d; theta = logits (d,). Not reparameterizable:
    z = 1[u < p] is piecewise constant in the logits, so a path through the sample carries no gradient."""

    name = "bernoulli"
    reparameterizable = False
    discrete = True

    def __init__(self, d: int, logits: Tensor | None = None):
        if logits is None:
            logits = torch.linspace(-0.5, 1.0, d, dtype=DTYPE) if d > 1 else torch.tensor([0.25], dtype=DTYPE)
        super().__init__(d, logits.to(DTYPE), [f"logit[{i}]" for i in range(d)])

    def sample(self, theta, *, generator=None):
        with torch.no_grad():
            logits = self.check(theta).detach()
            # z = 1 exactly when logit + logistic noise > 0, the event RelaxedBernoulli's hard sample uses
            u = uniform_open(logits.shape, generator=generator, dtype=logits.dtype)
            return (logits + torch.log(u) - torch.log1p(-u) > 0).to(logits.dtype)

    def log_prob(self, theta, z):
        logits = self.check(theta)
        return (z * F.logsigmoid(logits) + (1 - z) * F.logsigmoid(-logits)).sum(-1)

    def mean(self, theta):
        return torch.sigmoid(theta)

    def probs(self, theta: Tensor) -> Tensor:
        return torch.sigmoid(theta)


class RelaxedBernoulli(_Relaxation, Bernoulli):
    """Binary Concrete (Maddison et al. 2017): z = sigmoid((logit + log u - log(1 - u)) / temperature) in (0, 1).
    hard=True gives the straight-through variant: forward 1[logit + logistic noise > 0], an exact Bernoulli
    sample, with the relaxed sample's gradient. Both are biased for the Bernoulli expectation."""

    name = "relaxed_bernoulli"
    reparameterizable = True

    def rsample(self, theta, *, generator=None):
        logits = self.check(theta)
        u = uniform_open(logits.shape, generator=generator, dtype=logits.dtype)
        y = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / self.temperature)
        if not self.hard:
            return y
        return (y > 0.5).to(y.dtype) + y - y.detach()

    def log_prob(self, theta, z):
        if self.hard:
            raise ValueError("the straight-through relaxed Bernoulli sample has no density; use hard=False")
        dist = torch.distributions.RelaxedBernoulli(torch.tensor(self.temperature, dtype=DTYPE),
                                                    logits=self.check(theta), validate_args=False)
        return dist.log_prob(z).sum(-1)

    def mean(self, theta):
        raise NotImplementedError("the relaxed Bernoulli has no closed-form mean")

    def __repr__(self) -> str:
        return f"RelaxedBernoulli(d={self.d}, temperature={self.temperature}, hard={self.hard})"


FAMILIES: dict[str, Callable[..., Family]] = {
    "gaussian_diag": GaussianDiag,
    "gaussian_full": GaussianFull,
    "laplace": Laplace,
    "logistic": Logistic,
    "exponential": Exponential,
    "gamma": Gamma,
    "categorical": Categorical,
    "concrete": Concrete,
    "bernoulli": Bernoulli,
    "relaxed_bernoulli": RelaxedBernoulli,
}
CONTINUOUS = ("gaussian_diag", "gaussian_full", "laplace", "logistic", "exponential", "gamma")
DISCRETE = ("categorical", "bernoulli")


def make_family(name: str, d: int, **kw) -> Family:
    """A family by name with its default parameters (keywords override them)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name](d, **kw)

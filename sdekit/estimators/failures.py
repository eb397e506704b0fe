"""Where the pathwise estimator fails, a detector that notices, and the unbiased alternatives.

The pathwise estimate grad_theta f(g_theta(eps)) is the gradient of the Monte Carlo objective
(1/n) sum_i f(g_theta(eps_i)) with the noise held fixed. It is the gradient of E[f] only when f(g_theta(eps))
is differentiable in theta for almost every eps, with no mass lost at jumps. Three ways it breaks:

- f piecewise constant (floor): the autograd gradient is 0 almost everywhere, yet E[f] moves with theta,
  because samples cross the jumps. The estimate is 0 +- 0, silently.
- f or the sampler has no autograd path (an indicator written as a comparison, a categorical drawn by
  argmax): the gradient is undefined; autograd raises.
- f smooth between jumps (jump: z + 1[z > c]): autograd sees the slope and misses the jumps; the
  estimate is finite, plausible and wrong.

A discrete latent is the same failure in the sampler: Bernoulli(p) written as floor(p + u) is an exact
sample whose path is flat in p.

`check_pathwise` compares the pathwise estimate with a central finite difference of the same Monte Carlo
objective on common random numbers, D_i = (f(g_{theta + h e_p}(eps_i)) - f(g_{theta - h e_p}(eps_i))) / 2h,
whose mean is an unbiased estimate of (E f(theta + h) - E f(theta - h)) / 2h for any f (smooth or not), with
a standard error from the per-sample D_i. Per parameter it says

    undefined  no gradient path, or a non-finite value
    zero       every per-sample pathwise gradient is exactly 0 while the finite difference is significantly
               nonzero (the objective varies with the parameter)
    mismatch   the pathwise mean differs from the finite difference by more than z combined standard errors
    ok         otherwise

with z the two-sided Bonferroni threshold for 2P tests at level alpha. The standard errors are combined
as if the two means were independent; with common random numbers they are positively correlated, so
the test is conservative, and the O(h^2) truncation of the difference is far below a standard error at
the default h for the smooth objectives here (the sweep in `report` runs the check on every cell).

`failure_modes` runs the demonstration: each case against its closed-form gradient, next to the score
function with a baseline (unbiased for all of them) and, for discrete latents, the Gumbel-softmax /
binary Concrete relaxation, whose bias against the temperature is the price of a pathwise gradient.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .families import Bernoulli, Categorical, Concrete, Family, GaussianDiag, RelaxedBernoulli, uniform_open
from .gradients import GradientEstimate, estimate_gradient, pathwise, summarize
from .oracles import Objective, exact_gradient, floor_gradient_gaussian, make_objective
from .relaxed import gumbel_noise

__all__ = ["PathwiseCheck", "check_pathwise", "bonferroni_z", "FloorBernoulli", "ArgmaxCategorical",
           "FAILURE_CASES", "failure_modes"]

VERDICTS = ("ok", "zero", "undefined", "mismatch")


def bonferroni_z(alpha: float, m: int) -> float:
    """Two-sided threshold for m tests at family-wise level alpha: Phi^-1(1 - alpha / (2m))."""
    if not 0 < alpha < 1 or m < 1:
        raise ValueError(f"need 0 < alpha < 1 and m >= 1, got alpha={alpha}, m={m}")
    return torch.special.ndtri(torch.tensor(1 - alpha / (2 * m), dtype=torch.float64)).item()


@dataclass
class PathwiseCheck:
    """The detector's findings for one (family, objective, theta).

    verdicts: one of VERDICTS per checked parameter (params: their indices; labels: their names);
    pathwise: the pathwise estimate of those parameters (None when undefined); finite_difference: the
    common-random-numbers central difference of the Monte Carlo objective; h: the steps; z: the threshold in
    standard errors; error: autograd's message when there was no path.
    """

    verdicts: list[str]
    pathwise: GradientEstimate | None
    finite_difference: GradientEstimate
    h: Tensor
    z: float
    error: str | None = None
    labels: list[str] = field(default_factory=list)
    params: list[int] = field(default_factory=list)

    @property
    def fired(self) -> bool:
        return any(v != "ok" for v in self.verdicts)

    def counts(self) -> dict[str, int]:
        return {v: self.verdicts.count(v) for v in VERDICTS if v in self.verdicts}

    def summary(self) -> str:
        """'ok' or e.g. 'zero 1/2, mismatch 1/2'."""
        if not self.fired:
            return "ok"
        n = len(self.verdicts)
        return ", ".join(f"{v} {c}/{n}" for v, c in self.counts().items() if v != "ok")


def _replay(state: Tensor) -> torch.Generator:
    g = torch.Generator()
    g.set_state(state)
    return g


def check_pathwise(fam: Family, f: Objective, n: int = 4000, *, theta: Tensor | None = None, h: float = 0.02,
                   alpha: float = 1e-3, params: list[int] | None = None,
                   generator: torch.Generator | None = None) -> PathwiseCheck:
    """Is the pathwise gradient of E_q[f] trustworthy here? See the module docstring.

    The pathwise estimate and every finite-difference evaluation replay one generator state (common random
    numbers): n samples, each checked parameter p (params, default all) stepped by h_p = h * max(|theta_p|, 1).
    The generator is left where a single draw of n samples leaves it. Costs 2 len(params) + 1 evaluations of
    n samples.
    """
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    theta = (fam.theta0 if theta is None else theta).detach()
    if theta.shape != (fam.n_params,):
        raise ValueError(f"{fam.name}: theta must be ({fam.n_params},), got {tuple(theta.shape)}")
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, ())))
    state = generator.get_state()
    params = list(range(fam.n_params)) if params is None else [int(p) for p in params]
    if not params or min(params) < 0 or max(params) >= fam.n_params:
        raise ValueError(f"params must be indices in [0, {fam.n_params}), got {params}")
    z = bonferroni_z(alpha, 2 * len(params))

    error, est = None, None
    try:
        g = pathwise(fam, f, n, theta=theta, generator=_replay(state))[:, params]
        est = summarize(g)
    except (RuntimeError, ValueError) as e:           # no autograd path, or a family that refuses
        error = str(e).split("\n")[0]

    steps = h * theta[params].abs().clamp_min(1.0)
    diffs = []
    for p, step in zip(params, steps):
        e = torch.zeros_like(theta)
        e[p] = step
        up = f(fam.sample((theta + e).expand(n, -1), generator=_replay(state)))
        down = f(fam.sample((theta - e).expand(n, -1), generator=_replay(state)))
        diffs.append((up - down) / (2 * step))
    fd = summarize(torch.stack(diffs, 1))
    fam.sample(theta.expand(n, -1), generator=generator)   # advance the caller's generator past one draw

    varies = fd.mean.abs() > z * fd.stderr
    verdicts = []
    for p in range(len(params)):
        if est is None or not torch.isfinite(g[:, p]).all():
            verdicts.append("undefined")
        elif bool((g[:, p] == 0).all()):
            verdicts.append("zero" if bool(varies[p]) else "ok")
        elif abs(est.mean[p] - fd.mean[p]) > z * torch.hypot(est.stderr[p], fd.stderr[p]):
            verdicts.append("mismatch")
        else:
            verdicts.append("ok")
    return PathwiseCheck(verdicts, est, fd, steps, z, error, [fam.labels[p] for p in params], params)


class FloorBernoulli(Bernoulli):
    """Bernoulli(sigmoid(logit)) sampled as z = floor(p + u), u ~ U(0, 1): an exact sample, written with
    differentiable-looking operations, whose path is flat in the logits (what a discrete latent does to the
    pathwise estimator)."""

    name = "bernoulli_floor"
    reparameterizable = True

    def rsample(self, theta, *, generator=None):
        p = torch.sigmoid(self.check(theta))
        return torch.floor(p + uniform_open(p.shape, generator=generator, dtype=p.dtype))

    def sample(self, theta, *, generator=None):
        with torch.no_grad():
            return self.rsample(theta.detach(), generator=generator)


class ArgmaxCategorical(Categorical):
    """Categorical sampled as one_hot(argmax(logits + Gumbel noise)) (Gumbel-max): exact, and with no autograd
    path from the logits to the sample."""

    name = "categorical_argmax"
    reparameterizable = True

    def rsample(self, theta, *, generator=None):
        logits = self.check(theta)
        k = torch.argmax(logits + gumbel_noise(logits.shape, generator=generator, dtype=logits.dtype), -1)
        return F.one_hot(k, self.d).to(logits.dtype)


# (name, what it shows, family factory, objective name, relaxation factory or None)
FAILURE_CASES = (
    ("floor", "non-differentiable f: floor(z), z ~ N(0.3, 1)",
     lambda: GaussianDiag(1, mu=0.3, sigma=1.0), "floor", None),
    ("indicator", "non-differentiable f: 1[z > 0], z ~ N(0.3, 1)",
     lambda: GaussianDiag(1, mu=0.3, sigma=1.0), "indicator", None),
    ("jump", "f = z + 1[z > 0]: smooth slope, missed jump",
     lambda: GaussianDiag(1, mu=0.3, sigma=1.0), "jump", None),
    ("bernoulli", "discrete latent: Bernoulli(p) as floor(p + u), f quadratic, d = 3",
     lambda: FloorBernoulli(3), "quadratic", lambda tau, hard: RelaxedBernoulli(3, tau, hard=hard)),
    ("categorical", "discrete latent: Categorical as one_hot(argmax(logits + G)), f quadratic, K = 5",
     lambda: ArgmaxCategorical(5), "quadratic", lambda tau, hard: Concrete(5, tau, hard=hard)),
)


def _est_dict(r: GradientEstimate | None, exact: Tensor) -> dict | None:
    if r is None:
        return None
    return {"mean": r.mean.tolist(), "stderr": r.stderr.tolist(), "variance": r.variance.tolist(),
            "max_abs_z": r.z_scores(exact).abs().max().item()}


def failure_modes(n: int = 20000, temperatures=(1.0, 0.5, 0.25, 0.1), *, alpha: float = 1e-3,
                  generator: torch.Generator | None = None) -> list[dict]:
    """One row per case in FAILURE_CASES: the closed-form gradient, the pathwise estimate and the detector's
    verdicts, the score function with a baseline (pilot batch of n), and for discrete latents the relaxed and
    straight-through pathwise gradients per temperature with their bias against the discrete gradient
    (bias_z: ||bias|| in units of ||stderr||; a value near 1 is noise). For the floor case the row also holds
    the direct closed form sum_k phi(k - mu) of d/dmu E[floor z].
    """
    rows = []
    for name, what, make, obj_name, relax in FAILURE_CASES:
        fam = make()
        f = make_objective(obj_name, fam.d)
        exact = exact_gradient(fam, f)
        chk = check_pathwise(fam, f, n, alpha=alpha, generator=generator)
        sf = estimate_gradient(fam, f, "score_baseline", n, n_pilot=n, generator=generator)
        row = {"case": name, "what": what, "family": fam.name, "objective": obj_name, "labels": list(fam.labels),
               "n": n, "exact": exact.tolist(),
               "pathwise": _est_dict(chk.pathwise, exact), "pathwise_error": chk.error,
               "detector": {"verdicts": chk.verdicts, "fired": chk.fired, "summary": chk.summary(), "z": chk.z,
                            "fd_mean": chk.finite_difference.mean.tolist(),
                            "fd_stderr": chk.finite_difference.stderr.tolist(), "h": chk.h.tolist()},
               "score_baseline": _est_dict(sf, exact), "relaxed": []}
        if name == "floor":
            mu, sigma = fam.theta0.tolist()
            row["closed_form_sum"] = floor_gradient_gaussian(mu, sigma)
        if relax is not None:
            for hard in (False, True):
                for tau in temperatures:
                    rf = relax(tau, hard)
                    r = estimate_gradient(rf, f, "pathwise", n, generator=generator)
                    bias = r.mean - exact
                    row["relaxed"].append({"temperature": tau, "straight_through": hard,
                                           "mean": r.mean.tolist(), "bias_norm": bias.norm().item(),
                                           "stderr_norm": r.stderr.norm().item(),
                                           "bias_z": (bias.norm() / r.stderr.norm()).item(),
                                           "variance_mean": r.variance.mean().item()})
        rows.append(row)
    return rows

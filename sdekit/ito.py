"""Ito-correction demonstrations: numbers that show why the ordinary chain rule fails for SDEs.

Brownian motion has quadratic variation (dW)^2 = dt, so a second-order Taylor term survives in
the limit and the chain rule picks up a drift: df(X) = f'(X) dX + (1/2) g^2 f''(X) dt (Ito's
lemma). Each demonstration below runs a Monte Carlo simulation and returns its estimate with a
standard error next to the Ito answer ("theory") and the ordinary-calculus answer ("naive"):

- `w_squared`          d(W^2) = 2W dW + dt: E[W_T^2] = T, not 0.
- `riemann_sums`       left-point sums of W dW -> (W_T^2 - T)/2 (Ito); midpoint sums -> W_T^2/2 (Stratonovich).
- `gbm_log_mean`       GBM: E[log X_T] = log x0 + (mu - sigma^2/2) T, not log x0 + mu T.
- `ito_drift`          drift of f(X_t) for a user f (f', f'' by autograd), with and without (1/2) g^2 f''.
- `ito_stratonovich`   Euler-Maruyama (Ito) and Heun (Stratonovich) on the same increments converge to
                       different solutions unless Heun's drift is corrected by -(1/2) g dg/dx.

The SDEs are solved by the library's own schemes (`sdekit.simulate` with the registry's "euler" and
"heun", `sdekit.solvers`), on its Brownian increments; a scalar SDE's n paths are a batch of n
one-dimensional states.

`run_all` runs them all; `sdekit ito` (sdekit.commands.ito) prints a table and writes ito.json and ito.png.
Everything is float64: the effects are O(1), but the tests compare to theory in standard errors.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from . import solvers

__all__ = [
    "ItoResult", "RiemannResult", "ConversionResult", "DriftCurve",
    "brownian_increments", "derivatives", "w_squared", "riemann_sums", "gbm_log_mean",
    "ito_drift", "ito_drift_curve", "euler_maruyama", "stochastic_heun", "stratonovich_drift",
    "ito_stratonovich", "gbm_ito_stratonovich", "EXAMPLE_FUNCTIONS", "run_all",
]

DTYPE = torch.float64


@dataclass
class ItoResult:
    """One Monte Carlo estimate next to the Ito answer and the ordinary-calculus answer."""

    name: str
    estimate: float
    stderr: float
    theory: float
    naive: float
    n_paths: int
    extra: dict = field(default_factory=dict)

    @property
    def z_theory(self) -> float:
        """(estimate - theory) / stderr: small when the Ito answer is right."""
        return _z(self.estimate, self.theory, self.stderr)

    @property
    def z_naive(self) -> float:
        """(estimate - naive) / stderr: large when the naive chain rule is wrong."""
        return _z(self.estimate, self.naive, self.stderr)

    def as_dict(self) -> dict:
        return {**asdict(self), "z_theory": self.z_theory, "z_naive": self.z_naive}


def _z(estimate: float, reference: float, stderr: float) -> float:
    diff = estimate - reference
    if stderr > 0:
        return diff / stderr
    return 0.0 if diff == 0 else math.copysign(math.inf, diff)


def _mean_se(x: Tensor) -> tuple[float, float]:
    """Sample mean and its standard error. x: (N,)."""
    return x.mean().item(), (x.std() / math.sqrt(x.numel())).item()


def _check_positive(**kw) -> None:
    for name, v in kw.items():
        if not (v > 0):
            raise ValueError(f"{name} must be positive, got {v}")


def _grid(T: float, n_steps: int, dtype: torch.dtype = DTYPE) -> Tensor:
    """The uniform time grid of [0, T] with n_steps steps: (n_steps + 1,)."""
    return torch.linspace(0.0, T, n_steps + 1, dtype=dtype)


def brownian_increments(n_paths: int, n_steps: int, T: float = 1.0, *, generator: torch.Generator | None = None,
                        dtype: torch.dtype = DTYPE) -> Tensor:
    """Independent increments dW ~ N(0, T/n_steps) on the uniform grid of [0, T]. Returns (n_steps, n_paths)."""
    _check_positive(n_paths=n_paths, n_steps=n_steps, T=T)
    return solvers.brownian_increments(_grid(T, n_steps, dtype), (n_paths,), generator)


def _solve(scheme: str, b: Callable[[Tensor], Tensor], g: Callable[[Tensor], Tensor], x0: Tensor, dW: Tensor,
           ts: Tensor, save: str = "end") -> Tensor:
    """dX = b(X) dt + g(X) dW by the registered `scheme` on the grid ts, one path per entry of x0.

    b, g act elementwise. x0: (P,); dW: (n, P); ts: (n+1,). Returns X at ts[-1]: (P,), or the path (n+1, P)
    with save="path".
    """
    drift = lambda t, x, theta: b(x)                     # noqa: E731  (autonomous: no t, no parameters)
    diffusion = lambda t, x, theta: g(x)                 # noqa: E731
    no_params = x0.new_zeros(0)
    x = solvers.simulate(drift, diffusion, x0[:, None], no_params, ts.to(x0.dtype), dW[..., None], scheme, save=save)
    return x[..., 0]


def derivatives(f: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """f(x), f'(x), f''(x) by autograd for an elementwise scalar function f. x: (N,) -> three (N,)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = f(x)
        if y.shape != x.shape:
            raise ValueError(f"f must act elementwise: f(x) has shape {tuple(y.shape)} for x of shape {tuple(x.shape)}")
        (d1,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        # f'' of an affine f is identically zero and autograd reports no graph: treat as 0.
        d2 = torch.autograd.grad(d1.sum(), x, allow_unused=True)[0] if d1.requires_grad else None
    d2 = torch.zeros_like(x) if d2 is None else d2
    return y.detach(), d1.detach(), d2.detach()


# --- d(W^2) = 2 W dW + dt -------------------------------------------------------------------------


def w_squared(T: float = 1.0, n_paths: int = 100_000, n_steps: int = 100, *,
              generator: torch.Generator | None = None) -> ItoResult:
    """E[W_T^2] by simulating W, against Ito's T and the naive chain rule's 0.

    The naive rule d(W^2) = 2W dW makes W_T^2 an Ito integral, whose mean is 0. Ito's lemma adds dt.
    `extra` splits the discrete identity W_T^2 = sum 2 W_i dW_i + sum dW_i^2 (exact for every path)
    into its two means: the stochastic integral (-> 0) and the quadratic variation (-> T).
    """
    dW = brownian_increments(n_paths, n_steps, T, generator=generator)
    W = torch.cumsum(dW, 0)
    W_left = W - dW
    wT2 = W[-1] ** 2
    integral = (2 * W_left * dW).sum(0)
    qv = (dW ** 2).sum(0)
    est, se = _mean_se(wT2)
    i_m, i_se = _mean_se(integral)
    q_m, q_se = _mean_se(qv)
    return ItoResult("E[W_T^2]", est, se, theory=T, naive=0.0, n_paths=n_paths, extra={
        "mean_2_int_W_dW": i_m, "se_2_int_W_dW": i_se, "mean_quadratic_variation": q_m, "se_quadratic_variation": q_se,
        "max_identity_error": (wT2 - integral - qv).abs().max().item(),
        "t": torch.linspace(T / n_steps, T, n_steps).tolist(), "mean_W2_t": (W ** 2).mean(1).tolist(),
        "se_W2_t": ((W ** 2).std(1) / math.sqrt(n_paths)).tolist(),
    })


# --- left-point vs midpoint sums ------------------------------------------------------------------


@dataclass
class RiemannResult:
    """Mean-square distances of the two Riemann sums of int_0^T W dW to the two candidate limits.

    For n steps, exactly: E[(left - (W_T^2 - T)/2)^2] = T^2 / (2n) and E[(mid - W_T^2/2)^2] = T^2 / (4n),
    while left - W_T^2/2 = -(1/2) sum dW^2 has mean -T/2 for every n: the left sum never approaches W_T^2/2.
    """

    T: float
    steps: list[int]
    ms_left_ito: list[float]      # E[(left - (W^2 - T)/2)^2]
    se_left_ito: list[float]
    ms_mid_strat: list[float]     # E[(mid - W^2/2)^2]
    se_mid_strat: list[float]
    ms_left_strat: list[float]    # E[(left - W^2/2)^2] -> T^2/4
    ms_mid_ito: list[float]       # E[(mid - (W^2 - T)/2)^2] -> T^2/4
    left_minus_strat: ItoResult   # E[left - W^2/2] at the finest grid: -T/2 (naive: 0)
    mid_minus_strat: ItoResult    # E[mid - W^2/2] at the finest grid: 0 (Stratonovich obeys the ordinary rule)

    def theory_ms_left_ito(self) -> list[float]:
        return [self.T ** 2 / (2 * n) for n in self.steps]

    def theory_ms_mid_strat(self) -> list[float]:
        return [self.T ** 2 / (4 * n) for n in self.steps]


def riemann_sums(T: float = 1.0, n_paths: int = 20_000, steps: Sequence[int] = (4, 16, 64, 256, 1024), *,
                 generator: torch.Generator | None = None) -> RiemannResult:
    """Left-point (Ito) and midpoint (Stratonovich) sums of W dW on grids of n steps, for each n in steps.

    Midpoints are true Brownian values W((t_i + t_{i+1})/2), so each n simulates 2n half-steps.
    """
    if not steps or any(int(n) < 1 for n in steps):
        raise ValueError(f"steps must be positive integers, got {list(steps)}")
    cols = {k: [] for k in ("ms_left_ito", "se_left_ito", "ms_mid_strat", "se_mid_strat", "ms_left_strat", "ms_mid_ito")}
    for n in steps:
        half = brownian_increments(n_paths, 2 * int(n), T, generator=generator).reshape(int(n), 2, n_paths)
        dW = half.sum(1)                                   # (n, P) increments over the coarse steps
        W_right = torch.cumsum(dW, 0)
        W_left = W_right - dW
        W_mid = W_left + half[:, 0]
        left, mid = (W_left * dW).sum(0), (W_mid * dW).sum(0)
        ito, strat = (W_right[-1] ** 2 - T) / 2, W_right[-1] ** 2 / 2
        for key, err in (("left_ito", left - ito), ("mid_strat", mid - strat)):
            m, se = _mean_se(err ** 2)
            cols["ms_" + key].append(m)
            cols["se_" + key].append(se)
        cols["ms_left_strat"].append(((left - strat) ** 2).mean().item())
        cols["ms_mid_ito"].append(((mid - ito) ** 2).mean().item())
    m, se = _mean_se(left - strat)
    lms = ItoResult("E[left sum - W_T^2/2]", m, se, theory=-T / 2, naive=0.0, n_paths=n_paths, extra={"steps": int(steps[-1])})
    m, se = _mean_se(mid - strat)
    mms = ItoResult("E[midpoint sum - W_T^2/2]", m, se, theory=0.0, naive=0.0, n_paths=n_paths, extra={"steps": int(steps[-1])})
    return RiemannResult(T, [int(n) for n in steps], **cols, left_minus_strat=lms, mid_minus_strat=mms)


# --- geometric Brownian motion ----------------------------------------------------------------------


def gbm_log_mean(x0: float = 1.0, mu: float = 0.5, sigma: float = 0.8, T: float = 1.0, n_paths: int = 20_000,
                 n_steps: int = 500, *, generator: torch.Generator | None = None) -> ItoResult:
    """E[log X_T] for dX = mu X dt + sigma X dW simulated by Euler-Maruyama (no closed form used).

    Ito: log x0 + (mu - sigma^2/2) T. Naive (d log X = dX/X): log x0 + mu T. The Euler bias is
    O(T/n_steps), far below the standard error at the defaults. `extra` has the mean path over time
    and E[X_T], which both calculi agree on (x0 e^{mu T}): the correction lives in the nonlinearity.
    """
    _check_positive(x0=x0, sigma=sigma, T=T)
    dW = brownian_increments(n_paths, n_steps, T, generator=generator)
    path = _solve("euler", lambda x: mu * x, lambda x: sigma * x, torch.full((n_paths,), float(x0), dtype=DTYPE), dW,
                  _grid(T, n_steps), save="path")                               # (n_steps + 1, n_paths)
    if not bool((path > 0).all()):
        raise FloatingPointError("an Euler-Maruyama GBM path went non-positive; use more n_steps")
    log_path = torch.log(path[1:])
    mean_log = [math.log(x0), *log_path.mean(1).tolist()]
    se_log = [0.0, *(log_path.std(1) / math.sqrt(n_paths)).tolist()]
    x = path[-1]
    est, se = mean_log[-1], se_log[-1]
    m_x, se_x = _mean_se(x)
    return ItoResult("E[log X_T] (GBM)", est, se, theory=math.log(x0) + (mu - sigma ** 2 / 2) * T,
                     naive=math.log(x0) + mu * T, n_paths=n_paths, extra={
                         "x0": x0, "mu": mu, "sigma": sigma, "T": T, "n_steps": n_steps,
                         "t": [T * i / n_steps for i in range(n_steps + 1)], "mean_log_x_t": mean_log, "se_log_x_t": se_log,
                         "mean_X_T": m_x, "se_X_T": se_x, "theory_mean_X_T": x0 * math.exp(mu * T)})


# --- Ito's lemma for a user f -------------------------------------------------------------------


def euler_maruyama(b: Callable[[Tensor], Tensor], g: Callable[[Tensor], Tensor], x0: Tensor, dW: Tensor, dt: float) -> Tensor:
    """The Ito scheme X += b(X) dt + g(X) dW (the registry's "euler") on n steps of dt.

    b, g act elementwise. x0: (P,); dW: (n, P). Returns X at the end: (P,).
    """
    return _solve("euler", b, g, x0, dW, _grid(dW.shape[0] * dt, dW.shape[0], x0.dtype))


def stochastic_heun(b: Callable[[Tensor], Tensor], g: Callable[[Tensor], Tensor], x0: Tensor, dW: Tensor, dt: float) -> Tensor:
    """Heun's predictor-corrector (trapezoidal in both dt and dW; the registry's "heun") on n steps of dt:
    converges to the Stratonovich solution.

    b, g act elementwise. x0: (P,); dW: (n, P). Returns X at the end: (P,).
    """
    return _solve("heun", b, g, x0, dW, _grid(dW.shape[0] * dt, dW.shape[0], x0.dtype))


def ito_drift(f: Callable[[Tensor], Tensor], b: Callable[[Tensor], Tensor], g: Callable[[Tensor], Tensor], x0: float,
              h: float = 1e-5, n_sub: int = 4, n_paths: int = 200_000, *, generator: torch.Generator | None = None) -> ItoResult:
    """The drift of Y = f(X) at X_0 = x0 for dX = b(X) dt + g(X) dW, estimated as (E f(X_h) - f(x0)) / h.

    f, b, g act elementwise on (N,) tensors; f' and f'' come from autograd. Theory (Ito's lemma):
    f' b + (1/2) g^2 f''; naive (ordinary chain rule): f' b. X_h is simulated by Euler-Maruyama with
    n_sub substeps. The martingale part f'(x0) g(x0) W_h has mean zero exactly and is subtracted as a
    control variate, so the standard error stays O(1/sqrt(n_paths)) however small h is; the bias is O(h).
    """
    _check_positive(h=h, n_sub=n_sub, n_paths=n_paths)
    x = torch.tensor([float(x0)], dtype=DTYPE)
    f0, d1, d2 = (v.item() for v in derivatives(f, x))
    b0, g0 = b(x).item(), g(x).item()
    dW = brownian_increments(n_paths, n_sub, h, generator=generator)
    xh = _solve("euler", b, g, x.expand(n_paths), dW, _grid(h, n_sub))
    fh = f(xh)
    y = (fh - f0 - d1 * g0 * dW.sum(0)) / h
    est, se = _mean_se(y)
    return ItoResult(f"drift of f(X) at x0={x0:g}", est, se, theory=d1 * b0 + 0.5 * g0 ** 2 * d2, naive=d1 * b0,
                     n_paths=n_paths, extra={"x0": float(x0), "f": f0, "df": d1, "d2f": d2, "b": b0, "g": g0, "h": h})


@dataclass
class DriftCurve:
    """ito_drift over a grid of starting points, for plotting."""

    x0: list[float]
    results: list[ItoResult]


def ito_drift_curve(f, b, g, x0s: Sequence[float], *, generator: torch.Generator | None = None, **kw) -> DriftCurve:
    """`ito_drift` at each x0 in x0s (same keyword options)."""
    return DriftCurve([float(x) for x in x0s], [ito_drift(f, b, g, x, generator=generator, **kw) for x in x0s])


# --- Ito <-> Stratonovich -----------------------------------------------------------------------


def stratonovich_drift(b: Callable[[Tensor], Tensor], g: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """The drift b - (1/2) g g' whose Stratonovich SDE has the same solution as the Ito SDE with drift b.

    The library's general conversion (`solvers.ito_to_stratonovich`, by a JVP of g) for a scalar SDE
    written elementwise, dX = b(X) dt + g(X) dW; a g that ignores x gives no correction.
    """
    def field_g(t, x, th):
        return torch.broadcast_to(torch.as_tensor(g(x), dtype=x.dtype, device=x.device), x.shape)

    strat = solvers.ito_to_stratonovich(lambda t, x, th: b(x), field_g, "diagonal")
    no_theta = torch.zeros(0, dtype=DTYPE)
    return lambda x: strat(None, x, no_theta)


@dataclass
class ConversionResult:
    """Root-mean-square distances at time T between schemes driven by the same Brownian increments."""

    steps: list[int]
    rms_em_heun: list[float]              # EM vs uncorrected Heun: tends to a nonzero limit
    rms_em_heun_corrected: list[float]    # EM vs Heun with b - (1/2) g g': tends to 0
    rms_em_exact: list[float] | None = None           # EM vs the exact Ito solution (when given)
    rms_heun_exact_strat: list[float] | None = None   # Heun vs the exact Stratonovich solution (when given)
    mean_diff: ItoResult | None = None                # E[X_EM - X_Heun] at the finest grid
    mean_diff_corrected: ItoResult | None = None      # E[X_EM - X_Heun corrected] at the finest grid


def _rms(x: Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


def ito_stratonovich(b: Callable[[Tensor], Tensor], g: Callable[[Tensor], Tensor], x0: float, T: float = 1.0,
                     steps: Sequence[int] = (16, 64, 256, 1024), n_paths: int = 10_000, *,
                     exact_ito: Callable[[Tensor], Tensor] | None = None,
                     exact_strat: Callable[[Tensor], Tensor] | None = None,
                     theory_mean_diff: float | None = None,
                     generator: torch.Generator | None = None) -> ConversionResult:
    """Euler-Maruyama and Heun on the same Brownian increments, at each grid size in steps.

    One fine path of max(steps) increments is summed into each coarser grid, so every scheme and
    every grid sees the same W. exact_ito / exact_strat map W_T: (P,) to the exact solutions at T
    (when the SDE has them); theory_mean_diff is E[X_Ito - X_Strat] at T, used as the "theory" of the
    uncorrected mean difference (the naive answer, that the schemes agree, is 0).
    """
    steps = [int(n) for n in steps]
    N = max(steps)
    if any(n < 1 or N % n for n in steps):
        raise ValueError(f"every entry of steps must be a positive divisor of max(steps)={N}; got {steps}")
    fine = brownian_increments(n_paths, N, T, generator=generator)
    WT = fine.sum(0)
    b_corr = stratonovich_drift(b, g)
    x0t = torch.full((n_paths,), float(x0), dtype=DTYPE)
    out = ConversionResult(steps, [], [], [] if exact_ito else None, [] if exact_strat else None)
    for n in steps:
        dW = fine.reshape(n, N // n, n_paths).sum(1)
        ts = _grid(T, n)
        em = _solve("euler", b, g, x0t, dW, ts)
        heun = _solve("heun", b, g, x0t, dW, ts)
        heun_c = _solve("heun", b_corr, g, x0t, dW, ts)
        out.rms_em_heun.append(_rms(em - heun))
        out.rms_em_heun_corrected.append(_rms(em - heun_c))
        if exact_ito:
            out.rms_em_exact.append(_rms(em - exact_ito(WT)))
        if exact_strat:
            out.rms_heun_exact_strat.append(_rms(heun - exact_strat(WT)))
    m, se = _mean_se(em - heun)
    out.mean_diff = ItoResult("E[X_EM - X_Heun]", m, se, theory=math.nan if theory_mean_diff is None else theory_mean_diff,
                              naive=0.0, n_paths=n_paths, extra={"steps": N})
    m, se = _mean_se(em - heun_c)
    out.mean_diff_corrected = ItoResult("E[X_EM - X_Heun(b - g g'/2)]", m, se, theory=0.0, naive=0.0, n_paths=n_paths,
                                        extra={"steps": N})
    return out


def gbm_ito_stratonovich(x0: float = 1.0, mu: float = 0.5, sigma: float = 0.8, T: float = 1.0,
                         steps: Sequence[int] = (16, 64, 256, 1024), n_paths: int = 10_000, *,
                         generator: torch.Generator | None = None) -> ConversionResult:
    """`ito_stratonovich` for GBM, where both exact solutions are known:
    Ito x0 exp((mu - sigma^2/2) T + sigma W_T), Stratonovich x0 exp(mu T + sigma W_T), and
    E[X_Ito - X_Strat] = x0 e^{mu T} (1 - e^{sigma^2 T / 2})."""
    return ito_stratonovich(
        lambda x: mu * x, lambda x: sigma * x, x0, T, steps, n_paths,
        exact_ito=lambda W: x0 * torch.exp((mu - sigma ** 2 / 2) * T + sigma * W),
        exact_strat=lambda W: x0 * torch.exp(mu * T + sigma * W),
        theory_mean_diff=x0 * math.exp(mu * T) * (1 - math.exp(sigma ** 2 * T / 2)), generator=generator)


# --- every demonstration at once ------------------------------------------------------------------

EXAMPLE_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sin": torch.sin,
    "exp": torch.exp,
    "square": torch.square,
    "cube": lambda x: x ** 3,
    "tanh": torch.tanh,
    "log1p_sq": lambda x: torch.log1p(x ** 2),
}


def run_all(seed: int = 0, scale: float = 1.0, f_name: str = "sin") -> dict:
    """Every demonstration with one generator; scale multiplies the number of paths."""
    if f_name not in EXAMPLE_FUNCTIONS:
        raise ValueError(f"unknown f {f_name!r}; expected one of {sorted(EXAMPLE_FUNCTIONS)}")
    _check_positive(scale=scale)
    gen = torch.Generator().manual_seed(seed)
    n = lambda k: max(100, int(k * scale))  # noqa: E731
    f = EXAMPLE_FUNCTIONS[f_name]
    # An Ornstein-Uhlenbeck drift with state-dependent noise: the f'' term matters wherever f'' != 0.
    b = lambda x: -x  # noqa: E731
    g = lambda x: 0.5 + 0.3 * torch.sin(x)  # noqa: E731
    return {
        "w_squared": w_squared(n_paths=n(100_000), generator=gen),
        "riemann": riemann_sums(n_paths=n(20_000), generator=gen),
        "gbm": gbm_log_mean(n_paths=n(20_000), generator=gen),
        "drift": ito_drift_curve(f, b, g, [k / 4 for k in range(-8, 9)], n_paths=n(50_000), generator=gen),
        "f_name": f_name,
        "conversion_gbm": gbm_ito_stratonovich(n_paths=n(10_000), generator=gen),
        "conversion_nonlinear": ito_stratonovich(b, lambda x: 0.5 + 0.3 * torch.sin(x) + 0.2 * x, 0.5,
                                                 n_paths=n(10_000), generator=gen),
    }

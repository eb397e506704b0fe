"""What every driver of `simulate` reads: one solve's fields, grid, state and Brownian increments (`Solve`), and the
reporting of a solution that became non-finite.

A driver (the eager loop in `simulation`, the traced loop in `traced`, the compiled blocks in `compiled`, the
adaptive stepper in `adaptive`) takes a `Solve` and returns X at ts[-1] or the path; it never re-derives the
increments or the scheme's state itself, so every driver walks the same Brownian motion from the same state.
"""
from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .brownian import chunk_steps, normal_chunks
from .brownian_path import BrownianPath, path_chunks
from .schemes import Field, Scheme, init_state, step_map
from .schemes import _transformed as transformed
from .schemes import check_finite as _check_finite

__all__ = ["Solve", "per_step", "as_state", "run_steps", "transformed", "parasitic_gap", "check_parasitic", "GIVEN_CHUNK",
           "CHECK_EVERY"]

GIVEN_CHUNK = 256      # given increments are walked in views of this many steps
CHECK_EVERY = 64       # steps between the on-device finiteness checks of the state (one op per check, no sync)


def per_step(*seqs: Tensor, block: int = 256) -> Iterator[tuple[Tensor, ...]]:
    """`(seqs[0][n], seqs[1][n], ...)` for each step n, the sequences aligned on their first axis (zip's length).

    The per-step views are made `block` steps at a time: made all at once they cost ~0.7 kB per step, so a
    solve keeping only its end state would hold memory growing with N.
    """
    n = min(s.shape[0] for s in seqs)
    for start in range(0, n, block):
        yield from zip(*(s[start:start + block].unbind(0) for s in seqs))


def as_state(y) -> tuple:
    """A scheme's state as a tuple: (x,) for the one-tensor schemes, the scheme's own tuple otherwise."""
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


def run_steps(step: Callable, ts: Tensor, h: Tensor, y: tuple, ws: tuple, theta: Tensor) -> tuple[tuple, list]:
    """(state, [x after each step]) after the len(ts) steps of `step` from state y, step i reading ws[j][i]."""
    xs = []
    for i in range(ts.shape[0]):
        y = as_state(step(ts[i], h[i], *y, *(w[i] for w in ws), theta))
        xs.append(y[0])
    return y, xs


@dataclass
class Solve:
    """One solve of `simulate`: the scheme's step map over the grid ts, from x0, driven by one Brownian motion.

    The increments come from exactly one source: dW (with levy_area), a Brownian path `bpath`, or draws from
    `generator` (`normal_chunks`, the definition of `simulate(dW=None)`).
    """
    scheme: str
    sch: Scheme
    f: Field
    g: Field
    dg: Field | None
    noise: str
    x0: Tensor
    theta: Tensor
    ts: Tensor
    m: int
    save: str
    check_finite: bool
    dW: Tensor | None = None
    levy_area: Tensor | None = None
    bpath: BrownianPath | None = None
    generator: torch.Generator | None = None
    gen_state: Tensor | None = field(default=None, repr=False)   # the generator's state before the draws

    @property
    def N(self) -> int:
        return self.ts.shape[0] - 1

    @functools.cached_property
    def h(self) -> Tensor:
        return self.ts[1:] - self.ts[:-1]

    @property
    def wshape(self) -> tuple[int, int]:
        return (self.x0.shape[0], self.m)

    @property
    def levy(self) -> bool:
        return self.sch.needs_levy_area

    @functools.cached_property
    def step(self) -> Callable:
        """(t, h, *state, dW, [H], theta) -> state (a tensor or the scheme's tuple)."""
        return step_map(self.scheme, self.f, self.g, self.dg, noise=self.noise)

    def init(self, x0: Tensor | None = None, theta: Tensor | None = None) -> tuple:
        """The scheme's state at (ts[0], x0), always a tuple."""
        x0 = self.x0 if x0 is None else x0
        theta = self.theta if theta is None else theta
        return as_state(init_state(self.scheme, self.f, self.g, self.ts[0], x0, theta, noise=self.noise))

    def chunks(self, out: Tensor | None = None) -> Iterator[tuple[Tensor, ...]]:
        """The increments, (dW,) or (dW, H) per chunk of steps, each (c, B, m). out: the buffer drawn increments
        are drawn into (`normal_chunks(out=)`; only for draws without Levy areas)."""
        if self.bpath is not None:
            return path_chunks(self.bpath, self.ts, self.levy, chunk_steps(self.wshape))
        if self.dW is not None:
            given = (self.dW,) if not self.levy else (self.dW, self.levy_area)
            return (tuple(v[i:i + GIVEN_CHUNK] for v in given) for i in range(0, self.N, GIVEN_CHUNK))
        return drawn_chunks(self.N, self.wshape, self.generator, self.x0.dtype, self.x0.device, self.h, self.levy,
                            out=out)

    def redraw(self) -> Iterator[tuple[Tensor, ...]]:
        """The same increments again (to locate a non-finite step): the generator rewound to where it started."""
        if self.dW is not None or self.bpath is not None:
            return self.chunks()
        if self.generator is None or self.gen_state is None:
            raise FloatingPointError(f"the solution became non-finite in a solve of {self.N} steps (from t = "
                                     f"{float(self.ts[0]):.6g} to {float(self.ts[-1]):.6g}); pass dW or a generator "
                                     "to have the step named")
        return self._rewound()

    def _rewound(self) -> Iterator[tuple[Tensor, ...]]:
        gen, end_state = self.generator, self.generator.get_state()
        gen.set_state(self.gen_state)
        try:
            yield from drawn_chunks(self.N, self.wshape, gen, self.x0.dtype, self.x0.device, self.h, self.levy)
        finally:
            gen.set_state(end_state)

    def raise_non_finite(self, path: Tensor | None = None) -> None:
        """Raise a FloatingPointError naming the first step whose state is non-finite (after a solve's flag said one
        is): read off the saved path, or found by re-running the eager steps on the same increments."""
        if self.dW is not None:
            check_given(self.dW, self.levy_area)
        N, ts = self.N, self.ts
        if path is not None:
            finite = torch.isfinite(path.detach().reshape(N + 1, -1)).all(1)
            n = int((~finite).nonzero()[0]) - 1
            _raise_at(ts, n, N, _first_bad(path[n + 1]), path[n])
        with torch.no_grad():
            theta = self.theta.detach()
            y, n = self.init(self.x0.detach(), theta), 0
            for w in self.redraw():
                if self.bpath is not None:
                    check_given(*w)
                for wn in zip(*w):
                    prev = y[0]
                    y = as_state(self.step(ts[n], self.h[n], *y, *wn, theta))
                    if not bool(torch.isfinite(y[0]).all()):
                        _raise_at(ts, n, N, _first_bad(y[0]), prev)
                    n += 1
        raise FloatingPointError(f"the solution became non-finite in a solve of {N} steps, but not when recomputed "
                                 "eagerly (the fast step and the eager one disagree there)")


def parasitic_gap(scheme: str, y: tuple) -> float | None:
    """reversible_heun's |z - x| (max over the batch), the size of its parasitic mode; None for other schemes."""
    if scheme != "reversible_heun" or transformed():
        return None
    return float((y[1].detach() - y[0].detach()).abs().max())


def check_parasitic(scheme: str, y: tuple, first_gap: float | None) -> None:
    """Warn when reversible_heun's parasitic mode grew (RuntimeWarning). Its state is (x, z, f(z), g(z)): in a stable
    solve z tracks x, the gap z - x flipping sign each step and summing local terms like a random walk (growth
    ~sqrt(N) over the solve); where the drift's linearisation is dissipative (lambda < 0) the mode grows by
    |lambda h| + sqrt(1 + (lambda h)^2) a step. Warned when the gap grew 1000-fold since the first step and exceeds
    |x| itself (which the mode's eigenvector always does once it dominates)."""
    gap = parasitic_gap(scheme, y)
    if gap is None or first_gap is None or not math.isfinite(gap):        # (non-finite: reported as such)
        return
    size = float(y[0].detach().abs().max())
    if gap > 1e3 * first_gap and gap > size:
        warnings.warn(f"reversible_heun is unstable on this problem: its two half-states ended {gap:.3g} apart ("
                      f"{gap / max(first_gap, 1e-300):.3g} times their gap after the first step), more than the "
                      f"solution's size {size:.3g}. The scheme is stable only where the drift's linearisation is "
                      "oscillatory (lambda h on the imaginary axis, |lambda h| <= 1); a dissipative (stiff) drift "
                      "grows its parasitic mode like exp(|lambda| t). Use a finer grid, or 'heun' / 'midpoint'",
                      RuntimeWarning, stacklevel=3)


def drawn_chunks(N: int, shape: tuple[int, int], gen: torch.Generator | None, dtype: torch.dtype,
                 device: torch.device, h: Tensor, levy: bool, out: Tensor | None = None) -> Iterator[tuple[Tensor, ...]]:
    """(dW,) or (dW, H) chunks of steps: dW = sqrt(|h|) z, z the chunks of `normal_chunks`, and H = sqrt(|h|/12) z'
    with z' the chunks drawn after all of z. z' comes from a copy of the generator moved past the z draws (drawn
    and dropped chunk by chunk, so memory stays one chunk); the generator ends where a draw of z then z' leaves it.
    out (without Levy areas): the buffer dW is drawn into, as `normal_chunks(out=)`."""
    scale = h.detach().abs().sqrt()
    n = 0
    if not levy:
        for z in normal_chunks(N, shape, gen, dtype, device, out=out):
            c = z.shape[0]
            yield (z.mul_(scale[n:n + c, None, None]),)              # one op per chunk, not per step
            n += c
        return
    hscale = (h.detach().abs() / 12).sqrt()
    if gen is None:                                                   # no generator to fork: hold all of z
        zs = list(normal_chunks(N, shape, gen, dtype, device))
        ahead_chunks = normal_chunks(N, shape, gen, dtype, device)
        z_chunks = iter(zs)
    else:
        ahead = torch.Generator(device=gen.device)
        ahead.set_state(gen.get_state())
        for _ in normal_chunks(N, shape, ahead, dtype, device):
            pass
        z_chunks, ahead_chunks = normal_chunks(N, shape, gen, dtype, device), normal_chunks(N, shape, ahead, dtype, device)
    for z, zh in zip(z_chunks, ahead_chunks):
        c = z.shape[0]
        yield z.mul_(scale[n:n + c, None, None]), zh.mul_(hscale[n:n + c, None, None])
        n += c
    if gen is not None:
        gen.set_state(ahead.get_state())


def check_given(dW: Tensor | None, levy_area: Tensor | None = None) -> None:
    for name, v in (("dW", dW), ("levy_area", levy_area)):
        if v is not None:
            _check_finite(name, v.detach())


def _first_bad(x: Tensor) -> tuple[int, int, float]:
    x = x.detach()
    b, i = (int(v) for v in (~torch.isfinite(x)).nonzero()[0])
    return b, i, float(x[b, i])


def _raise_at(ts: Tensor, n: int, N: int, bad: tuple[int, int, float], prev: Tensor | None) -> None:
    b, i, val = bad
    before = "" if prev is None else f"; at ts[{n}] it was {float(prev[b, i]):.6g}"
    raise FloatingPointError(
        f"the solution became non-finite at step {n} of {N} (from t = {float(ts[n]):.6g} to t = {float(ts[n + 1]):.6g}): "
        f"x[{b}, {i}] = {val}{before}. A finer grid, or a drift and diffusion that stay finite, may help; "
        "check_finite=False returns the path as it is")

"""Brownian paths: one Brownian motion W on [t0, t1] that a solve queries over its own grid.

A path fixes W once, so a solve on a grid and a solve on any refinement of it (or an adaptive solve that
rejects and retries steps) see the same Brownian motion: the increment over a coarse step is the sum of the
fine increments inside it. `simulate(..., bm=path)` reads its increments (and space-time Levy areas, for the
schemes that use them) from the path instead of from `dW=`.

Two queries (the second is torchsde's protocol, so sdekit's paths and torchsde's are interchangeable):
  path.increments(ts, levy_area=False) -> dW (N, *shape) [, U (N, *shape)]   over a monotone grid ts (N+1,)
  path(ta, tb, return_U=False) -> W [, U]                                     over one interval, ta <= tb
W is W(tb) - W(ta); U = int_ta^tb (W_s - W_ta) ds is the space-time Levy integral torchsde returns with
return_U=True (the space-time Levy area is H = U / h - W / 2, h = tb - ta; W ~ N(0, h), H ~ N(0, h/12), independent).

Direction: `increments` follows the step, for increasing and decreasing grids alike. The n-th step goes from
t_n to t_{n+1} (h_n = t_{n+1} - t_n, negative on a decreasing grid) and reads
    dW_n = W(t_{n+1}) - W(t_n),        U_n = int_{t_n}^{t_{n+1}} (W_s - W(t_n)) ds   (a signed integral),
so on a decreasing grid dW_n = -path(t_{n+1}, t_n): the increments of the reverse-time motion s -> W(-s),
N(0, |h_n|) like the increments `simulate` draws for reverse-time grids, and a solve back over the same
interval retraces the path. U_n / h_n, the step's mean of W - W(t_n), reads the same in either direction.

The paths:
  BrownianGrid         increments given or drawn on a fine grid; any sub-grid is a sum of them (exact
                       refinement studies, cheap); queried at grid times only
  VirtualBrownianTree  a virtual Brownian tree (Brownian bridge bisection, every node's noise from its own
                       seed): queried at any time, so adaptive steps can use it; pure torch
torchsde's BrownianInterval and BrownianTree (and any object with their call protocol) are accepted as they
are: `as_path` wraps them without importing torchsde.
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

from .brownian import normal_chunks

__all__ = ["BrownianPath", "BrownianGrid", "VirtualBrownianTree", "CallablePath", "as_path", "check_path", "path_chunks", "resolve_path"]


def _reverse(W: Tensor, U: Tensor | None, L: Tensor) -> tuple[Tensor, Tensor | None]:
    """(W, U) of an interval read from its start a over the signed length L -> the same read from a + L over -L.

    W changes sign; int_{a+L}^{a} (W_s - W_{a+L}) ds = -(U - L W) = L W - U.
    """
    return -W, (None if U is None else L * W - U)


class BrownianPath:
    """A Brownian motion of shape `shape` (B, m) on [t0, t1]; see the module docstring for the queries.

    Subclasses set t0, t1, shape, dtype, device, levy_area (whether U can be returned) and anytime (whether
    any time in [t0, t1] may be queried, which adaptive steps need), and implement `_forward(lo, hi, levy)`:
    (W, U or None) over [lo[n], hi[n]] for float64 tensors lo < hi, stacked as (n, *shape).
    """

    t0: float
    t1: float
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    levy_area: bool = False
    anytime: bool = False

    @property
    def levy_area_approximation(self) -> str:          # torchsde's name for the same thing
        return "space-time" if self.levy_area else "none"

    def size(self) -> tuple[int, ...]:
        return self.shape

    def _forward(self, lo: Tensor, hi: Tensor, levy: bool) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def _check_times(self, ts: Tensor) -> None:
        span = self.t1 - self.t0
        lo, hi = float(ts.min()), float(ts.max())
        slack = 1e-9 * max(span, abs(self.t0), abs(self.t1))
        if lo < self.t0 - slack or hi > self.t1 + slack:
            raise ValueError(f"the Brownian path covers [{self.t0}, {self.t1}] but was queried over [{lo}, {hi}]; "
                             "make the path over an interval that contains the whole time grid")

    def _need_levy(self, levy: bool) -> None:
        if levy and not self.levy_area:
            raise ValueError(f"{type(self).__name__} was made without space-time Levy area (levy_area=False), which "
                             "this query needs; make it with levy_area=True")

    def increments(self, ts: Tensor, levy_area: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """dW (N, *shape), and with levy_area=True also U (N, *shape), for the steps of the monotone grid ts (N+1,).

        Signs follow the step (module docstring): on a decreasing grid dW_n = W(t_{n+1}) - W(t_n) too.
        """
        self._need_levy(levy_area)
        ts = torch.as_tensor(ts)
        if ts.ndim != 1 or ts.shape[0] < 2:
            raise ValueError(f"ts must be (N+1,) with N >= 1, got shape {tuple(ts.shape)}")
        t = ts.detach().to(device="cpu", dtype=torch.float64)
        self._check_times(t)
        a, b = t[:-1], t[1:]
        back = bool((b < a).all())
        if not (back or bool((b > a).all())):
            raise ValueError("ts must be strictly monotone")
        W, U = self._forward(torch.minimum(a, b), torch.maximum(a, b), levy_area)
        if back:
            L = (a - b).to(device=W.device, dtype=W.dtype).reshape(-1, *([1] * len(self.shape)))
            W, U = _reverse(W, U, L)
        return (W, U) if levy_area else W

    def __call__(self, ta, tb=None, return_U: bool = False, return_A: bool = False):
        """torchsde's query: W(tb) - W(ta) (with return_U, also U) for t0 <= ta <= tb <= t1; W(ta) - W(t0) if tb is None."""
        if return_A:
            raise ValueError(f"{type(self).__name__} has no space-space Levy area (return_A); only space-time (return_U)")
        if tb is None:
            ta, tb = self.t0, ta
        ta, tb = float(ta), float(tb)
        if ta > tb:
            raise ValueError(f"query times must satisfy ta <= tb, got ta={ta}, tb={tb}")
        self._need_levy(return_U)
        t = torch.tensor([ta, tb], dtype=torch.float64)
        self._check_times(t)
        if ta == tb:
            z = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            return (z, z.clone()) if return_U else z
        W, U = self._forward(t[:1], t[1:], return_U)
        return (W[0], U[0]) if return_U else W[0]


class BrownianGrid(BrownianPath):
    """W given by its increments on a grid: queries at grid times return sums of them, exactly.

    ts: (K+1,) strictly monotone; dW: (K, *shape) with dW_k = W(t_{k+1}) - W(t_k) (the step convention of the
    module docstring, so the increments a reverse-time solve used make the same path); U: (K, *shape) the
    steps' Levy integrals, optional. The path is refined no further: it answers queries whose ends are grid
    times (to within 1e-6 of the finest step), so any solve on a sub-grid (every k-th time, or any subset)
    sees sums of these increments, and a solve on the grid itself sees dW exactly (bitwise). Not for
    adaptive steps (use VirtualBrownianTree or torchsde's BrownianInterval).

    `BrownianGrid.draw(ts, shape, generator)` draws the increments as `simulate(dW=None, generator=...)` would.
    """

    anytime = False

    def __init__(self, ts: Tensor, dW: Tensor, U: Tensor | None = None):
        if not isinstance(ts, Tensor) or ts.ndim != 1 or ts.shape[0] < 2:
            raise ValueError(f"ts must be a (K+1,) tensor with K >= 1, got {getattr(ts, 'shape', type(ts).__name__)}")
        if not isinstance(dW, Tensor) or dW.ndim < 2 or dW.shape[0] != ts.shape[0] - 1:
            raise ValueError(f"dW must be (K, *shape) with K = len(ts) - 1 = {ts.shape[0] - 1}, got "
                             f"{tuple(dW.shape) if isinstance(dW, Tensor) else type(dW).__name__}")
        if U is not None and U.shape != dW.shape:
            raise ValueError(f"U must have dW's shape {tuple(dW.shape)}, got {tuple(U.shape)}")
        t = ts.detach().to(device="cpu", dtype=torch.float64)
        steps = t[1:] - t[:-1]
        if not ((steps > 0).all() or (steps < 0).all()):
            raise ValueError("ts must be strictly monotone")
        if steps[0] < 0:                                   # store the forward orientation
            L = steps.to(device=dW.device, dtype=dW.dtype).reshape(-1, *([1] * (dW.ndim - 1)))
            dW, U = _reverse(dW, U, L)
            dW, U, t = dW.flip(0), (None if U is None else U.flip(0)), t.flip(0)
        self.grid = t                                      # (K+1,) increasing, float64 on the CPU
        self.dW, self.U = dW, U
        self.t0, self.t1 = float(t[0]), float(t[-1])
        self.shape, self.dtype, self.device = tuple(dW.shape[1:]), dW.dtype, dW.device
        self.levy_area = U is not None
        self._tol = 1e-6 * float((t[1:] - t[:-1]).min())
        self._cum: tuple[Tensor, Tensor | None] | None = None

    @classmethod
    def draw(cls, ts: Tensor, shape: Sequence[int], generator: torch.Generator | None = None, *,
             levy_area: bool = False, dtype: torch.dtype | None = None, device=None) -> BrownianGrid:
        """Increments sqrt(|h_k|) z_k on ts, z in the chunks `simulate(dW=None, generator=generator)` draws, so
        both give the same increments for the same seed (then, with levy_area, H_k = sqrt(|h_k| / 12) z'_k)."""
        dtype = dtype or ts.dtype
        device = torch.device(device) if device is not None else ts.device
        shape = tuple(int(s) for s in shape)
        K = ts.shape[0] - 1
        h = (ts[1:] - ts[:-1]).to(device=device, dtype=dtype)
        expand = (-1, *([1] * len(shape)))
        dW = torch.cat(list(normal_chunks(K, shape, generator, dtype, device))) * h.abs().sqrt().reshape(expand)
        U = None
        if levy_area:
            H = torch.cat(list(normal_chunks(K, shape, generator, dtype, device))) * (h.abs() / 12).sqrt().reshape(expand)
            U = h.reshape(expand) * (0.5 * dW + H)         # U = h (W/2 + H), signed with the step
        return cls(ts, dW, U)

    def _index(self, t: Tensor) -> Tensor:
        i = torch.searchsorted(self.grid, t).clamp(1, len(self.grid) - 1)
        i = torch.where((t - self.grid[i - 1]).abs() <= (self.grid[i] - t).abs(), i - 1, i)
        off = (t - self.grid[i]).abs()
        if bool((off > self._tol).any()):
            bad = float(t[int(off.argmax())])
            raise ValueError(f"BrownianGrid answers queries at its grid times only, but {bad} is not one of them "
                             f"(the nearest is {float(self.grid[int(i[int(off.argmax())])])}); for queries at any time "
                             "use VirtualBrownianTree or torchsde's BrownianInterval")
        return i

    def _cumulative(self, levy: bool) -> tuple[Tensor, Tensor | None]:
        """W(t_k) and I(t_k) = int_t0^t_k W ds at the grid times, in float64."""
        if self._cum is None or (levy and self._cum[1] is None):
            dW = self.dW.double()
            W = torch.cat([torch.zeros_like(dW[:1]), dW.cumsum(0)])
            I = None
            if levy:
                h = (self.grid[1:] - self.grid[:-1]).to(dW.device).reshape(-1, *([1] * len(self.shape)))
                I = torch.cat([torch.zeros_like(dW[:1]), (h * W[:-1] + self.U.double()).cumsum(0)])
            self._cum = (W, I)
        return self._cum

    def _forward(self, lo: Tensor, hi: Tensor, levy: bool) -> tuple[Tensor, Tensor | None]:
        i, j = self._index(lo), self._index(hi)
        if bool((j - i == 1).all()):                     # one grid step each: the stored increments themselves
            idx = i.to(self.dW.device)
            return self.dW[idx], (self.U[idx] if levy else None)
        W, I = self._cumulative(levy)
        i, j = i.to(W.device), j.to(W.device)
        dW = (W[j] - W[i]).to(self.dtype)
        U = None
        if levy:
            h = (self.grid[j.cpu()] - self.grid[i.cpu()]).to(W.device).reshape(-1, *([1] * len(self.shape)))
            U = (I[j] - I[i] - h * W[i]).to(self.dtype)
        return dW, U

    def __repr__(self) -> str:
        return f"BrownianGrid(steps={self.dW.shape[0]}, shape={self.shape}, levy_area={self.levy_area})"


def _mix(*words: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser over their sequence): each tree node's own seed."""
    z = 0x9E3779B97F4A7C15
    for w in words:
        z = (z ^ (w & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        z = (z ^ (z >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 29
    return z >> 1


class VirtualBrownianTree(BrownianPath):
    """A Brownian motion on [t0, t1] that can be queried at any time, from a seed, in pure torch.

    W is built by bisection: the root draws W(t1) - W(t0) (and, with levy_area, its space-time Levy area H),
    and each interval [s, u] splits at its midpoint by the Brownian bridge given its (W, H), the normals of a
    split coming from a generator seeded by (seed, depth, index) alone. The value at any time is therefore a
    fixed function of the seed, whatever was queried before or in which order (torchsde's BrownianTree has the
    same property; its BrownianInterval depends on the query order). Bisection stops at intervals of width
    `tol` (default (t1 - t0) 2^-26); inside such a leaf W is the conditional mean given the leaf's (W, H)
    (linear without Levy area), so steps much wider than tol see Brownian statistics (the variance of an
    increment of length h is short by at most tol / h relative). Times on the dyadic grid of a coarser level
    (e.g. k / 2^10 on [0, 1]) stop at that level.

    shape: (B, m). generator: draws the seed (one draw); or give seed. Values are computed in float64 and
    returned in `dtype` (the normals are drawn in `dtype`); a cache keeps recently visited nodes (up to
    cache_mib), so neighbouring queries (a solve's consecutive steps) cost only the levels where they part.
    """

    anytime = True

    def __init__(self, t0: float, t1: float, shape: Sequence[int], *, generator: torch.Generator | None = None,
                 seed: int | None = None, tol: float | None = None, levy_area: bool = False,
                 dtype: torch.dtype = torch.float32, device=None, cache_mib: float = 256.0):
        t0, t1 = float(t0), float(t1)
        if not t1 > t0:
            raise ValueError(f"need t0 < t1, got t0={t0}, t1={t1} (a decreasing solve queries the same path)")
        if generator is not None and seed is not None:
            raise ValueError("give seed or generator, not both")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device if generator else "cpu"))
        self.t0, self.t1, self.seed = t0, t1, int(seed)
        self.shape = tuple(int(s) for s in shape)
        self.dtype, self.device = dtype, torch.device(device) if device is not None else torch.device("cpu")
        self.levy_area = bool(levy_area)
        span = t1 - t0
        tol = span * 2.0**-26 if tol is None else float(tol)
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        self.depth = max(1, math.ceil(math.log2(span / tol)))
        self.tol = span / 2**self.depth
        self._k = 4 if self.levy_area else 2                 # a node's state: (W(s), [I(s)], W, [H]) over the node
        self._numel = max(1, math.prod(self.shape))
        self._cache_size = max(4 * self.depth + 8, int(cache_mib * 2**20 / (8 * self._k * self._numel)))
        self._cache: OrderedDict[tuple[int, int], Tensor] = OrderedDict()
        self._split: dict[int, Tensor] = {}
        self._gen = torch.Generator(device=self.device)

    def _normals(self, k: int, *key: int) -> Tensor:
        self._gen.manual_seed(_mix(self.seed, *key))
        z = torch.randn((k, self._numel), generator=self._gen, dtype=self.dtype, device=self.device)
        return z.double()

    def _split_matrix(self, depth: int) -> Tensor:
        """The linear map (parent state, normals) -> (left state, right state) for a parent at `depth`.

        With Levy area, rows (W(s), I(s), W, H) of the left then the right child over columns (W(s), I(s), W, H,
        z0, z1), h the parent's width: the bridge at the midpoint gives each half W ~ N(0, h/2) and H ~ N(0, h/24),
        independent:  W_L = W/2 + 3H/2 + sqrt(h)/4 z0,  H_L, H_R = H/4 - sqrt(h)/8 z0 +- sqrt(h)/(4 sqrt 3) z1,
        W_R = W - W_L, and at the midpoint W(s) + W_L and I(s) + (h/2) W(s) + (h/2)(W_L/2 + H_L).
        Without it, rows (W(s), W) over (W(s), W, z0): W_L = (W + sqrt(h) z0) / 2.
        """
        M = self._split.get(depth)
        if M is None:
            h = (self.t1 - self.t0) / 2**depth
            r = math.sqrt(h)
            if self.levy_area:
                c = r / (4 * math.sqrt(3))
                rows = [[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, .5, 1.5, .25 * r, 0], [0, 0, 0, .25, -.125 * r, c],
                        [1, 0, .5, 1.5, .25 * r, 0], [.5 * h, 1, .125 * h, .5 * h, 0, .5 * h * c],
                        [0, 0, .5, -1.5, -.25 * r, 0], [0, 0, 0, .25, -.125 * r, -c]]
            else:
                rows = [[1, 0, 0], [0, .5, .5 * r], [1, .5, .5 * r], [0, .5, -.5 * r]]
            M = self._split[depth] = torch.tensor(rows, dtype=torch.float64, device=self.device)
        return M

    def _node(self, depth: int, index: int) -> Tensor:
        """The state (k, B*m) of node `index` at `depth`, float64; a split caches both children."""
        key = (depth, index)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        if depth == 0:
            z = self._normals(self._k // 2, 0, 0, 1)
            h = self.t1 - self.t0
            zero = torch.zeros_like(z[0])
            rows = [zero, zero, math.sqrt(h) * z[0], math.sqrt(h / 12) * z[1]] if self.levy_area else [zero, math.sqrt(h) * z[0]]
            out = torch.stack(rows)
            self._store(key, out)
            return out
        parent = self._node(depth - 1, index >> 1)
        z = self._normals(self._k // 2, depth - 1, index >> 1, 2)
        both = torch.mm(self._split_matrix(depth - 1), torch.cat([parent, z]))
        self._store((depth, index & ~1), both[:self._k])
        self._store((depth, index | 1), both[self._k:])
        return both[self._k:] if index & 1 else both[:self._k]

    def _store(self, key: tuple[int, int], value: Tensor) -> None:
        self._cache[key] = value
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _point(self, t: float) -> Tensor:
        """(W(t), I(t)) as (2, B*m) (W(t) alone, (1, B*m), without Levy area); W(t0) = 0, I(t) = int_t0^t W ds."""
        n = 2**self.depth
        span = self.t1 - self.t0
        y = (t - self.t0) / span * n
        if y >= n:                                              # t1: the end of the root
            depth, k, a, width = 0, 0, 1.0, span
        else:
            k = max(int(math.floor(y)), 0)
            a = min(max(y - k, 0.0), 1.0)
            depth, width = self.depth, span / n
            if a == 0.0 and k:                                  # on the leaf grid: the coarsest node starting at t
                tz = (k & -k).bit_length() - 1
                depth, k = depth - tz, k >> tz
        S = self._node(depth, k)
        if a == 0.0:
            return S[:2] if self.levy_area else S[:1]
        # Inside the node: the conditional mean given its (W, H): W(s + l) - W(s) = a W + 6 a (1 - a) H with
        # a = l / width, and its integral I(s + l) - I(s) = l W(s) + l (a W / 2 + (3a - 2a^2) H); linear without H.
        if not self.levy_area:
            return S[:1] + a * S[1:]
        l = a * width
        R = torch.tensor([[1, 0, a, 6 * a * (1 - a)], [l, 1, .5 * l * a, l * (3 * a - 2 * a * a)]], dtype=torch.float64,
                         device=self.device)
        return torch.mm(R, S)

    def _forward(self, lo: Tensor, hi: Tensor, levy: bool) -> tuple[Tensor, Tensor | None]:
        Ws, Us = [], []
        prev_t, prev = None, None
        for a, b in zip(lo.tolist(), hi.tolist()):
            pa = prev if a == prev_t else self._point(a)        # a grid's steps share their ends
            pb = self._point(b)
            Ws.append(pb[0] - pa[0])
            if levy:
                Us.append(pb[1] - pa[1] - (b - a) * pa[0])
            prev_t, prev = b, pb
        W = torch.stack(Ws).reshape(-1, *self.shape).to(self.dtype)
        return W, (torch.stack(Us).reshape(-1, *self.shape).to(self.dtype) if levy else None)

    def __repr__(self) -> str:
        return (f"VirtualBrownianTree(t0={self.t0}, t1={self.t1}, shape={self.shape}, tol={self.tol:.3g}, "
                f"levy_area={self.levy_area})")


class CallablePath(BrownianPath):
    """Any object with torchsde's Brownian call protocol (bm(ta, tb) -> W, bm(ta, tb, return_U=True) -> (W, U),
    attributes shape, dtype, device, levy_area_approximation), e.g. torchsde's BrownianInterval or BrownianTree,
    queried step by step at float times. Such paths answer any time in their interval (anytime=True).

    torchsde clamps a query outside its interval and warns; here that warning is an error naming the query.
    """

    anytime = True

    def __init__(self, bm):
        self.bm = bm
        self.shape = tuple(bm.shape)
        self.dtype, self.device = bm.dtype, torch.device(bm.device)
        self.levy_area = str(getattr(bm, "levy_area_approximation", "none")) != "none"
        self.t0, self.t1 = -math.inf, math.inf           # unknown: torchsde reports a query outside its interval

    def _forward(self, lo: Tensor, hi: Tensor, levy: bool) -> tuple[Tensor, Tensor | None]:
        Ws, Us = [], []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for a, b in zip(lo.tolist(), hi.tolist()):
                out = self.bm(a, b, return_U=True) if levy else self.bm(a, b)
                if levy:
                    Ws.append(out[0])
                    Us.append(out[1])
                else:
                    Ws.append(out)
        for w in caught:
            if "Should have" in str(w.message):            # torchsde: a query outside [t0, t1], clamped
                raise ValueError(f"the Brownian path {self.bm!r} was queried outside its interval: {w.message} "
                                 f"(grid [{float(lo.min())}, {float(hi.max())}]); make it over an interval that "
                                 "contains the whole time grid")
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return torch.stack(Ws), (torch.stack(Us) if levy else None)

    def __repr__(self) -> str:
        return f"CallablePath({self.bm!r})"


def as_path(bm) -> BrownianPath:
    """An sdekit path as it is; an object with torchsde's call protocol wrapped in CallablePath; else TypeError."""
    if isinstance(bm, BrownianPath):
        return bm
    if callable(bm) and all(hasattr(bm, a) for a in ("shape", "dtype", "device")):
        return CallablePath(bm)
    raise TypeError(f"bm must be a Brownian path (sdekit's BrownianGrid / VirtualBrownianTree, or torchsde's "
                    f"BrownianInterval / BrownianTree), got {type(bm).__name__}")


def check_path(path: BrownianPath, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, noise: str,
               levy: bool, scheme: str) -> None:
    """Raise early unless the path fits a solve: its shape (B, m), dtype and device, and Levy area if the scheme reads it."""
    if tuple(path.shape) != tuple(shape):
        raise ValueError(f"bm has shape {tuple(path.shape)}, but noise={noise!r} with x0 of {shape[0]} rows needs Brownian "
                         f"increments of shape {tuple(shape)} (B, {'d' if noise == 'diagonal' else 'm'})")
    if path.dtype != dtype:
        raise TypeError(f"bm has dtype {path.dtype}, x0 {dtype}: make the path in x0's dtype")
    if torch.device(path.device).type != torch.device(device).type:
        raise ValueError(f"bm lives on {path.device}, x0 on {device}: make the path on x0's device")
    if levy and not path.levy_area:
        raise ValueError(f"scheme {scheme!r} reads the space-time Levy area of every step, which {path!r} does not carry: "
                         "make it with levy_area=True (torchsde: levy_area_approximation='space-time')")


def path_chunks(path: BrownianPath, ts: Tensor, levy: bool, chunk: int):
    """(dW,) or (dW, H) for the steps of ts, `chunk` steps at a time, read from the path; H = U/h - dW/2 is the
    space-time Levy area the schemes read (N(0, |h|/12); U and h signed with the step, so it reads the same both ways)."""
    N = ts.shape[0] - 1
    for i in range(0, N, chunk):
        t = ts[i:min(i + chunk, N) + 1]
        if not levy:
            yield (path.increments(t),)
            continue
        dW, U = path.increments(t, levy_area=True)
        h = (t[1:] - t[:-1]).to(device=dW.device, dtype=dW.dtype).reshape(-1, *([1] * (dW.ndim - 1)))
        yield dW, U / h - 0.5 * dW


def resolve_path(bm, *, adaptive: bool, dW: Tensor | None, levy_area: Tensor | None, generator, ts: Tensor,
                 shape: tuple[int, ...], dtype: torch.dtype, device, noise: str, levy: bool, scheme: str) -> BrownianPath | None:
    """The path a solve reads (None: it reads dW or draws from generator as before), with the combinations refused.

    bm given: wrapped by `as_path` and checked; dW=, levy_area= or generator= beside it is an error (the Brownian
    motion is given once). adaptive=True without bm: a VirtualBrownianTree over the grid's interval seeded by one
    draw from generator; with dW= instead, or a path that answers grid times only, an error.
    """
    if bm is None and not adaptive:
        return None
    if bm is not None:
        if dW is not None or levy_area is not None:
            raise ValueError("the Brownian motion is given twice: pass dW= (with levy_area=) or bm=, not both")
        if generator is not None:
            raise ValueError("generator= draws the increments and bm= gives them: pass one of them")
        path = as_path(bm)
    elif dW is not None:
        raise ValueError("adaptive steps choose their own times, which given increments dW cannot follow: pass bm= (a "
                         "VirtualBrownianTree, or torchsde's BrownianInterval) or neither, to draw a VirtualBrownianTree "
                         "from generator")
    else:
        t = ts.detach()
        path = VirtualBrownianTree(float(t.min()), float(t.max()), shape, generator=generator, levy_area=levy,
                                   dtype=dtype, device=device)
    check_path(path, shape, dtype, device, noise, levy, scheme)
    if adaptive and not path.anytime:
        raise ValueError(f"adaptive steps need a Brownian path that can be queried at any time, and {path!r} answers its "
                         "grid times only; use VirtualBrownianTree or torchsde's BrownianInterval / BrownianTree")
    return path


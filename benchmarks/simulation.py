"""SDE simulation throughput (path-steps per second): sdekit's simulator against the usual ways to simulate.

Rows per (problem, batch): `sdekit <scheme>` for every scheme of the registry that takes the problem's noise type
(the default eager solve; `trace=True` and `compile=True` Euler rows unless --compile none), a plain torch loop of the
same scheme (hand-written Euler and
Milstein for the diagonal problems, the registry's step run eagerly with fresh normals each step otherwise; the
plain Euler loop is the baseline of the tables), torchsde.sdeint with the same method (its default
BrownianInterval), the RNG floor (the increments alone: `normal_chunks` as simulate draws them, scaled), a jitted
JAX lax.scan, and diffrax Euler vmapped over paths with pre-generated increments and with a VirtualBrownianTree.
Every method draws its own noise inside the timed region. Problems: GBM and a 16-dimensional neural SDE
(diagonal noise), and 4-dimensional linear SDEs with scalar, additive and general (3 Brownian motions) noise.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdekit.solvers import SCHEMES, get_scheme, init_state, normal_chunks, simulate

from . import problems
from .timing import interleaved

T = 1.0
NOISE_PROBLEMS = ("scalar", "additive", "general")
RNG_FLOOR = "RNG floor (increments alone)"
STEPS_ALONE = "sdekit euler: steps alone (dW given)"
TRACED = "sdekit euler traced"      # simulate(trace=True): the opt-in traced step (the default solve is eager)


def sdekit_name(scheme: str) -> str:
    return f"sdekit {scheme}"


def plain_name(scheme: str) -> str:
    return "plain torch loop" if scheme == "euler" else f"plain torch loop ({scheme})"


def torchsde_name(scheme: str) -> str:
    return "torchsde sdeint" if scheme == "euler" else f"torchsde sdeint ({scheme})"


# Each sdekit row is judged against the plain loop and torchsde running the same scheme (every registered scheme).
SAME_SCHEME_BASELINES = {
    **{sdekit_name(s): (plain_name(s), torchsde_name(s)) for s in SCHEMES},
    "sdekit euler compiled": (plain_name("euler"), torchsde_name("euler")),
    "sdekit euler traced": (plain_name("euler"), torchsde_name("euler")),
    "sdekit milstein (jvp)": (plain_name("milstein"), torchsde_name("milstein")),
}


@dataclass
class NoiseProblem:
    """A linear SDE with a non-diagonal noise type, d = 4, m = 3 (1 for scalar); theta = (mu, sigma)."""
    name: str
    noise: str
    d: int
    m: int
    f: Callable
    g: Callable
    theta: torch.Tensor
    x0: Callable[[int], torch.Tensor]


def noise_problem(noise: str, device="cpu", dtype=torch.float32, d: int = 4, m: int = 3) -> NoiseProblem:
    """scalar: dX = mu X dt + sigma X dW (one W); additive: dX = -mu X dt + sigma C dW; general: dX = mu X dt +
    sigma diag(X) C dW, C a fixed (d, m) matrix."""
    C = (torch.randn(d, m, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / math.sqrt(m)).to(device, dtype)
    theta = torch.tensor([0.05, 0.2], device=device, dtype=dtype)
    if noise == "scalar":
        m = 1
        f = lambda t, x, th: th[0] * x
        g = lambda t, x, th: th[1] * x.unsqueeze(-1)
    elif noise == "additive":
        f = lambda t, x, th: -th[0] * x
        g = lambda t, x, th: (th[1] * C).expand(x.shape[0], d, m)
    elif noise == "general":
        f = lambda t, x, th: th[0] * x
        g = lambda t, x, th: th[1] * x.unsqueeze(-1) * C
    else:
        raise ValueError(f"no benchmark problem for noise {noise!r}")
    return NoiseProblem(noise, noise, d, m, f, g, theta, lambda B: torch.ones(B, d, device=device, dtype=dtype))


def plain_scheme_loop(scheme: str, f, g, x0: torch.Tensor, theta: torch.Tensor, N: int, generator: torch.Generator,
                      noise: str = "diagonal", m: int | None = None) -> torch.Tensor:
    """The loop a user would write around the registry's one-step map: fresh normals every step, eager, out of place."""
    sch = get_scheme(scheme)
    h = T / N
    B, d = x0.shape
    m = d if m is None else m
    ht = torch.tensor(h, dtype=x0.dtype, device=x0.device)
    y = init_state(scheme, f, g, torch.zeros((), dtype=x0.dtype, device=x0.device), x0, theta, noise=noise)
    for n in range(N):
        t = torch.tensor(n * h, dtype=x0.dtype, device=x0.device)
        dw = torch.randn((B, m), generator=generator, device=x0.device, dtype=x0.dtype) * math.sqrt(h)
        H = (torch.randn((B, m), generator=generator, device=x0.device, dtype=x0.dtype) * math.sqrt(h / 12)
             if sch.needs_levy_area else None)
        y = sch.step(f, g, t, ht, y, theta, dw, H, noise=noise)
    return y[0] if isinstance(y, tuple) else y


def rng_floor(N: int, shape: tuple[int, ...], ts: torch.Tensor, generator: torch.Generator) -> None:
    """What any simulator that draws its own noise must do: the normals `simulate` draws, scaled by sqrt(|h|) per chunk."""
    scale = (ts[1:] - ts[:-1]).abs().sqrt()
    n = 0
    for z in normal_chunks(N, shape, generator, ts.dtype, ts.device):
        c = z.shape[0]
        z.mul_(scale[n:n + c, None, None])
        n += c


def _torchsde_sde(f, g, theta, noise: str, sde_type: str):
    import torchsde  # noqa: F401 - a missing package fails here, where callers catch it

    class _SDE(torch.nn.Module):
        def f(self, t, y):
            return f(t, y, theta)

        def g(self, t, y):
            return g(t, y, theta)

    sde = _SDE()
    sde.noise_type, sde.sde_type = noise, sde_type
    return sde


def _add_torchsde(m: dict, schemes, f, g, theta, x0, N: int, noise: str) -> None:
    try:
        import torchsde
    except ImportError:
        return
    ts2 = torch.tensor([0.0, T], device=x0.device, dtype=x0.dtype)
    for s in schemes:
        sde = _torchsde_sde(f, g, theta, noise, get_scheme(s).sde_type)
        # Under no_grad: torchsde's Milstein takes dg by autograd and, with grad mode on, keeps every step's
        # graph (2.7 GB at B=1e4 after 200 steps, growing with N); its results are the same either way.
        m[torchsde_name(s)] = (lambda sde=sde, s=s: _no_grad(torchsde.sdeint, sde, x0, ts2, method=s, dt=T / N)[-1])


def torch_methods(p: problems.Problem, B: int, N: int, device: str, compile_mode: str | None,
                  heavy: bool = False, schemes: tuple[str, ...] | None = None) -> dict:
    """The torch rows of a diagonal-noise problem for `schemes` (default: every registered one; `heavy`: Euler and
    Milstein only), each as sdekit, plain loop and torchsde; the plain Euler loop always (the tables' baseline)."""
    x0 = p.x0(B)
    ts = torch.linspace(0.0, T, N + 1, device=device, dtype=x0.dtype)
    gen = lambda: torch.Generator(device=device).manual_seed(0)
    schemes = tuple(SCHEMES) if schemes is None else schemes
    if heavy:
        schemes = tuple(s for s in schemes if s in ("euler", "milstein"))
    m = {"plain torch loop": lambda: problems.plain_loop(p, x0, T, N, gen())}
    if "euler" in schemes:
        m["sdekit euler"] = lambda: simulate(p.f, p.g, x0, p.theta, ts, scheme="euler", generator=gen())
    if "milstein" in schemes:
        m["plain torch loop (milstein)"] = lambda: problems.plain_loop(p, x0, T, N, gen(), milstein=True)
        m["sdekit milstein"] = lambda: simulate(p.f, p.g, x0, p.theta, ts, scheme="milstein", generator=gen(), dg=p.dg)
    for s in schemes:
        if s not in ("euler", "milstein"):
            m[sdekit_name(s)] = lambda s=s: simulate(p.f, p.g, x0, p.theta, ts, scheme=s, generator=gen())
            m[plain_name(s)] = lambda s=s: plain_scheme_loop(s, p.f, p.g, x0, p.theta, N, gen())
    m[RNG_FLOOR] = lambda: rng_floor(N, tuple(x0.shape), ts, gen())
    if "euler" in schemes and p.name == "gbm":
        # The step's own cost: the same solve with the increments drawn beforehand (outside the timing).
        dW = torch.cat(list(normal_chunks(N, tuple(x0.shape), gen(), x0.dtype, x0.device))) * math.sqrt(T / N)
        m[STEPS_ALONE] = lambda: simulate(p.f, p.g, x0, p.theta, ts, dW, scheme="euler")
    if "euler" in schemes:
        m[TRACED] = lambda: simulate(p.f, p.g, x0, p.theta, ts, scheme="euler", generator=gen(), trace=True)
    if not heavy and "milstein" in schemes:
        m["sdekit milstein (jvp)"] = lambda: simulate(p.f, p.g, x0, p.theta, ts, scheme="milstein", generator=gen())
    if compile_mode and not heavy:
        m["sdekit euler compiled"] = lambda: simulate(p.f, p.g, x0, p.theta, ts, scheme="euler", generator=gen(),
                                                      compile=compile_mode)
    _add_torchsde(m, schemes, p.f, p.g, p.theta, x0, N, "diagonal")
    return m


def noise_methods(p: NoiseProblem, B: int, N: int, device: str, schemes: tuple[str, ...] | None = None) -> dict:
    """sdekit, the plain loop and torchsde for every registered scheme (of `schemes`) that takes the problem's noise
    type; the plain Euler loop always (the tables' baseline)."""
    x0 = p.x0(B)
    ts = torch.linspace(0.0, T, N + 1, device=device, dtype=x0.dtype)
    gen = lambda: torch.Generator(device=device).manual_seed(0)
    schemes = [s for s, sch in SCHEMES.items() if p.noise in sch.orders and (schemes is None or s in schemes)]
    m = {plain_name("euler"): lambda: plain_scheme_loop("euler", p.f, p.g, x0, p.theta, N, gen(), p.noise, p.m)}
    for s in schemes:
        m[plain_name(s)] = lambda s=s: plain_scheme_loop(s, p.f, p.g, x0, p.theta, N, gen(), p.noise, p.m)
        m[sdekit_name(s)] = lambda s=s: simulate(p.f, p.g, x0, p.theta, ts, scheme=s, generator=gen(), noise=p.noise)
    m[RNG_FLOOR] = lambda: rng_floor(N, (B, p.m), ts, gen())
    _add_torchsde(m, schemes, p.f, p.g, p.theta, x0, N, p.noise)
    return m


def _no_grad(fn, *args, **kwargs):
    with torch.no_grad():
        return fn(*args, **kwargs)


def jax_methods(p: problems.Problem, B: int, N: int, quick: bool, max_elements: float,
                heavy: bool = False) -> tuple[dict, list[str]]:
    """JAX rows that fit the memory cap; notes for those skipped."""
    import jax

    from . import jax_sims as J
    f, g, th = J.fields(p.name if p.name == "gbm" else "neural", p.params)
    x0 = jax.numpy.asarray(p.x0(B).cpu().numpy())
    key = jax.random.PRNGKey(0)
    notes, m = [], {}
    scan = J.scan_solver(f, g, T, N)
    m["jax lax.scan (jit)"] = lambda: J.block(scan(x0, th, key))
    if B * N * p.d <= max_elements and not heavy:
        inc = J.diffrax_solver(f, g, T, N, "increments")

        def pregen():
            dW = jax.random.normal(key, (B, N, p.d)) * math.sqrt(T / N)
            return J.block(inc(x0, th, dW))
        m["diffrax pre-generated"] = pregen
    else:
        notes.append(f"diffrax pre-generated skipped for {p.name} at B={B}: B*N*d = {B * N * p.d:.1e} increments exceed "
                     f"the cap {max_elements:.0e}")
    vbt_cap = 1000 if quick else 4096
    if B <= vbt_cap and not heavy:
        vbt = J.diffrax_solver(f, g, T, N, "vbt")
        m["diffrax VirtualBrownianTree"] = lambda: J.block(vbt(x0, th, key))
    else:
        notes.append(f"diffrax VirtualBrownianTree skipped for {p.name} at B={B} (> {vbt_cap}; about 1e6 path-steps/s, minutes per run)")
    return m, notes


def run(quick: bool, device: str, repeats: int, compile_mode: str | None, jax_ok: bool, progress=print,
        batches: tuple[int, ...] | None = None,
        which: tuple[str, ...] = ("gbm", "neural", *NOISE_PROBLEMS), schemes: tuple[str, ...] | None = None) -> dict:
    batches = batches or ((1_000, 10_000) if quick else (1_000, 10_000, 100_000))
    N = 200 if quick else 1000
    rows, notes = [], []
    probs = [problems.gbm(device) if name == "gbm" else problems.neural(device=device) if name == "neural"
             else noise_problem(name, device) for name in which]
    for p in probs:
        noise = p.noise if isinstance(p, NoiseProblem) else "diagonal"
        for B in batches:
            if isinstance(p, NoiseProblem) and B > 10_000:
                notes.append(f"{p.name} noise: batches above 1e4 skipped (every scheme against torchsde takes minutes there)")
                continue
            # The neural SDE at B=1e5 takes half a minute per run and method: keep the target rows, fewer repeats.
            heavy = p.name.startswith("neural") and B >= 100_000
            reps = min(repeats, 3) if heavy else repeats
            if heavy:
                notes.append(f"{p.name} at B={B}: only the plain loop, sdekit Euler/Milstein, torchsde and the "
                             f"JAX scan, {reps} repeats (each run takes tens of seconds)")
            if isinstance(p, NoiseProblem):
                m = noise_methods(p, B, N, device, schemes)
            else:
                m = torch_methods(p, B, N, device, compile_mode, heavy, schemes)
                if jax_ok and device == "cpu":
                    jm, jn = jax_methods(p, B, N, quick, max_elements=5e7 if not quick else 1e7, heavy=heavy)
                    m.update(jm)
                    notes += jn
            if "torchsde sdeint" not in m:
                notes.append("torchsde rows skipped: torchsde is not installed")
            res = interleaved(m, reps, device)
            base = res["plain torch loop"].get("median_s")
            for name, r in res.items():
                row = dict(problem=p.name, noise=noise, d=p.d, batch=B, steps=N, method=name, **r)
                if "median_s" in r:
                    row["path_steps_per_s"] = B * N / r["median_s"]
                    if base:
                        row["speedup_vs_plain"] = base / r["median_s"]
                rows.append(row)
            progress(f"  simulation {p.name} B={B}: " + ", ".join(
                f"{k} {base / v['median_s']:.2f}x" for k, v in res.items() if "median_s" in v and base))
    for p in probs:
        for B in batches:
            sub = {r["method"]: r for r in rows if r["problem"] == p.name and r["batch"] == B and "median_s" in r}
            for method, (plain, tsde) in SAME_SCHEME_BASELINES.items():
                if method not in sub:
                    continue
                r = sub[method]
                if plain in sub:
                    r["speedup_vs_plain_same_scheme"] = sub[plain]["median_s"] / r["median_s"]
                if tsde in sub:
                    r["speedup_vs_torchsde"] = sub[tsde]["median_s"] / r["median_s"]
            floor = sub.get(RNG_FLOOR)
            if floor:
                for method in ("sdekit euler", "plain torch loop", TRACED, "sdekit euler compiled", STEPS_ALONE):
                    if method in sub:
                        sub[method]["vs_rng_floor"] = sub[method]["median_s"] / floor["median_s"]
    return {"rows": rows, "notes": sorted(set(notes)), "steps": N, "batches": list(batches)}


# --- adaptive steps ------------------------------------------------------------------------------------------
ADAPTIVE_PROBLEM = dict(lam=200.0, tau=0.015, sigma=0.3)


def stiff_layer(lam: float = 200.0, tau: float = 0.015, sigma: float = 0.3):
    """dX = -lam e^(-t/tau) X dt + sigma X dW, X_0 = 1: a stiff layer of width tau at t = 0 (explicit Euler is unstable
    there for steps above 2/lam), then geometric Brownian motion. X_T = exp(-lam tau (1 - e^(-T/tau)) - sigma^2 T/2
    + sigma W_T) on the path's own W_T. Returns (Ito drift, Stratonovich drift, g, theta, exact(W_T, T))."""
    theta = torch.tensor([lam, tau, sigma], dtype=torch.float64)
    f = lambda t, x, th: -th[0] * torch.exp(-t / th[1]) * x
    f_strat = lambda t, x, th: -th[0] * torch.exp(-t / th[1]) * x - 0.5 * th[2] ** 2 * x
    g = lambda t, x, th: th[2] * x

    def exact(W_T: torch.Tensor, T_: float = T) -> torch.Tensor:
        return torch.exp(-lam * tau * (1 - math.exp(-T_ / tau)) - 0.5 * sigma**2 * T_ + sigma * W_T)
    return f, f_strat, g, theta, exact


def _interp_steps(fixed: list[tuple[int, float]], err: float) -> float | None:
    """The fixed-grid step count reaching `err`, log-log interpolated between the measured grids (None if out of range)."""
    pts = sorted(fixed)
    for (n0, e0), (n1, e1) in zip(pts, pts[1:]):
        if e0 >= err >= e1 and e0 > e1:
            w = (math.log(e0) - math.log(err)) / (math.log(e0) - math.log(e1))
            return math.exp(math.log(n0) + w * (math.log(n1) - math.log(n0)))
    return None


def adaptive_run(quick: bool, device: str = "cpu", progress=print, seed: int = 0) -> dict:
    """Strong error against scheme steps: uniform grids (N = 16 .. 2^13) and adaptive steps (step doubling, rtol
    1e-1 .. 1e-3, atol = rtol / 100) on the same Brownian motion, for Milstein (Ito drift), Heun and midpoint
    (Stratonovich drift), on `stiff_layer` (adaptive Euler is refused on this multiplicative noise). Error: mean over B
    paths of |X_1 - X(1)| against the closed form on the
    path's own W_1. The tree is the path; the uniform grids read it through a BrownianGrid on the finest grid
    (dyadic times, so every coarser grid sums the same increments)."""
    import time

    from sdekit.solvers.brownian_path import BrownianGrid, VirtualBrownianTree
    B = 128 if quick else 256
    kmax = 12 if quick else 13
    f, f_strat, g, theta, exact = stiff_layer(**ADAPTIVE_PROBLEM)
    theta = theta.to(device)
    x0 = torch.ones(B, 1, dtype=torch.float64, device=device)
    tree = VirtualBrownianTree(0.0, T, (B, 1), seed=seed, dtype=torch.float64, device=device)
    fine = torch.linspace(0.0, T, 2**kmax + 1, dtype=torch.float64, device=device)
    grid = BrownianGrid(fine, tree.increments(fine))
    X_T = exact(tree(0.0, T))
    scale = float(X_T.abs().mean())
    rows, summary = [], []
    ends = torch.tensor([0.0, T], dtype=torch.float64, device=device)
    for scheme, drift in (("milstein", f), ("heun", f_strat), ("midpoint", f_strat)):
        fixed = []
        for k in range(4, kmax + 1):
            N = 2**k
            ts = torch.linspace(0.0, T, N + 1, dtype=torch.float64, device=device)
            t0 = time.perf_counter()
            x = simulate(drift, g, x0, theta, ts, scheme=scheme, bm=grid, check_finite=False)
            wall = time.perf_counter() - t0
            err = float((x - X_T).abs().mean())
            fixed.append((N, err))
            rows.append(dict(scheme=scheme, kind="fixed", steps=N, step_evaluations=N, error=err, wall_s=wall))
        for rtol in (1e-1, 3e-2, 1e-2, 3e-3, 1e-3):
            t0 = time.perf_counter()
            x, info = simulate(drift, g, x0, theta, ends, scheme=scheme, bm=tree, adaptive=True, rtol=rtol,
                               atol=rtol / 100, return_info=True)
            wall = time.perf_counter() - t0
            err = float((x - X_T).abs().mean())
            eq = _interp_steps(fixed, err)
            rows.append(dict(scheme=scheme, kind="adaptive", rtol=rtol, steps=info["accepted"],
                             rejected=info["rejected"], step_evaluations=info["step_evaluations"], error=err, wall_s=wall,
                             fixed_steps_same_error=eq,
                             step_ratio=None if eq is None else eq / info["step_evaluations"]))
        ratios = [r["step_ratio"] for r in rows if r["scheme"] == scheme and r.get("step_ratio")]
        summary.append(dict(scheme=scheme, min_ratio=min(ratios) if ratios else None,
                            max_ratio=max(ratios) if ratios else None))
        progress(f"  adaptive {scheme}: fixed-grid steps for the same error / adaptive step evaluations "
                 + ", ".join(f"{r['rtol']:g}: {r['step_ratio']:.1f}x" for r in rows
                             if r["scheme"] == scheme and r.get("step_ratio")))
    return {"rows": rows, "summary": summary, "batch": B, "mean_abs_X_T": scale, "problem": dict(ADAPTIVE_PROBLEM),
            "note": "step evaluations count the three scheme steps of every attempt, rejected ones included"}

"""SDE simulation throughput (path-steps per second): sdekit's simulator against the usual ways to simulate.

Rows per (problem, batch): sdekit.simulate Euler-Maruyama and Milstein (traced step; torch.compile'd with --compile),
the plain torch loop in Euler (baseline of the tables) and Milstein form, torchsde.sdeint (Euler and Milstein, its
default BrownianInterval),
a jitted JAX lax.scan, and diffrax Euler vmapped over paths with pre-generated increments and with a
VirtualBrownianTree. Every method draws its own noise inside the timed region.
"""
from __future__ import annotations

import math

import torch

from sdekit.solvers import simulate, step_map
from sdekit.solvers._tracing import _agrees, cached_trace, field_state

from . import problems
from .timing import interleaved

T = 1.0

# Each sdekit row is judged against the plain loop and torchsde running the same scheme.
SAME_SCHEME_BASELINES = {
    "sdekit euler": ("plain torch loop", "torchsde sdeint"),
    "sdekit euler compiled": ("plain torch loop", "torchsde sdeint"),
    "sdekit milstein": ("plain torch loop (milstein)", "torchsde sdeint (milstein)"),
    "sdekit milstein (jvp)": ("plain torch loop (milstein)", "torchsde sdeint (milstein)"),
}


def torch_methods(p: problems.Problem, B: int, N: int, device: str, compile_mode: str | None,
                  heavy: bool = False) -> dict:
    """The torch rows; `heavy` keeps only those the targets need (plain loop, sdekit, torchsde)."""
    x0 = p.x0(B)
    ts = torch.linspace(0.0, T, N + 1, device=device, dtype=x0.dtype)
    gen = lambda: torch.Generator(device=device).manual_seed(0)
    m = {
        "plain torch loop": lambda: problems.plain_loop(p, x0, T, N, gen()),
        "plain torch loop (milstein)": lambda: problems.plain_loop(p, x0, T, N, gen(), milstein=True),
        "sdekit euler": lambda: simulate(p.f, p.g, x0, p.theta, ts, scheme="euler", generator=gen()),
        "sdekit milstein": lambda: simulate(p.f, p.g, x0, p.theta, ts, scheme="milstein", generator=gen(), dg=p.dg),
    }
    m["sdekit euler: trace guard alone"] = guard_only(p, x0, ts)
    if not heavy:
        m["sdekit milstein (jvp)"] = lambda: simulate(p.f, p.g, x0, p.theta, ts, scheme="milstein", generator=gen())
    if compile_mode and not heavy:
        m["sdekit euler compiled"] = lambda: simulate(p.f, p.g, x0, p.theta, ts, scheme="euler", generator=gen(),
                                                      compile=compile_mode)
    try:
        import torchsde
        sde = problems.torchsde_module(p)
        ts2 = torch.tensor([0.0, T], device=device, dtype=x0.dtype)
        # Under no_grad: torchsde's Milstein takes dg by autograd and, with grad mode on, keeps every step's
        # graph (2.7 GB at B=1e4 after 200 steps, growing with N); its results are the same either way.
        m["torchsde sdeint"] = lambda: _no_grad(torchsde.sdeint, sde, x0, ts2, method="euler", dt=T / N)[-1]
        m["torchsde sdeint (milstein)"] = lambda: _no_grad(torchsde.sdeint, sde, x0, ts2, method="milstein", dt=T / N)[-1]
    except ImportError:
        pass
    return m


def guard_only(p: problems.Problem, x0: torch.Tensor, ts: torch.Tensor, scheme: str = "euler"):
    """The work `simulate` adds per solve to keep a cached trace honest, timed alone: the fingerprint of what
    f and g read, and the traced step re-checked against the eager one at the solve's probe point."""
    dg = p.dg if scheme == "milstein" else None
    step = step_map(scheme, p.f, p.g, dg)
    h = ts[1:] - ts[:-1]
    dw0, dwk = torch.zeros_like(x0), 0.1 * torch.ones_like(x0)
    points = ((ts[0], h[0], x0, dw0, p.theta), (ts[1], h[1], x0 + 0.01 * dwk, dwk, p.theta))
    key = ("simulate", scheme, field_state(p.f, p.g, dg)[0], *x0.shape, p.theta.shape, x0.dtype, x0.device)
    bind = cached_trace(key, lambda: step, *points, invariant=(4,))

    def run():
        field_state(p.f, p.g, dg)
        return _agrees(bind, step, points[1:], (4,))
    return run


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
        notes.append(f"diffrax pre-generated skipped for {p.name} at B={B}: B*N*d = {B * N * p.d:.1e} increments exceed the cap {max_elements:.0e}")
    vbt_cap = 1000 if quick else 4096
    if B <= vbt_cap and not heavy:
        vbt = J.diffrax_solver(f, g, T, N, "vbt")
        m["diffrax VirtualBrownianTree"] = lambda: J.block(vbt(x0, th, key))
    else:
        notes.append(f"diffrax VirtualBrownianTree skipped for {p.name} at B={B} (> {vbt_cap}; about 1e6 path-steps/s, minutes per run)")
    return m, notes


def run(quick: bool, device: str, repeats: int, compile_mode: str | None, jax_ok: bool, progress=print,
        batches: tuple[int, ...] | None = None, which: tuple[str, ...] = ("gbm", "neural")) -> dict:
    batches = batches or ((1_000, 10_000) if quick else (1_000, 10_000, 100_000))
    N = 200 if quick else 1000
    rows, notes = [], []
    probs = [problems.gbm(device) if name == "gbm" else problems.neural(device=device) for name in which]
    for p in probs:
        for B in batches:
            # The neural SDE at B=1e5 takes half a minute per run and method: keep the target rows, fewer repeats.
            heavy = p.name != "gbm" and B >= 100_000
            reps = min(repeats, 3) if heavy else repeats
            if heavy:
                notes.append(f"{p.name} at B={B}: only the plain loop, sdekit Euler/Milstein, torchsde and the "
                             f"JAX scan, {reps} repeats (each run takes tens of seconds)")
            m = torch_methods(p, B, N, device, compile_mode, heavy)
            if "torchsde sdeint" not in m:
                notes.append("torchsde rows skipped: torchsde is not installed")
            if jax_ok and device == "cpu":
                jm, jn = jax_methods(p, B, N, quick, max_elements=5e7 if not quick else 1e7, heavy=heavy)
                m.update(jm)
                notes += jn
            res = interleaved(m, reps, device)
            base = res["plain torch loop"]["median_s"]
            for name, r in res.items():
                row = dict(problem=p.name, d=p.d, batch=B, steps=N, method=name, **r)
                if "median_s" in r:
                    row["path_steps_per_s"] = B * N / r["median_s"]
                    row["speedup_vs_plain"] = base / r["median_s"]
                rows.append(row)
            progress(f"  simulation {p.name} B={B}: " + ", ".join(
                f"{k} {base / v['median_s']:.2f}x" for k, v in res.items() if "median_s" in v))
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
            guard = sub.get("sdekit euler: trace guard alone")
            if guard and "sdekit euler" in sub:
                sub["sdekit euler"]["guard_fraction"] = guard["median_s"] / sub["sdekit euler"]["median_s"]
    return {"rows": rows, "notes": sorted(set(notes)), "steps": N, "batches": list(batches)}

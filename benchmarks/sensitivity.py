"""Pathwise sensitivities: time and peak memory of forward mode, backprop, the adjoints and diffrax against steps and P.

Three sweeps. "steps" and "params": every method differentiates Euler-Maruyama on the same grid; forward methods
return the whole Jacobian J = dX/dtheta (B, d, P) (and the path with save="path"); backprop, the adjoints and
diffrax return the gradient of the scalar mean(X_T), which is what one reverse pass gives; the primal
`sdekit.simulate` on the same increments is the baseline of every ratio. "adjoint": the gradient of mean(X_T) on GBM
for N = 100 .. 10000 by sdekit's native adjoint (reversible_heun: the path rebuilt with the exact inverse step),
checkpointed backprop (euler and reversible_heun), backprop through the same solves, torchsde's adjoint and diffrax's
(RecursiveCheckpointAdjoint), with peak memory; plus the native adjoint alone at a large batch, where its working set
is well above the resolution of the resident-memory measurement.
"""
from __future__ import annotations

import math

import torch

from sdekit import sensitivity, simulate
from sdekit.sensitivity import adjoint as sdekit_adjoint
from sdekit.sensitivity import backprop as sdekit_backprop

from . import problems
from .timing import interleaved, peak_memory_mib

T = 1.0


def straightforward_forward(f, g, x0, theta, ts, dW, save="path"):
    """The direct implementation the target names: per step, vmap over directions of jvp through f and g."""
    P = theta.shape[0]
    eye = torch.eye(P, dtype=theta.dtype, device=theta.device)
    x, J = x0, x0.new_zeros(P, *x0.shape)
    xs, Js = [x], [J]
    h = ts[1:] - ts[:-1]
    for n in range(h.shape[0]):
        t = ts[n]
        jf = torch.func.vmap(lambda jx, jt: torch.func.jvp(lambda y, th: f(t, y, th), (x, theta), (jx, jt)), out_dims=(None, 0))
        jg = torch.func.vmap(lambda jx, jt: torch.func.jvp(lambda y, th: g(t, y, th), (x, theta), (jx, jt)), out_dims=(None, 0))
        (fx, df), (gx, dg) = jf(J, eye), jg(J, eye)
        x, J = x + fx * h[n] + gx * dW[n], J + df * h[n] + dg * dW[n]
        if save == "path":
            xs.append(x)
            Js.append(J)
    return (torch.stack(xs), torch.stack(Js).movedim(1, -1)) if save == "path" else (x, J.movedim(0, -1))


def backprop(f, g, x0, theta, ts, dW):
    """Autograd through the Euler loop: d mean(X_T)/d theta, one reverse pass, a tape of N steps."""
    th = theta.detach().requires_grad_(True)
    h, x = ts[1:] - ts[:-1], x0
    for n in range(h.shape[0]):
        x = x + f(ts[n], x, th) * h[n] + g(ts[n], x, th) * dW[n]
    return torch.autograd.grad(x.mean(), th)[0]


def adjoint_torchsde(p, x0, ts, N, method: str = "euler"):
    """torchsde.sdeint_adjoint (BrownianInterval): memory flat in N, backward re-solves. method "euler" (Ito) or
    "reversible_heun" (Stratonovich, with torchsde's reversible adjoint "adjoint_reversible_heun")."""
    import torchsde

    class _SDE(torch.nn.Module):
        noise_type, sde_type = "diagonal", ("ito" if method == "euler" else "stratonovich")

        def __init__(self):
            super().__init__()
            self.theta = torch.nn.Parameter(p.theta.clone())

        def f(self, t, y):
            return p.f(t, y, self.theta)

        def g(self, t, y):
            return p.g(t, y, self.theta)

    sde = _SDE()
    ts2 = torch.stack([ts[0], ts[-1]])

    adjoint_method = "euler" if method == "euler" else "adjoint_reversible_heun"

    def run():
        x = torchsde.sdeint_adjoint(sde, x0, ts2, method=method, adjoint_method=adjoint_method, dt=T / N)[-1]
        return torch.autograd.grad(x.mean(), sde.theta)[0]
    return run


def methods(p, B: int, N: int, device: str, jax_ok: bool, with_path: bool = True, adjoint_max_steps: int = 1000) -> dict:
    x0 = p.x0(B)
    ts = torch.linspace(0.0, T, N + 1, device=device, dtype=x0.dtype)
    dW = torch.randn((N, B, p.d), generator=torch.Generator().manual_seed(1), dtype=x0.dtype).to(device) * math.sqrt(T / N)
    f, g, th = p.f, p.g, p.theta
    m = {"primal simulate": lambda: simulate(f, g, x0, th, ts, dW)}
    m["forward, end"] = lambda: sensitivity.forward(f, g, x0, th, ts, dW, save="end")
    if with_path:
        m["forward, path"] = lambda: sensitivity.forward(f, g, x0, th, ts, dW, save="path")
        m["vmap-jvp per step, path"] = lambda: straightforward_forward(f, g, x0, th, ts, dW, "path")
    m["vmap-jvp per step, end"] = lambda: straightforward_forward(f, g, x0, th, ts, dW, "end")
    m["backprop"] = lambda: backprop(f, g, x0, th, ts, dW)
    try:
        import torchsde  # noqa: F401
        if N <= adjoint_max_steps:      # several hundred times the primal: long runs take minutes
            m["adjoint (torchsde)"] = adjoint_torchsde(p, x0, ts, N)
    except ImportError:
        pass
    if jax_ok and device == "cpu":
        import jax.numpy as jnp

        from . import jax_sims as J
        jf, jg, jth = J.fields("gbm" if p.name == "gbm" else "neural", p.params)
        grad = J.diffrax_grad(jf, jg, T, N)
        jx0, jdW = jnp.asarray(x0.cpu().numpy()), jnp.asarray(dW.movedim(0, 1).cpu().numpy())
        m["diffrax grad (checkpointed)"] = lambda: J.block(grad(jth, jx0, jdW))
    return m


def _mean(x):
    return x.sum(-1)


def gradient_methods(p, x0, ts, dW, jax_ok: bool, torchsde_max_steps: int, device: str) -> dict:
    """d mean(X_T)/d theta by every gradient method the adjoint sweep compares (and the primal solves as baselines)."""
    f, g, th = p.f, p.g, p.theta
    N = ts.shape[0] - 1
    m = {"primal euler": lambda: simulate(f, g, x0, th, ts, dW),
         "primal reversible_heun": lambda: simulate(f, g, x0, th, ts, dW, "reversible_heun"),
         "backprop, euler": lambda: sdekit_backprop.mean_gradient(f, g, x0, th, ts, dW, _mean, "euler"),
         "checkpointed backprop, euler": lambda: sdekit_adjoint.mean_gradient(f, g, x0, th, ts, dW, _mean, "euler"),
         "backprop, reversible_heun": lambda: sdekit_backprop.mean_gradient(f, g, x0, th, ts, dW, _mean, "reversible_heun"),
         "adjoint, reversible_heun": lambda: sdekit_adjoint.mean_gradient(f, g, x0, th, ts, dW, _mean, "reversible_heun"),
         "checkpointed backprop, reversible_heun": lambda: sdekit_adjoint.mean_gradient(
             f, g, x0, th, ts, dW, _mean, "reversible_heun", backend="checkpoint")}
    try:
        import torchsde  # noqa: F401
        if N <= torchsde_max_steps:     # hundreds of times the primal: long runs take minutes
            m["torchsde adjoint, euler"] = adjoint_torchsde(p, x0, ts, N)
            m["torchsde adjoint, reversible_heun"] = adjoint_torchsde(p, x0, ts, N, "reversible_heun")
    except ImportError:
        pass
    if jax_ok and device == "cpu":
        import jax.numpy as jnp

        from . import jax_sims as J
        jf, jg, jth = J.fields("gbm" if p.name == "gbm" else "neural", p.params)
        jx0, jdW = jnp.asarray(x0.cpu().numpy()), jnp.asarray(dW.movedim(0, 1).cpu().numpy())
        for label, solver in (("euler", "Euler"), ("reversible_heun", "ReversibleHeun")):
            grad = _diffrax_grad(jf, jg, T, N, solver)
            m[f"diffrax grad (checkpointed), {label}"] = (lambda gr: lambda: J.block(gr(jth, jx0, jdW)))(grad)
    return m


def _diffrax_grad(f, g, T_: float, N: int, solver: str):
    """jit(theta, x0, dW (B, N, d)) -> d mean(X_T)/d theta by diffrax (its default RecursiveCheckpointAdjoint)."""
    import diffrax
    import jax
    import lineax

    from .jax_sims import _Increments
    h = T_ / N

    def one(x0, th, noise):
        terms = diffrax.MultiTerm(diffrax.ODETerm(lambda t, y, args: f(y, th)),
                                  diffrax.ControlTerm(lambda t, y, args: lineax.DiagonalLinearOperator(g(y, th)),
                                                      _Increments(0.0, T_, noise)))
        sol = diffrax.diffeqsolve(terms, getattr(diffrax, solver)(), 0.0, T_, h, x0, saveat=diffrax.SaveAt(t1=True),
                                  max_steps=N + 1)
        return sol.ys[-1]

    return jax.jit(jax.grad(lambda th, x0, dW: jax.vmap(one, in_axes=(0, None, 0))(x0, th, dW).sum(-1).mean()))


def adjoint_sweep(quick: bool, device: str, repeats: int, jax_ok: bool, progress=print) -> tuple[list, dict]:
    """Gradient methods on GBM (float32) against N, with peak memory; then the native adjoint alone at a large batch."""
    B = 1024 if quick else 4096
    steps = (100, 1000, 10_000)
    rows = []
    p = problems.gbm(device)
    for N in steps:
        x0 = p.x0(B)
        ts = torch.linspace(0.0, T, N + 1, device=device, dtype=x0.dtype)
        dW = torch.randn((N, B, p.d), generator=torch.Generator().manual_seed(1), dtype=x0.dtype).to(device) * math.sqrt(T / N)
        m = gradient_methods(p, x0, ts, dW, jax_ok, torchsde_max_steps=100 if quick else 1000, device=device)
        res = interleaved(m, repeats if N <= 1000 else max(1, repeats // 2), device)
        mem = {k: peak_memory_mib(fn, device) for k, fn in m.items() if "error" not in res[k]}
        base = res["primal reversible_heun"]["median_s"]
        bp = {s: res.get(f"backprop, {s}", {}).get("median_s") for s in ("euler", "reversible_heun")}
        for name, r in res.items():
            scheme = "reversible_heun" if name.endswith("reversible_heun") else "euler"
            row = dict(sweep="adjoint", problem=p.name, batch=B, steps=N, P=p.theta.shape[0], method=name,
                       peak_mib=mem.get(name), **r)
            if "median_s" in r:
                row["time_vs_primal"] = r["median_s"] / base
                if bp[scheme]:
                    row["time_vs_backprop"] = r["median_s"] / bp[scheme]
            rows.append(row)
        progress(f"  adjoint sweep gbm N={N}: " + ", ".join(
            f"{k} {v['median_s'] / base:.1f}x/{mem.get(k, float('nan')):.0f}MiB" for k, v in res.items() if "median_s" in v))
    # the native adjoint's own memory, at a batch where its working set (a few states) is megabytes
    Bl = 16384 if quick else 65536
    flat = []
    for N in steps:
        x0 = p.x0(Bl)
        ts = torch.linspace(0.0, T, N + 1, device=device, dtype=x0.dtype)
        dW = torch.randn((N, Bl, p.d), generator=torch.Generator().manual_seed(2), dtype=x0.dtype).to(device) * math.sqrt(T / N)
        for name, fn in (("primal reversible_heun", lambda: simulate(p.f, p.g, x0, p.theta, ts, dW, "reversible_heun")),
                         ("adjoint, reversible_heun", lambda: sdekit_adjoint.mean_gradient(p.f, p.g, x0, p.theta, ts, dW, _mean,
                                                                                           "reversible_heun"))):
            fn()                                        # warm: traces cached, allocator settled
            flat.append(dict(sweep="adjoint_memory", problem=p.name, batch=Bl, steps=N, method=name,
                             peak_mib=max(peak_memory_mib(fn, device) for _ in range(2))))
        dW = fn = None                                  # the increments go before the next N's are drawn
        progress(f"  adjoint memory B={Bl} N={N}: " + ", ".join(f"{r['method']} {r['peak_mib']:.1f} MiB"
                                                              for r in flat if r["steps"] == N))
    return rows + flat, {"adjoint_batch": B, "adjoint_steps": list(steps), "adjoint_memory_batch": Bl}


def run(quick: bool, device: str, repeats: int, jax_ok: bool, progress=print) -> dict:
    B = 4096
    steps = (100, 1000) if quick else (100, 1000, 10_000)
    rows = []
    p = problems.gbm(device)
    for N in steps:
        m = methods(p, B, N, device, jax_ok, with_path=N <= 1000 or not quick, adjoint_max_steps=100 if quick else 1000)
        res = interleaved(m, repeats if N <= 1000 else max(1, repeats // 2), device)
        mem = {k: peak_memory_mib(fn, device) for k, fn in m.items() if "error" not in res[k]}
        base = res["primal simulate"]["median_s"]
        for name, r in res.items():
            rows.append(dict(sweep="steps", problem=p.name, batch=B, steps=N, P=p.theta.shape[0], method=name,
                             peak_mib=mem.get(name), time_vs_primal=r["median_s"] / base if "median_s" in r else None, **r))
        progress(f"  sensitivity gbm N={N}: " + ", ".join(f"{k} {v['median_s'] / base:.1f}x" for k, v in res.items() if "median_s" in v))
    Ps = (1, 4, 16, 64) if quick else (1, 2, 4, 8, 16, 32, 64)
    N = 100 if quick else 500
    for P in Ps:
        q = problems.neural(P=P, device=device)
        m = methods(q, 1024, N, device, jax_ok, with_path=False, adjoint_max_steps=0 if quick else N)
        m = {k: v for k, v in m.items() if k in ("primal simulate", "forward, end", "vmap-jvp per step, end", "backprop",
                                                 "adjoint (torchsde)", "diffrax grad (checkpointed)")}
        x0 = q.x0(1024)
        ts = torch.linspace(0.0, T, N + 1, device=device, dtype=x0.dtype)
        dW = torch.randn((N, 1024, q.d), generator=torch.Generator().manual_seed(1), dtype=x0.dtype).to(device) * math.sqrt(T / N)
        g_m = gradient_methods(q, x0, ts, dW, False, torchsde_max_steps=0, device=device)
        m.update({k: g_m[k] for k in ("checkpointed backprop, euler", "backprop, reversible_heun", "adjoint, reversible_heun")})
        res = interleaved(m, repeats, device)
        base = res["primal simulate"]["median_s"]
        for name, r in res.items():
            rows.append(dict(sweep="params", problem=q.name, batch=1024, steps=N, P=P, method=name,
                             time_vs_primal=r["median_s"] / base if "median_s" in r else None, **r))
        progress(f"  sensitivity neural P={P}: " + ", ".join(f"{k} {v['median_s'] / base:.1f}x" for k, v in res.items() if "median_s" in v))
    adj_rows, adj_info = adjoint_sweep(quick, device, repeats, jax_ok, progress)
    return {"rows": rows + adj_rows, "batch": B, "steps": list(steps), "params": list(Ps), **adj_info}

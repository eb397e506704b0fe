"""Pathwise sensitivities: time and peak memory of forward mode, backprop, adjoint and diffrax against steps and P.

All methods differentiate Euler-Maruyama on the same grid. Forward methods return the whole Jacobian
J = dX/dtheta (B, d, P) (and the path with save="path"); backprop, adjoint and diffrax return the gradient of
the scalar mean(X_T), which is what one reverse pass gives; the primal `sdekit.simulate` on the same
increments is the baseline of every ratio.
"""
from __future__ import annotations

import math

import torch

from sdekit import sensitivity, simulate

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


def adjoint_torchsde(p, x0, ts, N):
    """torchsde.sdeint_adjoint (Euler, BrownianInterval): memory flat in N, backward re-solves."""
    import torchsde

    class _SDE(torch.nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        def __init__(self):
            super().__init__()
            self.theta = torch.nn.Parameter(p.theta.clone())

        def f(self, t, y):
            return p.f(t, y, self.theta)

        def g(self, t, y):
            return p.g(t, y, self.theta)

    sde = _SDE()
    ts2 = torch.stack([ts[0], ts[-1]])

    def run():
        x = torchsde.sdeint_adjoint(sde, x0, ts2, method="euler", dt=T / N)[-1]
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
    Ps = (1, 4, 16) if quick else (1, 2, 4, 8, 16, 32)
    N = 100 if quick else 500
    for P in Ps:
        q = problems.neural(P=P, device=device)
        m = methods(q, 1024, N, device, jax_ok, with_path=False, adjoint_max_steps=0 if quick else N)
        m = {k: v for k, v in m.items() if k in ("primal simulate", "forward, end", "vmap-jvp per step, end", "backprop",
                                                 "adjoint (torchsde)", "diffrax grad (checkpointed)")}
        res = interleaved(m, repeats, device)
        base = res["primal simulate"]["median_s"]
        for name, r in res.items():
            rows.append(dict(sweep="params", problem=q.name, batch=1024, steps=N, P=P, method=name,
                             time_vs_primal=r["median_s"] / base if "median_s" in r else None, **r))
        progress(f"  sensitivity neural P={P}: " + ", ".join(f"{k} {v['median_s'] / base:.1f}x" for k, v in res.items() if "median_s" in v))
    return {"rows": rows, "batch": B, "steps": list(steps), "params": list(Ps)}

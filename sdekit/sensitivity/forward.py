"""Forward sensitivity: J_t = dX_t/dtheta integrated alongside the path, in one pass, forward in time.

Differentiating the SDE dX = f dt + g dW in theta gives the sensitivity equation

    dJ = (df/dx J + df/dtheta) dt + (dg/dx J + dg/dtheta) dW,    J_0 = dX_0/dtheta (zero by default).

Here it is discretised by differentiating the scheme's own one-step map Phi(x, theta):
J_{n+1} = dPhi/dx J_n + dPhi/dtheta. For Euler this is exactly Euler on the equation above; for
Milstein and Heun it carries the derivatives of their extra terms (g dg/dx, the predictor) too, so
J is, to round-off, what autograd through the same discrete solver returns.

Dual-number style: each step is one `torch.func.jvp` of Phi with the P tangent directions
(the P columns of J, paired with the unit vectors of theta) vmapped as a batch dimension, so f and
g are evaluated once per step on the primal and once, batched, on the tangents. Nothing is taped;
with save="end" memory does not grow with the number of steps. The vmapped JVP of one step is traced
once into a plain aten graph (`tracing.trace_step`) and that graph is run N times.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .schemes import SCHEMES, Field, check_inputs
from .tracing import cached_trace

__all__ = ["forward"]


def forward(f: Field, g: Field, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor, scheme: str = "euler",
            save: str = "path", J0: Tensor | None = None, trace: bool = True) -> tuple[Tensor, Tensor]:
    """Path X and sensitivity J = dX/dtheta of the discrete scheme, by forward-mode differentiation.

    f(t, x, theta) -> (B, d) drift; g(t, x, theta) -> (B, d) diagonal diffusion (g_i may depend on x_i only).
    x0: (B, d); theta: (P,); ts: (N+1,) strictly monotone; dW: (N, B, d) Brownian increments over ts.
    scheme: "euler" (Euler-Maruyama, Ito), "milstein" (Ito), or "heun" (stochastic Heun, which solves
    the SDE in the **Stratonovich** sense; pass the Stratonovich drift f - g dg/dx / 2 to target an Ito SDE).
    save: "path" returns xs (N+1, B, d) and J (N+1, B, d, P); "end" returns X and J at ts[-1] only,
    (B, d) and (B, d, P), in memory independent of N.
    J0: (B, d, P) initial sensitivity dX_0/dtheta, e.g. a direction of the initial noise; zero if None.
    trace: run the per-step JVP as a traced graph (fast); False runs torch.func eagerly every step.
    Not differentiable by autograd (J is computed in forward mode, detached from any tape).
    """
    check_inputs(f, g, x0, theta, ts, dW, scheme, save)
    B, d = x0.shape
    P = theta.shape[0]
    if J0 is None:
        Jt = x0.new_zeros(P, B, d)
    else:
        if J0.shape != (B, d, P):
            raise ValueError(f"J0 must be (B, d, P) = ({B}, {d}, {P}), got {tuple(J0.shape)}")
        Jt = J0.to(x0).movedim(-1, 0)                      # tangents batched first: (P, B, d)
    theta_dirs = torch.eye(P, dtype=theta.dtype, device=theta.device)
    step = SCHEMES[scheme]
    h = ts[1:] - ts[:-1]

    def batched_step(t, hn, x, dw, th, jx, jtheta):
        # primal inputs are unbatched, so the primal step runs once; only tangents carry the P axis
        tangent = lambda a, b: torch.func.jvp(lambda y, p: step(f, g, t, hn, y, p, dw), (x, th), (a, b))
        return torch.func.vmap(tangent, in_dims=(0, 0), out_dims=(None, 0))(jx, jtheta)
    run_step = batched_step

    theta, x0 = theta.detach(), x0.detach()
    Jt = Jt.detach()
    if trace:
        k = 1 if h.shape[0] > 1 else 0
        key = ("forward", f, g, scheme, B, d, P, x0.dtype, x0.device)
        run_step = cached_trace(key, lambda: batched_step, (ts[0], h[0], x0, dW[0], theta, Jt, theta_dirs),
                                (ts[k], h[k], x0 + 0.01 * dW[k], dW[k], theta, Jt + 0.1, theta_dirs))
    x = x0
    xs, Js = ([x0], [Jt]) if save == "path" else (None, None)
    for n in range(h.shape[0]):
        x, Jt = run_step(ts[n], h[n], x, dW[n], theta, Jt, theta_dirs)
        if save == "path":
            xs.append(x)
            Js.append(Jt)
    if save == "end":
        return x, Jt.movedim(0, -1)
    return torch.stack(xs), torch.stack(Js).movedim(1, -1)

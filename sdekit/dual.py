"""Forward sensitivities by dual numbers: J = dX/dtheta alongside the path, with little per-step overhead.

The same quantity as `sdekit.sensitivity.forward` (the Jacobian of the discrete scheme's path in
theta, equal to autograd through the scheme to round-off), computed with PyTorch's native forward-mode
dual tensors (`torch.autograd.forward_ad`) instead of functorch's `vmap(jvp(...))`:

  - one dual level is opened for the whole solve; theta's P dual copies (tangent e_k) are made once;
  - per step and direction k, f and g are called once on the dual x (tangent J[k]), which gives the
    primal f, g and their directional derivatives (df/dx J_k + df/dtheta_k, same for g) in one pass;
  - the tangent and primal updates are plain in-place ops into the next slot of a preallocated path
    (or a ping-pong buffer with save="end", so memory does not grow with the number of steps).

Profiling showed functorch's transforms cost hundreds of microseconds of Python per step, which
dominates at the batch sizes of interest; native dual tensors cost a few kernel launches per field call.
The price: f and g run P times per step (once per direction), so the cost is about P x (primal with
tangent) instead of 1 + P batched. That wins for small P (the target is P <= 4); for large P use
backprop or the adjoint. Milstein needs dg_i/dx_i as `dg=` here (nested forward mode is not available);
without it the solve falls back to a vmap-over-directions jvp of the whole step.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

__all__ = ["forward", "forward_vmap"]

Field = Callable[[Tensor, Tensor, Tensor], Tensor]
_SCHEMES = ("euler", "milstein", "heun")


def _check(x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor, scheme: str, save: str) -> None:
    if scheme not in _SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {_SCHEMES}")
    if save not in ("path", "end"):
        raise ValueError(f"unknown save {save!r}; expected 'path' or 'end'")
    if x0.ndim != 2 or theta.ndim != 1 or ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"expected x0 (B, d), theta (P,), ts (N+1,) with N >= 1; got {tuple(x0.shape)}, "
                         f"{tuple(theta.shape)}, {tuple(ts.shape)}")
    if dW.shape != (ts.shape[0] - 1, *x0.shape):
        raise ValueError(f"dW must be (N, B, d) = ({ts.shape[0] - 1}, {x0.shape[0]}, {x0.shape[1]}), got {tuple(dW.shape)}")


def forward(f: Field, g: Field, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor, scheme: str = "euler",
            save: str = "path", J0: Tensor | None = None, dg: Field | None = None) -> tuple[Tensor, Tensor]:
    """Path X and J = dX/dtheta of the discrete scheme; the signature of `sdekit.sensitivity.forward`.

    f(t, x, theta) -> (B, d); g(t, x, theta) -> (B, d) diagonal (g_i may depend on x_i only).
    x0: (B, d); theta: (P,); ts: (N+1,) strictly monotone; dW: (N, B, d) Brownian increments over ts.
    scheme: "euler" | "milstein" (Ito) | "heun" (Stratonovich). dg(t, x, theta) -> (B, d), dg_i/dx_i,
    lets Milstein use the dual path. save="path": xs (N+1, B, d), J (N+1, B, d, P) (a view of a
    (N+1, P, B, d) buffer); save="end": X (B, d), J (B, d, P). J0: (B, d, P) initial sensitivity.
    """
    _check(x0, theta, ts, dW, scheme, save)
    if scheme == "milstein" and dg is None:
        return forward_vmap(f, g, x0, theta, ts, dW, scheme, save, J0)
    B, d = x0.shape
    P, N = theta.shape[0], ts.shape[0] - 1
    dtype, device = x0.dtype, x0.device
    if J0 is not None and J0.shape != (B, d, P):
        raise ValueError(f"J0 must be (B, d, P) = ({B}, {d}, {P}), got {tuple(J0.shape)}")
    # Work in ping-pong buffers that are not views: a dual made from a view of a big path buffer gets a
    # zero tangent for the whole base (a fill per step, quadratic in N); the path slots are copied into.
    xb = [torch.empty_like(x0), torch.empty_like(x0)]
    Jb = [x0.new_empty(P, B, d), x0.new_empty(P, B, d)]
    x, J = xb[0], Jb[0]
    x.copy_(x0)
    if J0 is None:
        J.zero_()
    else:
        J.copy_(J0.movedim(-1, 0))
    if save == "path":
        xs = torch.empty((N + 1, B, d), dtype=dtype, device=device)
        Js = torch.empty((N + 1, P, B, d), dtype=dtype, device=device)
        xs[0], Js[0] = x, J
    t_list, h_list = ts.unbind(0), (ts[1:] - ts[:-1]).tolist()
    eye = torch.eye(P, dtype=theta.dtype, device=theta.device)
    with torch.no_grad(), fwAD.dual_level():
        theta_d = [fwAD.make_dual(theta.detach(), eye[k]) for k in range(P)]
        for n in range(N):
            t, t1, h, dw = t_list[n], t_list[n + 1], h_list[n], dW[n]
            xn, Jn = xb[(n + 1) % 2], Jb[(n + 1) % 2]
            for k in range(P):
                # the last direction also writes the primal update (its dual carries the primal values)
                _dual_step(scheme, f, g, dg, t, t1, h, fwAD.make_dual(x, J[k]), theta_d[k], dw, J[k], Jn[k],
                           x if k == P - 1 else None, xn)
            if P == 0:
                xn.copy_(_primal_step(scheme, f, g, dg, t, t1, h, x, theta, dw))
            x, J = xn, Jn
            if save == "path":
                xs[n + 1].copy_(x)
                Js[n + 1].copy_(J)
    if save == "end":
        return x, J.movedim(0, -1)
    return xs, Js.movedim(1, -1)


def _dual_step(scheme, f, g, dg, t, t1, h, xd, thd, dw, J_k, J_out, x, x_out):
    """Write direction k's tangent update into J_out; if x is given, also the primal step into x_out."""
    if scheme == "heun":
        # predictor x~ = x + f0 h + g0 dW (dual), corrector x + (f0 + f1) h/2 + (g0 + g1) dW/2
        f0, g0 = f(t, xd, thd), g(t, xd, thd)
        x_pred = xd + f0 * h + g0 * dw
        fs, gs = fwAD.unpack_dual(f0 + f(t1, x_pred, thd)), fwAD.unpack_dual(g0 + g(t1, x_pred, thd))
        _axpy(J_out, J_k, fs.tangent, 0.5 * h)
        if gs.tangent is not None:
            J_out.addcmul_(gs.tangent, dw, value=0.5)
        if x is not None:
            torch.add(x, fs.primal, alpha=0.5 * h, out=x_out).addcmul_(gs.primal, dw, value=0.5)
        return
    gd = g(t, xd, thd)
    fo, go = fwAD.unpack_dual(f(t, xd, thd)), fwAD.unpack_dual(gd)
    _axpy(J_out, J_k, fo.tangent, h)
    if go.tangent is not None:
        J_out.addcmul_(go.tangent, dw)
    if x is not None:
        torch.add(x, fo.primal, alpha=h, out=x_out).addcmul_(go.primal, dw)
    if scheme == "milstein":
        # + 1/2 g g' (dW^2 - |h|), differentiated through g and g' = dg
        co = fwAD.unpack_dual(0.5 * gd * dg(t, xd, thd) * (dw * dw - abs(h)))
        if co.tangent is not None:
            J_out.add_(co.tangent)
        if x is not None:
            x_out.add_(co.primal)


def _axpy(out: Tensor, J: Tensor, tangent: Tensor | None, h: float) -> None:
    """out = J + h tangent; a field that does not depend on (x, theta) has no tangent (zero derivative)."""
    if tangent is None:
        out.copy_(J)
    else:
        torch.add(J, tangent, alpha=h, out=out)


def _primal_step(scheme, f, g, dg, t, t1, h, x, theta, dw):
    """One step without tangents (P = 0)."""
    return _step_maps()[scheme](f, g, t, torch.as_tensor(h, dtype=x.dtype), x, theta, dw) if scheme != "milstein" else (
        x + f(t, x, theta) * h + g(t, x, theta) * dw + 0.5 * g(t, x, theta) * dg(t, x, theta) * (dw * dw - abs(h)))


def forward_vmap(f: Field, g: Field, x0: Tensor, theta: Tensor, ts: Tensor, dW: Tensor, scheme: str = "euler",
                 save: str = "path", J0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The generic path: per step, one functorch jvp of the whole step map, vmapped over the P directions.

    Works for any scheme and any f, g that functorch can transform (Milstein takes its g g' by an inner
    jvp); slower per step than `forward` because of the transforms' Python overhead.
    """
    _check(x0, theta, ts, dW, scheme, save)
    B, d = x0.shape
    P, N = theta.shape[0], ts.shape[0] - 1
    Jt = x0.new_zeros(P, B, d) if J0 is None else J0.to(x0).movedim(-1, 0).clone()
    eye = torch.eye(P, dtype=theta.dtype, device=theta.device)
    step = _step_maps()[scheme]
    h = ts[1:] - ts[:-1]

    def tangent_step(t, hn, x, dw, jx, jt):
        return torch.func.jvp(lambda y, th: step(f, g, t, hn, y, th, dw), (x, theta), (jx, jt))

    batched = torch.func.vmap(tangent_step, in_dims=(None, None, None, None, 0, 0), out_dims=(None, 0))
    if save == "path":
        xs = torch.empty((N + 1, B, d), dtype=x0.dtype, device=x0.device)
        Js = torch.empty((N + 1, P, B, d), dtype=x0.dtype, device=x0.device)
        xs[0], Js[0] = x0, Jt
    x = x0
    with torch.no_grad():
        for n in range(N):
            x, Jt = batched(ts[n], h[n], x, dW[n], Jt, eye)
            if save == "path":
                xs[n + 1], Js[n + 1] = x, Jt
    if save == "end":
        return x, Jt.movedim(0, -1)
    return xs, Js.movedim(1, -1)


def _step_maps() -> dict[str, Callable]:
    """Out-of-place step maps (x, theta) -> x' that functorch can differentiate."""
    def euler(f, g, t, h, x, th, dw):
        return x + f(t, x, th) * h + g(t, x, th) * dw

    def milstein(f, g, t, h, x, th, dw):
        gx = g(t, x, th)
        _, gdg = torch.func.jvp(lambda y: g(t, y, th), (x,), (gx,))
        return x + f(t, x, th) * h + gx * dw + 0.5 * gdg * (dw * dw - h.abs())

    def heun(f, g, t, h, x, th, dw):
        f0, g0 = f(t, x, th), g(t, x, th)
        xp = x + f0 * h + g0 * dw
        return x + 0.5 * (f0 + f(t + h, xp, th)) * h + 0.5 * (g0 + g(t + h, xp, th)) * dw

    return {"euler": euler, "milstein": milstein, "heun": heun}

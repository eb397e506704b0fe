"""Trace a step function once into a plain aten graph, so that the per-step loop runs without
forward-AD or vmap machinery.

Why: in eager PyTorch every op that mixes a dual tensor with a plain one (x * 0.5, theta[0] * x
when only x carries a tangent) creates an "efficient zero tensor" tangent, and ops on those fall back
to shape computations on the meta device: about 100x the cost of the op itself on small tensors.
Tracing the vmapped JVP with make_fx records the same arithmetic as ordinary aten ops; the passes
below then swap zero tensors for real zeros and drop the dead shape checks, aliases and copies the
trace carries along. The traced step is checked against the eager one on a second set of inputs
before it is trusted: a step whose Python control flow depends on tensor values would be frozen by
tracing, and then the eager function is used instead (with a warning). Finally the graph is turned
into straight-line Python that calls each op's C++ entry point directly (FX's own generated code goes
through the slower Python OpOverload wrappers).
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["trace_step", "cached_trace"]

_CACHE: "OrderedDict[tuple, Callable]" = OrderedDict()
_CACHE_SIZE = 32

_aten = torch.ops.aten


def _simplify(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == _aten._efficientzerotensor.default:
            node.target = _aten.zeros.default
        elif node.target == _aten.alias.default:
            node.replace_all_uses_with(node.args[0])
        elif node.target == _aten._to_copy.default:
            src, out = node.args[0], node.meta.get("val")
            src_val = src.meta.get("val") if isinstance(src, torch.fx.Node) else None
            if (isinstance(src_val, Tensor) and isinstance(out, Tensor) and src_val.dtype == out.dtype
                    and src_val.device == out.device and src_val.layout == out.layout and out.device.type != "meta"):
                node.replace_all_uses_with(src)        # a materialising copy that changes nothing
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _to_python(gm: torch.fx.GraphModule) -> Callable:
    """Straight-line Python for the graph: one call per op node, ops bound to their C++ callables."""
    names: dict[torch.fx.Node, str] = {}
    ns: dict[str, object] = {}
    params, lines = [], []

    def render(a):
        if isinstance(a, torch.fx.Node):
            return names[a]
        if isinstance(a, (list, tuple)):
            inner = ", ".join(render(v) for v in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
        if a is None or isinstance(a, (bool, int, float, str)):
            return repr(a) if not (isinstance(a, float) and a != a or a in (float("inf"), float("-inf"))) else _const(a)
        return _const(a)

    def _const(a):
        key = f"c{len(ns)}"
        ns[key] = a
        return key

    for i, node in enumerate(gm.graph.nodes):
        if node.op == "get_attr":                  # tensors the step closes over, kept by reference
            names[node] = _const(getattr(gm, node.target))
        elif node.op == "placeholder":
            names[node] = f"a{i}"
            params.append(names[node])
        elif node.op == "call_function":
            fn = node.target._op if isinstance(node.target, torch._ops.OpOverload) else node.target
            key = _const(fn)
            args = [render(a) for a in node.args] + [f"{k}={render(v)}" for k, v in node.kwargs.items()]
            names[node] = f"v{i}"
            lines.append(f"    v{i} = {key}({', '.join(args)})")
        elif node.op == "output":
            lines.append(f"    return {render(node.args[0])}")
        else:
            raise NotImplementedError(f"graph node of kind {node.op!r}")
    src = f"def step({', '.join(params)}):\n" + "\n".join(lines) + "\n"
    exec(compile(src, "<sdekit.sensitivity traced step>", "exec"), ns)
    return ns["step"]


def _allclose(a, b) -> bool:
    a, b = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    return len(a) == len(b) and all(x.shape == y.shape and torch.allclose(x, y, rtol=1e-9, atol=1e-12, equal_nan=True)
                                    for x, y in zip(a, b))


def trace_step(fn: Callable, example: Sequence[Tensor], check: Sequence[Tensor]) -> Callable:
    """fn traced on `example` and simplified, if it reproduces fn on `check`; else fn itself."""
    example = [e.detach() for e in example]
    check = [c.detach() for c in check]
    try:
        gm = _to_python(_simplify(torch.fx.experimental.proxy_tensor.make_fx(fn)(*example)))
        if _allclose(gm(*check), fn(*check)):
            return gm
        reason = "the traced step disagrees with the eager one (value-dependent control flow?)"
    except Exception as err:  # tracing is an optimisation; any failure means "run eagerly"
        reason = f"{type(err).__name__}: {err}"
    warnings.warn(f"sensitivity: running the step eagerly (slower) because it could not be traced: {reason}",
                  RuntimeWarning, stacklevel=3)
    return fn


def cached_trace(key: tuple, make_fn: Callable[[], Callable], example: Sequence[Tensor], check: Sequence[Tensor]) -> Callable:
    """`trace_step(make_fn(), example, check)`, remembered under key (which must pin f, g, scheme, shapes, dtype).

    A repeated solve of the same problem then pays for tracing once; f and g are held by the cache
    (at most 32 entries), so they should be pure functions of (t, x, theta).
    """
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    fn = trace_step(make_fn(), example, check)
    _CACHE[key] = fn
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return fn

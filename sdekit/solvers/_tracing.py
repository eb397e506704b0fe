"""Trace a step function once into straight-line aten code, so that a loop of N steps runs without
autograd, forward-AD or vmap machinery and without the Python of f and g.

Why: in eager PyTorch every op that mixes a dual tensor with a plain one (x * 0.5, theta[0] * x
when only x carries a tangent) creates an "efficient zero tensor" tangent, and ops on those fall back
to shape computations on the meta device: about 100x the cost of the op itself on small tensors.
Tracing with make_fx records the same arithmetic as ordinary aten ops. The passes below then
  - compute each distinct subexpression once (common-subexpression elimination), as f, g and dg
    often share work;
  - swap zero tensors for real zeros and drop dead shape checks, aliases, no-op copies and expands;
  - fuse a product into the sum that consumes it (add(a, mul(b, c)) -> addcmul, add(mm, bias) -> addmm),
    since on small tensors a step's cost is the number of ops it launches;
  - fold a loop-invariant scalar factor into the addcmul that consumes its product (addcmul(a, theta_k x, y) ->
    addcmul(a, x, y, value=theta_k), bitwise the same), since on large tensors a step's cost is its passes over x;
  - hoist the ops that depend only on loop-invariant inputs (theta, the tangent directions), which
    `bind` runs once per solve instead of once per step.
The traced step is checked against the eager one on a second set of inputs before it is trusted: a
step whose Python control flow depends on tensor values would be frozen by tracing, and then the
eager function is used instead (with a warning).

A trace also freezes the Python values the fields read from outside their arguments (a closure's `k`,
a global, an attribute). Two guards keep a cached trace from answering for a function that has since
changed: the cache key holds a fingerprint of those values (`field_state`: closure cells, defaults,
referenced globals and object attributes, scalars by value, tensors by identity; tensors updated in place
are fine, the traced code holds them by reference), and every solve compares the cached step with the
eager one at the solve's own inputs before using it, tracing afresh on any disagreement. The graph is emitted as Python that calls each op's
C++ entry point directly (FX's own generated code goes through the slower Python OpOverload wrappers).
"""
from __future__ import annotations

import functools
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["trace_step", "cached_trace", "field_state", "double_buffered"]

_CACHE: OrderedDict[tuple, Callable] = OrderedDict()
_CACHE_SIZE = 32

_aten = torch.ops.aten


def _val(a):
    return a.meta.get("val") if isinstance(a, torch.fx.Node) else None


def _same_meta(*vals) -> bool:
    """All tensors of one dtype and device (so a fused op promotes and places its result alike)."""
    ts = [v for v in vals if isinstance(v, Tensor)]
    return len(ts) == len(vals) and len({(t.dtype, t.device) for t in ts}) == 1


def _inner_extent(out: Tensor, *operands) -> int:
    """Elements per innermost loop of an elementwise op writing `out` from `operands` (broadcast to out's shape):
    the extent of out's innermost dims over which every operand's elements are evenly spaced."""
    shape = out.shape
    dims = sorted((d for d in range(out.ndim) if shape[d] > 1), key=out.stride)
    if not dims:
        return 1
    strides = [out.stride()] + [v.expand(shape).stride() for v in operands if isinstance(v, Tensor)]
    extent = shape[dims[0]]
    for a, b in zip(dims, dims[1:]):
        if not all(st[b] == st[a] * shape[a] for st in strides):
            break
        extent *= shape[b]
    return extent


def _fusion_pays(out, *operands) -> bool:
    """A fused op runs one loop where two ran; that pays unless its inner loop is short on a large tensor (an operand
    broadcast along a small innermost axis, e.g. (B, d) by (B, 1) stored batch-first), where torch's three-operand
    kernels cost more than a broadcast mul and an add together (measured 1.35x at B = 1e4, d = 4)."""
    if not isinstance(out, Tensor) or not all(isinstance(v, Tensor) for v in operands):
        return True
    try:
        return out.numel() <= 4096 or _inner_extent(out, *operands) >= 16
    except RuntimeError:             # an operand that does not broadcast to out: leave it to the op's own checks
        return True


def _fuse(graph: torch.fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != _aten.add.Tensor or node.kwargs:
            continue
        a, b = node.args
        for acc, prod in ((a, b), (b, a)):
            # add(p, p) (one product on both sides, e.g. after CSE) keeps p alive inside the fused op: leave it
            if not (isinstance(prod, torch.fx.Node) and isinstance(acc, torch.fx.Node) and len(prod.users) == 1
                    and acc is not prod):
                continue
            if prod.target == _aten.mul.Tensor and not prod.kwargs:
                x, y = prod.args
                if (isinstance(y, torch.fx.Node) and isinstance(x, torch.fx.Node) and _same_meta(_val(acc), _val(x), _val(y), _val(node))
                        and _fusion_pays(_val(node), _val(acc), _val(x), _val(y))):
                    new = (_aten.addcmul.default, (acc, x, y))
                elif (isinstance(x, torch.fx.Node) and isinstance(y, (int, float)) and _same_meta(_val(acc), _val(x), _val(node))
                      and _fusion_pays(_val(node), _val(acc), _val(x))):
                    new = (_aten.add.Tensor, (acc, x), {"alpha": y})
                else:
                    continue
            elif (prod.target == _aten.mm.default and _val(acc) is not None and _val(acc).ndim == 1
                  and _same_meta(_val(acc), _val(prod), _val(node)) and _val(node).shape == _val(prod).shape):
                new = (_aten.addmm.default, (acc, *prod.args))
            else:
                continue
            with graph.inserting_before(node):
                fused = graph.call_function(new[0], new[1], new[2] if len(new) > 2 else {})
            fused.meta = dict(node.meta)
            node.replace_all_uses_with(fused)
            graph.erase_node(node)
            graph.erase_node(prod)
            break


def _item(t: Tensor) -> float:
    return t.item()


def _invariant_nodes(graph: torch.fx.Graph, invariant: Sequence[int]) -> set:
    """The nodes `_to_python` hoists into bind: invariant inputs, constants, and unseeded ops of those only."""
    out, k = set(), 0
    for node in graph.nodes:
        if node.op == "placeholder":
            if k in invariant:
                out.add(node)
            k += 1
        elif node.op == "get_attr":
            out.add(node)
        elif (node.op == "call_function" and not _seeded(node) and all(a in out for a in node.all_input_nodes)):
            out.add(node)
    return out


def _seeded(node: torch.fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags


def _fold_scalars(graph: torch.fx.Graph, invariant: Sequence[int]) -> None:
    """addcmul(acc, mul(s, x), y) -> addcmul(acc, x, y, value=s) for a loop-invariant scalar s (a 0-d tensor of theta,
    read once per solve in bind, or a float): one pass over x per product instead of two.

    Exact, not just close: the kernel forms value * t1 * t2 left to right, i.e. (s x) y, the product the separate
    mul rounded (checked bitwise in tests/test_trace_guards.py). Only for float32/float64, where the kernel computes
    in the tensors' own dtype, and not in graphs that write tensors in place.
    """
    if any(isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
           and n.target.overloadpacket not in _METADATA_INPLACE for n in graph.nodes):
        return
    inv = _invariant_nodes(graph, invariant)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != _aten.addcmul.default or len(node.args) != 3 or node.kwargs:
            continue
        acc, t1, t2 = node.args
        for prod, other in ((t1, t2), (t2, t1)):
            if not (isinstance(prod, torch.fx.Node) and prod.op == "call_function" and prod.target == _aten.mul.Tensor
                    and not prod.kwargs and len(prod.users) == 1 and prod is not other and prod not in inv):
                continue
            pv = _val(prod)
            if not (isinstance(pv, Tensor) and pv.dtype in (torch.float32, torch.float64)
                    and _same_meta(pv, _val(acc), _val(other), _val(node))):
                continue
            folded = None
            for s, v in (prod.args, prod.args[::-1]):
                if not (isinstance(v, torch.fx.Node) and isinstance(_val(v), Tensor) and _val(v).shape == pv.shape
                        and _same_meta(_val(v), pv)):
                    continue
                if isinstance(s, float):
                    folded = (v, s)
                elif (isinstance(s, torch.fx.Node) and s in inv and isinstance(_val(s), Tensor) and _val(s).ndim == 0
                      and _same_meta(_val(s), pv)):
                    with graph.inserting_before(node):
                        scalar = graph.call_function(_item, (s,))
                    inv.add(scalar)
                    folded = (v, scalar)
                if folded:
                    break
            if not folded:
                continue
            with graph.inserting_before(node):
                new = graph.call_function(_aten.addcmul.default, (acc, folded[0], other), {"value": folded[1]})
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            graph.erase_node(prod)
            break


# In-place ops that change only a tensor's shape metadata (matmul's decomposition of a 1-D operand emits squeeze_).
_METADATA_INPLACE = {_aten.squeeze_, _aten.unsqueeze_, _aten.t_, _aten.transpose_}


def _cse(graph: torch.fx.Graph) -> None:
    """One node per distinct computation (f, g and dg often share subexpressions, e.g. g and its derivative).

    Two call nodes merge when they apply the same op to the same inputs. Skipped for graphs with in-place
    ops that write data (equal-looking nodes may then see different values); a tensor whose shape an
    in-place view op changes is never merged. Random ops never merge.
    """
    mutable = [n for n in graph.nodes if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable]
    if any(n.target.overloadpacket not in _METADATA_INPLACE for n in mutable):
        return
    reshaped = {n.args[0] for n in mutable}
    seen: dict[tuple, torch.fx.Node] = {}
    for node in list(graph.nodes):
        if node.op == "get_attr":
            key = ("get_attr", node.target)
        elif (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node not in reshaped
              and not node.target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in node.target.tags):
            try:
                key = (node.target, _hashable(node.args), _hashable(node.kwargs))
                hash(key)
            except TypeError:
                continue
        else:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
        else:
            seen[key] = node


def _hashable(a):
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, *map(_hashable, a))
    if isinstance(a, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in a.items()))
    if isinstance(a, float) and a != a:
        return ("nan",)                       # nan != nan would defeat the lookup; it is still the same constant
    return (type(a).__name__, a)              # type kept: 1 and 1.0 and True are different arguments


def _simplify(gm: torch.fx.GraphModule, invariant: Sequence[int] = ()) -> torch.fx.GraphModule:
    graph = gm.graph
    _cse(graph)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        src_val, out = (_val(node.args[0]) if node.args else None), node.meta.get("val")
        if node.target == _aten._efficientzerotensor.default:
            node.target = _aten.zeros.default
        elif node.target == _aten.alias.default:
            node.replace_all_uses_with(node.args[0])
        elif node.target in (_aten.expand.default, _aten.view.default, _aten._to_copy.default):
            # an expand or view to the shape it already has, or a copy that changes nothing
            if (isinstance(src_val, Tensor) and isinstance(out, Tensor) and src_val.shape == out.shape
                    and src_val.dtype == out.dtype and src_val.device == out.device and src_val.layout == out.layout
                    and out.device.type != "meta"):
                node.replace_all_uses_with(node.args[0])
    graph.eliminate_dead_code()
    _fuse(graph)
    graph.eliminate_dead_code()
    _fold_scalars(graph, invariant)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _to_python(gm: torch.fx.GraphModule, invariant: Sequence[int]) -> Callable:
    """`bind(*invariant inputs) -> step(*other inputs)`: straight-line code, one call per op node,
    ops bound to their C++ callables; ops that depend on invariant inputs and constants only run in bind."""
    names: dict[torch.fx.Node, str] = {}
    ns: dict[str, object] = {}
    hoisted: set[torch.fx.Node] = set()
    bind_params, step_params, bind_lines, step_lines = [], [], [], []

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

    output = next(n for n in gm.graph.nodes if n.op == "output")
    results = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    slots: dict[torch.fx.Node, int] = {}          # results an op may write into a given tensor, by result index
    for j, r in enumerate(results):
        if isinstance(r, torch.fx.Node) and r not in slots and _out_overload(r) is not None:
            slots[r] = j
    into_lines = []
    k = 0
    for i, node in enumerate(gm.graph.nodes):
        if node.op == "get_attr":                  # tensors the step closes over, kept by reference
            names[node] = _const(getattr(gm, node.target))
            hoisted.add(node)
        elif node.op == "placeholder":
            names[node] = f"a{i}"
            (bind_params if k in invariant else step_params).append(names[node])
            if k in invariant:
                hoisted.add(node)
            k += 1
        elif node.op == "call_function":
            fn = node.target._op if isinstance(node.target, torch._ops.OpOverload) else node.target
            key = _const(fn)
            args = [render(a) for a in node.args] + [f"{k_}={render(v)}" for k_, v in node.kwargs.items()]
            names[node] = f"v{i}"
            inv = not _seeded(node) and all(a in hoisted for a in node.all_input_nodes)
            (bind_lines if inv else step_lines).append(f"{'    ' if inv else '        '}v{i} = {key}({', '.join(args)})")
            if inv:
                hoisted.add(node)
                slots.pop(node, None)
            elif node in slots:
                into_lines.append(f"        v{i} = {_const(_out_overload(node)._op)}({', '.join(args)}, out=_o[{slots[node]}])")
            else:
                into_lines.append(step_lines[-1])
        elif node.op == "output":
            step_lines.append(f"        return {render(node.args[0])}")
            into_lines.append(step_lines[-1])
        else:
            raise NotImplementedError(f"graph node of kind {node.op!r}")
    src = (f"def bind({', '.join(bind_params)}):\n" + "".join(l + "\n" for l in bind_lines)
           + f"    def step({', '.join(step_params)}):\n" + "\n".join(step_lines) + "\n")
    if slots:
        src += (f"    def step_into({', '.join([*step_params, '_o'])}):\n" + "\n".join(into_lines) + "\n"
                + f"    step_into.slots = {tuple(sorted(slots.values()))!r}\n    step.into = step_into\n")
    src += "    return step\n"
    exec(compile(src, "<sdekit traced step>", "exec"), ns)
    return ns["bind"]


def _out_overload(node: torch.fx.Node):
    """The `.out` overload through which node's op can write its result into a given tensor (None if it cannot:
    not an aten op, a view, in-place, several results, or an argument the overload wants as a tensor is not one)."""
    t = node.target
    if (not isinstance(t, torch._ops.OpOverload) or t._schema.is_mutable or len(t._schema.returns) != 1
            or t._schema.returns[0].alias_info is not None or not isinstance(_val(node), Tensor) or _seeded(node)):
        return None
    out = getattr(t.overloadpacket, "out", None)
    if out is None or [a.name for a in out._schema.arguments if a.kwarg_only and a.name != "out"] != [
            a.name for a in t._schema.arguments if a.kwarg_only]:
        return None
    for a, v in zip(out._schema.arguments, node.args):
        if isinstance(a.type, torch._C.TensorType) and not (isinstance(v, torch.fx.Node) and isinstance(_val(v), Tensor)):
            return None
    return out


def _into_agrees(step: Callable, rest: Sequence[Tensor], got) -> bool:
    """step.into (if any) writes into the buffers it is given exactly what step returns (bitwise)."""
    into = getattr(step, "into", None)
    if into is None:
        return True
    outs = got if isinstance(got, tuple) else (got,)
    bufs = [torch.empty_like(o) if j in into.slots else None for j, o in enumerate(outs)]
    try:
        res = into(*rest, bufs)
    except Exception:  # noqa: BLE001 - an op whose .out overload does not take these arguments: no buffers
        return False
    res = res if isinstance(res, tuple) else (res,)
    return (len(res) == len(outs) and all(torch.equal(a, b) for a, b in zip(res, outs))
            and all(res[j].data_ptr() == bufs[j].data_ptr() for j in into.slots))


def _without_into(bind: Callable) -> Callable:
    def bind_plain(*inv):
        step = bind(*inv)
        step.into = None
        return step
    return bind_plain


def double_buffered(step: Callable) -> Callable:
    """step(*args), writing its results into two sets of buffers in turn, for a loop feeding each step's results to
    the next: a result of step n lives until step n + 2 overwrites it (copy it to keep it longer).

    Why: a fresh CPU tensor of a few hundred kB is mapped and zeroed by the kernel at each allocation; on GBM with 1e5
    paths two such allocations per step cost 0.15x the time of drawing the increments. The buffers are the first two
    steps' own results; steps traced without `into` (or eager) are returned as they are."""
    into = getattr(step, "into", None)
    if into is None:
        return step
    sets: list = []

    def run(*args):
        if len(sets) == 2:
            bufs = sets[0]
            sets.reverse()
            return into(*args, bufs)
        out = step(*args)
        outs = out if isinstance(out, tuple) else (out,)
        sets.append([o if j in into.slots else None for j, o in enumerate(outs)])   # the older set is written next
        return out
    return run


def _eager_bind(fn: Callable, invariant: Sequence[int], n_args: int) -> Callable:
    """The bind/step interface around the untraced fn."""
    def bind(*inv):
        def step(*rest):
            it_inv, it_rest = iter(inv), iter(rest)
            return fn(*(next(it_inv) if i in invariant else next(it_rest) for i in range(n_args)))
        return step
    return bind


def _allclose(a, b) -> bool:
    """Equal to round-off: fused ops (addcmul, addmm) round differently, by a few ulps of the dtype.

    A step returning several tensors (a scheme's state, e.g. (x, z, f(z), g(z))) is compared on the scale of the
    largest: an entry that is a near-cancellation (a Stratonovich drift that is ~0) differs in relative terms by far
    more than an ulp, but only by an ulp of the terms that produced it.
    """
    a, b = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    floor = max((float(y.abs().max()) for y in b if isinstance(y, Tensor) and y.is_floating_point() and y.numel()),
                default=0.0) if len(b) > 1 else 0.0

    def close(x, y):
        if not y.numel():
            return True
        eps = torch.finfo(x.dtype).eps if x.is_floating_point() else 0.0
        y_abs = y.abs()
        rtol, atol = 1e4 * eps, 1e4 * eps * max(float(y_abs.max()), floor)
        # |x - y| <= atol + rtol |y| in four ops (allclose's own check takes twice as many: this runs every solve);
        # torch.allclose decides where that fails, as it also takes NaN == NaN and inf == inf
        if x.is_floating_point() and x.dtype == y.dtype and bool((x - y).abs_().le(y_abs.mul_(rtol).add_(atol)).all()):
            return True
        return torch.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True)
    return len(a) == len(b) and all(x.shape == y.shape and close(x, y) for x, y in zip(a, b))


def trace_step(fn: Callable, example: Sequence[Tensor], check: Sequence[Tensor], invariant: Sequence[int] = ()) -> Callable:
    """fn traced on `example`, simplified, as `bind(*example[i] for i in invariant) -> step(*the others)`,
    if it reproduces fn on `check`; else the same interface around fn itself (eager, with a warning)."""
    example = [e.detach() for e in example]
    check = [c.detach() for c in check]
    split = lambda args: ([a for i, a in enumerate(args) if i in invariant], [a for i, a in enumerate(args) if i not in invariant])
    try:
        with torch.no_grad():
            bind = _to_python(_simplify(torch.fx.experimental.proxy_tensor.make_fx(fn)(*example), invariant), invariant)
            inv, rest = split(check)
            step = bind(*inv)
            got = step(*rest)
            if _allclose(got, fn(*check)):
                return bind if _into_agrees(step, rest, got) else _without_into(bind)
        reason = "the traced step disagrees with the eager one (value-dependent control flow?)"
    except Exception as err:  # tracing is an optimisation; any failure means "run eagerly"
        reason = f"{type(err).__name__}: {err}"
    warnings.warn(f"sdekit: running the step eagerly (slower) because it could not be traced: {reason}",
                  RuntimeWarning, stacklevel=3)
    return _eager_bind(fn, invariant, len(example))


class _Ref:
    """An object by identity in a cache key; holding it keeps its id from being reused while the key lives."""
    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self):
        return id(self.obj)

    def __eq__(self, other):
        return isinstance(other, _Ref) and other.obj is self.obj


_ATOMS = (int, float, complex, bool, str, bytes, type(None))
_MAX_ITEMS = 64          # longer containers are fingerprinted by identity (the per-solve check still covers them)


def field_state(*fns: Callable | None, depth: int = 6) -> tuple[tuple, bool]:
    """(fingerprint, reads_grad) of what the callables can read besides their arguments.

    The fingerprint changes when a value a trace would have frozen changes: closure cells, defaults,
    globals the code names, bound `self` and callable objects' attributes, followed `depth` levels deep;
    scalars by value, tensors by identity, shape, dtype and device, other objects by identity (held, so an id is never reused).
    reads_grad: some tensor reached requires grad (the fields then need the eager, taped path).
    """
    seen: set[int] = set()
    grads: list[bool] = []

    def fp(obj, level):
        if isinstance(obj, _ATOMS):
            return ("nan",) if isinstance(obj, float) and obj != obj else obj
        if isinstance(obj, Tensor):
            grads.append(obj.requires_grad)
            return ("tensor", _Ref(obj), tuple(obj.shape), obj.dtype, obj.device)
        if isinstance(obj, (types.ModuleType, type, types.BuiltinFunctionType)) or level == 0 or id(obj) in seen:
            return ("id", _Ref(obj))
        seen.add(id(obj))
        if isinstance(obj, (list, tuple, set, frozenset)):
            items = list(obj) if not isinstance(obj, (set, frozenset)) else sorted(obj, key=repr)
            return ("id", _Ref(obj), len(obj)) if len(items) > _MAX_ITEMS else (type(obj).__name__, *(fp(v, level - 1) for v in items))
        if isinstance(obj, dict):
            if len(obj) > _MAX_ITEMS:
                return ("id", _Ref(obj), len(obj))
            return ("dict", *((fp(k, level - 1), fp(v, level - 1)) for k, v in obj.items()))
        if isinstance(obj, types.MethodType):
            return ("method", fp(obj.__func__, level - 1), fp(obj.__self__, level - 1))
        if isinstance(obj, types.FunctionType):
            code = obj.__code__
            names = set()
            stack = [code]
            while stack:                               # names read by the function and the functions it defines
                c = stack.pop()
                names.update(c.co_names)
                stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
            cells = tuple(fp(c.cell_contents, level - 1) if _has_contents(c) else ("empty",) for c in obj.__closure__ or ())
            globs = tuple((n, fp(obj.__globals__[n], level - 1)) for n in sorted(names) if n in obj.__globals__)
            return ("function", code, fp(obj.__defaults__, level - 1), fp(obj.__kwdefaults__, level - 1), cells, globs)
        if isinstance(obj, functools.partial):
            return ("partial", fp(obj.func, level - 1), fp(obj.args, level - 1), fp(obj.keywords, level - 1))
        state = getattr(obj, "__dict__", None)
        return ("object", type(obj), fp(state, level - 1) if isinstance(state, dict) else ("id", _Ref(obj)))

    key = tuple(fp(fn, depth) for fn in fns)
    return key, any(grads)


def _has_contents(cell) -> bool:
    try:
        _ = cell.cell_contents
    except ValueError:                                 # a cell not yet assigned
        return False
    return True


def _agrees(bind: Callable, reference: Callable, points: Sequence[Sequence[Tensor]], invariant: Sequence[int]) -> bool:
    """The traced step equals `reference` (the eager step, or the part of it given) at every point."""
    with torch.no_grad():
        for args in points:
            inv = [a for i, a in enumerate(args) if i in invariant]
            rest = [a for i, a in enumerate(args) if i not in invariant]
            got, want = bind(*inv)(*rest), reference(*args)
            if isinstance(got, tuple) and not isinstance(want, tuple):
                got = got[0]
            if not _allclose(got, want):
                return False
    return True


def cached_trace(key: tuple, make_fn: Callable[[], Callable], example: Sequence[Tensor], check: Sequence[Tensor],
                 invariant: Sequence[int] = (), reference: Callable | None = None) -> Callable:
    """`trace_step(make_fn(), example, check, invariant)`, remembered under key.

    key must pin what the trace specialises on: scheme, shapes, dtype, device and `field_state` of the
    fields. A repeated solve of the same problem then pays for tracing once. On a cache hit the stored
    step is first compared with `reference` (default: make_fn() itself; it may return only the first
    output, e.g. the primal of a tangent step) at `check`, this solve's second grid time and a perturbed
    x0 (a generic point: t = ts[0] is often 0, where a term like k t x vanishes whatever k is); a
    disagreement (the fields changed in a way the key cannot see) traces afresh.
    """
    key = (*key, tuple(invariant))
    fn = _CACHE.get(key)
    if fn is not None:
        _CACHE.move_to_end(key)
        if _agrees(fn, reference or make_fn(), (check,), invariant):
            return fn
    fn = trace_step(make_fn(), example, check, invariant)
    _CACHE[key] = fn
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return fn

"""What a score function computes, as a hash: the identity an optimised grid is cached under.

A grid fitted for one model is a worse grid for another (3.6x the error on a second mixture at 8 steps), so a
cache must never hand it to anything else. `fingerprint(score_fn)` hashes what the function reads:
- a GaussianMixture: its means, covariances and weights; an SDE: its configuration;
- an nn.Module: its class, every parameter and buffer (values, dtype, shape) and the plain attributes of every
  submodule (the precond wrapper's prediction type, sigma_data, SDE, ...);
- a Python function (lambda, closure): its code (byte code and constants, nested functions included), its
  defaults, the values its closure cells hold and the module-level names its code reads, each fingerprinted in
  turn; a bound method: the function and the object; functools.partial: the function and its arguments;
- any other callable object: its class's __call__ / forward code and its attributes;
- tensors, numpy arrays, numbers, strings, None, and tuples / lists / dicts of them: their values.
Anything else (a file, a generator, an object without attributes, a C extension's callable) cannot be
fingerprinted for certain: `fingerprint` raises FingerprintError naming the part it could not read, and the
caller gives an explicit key instead (sample(..., grid_key=...)). Modules (torch, math) are taken by name, and so
are functions and classes of other modules that the code names (library code is not walked).
Whatever the function reads is part of the key, so a value that changes between calls (a call counter) makes a
new key each time: the grid is fitted again (never a stale one reused); give grid_key= to keep one.
"""
from __future__ import annotations

import functools
import hashlib
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["fingerprint", "FingerprintError"]


class FingerprintError(TypeError):
    """The score function reads something whose value cannot be hashed for certain."""


_PRIMITIVES = (type(None), bool, int, float, complex, str, bytes)


def fingerprint(score_fn: Callable) -> str:
    """A SHA-256 hex digest of what score_fn computes (module docstring); FingerprintError if a part of it cannot
    be read for certain."""
    h = hashlib.sha256()
    _Walker(h).visit(score_fn, "score_fn")
    return h.hexdigest()


class _Walker:
    def __init__(self, h):
        self.h = h
        self.seen: dict[int, int] = {}          # id -> order of first visit (cycles and shared objects)
        self.alive: list = []                   # keeps every visited object alive, so that no id is reused

    def put(self, *parts) -> None:
        for p in parts:
            self.h.update(p if isinstance(p, bytes) else repr(p).encode())
            self.h.update(b"\x00")

    def visit(self, obj: Any, where: str) -> None:
        if isinstance(obj, _PRIMITIVES):
            self.put("v", type(obj).__name__, obj)
            return
        if isinstance(obj, (torch.dtype, torch.device)):
            self.put("torch", str(obj))
            return
        if isinstance(obj, types.ModuleType):
            self.put("module", obj.__name__)
            return
        if isinstance(obj, type):
            self.put("class", obj.__module__, obj.__qualname__)
            return
        key = id(obj)
        if key in self.seen:
            self.put("ref", self.seen[key])
            return
        self.seen[key] = len(self.seen)
        self.alive.append(obj)
        self._visit_object(obj, where)

    def _visit_object(self, obj: Any, where: str) -> None:
        from ..data import GaussianMixture
        from ..sde import SDE

        if isinstance(obj, Tensor):
            t = obj.detach().to("cpu").contiguous()
            self.put("tensor", str(t.dtype), tuple(t.shape))
            self.h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif _is_ndarray(obj):
            self.put("ndarray", str(obj.dtype), obj.shape, obj.tobytes())
        elif isinstance(obj, (tuple, list, frozenset, set)):
            items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
            self.put(type(obj).__name__, len(items))
            for i, v in enumerate(items):
                self.visit(v, f"{where}[{i}]")
        elif isinstance(obj, dict):
            self.put("dict", len(obj))
            for k, v in obj.items():
                self.visit(k, f"{where} key")
                self.visit(v, f"{where}[{k!r}]")
        elif isinstance(obj, GaussianMixture):
            self.put("GaussianMixture")
            for name in ("means", "covs", "weights"):
                self.visit(getattr(obj, name), f"{where}.{name}")
        elif isinstance(obj, SDE):
            self.put("SDE", type(obj).__qualname__)
            self.visit(obj.config(), f"{where}.config()")
        elif isinstance(obj, torch.nn.Module):
            self._visit_module(obj, where)
        elif isinstance(obj, types.FunctionType):
            self._visit_function(obj, where)
        elif isinstance(obj, types.MethodType):
            self.put("method")
            self.visit(obj.__func__, f"{where}.__func__")
            self.visit(obj.__self__, f"{where}.__self__")
        elif isinstance(obj, functools.partial):
            self.put("partial")
            self.visit(obj.func, f"{where}.func")
            self.visit(obj.args, f"{where}.args")
            self.visit(obj.keywords, f"{where}.keywords")
        elif isinstance(obj, types.CodeType):
            self._visit_code(obj, where)
        elif isinstance(obj, (types.BuiltinFunctionType, types.BuiltinMethodType)) and isinstance(
                getattr(obj, "__self__", None), (types.ModuleType, type(None))):
            self.put("builtin", getattr(obj.__self__, "__name__", None), obj.__qualname__)   # e.g. torch.tanh
        elif hasattr(obj, "__dict__") and _python_class(type(obj)):
            cls = type(obj)
            self.put("object", cls.__module__, cls.__qualname__)
            for name in ("__call__", "forward"):
                fn = getattr(cls, name, None)
                if isinstance(fn, types.FunctionType):
                    self._visit_function(fn, f"{where}.{name}")
            self.visit(dict(vars(obj)), f"{where}.__dict__")
        else:
            raise FingerprintError(
                f"cannot fingerprint {where} (a {type(obj).__module__}.{type(obj).__qualname__}): its value cannot be "
                f"read for certain, so an optimised grid cannot be tied to it; pass grid_key=... naming what the grid "
                f"is fitted for (e.g. the model's checkpoint and settings)")

    def _visit_module(self, m: torch.nn.Module, where: str) -> None:
        for name, sub in m.named_modules():
            cls = type(sub)
            self.put("nn.Module", name, cls.__module__, cls.__qualname__, sub.training)
            fn = getattr(cls, "forward", None)
            if isinstance(fn, types.FunctionType):
                self._visit_code(fn.__code__, f"{where}.{name}.forward")
            for pname, p in list(sub._parameters.items()) + list(sub._buffers.items()):
                self.put(pname)
                self.visit(p, f"{where}.{name}.{pname}")
            for aname, value in vars(sub).items():
                if aname.startswith("_") or isinstance(value, torch.nn.Module) or aname == "training":
                    continue
                self.put(aname)
                self.visit(value, f"{where}.{name}.{aname}" if name else f"{where}.{aname}")

    def _visit_function(self, fn: types.FunctionType, where: str) -> None:
        self.put("function", fn.__module__, fn.__qualname__)
        self._visit_code(fn.__code__, where)
        self.visit(fn.__defaults__, f"{where} defaults")
        self.visit(fn.__kwdefaults__, f"{where} keyword defaults")
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            self.put("cell", name)
            try:
                value = cell.cell_contents
            except ValueError:                      # a cell not yet filled
                value = None
            self.visit(value, f"{where}: closure variable {name!r}")
        # the module-level names the code reads (a global model, a constant); builtins and attributes are skipped
        # (a function or class of another module is taken by its name, like a module: library code is not walked)
        for name in sorted(_global_names(fn.__code__)):
            if name in fn.__globals__:
                value = fn.__globals__[name]
                self.put("global", name)
                if isinstance(value, (types.FunctionType, type)) and value.__module__ != fn.__module__:
                    self.put("named", value.__module__, value.__qualname__)
                else:
                    self.visit(value, f"{where}: global {name!r}")

    def _visit_code(self, code: types.CodeType, where: str) -> None:
        self.put("code", code.co_code, code.co_names, code.co_varnames, code.co_freevars)
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                self._visit_code(c, where)
            else:
                self.visit(c, f"{where} constant")


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _global_names(c)
    return names



_HEAPTYPE = 1 << 9        # Py_TPFLAGS_HEAPTYPE: a class defined by a class statement, not by C code


def _python_class(cls: type) -> bool:
    """Every class of the MRO (but object) is written in Python: an instance's behaviour is its code and __dict__."""
    return all(k is object or k.__flags__ & _HEAPTYPE for k in cls.__mro__)


def _is_ndarray(obj) -> bool:
    return type(obj).__module__ == "numpy" and type(obj).__name__ == "ndarray"

"""Reuse of a function atom's pickle while nothing it was made from has changed.

cloudpickle pickles a function from ``__main__`` by value: its code, name,
defaults, closure cells, the globals its code names, and a few module globals.
Doing so costs ~20–30 µs per call, most of a small atom's client-side time. The
pickle is a pure function of those inputs, so when every one of them is an
immutable value (None, bool, int, float, complex, str, bytes, or a tuple of
these) and each is *the same object* as last time, the bytes cloudpickle would
produce are the bytes it produced last time. Anything else — a mutable default
or global (a list, a dict, another function, a module, a class), a function
attribute, annotations, a function from another module (whose pickling
cloudpickle's ``register_pickle_by_value`` can change) — is pickled afresh on
every call, so an atom always sees the current values of its globals and fresh
mutable defaults.
"""

from __future__ import annotations

import operator
import types
import weakref
from collections.abc import Callable
from typing import Any

_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes)
# The module globals cloudpickle stores with a function ("base globals").
_BASE_GLOBALS = ("__package__", "__name__", "__path__", "__file__")
_MISSING = object()

_cache: weakref.WeakKeyDictionary[types.FunctionType, tuple[list[Any], bytes]] = (
    weakref.WeakKeyDictionary()
)


def _immutable(value: Any, depth: int = 3) -> bool:
    t = type(value)
    if t in _IMMUTABLE:
        return True
    if t is tuple and depth > 0:
        return all(_immutable(v, depth - 1) for v in value)
    return False


def _global_names(code: types.CodeType) -> list[str]:
    """Names the code (and the code nested in it) may look up as globals."""
    names = list(code.co_names)
    for const in code.co_consts:
        if type(const) is types.CodeType:
            names += _global_names(const)
    return names


def _inputs(fn: types.FunctionType) -> list[Any] | None:
    """Everything cloudpickle's pickle of `fn` is made from, its code first, or
    None when `fn` is not a plain ``__main__`` function."""
    if fn.__module__ != "__main__" or fn.__dict__:
        return None
    try:
        # Evaluated on access from Python 3.14 on (PEP 649), and may then raise.
        annotations = fn.__annotations__
    except Exception:
        return None
    if annotations:
        return None
    inputs: list[Any] = [
        fn.__code__,
        fn.__name__,
        fn.__qualname__,
        fn.__doc__,
        fn.__defaults__,
    ]
    for key, value in (fn.__kwdefaults__ or {}).items():
        inputs += [key, value]
    for cell in fn.__closure__ or ():
        try:
            inputs.append(cell.cell_contents)
        except ValueError:  # an empty cell
            inputs.append(_MISSING)
    g = fn.__globals__
    for name in _BASE_GLOBALS:
        inputs.append(g.get(name, _MISSING))
    for name in _global_names(fn.__code__):
        inputs.append(name)
        inputs.append(g.get(name, _MISSING))
    return inputs


def _reusable(inputs: list[Any]) -> bool:
    code = inputs[0]
    return all(v is _MISSING or v is code or _immutable(v) for v in inputs)


def pickled_function(
    fn: Callable[[], Any], oob: list[Any], dumps: Callable[[Any, list[Any]], bytes]
) -> bytes:
    """``dumps(fn, oob)``, or the bytes it returned last time for `fn` if nothing
    that pickle was made from has changed since (see the module's docstring). A
    pickle that put buffers out of band (into `oob`) is not kept: it refers to
    them by position."""
    if type(fn) is not types.FunctionType:
        return dumps(fn, oob)
    inputs = _inputs(fn)
    hit = _cache.get(fn)
    # The same objects as last time were all immutable then, so they still are.
    if hit is not None and inputs is not None:
        old, data = hit
        if len(old) == len(inputs) and all(map(operator.is_, old, inputs)):
            return data
    if inputs is None or not _reusable(inputs):
        _cache.pop(fn, None)
        return dumps(fn, oob)
    before = len(oob)
    data = dumps(fn, oob)
    if len(oob) == before:
        _cache[fn] = (inputs, data)
    return data

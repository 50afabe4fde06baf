"""Checking a method's arguments against its ``__init__`` signature, before anything runs.

Every :class:`~vtprune.methods.Method` subclass gets its ``__init__`` wrapped (see
``Method.__init_subclass__``): unknown argument names are refused with a close-match suggestion, and
each annotated argument must match its annotation (``int`` never accepts ``bool`` or ``2.5``,
``float`` accepts ints but not strings or non-finite values, ``tuple[int, ...]`` checks its items,
``Literal`` lists its choices). Range checks stay in each method's ``__init__``; they raise
:class:`~vtprune.errors.ArgumentError` too.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import math
import numbers
import types
import typing
from collections.abc import Sequence
from typing import Any, Callable, Literal, Union

import numpy

from ..errors import ArgumentError


def validated(init: Callable) -> Callable:
    """A method's ``init`` wrapped so that its arguments are checked first."""
    signature = inspect.signature(init)
    hints = _hints(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        name = getattr(type(self), "name", "") or type(self).__name__
        check_arguments(name, signature, hints, (self,) + args, kwargs)
        init(self, *args, **kwargs)

    return wrapper


def check_arguments(name: str, signature: inspect.Signature, hints: dict, args: tuple, kwargs: dict) -> None:
    params = signature.parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    named = [p for p in params if p != "self" and params[p].kind not in (params[p].VAR_POSITIONAL,
                                                                          params[p].VAR_KEYWORD)]
    if not takes_any:
        for key in kwargs:
            if key not in params:
                close = difflib.get_close_matches(key, named, n=1, cutoff=0.6)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ArgumentError(f"{name} takes no argument {key!r}.{hint} Its arguments: {', '.join(named)}.")
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise ArgumentError(f"{name}: {exc}. Pass arguments by name; its arguments: {', '.join(named)}.") from None
    for key, value in bound.arguments.items():
        hint = hints.get(key)
        if key == "self" or hint is None or value is None and _allows_none(hint):
            continue
        if not _matches(value, hint):
            raise ArgumentError(f"{name}: {key}={value!r} is not allowed; {key} takes {describe(hint)}.")


def describe(hint: Any) -> str:
    """Words for an annotation: 'an integer', 'a number or None', "one of 'a', 'b'"."""
    if _is_union(hint):
        return " or ".join(dict.fromkeys(describe(a) for a in typing.get_args(hint)))
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"a tuple of {_plural(typing.get_args(hint)[0])}"
    words = {bool: "True or False", int: "an integer", float: "a finite number", str: "a string",
             type(None): "None"}
    if hint in words:
        return words[hint]
    return f"a {getattr(hint, '__name__', str(hint))}"


def _plural(hint) -> str:
    return {int: "integers", float: "numbers", str: "strings"}.get(hint, describe(hint))


def _hints(init: Callable) -> dict:
    try:
        return typing.get_type_hints(init)
    except Exception:  # an annotation we cannot resolve is not checked
        return {}


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def _allows_none(hint) -> bool:
    return hint is type(None) or _is_union(hint) and type(None) in typing.get_args(hint)


def _is_array(value: Any) -> bool:
    """A 1-d numpy array or torch tensor (their items are checked like a tuple's)."""
    return getattr(value, "ndim", None) == 1 and hasattr(value, "tolist")


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if _is_union(hint):
        return any(_matches(value, a) for a in typing.get_args(hint))
    origin = typing.get_origin(hint)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(hint))
    if origin is tuple:
        items = typing.get_args(hint)
        if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, range)) and not _is_array(value):
            return False
        value = value.tolist() if _is_array(value) else list(value)
        if not value:
            return False
        if len(items) == 2 and items[1] is Ellipsis:
            return all(_matches(v, items[0]) for v in value)
        return len(items) == len(value) and all(_matches(v, h) for v, h in zip(value, items))
    if hint is bool:
        return isinstance(value, (bool, numpy.bool_))
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation this checker does not know: not judged here

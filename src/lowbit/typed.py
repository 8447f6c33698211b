"""Build frozen config dataclasses from plain mappings (YAML), with one-line errors.

Hand-written because the checks needed are few (unknown keys, basic types, nesting) and the
error text must name the recipe path (``weights.bits``) of what is wrong.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from lowbit.errors import LowbitError

T = TypeVar("T")


def from_mapping(cls: type[T], data: Any, where: str) -> T:
    """``cls(**data)`` after checking that ``data`` is a mapping of known, well-typed fields."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise LowbitError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise LowbitError(
            f"{where}: unknown key {unknown[0]!r} (expected one of: {', '.join(fields)})"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a missing required field
        raise LowbitError(f"{where}: {exc}") from None
    except LowbitError as exc:  # a cross-field check in __post_init__: say where
        raise LowbitError(f"{where}: {exc}") from None


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Return ``value`` if it fits the simple type ``hint`` (ints widen to floats)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, where)
            except LowbitError as exc:
                errors.append(str(exc))
        raise LowbitError(errors[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise LowbitError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1]
        return tuple(_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            allowed = ", ".join(str(a) for a in typing.get_args(hint))
            raise LowbitError(f"{where}: {value!r} is not one of {allowed}")
        return value
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_mapping(hint, value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Any or (isinstance(hint, type) and _is_instance(value, hint)):
        return value
    raise LowbitError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _is_instance(value: Any, hint: type) -> bool:
    if hint is int and isinstance(value, bool):
        return False
    return isinstance(value, hint)


def to_mapping(obj: Any) -> Any:
    """Plain dict/list form of a config dataclass (for YAML and JSON)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    return obj

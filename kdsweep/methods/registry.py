"""The registry of distillation methods: every method module of this package, found at import.

Every module in this package that defines a :class:`Method` subclass and
decorates it with ``@register`` is discovered when the package is imported
(`kdsweep/methods/__init__.py`): adding a method is adding one file.
"""

from __future__ import annotations

from kdsweep.common.errors import UserError
from kdsweep.methods.base import Method
from kdsweep.models.zoo import TAPS

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in METHODS:
        raise RuntimeError(f"method {cls.name!r} registered twice")
    unknown = set(cls.needs) - set(TAPS)
    if unknown:
        raise RuntimeError(f"method {cls.name!r} needs unknown taps {unknown}")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def describe(name: str) -> str:
    """One line naming a method's form and reference, for tables that list studies by method."""
    cls = METHODS.get(name)
    return f"{cls.summary} Reference: {cls.reference}." if cls else f"{name!r} is not a method of this kdsweep version"


__all__ = ["METHODS", "Method", "describe", "get_method", "register"]

"""The registry of sparse-training methods: the one place a method's name is written.

A method is a :class:`~rigl_ds.core.sparsifier.Sparsifier` subclass that says *what* changes (its
drop and grow scores) and *how much* (its count schedule); it registers itself with
:func:`register_method`. The YAML schema (``sparsity.method``), ``rigl-ds plan``, the FLOPs count
and :func:`~rigl_ds.core.sparsifier.build_sparsifier` read the names from here, so a new method is
one file in ``rigl_ds/core`` plus its import in ``rigl_ds/core/__init__.py``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .sparsifier import Sparsifier

_REGISTRY: dict[str, type["Sparsifier"]] = {}
S = TypeVar("S", bound=type)

#: Not a method of the core: the run trains without a sparsifier (``sparsity.method: dense``).
DENSE = "dense"


def register_method(cls: S) -> S:
    """Class decorator: make ``cls`` (a Sparsifier subclass with a ``method`` name) buildable by name."""
    name = getattr(cls, "method", None)
    if not isinstance(name, str) or not name or name == DENSE:
        raise ValueError(f"{cls.__name__}.method must be a non-empty name other than {DENSE!r}, got {name!r}")
    other = _REGISTRY.get(name)
    if other is not None and other is not cls:
        raise ValueError(f"method {name!r} is already registered by {other.__module__}.{other.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    """The registered methods, in registration order."""
    return tuple(_REGISTRY)


def get_method(name: str) -> type["Sparsifier"]:
    """The Sparsifier class of a method name; ValueError naming the allowed ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(_REGISTRY)}") from None

"""A small typed registry with "did you mean" errors."""

from __future__ import annotations

import difflib
import importlib
from typing import Callable, Generic, Iterator, TypeVar

from .errors import UsageError

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def load_callable(spec: str, kind: str) -> Callable:
    """A user's ``module:function``, or a UsageError naming ``kind`` and what went wrong."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{kind} {spec!r}: expected module:function")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot load {kind} {spec!r}: {exc}") from None
    except Exception as exc:  # the module itself fails to import (SyntaxError, its own errors)
        first = " ".join(str(exc).split())[:200]
        raise UsageError(f"cannot load {kind} {spec!r}: importing {module_name} raised {type(exc).__name__}: {first}") from None
    if not callable(fn):
        raise UsageError(f"{kind} {spec!r} is not callable")
    return fn


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T, *, replace: bool = False) -> T:
        if name in self._items and not replace:
            raise UsageError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UsageError(self.unknown(name)) from None

    def unknown(self, name: str) -> str:
        names = sorted(self._items)
        return f"unknown {self.kind} {name!r}{did_you_mean(name, names)}; choose from {', '.join(names)}"

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def names(self) -> list[str]:
        return list(self._items)

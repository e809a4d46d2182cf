"""One registry per kind of pluggable part: routers, expert backends, activations, aux losses.

The implementation modules register into these at import (``@ROUTERS.register("topk")``);
:class:`rmoe.config.MoEConfig` validates names against them (and against the traits the entries
carry: a router's ``family`` and ``default_aux_loss``, an aux loss's ``families``), so adding a
router or an aux loss is one registration. This module imports nothing from the package: the
implementations import it, and :func:`load` imports the implementations the first time a
registry is read.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")

# the modules that register the built-in entries (imported on first read of a registry)
_IMPLEMENTATIONS = ("rmoe.losses", "rmoe.experts", "rmoe.megablocks", "rmoe.routing")


_loaded = False


def load() -> None:
    """Import the modules that register the built-in entries (once)."""
    global _loaded
    if _loaded:
        return
    for name in _IMPLEMENTATIONS:
        importlib.import_module(name)
    _loaded = True


class Registry(Mapping[str, T], Generic[T]):
    """Name -> implementation, in registration order. ``register(name)`` decorates (or takes the
    object as second argument); a name registered twice is an error unless ``replace=True``."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None, *, replace: bool = False) -> Any:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} registry: name={name!r}; allowed: a non-empty string")

        def add(o: T) -> T:
            if name in self._entries and not replace and self._entries[name] is not o:
                raise ValueError(f"{self.kind} {name!r} is already registered ({self._entries[name]!r}); "
                                 "pass replace=True to override it")
            self._entries[name] = o
            return o

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> T:
        return self._entries.pop(name)

    def names(self) -> tuple[str, ...]:
        load()
        return tuple(self._entries)

    def __getitem__(self, name: str) -> T:
        load()
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; allowed: {'|'.join(self._entries)}") from None

    def __contains__(self, name: object) -> bool:
        load()
        try:
            return name in self._entries
        except TypeError:  # an unhashable value (e.g. a list from a config) is no name
            return False

    def __iter__(self) -> Iterator[str]:
        load()
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        load()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"


# routers: ``Router`` subclasses with class attributes ``family`` (which aux losses fit),
# ``default_aux_loss``, ``adaptive_pool`` (max_experts may exceed initial_experts) and ``dropless``
# (no capacity, no batch-prioritized routing, top_k not bounded by initial_experts)
ROUTERS: Registry[type] = Registry("router")
# expert backends: ``nn.Module`` classes with ``dropless`` (no finite capacity) and optional
# ``check_available()``
BACKENDS: Registry[type] = Registry("backend")
# activations: ``Activation`` entries (see rmoe.experts)
ACTIVATIONS: Registry[Any] = Registry("activation")
# aux losses: ``AuxLoss`` entries (see rmoe.losses)
AUX_LOSSES: Registry[Any] = Registry("aux_loss")

"""One registry type for everything chosen by name in a config: objectives, advantage
estimators, rewards (tunix picks its loss and advantage estimator the same way).

A :class:`Registry` is a ``dict`` from name to object with a decorator to add entries and a
``get`` whose error names what is available::

    OBJECTIVES = Registry("objective")

    @OBJECTIVES.register("grpo")
    def grpo_objective(...): ...

    OBJECTIVES.get("grpo")   # KeyError "unknown objective 'x'; available: [...]" otherwise

Registering a name twice is an error (two modules silently replacing each other's entry is the
bug a registry exists to prevent).

:class:`ConfigError` is a config value that cannot be used (an unknown name, sizes that do not
divide, a limit the data exceeds): the entry points report it as one line (``mr1.entry``).
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

__all__ = ["ConfigError", "UnknownNameError", "Registry"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value that cannot be used; its message names the field and what to set."""


class UnknownNameError(ConfigError, KeyError):
    """A name that is not in its registry (a ``KeyError`` too, for ``dict``-style callers)."""


class Registry(dict):
    """Named entries of one ``kind`` (the word used in error messages)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str, value: Any = None) -> Callable[[T], T]:
        """Decorator adding its target under ``name``; with ``value`` adds it directly (and
        returns it)."""
        def add(obj: T) -> T:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} already registered")
            self[name] = obj
            return obj
        return add if value is None else add(value)

    def get(self, name: str) -> Any:  # noqa: D401 - dict.get with a helpful KeyError
        """The entry registered as ``name``; :class:`UnknownNameError` naming the available
        ones otherwise."""
        try:
            return self[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; available: {sorted(self)}"
                                   ) from None

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self)})"

"""One generic registry: ``register(name)``, ``get(name)`` with a "did you mean" hint, ``names()``."""
from __future__ import annotations

import difflib
import contextlib
from typing import Callable, Generic, Iterator, TypeVar

from robustprune.infra.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of extensions (datasets, models, objectives, ...), filled by the ``@register`` decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(entry: T) -> T:
            if name in self._entries:
                raise RuntimeError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return decorate

    @contextlib.contextmanager
    def temporarily(self, name: str, entry: T) -> Iterator[T]:
        """``entry`` under ``name`` (registered, or replacing the registered one) for the ``with`` block only: an
        extension tried out, or a test's stand-in, leaves the table as it found it."""
        missing = object()
        previous = self._entries.get(name, missing)
        self._entries[name] = entry
        try:
            yield entry
        finally:
            if previous is missing:
                del self._entries[name]
            else:
                self._entries[name] = previous  # type: ignore[assignment]

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UserError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), self.names(), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} (choose from: {', '.join(self.names())})"

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

"""Configuration sections read key by key, so an unknown key is refused instead of silently ignored."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from keyseal.errors import UsageError

__all__ = ["_Section"]


class _Section:
    """A mapping read key by key; `done()` refuses whatever was not read (an unknown key)."""

    def __init__(self, data: object, where: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise UsageError(f"{where or 'the configuration'} must be a mapping of keys to values")
        self.data: Mapping[str, Any] = data
        self.where = where
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def get(self, name: str) -> Any:
        self.seen.add(name)
        return self.data.get(name)

    def text(self, name: str, default: str | None = None) -> str | None:
        value = self.get(name)
        if value is None or value == "":
            return default
        if not isinstance(value, str):
            raise UsageError(f"{self.key(name)} must be a string")
        return value

    def choice(self, name: str, options: tuple[str, ...], default: str) -> str:
        value = self.text(name, default)
        assert value is not None
        if value not in options:
            raise UsageError(f"{self.key(name)}={value!r} is not one of {', '.join(options)}")
        return value

    def section(self, name: str) -> _Section:
        return _Section(self.get(name), self.key(name))

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise UsageError(f"{self.key(name)} must be a whole number from {low} to {high}")
        return value

    def strings(self, name: str) -> tuple[str, ...]:
        value = self.get(name)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise UsageError(f"{self.key(name)} must be a list of strings")
        return tuple(value)

    def done(self) -> None:
        unknown = sorted(str(k) for k in self.data if k not in self.seen)
        if unknown:
            raise UsageError(
                f"unknown configuration key {self.key(unknown[0])!r}: check its spelling (see docs/server-api.md)"
            )

"""Plain value classes for the verification path, in place of dataclasses.

`keyseal-gpg --verify` runs once per commit under `git log --show-signature`, so its start-up is its cost.
Importing `dataclasses` pulls in `inspect`, `ast`, `dis` and `tokenize` (about 5 ms), and building each dataclass
compiles its methods (0.3-0.5 ms each, a dozen on the path). These bases give a class that lists its fields in
`__slots__` the comparison, hash and repr a dataclass would have, at no start-up cost. Each subclass lists all its
fields in its own `__slots__` and writes its `__init__`.
"""

from __future__ import annotations

__all__ = ["Frozen", "Record"]


class Record:
    """Equality and repr over the fields in `__slots__` (a dataclass's `eq=True`; unhashable, as one is)."""

    __slots__: tuple[str, ...] = ()
    __hash__ = None  # type: ignore[assignment]  # mutable: unhashable, as a dataclass with eq=True

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record) or other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__qualname__}({fields})"


class Frozen(Record):
    """A `Record` whose fields are set once, by `__init__`, and never changed; it hashes by value (a dataclass's
    `frozen=True`)."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        if hasattr(self, name):
            raise AttributeError(f"cannot assign to field {name!r} of {type(self).__qualname__}")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of {type(self).__qualname__}")

    def __hash__(self) -> int:  # type: ignore[override]  # Record is unhashable; a frozen one hashes by value
        return hash(self._values())

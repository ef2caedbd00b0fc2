"""Numeric settings read from the environment (timeouts, retry budgets), checked with one clear error."""

from __future__ import annotations

import os

from keyseal.errors import UsageError

__all__ = ["env_number"]


def env_number(name: str, default: float, *, integer: bool, minimum: float) -> float:
    """`$name` as a number of at least `minimum`, or `default` when unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError as exc:
        kind = "a whole number" if integer else "a number of seconds"
        raise UsageError(f"{name}={raw!r} is not {kind}: unset it or set e.g. {name}={default:g}") from exc
    if value < minimum:
        raise UsageError(f"{name}={raw!r} must be at least {minimum:g}")
    return value

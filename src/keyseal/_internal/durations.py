"""Durations as configuration files write them: `90s`, `5m`, `1h30m`, `7d`, shared by server and agent."""

from __future__ import annotations

import re
from datetime import timedelta

from keyseal.errors import UsageError

__all__ = ["parse_duration"]

_DURATION_RE = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def parse_duration(text: object, where: str) -> timedelta:
    """`90s`, `5m`, `1h`, `1h30m`, `7d` (or a whole number of seconds): a positive duration."""
    if isinstance(text, bool) or not isinstance(text, str | int):
        raise UsageError(f"{where} must be a duration such as 30s, 5m, 1h or 7d")
    raw = f"{text}s" if isinstance(text, int) else text.strip()
    match = _DURATION_RE.fullmatch(raw)
    if not raw or match is None or not any(match.groups()):
        raise UsageError(f"{where}={raw!r} is not a duration: use e.g. 30s, 5m, 1h, 1h30m or 7d")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    value = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    if value <= timedelta(0):
        raise UsageError(f"{where}={raw!r} must be longer than zero")
    return value

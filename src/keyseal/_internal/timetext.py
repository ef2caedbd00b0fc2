"""Times as keyseal prints them: RFC 3339, UTC, whole seconds (2026-12-06T09:41:00Z). Without `datetime`: the
short paths (`keyseal verify`, `keyseal-gpg --verify`) print them and import as little as they can."""

import time

__all__ = ["format_time"]


def format_time(seconds: int) -> str:
    """Unix seconds as RFC 3339 UTC."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))

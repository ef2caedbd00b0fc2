"""The hypothesis settings every CI fuzz property uses (tests/test_fuzz_*.py): bounded so CI stays fast, more
with KEYSEAL_FUZZ_EXAMPLES; a deadline per input so a hang fails; no example database, so every run is fresh."""

from __future__ import annotations

import os
from datetime import timedelta

from hypothesis import HealthCheck, settings

__all__ = ["EXAMPLES", "fuzz_settings"]

EXAMPLES = int(os.environ.get("KEYSEAL_FUZZ_EXAMPLES", "200"))


def fuzz_settings(deadline_seconds: float = 3) -> settings:
    """A normal input takes milliseconds; the server targets, a whole request each, get longer."""
    return settings(max_examples=EXAMPLES, deadline=timedelta(seconds=deadline_seconds), database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

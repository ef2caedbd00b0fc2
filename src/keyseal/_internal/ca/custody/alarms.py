"""Custody alarms: something in the key manager is not what keyseal made and pinned (a moved alias, a planted
keyset, a key whose public half or attributes differ from its pin).

An alarm is logged at ERROR with a stable reason, counted for `keyseal_custody_alarms_total{reason=...}`, and the
thing it names is not used. The same finding is logged once per process (a refresh every few seconds would
otherwise repeat it), but counted every time it is seen, so the metric keeps rising while the cause is there.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

__all__ = ["REASONS", "alarm", "counts"]

log = logging.getLogger(__package__)  # keyseal._internal.ca.custody: alarms come from every custody

REASONS = (
    "alias-moved",        # a pinned keyset's alias names another key than its pin
    "unpinned-keyset",    # aliases, markers or key objects for a keyset the pins do not hold
    "key-mismatch",       # a pinned key's public key, type, origin or usage differs from what keyseal made
    "key-attributes",     # a PKCS#11 key that was imported, or was ever extractable or not sensitive
    "signature-check",    # a CA key's signature does not verify against its pinned public key
    "pin-chain",          # the pin record is malformed, re-rooted, rewritten or its signatures do not verify
)

_lock = threading.Lock()
_counts: Counter[str] = Counter(dict.fromkeys(REASONS, 0))
_logged: set[tuple[str, str]] = set()
_LOGGED_MAX = 1000  # distinct findings remembered (beyond that, repeats are logged again rather than kept)


def alarm(reason: str, message: str) -> None:
    """Log (once per distinct message) and count a custody alarm."""
    assert reason in REASONS, reason
    with _lock:
        _counts[reason] += 1
        first = (reason, message) not in _logged
        if first and len(_logged) < _LOGGED_MAX:
            _logged.add((reason, message))
    if first:
        log.error("CUSTODY ALARM (%s): %s", reason, message)


def counts() -> dict[str, int]:
    """Alarms raised in this process so far, by reason."""
    with _lock:
        return dict(_counts)

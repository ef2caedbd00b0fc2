"""Prometheus metrics in the text exposition format (version 0.0.4), kept in process memory.

- keyseal_svids_issued_total{type="x509"|"jwt"}
- keyseal_kms_calls_total{operation="Sign"|"Encrypt"|"Decrypt"|...} (every KMS API call this process made)
- keyseal_keyset_state{keyset="N",state="prepared"|"active"|"old"} 1 per live keyset
- keyseal_bundle_sequence
- keyseal_store_view_age_seconds (since this replica last read the keyset store; not ready once above its bound)
- keyseal_errors_total{reason="unauthenticated"|"forbidden"|"bad_request"|"unavailable"|"internal"|"rotation"}
- keyseal_custody_alarms_total{reason=...} (ca.custody.alarms: a key, alias or keyset that is not what was pinned)
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

from keyseal._internal.ca.custody import alarms
from keyseal._internal.metrics_text import CONTENT_TYPE

__all__ = ["CONTENT_TYPE", "ERROR_REASONS", "Metrics"]

ERROR_REASONS = ("unauthenticated", "forbidden", "bad_request", "unavailable", "internal", "rotation")


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._issued: Counter[str] = Counter({"x509": 0, "jwt": 0})
        self._kms: Counter[str] = Counter(dict.fromkeys(("Decrypt", "Encrypt", "Sign"), 0))
        self._errors: Counter[str] = Counter(dict.fromkeys(ERROR_REASONS, 0))
        self.keyset_states: Callable[[], list[tuple[int, str]]] = list
        self.bundle_sequence: Callable[[], int] = lambda: 0
        self.store_view_age: Callable[[], float | None] = lambda: None
        self.extra: list[Callable[[], list[str]]] = []  # more families (federation)

    def issued(self, kind: str) -> None:
        with self._lock:
            self._issued[kind] += 1

    def kms_call(self, operation: str) -> None:
        with self._lock:
            self._kms[operation] += 1

    def error(self, reason: str) -> None:
        with self._lock:
            self._errors[reason] += 1

    def _view_age(self) -> list[str]:
        age = self.store_view_age()
        if age is None:
            return []
        return ["# HELP keyseal_store_view_age_seconds Seconds since this replica last read the keyset store.",
                "# TYPE keyseal_store_view_age_seconds gauge",
                f"keyseal_store_view_age_seconds {age:.3f}"]

    def render(self) -> bytes:
        with self._lock:
            issued, kms, errors = dict(self._issued), dict(self._kms), dict(self._errors)
        lines = [
            "# HELP keyseal_svids_issued_total SVIDs issued since the server started, by type.",
            "# TYPE keyseal_svids_issued_total counter",
            *(f'keyseal_svids_issued_total{{type="{k}"}} {v}' for k, v in sorted(issued.items())),
            "# HELP keyseal_kms_calls_total AWS KMS API calls made by this server, by operation.",
            "# TYPE keyseal_kms_calls_total counter",
            *(f'keyseal_kms_calls_total{{operation="{k}"}} {v}' for k, v in sorted(kms.items())),
            "# HELP keyseal_keyset_state Live keysets (1 per keyset, labelled with its state).",
            "# TYPE keyseal_keyset_state gauge",
            *(f'keyseal_keyset_state{{keyset="{n}",state="{s}"}} 1' for n, s in self.keyset_states()),
            "# HELP keyseal_bundle_sequence The spiffe_sequence of the bundle served now.",
            "# TYPE keyseal_bundle_sequence gauge",
            f"keyseal_bundle_sequence {self.bundle_sequence()}",
            *self._view_age(),
            "# HELP keyseal_errors_total Refused or failed requests and failed rotations, by reason.",
            "# TYPE keyseal_errors_total counter",
            *(f'keyseal_errors_total{{reason="{k}"}} {v}' for k, v in sorted(errors.items())),
            "# HELP keyseal_custody_alarms_total Custody alarms: keys, aliases or keysets that differ from their pins.",
            "# TYPE keyseal_custody_alarms_total counter",
            *(f'keyseal_custody_alarms_total{{reason="{k}"}} {v}' for k, v in sorted(alarms.counts().items())),
        ]
        for more in self.extra:
            lines += more()
        return ("\n".join(lines) + "\n").encode("utf-8")

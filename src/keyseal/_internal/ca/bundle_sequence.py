"""The bundle's `spiffe_sequence`, which the SPIFFE bundle format says MUST change whenever the bundle changes.

A function of the keyset numbers alone misses changes that keep the numbers: a restart with another `ca.ttl`
re-derives every CA certificate, and an ECDSA key manager (KMS, PKCS#11) signs them again on every start. And
no function of the contents can both grow with every change and give every replica the same value for the
same bytes. So the sequence is assigned through the store, beside the server's other state: a small document
maps the digest of the bundle's contents (everything but the sequence) to the sequence given to it. A replica
whose contents change (at start, at rotation) adopts the recorded number if its contents are the newest
recorded, and otherwise records them with the highest number plus one (compare and swap: the loser of a race
reads again and adopts the winner's number). Contents that come back after newer ones (a restart with the old
`ca.ttl` again) get a new, higher number: a peer must never see the sequence go back. Every refresh a replica
reads its contents' number again and adopts it if another replica recorded them anew, so replicas serving the
same bytes agree. The document keeps the newest KEEP digests.

With an ECDSA key manager each replica signs its own CA certificates, so replicas publish different bytes
(with different sequences) for the same keys; a federation peer keeps the highest it has seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from keyseal._internal.ca.bundle import bundle_document, sequence_of
from keyseal._internal.ca.custody.keyset import Keyset
from keyseal._internal.ca.custody.pin_store import PinStore
from keyseal.errors import KeysealError, StoreConflictError

__all__ = ["FORMAT", "KEEP", "BundlePublisher", "SequenceLedger", "contents_digest"]

log = logging.getLogger(__name__)

FORMAT = "keyseal.bundle-sequence.v1"
KEEP = 64
_ATTEMPTS = 8
RETRY_SECONDS = 5.0  # a store that failed is asked again at most this often (the bundle is served meanwhile)


def contents_digest(document: dict[str, Any]) -> str:
    """SHA-256 of the bundle document without its sequence, canonically encoded."""
    rest = {k: v for k, v in document.items() if k != "spiffe_sequence"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class SequenceLedger:
    """digest -> sequence, in one document with compare-and-swap writes (keyseal._internal.ca.custody.pin_store)."""

    def __init__(self, store: PinStore) -> None:
        self.store = store

    def _entries(self) -> tuple[dict[str, int], str | None]:
        found = self.store.read()
        if found is None or not found[0].strip():
            return {}, found[1] if found else None
        data, revision = found
        try:
            document = json.loads(data)
            entries = {str(e["digest"]): int(e["sequence"]) for e in document["sequences"]}
            if document.get("format") != FORMAT:
                raise ValueError("format")
        except (ValueError, KeyError, TypeError) as exc:
            raise KeysealError(f"{self.store.location()} is not a keyseal bundle-sequence document "
                               f"({FORMAT}): remove it and restart to start a new one") from exc
        return entries, revision

    def recorded(self, digest: str) -> int | None:
        """The number recorded for the contents `digest`, if any (a read, never a write)."""
        return self._entries()[0].get(digest)

    def sequence_for(self, digest: str, floor: int) -> int:
        """The sequence for contents `digest` that this replica starts to serve: the recorded one if they are
        the newest recorded contents, else a new one (above every recorded one, and at least `floor`)."""
        for _ in range(_ATTEMPTS):
            entries, revision = self._entries()
            if digest in entries and entries[digest] == max(entries.values()):
                return entries[digest]
            sequence = max([floor, *(s + 1 for s in entries.values())])
            entries[digest] = sequence
            newest = sorted(entries.items(), key=lambda item: item[1])[-KEEP:]
            document = {"format": FORMAT,
                        "sequences": [{"digest": d, "sequence": s} for d, s in newest]}
            try:
                self.store.write(json.dumps(document, indent=1).encode() + b"\n", revision)
            except StoreConflictError:
                continue
            log.info("bundle contents %s... get sequence %d (%s)", digest[:12], sequence, self.store.location())
            return sequence
        raise KeysealError(f"{self.store.location()} kept changing while keyseal tried to record a bundle sequence")


class BundlePublisher:
    """The bundle as served (API, node agents, federation endpoint, the agents' ConfigMap): the live keysets'
    document with the sequence the ledger gave its contents. Recomputed only when the keysets change."""

    def __init__(self, ledger: SequenceLedger | None, refresh_hint: timedelta) -> None:
        self.ledger = ledger
        self.refresh_hint = refresh_hint
        self._lock = threading.Lock()
        self._keysets: tuple[Keyset, ...] = ()
        self._digest = ""
        self._sequence = 0
        self._document: dict[str, Any] = {}
        self._body = b""
        self._provisional = False
        self._retry_at = 0.0

    def served(self, keysets: Sequence[Keyset]) -> tuple[dict[str, Any], bytes]:
        """What the listener serves for these live keysets, without waiting on the store: when they changed
        since the rotation thread last published (a keyset expired a moment ago), the last published bundle
        until the next tick records the new one (TICK_SECONDS); without a ledger, the new one at once."""
        if self.ledger is not None and self._body:
            return self._document, self._body
        return self.current(keysets)

    def current(self, keysets: Sequence[Keyset]) -> tuple[dict[str, Any], bytes]:
        """The document and its JSON for these keysets, its sequence recorded in the store if new (the rotation
        thread); the same keyset objects as last time cost nothing."""
        cached = self._keysets
        if len(cached) == len(keysets) and all(a is b for a, b in zip(cached, keysets, strict=True)) \
                and self._body and (not self._provisional or time.monotonic() < self._retry_at):
            return self._document, self._body
        with self._lock:
            return self._update(tuple(keysets))

    def _update(self, keysets: tuple[Keyset, ...]) -> tuple[dict[str, Any], bytes]:
        document = bundle_document(keysets, self.refresh_hint)
        digest = contents_digest(document)
        if digest == self._digest and not self._provisional:
            self._keysets = keysets
            return self._document, self._body
        floor = sequence_of(keysets)  # the sequence older versions served: never go below it
        if self.ledger is None:
            sequence, provisional = max(floor, self._sequence + 1 if self._digest else floor), False
        else:
            try:
                sequence, provisional = self.ledger.sequence_for(digest, floor), False
            except KeysealError as exc:
                sequence, provisional = max(floor, self._sequence + 1), True
                self._retry_at = time.monotonic() + RETRY_SECONDS
                log.error("cannot record the bundle sequence, serving %d from this replica alone until the store "
                          "answers: %s", sequence, exc.message)
        document["spiffe_sequence"] = sequence
        self._document = document
        self._body = json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"
        self._keysets, self._digest, self._sequence, self._provisional = keysets, digest, sequence, provisional
        return self._document, self._body

    def refresh(self) -> None:
        """Adopt the number another replica recorded for the contents served here (rotation thread)."""
        if self.ledger is None or not self._digest:
            return
        with self._lock:
            if self._provisional:
                self._update(self._keysets)
                return
            try:
                recorded = self.ledger.recorded(self._digest)
            except KeysealError as exc:
                log.warning("cannot read the bundle sequences: %s", exc.message)
                return
            if recorded is not None and recorded != self._sequence:
                log.info("bundle sequence %d -> %d, as recorded for these contents", self._sequence, recorded)
                self._document = {**self._document, "spiffe_sequence": recorded}
                self._body = json.dumps(self._document, indent=2, sort_keys=True).encode() + b"\n"
                self._sequence = recorded

    @property
    def sequence(self) -> int:
        return self._sequence

"""The keyset manager: loads keysets from their custody, creates the next one when the schedule says so, and
tells the issuers which keyset is active now and the bundle which keysets are live.

Issuance never waits for the custody: it reads an immutable snapshot, and the active keyset is computed from
the clock (activation writes nothing). `refresh()` is the only thing that reads or writes the custody; the
server calls it at startup and from its rotation thread when the schedule's next event comes (and, for
wrapped keys, every refresh hint, to see a keyset another replica created early).

A replica cut off from the store (`max_view_age` passed since its last successful read) is stale: it is not
ready, and it stops signing with its newest keyset once another replica could have activated a successor it
has not seen (the schedule's earliest activation, computed from the clock alone): signing with a retired
keyset would hand out SVIDs that clients holding the other replicas' view may not trust for long.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from keyseal._internal.ca.custody.keyset import Keyset, make_keyset
from keyseal._internal.ca.custody.schedule import Plan, earliest_successor, plan
from keyseal._internal.ca.custody.source import KeysetKeys, KeysetSource, SlotBusyError
from keyseal.errors import KeysealError

__all__ = ["Clock", "KeysetManager", "NoActiveKeysetError", "system_clock"]

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    return datetime.now(UTC)


class NoActiveKeysetError(KeysealError):
    """No keyset may sign right now (none loaded yet, or all expired while the custody was unreachable)."""


class KeysetManager:
    def __init__(self, source: KeysetSource, trust_domain: str, ca_ttl: timedelta, refresh_hint: timedelta,
                 clock: Clock = system_clock, max_view_age: timedelta | None = None) -> None:
        self.source = source
        self.trust_domain = trust_domain
        self.ca_ttl = ca_ttl
        self.refresh_hint = refresh_hint
        self.clock = clock
        self._lock = threading.Lock()  # one refresh at a time
        self._keysets: tuple[Keyset, ...] = ()
        self._built: dict[tuple[int, datetime, int, int], Keyset] = {}
        self._states: dict[int, str] = {}
        self._plan_cache: tuple[tuple[Keyset, ...], datetime, datetime | None, Plan] | None = None
        self._active_cache: tuple[Plan, Keyset] | None = None  # issuance asks for the active keyset per request
        self.last_refresh: datetime | None = None
        self.max_view_age = max_view_age  # None: the view is never stale (a custody read only when due)

    def start(self) -> None:
        """Check the custody (nothing is written if it fails), then load or create the keyset."""
        self.source.startup_check()
        self.refresh()
        if not self._keysets:
            raise NoActiveKeysetError(f"no keyset could be loaded or created in {self.source.describe()}")
        if self.active_keyset() is None:  # e.g. another replica, its clock ahead, created it seconds "later"
            log.warning("no keyset is active yet (is this machine's clock behind?): not ready until one is")

    def refresh(self) -> bool:
        """Reload from the custody and create the next keyset if one is due. True if the keyset list changed."""
        with self._lock:
            now = self.clock()
            live_after = now - self.ca_ttl
            loaded = self.source.load(live_after)
            keysets = self._build(loaded.keysets)
            if plan(keysets, now, self.refresh_hint).prepare:
                number = loaded.highest + 1
                try:
                    if self.source.create(number, now, live_after):
                        log.info("keyset %d created in %s", number, self.source.describe())
                except SlotBusyError as exc:
                    log.error("cannot prepare keyset %d yet: %s", number, exc.message)
                loaded = self.source.load(live_after)
                keysets = self._build(loaded.keysets)
            changed = tuple(k.number for k in keysets) != tuple(k.number for k in self._keysets)
            self._keysets = keysets
            self.last_refresh = now
        self.log_transitions()
        return changed

    def _build(self, found: tuple[KeysetKeys, ...]) -> tuple[Keyset, ...]:
        """Keysets with their CA certificates; a certificate is built once per process (for a KMS key, that
        is one kms:Sign per keyset, not one per reload)."""
        result = []
        for keys in found:
            cache_key = (keys.number, keys.not_before, id(keys.x509_key), id(keys.jwt_key))
            keyset = self._built.get(cache_key)
            if keyset is None:
                keyset = make_keyset(self.trust_domain, keys.number, keys.not_before, self.ca_ttl,
                                     keys.x509_key, keys.jwt_key)
                self._built[cache_key] = keyset
            result.append(keyset)
        wanted = {(k.number, k.not_before, id(k.x509_key), id(k.jwt_key)) for k in found}
        self._built = {k: v for k, v in self._built.items() if k in wanted}
        return tuple(result)

    # -- what issuers and the bundle read ----------------------------------------------------------------

    def plan(self, now: datetime | None = None) -> Plan:
        """The schedule at `now`. Issuance asks on every request, so the last answer is reused while `now`
        stays between the moment it was computed and its next event (the states cannot change in between)."""
        now = now or self.clock()
        keysets = self._keysets
        cached = self._plan_cache
        if cached is not None:
            for_keysets, since, until, answer = cached
            if for_keysets is keysets and since <= now and (until is None or now < until):
                return answer
        answer = plan(keysets, now, self.refresh_hint)
        self._plan_cache = (keysets, now, answer.next_event, answer)
        return answer

    def live(self, now: datetime | None = None) -> list[tuple[Keyset, str]]:
        """Keysets to publish at `now` (prepared, active and old; expired ones left out), oldest first."""
        by_number = {k.number: k for k in self._keysets}
        return [(by_number[p.number], p.state) for p in self.plan(now).phases]

    def active_keyset(self, now: datetime | None = None) -> Keyset | None:
        now = now or self.clock()
        keyset = self._scheduled_active(now)
        if keyset is not None and self.max_view_age is not None and self.retired_unseen(keyset, now):
            return None
        return keyset

    def _scheduled_active(self, now: datetime) -> Keyset | None:
        schedule = self.plan(now)
        cached = self._active_cache
        if cached is not None and cached[0] is schedule:  # the same schedule, so the same answer
            return cached[1]
        for keyset, state in self.live(now):
            if state == "active":
                self._active_cache = (schedule, keyset)
                return keyset
        return None

    # -- how fresh this replica's view of the store is ------------------------------------------------------

    def view_age(self, now: datetime | None = None) -> timedelta | None:
        """Time since the last successful read of the custody (None before the first)."""
        last = self.last_refresh
        return None if last is None else (now or self.clock()) - last

    def stale(self, now: datetime | None = None) -> bool:
        """Whether the last successful read is older than `max_view_age` (a replica cut off from the store)."""
        age = self.view_age(now)
        return self.max_view_age is not None and age is not None and age > self.max_view_age

    def retired_unseen(self, keyset: Keyset, now: datetime) -> bool:
        """Whether a stale replica must stop signing with `keyset`: it is the newest this replica knows, and
        `now` is past the earliest moment another replica could have activated a successor (prepared at the
        half-life at the earliest, active at five sixths, and never before one refresh hint after it was made;
        see keyseal._internal.ca.custody.schedule)."""
        if not self.stale(now) or keyset.number != max(k.number for k in self._keysets):
            return False
        return now >= earliest_successor(keyset, self.refresh_hint)

    def active(self) -> Keyset:
        now = self.clock()
        keyset = self.active_keyset(now)
        if keyset is None:
            if self.stale(now):
                raise NoActiveKeysetError("this replica cannot read the CA store, and its keyset may have been "
                                          "replaced by now: it does not sign until it can; ask another replica")
            raise NoActiveKeysetError("no active keyset: the CA cannot sign right now; see the server log")
        return keyset

    def loaded(self) -> tuple[Keyset, ...]:
        """Every keyset loaded at the last refresh, oldest first."""
        return self._keysets

    def keyset(self, number: int) -> Keyset | None:
        for keyset in self._keysets:
            if keyset.number == number:
                return keyset
        return None

    def due(self, now: datetime | None = None) -> bool:
        """Whether the schedule has an event at or before `now` that a refresh should act on."""
        return not self._keysets or self.plan(now).prepare

    def next_event(self) -> datetime | None:
        return self.plan().next_event

    def log_transitions(self) -> None:
        """Log each keyset's state once when it changes (prepared, active, old, expired)."""
        states = {keyset.number: state for keyset, state in self.live()}
        for number, state in sorted(states.items()):
            if self._states.get(number) != state:
                keyset = self.keyset(number)
                until = f" until {keyset.not_after:%Y-%m-%dT%H:%M:%SZ}" if keyset else ""
                log.info("keyset %d is %s%s", number, state, until)
        for number in sorted(set(self._states) - set(states)):
            log.info("keyset %d has expired and left the bundle", number)
        self._states = states

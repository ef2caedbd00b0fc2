"""Keyset rotation as a pure function of time: prepared -> active -> old, decided from timestamps alone.

A keyset of lifetime T created at N:
- the next keyset is prepared once the active one is half way through its life (N + T/2);
- the prepared keyset becomes active at five sixths of its predecessor's life (N + 5T/6), but never before it
  has been published in the bundle for one refresh hint (so clients that refresh as hinted know it before it
  signs anything), and never after its predecessor has expired;
- older keysets stay in the bundle as `old` until they expire: everything they signed expires no later than
  they do, since no SVID outlives its CA.

Since every replica computes the same states from the same store, activation needs no write and no
coordination; only preparation writes (a new keyset), and the store's optimistic concurrency picks one writer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, Protocol

__all__ = ["KeysetTimes", "Phase", "Plan", "earliest_successor", "plan"]

State = Literal["prepared", "active", "old"]


@dataclass(frozen=True)
class Phase:
    number: int
    state: State
    activates_at: datetime


@dataclass(frozen=True)
class Plan:
    """The live keysets at one instant, oldest first; `prepare` says a new keyset is due now."""

    phases: tuple[Phase, ...]
    prepare: bool
    next_event: datetime | None

    @property
    def active(self) -> int | None:
        for phase in self.phases:
            if phase.state == "active":
                return phase.number
        return None


class KeysetTimes(Protocol):
    """What the schedule needs of a keyset (a Keyset satisfies it)."""

    @property
    def number(self) -> int: ...
    @property
    def not_before(self) -> datetime: ...
    @property
    def not_after(self) -> datetime: ...


def plan(keysets: Sequence[KeysetTimes], now: datetime, refresh_hint: timedelta) -> Plan:
    """States of the keysets that have not expired at `now`, and whether a new keyset is due."""
    live = sorted((k for k in keysets if k.not_after > now), key=lambda k: k.number)
    activations: list[datetime] = []
    for index, keyset in enumerate(live):
        if index == 0:
            activations.append(keyset.not_before)
            continue
        previous = live[index - 1]
        lifetime = previous.not_after - previous.not_before
        due = max(previous.not_before + lifetime * 5 / 6, keyset.not_before + refresh_hint)
        activations.append(min(due, previous.not_after))
    active_index = max((i for i, at in enumerate(activations) if at <= now), default=None)
    phases = []
    for index, (keyset, at) in enumerate(zip(live, activations, strict=True)):
        state: State
        if active_index is None or index > active_index:
            state = "prepared"
        elif index == active_index:
            state = "active"
        else:
            state = "old"
        phases.append(Phase(keyset.number, state, at))
    prepare = not live
    events: list[datetime] = [at for at in activations if at > now] + [k.not_after for k in live]
    if live and active_index == len(live) - 1:
        newest = live[-1]
        half = newest.not_before + (newest.not_after - newest.not_before) / 2
        prepare = now >= half
        events.append(half)
    future = [e for e in events if e > now]
    return Plan(tuple(phases), prepare, min(future) if future else None)


def earliest_successor(keyset: KeysetTimes, refresh_hint: timedelta) -> datetime:
    """The earliest moment any replica can make a successor of `keyset` active, from the clock alone: the
    successor is prepared at `keyset`'s half-life at the earliest, and activates at five sixths of its life,
    never sooner than one refresh hint after it was made, never later than `keyset` expires."""
    lifetime = keyset.not_after - keyset.not_before
    due = max(keyset.not_before + lifetime * 5 / 6, keyset.not_before + lifetime / 2 + refresh_hint)
    return min(due, keyset.not_after)

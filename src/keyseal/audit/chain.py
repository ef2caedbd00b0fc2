"""Checking an audit log's hash chain and sequence, and naming the first line where it breaks.

Each line's `prev` is the SHA-256 of the line before (GENESIS for the first) and `seq` counts from 1, so a
deleted, edited, inserted or moved line breaks the chain where it happened. The happy path streams the file;
only a broken chain is indexed whole, to tell a deletion from a move. What a chain alone cannot show: lines cut
from the end, or a log rewritten whole. Record the head `verify` prints somewhere else (a CI log, a ticket)
and pass it back with `head=` to catch those too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from keyseal.audit.log import GENESIS, line_hash
from keyseal.errors import AuditChainError, InputError

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Line:
    number: int
    seq: int
    prev: str
    hash: str


@dataclass(frozen=True)
class ChainReport:
    lines: int
    head: str  # the last line's hash (GENESIS for an empty log): what the next line's prev will be


def verify_log(path: Path, head: str | None = None) -> ChainReport:
    """Check the chain; raise AuditChainError naming the first broken line (1-based), or if `head` (an earlier
    report's head) is no longer a line of the log."""
    wanted = _normalize_head(head) if head is not None else None
    seen_head = wanted is None or wanted == GENESIS
    before: list[Line] = []  # the two lines before the current one
    count = 0
    last = GENESIS
    for line in _lines(path):
        expected_seq = before[-1].seq + 1 if before else 1
        expected_prev = before[-1].hash if before else GENESIS
        if line.seq != expected_seq or line.prev != expected_prev:
            raise AuditChainError(_diagnose(path, line.number))
        before = [*before[-1:], line]
        count, last = line.number, line.hash
        seen_head = seen_head or line.hash == wanted
    if not seen_head:
        raise AuditChainError(f"no line of the audit log has the head {wanted}: lines were cut from its end, or "
                              f"it was rewritten, after that head was recorded")
    return ChainReport(count, last)


def _normalize_head(head: str) -> str:
    value = head.strip().lower().removeprefix("sha256:")
    if not _HEX64.match(value):
        raise InputError(f"invalid head {head[:80]!r}: give the 64 hex digits keyseal audit verify printed")
    return value


def _lines(path: Path) -> Iterator[Line]:
    """Parse each line; a line that is not a record is reported at once."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise InputError(f"audit log {path} does not exist") from None
    except OSError as exc:
        raise InputError(f"cannot read audit log {path}: {exc.strerror}") from None
    with handle:
        for number, raw in enumerate(handle, 1):
            if not raw.endswith(b"\n"):
                raise AuditChainError(f"line {number}: incomplete (no line end): an interrupted write, or the log "
                                      f"was cut")
            line = _parse(number, raw[:-1])
            if line is None:
                raise AuditChainError(f"line {number}: not an audit record (edited or damaged)")
            yield line


def _parse(number: int, raw: bytes) -> Line | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    seq, prev = record.get("seq"), record.get("prev")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return None
    if not isinstance(prev, str) or not _HEX64.match(prev):
        return None
    return Line(number, seq, prev, line_hash(raw))


def _diagnose(path: Path, number: int) -> str:
    """Why line `number` (the first that does not follow its predecessor) breaks the chain, from the whole file."""
    lines: dict[int, Line] = {}
    with path.open("rb") as handle:
        for index, raw in enumerate(handle, 1):
            parsed = _parse(index, raw.rstrip(b"\n"))
            if parsed is not None:
                lines[index] = parsed
    cur = lines[number]
    prev_line, before_prev, nxt = lines.get(number - 1), lines.get(number - 2), lines.get(number + 1)
    expected_seq = prev_line.seq + 1 if prev_line else 1
    expected_prev = prev_line.hash if prev_line else GENESIS
    copies = [other.number for other in lines.values() if other.hash == cur.hash and other.number != number]
    referenced = any(other.prev == cur.hash for other in lines.values())
    by_seq = {other.seq: other.number for other in reversed(lines.values())}
    found = f"sequence {cur.seq} where {expected_seq} was expected"
    # The chain goes on from the line before to the line after: this line does not belong here.
    if nxt is not None and nxt.prev == expected_prev and nxt.seq == expected_seq:
        if cur.prev == nxt.hash:
            return f"line {number}: out of order (swapped with line {number + 1})"
        if copies:
            return f"line {number}: inserted (a copy of line {copies[0]})"
        if referenced:
            return f"line {number}: out of order ({found}; moved here)"
        return f"line {number}: inserted (line {number + 1} follows {_name(number - 1)} directly)"
    # The line before joined the chain, but this one goes on from the line before that.
    if prev_line is not None and cur.seq == prev_line.seq and \
            cur.prev == (before_prev.hash if before_prev else GENESIS):
        return f"line {number - 1}: inserted (line {number} follows {_name(number - 2)} directly)"
    if copies:
        return f"line {number}: inserted (a copy of line {copies[0]})"
    if cur.prev == expected_prev:  # chained to the line before, so its own sequence number was changed
        return f"line {number}: edited (sequence {cur.seq}, expected {expected_seq})"
    if cur.seq != expected_seq and by_seq.get(expected_seq, number) != number:
        return f"line {number}: out of order ({found}; sequence {expected_seq} is at line {by_seq[expected_seq]})"
    if cur.seq > expected_seq:
        missing = cur.seq - expected_seq
        where = (f"sequence {expected_seq - 1} is followed by {cur.seq}" if expected_seq > 1
                 else f"the log starts at sequence {cur.seq}")
        return f"line {number}: {missing} line{'s' if missing > 1 else ''} deleted before it ({where})"
    if cur.seq == expected_seq:
        if prev_line is None:
            return "line 1: edited (its prev is not the start of a chain)"
        return f"line {number - 1}: edited (line {number} records another hash for it)"
    return f"line {number}: edited or out of place ({found})"


def _name(number: int) -> str:
    return f"line {number}" if number >= 1 else "the start of the log"

"""Checking an audit log's hash chain and sequence, and naming the first line where it breaks.

Each line's `prev` is the SHA-256 of the line before (GENESIS for the first) and `seq` counts from 1, so a
deleted, edited, inserted or moved line breaks the chain where it happened. The happy path streams the file;
only a broken chain is indexed whole, to tell a deletion from a move. A file started by `rotate()` opens with a
"continued" line that goes on from the previous file's head and sequence; given several files in order, each
must go on from the one before.

What a chain alone cannot show: a log rewritten from some line on with every `prev` recomputed, lines cut from
the end, or a log rewritten whole. Given the signing keys, `verify` checks the signed checkpoints in the log
(a rewritten chain no longer matches the head a checkpoint signed, and without the key no new one can be made)
and that no more lines than the checkpoint interval go by without one (removed checkpoints). Copies of
checkpoints taken off the host (the `keyseal._internal.audit` log lines) show a cut end or a replaced log: the log must
still hold the head each copy signed. `head=` does the same for one head recorded by hand.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from keyseal._internal.audit import checkpoint
from keyseal._internal.audit.log import GENESIS, line_hash
from keyseal.errors import AuditChainError, InputError
from keyseal.signer import PublicKey

__all__ = ["ChainReport", "Line", "read_copies", "verify_log"]

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Line:
    number: int
    seq: int
    prev: str
    hash: str
    kind: str | None = None
    record: Mapping[str, object] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class ChainReport:
    lines: int  # lines in the file(s)
    head: str  # the last line's hash (GENESIS for an empty log): what the next line's prev will be
    continued_from: str | None = None  # the head of a previous file the first line goes on from
    checkpoints: int = 0  # checkpoint lines (with keys: each one's signature checked)
    signed_checked: bool = False
    after_last_checkpoint: int = 0  # lines since the last checkpoint: not covered by one yet
    copies_checked: int = 0  # checkpoint copies from elsewhere that the log still holds


@dataclass
class _State:
    keys: Mapping[str, PublicKey] | None
    every: int
    wanted: dict[int, list[Mapping[str, object]]]  # copies by the sequence of the head they sign
    checkpoints: int = 0
    since: int = 0
    copies: int = 0
    last_seq: int = 0
    at: dict[int, Line] = field(default_factory=dict)  # lines whose sequence a copy names


def verify_log(path: Path | Sequence[Path], head: str | None = None, *,
               keys: Mapping[str, PublicKey] | None = None, every: int | None = None,
               copies: Sequence[Mapping[str, object]] = ()) -> ChainReport:
    """Check the chain of `path` (or of several files in order, oldest first); raise AuditChainError naming the
    first broken line (1-based), or if `head` (an earlier report's head) is no longer a line of the log.

    `keys` (by fingerprint): check every checkpoint's signature, and that no more lines than the interval go by
    without one: each checkpoint signs the interval that follows it; before the first, the first one's, or with
    none `every` (default $KEYSEAL_AUDIT_CHECKPOINT_LINES); `every=0` asks nothing of the lines before the first
    checkpoint (a log kept from before keyseal made them). `copies`: checkpoints taken from elsewhere (the log
    pipeline) that the log must still hold."""
    paths = [path] if isinstance(path, Path) else list(path)
    wanted = _normalize_head(head) if head is not None else None
    seen_head = wanted is None or wanted == GENESIS
    state = _State(keys, checkpoint.interval_lines() if every is None else every, {})
    for copy in copies:
        problem = checkpoint.problem(copy, keys) if keys is not None else None
        if problem is not None:
            raise AuditChainError(f"checkpoint copy made {copy.get('time')}: {problem}")
        lines = copy.get("lines")
        if isinstance(lines, int):
            state.wanted.setdefault(lines, []).append(copy)
            state.wanted.setdefault(lines + 1, [])
    count, last, continued_from = 0, GENESIS, None
    previous: tuple[Path, Line] | None = None
    for file in paths:
        before: list[Line] = []  # the two lines before the current one
        for line in _lines(file):
            if before:
                expected_seq, expected_prev = before[-1].seq + 1, before[-1].hash
            elif line.kind == checkpoint.CONTINUED and previous is None:
                expected_seq, expected_prev = line.seq, line.prev  # a rotated log given alone
                continued_from = line.prev
            elif previous is not None:
                if line.kind != checkpoint.CONTINUED or line.prev != previous[1].hash or \
                        line.seq != previous[1].seq + 1:
                    raise AuditChainError(f"{file}: line 1 does not go on from the head of {previous[0]}: the files "
                                          f"are not in order, or one between them is missing or was rewritten")
                expected_seq, expected_prev = line.seq, line.prev
            else:
                expected_seq, expected_prev = 1, GENESIS
            if line.seq != expected_seq or line.prev != expected_prev:
                raise AuditChainError(_diagnose(file, line.number))
            _check_checkpoint(state, file, line)
            before = [*before[-1:], line]
            count, last = count + 1, line.hash
            seen_head = seen_head or line.hash == wanted
        if before:
            previous = (file, before[-1])
    _check_end(state, previous[0] if previous else None)
    if not seen_head:
        raise AuditChainError(f"no line of the audit log has the head {wanted}: lines were cut from its end, or "
                              f"it was rewritten, after that head was recorded")
    _check_copies(state)
    return ChainReport(count, last, continued_from, state.checkpoints, keys is not None, state.since, state.copies)


def _check_checkpoint(state: _State, file: Path, line: Line) -> None:
    """A checkpoint line's signature (with keys), the number of lines since the last one, and the copies.

    Before the first checkpoint the interval is not known yet (an operator may have changed it): those lines
    are held to the interval the first checkpoint signs, or, with none at all, to `every`."""
    state.last_seq = line.seq
    if line.seq in state.wanted:
        state.at[line.seq] = line
    if line.kind != checkpoint.KIND:
        state.since += 1
        if state.keys is not None and state.checkpoints and state.every and state.since > state.every:
            raise AuditChainError(_gap(file, line.number, state.since, state.every))
        return
    if state.keys is not None:
        problem = checkpoint.problem(line.record, state.keys)
        if problem is not None:
            raise AuditChainError(f"{file}: line {line.number}: {problem}")
        every = line.record.get("every")
        signed_every = every if isinstance(every, int) and every > 0 else state.every
        if not state.checkpoints and state.every and state.since > signed_every:
            raise AuditChainError(_gap(file, line.number, state.since, signed_every))
        state.every = signed_every
    state.checkpoints += 1
    state.since = 0


def _check_end(state: _State, file: Path | None) -> None:
    """A log with no checkpoint at all, longer than the interval."""
    if state.keys is not None and not state.checkpoints and state.every and state.since > state.every:
        raise AuditChainError(_gap(file, None, state.since, state.every))


def _gap(file: Path | None, number: int | None, since: int, every: int) -> str:
    where = f"{file}: line {number}: " if number is not None else f"{file}: " if file is not None else ""
    return (f"{where}{since} lines without a checkpoint, where one is made every {every} lines: checkpoints were "
            f"removed, or the chain was rewritten (give --every 0 for lines written before keyseal made "
            f"checkpoints)")


def _check_copies(state: _State) -> None:
    """Each checkpoint copy's head must still be in the log, and the checkpoint itself after it."""
    for seq, found in sorted(state.wanted.items()):
        for copy in found:
            made = f"the checkpoint made {copy.get('time')} (sequence {copy.get('seq')})"
            if seq + 1 > state.last_seq:
                raise AuditChainError(
                    f"the log ends at sequence {state.last_seq}, but {made} signed {seq} lines: lines were cut "
                    f"from its end")
            head_line, own = state.at.get(seq), state.at.get(seq + 1)
            if head_line is None or own is None:
                continue  # older than the files given
            if head_line.hash != copy.get("prev") or own.record.get("signature") != copy.get("signature"):
                raise AuditChainError(f"line {head_line.number} (sequence {seq}) is not the line {made} signed: "
                                      f"the log was rewritten")
            state.copies += 1


def read_copies(path: Path) -> list[dict[str, object]]:
    """Checkpoints found in a text file: any line holding one's JSON (a log line `... audit {...}`, or the log
    itself)."""
    from keyseal._internal.inputfile import read_input

    found: list[dict[str, object]] = []
    for raw in read_input(path, "checkpoint file").splitlines():
        start = raw.find(b"{")
        if start < 0 or b'"checkpoint"' not in raw:
            continue
        try:
            record = json.loads(raw[start:])
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("kind") == checkpoint.KIND:
            found.append(record)
    if not found:
        raise InputError(f"no audit checkpoints in {path}")
    return found


def _normalize_head(head: str) -> str:
    value = head.strip().lower().removeprefix("sha256:")
    if not _HEX64.match(value):
        raise InputError(f"invalid head {head[:80]!r}: give the 64 hex digits keyseal audit verify printed")
    return value


def _lines(path: Path) -> Iterator[Line]:
    """Parse each line; a line that is not a record is reported at once."""
    try:
        handle = path.open("rb")
    except FileNotFoundError as exc:
        raise InputError(f"audit log {path} does not exist") from exc
    except OSError as exc:
        raise InputError(f"cannot read audit log {path}: {exc.strerror}") from exc
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
    kind = record.get("kind")
    if kind is None:
        return Line(number, seq, prev, line_hash(raw))
    return Line(number, seq, prev, line_hash(raw), str(kind), record)


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

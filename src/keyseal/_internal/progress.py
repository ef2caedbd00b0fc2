"""A progress bar on stderr for long work (a large file, many files, a bulk of entries), and nothing otherwise.

Shown only when stderr is a terminal, the work is long (at least `BYTES_THRESHOLD` bytes or more than
`ITEMS_THRESHOLD` items) and `keyseal -q` was not given: a script reading stderr, or a CI log, never sees one.
`tqdm` is imported only when a bar is shown, so short commands do not pay for it (`keyseal verify`'s fast path
does not import this module at all).

One bar at a time per process: `bytes_done()` (which filehash calls as it hashes, through its `on_bytes`
hook while a bar of bytes is shown) feeds the current one, from any thread.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["BYTES_THRESHOLD", "ITEMS_THRESHOLD", "bytes_done", "files_meter", "items_done", "meter", "set_quiet"]

BYTES_THRESHOLD = 64 << 20
ITEMS_THRESHOLD = 4

_quiet = False
_lock = threading.Lock()
_bar: Any = None  # the tqdm bar shown now, if any
_unit = ""


def set_quiet(quiet: bool) -> None:
    """`keyseal -q`: never show a bar."""
    global _quiet  # noqa: PLW0603 - one setting per process
    _quiet = quiet


def _shown(total: int, unit: str) -> bool:
    if _quiet or os.environ.get("KEYSEAL_PROGRESS", "").lower() == "off":
        return False
    try:
        if not sys.stderr.isatty():
            return False
    except (AttributeError, ValueError):
        return False
    return total >= BYTES_THRESHOLD if unit == "B" else total > ITEMS_THRESHOLD


@contextlib.contextmanager
def meter(total: int, unit: str, label: str, *, items: int = 0) -> Iterator[None]:
    """A bar over `total` `unit`s ("B" for bytes, else a noun such as "entry"), shown if the work is long. For
    bytes, `items` (a file count) above ITEMS_THRESHOLD shows one for small files too."""
    global _bar, _unit
    long_work = _shown(total, unit) or (unit == "B" and items > ITEMS_THRESHOLD and _shown(items, "item"))
    if not long_work or _bar is not None:
        yield
        return
    import shutil

    from tqdm import tqdm

    # The size from $COLUMNS / $LINES or the terminal, else 80x24: tqdm shows nothing on a terminal that reports
    # no size (0x0, as a new pseudo-terminal does).
    size = shutil.get_terminal_size()
    bar = tqdm(total=total, unit=unit, unit_scale=unit == "B", unit_divisor=1024 if unit == "B" else 1000,
               desc=label, file=sys.stderr, leave=False, ncols=size.columns, nrows=size.lines, mininterval=0.2)
    from keyseal._internal import filehash

    with _lock:
        _bar, _unit = bar, unit
    if unit == "B":
        filehash.on_bytes = bytes_done
    try:
        yield
    finally:
        filehash.on_bytes = None
        with _lock:
            _bar, _unit = None, ""
        bar.close()


def files_meter(paths: Sequence[os.PathLike[str] | str], label: str) -> contextlib.AbstractContextManager[None]:
    """A bar of bytes over these files (their sizes now; one that cannot be read counts as empty)."""
    total = 0
    for path in paths:
        with contextlib.suppress(OSError):
            total += os.stat(path).st_size
    return meter(total, "B", f"{label} {len(paths)} file{'s' if len(paths) != 1 else ''}", items=len(paths))


def _advance(count: int, unit_is_bytes: bool) -> None:
    bar = _bar
    if bar is not None and (_unit == "B") == unit_is_bytes:
        with _lock:
            bar.update(count)


def bytes_done(count: int) -> None:
    """`count` more bytes of the current bar's work are done (no-op without a bar)."""
    if _bar is not None:
        _advance(count, True)


def items_done(count: int = 1) -> None:
    """`count` more items of the current bar's work are done (no-op without a bar)."""
    if _bar is not None:
        _advance(count, False)

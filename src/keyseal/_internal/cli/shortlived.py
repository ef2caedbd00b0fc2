"""The garbage collector's part of a short command's cost, and how the short commands avoid it.

A verification builds tens of thousands of objects while it imports (`cryptography`, the verifier) and holds
nearly all of them until it exits. The cyclic collector walks them again and again as they are made, and the
interpreter's shutdown walks every one of them several more times; neither finds anything to free. Together that
was about a tenth of `keyseal verify` and `keyseal-gpg --verify` (callgrind: 131 M instructions against 115 M).
`ShortLived` turns the collector off while the command runs and freezes what it built before the exit (frozen
objects are never walked again), then turns the collector back on if it was on. Long-running commands (the
server, the agent) never come here.
"""

from __future__ import annotations

import gc

__all__ = ["ShortLived"]


class ShortLived:
    """`with ShortLived(): ...` around the whole of a short-lived process's work (it ends in `sys.exit`)."""

    __slots__ = ("_enabled",)

    def __init__(self) -> None:
        self._enabled = False

    def __enter__(self) -> None:
        self._enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        gc.freeze()
        if self._enabled:
            gc.enable()

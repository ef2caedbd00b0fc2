"""What the long-running commands (`server`, `agent`) share: their log format and their stop signals."""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType

__all__ = ["configure_logging", "on_stop_signals"]

_QUIET_LOGGERS = ("botocore", "boto3", "urllib3", "kubernetes")


class _UtcFormatter(logging.Formatter):
    """UTC timestamps, formatted once per second rather than once per line."""

    _cached: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        cached_second, text = self._cached
        if second != cached_second:
            text = time.strftime(datefmt or "%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
            self._cached = (second, text)
        return text


def configure_logging(level: str) -> None:
    """Service logs: one line per event, UTC timestamp, level, message (the message itself is never altered,
    so `Key wrapping via KMS keyARN=<arn>` can be matched exactly)."""
    # The format names no caller, thread or process, so records need not gather them: that halves the cost of
    # a line, and the server writes an audit line for every SVID it signs.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    formatter = _UtcFormatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%SZ")
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    for handler in root.handlers:
        handler.setFormatter(formatter)
    root.setLevel(level.upper())
    # The audit trail is not diagnostics: it reaches the log (the pod log, in a cluster) whatever the level.
    logging.getLogger("keyseal.audit").setLevel(logging.INFO)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def on_stop_signals(logger_name: str, stop: Callable[[], None]) -> None:
    """Log SIGTERM / SIGINT on `logger_name` and call `stop` (which must return promptly)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        logging.getLogger(logger_name).info("signal %d: shutting down", signum)
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)

"""Where the server's audit lines (one per SVID, on the `keyseal.audit` logger) go, and at what level.

A busy server signs thousands of SVIDs a minute: a console line each drowns everything else. The operator
chooses (server config `audit:`, docs/server-api.md):

- `level`: the level the lines are logged at (`info` by default; `debug` keeps them from an `info` console
  while a handler of the `keyseal.audit` logger that takes debug still gets every one);
- `console`: `lines` (every line on the console), `summary` (a count every `summaryInterval` instead) or `off`.
  `auto`, the default, is `summary` when the lines also go to an audit file (`KEYSEAL_AUDIT_LOG`, the
  hash-chained record) and `lines` otherwise, where the console is the only record.

Handlers attached to the `keyseal.audit` logger itself (a structured sink a program adds) are not filtered: only
the console handlers (the root logger's stream handlers) are.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

__all__ = ["AuditConsole", "AuditLogging", "console_mode"]

AUDIT_LOGGER = "keyseal.audit"
log = logging.getLogger("keyseal._internal.ca.server")  # the server's own log, beside its audit lines


@dataclass(frozen=True)
class AuditLogging:
    """The `audit:` section of the server configuration."""

    level: str = "info"
    console: str = "auto"  # auto, lines, summary, off
    summary_interval: timedelta = timedelta(minutes=1)


def console_mode(setting: AuditLogging, writes_file: bool) -> str:
    if setting.console != "auto":
        return setting.console
    return "summary" if writes_file else "lines"


class _Relevel(logging.Filter):
    """Logs each audit record at the configured level (keyseal._internal.audit.record emits them at INFO)."""

    def __init__(self, level: int, count: Callable[[logging.LogRecord], None]) -> None:
        super().__init__()
        self.level, self.level_name, self.count = level, logging.getLevelName(level), count

    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno, record.levelname = self.level, self.level_name
        self.count(record)
        return True


class _ConsoleAudit(logging.Filter):
    """On a console handler: audit lines only in `lines` mode, and only at or above the root logger's level
    (a record propagated from a child logger is not held to the root's level otherwise)."""

    def __init__(self, show: bool) -> None:
        super().__init__()
        self.show = show

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != AUDIT_LOGGER:
            return True
        return self.show and record.levelno >= logging.getLogger().getEffectiveLevel()


def _console_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


class AuditConsole:
    """The level and console routing of one server: `start()` installs them, `summarize()` logs (and resets)
    the counts, `close()` undoes everything (a process may run servers one after another, as tests do)."""

    def __init__(self, setting: AuditLogging, writes_file: bool) -> None:
        self.mode = console_mode(setting, writes_file)
        self.interval = setting.summary_interval.total_seconds()
        self._lock = threading.Lock()
        self._ok = self._failed = 0
        self._logger = logging.getLogger(AUDIT_LOGGER)
        level = logging.getLevelName(setting.level.upper())
        self._level = level if isinstance(level, int) else logging.INFO
        self._relevel = _Relevel(self._level, self._count)
        self._console = _ConsoleAudit(self.mode == "lines")
        self._handlers: list[logging.Handler] = []
        self._previous_level: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _count(self, record: logging.LogRecord) -> None:
        written = getattr(record, "audit", None)
        ok = isinstance(written, dict) and written.get("outcome") == "ok"
        with self._lock:
            if ok:
                self._ok += 1
            else:
                self._failed += 1

    def summarize(self) -> tuple[int, int]:
        """Log `audit: N signatures in the last ...` if there were any; returns (ok, failed) and resets them."""
        with self._lock:
            ok, failed = self._ok, self._failed
            self._ok = self._failed = 0
        if ok or failed:
            log.info("audit: %d signatures in the last %s (%d ok, %d failed)", ok + failed,
                     _span(self.interval), ok, failed)
        return ok, failed

    def start(self) -> None:
        """Install the level and the console filter; in summary mode, start the summary thread."""
        if self._previous_level is not None:
            return
        self._logger.addFilter(self._relevel)
        # audit.record makes a line only while INFO is enabled on its logger: enabled here whenever a line
        # is wanted (counted, shown at its level, or taken by a handler of that logger), and not otherwise, since
        # making one costs a JSON encoding per SVID. The console filter then applies the levels.
        self._previous_level = self._logger.level
        shown = self.mode == "lines" and self._level >= logging.getLogger().getEffectiveLevel()
        wanted = self.mode == "summary" or shown or bool(self._logger.handlers)
        self._logger.setLevel(logging.INFO if wanted else logging.WARNING)
        self._handlers = _console_handlers()
        for handler in self._handlers:
            handler.addFilter(self._console)
        if self.mode == "summary" and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="keyseal-audit-summary", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.summarize()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self._previous_level is None:
            return
        if self.mode == "summary":
            self.summarize()
        self._logger.removeFilter(self._relevel)
        self._logger.setLevel(self._previous_level)
        self._previous_level = None
        for handler in self._handlers:
            handler.removeFilter(self._console)
        self._handlers = []


def _span(seconds: float) -> str:
    whole = int(seconds)
    if whole % 3600 == 0:
        return f"{whole // 3600}h"
    if whole % 60 == 0:
        return f"{whole // 60}m"
    return f"{whole}s"

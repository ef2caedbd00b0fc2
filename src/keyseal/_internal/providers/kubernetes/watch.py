"""An informer for one plural of keyseal.dev: list once, then watch from the list's resourceVersion.

The Kubernetes contract it follows (the API server's, not an emulator's): a list answers with
`metadata.resourceVersion`; a watch from that version streams ADDED / MODIFIED / DELETED events after it, and,
with `allowWatchBookmarks`, BOOKMARK events that only advance the version. A watch ends when its
`timeoutSeconds` pass or the connection drops: it is resumed from the last version seen. Only a watch that
answers 410 Gone ("too old resource version": the API server compacted its history) makes the informer list
again, and replace its whole view by what the list says. Versions are opaque strings, never compared.

The informer keeps no object itself: it hands each one to `apply` (a name and the object, or None when deleted)
and a full list to `reset`, so its owner keeps only what it needs (memory proportional to that).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from keyseal._internal.providers.kubernetes.client import GROUP, VERSION
from keyseal._internal.providers.kubernetes.errors import is_client_error, status_of
from keyseal.errors import KeysealError

__all__ = ["Informer"]

log = logging.getLogger(__name__)

WATCH_SECONDS = 240  # asked of the API server per watch; it may end one sooner
RETRY_SECONDS = 1.0


class Informer:
    """Keeps an owner's view of one resource plural current: `start()` lists (errors raised to the caller),
    then a daemon thread watches until `stop()`."""

    def __init__(self, resources: Any, apply: Callable[[str, dict[str, Any] | None], None],
                 reset: Callable[[list[dict[str, Any]]], None]) -> None:
        self.resources = resources
        self.apply, self.reset = apply, reset
        self.version = ""
        self.lists = 0  # how often it listed (the first list included): for tests and metrics
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: Any = None
        self._lock = threading.Lock()

    def start(self) -> None:
        self._list()
        self._thread = threading.Thread(target=self._run, name=f"watch-{self.resources.plural}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            watch = self._watch
        if watch is not None:
            watch.stop()
            response = getattr(watch, "_resp", None)  # ends a read that waits for the next event
            if response is not None:
                with contextlib.suppress(Exception):  # closing from another thread: best effort
                    response.close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _list(self) -> None:
        items, version = self.resources.list_with_version()
        self.reset(items)
        self.version = version
        self.lists += 1

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self._watch_once()
            except Exception as exc:  # a watch thread must survive any failure
                if self._stopped.is_set():
                    return
                if is_client_error(exc) and status_of(exc) == 410:
                    log.info("watch of %s: resourceVersion %s is too old; listing again",
                             self.resources.where(), self.version)
                    self._relist()
                    continue
                log.warning("watch of %s ended (%s): resuming from resourceVersion %s", self.resources.where(),
                            str(exc)[:200] or type(exc).__name__, self.version)
                self._stopped.wait(RETRY_SECONDS)

    def _relist(self) -> None:
        while not self._stopped.is_set():
            try:
                self._list()
                return
            except KeysealError as exc:
                log.warning("cannot list %s again: %s", self.resources.where(), exc.message)
                self._stopped.wait(RETRY_SECONDS)

    def _watch_once(self) -> None:
        from kubernetes import watch

        stream = watch.Watch()
        with self._lock:
            if self._stopped.is_set():
                return
            self._watch = stream
        try:
            for event in stream.stream(self.resources.api.list_namespaced_custom_object, GROUP, VERSION,
                                       self.resources.namespace, self.resources.plural,
                                       resource_version=self.version, allow_watch_bookmarks=True,
                                       timeout_seconds=WATCH_SECONDS,
                                       _request_timeout=(10, WATCH_SECONDS + 60)):
                if self._stopped.is_set():
                    return
                self._take(event)
        finally:
            with self._lock:
                self._watch = None

    def _take(self, event: Any) -> None:
        if not isinstance(event, dict):
            return  # a blank line of the stream
        kind = event.get("type")
        obj = event.get("raw_object")
        if not isinstance(obj, dict):
            return
        metadata = obj.get("metadata") or {}
        version = metadata.get("resourceVersion")
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            name = str(metadata.get("name", ""))
            self.apply(name, obj if kind != "DELETED" else None)
        if isinstance(version, str) and version:
            self.version = version


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    """Poll `condition` for up to `seconds` (for callers that must see their own write in a watched view)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True

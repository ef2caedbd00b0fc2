"""A server TLS context from certificate and key files that is read again when the files change.

For the listeners third parties verify for the long term (OIDC discovery, the https_web federation endpoint):
their certificate comes from cert-manager or a public CA, not from the trust domain's rotating CA. No client
certificate is asked for: these endpoints are public. The files are looked at (stat) at most once a second,
and a change (cert-manager writes a renewed Secret, the kubelet swaps the mounted files) is loaded for the
next connection; a change that does not load (half written, key and certificate out of step) keeps the last
good context and is logged once, and is tried again at the next change.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from pathlib import Path

from keyseal.errors import InputError

__all__ = ["FileTlsContext"]

log = logging.getLogger(__name__)

CHECK_SECONDS = 1.0


def _stamp(path: Path) -> tuple[int, int, int]:
    try:
        info = os.stat(path)
    except OSError:
        return (0, 0, 0)
    return (info.st_ino, info.st_size, info.st_mtime_ns)


class FileTlsContext:
    """`context()` is the listener's per-connection context getter."""

    def __init__(self, cert_file: Path, key_file: Path, what: str) -> None:
        self.cert_file, self.key_file, self.what = cert_file, key_file, what
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._stamps = (_stamp(cert_file), _stamp(key_file))
        self._context = self._load()  # at startup a bad file is an error: nothing serves yet

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_NONE  # public: no client certificate is asked for
        context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_IGNORE_UNEXPECTED_EOF
        try:
            context.load_cert_chain(str(self.cert_file), str(self.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise InputError(f"cannot load the {self.what} TLS certificate {self.cert_file} / key "
                             f"{self.key_file}: {getattr(exc, 'strerror', None) or exc}") from exc
        return context

    def context(self) -> ssl.SSLContext:
        now = time.monotonic()
        if now - self._checked >= CHECK_SECONDS:
            self._reload_if_changed(now)
        return self._context

    def _reload_if_changed(self, now: float) -> None:
        with self._lock:
            self._checked = now
            stamps = (_stamp(self.cert_file), _stamp(self.key_file))
            if stamps == self._stamps:
                return
            self._stamps = stamps
            try:
                self._context = self._load()
            except InputError as exc:
                log.error("%s; still serving the previous certificate", exc.message)
                return
            log.info("loaded the renewed %s TLS certificate %s", self.what, self.cert_file)

"""PKCS#11 modules, tokens and the logged-in session, shared by everything that uses a token: the `pkcs11:`
signer (keyseal._internal.backends.pkcs11) and the CA's `pkcs11` custody, which keeps data objects beside its keys.

One logged-in read-only session per token per process, shared by every user of that token (PKCS#11 login state
is per application and token anyway), closed when the last user releases it and at interpreter exit. Every call
into a module holds that module's lock: python-pkcs11 initialises modules with C_Initialize(NULL), which
promises the module that the application never calls it from several threads at once. The PIN comes from
`pin-source=file:PATH`, `pin-value=` (warned about), `KEYSEAL_PKCS11_PIN`, or a prompt on a terminal; it is
never logged, stored, or put in a message (a keyed hash tells a second PIN apart from the logged-in one).
"""

from __future__ import annotations

import atexit
import getpass
import hashlib
import hmac
import logging
import os
import secrets
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keyseal._internal.providers.pkcs11 import uri as pkcs11uri
from keyseal._internal.providers.pkcs11.uri import Pkcs11URI
from keyseal.errors import (
    AccessDeniedError,
    BackendUnavailableError,
    InputError,
    KeyNotFoundError,
    KeyURIError,
    UsageError,
)

if TYPE_CHECKING:
    from types import ModuleType

    import pkcs11 as p11

__all__ = [
    "MODULE_ENV",
    "PIN_ENV",
    "TokenAccess",
    "TokenSession",
    "acquire_session",
    "close_all_sessions",
    "module_path",
    "python_pkcs11",
    "token_session",
]

log = logging.getLogger(__name__)

MODULE_ENV = "KEYSEAL_PKCS11_MODULE"
PIN_ENV = "KEYSEAL_PKCS11_PIN"


def python_pkcs11() -> ModuleType:
    """python-pkcs11, imported only when a pkcs11: key is used."""
    try:
        import pkcs11
    except ImportError as exc:
        raise BackendUnavailableError(
            "pkcs11: keys need python-pkcs11: install it with pip install 'keyseal[pkcs11]'"
        ) from exc
    return pkcs11


# ----------------------------------------------------------------------------------------------------
# Modules and sessions, shared by the whole process.


@dataclass(eq=False)
class _Module:
    path: str
    lib: Any  # pkcs11.lib
    lock: threading.RLock = field(default_factory=threading.RLock)


@dataclass(eq=False)
class TokenSession:
    """A logged-in session on one token, shared by every signer on it, reference counted."""

    module: _Module
    key: tuple[str, int]
    label: str
    token: p11.Token
    session: p11.Session
    pin_mac: bytes | None
    refs: int = 0
    closed: bool = False

    def release(self) -> None:
        with self.module.lock:
            if self.closed:
                return
            self.refs -= 1
            if self.refs <= 0:
                self.close()

    def close(self) -> None:
        """Log out and close; errors are logged, not raised (this runs on error paths and at exit)."""
        with self.module.lock:
            if self.closed:
                return
            self.closed = True
            with _REGISTRY_LOCK:
                if _SESSIONS.get(self.key) is self:
                    del _SESSIONS[self.key]
            try:
                self.session.close()
            except Exception as exc:  # a removed token or a finalised module: nothing left to release
                log.info("closing the session on PKCS#11 token %r failed: %s", self.label, type(exc).__name__)
            else:
                log.info("closed the session on PKCS#11 token %r", self.label)


_REGISTRY_LOCK = threading.Lock()
_MODULES: dict[str, _Module] = {}
_SESSIONS: dict[tuple[str, int], TokenSession] = {}
# Compares a PIN with the one a shared session logged in with, without keeping the PIN.
_PIN_MAC_KEY = secrets.token_bytes(32)


def _pin_mac(pin: str | None) -> bytes | None:
    return None if pin is None else hmac.new(_PIN_MAC_KEY, pin.encode(), hashlib.sha256).digest()


@atexit.register
def close_all_sessions() -> None:
    """Log out of and close every session this process opened (also registered to run at exit)."""
    with _REGISTRY_LOCK:
        sessions = list(_SESSIONS.values())
    for token_session in sessions:
        token_session.close()


def module_path(uri: Pkcs11URI) -> str:
    """`module-path=` from the URI, else KEYSEAL_PKCS11_MODULE."""
    if "module-name" in uri.query:
        raise KeyURIError(
            f"module-name= is not supported in {uri.redacted()!r}: give module-path=/path/to/module.so "
            f"or set {MODULE_ENV}"
        )
    path = uri.query.get("module-path") or os.environ.get(MODULE_ENV)
    if not path:
        raise UsageError(
            f"no PKCS#11 module for {uri.redacted()!r}: add module-path=/path/to/module.so to the URI "
            f"or set {MODULE_ENV}"
        )
    return path


def _load_module(path: str) -> _Module:
    with _REGISTRY_LOCK:
        module = _MODULES.get(path)
        if module is not None:
            return module
        if not os.path.exists(path):
            raise BackendUnavailableError(
                f"PKCS#11 module {path} does not exist: fix module-path= or {MODULE_ENV}"
            )
        if not os.path.isfile(path):
            raise BackendUnavailableError(f"PKCS#11 module {path} is not a file: give the module's .so path")
        pkcs11 = python_pkcs11()
        try:
            lib = pkcs11.lib(path)
        except pkcs11.PKCS11Error as exc:
            detail = str(exc)
            if detail.startswith(("OS exception", "Unknown exception")):
                reason = detail.rpartition(": ")[2] or "cannot be loaded"
                raise BackendUnavailableError(
                    f"{path} is not a PKCS#11 module ({reason}): fix module-path= or {MODULE_ENV}"
                ) from exc
            raise BackendUnavailableError(
                f"PKCS#11 module {path} failed to initialise ({type(exc).__name__}): check the module's "
                "configuration (for SoftHSM, SOFTHSM2_CONF and its token directory)"
            ) from exc
        module = _MODULES[path] = _Module(path, lib)
        log.info("loaded PKCS#11 module %s (%s)", path, lib.manufacturer_id)
        return module


def _token_serial(token: p11.Token) -> str:
    serial = token.serial
    if isinstance(serial, bytes):
        return serial.rstrip(b" \0").decode(errors="replace")
    return str(serial).strip()


def _find_token(module: _Module, uri: Pkcs11URI) -> p11.Token:
    """The one initialised token the URI's token/slot/library attributes match."""
    pkcs11 = python_pkcs11()
    lib = module.lib
    want = uri.path
    library_checks = {
        "library-manufacturer": lib.manufacturer_id,
        "library-description": lib.library_description,
    }
    for name, actual in library_checks.items():
        if name in want and want[name] != actual:
            raise KeyNotFoundError(f"PKCS#11 module {module.path} has {name} {actual!r}, not {want[name]!r}")
    if "library-version" in want:
        major, _, minor = str(want["library-version"]).partition(".")
        if (int(major), int(minor or 0)) != tuple(lib.library_version):
            raise KeyNotFoundError(
                f"PKCS#11 module {module.path} is not library-version {want['library-version']!r}"
            )
    matches: list[p11.Token] = []
    seen: list[str] = []
    try:
        slots = lib.get_slots(token_present=True)
        for slot in slots:
            if "slot-id" in want and slot.slot_id != int(str(want["slot-id"])):
                continue
            if "slot-description" in want and slot.slot_description != want["slot-description"]:
                continue
            if "slot-manufacturer" in want and slot.manufacturer_id != want["slot-manufacturer"]:
                continue
            try:
                token = slot.get_token()
            except (pkcs11.TokenNotPresent, pkcs11.TokenNotRecognised):
                continue
            if not token.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED:
                continue
            seen.append(token.label)
            checks = {
                "token": token.label,
                "manufacturer": token.manufacturer_id,
                "model": token.model,
                "serial": _token_serial(token),
            }
            if all(want[name] == actual for name, actual in checks.items() if name in want):
                matches.append(token)
    except pkcs11.PKCS11Error as exc:
        raise BackendUnavailableError(
            f"PKCS#11 module {module.path} cannot list its tokens ({type(exc).__name__})"
        ) from exc
    wanted = " ".join(f"{n}={want[n]!r}" for n in pkcs11uri.PATH_ATTRIBUTES
                      if n in want and n not in ("object", "id", "type")) or "(any token)"
    if not matches:
        present = ", ".join(repr(label) for label in seen) or "none"
        raise KeyNotFoundError(
            f"no PKCS#11 token matches {wanted} in module {module.path} (initialised tokens: {present})"
        )
    if len(matches) > 1:
        raise KeyURIError(
            f"{len(matches)} PKCS#11 tokens match {wanted} in module {module.path}: "
            "add token=LABEL (or serial=, slot-id=) to the URI"
        )
    return matches[0]


def _read_pin_source(source: str) -> str:
    """`pin-source=file:/path` (also `file:///path`, or a plain absolute path): the first line of the file."""
    if source.startswith("file:"):
        location = source[len("file:"):]
        if location.startswith("//"):
            host, slash, rest = location[2:].partition("/")
            if host not in ("", "localhost") or not slash:
                raise KeyURIError("pin-source must be a local file: write pin-source=file:/path/to/pin")
            location = "/" + rest
    elif source.startswith("/"):
        location = source
    else:
        raise KeyURIError("pin-source must name a file: write pin-source=file:/path/to/pin")
    try:
        data = Path(location).read_bytes()
    except FileNotFoundError as exc:
        raise InputError(f"PIN file {location} (pin-source) does not exist") from exc
    except OSError as exc:
        raise InputError(f"cannot read PIN file {location} (pin-source): {exc.strerror}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"PIN file {location} (pin-source) is not UTF-8 text") from exc
    pin = text.split("\n", 1)[0].removesuffix("\r")
    if not pin:
        raise InputError(f"PIN file {location} (pin-source) is empty: put the user PIN on its first line")
    return pin


def _configured_pin(uri: Pkcs11URI) -> str | None:
    """The PIN from the URI or the environment, without prompting."""
    if "pin-value" in uri.query:
        log.warning(
            "pin-value= in a PKCS#11 URI shows the PIN in process listings and shell history: "
            "use pin-source=file:PATH or %s instead", PIN_ENV,
        )
        return uri.query["pin-value"]
    if "pin-source" in uri.query:
        return _read_pin_source(uri.query["pin-source"])
    return os.environ.get(PIN_ENV) or None


def _prompt_pin(label: str) -> str:
    if sys.stdin is None or not sys.stdin.isatty():
        raise UsageError(
            f"PKCS#11 token {label!r} needs a user PIN: set {PIN_ENV}, add pin-source=file:/path/to/pin "
            "to the URI, or run in a terminal to be asked"
        )
    try:
        pin = getpass.getpass(f"User PIN for PKCS#11 token {label!r}: ")
    except EOFError:
        pin = ""
    if not pin:
        raise UsageError(f"no PIN entered for PKCS#11 token {label!r}")
    return pin


def acquire_session(uri: Pkcs11URI) -> TokenSession:
    """The shared logged-in session on the URI's token, opening (and logging in to) it if needed."""
    pkcs11 = python_pkcs11()
    module = _load_module(module_path(uri))
    with module.lock:
        token = _find_token(module, uri)
        label = token.label
        key = (module.path, int(token.slot.slot_id))
        needs_login = bool(token.flags & pkcs11.TokenFlag.LOGIN_REQUIRED)
        with _REGISTRY_LOCK:
            shared = _SESSIONS.get(key)
        if shared is not None and not shared.closed:
            pin = _configured_pin(uri) if needs_login else None
            if (pin is not None and shared.pin_mac is not None
                    and not hmac.compare_digest(_pin_mac(pin) or b"", shared.pin_mac)):
                raise AccessDeniedError(
                    f"wrong PIN for PKCS#11 token {label!r}: it is not the PIN this process logged in with"
                )
            shared.refs += 1
            return shared
        user_pin: Any = None
        pin_text: str | None = None
        if needs_login:
            pin_text = _configured_pin(uri)
            if pin_text is None and token.flags & pkcs11.TokenFlag.PROTECTED_AUTHENTICATION_PATH:
                user_pin = pkcs11.PROTECTED_AUTH
                log.info("PKCS#11 token %r authenticates on its own PIN pad", label)
            else:
                user_pin = pin_text = pin_text if pin_text is not None else _prompt_pin(label)
        try:
            session = token.open(user_pin=user_pin)
        except (pkcs11.PinIncorrect, pkcs11.PinInvalid, pkcs11.PinLenRange) as exc:
            raise AccessDeniedError(
                f"wrong PIN for PKCS#11 token {label!r}: check pin-source, {PIN_ENV} or what you typed"
            ) from exc
        except (pkcs11.PinLocked, pkcs11.PinExpired) as exc:
            state = "locked" if isinstance(exc, pkcs11.PinLocked) else "expired"
            raise AccessDeniedError(
                f"the user PIN of PKCS#11 token {label!r} is {state}: "
                "the token's security officer must reset it"
            ) from exc
        except pkcs11.UserAlreadyLoggedIn:
            # Someone else in this process logged in to the token: the login state is shared, so just use it.
            session = token.open()
        except pkcs11.PKCS11Error as exc:
            raise BackendUnavailableError(
                f"cannot open a session on PKCS#11 token {label!r} ({type(exc).__name__})"
            ) from exc
        log.info("logged in to PKCS#11 token %r (module %s)", label, module.path)
        shared = TokenSession(module, key, label, token, session, _pin_mac(pin_text), refs=1)
        with _REGISTRY_LOCK:
            _SESSIONS[key] = shared
        return shared


# ----------------------------------------------------------------------------------------------------
# The logged-in session, for callers that manage objects besides signing keys.


@dataclass(frozen=True)
class TokenAccess:
    """The process's logged-in session on one token, used under the module's lock (see `token_session`)."""

    pkcs11: Any  # the python-pkcs11 module: Attribute, ObjectClass, errors
    token: p11.Token
    session: p11.Session
    label: str


@contextmanager
def token_session(uri: str) -> Iterator[TokenAccess]:
    """Hold the shared logged-in session of the URI's token and its module lock for the `with` block.

    For callers that read or write objects of their own (the CA keeps a data object per keyset): the same
    login, PIN handling and error messages as signing. Writes need `access.token.open(rw=True)`, which the
    shared login covers.
    """
    parsed = pkcs11uri.parse(uri)
    pkcs11 = python_pkcs11()
    shared = acquire_session(parsed)
    try:
        with shared.module.lock:
            yield TokenAccess(pkcs11, shared.token, shared.session, shared.label)
    finally:
        shared.release()

"""One registry shape for everything keyseal picks by name: signers (key URI schemes), KEKs (`--kek` schemes)
and CA custodies (`custody:` in the server configuration).

A registry maps a name to a `"module:attribute"` string. Nothing is imported until a name is used, so opening
a `file:` key never imports boto3, and no registry imports the modules it names (which is what lets those
modules import the base classes beside the registry without a cycle).

Other packages add names through entry points (groups `keyseal.signers`, `keyseal.keks`, `keyseal.custodies`),
e.g. in their pyproject.toml:

    [project.entry-points."keyseal.signers"]
    gcpkms = "keyseal_gcp.signer:open"

Built-ins win: an entry point that reuses a built-in name is ignored (with a warning), so installing a package
can never change what `awskms:` or `custody: kms` means. Two packages registering the same new name are
refused, since keyseal cannot know which one the user meant. Entry points are read only when a name is not a
built-in (or to list the known names in an error), so the common case costs no metadata scan.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from keyseal.errors import KeysealError, KeyURIError, UsageError

__all__ = ["CUSTODIES", "KEKS", "SIGNERS", "Registry"]

log = logging.getLogger(__name__)


class Registry:
    """Names -> lazily imported objects: built-ins first, then entry points of `group`."""

    def __init__(self, what: str, group: str, builtins: Mapping[str, str],
                 error: type[KeysealError] = UsageError) -> None:
        self.what = what  # for messages: "key URI scheme", "KEK", "custody"
        self.group = group
        self.error = error  # the type of an unknown name's error
        self._builtins = dict(builtins)
        self._plugins: dict[str, list[EntryPoint]] | None = None
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _entry_points(self) -> dict[str, list[EntryPoint]]:
        with self._lock:
            if self._plugins is None:
                found: dict[str, list[EntryPoint]] = {}
                builtin = {name.casefold() for name in self._builtins}
                for point in entry_points(group=self.group):
                    # AWSKMS or File would answer a user who mistyped the case of a built-in: refused alike.
                    if point.name.casefold() in builtin:
                        log.warning("ignoring the %s entry point %r of %s: %r is a built-in %s", self.group,
                                    point.value, _distribution(point), point.name, self.what)
                        continue
                    found.setdefault(point.name, []).append(point)
                self._plugins = found
            return self._plugins

    def refresh(self) -> None:
        """Forget the entry points read and the objects loaded: for a package installed while running."""
        with self._lock:
            self._plugins = None
            self._loaded.clear()

    def names(self) -> tuple[str, ...]:
        """Every known name, sorted: built-ins and those other packages register."""
        return tuple(sorted({*self._builtins, *self._entry_points()}))

    def builtin_names(self) -> tuple[str, ...]:
        return tuple(sorted(self._builtins))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._builtins or name in self._entry_points())

    def load(self, name: str) -> Any:
        """The object registered as `name`, imported on first use. Unknown: a UsageError listing the names."""
        cached = self._loaded.get(name)
        if cached is not None:
            return cached
        target = self._builtins.get(name)
        if target is not None:
            module, _, attribute = target.partition(":")
            loaded = getattr(importlib.import_module(module), attribute)
        else:
            loaded = self._load_plugin(name)
        self._loaded[name] = loaded
        return loaded

    def _load_plugin(self, name: str) -> Any:
        points = self._entry_points().get(name)
        if not points:
            raise self.unknown(name)
        if len(points) > 1:
            owners = ", ".join(sorted(_distribution(p) for p in points))
            raise UsageError(f"the {self.what} {name!r} is registered by several packages ({owners}): uninstall "
                             "all but one")
        point = points[0]
        try:
            return point.load()
        except Exception as exc:  # a broken plugin: one line naming it, not a traceback
            raise UsageError(f"cannot load the {self.what} {name!r} from {_distribution(point)} ({point.value}): "
                             f"{type(exc).__name__}: {exc}") from exc

    def unknown(self, name: str) -> KeysealError:
        """The one-line error for a name nobody registered (the name is cut short: it may hold a secret)."""
        return self.error(f"unknown {self.what} {name[:32]!r}: use one of {', '.join(self.names())}")


def _distribution(point: EntryPoint) -> str:
    dist = getattr(point, "dist", None)
    return str(getattr(dist, "name", None) or "an installed package")


# `open(uri, rest, options: BackendOptions) -> Signer`; `rest` is the URI after `scheme:`.
SIGNERS = Registry("key URI scheme", "keyseal.signers", {
    "file": "keyseal._internal.backends.file:open",
    "awskms": "keyseal._internal.backends.awskms:open",
    "pkcs11": "keyseal._internal.backends.pkcs11:open",
    "hashivault": "keyseal._internal.backends.hashivault:open",
    "vault": "keyseal._internal.backends.hashivault:open",  # alias of hashivault://
}, error=KeyURIError)

# `open(spec, rest, options: KekOptions) -> KekProvider`; `rest` is the spec after `scheme:` ("" for `local`).
KEKS = Registry("KEK", "keyseal.keks", {
    "local": "keyseal._internal.wrapping.local:open",
    "awskms": "keyseal._internal.wrapping.awskms:open",
    "vault": "keyseal._internal.wrapping.vault:open",
    "hashivault": "keyseal._internal.wrapping.vault:open",  # the signing-key spelling, accepted for KEKs too
})

# `open(config: Config, kube_api_client) -> KeysetSource`.
CUSTODIES = Registry("custody", "keyseal.custodies", {
    "wrapped": "keyseal._internal.ca.custody.wrapped:open",
    "kms": "keyseal._internal.ca.custody.kms:open",
    "pkcs11": "keyseal._internal.ca.custody.pkcs11:open",
})

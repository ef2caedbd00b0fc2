"""Registration entries (selectors -> SPIFFE ID, under a parent agent) and one-time agent join tokens.

They live beside the server's key records, in the store `store.type` names; `entry_store_for` and
`join_tokens_for` pick the implementation. Entries are not secrets; a join token is kept only as its SHA-256.

Directory store: entries in a SQLite database (`<recordPrefix>-entries.db`, see `ca.registry.sqlite`), join
tokens and joined agents (when their SVIDs expire) in JSON files (`<recordPrefix>-join-tokens.json`,
`<recordPrefix>-agents.json`, mode 0600). A change to those is a read-modify-write under an exclusive lock on the
file, written atomically, so the `keyseal entry` CLI and a running server (which redeems tokens) never lose each
other's writes. The server re-reads a file only when its modification time or size changes.

Kubernetes store: one custom resource per entry and per token (see `keyseal._internal.ca.registry.kubernetes`).
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from keyseal._internal.atomic import write_atomic
from keyseal._internal.records.record import format_time
from keyseal._internal.spiffe.entry import (
    AGENT_PATH,
    ENTRY_ID_RE,
    MAX_DNS_NAMES,
    MAX_ENTRY_TTL,
    MAX_FEDERATES_WITH,
    MAX_SELECTORS,
    Entry,
    check_dns_name,
    check_dns_names,
    check_selector,
    is_served,
)
from keyseal._internal.spiffe.ids import RESERVED_PATH, SpiffeIdError, check_trust_domain, is_reserved, parse_spiffe_id
from keyseal.errors import InputError, UsageError

__all__ = [
    "AGENT_PATH",
    "ENTRY_ID_RE",
    "MAX_DNS_NAMES",
    "AgentRegistry",
    "AgentStillActiveError",
    "DirectoryAgentRegistry",
    "DirectoryJoinTokens",
    "Entry",
    "EntryStore",
    "JoinTokens",
    "Progress",
    "check_dns_name",
    "check_dns_names",
    "check_selector",
    "is_served",
    "token_digest",
]

log = logging.getLogger(__name__)

_AGENT_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
Progress = Callable[[int], None]  # told how many more entries of a batch are done


class _JsonFile:
    """A small JSON document with locked read-modify-write and an mtime-based read cache."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._cache: tuple[tuple[int, int], Any] | None = None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _load(self) -> Any:
        try:
            return json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {self.path}: {exc}; fix or remove the file") from exc

    def read(self) -> Any:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return {}
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = self._cache
        if cached is not None and cached[0] == stamp:
            return cached[1]
        data = self._load()
        self._cache = (stamp, data)
        return data

    def change(self, produce: Callable[[Any], Any]) -> Any:
        """Run `produce` on the document under the lock, and write it back if `produce` changed it."""
        with self._lock, self._locked():
            data = self._load()
            before = json.dumps(data, sort_keys=True)
            result = produce(data)
            if json.dumps(data, sort_keys=True) != before:
                write_atomic(self.path, json.dumps(data, indent=2, sort_keys=True).encode() + b"\n", mode=0o600)
                self._cache = None
            return result


class EntryStore(abc.ABC):
    """The registration entries of one trust domain; creating checks them the same way for every store."""

    def __init__(self, trust_domain: str) -> None:
        self.trust_domain = trust_domain

    @abc.abstractmethod
    def entries(self) -> list[Entry]:
        """Every entry, in a stable order."""

    @abc.abstractmethod
    def _add(self, entry: Entry) -> Entry:
        """Store a checked entry, unless one gives the same SPIFFE ID to the same parent and selectors (a
        UsageError naming it); returns the entry as stored."""

    @abc.abstractmethod
    def delete(self, entry_id: str) -> None:
        """Remove an entry; an unknown ID is a UsageError."""

    def for_agent(self, agent_id: str) -> list[Entry]:
        """The entries this agent may serve, sorted by ID; stores answer from an index (see entry_index)."""
        return [e for e in self.entries() if e.parented_by(agent_id) and is_served(e)]

    def close(self) -> None:
        """Stop whatever the store runs in the background (a Kubernetes store's watch); most run nothing."""
        return

    def get(self, entry_id: str) -> Entry | None:
        """The entry, unless it names a reserved ID: an entry written before that rule, or by hand into the
        store, must never hand a workload the identity of the server or of an agent."""
        return next((e for e in self.entries() if e.entry_id == entry_id and is_served(e)), None)

    def _check_id(self, text: str, what: str) -> str:
        spiffe_id = parse_spiffe_id(text)
        if spiffe_id.trust_domain != self.trust_domain:
            raise SpiffeIdError(f"{what} {spiffe_id} is not in trust domain {self.trust_domain}")
        if not spiffe_id.path:
            raise SpiffeIdError(f"{what} {spiffe_id} needs a path")
        return str(spiffe_id)

    def check(self, entry: Entry) -> Entry:
        """The entry in canonical form (sorted selectors), or a typed error: what `create` accepts."""
        spiffe_id = self._check_id(entry.spiffe_id, "SPIFFE ID")
        if is_reserved(parse_spiffe_id(spiffe_id).path):
            raise SpiffeIdError(f"{spiffe_id} is reserved for the keyseal server and its node agents "
                                f"({RESERVED_PATH}/...): give workloads another path")
        parent_id = self._check_id(entry.parent_id, "parent")
        if not entry.selectors or len(entry.selectors) > MAX_SELECTORS:
            raise UsageError(f"give 1 to {MAX_SELECTORS} selectors (--selector unix:uid:1000)")
        selectors = tuple(sorted({check_selector(s) for s in entry.selectors}))
        if entry.x509_ttl < 0 or entry.jwt_ttl < 0:
            raise UsageError("TTLs must be positive")
        if max(entry.x509_ttl, entry.jwt_ttl) > MAX_ENTRY_TTL:
            raise UsageError(f"TTLs are at most {MAX_ENTRY_TTL} seconds (a year): an SVID lives no longer than its "
                             f"CA anyway")
        return Entry(entry.entry_id, spiffe_id, parent_id, selectors, entry.x509_ttl, entry.jwt_ttl,
                     self._check_federates_with(entry.federates_with), check_dns_names(entry.dns_names))

    def _check_federates_with(self, names: tuple[str, ...]) -> tuple[str, ...]:
        if len(names) > MAX_FEDERATES_WITH:
            raise UsageError(f"an entry federates with at most {MAX_FEDERATES_WITH} trust domains")
        for name in names:
            check_trust_domain(name)
            if name == self.trust_domain:
                raise UsageError(f"--federates-with {name}: that is this server's own trust domain")
        return tuple(sorted(set(names)))

    def create(self, spiffe_id: str, parent_id: str, selectors: tuple[str, ...], x509_ttl: int = 0,
               jwt_ttl: int = 0, federates_with: tuple[str, ...] = (), dns_names: tuple[str, ...] = ()) -> Entry:
        return self._add(self.check(Entry(secrets.token_hex(8), spiffe_id, parent_id, selectors, x509_ttl,
                                          jwt_ttl, federates_with, dns_names)))

    def new_id(self, entry: Entry) -> str:
        """The ID a created entry gets when none is given."""
        return secrets.token_hex(8)

    def prepare(self, entries: list[Entry], labels: list[str] | None = None) -> list[Entry]:
        """Check a batch before any of it is written: each entry as `check` does (a missing ID gets a new one),
        and no two with the same ID or meaning. An error starts with the entry's label (default: its place in
        the batch, from 1)."""
        labels = labels or [str(n) for n in range(1, len(entries) + 1)]
        checked: list[Entry] = []
        ids: dict[str, str] = {}
        meanings: dict[tuple[str, str, tuple[str, ...]], str] = {}
        for label, given in zip(labels, entries, strict=True):
            try:
                if given.entry_id and not ENTRY_ID_RE.fullmatch(given.entry_id):
                    raise UsageError(f"entry_id {given.entry_id[:70]!r}: use 1-63 lower-case letters, digits, "
                                     f"'.' or '-', or leave it out")
                entry = self.check(given)
                if not entry.entry_id:
                    entry = replace(entry, entry_id=self.new_id(entry))
                meaning = (entry.spiffe_id, entry.parent_id, entry.selectors)
                if entry.entry_id in ids:
                    raise UsageError(f"entry_id {entry.entry_id} is given twice (first at {ids[entry.entry_id]})")
                if meaning in meanings:
                    raise UsageError(f"the same entry as at {meanings[meaning]}")
            except (UsageError, SpiffeIdError) as exc:
                raise type(exc)(f"{label}: {exc}") from exc
            ids[entry.entry_id], meanings[meaning] = label, label
            checked.append(entry)
        return checked

    def create_many(self, entries: list[Entry], labels: list[str] | None = None,
                    progress: Progress | None = None) -> list[Entry]:
        """Create a batch, checked whole before the first write (see `prepare` and `_add_many`). `progress` is
        called with 1 after each entry written (e.g. keyseal._internal.progress.items_done for a bar)."""
        labels = labels or [str(n) for n in range(1, len(entries) + 1)]
        return self._add_many(self.prepare(entries, labels), labels, progress)

    def _add_many(self, entries: list[Entry], labels: list[str], progress: Progress | None = None) -> list[Entry]:
        """Store checked entries; a duplicate of a stored entry refuses the batch (as far as the store can),
        with an error that starts with the entry's label."""
        added = []
        for label, entry in zip(labels, entries, strict=True):
            try:
                added.append(self._add(entry))
            except UsageError as exc:
                raise UsageError(f"{label}: {exc}") from exc
            if progress is not None:
                progress(1)
        return added

    def delete_many(self, entry_ids: list[str], progress: Progress | None = None) -> None:
        """Delete these entries (`progress` as for `create_many`)."""
        for entry_id in entry_ids:
            self.delete(entry_id)
            if progress is not None:
                progress(1)

    def matching(self, selectors: tuple[str, ...], parent_id: str | None = None) -> list[Entry]:
        """The entries that have all these selectors (and this parent, if given): what `delete --selector`
        removes."""
        wanted = {check_selector(s) for s in selectors}
        return [e for e in self.entries() if wanted <= set(e.selectors)
                and (parent_id is None or e.parent_id == parent_id)]


DEFAULT_JOIN_TOKEN_MAX_TTL = timedelta(hours=1)
CLOCK_SKEW = timedelta(minutes=5)  # between the machine that issued a token and the server


@dataclass(frozen=True)
class StoredToken:
    """A join token as stored: whom it joins, until when it says it is good, and when the store says it was
    created (None if the store does not know). Nothing a token says lets it replace a running agent: whoever
    may create tokens could say it."""

    agent_id: str
    expires: datetime
    created: datetime | None


class AgentStillActiveError(UsageError):
    """A join token names an agent whose X.509-SVID has not expired (and that the store was not told to forget)."""


class AgentRegistry(abc.ABC):
    """The agents the server issued an X.509-SVID to, and when the newest one expires: what lets a join token for
    a running agent be refused. Written at every join and renewal."""

    @abc.abstractmethod
    def svid_expiry(self, agent_id: str) -> datetime | None:
        """When the newest SVID issued to the agent expires; None if it never joined (or the record was lost)."""

    @abc.abstractmethod
    def issued(self, agent_id: str, expires: datetime) -> None:
        """Remember that an SVID lasting until `expires` was issued to the agent (never moves backwards)."""

    @abc.abstractmethod
    def forget(self, agent_id: str) -> bool:
        """Drop the agent's record (whether there was one), so a join token for it is accepted while its SVID
        lasts: what `keyseal entry join-token --replace` does with the store's administrator's access."""

    def check(self) -> None:
        """Raise (one line) if the registry cannot be read at all, so the server fails closed at start."""
        return None


class JoinTokens(abc.ABC):
    """One-time agent join tokens: only their SHA-256 is stored; redeeming one removes it.

    Whoever can write a token can make one for any agent with any expiry, so the server decides how long a token
    lives (`max_ttl` from its creation, whatever it says) and refuses one for an agent that still holds an
    unexpired SVID (`registry`) until an administrator makes the registry forget that agent."""

    def __init__(self, trust_domain: str, max_ttl: timedelta = DEFAULT_JOIN_TOKEN_MAX_TTL,
                 registry: AgentRegistry | None = None) -> None:
        self.trust_domain = trust_domain
        self.max_ttl = max_ttl
        self.registry = registry

    @abc.abstractmethod
    def _add(self, digest: str, agent_id: str, expires: datetime, now: datetime) -> None:
        """Store a token by its SHA-256 (hex)."""

    @abc.abstractmethod
    def _peek(self, digest: str, now: datetime) -> str | None:
        """The agent ID of the token with this SHA-256 if it is stored and unexpired, changing nothing."""

    @abc.abstractmethod
    def _take(self, digest: str, now: datetime) -> StoredToken | None:
        """Remove the token with this SHA-256 and return it, at most once over all callers; None when it is
        unknown or already taken (expired ones may be removed on the way)."""

    def issue(self, agent_name: str, ttl: timedelta, now: datetime | None = None, *,
              replace: bool = False) -> tuple[str, str]:
        """A new token and the SPIFFE ID the agent that redeems it will have. With `replace`, the registry first
        forgets the agent (this needs the store access that token creators are not given), so the token is
        accepted even though the agent still holds an SVID."""
        if not _AGENT_NAME_RE.fullmatch(agent_name):
            raise UsageError("agent name: 1-128 letters, digits, '.', '_' or '-' (e.g. the node name)")
        if agent_name == "k8s_psat":  # the parent of the agents attested by service account tokens
            raise UsageError("agent name k8s_psat is reserved for agents that join with Kubernetes service account "
                             "tokens")
        if ttl <= timedelta(0):
            raise UsageError("the join token TTL must be positive (e.g. --ttl 10m)")
        if ttl > self.max_ttl:
            raise UsageError(f"the join token TTL is at most {int(self.max_ttl.total_seconds())}s "
                             f"(agents.joinTokenMaxTTL): the server honours a token no longer")
        token = secrets.token_urlsafe(32)
        agent_id = f"spiffe://{self.trust_domain}{AGENT_PATH}/{agent_name}"
        moment = now or datetime.now(UTC)
        if replace:
            if self.registry is None:
                raise UsageError("this store keeps no registry of joined agents: --replace has nothing to forget")
            if self.registry.forget(agent_id):
                log.warning("forgot the joined agent %s: a join token for it is accepted while its SVID lasts",
                            agent_id)
        self._add(token_digest(token), agent_id, moment + ttl, moment)
        return token, agent_id

    def lookup(self, token: str, now: datetime) -> str | None:
        """The agent SPIFFE ID the token names while it may be redeemed, else None; reads, never writes (a join
        with a token nobody issued must cost the server as little as possible). A token for an agent that still
        holds an unexpired SVID is refused here (AgentStillActiveError), before it is spent: like a failure to
        read the registry, the refusal leaves the token as it was."""
        agent_id = self._peek(token_digest(token), now)
        if agent_id is not None and self.registry is not None:
            expiry = self.registry.svid_expiry(agent_id)
            if expiry is not None and expiry > now:
                log.warning("refused a join token for %s: the agent holds an X.509-SVID until %s", agent_id,
                            format_time(expiry))
                raise AgentStillActiveError(
                    f"{agent_id} still holds an unexpired X.509-SVID (until {format_time(expiry)}): to replace "
                    f"that agent, an administrator runs keyseal entry join-token --replace (it forgets the agent "
                    f"first), or wait until its SVID expired")
        return agent_id

    def redeem(self, token: str, now: datetime) -> str | None:
        """The agent SPIFFE ID the token names, once; None for an unknown, used or expired token, or one that
        claims to live longer than `max_ttl` from when the store says it was created (the API server's
        creationTimestamp; for a token without one, from now). The one point of redemption: whether the agent
        still runs is checked by `lookup`, before it."""
        found = self._take(token_digest(token), now)
        if found is None or not self.is_agent_id(found.agent_id):
            return None
        created = found.created if found.created is not None else now
        if found.expires - created > self.max_ttl + CLOCK_SKEW:
            log.warning("refused a join token for %s: it claims to be good until %s, longer than a token lives "
                        "(agents.joinTokenMaxTTL)", found.agent_id, format_time(found.expires))
            return None
        if found.expires <= now:
            return None
        return found.agent_id

    def is_agent_id(self, agent_id: object) -> bool:
        """Whether a stored token names an agent of this trust domain (what `issue` writes)."""
        prefix = f"spiffe://{self.trust_domain}{AGENT_PATH}/"
        return isinstance(agent_id, str) and agent_id.startswith(prefix) \
            and _AGENT_NAME_RE.fullmatch(agent_id[len(prefix):]) is not None


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class DirectoryJoinTokens(JoinTokens):
    def __init__(self, path: Path, trust_domain: str, max_ttl: timedelta = DEFAULT_JOIN_TOKEN_MAX_TTL,
                 registry: AgentRegistry | None = None) -> None:
        super().__init__(trust_domain, max_ttl, registry)
        self.file = _JsonFile(path)

    def _add(self, digest: str, agent_id: str, expires: datetime, now: datetime) -> None:
        def add(data: dict[str, Any]) -> None:
            token: dict[str, Any] = {"agent_id": agent_id, "expires": int(expires.timestamp()),
                                     "created": int(now.timestamp())}
            data.setdefault("tokens", {})[digest] = token

        self.file.change(add)

    def _peek(self, digest: str, now: datetime) -> str | None:
        found = self.file.read().get("tokens", {}).get(digest)
        if not isinstance(found, dict) or _number(found, "expires") <= now.timestamp():
            return None
        return str(found.get("agent_id"))

    def _take(self, digest: str, now: datetime) -> StoredToken | None:
        def take(data: dict[str, Any]) -> StoredToken | None:
            tokens = data.setdefault("tokens", {})
            found = tokens.pop(digest, None)
            for key in [k for k, v in tokens.items() if _number(v, "expires") <= now.timestamp()]:
                del tokens[key]
            if not isinstance(found, dict) or _number(found, "expires") <= now.timestamp():
                return None
            created = found.get("created")
            return StoredToken(str(found.get("agent_id")), datetime.fromtimestamp(_number(found, "expires"), UTC),
                               datetime.fromtimestamp(created, UTC) if type(created) is int else None)

        result: StoredToken | None = self.file.change(take)
        return result


def _number(token: object, key: str) -> float:
    value = token.get(key) if isinstance(token, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


class DirectoryAgentRegistry(AgentRegistry):
    """`<recordPrefix>-agents.json`: agent SPIFFE ID -> when its newest SVID expires (Unix time)."""

    def __init__(self, path: Path) -> None:
        self.file = _JsonFile(path)

    def svid_expiry(self, agent_id: str) -> datetime | None:
        value = self.file.read().get("agents", {}).get(agent_id)
        return datetime.fromtimestamp(value, UTC) if type(value) is int else None

    def issued(self, agent_id: str, expires: datetime) -> None:
        stamp = int(expires.timestamp())
        if (self.svid_expiry(agent_id) or datetime.min.replace(tzinfo=UTC)) >= expires:
            return

        def note(data: dict[str, Any]) -> None:
            agents = data.setdefault("agents", {})
            if type(agents.get(agent_id)) is not int or agents[agent_id] < stamp:
                agents[agent_id] = stamp
            now = datetime.now(UTC).timestamp()
            for key in [k for k, v in agents.items() if type(v) is not int or v <= now]:
                del agents[key]  # expired: a join for that agent needs no replace any more

        self.file.change(note)

    def forget(self, agent_id: str) -> bool:
        def drop(data: dict[str, Any]) -> bool:
            return data.setdefault("agents", {}).pop(agent_id, None) is not None

        forgotten: bool = self.file.change(drop)
        return forgotten

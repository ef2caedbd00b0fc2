"""`kms` custody (key manager): each CA key is an asymmetric AWS KMS key, created by the server and named by an
alias per keyset: `alias/<prefix>/keyset-<n>-x509` and `alias/<prefix>/keyset-<n>-jwt`.

Creating keyset n is crash-safe and leaves nothing half made in use:
1. CreateKey for both keys, each tagged at creation (`keyseal:trust-domain`, `keyseal:alias-prefix`,
   `keyseal:keyset`, `keyseal:kind`, `keyseal:created-at`, `keyseal:state=pending`);
2. GetPublicKey of both, before anything is published;
3. CreateAlias for the JWT key, then for the X.509 key. The X.509 alias is the commit point: a keyset exists
   only when both aliases do, and `load()` never uses a keyset that lacks either;
4. TagResource `keyseal:state=active` on both.

The alias is also the coordination point: CreateAlias fails if the alias exists, so of two replicas that create
keyset n at once exactly one makes the JWT alias; the other abandons its keys and uses the winner's keyset.

When a step fails after a key was made (or a race is lost), every key of that attempt is tagged
`keyseal:orphaned=<reason>` (with `keyseal:orphaned-at` and `keyseal:orphaned-detail`) and scheduled for
deletion; if ScheduleKeyDeletion is not allowed, the tag is what finds it later, and the log says so. A process
killed half way leaves `pending` keys in no complete keyset: each startup looks for them (ListKeys, then
ListResourceTags of keys that no alias names, bounded) and orphans those of this trust domain and alias prefix
older than a grace period (a slower replica may still be creating its keyset).

5. The pin (ca.custody.pins): the keyset's key ARNs and public keys, signed by the previous keyset's X.509 key,
   appended to the pin record in the configured store. Only a pinned keyset is ever used.

Aliases only find keys for creation and clean-up; they are not trusted. A load reads the pins and opens exactly
the pinned key ARNs (DescribeKey: Origin AWS_KMS, KeyManager CUSTOMER, KeyUsage SIGN_VERIFY, the KeySpec of the
pinned public key, this trust domain in the description; GetPublicKey: the pinned public key). An alias moved
to another key, or aliases of a keyset that is not pinned (planted, or left by a writer that stopped before
pinning), are ignored with a custody alarm; a pinned key that fails a check stops the load (the server keeps
the keysets it has, or refuses to start) instead of being replaced. Every signature is one kms:Sign.

Upgrading from a version without pins: when the store holds no pin record yet, the first load pins the live
keysets the aliases name (after the checks above), trusting them on first use, and says so in the log.

IAM: kms:ListAliases, kms:CreateKey, kms:TagResource (tags given to CreateKey need it too), kms:CreateAlias,
kms:DescribeKey, kms:GetPublicKey, kms:Sign; for clean-up kms:ScheduleKeyDeletion, kms:DeleteAlias (an alias
this server just made for a keyset it then abandoned), kms:ListKeys and kms:ListResourceTags (the startup
search). Without the clean-up permissions the server still works and logs what it could not do. Keys of expired
keysets are left in place (with their aliases); schedule their deletion once nothing they signed is in use.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keyseal._internal.backends.awskms import AwsKmsSigner, parse_key_ref
from keyseal._internal.ca.custody.alarms import alarm
from keyseal._internal.ca.custody.keys import CaKey, SignerCaKey
from keyseal._internal.ca.custody.pins import KINDS, KeysetPins, NewPin, Pin
from keyseal._internal.ca.custody.source import KeysetKeys, KeysetSource, Loaded
from keyseal._internal.providers.aws.client import kms_client, kms_errors
from keyseal._internal.providers.aws.kms import (
    DELETION_WINDOW_DAYS,
    KEY_SPECS,
    ORPHAN_TAG,
    create_alias,
    create_key,
    orphan_tags,
    schedule_deletion,
    tag_key,
)
from keyseal._internal.records.record import format_time
from keyseal.errors import AccessDeniedError, CustodyIntegrityError, KeysealError

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

    from keyseal._internal.ca.config import Config
    from keyseal._internal.ca.custody.source import CustodyContext

__all__ = [
    "DEFAULT_ORPHAN_GRACE",
    "KMS_KEY_SPECS",
    "ORPHAN_TAG",
    "STATE_TAG",
    "KmsKeysetSource",
    "open",
]

log = logging.getLogger(__name__)

KMS_KEY_SPECS = {kind: KEY_SPECS[kind] for kind in ("p256", "p384", "rsa2048", "rsa4096")}
_DESCRIPTION_RE = re.compile(r"keyseal CA key: trust domain (?P<td>\S+), keyset (?P<n>\d+) \((?P<kind>x509|jwt)\), "
                             r"not before (?P<at>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

TRUST_DOMAIN_TAG = "keyseal:trust-domain"
PREFIX_TAG = "keyseal:alias-prefix"
KEYSET_TAG = "keyseal:keyset"
KIND_TAG = "keyseal:kind"
CREATED_TAG = "keyseal:created-at"
STATE_TAG = "keyseal:state"  # pending -> active, or orphaned

DEFAULT_ORPHAN_GRACE = timedelta(minutes=15)
_SWEEP_MAX_KEYS = 5000  # ListResourceTags calls per startup, at most
_SWEEP_DENIED_LIMIT = 20  # ListResourceTags denied this often, none allowed: stop looking
_COMMIT_WAIT_SECONDS = 30.0  # how long a replica that lost the race waits for the winner's keyset


def open(config: Config, context: CustodyContext) -> KmsKeysetSource:
    """Registry entry point for `custody: kms`."""
    from keyseal._internal.ca.config import CA_KEY_TYPES

    return KmsKeysetSource(config.trust_domain, config.kms_alias_prefix, CA_KEY_TYPES[config.ca_key_type],
                           CA_KEY_TYPES[config.jwt_key_type], endpoint=config.kms_endpoint, region=config.aws_region,
                           pins=context.pins(config.kms_alias_prefix))


class KmsKeysetSource(KeysetSource):
    def __init__(self, trust_domain: str, alias_prefix: str, x509_key_type: str, jwt_key_type: str,
                 endpoint: str | None = None, region: str | None = None, *, pins: KeysetPins,
                 orphan_grace: timedelta = DEFAULT_ORPHAN_GRACE,
                 wall_clock: Callable[[], datetime] | None = None) -> None:
        self.pins = pins
        self.trust_domain = trust_domain
        self.alias_prefix = alias_prefix
        self.key_types = {"x509": x509_key_type, "jwt": jwt_key_type}
        self.endpoint = endpoint
        self.region = region
        self.orphan_grace = orphan_grace
        # KMS's own time, for tags and the grace period; not the schedule's (possibly injected) clock.
        self.wall_clock = wall_clock or (lambda: datetime.now(UTC))
        self._client: KMSClient | None = None
        self._opened: dict[str, CaKey] = {}  # pinned key ARN -> key

    def describe(self) -> str:
        return f"AWS KMS keys alias/{self.alias_prefix}/keyset-*"

    def alias(self, number: int, kind: str) -> str:
        return f"alias/{self.alias_prefix}/keyset-{number}-{kind}"

    def _kms(self) -> KMSClient:
        if self._client is None:
            self._client = kms_client(self.endpoint, self.region)
        return self._client

    def startup_check(self) -> None:
        """ListAliases once: an unreachable endpoint or missing credentials show before anything is created.
        Then read the keyset pins (the store must be readable and the chain verify), and orphan what a crashed
        writer left behind (best effort: it never stops a startup)."""
        self._aliases()
        self.pins.read()
        self.sweep_orphans()

    def _aliases(self) -> dict[str, str]:
        """Every alias in the account and region -> the key id it names."""
        client = self._kms()
        found: dict[str, str] = {}
        marker: str | None = None
        for _ in range(1000):  # bounded: 100 aliases a page
            with kms_errors("ListAliases", self.describe(), client.meta.endpoint_url):
                page = client.list_aliases(Limit=100, **({"Marker": marker} if marker else {}))
            for entry in page.get("Aliases", []):
                if entry.get("AliasName") and entry.get("TargetKeyId"):
                    found[entry["AliasName"]] = entry["TargetKeyId"]
            marker = page.get("NextMarker")
            if not page.get("Truncated") or not marker:
                break
        return found

    def _numbers(self, aliases: dict[str, str] | None = None) -> dict[str, dict[int, str]]:
        """This prefix's keyset aliases: kind -> {keyset number: key id}."""
        prefix = f"alias/{self.alias_prefix}/keyset-"
        found: dict[str, dict[int, str]] = {"x509": {}, "jwt": {}}
        for name, key_id in (self._aliases() if aliases is None else aliases).items():
            match = re.fullmatch(re.escape(prefix) + r"(\d+)-(x509|jwt)", name)
            if match:
                found[match.group(2)][int(match.group(1))] = key_id
        return found

    def load(self, live_after: datetime) -> Loaded:
        chain = self.pins.read()
        numbers = self._numbers()
        if chain is None:
            chain = self._adopt(numbers, live_after)
        pinned = {pin.number: pin for pin in chain}
        # A number taken by any alias is spent, pinned or not: the next keyset gets a higher one.
        highest = max([*numbers["x509"], *numbers["jwt"], *pinned], default=0)
        self._report_unpinned(numbers, chain)
        keysets: list[KeysetKeys] = []
        for pin in sorted(chain, key=lambda p: p.number, reverse=True):
            if pin.not_before <= live_after:
                break  # older keysets are older still
            for kind in KINDS:
                target = numbers[kind].get(pin.number)
                if target is not None and not _same_key(target, pin.keys[kind].id):
                    alarm("alias-moved", f"{self.alias(pin.number, kind)} names KMS key {target}, but keyset "
                                         f"{pin.number} is pinned to {pin.keys[kind].id}: someone moved the alias; "
                                         "the pinned key is used, the alias's key never")
            keysets.append(KeysetKeys(pin.number, pin.not_before, self._open_pinned(pin, "x509"),
                                      self._open_pinned(pin, "jwt")))
        live = {pin.keys[kind].id for pin in chain if pin.number in {k.number for k in keysets} for kind in KINDS}
        self._opened = {arn: key for arn, key in self._opened.items() if arn in live}
        return Loaded(tuple(sorted(keysets, key=lambda k: k.number)), highest)

    def create(self, number: int, not_before: datetime, live_after: datetime) -> bool:
        """Both keys, then the JWT alias, then the X.509 alias (the commit). Any failure after a key exists
        orphans the attempt's keys (tagged, deletion scheduled) and re-raises; a lost race returns False."""
        previous = number - 1
        numbers = self._numbers()
        if previous in numbers["jwt"] and previous not in numbers["x509"]:
            # Another replica is committing keyset `previous` (its JWT alias exists, the X.509 alias comes last):
            # wait for it rather than prepare a second keyset. A writer that died half way costs only the wait.
            self._await_commit(previous)
            if previous in self._numbers()["x509"]:
                self._await_pin(previous)
                return False
        created: dict[str, tuple[str, str]] = {}  # kind -> (key id, arn)
        opened: dict[str, CaKey] = {}
        aliased: list[str] = []
        step = "x509 CreateKey"
        try:
            for kind in ("x509", "jwt"):
                step = f"{kind} CreateKey"
                created[kind] = self._create_key(number, kind, not_before)
            for kind in ("x509", "jwt"):
                step = f"{kind} GetPublicKey"
                opened[kind] = self._open_arn(created[kind][1])
            for kind in ("jwt", "x509"):
                step = f"{kind} CreateAlias"
                alias = self.alias(number, kind)
                if not create_alias(self._kms(), alias, created[kind][0]):
                    if kind == "jwt":
                        log.info("%s was created by another replica: abandoning this replica's keys", alias)
                        self._abandon(number, created, aliased, "lost-race", f"{alias} taken by another writer")
                        self._await_commit(number)
                        self._await_pin(number)
                        return False
                    raise KeysealError(f"{alias} already names another key although {self.alias(number, 'jwt')} "
                                       f"was just made by this server: remove the stray alias {alias}")
                aliased.append(alias)
            step = "pin"
            entry = NewPin(number, not_before, {kind: (created[kind][1], opened[kind]) for kind in KINDS})
            if not self.pins.append([entry], lambda pin: self._open_pinned(pin, "x509")):
                raise CustodyIntegrityError(f"{self.pins.describe()} already pins keyset {number} or a later one, "
                                            f"although this server made its aliases")
        except KeysealError as exc:
            note = self._abandon(number, created, aliased, "rotation-failed", f"{step} failed")
            raise type(exc)(f"{exc.message} ({note})") from exc
        # Committed and pinned. Keep its opened keys (load() would fetch the same public keys).
        for kind, key in opened.items():
            self._opened[created[kind][1]] = key
        for kind, (key_id, _) in created.items():
            self._tag(key_id, {STATE_TAG: "active"}, f"mark {self.alias(number, kind)} active")
        log.info("keyset %d committed: %s -> %s, %s -> %s", number, self.alias(number, "x509"),
                 created["x509"][0], self.alias(number, "jwt"), created["jwt"][0])
        return True

    def sweep_orphans(self) -> list[str]:
        """Orphan the `pending` keys of this trust domain and prefix that no complete keyset uses and that are
        older than the grace period (a writer was killed between CreateKey and its commit). Returns their ids.
        Best effort: a denied or failing call is logged and ends the search."""
        client = self._kms()
        url = client.meta.endpoint_url
        try:
            aliases = self._aliases()
            numbers = self._numbers(aliases)
            in_use = {numbers[kind][n] for n in set(numbers["x509"]) & set(numbers["jwt"]) for kind in numbers}
            others = {key_id for name, key_id in aliases.items()
                      if not name.startswith(f"alias/{self.alias_prefix}/keyset-")}
            candidates: list[str] = []
            marker: str | None = None
            for _ in range(1000):
                with kms_errors("ListKeys", self.describe(), url):
                    page = client.list_keys(Limit=1000, **({"Marker": marker} if marker else {}))
                candidates += [k["KeyId"] for k in page.get("Keys", [])
                               if k.get("KeyId") and k["KeyId"] not in in_use and k["KeyId"] not in others]
                marker = page.get("NextMarker")
                if not page.get("Truncated") or not marker or len(candidates) >= _SWEEP_MAX_KEYS:
                    break
            if len(candidates) > _SWEEP_MAX_KEYS:
                log.warning("looking for orphaned CA keys: only the first %d of %d keys are checked",
                            _SWEEP_MAX_KEYS, len(candidates))
            now = self.wall_clock()
            orphaned: list[str] = []
            denied = readable = 0
            for key_id in candidates[:_SWEEP_MAX_KEYS]:
                try:
                    tags = self._tags(key_id)
                except AccessDeniedError:
                    # A policy scoped to this trust domain's tag denies other keys' tags: not ours. If every
                    # key is denied, the permission is simply missing.
                    denied += 1
                    if readable == 0 and denied >= _SWEEP_DENIED_LIMIT:
                        raise
                    continue
                readable += 1
                if not self._is_abandoned(tags, now):
                    continue
                text = tags.get(KEYSET_TAG, "")
                number = int(text) if text.isascii() and text.isdigit() else 0  # '²' is a digit, not an int
                detail = f"pending since {tags[CREATED_TAG]} with no complete keyset"
                self._orphan(key_id, number, tags.get(KIND_TAG, "?"), "abandoned", detail)
                orphaned.append(key_id)
            if denied and not readable:
                log.warning("could not look for orphaned CA keys: kms:ListResourceTags was denied on every key; "
                            "grant it, or find them by the tag %s=pending yourself", STATE_TAG)
            return orphaned
        except KeysealError as exc:
            log.warning("could not look for orphaned CA keys (%s); grant kms:ListKeys and kms:ListResourceTags, "
                        "or find them by the tag %s=pending yourself", exc.message, STATE_TAG)
            return []

    # -- internals -------------------------------------------------------------------------------------

    def _is_abandoned(self, tags: dict[str, str], now: datetime) -> bool:
        if tags.get(TRUST_DOMAIN_TAG) != self.trust_domain or tags.get(PREFIX_TAG) != self.alias_prefix:
            return False
        if tags.get(STATE_TAG) != "pending" or ORPHAN_TAG in tags:
            return False
        try:
            created = datetime.strptime(tags.get(CREATED_TAG, ""), _TIME_FORMAT).replace(tzinfo=UTC)
        except ValueError:
            return False
        return now - created >= self.orphan_grace

    def _tags(self, key_id: str) -> dict[str, str]:
        client = self._kms()
        tags: dict[str, str] = {}
        marker: str | None = None
        for _ in range(10):  # a key holds at most 50 tags
            with kms_errors("ListResourceTags", key_id, client.meta.endpoint_url):
                page = (client.list_resource_tags(KeyId=key_id, Marker=marker) if marker
                        else client.list_resource_tags(KeyId=key_id))
            tags.update({t["TagKey"]: t["TagValue"] for t in page.get("Tags", [])})
            marker = page.get("NextMarker")
            if not page.get("Truncated") or not marker:
                break
        return tags

    def _open_pinned(self, pin: Pin, kind: str) -> CaKey:
        """The pinned key, by its pinned ARN (never through the alias), checked against its pin."""
        pinned = pin.keys[kind]
        cached = self._opened.get(pinned.id)
        if cached is not None:
            return cached
        what = f"the {kind} key of keyset {pin.number} ({pinned.id})"
        metadata = self._describe(pinned.id)
        problem = self._key_problem(metadata, pin.number, kind, _key_spec(pinned.public_key()))
        if problem:
            alarm("key-mismatch", f"{what}: {problem}")
            raise CustodyIntegrityError(f"{what} is not the key keyseal made and pinned: {problem}")
        key = self._open_arn(metadata["Arn"])
        if not pinned.matches(key.public_key()):
            alarm("key-mismatch", f"{what}: KMS returns another public key than the pinned one")
            raise CustodyIntegrityError(f"{what}: KMS returns another public key than the one pinned in "
                                        f"{self.pins.describe()}")
        self._opened[pinned.id] = key
        return key

    def _describe(self, key: str) -> Any:
        client = self._kms()
        with kms_errors("DescribeKey", key, client.meta.endpoint_url):
            return client.describe_key(KeyId=key)["KeyMetadata"]

    def _key_problem(self, metadata: Any, number: int, kind: str, spec: str | None) -> str | None:
        """Why a KMS key is not one keyseal made for keyset `number` (`kind`) of this trust domain, or None."""
        match = _DESCRIPTION_RE.fullmatch(metadata.get("Description") or "")
        if match is None or int(match["n"]) != number or match["kind"] != kind or match["td"] != self.trust_domain:
            return "its description does not name this trust domain, keyset and kind"
        if metadata.get("Origin") != "AWS_KMS":
            return f"its key material was imported (Origin {metadata.get('Origin')})"
        if metadata.get("KeyManager", "CUSTOMER") != "CUSTOMER":
            return "it is an AWS managed key"
        if metadata.get("KeyUsage") != "SIGN_VERIFY":
            return f"its KeyUsage is {metadata.get('KeyUsage')}, not SIGN_VERIFY"
        key_spec = metadata.get("KeySpec") or metadata.get("CustomerMasterKeySpec")
        if key_spec not in KMS_KEY_SPECS.values() or (spec is not None and key_spec != spec):
            return f"its KeySpec is {key_spec}, not {spec or 'a CA key spec'}"
        if metadata.get("KeyState") == "PendingDeletion":
            return "it is pending deletion: cancel its deletion"
        return None

    def _not_before(self, metadata: Any, number: int, kind: str) -> datetime | None:
        """The creation time a key's description records, if it describes keyset `number` (`kind`) here."""
        match = _DESCRIPTION_RE.fullmatch(metadata.get("Description") or "")
        if match is None or int(match["n"]) != number or match["kind"] != kind or match["td"] != self.trust_domain:
            return None
        return datetime.strptime(match["at"], _TIME_FORMAT).replace(tzinfo=UTC)

    def _report_unpinned(self, numbers: dict[str, dict[int, str]], chain: tuple[Pin, ...]) -> None:
        """Alarm on aliases of keysets the pins do not hold (planted, or a writer stopped before pinning). Numbers
        below the first pin are history (keysets from before the pins, or pruned from them): not reported."""
        pinned = {pin.number for pin in chain}
        floor = chain[0].number if chain else 0
        for kind in KINDS:
            for number, target in sorted(numbers[kind].items()):
                if number in pinned or number <= floor:
                    continue
                if kind == "jwt" and number not in numbers["x509"]:
                    continue  # a keyset being committed right now (the X.509 alias comes last)
                if number not in numbers["jwt"]:
                    alarm("unpinned-keyset", f"keyset {number} is incomplete ({self.alias(number, 'x509')} exists, "
                                             f"{self.alias(number, 'jwt')} does not) and not pinned: it is not used")
                    continue
                alarm("unpinned-keyset", f"{self.alias(number, kind)} names KMS key {target}, but keyset {number} "
                                         f"is not pinned in {self.pins.describe()}: it is not used (made by "
                                         "someone else, or by a writer that stopped before pinning it)")

    def _adopt(self, numbers: dict[str, dict[int, str]], live_after: datetime) -> tuple[Pin, ...]:
        """No pin record yet: pin the live keysets the aliases name (trust on first use), oldest first."""
        entries: list[NewPin] = []
        for number in sorted(set(numbers["x509"]) & set(numbers["jwt"])):
            described = {kind: self._describe(self.alias(number, kind)) for kind in KINDS}
            times = {self._not_before(metadata, number, kind) for kind, metadata in described.items()}
            if None in times or len(times) != 1:
                alarm("unpinned-keyset", f"keyset {number} ({self.alias(number, 'x509')}) is not adopted: its keys' "
                                         "descriptions do not name this trust domain, keyset and one time")
                continue
            not_before = times.pop()
            assert not_before is not None
            if not_before <= live_after:
                continue  # expired: history, not adopted
            for kind, metadata in described.items():  # live, and described as ours: it must be what keyseal makes
                problem = self._key_problem(metadata, number, kind, None)
                if problem:
                    message = f"{self.alias(number, kind)} ({metadata.get('Arn')}) of live keyset {number}: {problem}"
                    alarm("key-mismatch", message)
                    raise CustodyIntegrityError(f"{message}; no keyset is pinned until it is fixed")
            if entries and not_before <= entries[-1].not_before:
                alarm("unpinned-keyset", f"keyset {number} is not adopted: it is not newer than keyset "
                                         f"{entries[-1].number}")
                continue
            keys = {kind: (described[kind]["Arn"], self._open_arn(described[kind]["Arn"])) for kind in KINDS}
            entries.append(NewPin(number, not_before, keys))
        for entry in entries:  # the pins name these keys (unless another replica pinned others first)
            for arn, key in entry.keys.values():
                self._opened[arn] = key
        if entries:
            if self.pins.append(entries, lambda pin: self._open_pinned(pin, "x509"), only_if_absent=True):
                log.warning("no keyset pins were found in %s: pinned the live keysets %s as their aliases name them "
                            "now (trust on first use); check their key ARNs: %s", self.pins.describe(),
                            ", ".join(str(e.number) for e in entries),
                            "; ".join(f"{e.number} {k}={e.keys[k][0]}" for e in entries for k in KINDS))
            return self.pins.read() or ()
        return ()

    def _await_pin(self, number: int) -> None:
        """After a lost race: wait (bounded) until the winner has pinned keyset `number`."""
        deadline = time.monotonic() + _COMMIT_WAIT_SECONDS
        while time.monotonic() < deadline:
            chain = self.pins.read() or ()
            if chain and chain[-1].number >= number:
                return
            time.sleep(0.2)

    def _open_arn(self, arn: str) -> CaKey:
        # Every CA key shares the source's one client: one of its own would cost each key ~9 MiB, and a server
        # holds up to three keysets (six keys), replaced at every rotation (benchmarks/soak.py saw that growth).
        signer = AwsKmsSigner(f"awskms:{arn}", parse_key_ref(arn), self.endpoint, self.region, client=self._kms())
        return SignerCaKey(signer)  # one GetPublicKey

    def _create_key(self, number: int, kind: str, not_before: datetime) -> tuple[str, str]:
        """CreateKey, tagged `pending` in the same call (so even a crash right after leaves a findable key)."""
        client = self._kms()
        alias = self.alias(number, kind)
        spec = KMS_KEY_SPECS[self.key_types[kind]]
        description = (f"keyseal CA key: trust domain {self.trust_domain}, keyset {number} ({kind}), "
                       f"not before {format_time(not_before)}")
        tags = {TRUST_DOMAIN_TAG: self.trust_domain, PREFIX_TAG: self.alias_prefix, KEYSET_TAG: str(number),
                KIND_TAG: kind, CREATED_TAG: format_time(self.wall_clock()), STATE_TAG: "pending"}
        key_id, arn = create_key(client, alias, spec, description, tags)
        log.info("created AWS KMS key %s (%s) for %s, tagged %s=pending", key_id, spec, alias, STATE_TAG)
        return key_id, arn

    def _await_commit(self, number: int) -> None:
        """After a lost race: wait (bounded) until the winner's keyset is complete, or it gave up."""
        deadline = time.monotonic() + _COMMIT_WAIT_SECONDS
        while time.monotonic() < deadline:
            numbers = self._numbers()
            if number in numbers["x509"] or number not in numbers["jwt"]:
                return
            time.sleep(0.2)
        log.warning("keyset %d is still not complete after %.0fs: another writer stopped half way?", number,
                    _COMMIT_WAIT_SECONDS)

    def _abandon(self, number: int, created: dict[str, tuple[str, str]], aliased: list[str], reason: str,
                 detail: str) -> str:
        """Undo an attempt: remove the aliases it made, orphan its keys. Returns a note for the error line."""
        for alias in aliased:
            client = self._kms()
            try:
                with kms_errors("DeleteAlias", alias, client.meta.endpoint_url):
                    client.delete_alias(AliasName=alias)
            except KeysealError as exc:
                log.warning("could not remove %s from the abandoned keyset %d (%s): keyset %d is skipped", alias,
                            number, exc.message, number)
        notes = [self._orphan(key_id, number, kind, reason, detail) for kind, (key_id, _) in created.items()]
        return "; ".join(notes) if notes else "no KMS key was created"

    def _orphan(self, key_id: str, number: int, kind: str, reason: str, detail: str) -> str:
        """Tag one key orphaned and schedule its deletion; each step best effort, each outcome logged."""
        tags = {**orphan_tags(reason, format_time(self.wall_clock()), detail=detail), STATE_TAG: "orphaned"}
        tagged = self._tag(key_id, tags, "tag it orphaned")
        try:
            schedule_deletion(self._kms(), key_id)
        except KeysealError as exc:
            how = f"tagged {ORPHAN_TAG}={reason} so that it can be found" if tagged else "and untagged"
            log.warning("orphaned KMS key %s (keyset %d %s, %s): deletion not scheduled (%s); it stays %s: "
                        "delete it yourself", key_id, number, kind, detail, exc.message, how)
            return f"the key {key_id} just created is {'tagged ' + ORPHAN_TAG if tagged else 'left untagged'}, " \
                   f"its deletion could not be scheduled"
        log.warning("orphaned KMS key %s (keyset %d %s, %s): %s, deletion scheduled in %d days", key_id,
                    number, kind, detail, f"tagged {ORPHAN_TAG}={reason}" if tagged else "untagged",
                    DELETION_WINDOW_DAYS)
        return f"the key {key_id} just created was {'tagged ' + ORPHAN_TAG + ' and ' if tagged else ''}" \
               f"scheduled for deletion"

    def _tag(self, key_id: str, tags: dict[str, str], why: str) -> bool:
        try:
            tag_key(self._kms(), key_id, tags)
        except KeysealError as exc:
            log.warning("could not %s: KMS key %s (%s)", why, key_id, exc.message)
            return False
        return True


def _same_key(target: str, arn: str) -> bool:
    """Whether an alias's TargetKeyId (a key id, or an ARN) names the key `arn`."""
    return target == arn or arn.endswith(f":key/{target}")


def _key_spec(public_key: Any) -> str | None:
    """The KMS KeySpec of a public key keyseal makes CA keys of; None for any other."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ECC_NIST_P256", "secp384r1": "ECC_NIST_P384"}.get(public_key.curve.name)
    if isinstance(public_key, rsa.RSAPublicKey):
        return {2048: "RSA_2048", 4096: "RSA_4096"}.get(public_key.key_size)
    return None

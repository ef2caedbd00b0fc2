"""`kms` custody (key manager): each CA key is an asymmetric AWS KMS key, created by the server and named by an
alias per keyset: `alias/<prefix>/keyset-<n>-x509` and `alias/<prefix>/keyset-<n>-jwt`.

The alias is the coordination point: CreateAlias fails if the alias exists, so of two replicas that create
keyset n at once exactly one alias is made; the other replica schedules its own new key for deletion and uses
the winner's. A key's description records its keyset and creation time (the schedule's clock), so a startup
needs only ListAliases, then DescribeKey and GetPublicKey per live key. Every signature is one kms:Sign.

IAM: kms:ListAliases, kms:CreateKey, kms:CreateAlias, kms:DescribeKey, kms:GetPublicKey, kms:Sign and, to
clean up after a lost race, kms:ScheduleKeyDeletion. Keys of expired keysets are left in place (with their
aliases); schedule their deletion once nothing they signed is still in use.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from keyseal.aws import kms_client, kms_errors
from keyseal.backends.awskms import AwsKmsSigner, parse_key_ref
from keyseal.ca.custody import CaKey, SignerCaKey
from keyseal.ca.source import KeysetKeys, KeysetSource, Loaded
from keyseal.errors import KeysealError, UnsupportedKeyError
from keyseal.wrapping.record import format_time

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

__all__ = ["KMS_KEY_SPECS", "KmsKeysetSource"]

log = logging.getLogger(__name__)

KMS_KEY_SPECS = {"p256": "ECC_NIST_P256", "p384": "ECC_NIST_P384", "rsa2048": "RSA_2048", "rsa4096": "RSA_4096"}
_DESCRIPTION_RE = re.compile(r"keyseal CA key: trust domain \S+, keyset (\d+) \((x509|jwt)\), "
                             r"not before (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)")
_DELETION_DAYS = 7


class KmsKeysetSource(KeysetSource):
    def __init__(self, trust_domain: str, alias_prefix: str, x509_key_type: str, jwt_key_type: str,
                 endpoint: str | None = None, region: str | None = None) -> None:
        self.trust_domain = trust_domain
        self.alias_prefix = alias_prefix
        self.key_types = {"x509": x509_key_type, "jwt": jwt_key_type}
        self.endpoint = endpoint
        self.region = region
        self._client: KMSClient | None = None
        self._opened: dict[str, tuple[datetime, CaKey]] = {}  # alias -> (not before, key)

    def describe(self) -> str:
        return f"AWS KMS keys alias/{self.alias_prefix}/keyset-*"

    def alias(self, number: int, kind: str) -> str:
        return f"alias/{self.alias_prefix}/keyset-{number}-{kind}"

    def _kms(self) -> KMSClient:
        if self._client is None:
            self._client = kms_client(self.endpoint, self.region)
        return self._client

    def startup_check(self) -> None:
        """ListAliases once: an unreachable endpoint or missing credentials show before anything is created."""
        self._numbers()

    def _numbers(self) -> dict[str, set[int]]:
        client = self._kms()
        prefix = f"alias/{self.alias_prefix}/keyset-"
        found: dict[str, set[int]] = {"x509": set(), "jwt": set()}
        marker: str | None = None
        for _ in range(1000):  # bounded: 100 aliases a page
            with kms_errors("ListAliases", self.describe(), client.meta.endpoint_url):
                page = client.list_aliases(Limit=100, **({"Marker": marker} if marker else {}))
            for entry in page.get("Aliases", []):
                name = entry.get("AliasName", "")
                match = re.fullmatch(re.escape(prefix) + r"(\d+)-(x509|jwt)", name)
                if match:
                    found[match.group(2)].add(int(match.group(1)))
            marker = page.get("NextMarker")
            if not page.get("Truncated") or not marker:
                break
        return found

    def load(self, live_after: datetime) -> Loaded:
        numbers = self._numbers()
        highest = max(numbers["x509"], default=0)
        keysets: list[KeysetKeys] = []
        for number in sorted(numbers["x509"], reverse=True):
            not_before, x509_key = self._open(self.alias(number, "x509"), number, "x509")
            if not_before <= live_after:
                break  # older keysets are older still
            if number not in numbers["jwt"]:
                log.warning("%s is missing (a writer stopped half way): creating it", self.alias(number, "jwt"))
                self._create_key(number, "jwt", not_before)
            _, jwt_key = self._open(self.alias(number, "jwt"), number, "jwt")
            keysets.append(KeysetKeys(number, not_before, x509_key, jwt_key))
        live = {self.alias(k.number, kind) for k in keysets for kind in ("x509", "jwt")}
        self._opened = {alias: value for alias, value in self._opened.items() if alias in live}
        return Loaded(tuple(sorted(keysets, key=lambda k: k.number)), highest)

    def create(self, number: int, not_before: datetime, live_after: datetime) -> bool:
        if not self._create_key(number, "x509", not_before):
            return False
        self._create_key(number, "jwt", not_before)
        return True

    # -- internals -------------------------------------------------------------------------------------

    def _open(self, alias: str, number: int, kind: str) -> tuple[datetime, CaKey]:
        cached = self._opened.get(alias)
        if cached is not None:
            return cached
        client = self._kms()
        with kms_errors("DescribeKey", alias, client.meta.endpoint_url):
            metadata = client.describe_key(KeyId=alias)["KeyMetadata"]
        match = _DESCRIPTION_RE.fullmatch(metadata.get("Description") or "")
        if match is None or int(match.group(1)) != number or match.group(2) != kind:
            raise UnsupportedKeyError(
                f"AWS KMS key {alias} was not created by keyseal for keyset {number} ({kind}): its description "
                f"does not say so; point {alias} back at the key keyseal created, or choose another aliasPrefix"
            )
        not_before = datetime.strptime(match.group(3), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        arn = metadata["Arn"]
        signer = AwsKmsSigner(f"awskms:{arn}", parse_key_ref(arn), endpoint=self.endpoint, region=self.region)
        opened = (not_before, SignerCaKey(signer))  # one GetPublicKey
        self._opened[alias] = opened
        return opened

    def _create_key(self, number: int, kind: str, not_before: datetime) -> bool:
        """CreateKey + CreateAlias; False (and the new key scheduled for deletion) if the alias was taken."""
        from botocore.exceptions import ClientError

        client = self._kms()
        url = client.meta.endpoint_url
        alias = self.alias(number, kind)
        spec = KMS_KEY_SPECS[self.key_types[kind]]
        description = (f"keyseal CA key: trust domain {self.trust_domain}, keyset {number} ({kind}), "
                       f"not before {format_time(not_before)}")
        with kms_errors("CreateKey", alias, url):
            created = client.create_key(KeyUsage="SIGN_VERIFY", KeySpec=spec,  # type: ignore[arg-type]
                                        Description=description)
        key_id = created["KeyMetadata"]["KeyId"]
        try:
            with kms_errors("CreateAlias", alias, url):
                try:
                    client.create_alias(AliasName=alias, TargetKeyId=key_id)
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") != "AlreadyExistsException":
                        raise
                    log.info("%s was created by another replica: scheduling key %s for deletion", alias, key_id)
                    self._schedule_deletion(key_id)
                    return False
        except KeysealError as exc:
            self._schedule_deletion(key_id)
            raise type(exc)(f"{exc.message} (the key {key_id} just created was scheduled for deletion)") from None
        log.info("created AWS KMS key %s (%s) as %s", key_id, spec, alias)
        return True

    def _schedule_deletion(self, key_id: str) -> None:
        try:
            self._kms().schedule_key_deletion(KeyId=key_id, PendingWindowInDays=_DELETION_DAYS)
        except Exception as exc:  # best effort: the error that matters is the caller's
            log.warning("could not schedule deletion of unused KMS key %s (%s): delete it yourself", key_id,
                        type(exc).__name__)

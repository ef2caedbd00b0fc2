"""`awskms` KEK provider: DEKs wrapped by a symmetric AWS KMS key; the KEK never leaves AWS.

Permissions: `kms:Encrypt` (writing records), `kms:Decrypt` (opening them), and optionally `kms:DescribeKey`
(checked before writing: the key must be a SYMMETRIC_DEFAULT, ENCRYPT_DECRYPT key; without the permission the
check is skipped with a warning and KMS's own answer is relied on). Every call names the configured key ARN as
`KeyId`, and a record that names another key is refused before any Decrypt. KMS is called when records are
written or opened and for the startup canary, never per signature.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal

from keyseal._internal.providers.aws.client import kms_client, kms_errors
from keyseal._internal.records.record import DEK_SIZE
from keyseal._internal.wrapping.provider import KekOptions, KekProvider, invalid_kek, zero
from keyseal.errors import (
    AccessDeniedError,
    UnsupportedKeyError,
    UsageError,
    WrappedRecordError,
)

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

__all__ = ["AwsKmsKek", "open"]

log = logging.getLogger(__name__)

_ARN_RE = re.compile(r"arn:aws[a-z-]*:kms:([a-z0-9-]+):([0-9]{12}):key/[A-Za-z0-9-]{1,128}")
_ALGORITHM: Final[Literal["SYMMETRIC_DEFAULT"]] = "SYMMETRIC_DEFAULT"
_announced: set[str] = set()
_announce_lock = threading.Lock()


def _announce(arn: str) -> None:
    """Log, once per process and key, which KMS key wraps records (operators grep for this line)."""
    with _announce_lock:
        if arn in _announced:
            return
        _announced.add(arn)
    log.info("Key wrapping via KMS keyARN=%s", arn)


def open(spec: str, rest: str, options: KekOptions) -> AwsKmsKek:
    """Registry entry point: `awskms:<key ARN>`. Validates the ARN; makes no remote call yet."""
    if not rest:
        raise invalid_kek(spec)
    return AwsKmsKek(rest, endpoint=options.kms_endpoint, region=options.region)


class AwsKmsKek(KekProvider):
    """A symmetric KMS key named by its full key ARN (the ARN is what records store and what is compared)."""

    provider: ClassVar[str] = "awskms"

    def __init__(self, arn: str, *, endpoint: str | None = None, region: str | None = None) -> None:
        match = _ARN_RE.fullmatch(arn)
        if match is None:
            raise UsageError(
                f"invalid KMS KEK {arn!r}: use the key's full ARN, arn:aws:kms:REGION:ACCOUNT:key/KEY-ID "
                f"(an alias or a bare key id is not accepted: records store and compare the key ARN)"
            )
        self.arn = arn
        self.region = region or match.group(1)
        self.endpoint = endpoint
        self._client: KMSClient | None = None
        self._checked = False

    @property
    def kek_id(self) -> str:
        return self.arn

    def describe(self) -> str:
        return f"AWS KMS key {self.arn}"

    def _kms(self) -> KMSClient:
        if self._client is None:
            self._client = kms_client(self.endpoint, self.region)
        _announce(self.arn)
        return self._client

    def _endpoint(self) -> str | None:
        return self._client.meta.endpoint_url if self._client is not None else self.endpoint

    def prepare_write(self) -> None:
        """Check once that the key is a SYMMETRIC_DEFAULT ENCRYPT_DECRYPT key (kms:DescribeKey)."""
        if self._checked:
            return
        client = self._kms()
        try:
            with kms_errors("DescribeKey", self.arn, self._endpoint()):
                meta: Mapping[str, Any] = client.describe_key(KeyId=self.arn)["KeyMetadata"]
        except AccessDeniedError:
            log.warning(
                "cannot check the type of KMS key %s (kms:DescribeKey denied): relying on KMS to refuse a "
                "key that is not a symmetric encryption key", self.arn,
            )
            self._checked = True
            return
        spec = meta.get("KeySpec") or meta.get("CustomerMasterKeySpec")
        usage = meta.get("KeyUsage")
        if spec != _ALGORITHM or usage != "ENCRYPT_DECRYPT":
            raise UnsupportedKeyError(
                f"AWS KMS key {self.arn} is a {spec} {usage} key: key wrapping needs a symmetric key "
                f"(KeySpec SYMMETRIC_DEFAULT, KeyUsage ENCRYPT_DECRYPT); create one with "
                f"`aws kms create-key` and its defaults"
            )
        if meta.get("KeyState", "Enabled") != "Enabled":
            raise UnsupportedKeyError(
                f"AWS KMS key {self.arn} is {meta.get('KeyState')}: enable it or configure another KEK"
            )
        self._checked = True

    def wrap(self, dek: bytearray, context: Mapping[str, str]) -> bytes:
        client = self._kms()
        with kms_errors("Encrypt", self.arn, self._endpoint()):
            answer = client.encrypt(
                KeyId=self.arn, Plaintext=bytes(dek), EncryptionContext=dict(context),
                EncryptionAlgorithm=_ALGORITHM,
            )
        if answer.get("KeyId") != self.arn:
            raise UnsupportedKeyError(
                f"AWS KMS answered Encrypt for {self.arn} with another key ({answer.get('KeyId')}): refusing"
            )
        algorithm = answer.get("EncryptionAlgorithm")
        if algorithm not in (None, _ALGORITHM):
            raise UnsupportedKeyError(f"AWS KMS key {self.arn} encrypted with {algorithm}, not {_ALGORITHM}")
        return bytes(answer["CiphertextBlob"])

    def unwrap(self, wrapped: bytes, context: Mapping[str, str], where: str) -> bytearray:
        from botocore.exceptions import ClientError

        client = self._kms()
        with kms_errors("Decrypt", self.arn, self._endpoint()):
            try:
                answer = client.decrypt(
                    CiphertextBlob=wrapped, KeyId=self.arn, EncryptionContext=dict(context),
                    EncryptionAlgorithm=_ALGORITHM,
                )
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                text = str(exc.response.get("Error", {}).get("Message", ""))
                # KMS answers a blob whose embedded key reference was damaged with AccessDenied and this text.
                if code in {"InvalidCiphertextException", "IncorrectKeyException"} or (
                    code == "AccessDeniedException" and "ciphertext refers to" in text
                ):
                    raise WrappedRecordError(
                        f"{where}: AWS KMS key {self.arn} refused its wrapped DEK for this record ({code}: "
                        f"the record was tampered with, or its DEK belongs to another record): restore it"
                    ) from exc
                raise
        if answer.get("KeyId") != self.arn:
            raise WrappedRecordError(
                f"{where}: AWS KMS decrypted its DEK with another key ({answer.get('KeyId')}), not {self.arn}"
            )
        dek = bytearray(answer["Plaintext"])
        if len(dek) != DEK_SIZE:
            zero(dek)
            raise WrappedRecordError(f"{where}: its wrapped DEK is not a {DEK_SIZE * 8}-bit key")
        return dek

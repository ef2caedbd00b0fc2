"""`awskms:<key id | key ARN | alias/NAME | alias ARN>`: an asymmetric AWS KMS key that never leaves KMS.

IAM permissions on the key:
- `kms:GetPublicKey`: once per signer (the public key, key usage and signing algorithms are cached).
- `kms:Sign`: once per signature, with `MessageType=DIGEST` (keyseal hashes the data itself).
- `kms:DescribeKey` (optional): only for `created_at()`, the default creation time of a minted certificate;
  without it `keyseal keys mint` asks for `--created`.
Making keys (`keys create --kms`, rotation) is `keyseal._internal.providers.aws.kms`.

Key specs: RSA_2048/3072/4096 (RSASSA_PKCS1_V1_5_SHA_256/384/512) and ECC_NIST_P256/P384/P521 (ECDSA with the
curve's own hash). A key that cannot sign, or a hash the key does not offer, is refused: keyseal never picks
another algorithm behind the caller's back.

After the first GetPublicKey the signer addresses the key by its ARN, so an alias moved to another key while a
process runs cannot make it sign with a key whose public half it does not hold.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from keyseal._internal.backends import BackendOptions
from keyseal._internal.providers.aws.client import kms_client, kms_errors
from keyseal._internal.providers.aws.kms import ALIAS_PATTERN
from keyseal.errors import (
    AccessDeniedError,
    KeysealError,
    KeyURIError,
    UnsupportedKeyError,
    UsageError,
)
from keyseal.signer import HASH_NAMES, HashName, PublicKey, Signer, hash_algorithm

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient
    from mypy_boto3_kms.literals import SigningAlgorithmSpecType

__all__ = [
    "AwsKmsSigner",
    "KeyRef",
    "open",
    "parse_key_ref",
]

_PARTITION = r"aws[a-z-]*"
_REGION = r"[a-z]{2}(?:-[a-z0-9]+)+-\d+"
_ACCOUNT = r"\d{12}"
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_KEY_ID = rf"(?:{_UUID}|mrk-[0-9a-fA-F]{{32}})"
_ALIAS = ALIAS_PATTERN
_KEY_ID_RE = re.compile(rf"{_KEY_ID}")
_ALIAS_RE = re.compile(_ALIAS)
_KEY_ARN_RE = re.compile(rf"arn:{_PARTITION}:kms:(?P<region>{_REGION}):{_ACCOUNT}:key/{_KEY_ID}")
_ALIAS_ARN_RE = re.compile(rf"arn:{_PARTITION}:kms:(?P<region>{_REGION}):{_ACCOUNT}:{_ALIAS}")

# KMS key spec -> (key family, {hash: signing algorithm}). Only PKCS#1 v1.5 for RSA: OpenPGP v4 RSA is v1.5.
_RSA_ALGORITHMS: dict[HashName, SigningAlgorithmSpecType] = {
    "sha256": "RSASSA_PKCS1_V1_5_SHA_256",
    "sha384": "RSASSA_PKCS1_V1_5_SHA_384",
    "sha512": "RSASSA_PKCS1_V1_5_SHA_512",
}
_ECDSA_ALGORITHMS: dict[HashName, SigningAlgorithmSpecType] = {
    "sha256": "ECDSA_SHA_256",
    "sha384": "ECDSA_SHA_384",
    "sha512": "ECDSA_SHA_512",
}
_SUPPORTED_SPECS: dict[str, dict[HashName, SigningAlgorithmSpecType]] = {
    "RSA_2048": _RSA_ALGORITHMS,
    "RSA_3072": _RSA_ALGORITHMS,
    "RSA_4096": _RSA_ALGORITHMS,
    "ECC_NIST_P256": _ECDSA_ALGORITHMS,
    "ECC_NIST_P384": _ECDSA_ALGORITHMS,
    "ECC_NIST_P521": _ECDSA_ALGORITHMS,
}
_CURVE_SPECS = {"secp256r1": "ECC_NIST_P256", "secp384r1": "ECC_NIST_P384", "secp521r1": "ECC_NIST_P521"}



@dataclass(frozen=True)
class KeyRef:
    """A validated KMS key reference; `region` is set for an ARN, which names its region."""

    value: str
    kind: Literal["key-id", "key-arn", "alias", "alias-arn"]
    region: str | None


def parse_key_ref(ref: str) -> KeyRef:
    """Validate a key ID, key ARN, alias/NAME or alias ARN; anything else is a KeyURIError."""
    if _KEY_ID_RE.fullmatch(ref):
        return KeyRef(ref, "key-id", None)
    if match := _KEY_ARN_RE.fullmatch(ref):
        return KeyRef(ref, "key-arn", match["region"])
    if _ALIAS_RE.fullmatch(ref):
        return KeyRef(ref, "alias", None)
    if match := _ALIAS_ARN_RE.fullmatch(ref):
        return KeyRef(ref, "alias-arn", match["region"])
    raise KeyURIError(
        f"invalid AWS KMS key reference {ref!r}: use awskms:KEY_ID (a UUID or mrk-...), awskms:alias/NAME, "
        f"or a key or alias ARN (awskms:arn:aws:kms:REGION:ACCOUNT:key/KEY_ID)"
    )


def open(uri: str, rest: str, options: BackendOptions) -> AwsKmsSigner:  # registry entry point
    """Registry entry point for `awskms:` URIs. Validates the reference; makes no remote call yet."""
    ref = parse_key_ref(rest)
    return AwsKmsSigner(uri, ref, endpoint=options.kms_endpoint, region=options.region or ref.region)


@dataclass(frozen=True)
class _KeyInfo:
    """What one GetPublicKey tells us, kept for the signer's lifetime."""

    key_id: str  # the key ARN on AWS (never an alias)
    key_spec: str
    public_key: PublicKey
    algorithms: dict[HashName, SigningAlgorithmSpecType]  # hashes the key offers -> their KMS algorithm


class AwsKmsSigner(Signer):
    """Signs digests with an asymmetric KMS key. Thread-safe: several files may be signed at once."""

    def __init__(self, uri: str, ref: KeyRef, endpoint: str | None = None, region: str | None = None, *,
                 client: KMSClient | None = None) -> None:
        """`client`: a KMS client owned by the caller and shared by many keys (a boto3 client costs about
        9 MiB); `close()` then leaves it open."""
        self.uri = uri
        self.ref = ref
        self._endpoint = endpoint
        self._region = region
        self._lock = threading.Lock()  # one GetPublicKey even when several threads sign at once
        self._client_lock = threading.Lock()
        self._client: KMSClient | None = client
        self._owns_client = client is None
        self._info: _KeyInfo | None = None
        self._created: datetime | None = None

    # -- remote plumbing -------------------------------------------------------------------------------

    def _kms(self) -> KMSClient:
        with self._client_lock:
            if self._client is None:
                self._client = kms_client(self._endpoint, self._region)
            return self._client

    def _key_info(self) -> _KeyInfo:
        with self._lock:
            if self._info is None:
                self._info = self._fetch_key_info()
            return self._info

    def _fetch_key_info(self) -> _KeyInfo:
        client = self._kms()
        with kms_errors("GetPublicKey", self.ref.value, client.meta.endpoint_url):
            response = client.get_public_key(KeyId=self.ref.value)
        # AWS reports the key ARN here; signing by it pins the key even if an alias moves later.
        key_id = str(response.get("KeyId") or self.ref.value)
        usage = response.get("KeyUsage")
        if usage != "SIGN_VERIFY":
            raise UnsupportedKeyError(
                f"AWS KMS key {self.ref.value} is not an asymmetric signing key (key usage "
                f"{usage or 'unknown'}, not SIGN_VERIFY), so it cannot sign: use a SIGN_VERIFY key "
                f"(keyseal keys create --kms)"
            )
        public_key = _load_public_key(bytes(response["PublicKey"]), self.ref.value)
        # KeySpec, else the deprecated CustomerMasterKeySpec, else what the public key itself is.
        spec = str(
            response.get("KeySpec") or response.get("CustomerMasterKeySpec") or _spec_of(public_key)
        )
        if spec not in _SUPPORTED_SPECS:
            raise UnsupportedKeyError(
                f"AWS KMS key {self.ref.value} has key spec {spec}, which keyseal cannot sign with: use "
                f"{', '.join(_SUPPORTED_SPECS)}"
            )
        if spec != _spec_of(public_key):
            raise UnsupportedKeyError(
                f"AWS KMS key {self.ref.value} reports key spec {spec} but its public key is "
                f"{_spec_of(public_key)}: refusing to use an inconsistent key"
            )
        offered = set(response.get("SigningAlgorithms") or ())
        algorithms = {h: alg for h, alg in _SUPPORTED_SPECS[spec].items() if alg in offered}
        if not algorithms:
            raise UnsupportedKeyError(
                f"AWS KMS key {self.ref.value} ({spec}) offers none of the signing algorithms keyseal uses "
                f"({', '.join(_SUPPORTED_SPECS[spec].values())}); "
                f"it offers {', '.join(sorted(offered)) or 'none'}"
            )
        return _KeyInfo(key_id=key_id, key_spec=spec, public_key=public_key, algorithms=algorithms)

    # -- Signer contract -------------------------------------------------------------------------------

    def public_key(self) -> PublicKey:
        """The key's public half from one `kms:GetPublicKey` call, cached for the signer's lifetime."""
        return self._key_info().public_key

    @property
    def key_id(self) -> str:
        """The key as GetPublicKey named it (the key ARN on AWS; an alias resolved). Costs that one call."""
        return self._key_info().key_id

    @property
    def key_spec(self) -> str:
        """The KMS key spec, e.g. ECC_NIST_P384."""
        return self._key_info().key_spec

    def supported_hashes(self) -> tuple[HashName, ...]:
        """The hashes whose signing algorithm this key offers (a P-384 key: only sha384)."""
        algorithms = self._key_info().algorithms
        return tuple(h for h in HASH_NAMES if h in algorithms)

    def sign_digest(self, digest: bytes, hash_name: HashName) -> bytes:
        """One `kms:Sign` with MessageType=DIGEST; RSA signatures raw, ECDSA as DER.

        The signature is checked against the cached public key before it is returned, so a misbehaving
        service or a wrong key can never produce a signature keyseal would publish.
        """
        info = self._key_info()
        algorithm = info.algorithms.get(hash_name)
        if algorithm is None:
            offered = ", ".join(h for h in HASH_NAMES if h in info.algorithms)
            raise UnsupportedKeyError(
                f"AWS KMS key {self.ref.value} ({info.key_spec}) cannot sign a {hash_name} digest: it offers "
                f"only {offered}; choose that digest"
            )
        expected = hash_algorithm(hash_name).digest_size
        if len(digest) != expected:
            raise UsageError(f"a {hash_name} digest is {expected} bytes, got {len(digest)}")
        client = self._kms()
        with kms_errors("Sign", self.ref.value, client.meta.endpoint_url):
            response = client.sign(
                KeyId=info.key_id, Message=digest, MessageType="DIGEST", SigningAlgorithm=algorithm
            )
        returned = response.get("SigningAlgorithm")
        if returned != algorithm:
            raise KeysealError(
                f"AWS KMS signed with {returned} although {algorithm} was requested for {self.ref.value}: "
                f"refusing the signature"
            )
        signature = bytes(response["Signature"])
        _check_signature(info.public_key, signature, digest, hash_name, self.ref.value)
        return signature

    def created_at(self) -> datetime | None:
        """The key's CreationDate from `kms:DescribeKey` (cached). Denied: ask for `--created` instead."""
        if self._created is not None:
            return self._created
        client = self._kms()
        key_id = self._info.key_id if self._info is not None else self.ref.value
        try:
            with kms_errors("DescribeKey", self.ref.value, client.meta.endpoint_url):
                response = client.describe_key(KeyId=key_id)
        except AccessDeniedError as exc:
            raise AccessDeniedError(
                f"cannot read the creation date of AWS KMS key {self.ref.value}: AWS KMS denied "
                f"kms:DescribeKey (a signer role usually has only kms:Sign and kms:GetPublicKey); pass "
                f"--created RFC3339 to `keyseal keys mint`, the same value every time so the fingerprint "
                f"stays the same"
            ) from exc
        created = response["KeyMetadata"].get("CreationDate")
        if created is None:
            return None
        if created.tzinfo is None:
            created = created.replace(tzinfo=UTC)
        self._created = created.astimezone(UTC)
        return self._created

    def close(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None and self._owns_client:
            client.close()


def _load_public_key(der: bytes, ref: str) -> PublicKey:
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise UnsupportedKeyError(
            f"AWS KMS returned a public key for {ref} that keyseal cannot read"
        ) from exc
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise UnsupportedKeyError(
            f"AWS KMS key {ref} is not an RSA or NIST ECDSA key: keyseal cannot sign with it"
        )
    return key


def _spec_of(public_key: PublicKey) -> str:
    """The KMS key spec a public key corresponds to (derived, for services that omit KeySpec)."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA_{public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return _CURVE_SPECS.get(public_key.curve.name, f"EC_{public_key.curve.name}")
    return type(public_key).__name__


def _check_signature(
    public_key: PublicKey, signature: bytes, digest: bytes, hash_name: HashName, ref: str
) -> None:
    prehashed = utils.Prehashed(hash_algorithm(hash_name))
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, digest, padding.PKCS1v15(), prehashed)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, digest, ec.ECDSA(prehashed))
        else:  # pragma: no cover - _load_public_key admits only RSA and EC
            raise UnsupportedKeyError(f"AWS KMS key {ref}: unsupported key type")
    except (InvalidSignature, ValueError) as exc:
        raise KeysealError(
            f"AWS KMS returned a signature for {ref} that does not verify with the key's public key: "
            f"refusing it"
        ) from exc

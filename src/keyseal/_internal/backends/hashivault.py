"""`hashivault://<mount>/<key>[?version=N]`: a Vault / OpenBao Transit key that never leaves Transit.

`vault:<mount>/<key>[?version=N]` is an alias (the KEK spelling; see `keyseal._internal.providers.vault.uri`).
The mount defaults to `transit` (`hashivault://release` is `hashivault://transit/release`). Address, token,
namespace and CA bundle come from the environment or explicit settings (see `providers.vault.client`).

Vault policy capabilities on the key (`keyseal vault-policy --for sign` prints them):
- `read` on `<mount>/keys/<key>`: once per signer (public key of the signing version, key type, creation time).
- `update` on `<mount>/sign/<key>`: once per signature. The hash goes in the request body, so no
  `<mount>/sign/<key>/*` path is needed.
`create_transit_key` also needs `create` and `read` on `<mount>/keys/<key>`.

Key types: ecdsa-p256/p384/p521 (prehashed, ASN.1 DER signatures), rsa-2048/3072/4096 (PKCS#1 v1.5, prehashed)
and ed25519 (the digest itself is the signed message, as OpenPGP v4 EdDSA signs it: never Ed25519ph).
Without `?version=N` the latest version when the signer first reads the key is used for every signature of
that signer, so a rotation in the middle of a run cannot mix keys; `keys mint` frames that version's public key.
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from keyseal._internal.backends import BackendOptions
from keyseal._internal.providers.vault.client import VaultConnection, VaultSettings, vault_client
from keyseal._internal.providers.vault.errors import vault_errors
from keyseal._internal.providers.vault.uri import TransitKeyRef, parse_transit_ref
from keyseal.errors import KeyNotFoundError, KeysealError, KeyURIError, UnsupportedKeyError, UsageError
from keyseal.signer import HASH_NAMES, HashName, PublicKey, Signer, hash_algorithm

__all__ = ["KEY_TYPES", "HashiVaultSigner", "create_transit_key", "open"]

# keyseal key type -> Transit key type
KEY_TYPES: dict[str, str] = {
    "p256": "ecdsa-p256",
    "p384": "ecdsa-p384",
    "p521": "ecdsa-p521",
    "rsa2048": "rsa-2048",
    "rsa3072": "rsa-3072",
    "rsa4096": "rsa-4096",
    "ed25519": "ed25519",
}
_CURVES = {"ecdsa-p256": "secp256r1", "ecdsa-p384": "secp384r1", "ecdsa-p521": "secp521r1"}
_RSA_BITS = {"rsa-2048": 2048, "rsa-3072": 3072, "rsa-4096": 4096}
_TRANSIT_HASH: dict[HashName, str] = {"sha256": "sha2-256", "sha384": "sha2-384", "sha512": "sha2-512"}
_SIGNATURE_RE = re.compile(r"vault:v([0-9]+):([A-Za-z0-9+/=]+)")


def open(uri: str, rest: str, options: BackendOptions) -> HashiVaultSigner:  # registry entry point
    """Registry entry point for `hashivault://` URIs and their alias `vault:`. Validates the URI; makes no
    remote call yet."""
    return HashiVaultSigner(uri, parse_transit_ref(uri))


@dataclass(frozen=True)
class _KeyInfo:
    """What one read of the key tells us, kept for the signer's lifetime."""

    key_type: str
    version: int
    public_key: PublicKey
    created: datetime | None


class HashiVaultSigner(Signer):
    """Signs digests with a Transit key. Thread-safe: several files may be signed at once."""

    def __init__(self, uri: str, ref: TransitKeyRef, settings: VaultSettings | None = None) -> None:
        self.uri = uri
        self.ref = ref
        self._vault = VaultConnection(settings)
        self._lock = threading.Lock()
        self._info: _KeyInfo | None = None

    def _key_info(self) -> _KeyInfo:
        with self._lock:
            if self._info is None:
                self._info = self._fetch_key_info()
            return self._info

    def _fetch_key_info(self) -> _KeyInfo:
        answer = self._vault.call(
            "read", self.ref.path("keys"), f"reading Transit key {self.ref.key_uri}",
            lambda client: client.secrets.transit.read_key(name=self.ref.name, mount_point=self.ref.mount),
        )
        data = answer["data"]
        key_type = str(data.get("type", ""))
        if key_type not in KEY_TYPES.values() or not data.get("supports_signing", True):
            raise UnsupportedKeyError(
                f"Transit key {self.ref.key_uri} is a {key_type or 'unknown'} key, which cannot sign: use an "
                f"{', '.join(KEY_TYPES.values())} key (keyseal keys create --vault)"
            )
        latest = int(data.get("latest_version") or 0)
        version = self.ref.version if self.ref.version is not None else latest
        versions: dict[str, Any] = data.get("keys") or {}
        entry = versions.get(str(version))
        if not isinstance(entry, dict):
            available = ", ".join(sorted(versions, key=int)) or "none"
            raise KeyNotFoundError(
                f"Transit key {self.ref.key_uri} has no version {version} (available: {available}; latest "
                f"{latest}): pin an existing version with ?version=N"
            )
        public_key = _load_public_key(key_type, str(entry.get("public_key") or ""), self.ref.key_uri, version)
        return _KeyInfo(key_type, version, public_key, _parse_time(entry.get("creation_time")))

    # -- Signer contract -------------------------------------------------------------------------------

    def public_key(self) -> PublicKey:
        """The signing version's public key, from one read of the key, cached for the signer's lifetime."""
        return self._key_info().public_key

    @property
    def version(self) -> int:
        """The key version every signature of this signer is made with (pinned, or latest at first read)."""
        return self._key_info().version

    @property
    def key_type(self) -> str:
        """The Transit key type, e.g. ecdsa-p384."""
        return self._key_info().key_type

    def supported_hashes(self) -> tuple[HashName, ...]:
        """Transit signs every SHA-2 digest with every key type (Ed25519 signs the digest as the message)."""
        return HASH_NAMES

    def sign_digest(self, digest: bytes, hash_name: HashName) -> bytes:
        """One Transit sign call, pinned to the signer's key version; checked against its public key."""
        info = self._key_info()
        if hash_name not in _TRANSIT_HASH:
            raise UsageError(f"unsupported digest {hash_name}: use one of {', '.join(HASH_NAMES)}")
        expected = hash_algorithm(hash_name).digest_size
        if len(digest) != expected:
            raise UsageError(f"a {hash_name} digest is {expected} bytes, got {len(digest)}")
        return self._sign(info, digest, hash_name)

    def sign_message(self, message: bytes) -> bytes:
        """Transit Ed25519 over the message itself, of any length (SSH signatures, minisign)."""
        info = self._key_info()
        if info.key_type != "ed25519":
            raise UnsupportedKeyError(f"Transit key {self.ref.key_uri} is {info.key_type}, not ed25519")
        return self._sign(info, message, "sha512")

    def _sign(self, info: _KeyInfo, digest: bytes, hash_name: HashName) -> bytes:
        params: dict[str, Any] = {"key_version": info.version}
        if info.key_type != "ed25519":  # Ed25519: the digest is the message (no prehashed: that is Ed25519ph)
            params.update(prehashed=True, hash_algorithm=_TRANSIT_HASH[hash_name])
            if info.key_type.startswith("rsa-"):
                params["signature_algorithm"] = "pkcs1v15"
            else:
                params["marshaling_algorithm"] = "asn1"
        answer = self._vault.call(
            "update", self.ref.path("sign"), f"signing with Transit key {self.ref.key_uri}",
            lambda client: client.secrets.transit.sign_data(
                name=self.ref.name, hash_input=base64.b64encode(digest).decode("ascii"),
                mount_point=self.ref.mount, **params,
            ),
        )
        signature = _parse_signature(str((answer.get("data") or {}).get("signature", "")), info.version, self.ref)
        _check_signature(info.public_key, signature, digest, hash_name, self.ref.key_uri)
        return signature

    def created_at(self) -> datetime | None:
        """The signing version's creation time in Transit (part of the same read as the public key)."""
        return self._key_info().created

    def close(self) -> None:
        self._vault.close()


def _load_public_key(key_type: str, text: str, uri: str, version: int) -> PublicKey:
    bad = UnsupportedKeyError(f"Vault returned a public key for {uri} version {version} that keyseal cannot read")
    try:
        if key_type == "ed25519":
            return ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
        key = serialization.load_pem_public_key(text.encode("ascii"))
    except (ValueError, UnsupportedAlgorithm, binascii.Error, UnicodeEncodeError) as exc:
        raise bad from exc
    if key_type in _CURVES and isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == _CURVES[key_type]:
        return key
    if key_type in _RSA_BITS and isinstance(key, rsa.RSAPublicKey) and key.key_size == _RSA_BITS[key_type]:
        return key
    raise UnsupportedKeyError(
        f"Transit key {uri} is a {key_type} key but version {version}'s public key is not: refusing an "
        f"inconsistent key"
    )


def _parse_time(value: object) -> datetime | None:
    """Transit's RFC 3339 times carry nanoseconds; keep whole seconds (all an OpenPGP key records)."""
    if not isinstance(value, str):
        return None
    match = re.fullmatch(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.\d+)?(Z|[+-]\d{2}:\d{2})", value)
    if match is None:
        return None
    zone = "+00:00" if match.group(2) == "Z" else match.group(2)
    try:
        return datetime.fromisoformat(match.group(1) + zone).astimezone(UTC)
    except ValueError:
        return None


def _parse_signature(text: str, version: int, ref: TransitKeyRef) -> bytes:
    match = _SIGNATURE_RE.fullmatch(text)
    if match is None:
        raise KeysealError(f"Vault returned a malformed signature for {ref.key_uri}: refusing it")
    if int(match.group(1)) != version:
        raise KeysealError(
            f"Vault signed with version {match.group(1)} of {ref.key_uri} although version {version} was "
            f"requested: refusing the signature"
        )
    try:
        return base64.b64decode(match.group(2), validate=True)
    except binascii.Error as exc:
        raise KeysealError(f"Vault returned a malformed signature for {ref.key_uri}: refusing it") from exc


def _check_signature(public_key: PublicKey, signature: bytes, digest: bytes, hash_name: HashName, uri: str) -> None:
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, digest)
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, digest, padding.PKCS1v15(), utils.Prehashed(hash_algorithm(hash_name)))
        else:
            public_key.verify(signature, digest, ec.ECDSA(utils.Prehashed(hash_algorithm(hash_name))))
    except (InvalidSignature, ValueError) as exc:
        raise KeysealError(
            f"Vault returned a signature for {uri} that does not verify with the key's public key: refusing it"
        ) from exc


# -- key creation --------------------------------------------------------------------------------------


def create_transit_key(uri: str, key_type: str, settings: VaultSettings | None = None) -> str:
    """Create a non-exportable Transit signing key; return its canonical URI.

    An existing key is refused (Transit itself would silently keep the old key and its type), and the key is
    read back so a concurrent creation of another type cannot go unnoticed.
    """
    ref = parse_transit_ref(uri)
    if ref.version is not None:
        raise KeyURIError(f"{uri} pins a version: create the key with {ref.key_uri}")
    transit_type = KEY_TYPES.get(key_type)
    if transit_type is None:
        raise UsageError(f"unknown Transit key type {key_type!r}: use one of {', '.join(KEY_TYPES)}")
    from hvac.exceptions import InvalidPath

    client = vault_client(settings)
    transit: Any = client.secrets.transit
    keys_path = ref.path("keys")
    existing: Any = None
    with vault_errors(client, "read", keys_path, f"checking for Transit key {ref.key_uri}"):
        try:
            existing = transit.read_key(name=ref.name, mount_point=ref.mount)
        except InvalidPath as exc:
            if "no handler for route" in str(exc.errors or ""):
                raise
    try:
        if existing is not None:
            raise UsageError(
                f"Transit key {ref.key_uri} already exists (a {existing['data'].get('type')} key): use it as "
                f"{ref.key_uri}, or choose another name"
            )
        with vault_errors(client, "create", keys_path, f"creating Transit key {ref.key_uri}"):
            transit.create_key(name=ref.name, key_type=transit_type, exportable=False,
                               allow_plaintext_backup=False, mount_point=ref.mount)
        with vault_errors(client, "read", keys_path, f"reading back Transit key {ref.key_uri}"):
            data = transit.read_key(name=ref.name, mount_point=ref.mount)["data"]
    finally:
        client.adapter.close()
    if data.get("type") != transit_type or data.get("exportable"):
        raise UnsupportedKeyError(
            f"Transit key {ref.key_uri} was created concurrently as a {data.get('type')} key"
            f"{' (exportable)' if data.get('exportable') else ''}: not the {transit_type} key asked for"
        )
    return ref.key_uri

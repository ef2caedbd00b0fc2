"""`pkcs11:` keys held in a hardware security module (or SoftHSM), addressed by an RFC 7512 URI.

    pkcs11:token=release;object=signing-2025?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/pin

The module comes from `module-path=` or `KEYSEAL_PKCS11_MODULE`; the user PIN from `pin-source=file:PATH`,
`pin-value=` (accepted, warned about: it shows in process listings), `KEYSEAL_PKCS11_PIN`, or a prompt when
stdin is a terminal. The PIN is never logged, stored, or put in a message.

Permissions needed: the token's user PIN; the key objects need CKA_SIGN. Mechanisms: CKM_RSA_PKCS (over a
DigestInfo-prefixed digest), CKM_ECDSA (over the digest; raw r||s is turned into DER), CKM_EDDSA (Ed25519 over
the digest as the message, as OpenPGP v4 EdDSA does).

Sessions: one logged-in read-only session per token per process, shared by every signer on that token and by
the CA's pkcs11 custody (keyseal._internal.providers.pkcs11.session), closed when the last signer closes and at
interpreter exit. A session per thread would break the promise python-pkcs11 makes the module (C_Initialize
with no locking: one thread at a time); one session also keeps HSM sessions, often a licensed resource, at one.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, utils

from keyseal._internal.providers.pkcs11 import uri as pkcs11uri
from keyseal._internal.providers.pkcs11.session import TokenSession, acquire_session, python_pkcs11
from keyseal._internal.providers.pkcs11.uri import Pkcs11URI
from keyseal.errors import (
    AccessDeniedError,
    BackendUnavailableError,
    KeyNotFoundError,
    KeysealError,
    KeyURIError,
    OutputExistsError,
    UnsupportedKeyError,
    UsageError,
)
from keyseal.signer import HashName, PublicKey, Signer

if TYPE_CHECKING:
    from types import ModuleType

    import pkcs11 as p11

log = logging.getLogger(__name__)

__all__ = ["KEY_SPECS", "KEY_TYPES", "Pkcs11Signer", "create_key", "open"]

# DER DigestInfo prefixes (RFC 8017 section 9.2, note 1): CKM_RSA_PKCS pads what it is given, nothing more.
_DIGEST_INFO: dict[str, bytes] = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
_DIGEST_SIZE = {"sha256": 32, "sha384": 48, "sha512": 64}

# CKA_EC_PARAMS as DER: a named-curve OID, or (PKCS#11 3.0, Edwards curves) a PrintableString curve name.
_CURVES: dict[bytes, ec.EllipticCurve] = {
    bytes.fromhex("06082a8648ce3d030107"): ec.SECP256R1(),
    bytes.fromhex("06052b81040022"): ec.SECP384R1(),
    bytes.fromhex("06052b81040023"): ec.SECP521R1(),
}
_ED25519_PARAMS = (bytes.fromhex("06032b6570"), b"\x13\x0cedwards25519")


@dataclass(frozen=True)
class _KeySpec:
    kind: str  # "rsa" | "ec" | "ed25519"
    bits: int
    ec_params: bytes = b""


KEY_SPECS: dict[str, _KeySpec] = {
    "rsa2048": _KeySpec("rsa", 2048),
    "rsa3072": _KeySpec("rsa", 3072),
    "rsa4096": _KeySpec("rsa", 4096),
    "p256": _KeySpec("ec", 256, bytes.fromhex("06082a8648ce3d030107")),
    "p384": _KeySpec("ec", 384, bytes.fromhex("06052b81040022")),
    "p521": _KeySpec("ec", 521, bytes.fromhex("06052b81040023")),
    "ed25519": _KeySpec("ed25519", 255, _ED25519_PARAMS[0]),
}
KEY_TYPES: tuple[str, ...] = tuple(KEY_SPECS)


# ----------------------------------------------------------------------------------------------------
# Keys.


def _der_octet_string(data: bytes) -> bytes | None:
    """The content of a DER OCTET STRING, or None if `data` is not exactly one."""
    if len(data) < 2 or data[0] != 0x04:
        return None
    length, offset = data[1], 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 2 or len(data) < 2 + count:
            return None
        length, offset = int.from_bytes(data[2:2 + count], "big"), 2 + count
    return data[offset:] if len(data) - offset == length else None


def _public_key_from(obj: Any, key_type: Any, described: str) -> PublicKey:
    """A `cryptography` public key from a PKCS#11 public key object (or an RSA private key's public parts)."""
    pkcs11 = python_pkcs11()
    attr = pkcs11.Attribute
    if key_type == pkcs11.KeyType.RSA:
        modulus, exponent = obj[attr.MODULUS], obj[attr.PUBLIC_EXPONENT]
        numbers = rsa.RSAPublicNumbers(int.from_bytes(exponent, "big"), int.from_bytes(modulus, "big"))
        return numbers.public_key()
    params, point = bytes(obj[attr.EC_PARAMS]), bytes(obj[attr.EC_POINT])
    raw = _der_octet_string(point)
    if key_type == pkcs11.KeyType.EC_EDWARDS:
        if params not in _ED25519_PARAMS:
            raise UnsupportedKeyError(f"PKCS#11 key {described} is an Edwards key not on curve 25519")
        data = raw if raw is not None and len(raw) == 32 else point
        if len(data) != 32:
            raise UnsupportedKeyError(f"PKCS#11 key {described} has a malformed Ed25519 public point")
        return ed25519.Ed25519PublicKey.from_public_bytes(data)
    curve = _CURVES.get(params)
    if curve is None:
        raise UnsupportedKeyError(
            f"PKCS#11 key {described} is on a curve keyseal does not sign with (use P-256, P-384, P-521)"
        )
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, raw if raw is not None else point)
    except ValueError as exc:
        raise UnsupportedKeyError(f"PKCS#11 key {described} has a malformed EC public point") from exc


def _search(session: p11.Session, attrs: dict[Any, Any]) -> list[Any]:
    return list(session.get_objects(attrs))


def _find_key_pair(shared: TokenSession, uri: Pkcs11URI) -> tuple[Any, Any, PublicKey]:
    """(private key object, key type, public key) for the URI's object/id."""
    pkcs11 = python_pkcs11()
    attr = pkcs11.Attribute
    if uri.object is None and uri.id is None:
        raise KeyURIError(
            f"PKCS#11 URI {uri.redacted()!r} names no key: add object=LABEL (or id=%XX...) to the path"
        )
    if uri.path.get("type") not in (None, "private", "public"):
        raise UnsupportedKeyError(
            f"type={uri.path['type']!r} in {uri.redacted()!r} names no signing key: "
            "use type=private or leave it out"
        )
    described = f"{uri.describe_key()} on token {shared.label!r}"
    query: dict[Any, Any] = {attr.CLASS: pkcs11.ObjectClass.PRIVATE_KEY}
    if uri.object is not None:
        query[attr.LABEL] = uri.object
    if uri.id is not None:
        query[attr.ID] = uri.id
    session = shared.session
    try:
        found = _search(session, query)
        if not found:
            public_only = _search(session, {**query, attr.CLASS: pkcs11.ObjectClass.PUBLIC_KEY})
            hint = (" (only its public key is there: is the PIN's user the key's owner?)" if public_only
                    else ": create it with keyseal keys create --pkcs11 URI --type TYPE")
            raise KeyNotFoundError(f"no private key {described}{hint}")
        if len(found) > 1:
            raise KeyURIError(
                f"{len(found)} private keys match {described}: add id=%XX... to the URI to pick one"
            )
        private = found[0]
        key_type = private[attr.KEY_TYPE]
        if key_type not in (pkcs11.KeyType.RSA, pkcs11.KeyType.EC, pkcs11.KeyType.EC_EDWARDS):
            raise UnsupportedKeyError(
                f"PKCS#11 key {described} is {key_type!r}: keyseal signs with RSA, ECDSA and Ed25519 keys"
            )
        if not private[attr.SIGN]:
            raise UnsupportedKeyError(f"PKCS#11 key {described} does not allow signing (CKA_SIGN is false)")
        public_query: dict[Any, Any] = {attr.CLASS: pkcs11.ObjectClass.PUBLIC_KEY, attr.KEY_TYPE: key_type}
        for name, value in ((attr.LABEL, private[attr.LABEL]), (attr.ID, private[attr.ID])):
            if value:
                public_query[name] = value
        publics = _search(session, public_query)
        if len(publics) == 1:
            public_key = _public_key_from(publics[0], key_type, described)
        elif key_type == pkcs11.KeyType.RSA:
            public_key = _public_key_from(private, key_type, described)  # modulus and exponent are public
        elif publics:
            raise KeyURIError(f"{len(publics)} public keys match {described}: give the key pair a unique id")
        else:
            raise KeyNotFoundError(f"PKCS#11 key {described} has no public key object on the token")
    except pkcs11.PKCS11Error as exc:
        raise BackendUnavailableError(f"cannot read PKCS#11 key {described} ({type(exc).__name__})") from exc
    return private, key_type, public_key


class Pkcs11Signer(Signer):
    """A private key inside a PKCS#11 token: every signature is one C_Sign call on the shared session."""

    def __init__(self, uri: Pkcs11URI, shared: TokenSession, private: Any, key_type: Any,
                 public_key: PublicKey) -> None:
        self.uri = uri.redacted()
        self._shared: TokenSession | None = shared
        self._lock = shared.module.lock
        self._private = private
        self._public_key = public_key
        self._described = f"{uri.describe_key()} on token {shared.label!r}"
        # Chosen once, so that a signature costs one lock and one C_Sign and little else.
        self._p11 = python_pkcs11()
        mechanism = self._p11.Mechanism
        self._kind = ("rsa" if isinstance(public_key, rsa.RSAPublicKey)
                      else "ec" if isinstance(public_key, ec.EllipticCurvePublicKey) else "ed25519")
        self._mechanism = {"rsa": mechanism.RSA_PKCS, "ec": mechanism.ECDSA, "ed25519": mechanism.EDDSA}[self._kind]

    def public_key(self) -> PublicKey:
        return self._public_key

    def sign_digest(self, digest: bytes, hash_name: HashName) -> bytes:
        if hash_name not in _DIGEST_SIZE:
            raise UsageError(f"unsupported digest {hash_name}: use one of {', '.join(_DIGEST_SIZE)}")
        if _DIGEST_SIZE.get(hash_name) != len(digest):
            expected = _DIGEST_SIZE.get(hash_name)
            raise UsageError(f"a {hash_name} digest is {expected} bytes, not {len(digest)}")
        data = _DIGEST_INFO[hash_name] + digest if self._kind == "rsa" else digest
        return self._sign(data)

    def sign_message(self, message: bytes) -> bytes:
        """CKM_EDDSA over the message itself, of any length (SSH signatures, minisign)."""
        if self._kind != "ed25519":
            raise UnsupportedKeyError(f"PKCS#11 key {self._described} is not an Ed25519 key")
        return self._sign(message)

    def _sign(self, data: bytes) -> bytes:
        with self._lock:
            if self._shared is None or self._shared.closed:
                raise UsageError(f"the PKCS#11 signer for {self._described} is closed")
            try:
                raw: bytes = self._private.sign(data, mechanism=self._mechanism)
            except self._p11.PKCS11Error as exc:
                raise self._sign_error(exc) from exc
        if self._kind == "ec":
            half = len(raw) // 2
            if not raw or len(raw) % 2:
                raise BackendUnavailableError(f"malformed ECDSA signature from the token: {self._described}")
            r, s = int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
            return utils.encode_dss_signature(r, s)
        if self._kind == "ed25519" and len(raw) != 64:
            raise BackendUnavailableError(f"malformed Ed25519 signature from the token: {self._described}")
        return raw

    def key_attributes(self) -> dict[str, bool | None]:
        """The private key's provenance: CKA_LOCAL (generated in the token), CKA_NEVER_EXTRACTABLE,
        CKA_ALWAYS_SENSITIVE, CKA_EXTRACTABLE and CKA_SENSITIVE (None where the token does not say)."""
        attr = self._p11.Attribute
        found: dict[str, bool | None] = {}
        with self._lock:
            for name in ("LOCAL", "NEVER_EXTRACTABLE", "ALWAYS_SENSITIVE", "EXTRACTABLE", "SENSITIVE"):
                try:
                    found[name] = bool(self._private[getattr(attr, name)])
                except self._p11.PKCS11Error:
                    found[name] = None
        return found

    def _sign_error(self, exc: Exception) -> KeysealError:
        p11 = self._p11
        if isinstance(exc, p11.UserNotLoggedIn):
            return AccessDeniedError(f"PKCS#11 token refused to sign with {self._described}: not logged in")
        if isinstance(exc, p11.MechanismInvalid | p11.KeyTypeInconsistent):
            return UnsupportedKeyError(f"PKCS#11 key {self._described} cannot sign with {self._mechanism.name}")
        return BackendUnavailableError(f"PKCS#11 signing with {self._described} failed ({type(exc).__name__})")

    def close(self) -> None:
        shared, self._shared = self._shared, None
        if shared is not None:
            shared.release()


def open(uri: str, rest: str, options: object) -> Pkcs11Signer:
    """Registry entry point: parse, log in (or reuse this process's session), find the key pair."""
    parsed = pkcs11uri.parse(uri)
    shared = acquire_session(parsed)
    try:
        with shared.module.lock:
            private, key_type, public_key = _find_key_pair(shared, parsed)
    except BaseException:
        shared.release()
        raise
    log.info("opened PKCS#11 key %s on token %r", parsed.describe_key(), shared.label)
    return Pkcs11Signer(parsed, shared, private, key_type, public_key)


# ----------------------------------------------------------------------------------------------------
# Key generation inside the token.


def create_key(uri: str, key_type: str) -> None:
    """Generate a key pair inside the token: non-extractable, sensitive, private, stored on the token.

    The URI names the new key with object=LABEL (and optionally id=); an existing object with that label (or
    id) is never replaced. Without id= the pair gets a random 16-byte CKA_ID that links its two halves.
    """
    spec = KEY_SPECS.get(key_type)
    if spec is None:
        raise UsageError(f"unknown key type {key_type!r} in a token: use one of {', '.join(KEY_TYPES)}")
    parsed = pkcs11uri.parse(uri)
    if parsed.object is None:
        raise KeyURIError(f"PKCS#11 URI {parsed.redacted()!r} needs object=LABEL to name the new key")
    pkcs11 = python_pkcs11()
    shared = acquire_session(parsed)
    try:
        with shared.module.lock:
            _generate(pkcs11, shared, parsed, key_type, spec)
    finally:
        shared.release()


def _generate(pkcs11: ModuleType, shared: TokenSession, uri: Pkcs11URI, key_type: str,
              spec: _KeySpec) -> None:
    attr = pkcs11.Attribute
    label = uri.object
    described = f"object={label!r} on token {shared.label!r}"
    try:
        if _search(shared.session, {attr.LABEL: label}):
            raise OutputExistsError(
                f"PKCS#11 token {shared.label!r} already holds an object labelled {label!r}: "
                "choose another object="
            )
        if uri.id is not None and _search(shared.session, {attr.ID: uri.id}):
            raise OutputExistsError(
                f"PKCS#11 token {shared.label!r} already holds an object with id {uri.id.hex()}: "
                "choose another id="
            )
        mech, kt = pkcs11.Mechanism, pkcs11.KeyType
        generator, signer_mechanism, key_class = {
            "rsa": (mech.RSA_PKCS_KEY_PAIR_GEN, mech.RSA_PKCS, kt.RSA),
            "ec": (mech.EC_KEY_PAIR_GEN, mech.ECDSA, kt.EC),
            "ed25519": (mech.EC_EDWARDS_KEY_PAIR_GEN, mech.EDDSA, kt.EC_EDWARDS),
        }[spec.kind]
        mechanisms = shared.token.slot.get_mechanisms()
        missing = [m.name for m in (generator, signer_mechanism) if m not in mechanisms]
        if missing:
            raise UnsupportedKeyError(
                f"PKCS#11 token {shared.label!r} cannot make {key_type} keys "
                f"(it lacks {', '.join(missing)}): pick another --type"
            )
        if spec.kind == "rsa":
            info = shared.token.slot.get_mechanism_info(generator)
            low, high = info.min_key_length or 0, info.max_key_length or 0
            if high and not low <= spec.bits <= high:
                raise UnsupportedKeyError(
                    f"PKCS#11 token {shared.label!r} makes RSA keys of {low}-{high} bits, "
                    f"not {spec.bits}: pick another --type"
                )
        key_id = uri.id if uri.id is not None else secrets.token_bytes(16)
        private_template = {
            attr.TOKEN: True, attr.PRIVATE: True, attr.SENSITIVE: True, attr.EXTRACTABLE: False,
            attr.SIGN: True, attr.DECRYPT: False, attr.UNWRAP: False, attr.DERIVE: False,
        }
        public_template: dict[Any, Any] = {attr.TOKEN: True, attr.PRIVATE: False, attr.VERIFY: True,
                                           attr.ENCRYPT: False, attr.WRAP: False}
        if spec.ec_params:
            public_template[attr.EC_PARAMS] = spec.ec_params
        flags = pkcs11.MechanismFlag.SIGN | pkcs11.MechanismFlag.VERIFY
        with shared.token.open(rw=True) as rw_session:  # the login state of the shared session covers it
            rw_session.generate_keypair(
                key_class, spec.bits if spec.kind == "rsa" else None, id=key_id, label=label, store=True,
                capabilities=flags, mechanism=generator,
                public_template=public_template, private_template=private_template,
            )
    except (pkcs11.MechanismInvalid, pkcs11.KeySizeRange, pkcs11.DomainParamsInvalid,
            pkcs11.TemplateInconsistent, pkcs11.AttributeValueInvalid, pkcs11.FunctionNotSupported) as exc:
        raise UnsupportedKeyError(
            f"PKCS#11 token {shared.label!r} cannot make {key_type} keys: pick another --type"
        ) from exc
    except (pkcs11.TokenWriteProtected, pkcs11.SessionReadOnly) as exc:
        raise AccessDeniedError(
            f"PKCS#11 token {shared.label!r} is write-protected: cannot create {described}"
        ) from exc
    except pkcs11.PKCS11Error as exc:
        raise BackendUnavailableError(
            f"creating {key_type} key {described} failed ({type(exc).__name__})"
        ) from exc
    log.info("created %s key %s inside the PKCS#11 token", key_type, described)

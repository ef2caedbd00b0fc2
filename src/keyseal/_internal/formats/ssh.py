"""SSH signatures: the armored format `ssh-keygen -Y sign` writes and `ssh-keygen -Y verify` checks.

The data is hashed here (SHA-512, as a stream); the key signs only a short "signed data" blob that binds the
namespace and that hash. Ed25519 signs the blob itself (pure Ed25519, which every Ed25519 custody can do); ECDSA
and RSA sign a digest of the blob with the hash their SSH algorithm names (the curve's hash; SHA-512 for
`rsa-sha2-512`), so a KMS or HSM key signs one digest, exactly as for OpenPGP.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature, encode_dss_signature

from keyseal._internal.formats import describe_key, hash_path, sign_ed25519_message
from keyseal.errors import InvalidKeyFileError, UnsupportedKeyError, UsageError, VerificationError
from keyseal.signer import HashName, PublicKey, Signer, hash_algorithm

MAGIC = b"SSHSIG"
VERSION = 1
BEGIN = "-----BEGIN SSH SIGNATURE-----"
END = "-----END SSH SIGNATURE-----"
DATA_HASH = "sha512"  # what ssh-keygen uses by default; sha256 is accepted when verifying
DEFAULT_NAMESPACE = "file"
MIN_RSA_BITS = 2048

KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa")
_CURVES: dict[str, tuple[str, HashName]] = {
    "secp256r1": ("ecdsa-sha2-nistp256", "sha256"),
    "secp384r1": ("ecdsa-sha2-nistp384", "sha384"),
    "secp521r1": ("ecdsa-sha2-nistp521", "sha512"),
}
_RSA_SIGNATURES: dict[str, HashName] = {"rsa-sha2-512": "sha512", "rsa-sha2-256": "sha256"}
_NAMESPACE = re.compile(r"^[\x21-\x7e]{1,128}$")


# -- wire encoding -----------------------------------------------------------------------------------------


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _mpint(value: int) -> bytes:
    """An SSH mpint: two's complement, big-endian, minimal, with a zero octet before a set high bit."""
    if value == 0:
        return _string(b"")
    raw = value.to_bytes((value.bit_length() + 8) // 8, "big")
    return _string(raw)


class _Reader:
    """Reads SSH wire strings; anything malformed or left over is a VerificationError."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, count: int) -> bytes:
        if self.pos + count > len(self.data):
            raise VerificationError(f"malformed {self.what}: truncated")
        out = self.data[self.pos : self.pos + count]
        self.pos += count
        return out

    def u32(self) -> int:
        value: int = struct.unpack(">I", self.take(4))[0]
        return value

    def string(self) -> bytes:
        return self.take(self.u32())

    def mpint(self) -> int:
        raw = self.string()
        if raw and (raw[0] & 0x80 or (raw[0] == 0 and (len(raw) == 1 or not raw[1] & 0x80))):
            raise VerificationError(f"malformed {self.what}: a negative or non-minimal integer")
        return int.from_bytes(raw, "big")

    def end(self) -> None:
        if self.pos != len(self.data):
            raise VerificationError(f"malformed {self.what}: trailing data")


# -- public keys --------------------------------------------------------------------------------------------


def public_key_blob(public_key: PublicKey) -> bytes:
    """The key as SSH encodes it on the wire (what fingerprints and signatures name)."""
    return base64.b64decode(public_key_line(public_key).split()[1])


def key_type_of(public_key: PublicKey) -> str:
    return public_key_line(public_key).split()[0]


def public_key_line(public_key: PublicKey, comment: str = "") -> str:
    """`TYPE BASE64 [comment]`, as in an `.pub` file or (after a principal) an `allowed_signers` line."""
    if isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name not in _CURVES:
        raise UnsupportedKeyError(f"SSH has no signature algorithm for the curve {public_key.curve.name}")
    line = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    comment = " ".join(comment.split())
    return f"{line} {comment}" if comment else line


def fingerprint(public_key: PublicKey) -> str:
    """`SHA256:...`, the fingerprint `ssh-keygen -l` prints."""
    digest = hashlib.sha256(public_key_blob(public_key)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


@dataclass(frozen=True)
class TrustedKey:
    """A public key that `verify` accepts signatures from, with the principals its line named (if any)."""

    public_key: PublicKey
    blob: bytes
    principals: tuple[str, ...]
    comment: str

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)


def parse_public_key(key_type: str, encoded: str, where: str) -> PublicKey:
    """Decode `TYPE BASE64` into a key; the blob's own type must be TYPE."""
    if key_type not in KEY_TYPES:
        raise InvalidKeyFileError(f"{where}: unsupported SSH key type {key_type[:40]!r}")
    try:
        key = serialization.load_ssh_public_key(f"{key_type} {encoded}".encode("ascii"))
    except (ValueError, UnsupportedAlgorithm, UnicodeEncodeError, NotImplementedError) as exc:  # compressed EC point
        raise InvalidKeyFileError(f"{where}: malformed SSH public key") from exc
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise InvalidKeyFileError(f"{where}: unsupported SSH key type {key_type}")
    return key


def load_trusted_keys(data: bytes, source: str) -> list[TrustedKey]:
    """Public keys from `.pub` lines (`TYPE BASE64 [comment]`) or plain `allowed_signers` lines
    (`PRINCIPALS TYPE BASE64`). Lines with options (namespaces=, valid-before=, cert-authority) are refused
    rather than read halfway: check those with `ssh-keygen -Y verify`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidKeyFileError(f"{source} is not a text file of SSH public keys") from exc
    keys: list[TrustedKey] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tokens = line.split()
        where = f"{source} line {number}"
        if tokens[0] in KEY_TYPES and len(tokens) >= 2:
            principals: tuple[str, ...] = ()
            key_type, encoded, comment = tokens[0], tokens[1], " ".join(tokens[2:])
        elif len(tokens) >= 3 and tokens[1] in KEY_TYPES:
            principals = tuple(p for p in tokens[0].split(",") if p)
            key_type, encoded, comment = tokens[1], tokens[2], " ".join(tokens[3:])
        else:
            raise InvalidKeyFileError(
                f"{where} is neither an SSH public key ('TYPE BASE64 [comment]') nor a plain allowed_signers line "
                f"('PRINCIPALS TYPE BASE64'); lines with options are read by ssh-keygen -Y verify only"
            )
        key = parse_public_key(key_type, encoded, where)
        keys.append(TrustedKey(key, public_key_blob(key), principals, comment))
    if not keys:
        raise InvalidKeyFileError(f"{source} holds no SSH public key")
    return keys


# -- signing ------------------------------------------------------------------------------------------------


def check_namespace(namespace: str) -> None:
    if not _NAMESPACE.match(namespace):
        raise UsageError("invalid SSH signature namespace: use 1 to 128 printable characters without spaces, "
                         "e.g. file or git")


@dataclass(frozen=True)
class Scheme:
    """How a key signs the signed-data blob: the SSH signature name and the hash of the blob (None: Ed25519
    signs the blob itself)."""

    signature_type: str
    hash_name: HashName | None


def scheme_for(signer: Signer, public_key: PublicKey) -> Scheme:
    """The SSH signature algorithm for the key; RSA prefers rsa-sha2-512 and falls back to rsa-sha2-256."""
    supported = signer.supported_hashes()
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return Scheme("ssh-ed25519", None)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in _CURVES:
            raise UnsupportedKeyError(f"SSH has no signature algorithm for the curve {public_key.curve.name}")
        name, hash_name = _CURVES[public_key.curve.name]
        if hash_name not in supported:
            raise UnsupportedKeyError(f"{name} needs {hash_name} digests, which {signer.uri} cannot sign")
        return Scheme(name, hash_name)
    for name, hash_name in _RSA_SIGNATURES.items():
        if hash_name in supported:
            return Scheme(name, hash_name)
    raise UnsupportedKeyError(f"{signer.uri} can sign neither sha512 nor sha256 digests, which SSH RSA needs")


def signed_data(namespace: str, hash_name: str, message_digest: bytes) -> bytes:
    """The blob a key signs: magic, namespace, reserved, the data's hash algorithm and the data's hash."""
    return MAGIC + _string(namespace.encode()) + _string(b"") + _string(hash_name.encode()) + _string(message_digest)


def sign_message_digest(signer: Signer, message_digest: bytes, namespace: str, data_hash: str = DATA_HASH) -> bytes:
    """An armored SSH signature over data whose `data_hash` (sha512 or sha256) is `message_digest`: one
    signature call."""
    check_namespace(namespace)
    if data_hash not in ("sha256", "sha512") or len(message_digest) != hashlib.new(data_hash).digest_size:
        raise UsageError("an SSH signature hashes the data with sha512 or sha256")
    public_key = signer.public_key()
    scheme = scheme_for(signer, public_key)
    blob = signed_data(namespace, data_hash, message_digest)
    if scheme.hash_name is None:
        raw = sign_ed25519_message(signer, blob)
    else:
        digest = hashlib.new(scheme.hash_name, blob).digest()
        raw = _encode_raw(public_key, signer.sign_digest(digest, scheme.hash_name), signer.uri)
    signature = _string(scheme.signature_type.encode()) + _string(raw)
    if not _signature_valid(public_key, signature, blob):
        raise UnsupportedKeyError(
            f"the signature returned by {signer.uri} does not verify with its public key; nothing was written"
        )
    body = (MAGIC + struct.pack(">I", VERSION) + _string(public_key_blob(public_key)) + _string(namespace.encode())
            + _string(b"") + _string(data_hash.encode()) + _string(signature))
    return armor(body)


def sign_file(signer: Signer, path: Path, namespace: str = DEFAULT_NAMESPACE) -> bytes:
    return sign_message_digest(signer, hash_path(path, hashlib.sha512), namespace)


def sign_bytes(signer: Signer, data: bytes, namespace: str) -> bytes:
    return sign_message_digest(signer, hashlib.sha512(data).digest(), namespace)


def _encode_raw(public_key: PublicKey, raw: bytes, uri: str) -> bytes:
    """The Signer's natural encoding (ECDSA DER, RSA bytes) as SSH's signature blob."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        try:
            r, s = decode_dss_signature(raw)
        except ValueError as exc:
            raise UnsupportedKeyError(f"{uri} returned a malformed ECDSA signature") from exc
        return _mpint(r) + _mpint(s)
    assert isinstance(public_key, rsa.RSAPublicKey)
    size = (public_key.key_size + 7) // 8
    if len(raw) > size:
        raise UnsupportedKeyError(f"{uri} returned an RSA signature longer than its modulus")
    return raw.rjust(size, b"\0")


def armor(body: bytes) -> bytes:
    """ssh-keygen's armor: base64 in lines of 70 columns between BEGIN and END lines."""
    encoded = base64.b64encode(body).decode("ascii")
    lines = [BEGIN, *(encoded[i : i + 70] for i in range(0, len(encoded), 70)), END]
    return ("\n".join(lines) + "\n").encode("ascii")


# -- verifying ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedSignature:
    public_key_blob: bytes
    namespace: str
    hash_name: str
    signature: bytes


@dataclass(frozen=True)
class VerifiedSignature:
    key: TrustedKey
    namespace: str
    signature_type: str

    @property
    def fingerprint(self) -> str:
        return self.key.fingerprint


def dearmor(data: bytes) -> bytes:
    """The binary signature between BEGIN and END (CRLF tolerated; anything else around it is refused)."""
    try:
        lines = [line.strip() for line in data.decode("ascii").splitlines()]
    except UnicodeDecodeError as exc:
        raise VerificationError("not an SSH signature: it is not ASCII armor") from exc
    while lines and not lines[-1]:
        lines.pop()
    if not lines or lines[0] != BEGIN:
        raise VerificationError(f"not an SSH signature: it does not start with {BEGIN}")
    if lines[-1] != END or len(lines) < 3:
        raise VerificationError(f"truncated SSH signature: no {END} line")
    try:
        return base64.b64decode("".join(lines[1:-1]), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise VerificationError("malformed SSH signature: invalid base64") from exc


def parse_signature(data: bytes) -> ParsedSignature:
    reader = _Reader(dearmor(data), "SSH signature")
    if reader.take(6) != MAGIC:
        raise VerificationError("not an SSH signature: bad magic")
    version = reader.u32()
    if version != VERSION:
        raise VerificationError(f"unsupported SSH signature version {version}")
    key_blob = reader.string()
    namespace = reader.string()
    reader.string()  # reserved
    hash_name = reader.string()
    signature = reader.string()
    reader.end()
    try:
        return ParsedSignature(key_blob, namespace.decode("utf-8"), hash_name.decode("ascii"), signature)
    except UnicodeDecodeError as exc:
        raise VerificationError("malformed SSH signature: a name is not text") from exc


def verify(trusted: list[TrustedKey], hash_data: Callable[[str], bytes], signature_data: bytes,
           namespace: str) -> VerifiedSignature:
    """Check a signature against trusted keys; `hash_data(name)` hashes the signed data with sha256/sha512."""
    parsed = parse_signature(signature_data)
    if parsed.namespace != namespace:
        raise VerificationError(f"the signature is for namespace {parsed.namespace[:64]!r}, not {namespace!r}: "
                                f"pass --namespace if that is expected")
    if parsed.hash_name not in ("sha256", "sha512"):
        raise VerificationError(f"the signature hashes the data with {parsed.hash_name[:32]!r}: keyseal accepts "
                                f"sha256 and sha512")
    key = next((k for k in trusted if k.blob == parsed.public_key_blob), None)
    if key is None:
        raise VerificationError("the signature was made by a key that is not among the trusted keys")
    if isinstance(key.public_key, rsa.RSAPublicKey) and key.public_key.key_size < MIN_RSA_BITS:
        raise VerificationError(f"the key is RSA-{key.public_key.key_size}: keyseal requires at least 2048 bits")
    blob = signed_data(parsed.namespace, parsed.hash_name, hash_data(parsed.hash_name))
    if not _signature_valid(key.public_key, parsed.signature, blob):
        raise VerificationError(f"BAD signature from {key.fingerprint}: the data or the signature was altered")
    signature_type = _Reader(parsed.signature, "SSH signature").string().decode("ascii", errors="replace")
    return VerifiedSignature(key, parsed.namespace, signature_type)


def verify_file(trusted: list[TrustedKey], path: Path, signature_data: bytes, namespace: str) -> VerifiedSignature:
    return verify(trusted, lambda name: hash_path(path, getattr(hashlib, name)), signature_data, namespace)


def verify_bytes(trusted: list[TrustedKey], data: bytes, signature_data: bytes,
                 namespace: str) -> VerifiedSignature:
    return verify(trusted, lambda name: hashlib.new(name, data).digest(), signature_data, namespace)


def _signature_valid(public_key: PublicKey, signature: bytes, blob: bytes) -> bool:
    """The SSH signature (`string type, string blob`) is valid over `blob` and its type fits the key."""
    reader = _Reader(signature, "SSH signature value")
    try:
        name = reader.string().decode("ascii")
        raw = reader.string()
        reader.end()
    except (VerificationError, UnicodeDecodeError):
        return False
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            if name != "ssh-ed25519" or len(raw) != 64:
                return False
            public_key.verify(raw, blob)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            expected, hash_name = _CURVES.get(public_key.curve.name, ("", "sha256"))
            if name != expected:
                return False
            inner = _Reader(raw, "ECDSA signature")
            r, s = inner.mpint(), inner.mpint()
            inner.end()
            digest = hashlib.new(hash_name, blob).digest()
            public_key.verify(encode_dss_signature(r, s), digest, ec.ECDSA(Prehashed(hash_algorithm(hash_name))))
        else:
            rsa_hash = _RSA_SIGNATURES.get(name)  # "ssh-rsa" (SHA-1) is refused
            if rsa_hash is None or len(raw) != (public_key.key_size + 7) // 8:
                return False
            public_key.verify(raw, blob, padding.PKCS1v15(), hash_algorithm(rsa_hash))
    except (InvalidSignature, VerificationError, ValueError):
        return False
    return True


__all__ = [
    "DEFAULT_NAMESPACE",
    "TrustedKey",
    "VerifiedSignature",
    "describe_key",
    "fingerprint",
    "load_trusted_keys",
    "public_key_line",
    "sign_bytes",
    "sign_file",
    "verify_bytes",
    "verify_file",
]

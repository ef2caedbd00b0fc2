"""Release keys for the publish/verify tests, made in process with keyseal's own file backend (clear PEM keys in
the test's temporary directory): fast, and the same code path `keyseal keys mint` and `keyseal sign` use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from keyseal._internal.backends.file import FileSigner
from keyseal._internal.keygen import generate_private_key
from keyseal._internal.openpgp.cert import armor_certificate, load_certificates, mint_certificate
from keyseal._internal.openpgp.packets import encode_packet, iter_packets
from keyseal._internal.openpgp.sign import choose_hash, identity_from_certificate, render, signature_packet
from keyseal._internal.openpgp.signature import HASH_IDS
from keyseal._internal.openpgp.stream import hash_file

CREATED = 1_700_000_000  # 2023-11-14: before any signature a test makes


@dataclass(frozen=True)
class ReleaseKey:
    key: Path  # clear PKCS#8 PEM, usable as file:KEY
    cert: Path  # armored certificate
    fingerprint: str

    @property
    def uri(self) -> str:
        return f"file:{self.key}"

    def signer(self) -> FileSigner:
        return FileSigner(self.uri, self.key)


def make_key(directory: Path, label: str, key_type: str = "ed25519", *, email: str = "releases@example.org",
             name: str = "Example Releases", extra_emails: tuple[str, ...] = ()) -> ReleaseKey:
    """A key and its certificate; `extra_emails` adds more user IDs (each self-signed)."""
    directory.mkdir(parents=True, exist_ok=True)
    key_path = directory / f"{label}.pem"
    private = generate_private_key(key_type)
    key_path.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    key_path.chmod(0o600)
    signer = FileSigner(f"file:{key_path}", key_path)
    binary = b""
    for index, address in enumerate((email, *extra_emails)):
        minted = mint_certificate(signer, name=name, email=address, created=CREATED)
        # Each mint repeats the primary key packet; keep it once and append the user ID + its self-signature.
        packets = list(iter_packets(minted))[0 if index == 0 else 1:]
        binary += b"".join(encode_packet(packet.tag, packet.body) for packet in packets)
    cert_path = directory / f"{label}.asc"
    cert_path.write_bytes(armor_certificate(binary))
    return ReleaseKey(key_path, cert_path, load_certificates(binary)[0].fingerprint)


def sign_file(key: ReleaseKey, data: Path, out: Path | None = None, created: int | None = None) -> Path:
    """An armored detached signature over `data` by `key`, as `keyseal sign` writes it."""
    signer = key.signer()
    identity = identity_from_certificate(signer, load_certificates(key.cert.read_bytes()), created)
    hash_name = choose_hash(signer, identity.public_key, None)
    hasher = hash_file(data, [HASH_IDS[hash_name]])[HASH_IDS[hash_name]]
    packet = signature_packet(signer, identity, hasher, hash_name, created)
    target = out or data.with_name(data.name + ".asc")
    target.write_bytes(render(packet, armored=True))
    return target

"""Valid inputs to mutate, made by keyseal itself (in memory, from fixed keys where the algorithm allows) and by
gpg (a throwaway home): certificates with user IDs, subkeys and revocations, detached signatures, wrapped key
records and checksum manifests, in armored and binary form."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from keyseal._internal.backends.file import sign_digest_with
from keyseal._internal.openpgp.armor import armor, dearmor_or_binary
from keyseal._internal.openpgp.cert import Certificate, armor_certificate, load_certificates, mint_certificate
from keyseal._internal.openpgp.packets import TAG_PUBLIC_KEY, TAG_SIGNATURE, encode_packet, iter_packets
from keyseal._internal.openpgp.revoke import revoke
from keyseal._internal.openpgp.sign import choose_hash, identity_from_certificate, render, signature_packet
from keyseal._internal.openpgp.signature import HASH_IDS, new_hasher
from keyseal._internal.wrapping.envelope import seal
from keyseal._internal.wrapping.local import LocalKek
from keyseal.signer import HashName, PrivateKey, PublicKey, Signer

CREATED = 1_700_000_000  # when the fixed keys were "made"
SIGNED = 1_700_000_600  # when their signatures were made
NOW = 1_800_000_000  # the clock verification runs at (fixed, so results never depend on the day)
DATA = b"keyseal fuzz release artifact\n" * 4


class MemorySigner(Signer):
    """An in-memory key behind the Signer contract (fuzzing needs no custody)."""

    def __init__(self, key: PrivateKey, label: str) -> None:
        self.key = key
        self.uri = f"memory:{label}"

    def public_key(self) -> PublicKey:
        return self.key.public_key()

    def sign_digest(self, digest: bytes, hash_name: HashName) -> bytes:
        return sign_digest_with(self.key, digest, hash_name)


def fixed_keys() -> dict[str, PrivateKey]:
    """Keys from fixed secrets where the algorithm allows it (so seeds repeat); RSA is generated (small)."""
    return {
        "ed25519": ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33))),
        "p256": ec.derive_private_key(0x1234_5678_9ABC_DEF0, ec.SECP256R1()),
        "p384": ec.derive_private_key(0x2345_6789_ABCD_EF01, ec.SECP384R1()),
        "p521": ec.derive_private_key(0x3456_789A_BCDE_F012, ec.SECP521R1()),
        "rsa2048": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }


@dataclass
class Corpus:
    """Seeds by kind, and the fixed context the targets verify against."""

    certificates: list[bytes] = field(default_factory=list)  # armored and binary
    signatures: list[bytes] = field(default_factory=list)  # detached, armored and binary
    records: list[bytes] = field(default_factory=list)
    manifests: list[bytes] = field(default_factory=list)
    trusted: list[Certificate] = field(default_factory=list)  # the certificates signatures are verified with
    good_signature: bytes = b""  # a keyseal signature over DATA by trusted[0]
    kek: LocalKek | None = None
    sources: dict[str, int] = field(default_factory=dict)  # where seeds came from: "keyseal", "gpg"

    def packet_bodies(self, tags: tuple[int, ...]) -> list[bytes]:
        bodies: list[bytes] = []
        for item in self.certificates + self.signatures:
            for packet in iter_packets(dearmor_or_binary(item)):
                if packet.tag in tags and packet.body not in bodies:
                    bodies.append(packet.body)
        return bodies

    def subpacket_areas(self) -> list[bytes]:
        areas: list[bytes] = []
        for body in self.packet_bodies((TAG_SIGNATURE,)):
            hashed_len = int.from_bytes(body[4:6], "big")
            unhashed_at = 6 + hashed_len
            unhashed_len = int.from_bytes(body[unhashed_at : unhashed_at + 2], "big")
            areas += [body[6:unhashed_at], body[unhashed_at + 2 : unhashed_at + 2 + unhashed_len]]
        return [area for area in dict.fromkeys(areas) if area]

    def binaries(self) -> list[bytes]:
        return [dearmor_or_binary(item) for item in self.certificates + self.signatures]


def keyseal_seeds(corpus: Corpus, workdir: Path) -> None:
    keys = fixed_keys()
    for label, key in keys.items():
        signer = MemorySigner(key, label)
        binary = mint_certificate(signer, name=f"Fuzz {label}", email=f"{label}@example.org", created=CREATED,
                                  expires_seconds=10 * 365 * 86400 if label == "p384" else None)
        cert = load_certificates(binary)[0]
        corpus.trusted.append(cert)
        corpus.certificates += [armor_certificate(binary), binary]
        identity = identity_from_certificate(signer, [cert], SIGNED)
        hash_name = choose_hash(signer, identity.public_key, None)
        hasher = new_hasher(HASH_IDS[hash_name])
        hasher.update(DATA)
        packet = signature_packet(signer, identity, hasher, hash_name, SIGNED)
        corpus.signatures += [render(packet, armored=True), packet]
        if label == "ed25519":
            corpus.good_signature = packet
            second = mint_certificate(signer, name="Fuzz other", email="other@example.org", created=CREATED)
            two_uids = binary + b"".join(encode_packet(p.tag, p.body) for p in list(iter_packets(second))[1:])
            corpus.certificates.append(armor_certificate(two_uids))
        if label in ("ed25519", "p256"):
            reason = "compromised" if label == "ed25519" else "superseded"
            corpus.certificates.append(armor_certificate(revoke(signer, cert, reason, created=SIGNED + 60)))
    # Two signatures in one file (dual signing during a rotation).
    corpus.signatures.append(armor(dearmor_or_binary(corpus.signatures[0]) + dearmor_or_binary(
        corpus.signatures[2]), "SIGNATURE"))
    kek = LocalKek(workdir / "kek")
    corpus.kek = kek
    created = datetime.fromtimestamp(CREATED, tz=UTC)
    for label in ("ed25519", "p256"):
        der = keys[label].private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
        record = seal(der, name=f"fuzz-{label}", version=3, created=created, key_type=label, kek=kek)
        corpus.records.append(record.to_bytes())
    # Format v2: bound to a scope (the server's trust domain and namespace).
    record = seal(der, name="fuzz-scoped", version=4, created=created, key_type="p256", kek=kek,
                  scope="trust-domain=fuzz.example;namespace=fuzz")
    corpus.records.append(record.to_bytes())
    corpus.manifests += [
        b"".join(f"{bytes([i]).hex() * 32}  tool-{i}.tar.gz\n".encode() for i in range(3)),
        f"{'ab' * 48} *tool.zip\r\n{'cd' * 48}  docs/tool.pdf\r\n".encode(),
        f"{'0f' * 64}  name with spaces\n".encode(),
        f"{'11' * 32}  ./dist/tool\n{'22' * 32}  dist//tool\n{'33' * 32}  ../tool\n".encode(),  # one file twice
    ]
    corpus.sources["keyseal"] = len(corpus.certificates) + len(corpus.signatures) + len(corpus.records)


class GpgUnavailableError(RuntimeError):
    """gpg is not installed: the gpg-made seeds cannot be made."""


def gpg_seeds(corpus: Corpus, workdir: Path) -> None:
    """Certificates and signatures made by gpg: an Ed25519 key with a signing subkey (back-signature) and an
    encryption subkey (an algorithm keyseal does not read), RSA and P-384 keys, SHA-1 and notation-carrying
    signatures, and gpg's own pre-made revocation certificate."""
    if shutil.which("gpg") is None:
        raise GpgUnavailableError("gpg is required to make the gpg seeds (Debian package gnupg)")
    home = workdir / "gnupg"
    home.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}

    def gpg(*args: str, data: bytes | None = None) -> bytes:
        result = subprocess.run(["gpg", "--batch", "--no-tty", "--passphrase", "", "--pinentry-mode", "loopback",
                                 *args], input=data, capture_output=True, env=env, timeout=120, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"gpg {' '.join(args)} failed: {result.stderr.decode(errors='replace')}")
        return result.stdout

    def fingerprint(email: str) -> str:
        listing = gpg("--with-colons", "--list-keys", email).decode()
        return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))

    try:
        gpg("--quick-gen-key", "Fuzz Upstream <upstream@example.org>", "ed25519", "sign,cert", "never")
        main = fingerprint("upstream@example.org")
        gpg("--quick-add-key", main, "ed25519", "sign", "never")
        gpg("--quick-add-key", main, "cv25519", "encr", "never")
        gpg("--quick-gen-key", "Fuzz Rsa <rsa@example.org>", "rsa2048", "sign", "never")
        gpg("--quick-gen-key", "Fuzz P384 <p384@example.org>", "nistp384", "sign", "never")
        data = workdir / "artifact"
        data.write_bytes(DATA)
        for email in ("upstream@example.org", "rsa@example.org", "p384@example.org"):
            exported = gpg("--armor", "--export", email)
            corpus.certificates += [exported, dearmor_or_binary(exported)]
            corpus.trusted += load_certificates(exported)
            corpus.signatures.append(gpg("--armor", "--detach-sign", "--local-user", email, "-o", "-", str(data)))
        corpus.signatures.append(gpg("--detach-sign", "--local-user", "rsa@example.org", "--digest-algo", "SHA1",
                                     "-o", "-", str(data)))
        corpus.signatures.append(gpg("--detach-sign", "--local-user", "upstream@example.org", "--sig-notation",
                                     "!critical@example.org=yes", "--sig-notation", "plain@example.org=1",
                                     "-o", "-", str(data)))
        revocation_file = home / "openpgp-revocs.d" / f"{main}.rev"
        if revocation_file.exists():  # gpg writes one at key generation, its BEGIN line escaped with ':'
            text = revocation_file.read_bytes().replace(b":-----BEGIN", b"-----BEGIN")
            revocation = dearmor_or_binary(text[text.index(b"-----BEGIN") :])
            binary = gpg("--export", main)
            packets = list(iter_packets(binary))
            assert packets[0].tag == TAG_PUBLIC_KEY
            head = encode_packet(packets[0].tag, packets[0].body)
            rest = b"".join(encode_packet(p.tag, p.body) for p in packets[1:])
            corpus.certificates.append(armor_certificate(head + revocation + rest))
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True, check=False)


def build_corpus(workdir: Path, *, with_gpg: bool = True) -> Corpus:
    """Every seed, keyseal's and (unless told otherwise) gpg's. `workdir` (the caller removes it) holds the
    local KEK and gpg's home."""
    corpus = Corpus()
    keyseal_seeds(corpus, workdir)
    before = len(corpus.certificates) + len(corpus.signatures)
    if with_gpg:
        gpg_seeds(corpus, workdir)
    corpus.sources["gpg"] = len(corpus.certificates) + len(corpus.signatures) - before
    return corpus

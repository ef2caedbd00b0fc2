"""The agent's own SVID and key across restarts, so a restarted agent needs no new join token.

The key is a wrapped record (keyseal._internal.wrapping: a fresh AES-256-GCM DEK per write, wrapped by a local KEK file,
created mode 0600 on first use; the record's version is remembered in a ledger beside it, so an older copy put
back is refused). The certificate is public and kept as PEM beside it. On load, the certificate must be an
agent SVID of the trust domain, match the key, and not have expired; the server checks it again at the first
call (a renewal), so a stale or foreign certificate costs one refused call, never an identity.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keyseal._internal.atomic import write_atomic
from keyseal._internal.records.ledger import FileLedger
from keyseal._internal.spiffe.entry import AGENT_PATH
from keyseal._internal.store.directory import DirectoryStore
from keyseal._internal.wrapping.keys import create_record, open_record
from keyseal._internal.wrapping.local import LocalKek
from keyseal.errors import InputError

__all__ = ["AgentState", "SavedIdentity"]

log = logging.getLogger(__name__)

KEY_RECORD = "agent-svid-key"
CERT_FILE = "agent-svid.pem"
LEDGER_FILE = "seen-versions.json"
SPENT_FILE = "spent-join-tokens"  # SHA-256 (hex) of the one-time join tokens this agent has offered, one a line
MAX_SPENT = 64  # the newest kept: a token is spent once, and only the one in joinTokenFile is offered again


@dataclass(frozen=True)
class SavedIdentity:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate


class AgentState:
    def __init__(self, directory: Path, kek_file: Path, trust_domain: str) -> None:
        self.directory = directory
        self.trust_domain = trust_domain
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)  # a directory made by someone else (a kubelet hostPath is 0755) too
        except OSError as exc:
            raise InputError(f"cannot create the agent state directory {directory}: {exc.strerror}") from exc
        self.store = DirectoryStore(directory, FileLedger(directory / LEDGER_FILE))
        self.kek = LocalKek(kek_file)

    @property
    def certificate_path(self) -> Path:
        return self.directory / CERT_FILE

    def save(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        """Key first, then the certificate: a crash in between leaves a pair that does not match, which
        `load()` ignores (the agent then needs a join token), never a certificate with the wrong key."""
        create_record(self.store, KEY_RECORD, key, self.kek, force=True)
        write_atomic(self.certificate_path, certificate.public_bytes(serialization.Encoding.PEM), 0o600)

    def spent_tokens(self) -> list[str]:
        """The digests of the join tokens this agent has offered the server (so a restart offers none again)."""
        try:
            text = (self.directory / SPENT_FILE).read_text(encoding="ascii")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("cannot read %s (a spent join token may be offered again): %s", SPENT_FILE, exc)
            return []
        return [line for line in text.split() if len(line) == 64 and all(c in "0123456789abcdef" for c in line)]

    def save_spent_tokens(self, digests: list[str]) -> None:
        """Write temp file + rename; only digests, never a token."""
        write_atomic(self.directory / SPENT_FILE, "".join(f"{d}\n" for d in digests[-MAX_SPENT:]).encode(), 0o600)

    def load(self) -> SavedIdentity | None:
        """The saved identity, or None (nothing saved, expired, or not a matching agent SVID: logged).
        A record that was tampered with, rolled back or wrapped by another KEK raises its KeysealError."""
        if self.store.current_revision(KEY_RECORD) is None or not self.certificate_path.exists():
            return None
        opened = open_record(self.store, KEY_RECORD, self.kek)
        key = opened.private_key
        try:
            certificate = x509.load_pem_x509_certificate(self.certificate_path.read_bytes())
            uris = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
                .get_values_for_type(x509.UniformResourceIdentifier)
        except (OSError, ValueError, x509.ExtensionNotFound) as exc:
            log.warning("ignoring the saved agent SVID %s: %s", self.certificate_path, exc)
            return None
        prefix = f"spiffe://{self.trust_domain}{AGENT_PATH}/"
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        if (not isinstance(key, ec.EllipticCurvePrivateKey) or len(uris) != 1 or not uris[0].startswith(prefix)
                or certificate.public_key().public_bytes(serialization.Encoding.DER, public)
                != key.public_key().public_bytes(serialization.Encoding.DER, public)):
            log.warning("ignoring the saved agent SVID %s: not an agent SVID of %s for the saved key",
                        self.certificate_path, self.trust_domain)
            return None
        if certificate.not_valid_after_utc <= datetime.now(UTC):
            log.warning("the saved agent SVID %s expired at %s: a new join token is needed", uris[0],
                        certificate.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"))
            return None
        return SavedIdentity(key, certificate)

"""Fuzz targets for the other signature formats keyseal verifies: SSH signatures (`-----BEGIN SSH SIGNATURE-----`)
with their trusted-key files (`.pub` / allowed_signers lines), and minisign signatures with their public key
files. Seeds are made by keyseal itself from the fixed keys; kept apart from fuzz.targets so the OpenPGP
targets do not depend on these modules."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

from fuzz.corpus import DATA, MemorySigner, fixed_keys
from fuzz.targets import Target
from keyseal._internal.formats import minisign, ssh


def _artifact() -> Path:
    """The signed file (these verifiers read a path): one fixed, non-secret file per machine, replaced
    atomically, so processes that exit without cleaning up (xdist workers, libFuzzer) leave nothing behind."""
    path = Path(tempfile.gettempdir()) / "keyseal-fuzz-artifact"
    if not path.is_file() or path.read_bytes() != DATA:
        fd, tmp = tempfile.mkstemp(prefix=".keyseal-fuzz-artifact.", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(DATA)
        os.replace(tmp, path)
    return path


@functools.cache
def shared_format_targets() -> dict[str, Target]:
    artifact = _artifact()
    keys = fixed_keys()
    ssh_signatures: list[bytes] = []
    ssh_key_files: list[bytes] = []
    for label in ("ed25519", "p256", "p384", "rsa2048"):
        signer = MemorySigner(keys[label], label)
        ssh_signatures.append(ssh.sign_file(signer, artifact))
        line = ssh.public_key_line(signer.public_key(), f"{label} release key")
        ssh_key_files += [f"{line}\n".encode(), f"release@example.org,ci@example.org {line}\n".encode()]
    ssh_key_files.append(b"# keys\n" + b"".join(ssh_key_files[::2]))
    trusted = ssh.load_trusted_keys(b"".join(ssh_key_files), "fuzz trusted keys")
    ed = MemorySigner(keys["ed25519"], "ed25519")
    minisign_signatures = [minisign.sign_file(ed, artifact), minisign.sign_file(ed, artifact, "fuzz comment")]
    minisign_keys = [minisign.public_key_file(ed.public_key())]
    keyring = minisign.load_public_keys(minisign_keys[0], "fuzz minisign key")
    pool = tuple(ssh_signatures + ssh_key_files + minisign_signatures + minisign_keys)

    def ssh_signature_target(data: bytes) -> None:
        ssh.verify_file(trusted, artifact, data, ssh.DEFAULT_NAMESPACE)

    def ssh_keys_target(data: bytes) -> None:
        ssh.load_trusted_keys(data, "fuzzed SSH keys")

    def minisign_signature_target(data: bytes) -> None:
        minisign.verify_file(keyring, artifact, data)

    def minisign_keys_target(data: bytes) -> None:
        minisign.load_public_keys(data, "fuzzed minisign key")

    return {
        target.name: target
        for target in (
            Target("ssh_signature", ssh_signature_target, ssh_signatures, "b64text", pool),
            Target("ssh_keys", ssh_keys_target, ssh_key_files, "b64text", pool),
            Target("minisign_sig", minisign_signature_target, minisign_signatures, "b64text", pool),
            Target("minisign_keys", minisign_keys_target, minisign_keys, "b64text", pool),
        )
    }

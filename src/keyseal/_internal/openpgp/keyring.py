"""keyseal's own keyring, under `$KEYSEAL_HOME` (default ~/.config/keyseal), for signing from git and verifying:

  keys.toml                  which key URI signs for which public key (OpenPGP and SSH fingerprints), so git's
                             `user.signingkey` can name a fingerprint instead of a URI
  keyring/<FINGERPRINT>.asc  OpenPGP certificates that `keyseal-gpg --verify` trusts
  allowed_signers            SSH keys and principals for git's `gpg.ssh.allowedSignersFile`

`keyseal git-setup` writes all three. None holds a secret: a PKCS#11 URI with `pin-value=` is refused.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from keyseal._internal.frozen import Frozen
from keyseal._internal.home import home_text, keyseal_home
from keyseal._internal.openpgp.cert import Certificate, load_certificates, merge_certificates
from keyseal.errors import InputError, KeysealError, KeyURIError, OpenPGPError, UsageError

if TYPE_CHECKING:
    from pathlib import Path

    from keyseal.signer import PublicKey

KEYS_FILE = "keys.toml"
KEYRING_DIR = "keyring"
ALLOWED_SIGNERS = "allowed_signers"
_CERT_SUFFIXES = (".asc", ".gpg", ".pgp")
# Compiled on first use (re's cache), not at import: keyseal-gpg --verify reads the keyring without them.
_HEX = r"^[0-9A-F]+$"
_EMAIL_IN_ANGLES = r"<([^<>\s]+@[^<>\s]+)>"


class KeyEntry(Frozen):
    """One key keyseal signs with for git: its URI and the fingerprints it answers to."""

    __slots__ = ("openpgp", "ssh", "uri")

    def __init__(self, uri: str, openpgp: str | None = None, ssh: str | None = None) -> None:
        self.uri = uri
        self.openpgp = openpgp  # 40 hex digits, upper case
        self.ssh = ssh  # SHA256:...


def keys_path() -> Path:
    return keyseal_home() / KEYS_FILE


def keyring_dir() -> Path:
    return keyseal_home() / KEYRING_DIR


def allowed_signers_path() -> Path:
    return keyseal_home() / ALLOWED_SIGNERS


def is_key_uri(spec: str) -> bool:
    from keyseal._internal.backends import (
        split_uri,  # not at import: verifying with the keyring loads no backend package
    )

    try:
        split_uri(spec)
    except KeyURIError:
        return False
    return True


def check_storable_uri(uri: str) -> None:
    """A URI that may be written to a file: a known scheme, one line, and no PIN in it."""
    from keyseal._internal.backends import split_uri

    split_uri(uri)
    if "pin-value" in uri.lower():
        raise UsageError("the key URI holds a PIN (pin-value=): keyseal never writes PINs to files; use "
                         "pin-source=file:PATH in the URI or set KEYSEAL_PKCS11_PIN")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in uri):
        raise UsageError("the key URI holds a control character")


# -- keys.toml -------------------------------------------------------------------------------------------


def load_entries() -> list[KeyEntry]:
    import tomllib  # not at import: verifying reads certificates only, and tomllib costs start-up time

    path = keys_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {getattr(exc, 'strerror', None) or 'not UTF-8 text'}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML ({exc}): fix it or run keyseal git-setup again") from exc
    entries: list[KeyEntry] = []
    for item in data.get("key", []):
        if not isinstance(item, dict) or not isinstance(item.get("uri"), str):
            raise UsageError(f"{path}: every [[key]] needs uri = \"SCHEME:...\"")
        openpgp, ssh = item.get("openpgp"), item.get("ssh")
        entries.append(KeyEntry(item["uri"], openpgp.upper() if isinstance(openpgp, str) else None,
                                ssh if isinstance(ssh, str) else None))
    return entries


def save_entry(entry: KeyEntry) -> Path:
    """Add or update the entry for `entry.uri`; a fingerprint that another URI held moves to this one."""
    check_storable_uri(entry.uri)
    kept: list[KeyEntry] = []
    merged = entry
    for old in load_entries():
        if old.uri == entry.uri:
            merged = KeyEntry(entry.uri, entry.openpgp or old.openpgp, entry.ssh or old.ssh)
            continue
        other = old
        if entry.openpgp and other.openpgp == entry.openpgp:
            other = KeyEntry(other.uri, None, other.ssh)
        if entry.ssh and other.ssh == entry.ssh:
            other = KeyEntry(other.uri, other.openpgp, None)
        if other.openpgp or other.ssh:
            kept.append(other)
    import json

    from keyseal._internal.atomic import write_atomic

    lines = ["# keyseal: which key URI signs for which public key. Written by `keyseal git-setup`; no secrets."]
    for item in [*kept, merged]:
        lines += ["", "[[key]]", f"uri = {json.dumps(item.uri)}"]
        if item.openpgp:
            lines.append(f"openpgp = {json.dumps(item.openpgp)}")
        if item.ssh:
            lines.append(f"ssh = {json.dumps(item.ssh)}")
    path = keys_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"), mode=0o600)
    return path


def uri_for_openpgp(fingerprints: list[str]) -> str | None:
    wanted = {f.upper() for f in fingerprints}
    return next((e.uri for e in load_entries() if e.openpgp in wanted), None)


def uri_for_ssh(fingerprint: str) -> str | None:
    return next((e.uri for e in load_entries() if e.ssh == fingerprint), None)


# -- OpenPGP keyring -------------------------------------------------------------------------------------


def keyring_certificates() -> list[Certificate]:
    """Every certificate in the keyring directory (copies of one key merged); a broken file is an error. Parsed
    once per content of the directory's files (openpgp.keyring_cache). Paths are text here: `keyseal-gpg
    --verify` comes here once per commit and imports no pathlib (keyseal._internal.pathtext)."""
    from keyseal._internal.openpgp import keyring_cache
    from keyseal._internal.pathtext import join

    directory = join(home_text(), KEYRING_DIR)
    if not os.path.isdir(directory):
        return []
    files: list[tuple[str, bytes]] = []
    for name in sorted(os.listdir(directory)):
        path = join(directory, name)
        if _suffix(name) not in _CERT_SUFFIXES or not os.path.isfile(path):
            continue
        try:
            with open(path, "rb") as handle:
                files.append((name, handle.read()))
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    key = keyring_cache.cache_key(files)
    cache = _cache_text()
    cached = keyring_cache.load(cache, key)
    if cached is not None:
        return cached
    certificates: list[Certificate] = []
    for name, content in files:
        try:
            certificates += load_certificates(content, join(directory, name))
        except KeysealError as exc:
            raise OpenPGPError(f"keyring file {exc.message}") from exc
    merged = merge_certificates(certificates)
    keyring_cache.store(cache, key, merged)
    return merged


def _suffix(name: str) -> str:
    """pathlib's `suffix` of a file name (none for a hidden file such as `.asc`)."""
    dot = name.rfind(".")
    return name[dot:] if 0 < dot < len(name) - 1 else ""


def keyring_cache_path() -> Path:
    from pathlib import Path

    return Path(_cache_text())


def _cache_text() -> str:
    from keyseal._internal.pathtext import join

    return join(join(home_text(), "cache"), "keyring.cache")


def add_certificate(data: bytes, source: str) -> Certificate:
    """Store one certificate as `keyring/<FINGERPRINT>.asc`, merged with a copy already there (so a revocation
    in either is kept)."""
    loaded = load_certificates(data, source)
    if len(loaded) != 1:
        raise UsageError(f"{source} holds {len(loaded)} certificates: give one")
    from keyseal._internal.atomic import write_atomic
    from keyseal._internal.openpgp.armor import armor

    cert = loaded[0]
    directory = keyring_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"{cert.fingerprint}.asc"
    if path.exists():
        cert = merge_certificates([*load_certificates(path.read_bytes(), str(path)), cert])[0]
    write_atomic(path, armor(cert.binary, "PUBLIC KEY BLOCK"), mode=0o644)
    return cert


def certificate_for_key(public_key: PublicKey, certificates: list[Certificate]) -> Certificate | None:
    """The certificate in which `public_key` is a signing key (primary or subkey)."""
    from keyseal._internal.openpgp.keys import same_public_key

    for cert in certificates:
        if any(same_public_key(entry.key.public_key, public_key) for entry in cert.signing_keys):
            return cert
    return None


def normalise_key_id(spec: str) -> str | None:
    """A fingerprint or long key ID as gpg accepts it (`0x` prefix, spaces, trailing `!`), upper case; else None."""
    text = spec.strip().removesuffix("!").replace(" ", "").upper()
    text = text.removeprefix("0X")
    if re.match(_HEX, text) and len(text) in (16, 40):
        return text
    return None


def find_certificates(spec: str, certificates: list[Certificate]) -> list[Certificate]:
    """Certificates that `spec` names: a fingerprint or long key ID (of the key or a signing subkey), or an email
    address (alone, `<email>` or `Name <email>`) in a user ID."""
    key_id = normalise_key_id(spec)
    if key_id is not None:
        return [cert for cert in certificates
                if any(entry.key.fingerprint_hex.endswith(key_id) for entry in cert.signing_keys)
                or cert.fingerprint.endswith(key_id)]
    match = re.search(_EMAIL_IN_ANGLES, spec)
    email = (match.group(1) if match else spec.strip()).lower()
    if "@" not in email:
        return []
    return [cert for cert in certificates
            if any(f"<{email}>" in uid.lower() or uid.strip().lower() == email for uid in cert.user_ids)]


def fingerprints_of(cert: Certificate) -> list[str]:
    return [cert.fingerprint, *(entry.key.fingerprint_hex for entry in cert.signing_keys)]


# -- allowed_signers -------------------------------------------------------------------------------------


def add_allowed_signer(principal: str, public_key_line: str) -> Path:
    """Add `PRINCIPAL TYPE BASE64 [comment]` to keyseal's allowed_signers file (once)."""
    if not principal or any(ch.isspace() or ch in "\"'#" for ch in principal):
        raise UsageError("invalid principal: use an email address or a name without spaces or quotes")
    path = allowed_signers_path()
    try:
        existing = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        existing = []
    key = " ".join(public_key_line.split()[:2])
    line = f"{principal} {public_key_line}"
    if any(old.split()[:1] == [principal] and key in old for old in existing):
        return path
    from keyseal._internal.atomic import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, ("\n".join([*existing, line]) + "\n").encode("utf-8"), mode=0o644)
    return path


__all__ = [
    "KeyEntry",
    "add_allowed_signer",
    "add_certificate",
    "allowed_signers_path",
    "certificate_for_key",
    "find_certificates",
    "fingerprints_of",
    "is_key_uri",
    "keyring_certificates",
    "keyring_dir",
    "keys_path",
    "load_entries",
    "save_entry",
    "uri_for_openpgp",
    "uri_for_ssh",
]

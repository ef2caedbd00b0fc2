"""The keyring's parsed certificates are cached on disk by the content of the keyring's files: a changed, added or
removed certificate file, a revocation among them, is seen on the very next call; a corrupt cache is ignored and
rebuilt; and keyseal-gpg --verify, as git runs it, gives the same verdicts with and without the cache."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from keyseal._internal.openpgp import keyring, keyring_cache
from tests.conftest import run_keyseal
from tests.harness.release_keys import ReleaseKey, make_key, sign_file


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "keyseal-home"
    path.mkdir()
    monkeypatch.setenv("KEYSEAL_HOME", str(path))
    return path


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, ReleaseKey]:
    return {label: make_key(tmp_path / "keys", label, email=f"{label}@example.org") for label in ("a", "b", "c")}


def current_key() -> str:
    return keyring_cache.cache_key([(p.name, p.read_bytes()) for p in sorted(keyring.keyring_dir().iterdir())])


def fingerprints() -> list[str]:
    return sorted(c.fingerprint for c in keyring.keyring_certificates())


def no_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, parsing a certificate file fails the test: answers must come from the cache."""
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the keyring was parsed again")

    monkeypatch.setattr(keyring, "load_certificates", refuse)


def test_second_call_comes_from_the_cache_and_equals_the_first(home: Path, keys: dict[str, ReleaseKey],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for key in keys.values():
        keyring.add_certificate(key.cert.read_bytes(), str(key.cert))
    first = keyring.keyring_certificates()
    assert keyring.keyring_cache_path().is_file()
    assert keyring.keyring_cache_path().stat().st_mode & 0o077 == 0
    no_parsing(monkeypatch)
    second = keyring.keyring_certificates()
    assert second == first  # dataclass equality: keys, user IDs, validity, revocations, bytes


@pytest.mark.slow
def test_changed_added_and_removed_files_are_seen_at_once(home: Path, keys: dict[str, ReleaseKey],
                                                         tmp_path: Path) -> None:
    keyring.add_certificate(keys["a"].cert.read_bytes(), "a")
    keyring.add_certificate(keys["b"].cert.read_bytes(), "b")
    assert fingerprints() == sorted([keys["a"].fingerprint, keys["b"].fingerprint])

    keyring.add_certificate(keys["c"].cert.read_bytes(), "c")  # added
    assert keys["c"].fingerprint in fingerprints()

    (keyring.keyring_dir() / f"{keys['b'].fingerprint}.asc").unlink()  # removed
    assert keys["b"].fingerprint not in fingerprints()

    revoked = tmp_path / "a-revoked.asc"  # changed: a revocation added to a's file applies on the next call
    result = run_keyseal("keys", "revoke", "--key", keys["a"].uri, "--cert", keys["a"].cert, "--reason",
                         "compromised", "-o", revoked)
    assert result.returncode == 0, result.stderr
    assert not next(c for c in keyring.keyring_certificates() if c.fingerprint == keys["a"].fingerprint).revoked
    shutil.copyfile(revoked, keyring.keyring_dir() / f"{keys['a'].fingerprint}.asc")
    now_a = next(c for c in keyring.keyring_certificates() if c.fingerprint == keys["a"].fingerprint)
    assert now_a.revoked and all(entry.revoked_at == 0 for entry in now_a.signing_keys)


def key_field(cert_key: bytes) -> bytes:
    """A key packet as the cache holds it: its length (4 octets) and body."""
    return len(cert_key).to_bytes(4, "big") + cert_key


@pytest.mark.parametrize("corruption", [
    b"", b"not a cache", b"[]", b'{"key": 1}', b"\xff\xfe", "garbage-key", "truncated", "trailing", "bad-length",
    "bad-flag", "bad-utf8", "old-json",
])
def test_a_corrupt_cache_is_ignored_and_rebuilt(home: Path, keys: dict[str, ReleaseKey],
                                               corruption: bytes | str) -> None:
    keyring.add_certificate(keys["a"].cert.read_bytes(), "a")
    expected = keyring.keyring_certificates()
    path = keyring.keyring_cache_path()
    document = path.read_bytes()
    head = keyring_cache.MAGIC + current_key().encode() + b"\n"
    assert document.startswith(head) and keyring_cache.load(path, current_key()) == expected
    primary = key_field(expected[0].primary.body)
    uid = expected[0].user_ids[0].encode()
    after_uid = document.index(uid) + len(uid) + 4  # the user ID, then the count of signing keys
    after_key = document.index(primary, document.index(primary) + 1) + len(primary)  # the signing key's entry
    corrupted = {
        "garbage-key": keyring_cache.MAGIC + b"0" * 64 + b"\n" + document[len(head):],
        "truncated": document[:-1],
        "trailing": document + b"\x00",
        "bad-length": document.replace(primary, (len(document) * 2).to_bytes(4, "big") + primary[4:], 1),
        "bad-flag": document[:after_key] + b"\x07" + document[after_key + 1:],  # its expiry: neither 0 nor 1
        "bad-utf8": document.replace(uid, b"\xff" + uid[1:], 1),
        "old-json": b'{"key": "' + current_key().encode() + b'", "certificates": []}',
    }.get(corruption, corruption)
    assert isinstance(corrupted, bytes) and after_uid < after_key
    path.write_bytes(corrupted)
    assert keyring_cache.load(path, current_key()) is None
    assert keyring.keyring_certificates() == expected
    assert keyring_cache.load(path, current_key()) == expected  # rebuilt


def test_cached_key_packets_are_parsed_not_trusted_blindly(home: Path, keys: dict[str, ReleaseKey]) -> None:
    """A cache entry whose key bytes are not a key fails to load and is rebuilt, rather than being used."""
    keyring.add_certificate(keys["a"].cert.read_bytes(), "a")
    expected = keyring.keyring_certificates()
    path = keyring.keyring_cache_path()
    primary = key_field(expected[0].primary.body)
    document = path.read_bytes()
    assert primary in document
    path.write_bytes(document.replace(primary, key_field(b"\x04\x00\x00\x00\x00"), 1))  # version 4, then nothing
    assert keyring_cache.load(path, current_key()) is None
    assert keyring.keyring_certificates() == expected
    assert keyring_cache.load(path, current_key()) == expected


@pytest.mark.slow
def test_keyseal_gpg_verdicts_follow_the_keyring(home: Path, keys: dict[str, ReleaseKey], tmp_path: Path) -> None:
    data = tmp_path / "commit"
    data.write_bytes(b"tree 0\n\nmessage\n")
    signature = sign_file(keys["a"], data)
    keyring.add_certificate(keys["a"].cert.read_bytes(), "a")

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", "from keyseal._internal.cli.gpgcompat import main; main()",
                               "--status-fd=1", "--verify", str(signature), str(data)],
                              capture_output=True, text=True, timeout=60, check=False)

    assert "[GNUPG:] GOODSIG" in verify().stdout
    assert "[GNUPG:] GOODSIG" in verify().stdout  # from the cache
    revoked = tmp_path / "revoked.asc"
    result = run_keyseal("keys", "revoke", "--key", keys["a"].uri, "--cert", keys["a"].cert, "--reason",
                         "compromised", "-o", revoked)
    assert result.returncode == 0, result.stderr
    shutil.copyfile(revoked, keyring.keyring_dir() / f"{keys['a'].fingerprint}.asc")
    after = verify()
    assert "GOODSIG" not in after.stdout and after.returncode != 0, after.stdout

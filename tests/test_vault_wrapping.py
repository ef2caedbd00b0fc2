"""Key wrapping with a Vault / OpenBao Transit KEK, against a real OpenBao dev server on 127.0.0.1.

Which Transit endpoints were called (decrypt above all) is read from OpenBao's audit log, which records every
request, denied ones included, whoever made it: so "refused before any decrypt" is observed at the server.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from keyseal._internal.keygen import generate_private_key
from keyseal._internal.providers.vault.client import VaultSettings
from keyseal._internal.records.ledger import VersionLedger
from keyseal._internal.records.record import WrappedRecord
from keyseal._internal.store.directory import DirectoryStore
from keyseal._internal.wrapping.kek import new_dek, parse_kek
from keyseal._internal.wrapping.keys import create_record, open_record
from keyseal._internal.wrapping.vault import VaultKek
from keyseal.errors import (
    AccessDeniedError,
    BackendUnavailableError,
    KekMismatchError,
    KeyURIError,
    UnsupportedKeyError,
    UsageError,
    WrappedRecordError,
)
from tests.conftest import Gpg, assert_one_line_error, run_keyseal
from tests.harness.openbao import OpenBao
from tests.openpgp_checks import gpg_accepts, sqv_accepts

UID = ("--name", "Wrapped Release", "--email", "wrapped@example.org")


def one_line(exc: pytest.ExceptionInfo[Any]) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


def der(key: Any) -> bytes:
    return bytes(key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


def decrypts(openbao: OpenBao, mark: int) -> list[str]:
    """Every Transit decrypt request (any key, any mount, allowed or denied) since `mark`."""
    return [path for _, path in openbao.requests_since(mark) if "/decrypt/" in path]


@pytest.fixture
def kek_name(openbao: OpenBao, vault_env: dict[str, str], request: pytest.FixtureRequest) -> str:
    name = f"kek-{request.node.name}".replace("[", "-").replace("]", "")[:100]
    openbao.create_key(name, "aes256-gcm96")
    return name


@pytest.fixture
def store(tmp_path: Path) -> DirectoryStore:
    return DirectoryStore(tmp_path / "records", ledger=VersionLedger())


def test_round_trip_and_calls(store: DirectoryStore, kek_name: str, openbao: OpenBao,
                              caplog: pytest.LogCaptureFixture) -> None:
    key = generate_private_key("p256")
    mark = openbao.audit_mark()
    with caplog.at_level(logging.INFO, logger="keyseal._internal.wrapping.vault"):
        record = create_record(store, "ca", key, VaultKek(f"transit/{kek_name}"))
        opened = open_record(store, "ca", VaultKek(kek_name))  # mount transit by default: the same KEK
    assert der(opened.private_key) == der(key)
    assert record.kek_provider == "vault" and record.kek_id == f"hashivault://transit/{kek_name}"
    assert record.wrapped_dek.startswith(b"vault:v1:")
    calls = openbao.requests_since(mark)
    assert calls == [("read", f"transit/keys/{kek_name}"), ("update", f"transit/encrypt/{kek_name}"),
                     ("update", f"transit/decrypt/{kek_name}")], calls
    lines = [r.getMessage() for r in caplog.records if "Key wrapping via Vault Transit" in r.getMessage()]
    assert lines == [f"Key wrapping via Vault Transit key=hashivault://transit/{kek_name} "
                     f"address={openbao.address}"]


def test_kek_as_signing_key_spelling(store: DirectoryStore, kek_name: str, openbao: OpenBao) -> None:
    """A KEK named as a signing key is (`hashivault://MOUNT/KEY`) is the same KEK as `vault:MOUNT/KEY`: a record
    written under one spelling opens under the other, and only the configured key is ever asked to decrypt."""
    canonical = parse_kek(f"hashivault://transit/{kek_name}")
    alias = parse_kek(f"vault:{kek_name}")
    assert isinstance(canonical, VaultKek) and isinstance(alias, VaultKek)
    assert canonical.kek_id == alias.kek_id == f"hashivault://transit/{kek_name}"
    canonical.canary()
    key = generate_private_key("p256")
    mark = openbao.audit_mark()
    record = create_record(store, "spelled", key, canonical)
    assert record.kek_provider == "vault" and record.kek_id == alias.kek_id
    assert der(open_record(store, "spelled", alias).private_key) == der(key)
    assert decrypts(openbao, mark) == [f"transit/decrypt/{kek_name}"]
    for spec in ("hashivault://transit/k?version=1", "hashivault:transit/k", "hashivault:"):
        with pytest.raises((UsageError, KeyURIError)) as exc:
            parse_kek(spec)
        one_line(exc)


def test_context_is_bound(store: DirectoryStore, kek_name: str) -> None:
    """A wrapped DEK moved to another record, or a damaged one, does not decrypt (Transit associated data)."""
    kek = VaultKek(kek_name)
    a = create_record(store, "a", generate_private_key("p256"), kek)
    create_record(store, "b", generate_private_key("p256"), kek)
    dek = new_dek()
    wrapped = kek.wrap(dek, a.kek_context())
    with pytest.raises(WrappedRecordError) as exc:
        kek.unwrap(wrapped, {**a.kek_context(), "keyseal:record": "b"}, "record b")
    assert "tampered with" in one_line(exc)
    assert kek.unwrap(wrapped, a.kek_context(), "record a") == dek
    with pytest.raises(WrappedRecordError):
        kek.unwrap(b"vault:v1:" + b"A" * 60, a.kek_context(), "record a")
    with pytest.raises(WrappedRecordError) as exc:
        kek.unwrap(b"not a transit ciphertext", a.kek_context(), "record a")
    assert "not a Vault Transit ciphertext" in one_line(exc)
    # Swap b's wrapped DEK into a's file: refused, the store is left as it was.
    path = store.root / "a"
    original = path.read_bytes()
    swapped = WrappedRecord.from_bytes(original, "a").with_blobs(
        WrappedRecord.from_bytes((store.root / "b").read_bytes(), "b").wrapped_dek, a.nonce, a.ciphertext)
    path.write_bytes(swapped.to_bytes())
    with pytest.raises(WrappedRecordError):
        open_record(store, "a", kek)


def test_transit_rotation_keeps_old_records(store: DirectoryStore, kek_name: str, openbao: OpenBao) -> None:
    kek = VaultKek(kek_name)
    old = create_record(store, "old", generate_private_key("ed25519"), kek)
    openbao.rotate_key(kek_name)
    new = create_record(store, "new", generate_private_key("ed25519"), kek)
    assert old.wrapped_dek.startswith(b"vault:v1:") and new.wrapped_dek.startswith(b"vault:v2:")
    open_record(store, "old", kek)
    open_record(store, "new", kek)


@pytest.mark.slow
def test_record_naming_another_key_refused_before_any_decrypt(
        tmp_path: Path, kek_name: str, openbao: OpenBao) -> None:
    """Someone who can write the store (and use some other Transit key) substitutes a record: refused, and no
    decrypt request of any kind reaches OpenBao."""
    openbao.create_key("attacker-kek", "aes256-gcm96")
    key_file = tmp_path / "release.key"
    made = run_keyseal("keys", "create", "--out", key_file, "--kek", "vault:attacker-kek", "--type", "p256")
    assert made.returncode == 0, made.stderr
    data = tmp_path / "artifact"
    data.write_bytes(b"artifact")

    mark = openbao.audit_mark()
    result = run_keyseal("sign", "--key", f"file:{key_file}", data, env={"KEYSEAL_KEK": f"vault:{kek_name}"})
    assert_one_line_error(result)
    assert "hashivault://transit/attacker-kek" in result.stderr
    assert f"not by the configured Vault Transit key hashivault://transit/{kek_name}" in result.stderr
    assert decrypts(openbao, mark) == [] and openbao.requests_since(mark) == []
    assert not (tmp_path / "artifact.asc").exists()

    # The same through the library, and for a record from another provider.
    store = DirectoryStore(tmp_path, ledger=VersionLedger())
    mark = openbao.audit_mark()
    with pytest.raises(KekMismatchError):
        open_record(store, "release.key", VaultKek(kek_name))
    local = tmp_path / "local.key"
    assert run_keyseal("keys", "create", "--out", local, "--kek", f"local:{tmp_path / 'kek'}").returncode == 0
    with pytest.raises(KekMismatchError) as exc:
        open_record(store, "local.key", VaultKek(kek_name))
    assert "switching KEK providers" in one_line(exc)
    assert decrypts(openbao, mark) == []


@pytest.mark.slow
def test_wrapped_key_signs_end_to_end(tmp_path: Path, kek_name: str, openbao: OpenBao, gpg: Gpg) -> None:
    env = {"KEYSEAL_KEK": f"vault:transit/{kek_name}"}
    key_file = tmp_path / "release.key"
    made = run_keyseal("keys", "create", "--out", key_file, "--type", "ed25519", env=env)
    assert made.returncode == 0, made.stderr
    record = WrappedRecord.from_bytes(key_file.read_bytes(), "release.key")
    assert record.kek_provider == "vault" and record.kek_id == f"hashivault://transit/{kek_name}"
    cert = tmp_path / "cert.asc"
    assert run_keyseal("keys", "mint", "--key", f"file:{key_file}", *UID, "-o", cert, env=env).returncode == 0
    data = tmp_path / "release.tar.gz"
    data.write_bytes(b"release" * 1000)
    mark = openbao.audit_mark()
    signed = run_keyseal("sign", "--key", f"file:{key_file}", "--cert", cert, data, env=env)
    assert signed.returncode == 0, signed.stderr
    assert decrypts(openbao, mark) == [f"transit/decrypt/{kek_name}"]  # one unwrap per process
    sig = data.with_name(data.name + ".asc")
    assert gpg_accepts(gpg, cert, data, sig)
    assert sqv_accepts(cert, data, sig)


@pytest.mark.slow
def test_token_without_decrypt(tmp_path: Path, kek_name: str, openbao: OpenBao) -> None:
    """A token that may encrypt but not decrypt: the canary names the missing capability; nothing is written."""
    hcl = (f'path "transit/keys/{kek_name}" {{ capabilities = ["read"] }}\n'
           f'path "transit/encrypt/{kek_name}" {{ capabilities = ["update"] }}\n')
    env = {"VAULT_TOKEN": openbao.token_for_policy(f"no-decrypt-{kek_name}", hcl), "KEYSEAL_KEK": f"vault:{kek_name}"}
    out = tmp_path / "new.key"
    result = run_keyseal("keys", "create", "--out", out, env=env)
    assert_one_line_error(result)
    assert "key wrapping startup check failed" in result.stderr
    assert f'"update" capability on path "transit/decrypt/{kek_name}"' in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []

    # An existing record (written with a full token) cannot be opened for signing either.
    key_file = tmp_path / "existing.key"
    assert run_keyseal("keys", "create", "--out", key_file, "--kek", f"vault:{kek_name}").returncode == 0
    data = tmp_path / "artifact"
    data.write_bytes(b"x")
    refused = run_keyseal("sign", "--key", f"file:{key_file}", data, env=env)
    assert_one_line_error(refused)
    assert f'"update" capability on path "transit/decrypt/{kek_name}"' in refused.stderr
    assert not (tmp_path / "artifact.asc").exists()


def test_wrong_key_types(store: DirectoryStore, openbao: OpenBao, vault_env: dict[str, str]) -> None:
    openbao.create_key("kek-rsa", "rsa-2048")
    openbao.create_key("kek-derived", "aes256-gcm96", derived=True)
    openbao.create_key("kek-ecdsa", "ecdsa-p256")
    for name, what in (("kek-rsa", "rsa-2048"), ("kek-derived", "aes256-gcm96 derived"), ("kek-ecdsa", "ecdsa-p256")):
        with pytest.raises(UnsupportedKeyError) as exc:
            VaultKek(name).canary()
        assert f"is a {what} key: key wrapping needs a non-derived aes256-gcm96 key" in one_line(exc)

    # Without "read" the type is not checked, and Transit itself refuses associated data for a non-AEAD key.
    token = openbao.token_for_policy("rsa-encrypt-only", 'path "transit/encrypt/kek-rsa" { capabilities = ["update"] }')
    with pytest.raises(UnsupportedKeyError) as exc:
        create_record(store, "x", generate_private_key("p256"),
                      VaultKek("kek-rsa", settings=VaultSettings(token=token)))
    assert "non-AEAD" in one_line(exc)
    assert store.get("x") is None


@pytest.fixture
def second_openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """A server of this test's own, so that stopping it does not disturb the session's."""
    server = OpenBao(tmp_path_factory.mktemp("openbao-stopped")).start()
    yield server
    server.stop()


@pytest.mark.slow
def test_openbao_stopped(second_openbao: OpenBao, vault_env: dict[str, str], tmp_path: Path) -> None:
    second_openbao.create_key("kek", "aes256-gcm96")
    kek = VaultKek.from_config(second_openbao.address, "kek", mount="transit", token="root")
    key_file = tmp_path / "existing.key"
    store = DirectoryStore(tmp_path, ledger=VersionLedger())
    create_record(store, "existing.key", generate_private_key("p256"), kek)
    before = key_file.read_bytes()
    second_openbao.stop()

    env = {"VAULT_ADDR": second_openbao.address, "KEYSEAL_KEK": "vault:kek", "KEYSEAL_VAULT_MAX_ATTEMPTS": "2"}
    out = tmp_path / "new.key"
    created = run_keyseal("keys", "create", "--out", out, env=env)
    assert_one_line_error(created)
    assert f"cannot reach Vault at {second_openbao.address}" in created.stderr
    assert "key wrapping startup check failed" in created.stderr
    data = tmp_path / "artifact"
    data.write_bytes(b"x")
    signed = run_keyseal("sign", "--key", f"file:{key_file}", data, env=env)
    assert_one_line_error(signed)
    assert f"cannot reach Vault at {second_openbao.address}" in signed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact", "existing.key"]
    assert key_file.read_bytes() == before
    with pytest.raises(BackendUnavailableError):
        kek.canary()


def test_from_config_and_specs(openbao: OpenBao, vault_env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                               tmp_path: Path) -> None:
    """The constructor a server configuration uses: address, Transit key, mount, one token source."""
    openbao.request("POST", "sys/mounts/team/transit", {"type": "transit"})
    openbao.create_key("server-kek", "aes256-gcm96", mount="team/transit")
    hcl = ('path "team/transit/keys/server-kek" { capabilities = ["read"] }\n'
           'path "team/transit/encrypt/server-kek" { capabilities = ["update"] }\n'
           'path "team/transit/decrypt/server-kek" { capabilities = ["update"] }\n')
    token_file = tmp_path / "vault-token"
    token_file.write_text(openbao.token_for_policy("server-kek", hcl))
    for name in ("VAULT_ADDR", "VAULT_TOKEN"):
        monkeypatch.delenv(name)
    kek = VaultKek.from_config(openbao.address, "server-kek", mount="team/transit", token_file=token_file)
    assert kek.kek_id == "hashivault://team/transit/server-kek"
    kek.canary()
    store = DirectoryStore(tmp_path / "records", ledger=VersionLedger())
    key = generate_private_key("p384")
    create_record(store, "ca", key, kek)
    assert der(open_record(store, "ca", kek).private_key) == der(key)

    assert isinstance(parse_kek("vault:team/transit/server-kek"), VaultKek)
    assert parse_kek("vault:hashivault://team/transit/server-kek").kek_id == kek.kek_id  # type: ignore[union-attr]
    assert VaultKek("k", settings=VaultSettings(address=openbao.address, namespace="ns1")).kek_id == \
        "hashivault://transit/k?namespace=ns1"
    for spec in ("vault:", "vault:transit/k?version=1", "vault:a b"):
        with pytest.raises((UsageError, KeyURIError)):
            parse_kek(spec)


def test_missing_capability_names_path_without_token(openbao: OpenBao, kek_name: str, store: DirectoryStore) -> None:
    token = openbao.token_for_policy(f"nothing-{kek_name}", 'path "sys/nothing" { capabilities = ["read"] }')
    kek = VaultKek(kek_name, settings=VaultSettings(token=token))
    with pytest.raises(AccessDeniedError) as exc:
        kek.canary()
    message = one_line(exc)
    assert f'"update" capability on path "transit/encrypt/{kek_name}"' in message and token not in message


@pytest.mark.slow
def test_rewrap_to_another_transit_key(tmp_path: Path, kek_name: str, openbao: OpenBao) -> None:
    """KEK rotation to a new Transit key: `keys rewrap` opens with the old key and seals with the new one."""
    openbao.create_key(f"{kek_name}-next", "aes256-gcm96")
    key_file = tmp_path / "release.key"
    assert run_keyseal("keys", "create", "--out", key_file, "--kek", f"vault:{kek_name}").returncode == 0
    before = WrappedRecord.from_bytes(key_file.read_bytes(), "release.key")
    mark = openbao.audit_mark()
    rewrapped = run_keyseal("keys", "rewrap", "--kek", f"vault:{kek_name}-next", "--from-kek", f"vault:{kek_name}",
                            key_file)
    assert rewrapped.returncode == 0, rewrapped.stderr
    after = WrappedRecord.from_bytes(key_file.read_bytes(), "release.key")
    assert after.kek_id == f"hashivault://transit/{kek_name}-next" and after.version == before.version + 1
    assert f"transit/decrypt/{kek_name}" in decrypts(openbao, mark)
    store = DirectoryStore(tmp_path, ledger=VersionLedger())
    with pytest.raises(KekMismatchError):
        open_record(store, "release.key", VaultKek(kek_name))
    open_record(store, "release.key", VaultKek(f"{kek_name}-next"))

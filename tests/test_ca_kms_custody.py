"""Key-manager custody: the CA keys are AWS KMS keys (the emulator, with its DIGEST fix), every SVID signature
is exactly one kms:Sign counted by the KMS server, and no CA private key is ever in this process."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest

from keyseal._internal.ca.config import parse_config
from keyseal._internal.ca.custody.keys import SignerCaKey
from keyseal._internal.ca.custody.manager import KeysetManager
from keyseal._internal.ca.server import CaServer, build_source
from keyseal.errors import UnsupportedKeyError
from tests.conftest import REGION
from tests.harness.ca import (
    TOKENS,
    TRUST_DOMAIN,
    Client,
    FakeClock,
    base_config,
    new_key,
    openssl_verify,
    verify_jwt_svid,
    verify_x509_svid,
)
from tests.harness.kms_emulator import KmsEmulator

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

A = f"spiffe://{TRUST_DOMAIN}/ns/a/w"


def kms_config(tmp: Path, endpoint: str, prefix: str, **extra: Any) -> dict[str, Any]:
    return base_config(tmp, custody="kms", aws={"endpoints": {"kms": endpoint}, "keyManager": {"aliasPrefix": prefix}},
                       **extra)


def all_keys(client: Any) -> set[str]:
    return {k["KeyId"] for page in client.get_paginator("list_keys").paginate() for k in page["Keys"]}


def all_aliases(client: Any) -> list[dict[str, Any]]:
    return [a for page in client.get_paginator("list_aliases").paginate() for a in page["Aliases"]]


def admin(kms_emulator: KmsEmulator) -> Any:
    return boto3.client("kms", region_name=REGION, endpoint_url=kms_emulator.endpoint,
                        aws_access_key_id="admin", aws_secret_access_key="admin")


def test_one_sign_per_svid(tmp_path: Path, kms_emulator: KmsEmulator, aws_env: dict[str, str]) -> None:
    prefix = f"test/{uuid.uuid4().hex[:8]}"
    server = CaServer(parse_config(kms_config(tmp_path, kms_emulator.endpoint, prefix)))
    server.start()
    server.start_background()
    try:
        startup = kms_emulator.calls.counts()
        assert startup["CreateKey"] == 2 and startup["CreateAlias"] == 2  # the X.509 CA key and the JWT key
        keyset = server.manager.active()
        assert isinstance(keyset.x509_key, SignerCaKey) and isinstance(keyset.jwt_key, SignerCaKey)
        # every signature is a remote call: issuance is answered on worker threads, never on the listener's loop
        assert not server.answers_from_memory("/v1/x509-svid") and not server.answers_from_memory("/v1/jwt-svid")
        assert server.answers_from_memory("/v1/bundle")
        with pytest.raises(UnsupportedKeyError):
            keyset.x509_key.builder_key().private_bytes(None, None, None)  # type: ignore[arg-type]
        aliases = {a["AliasName"] for a in all_aliases(admin(kms_emulator))}
        assert {f"alias/{prefix}/keyset-1-x509", f"alias/{prefix}/keyset-1-jwt"} <= aliases

        client = Client(server.port, keyset.ca_pem, token=TOKENS["ns-a"])
        bundle = client.bundle()
        kms_emulator.calls.clear()
        issued = []
        for _ in range(15):
            key = new_key()
            status, body = client.x509_svid(A, key)
            assert status == 200, body
            issued.append((key, body))
        tokens = []
        for _ in range(10):
            status, body = client.jwt_svid(A, ["db"])
            assert status == 200, body
            tokens.append(body["token"])
        assert kms_emulator.calls.counts() == {"Sign": 25}  # exactly one kms:Sign per SVID, nothing else
        now = datetime.now(UTC)
        for key, body in issued:
            verify_x509_svid(body, key, bundle, now)
        assert openssl_verify(tmp_path, issued[0][1]["certChain"][0], bundle).returncode == 0
        for token in tokens:
            verify_jwt_svid(token, bundle, {"db"})
        client.close()
    finally:
        server.shutdown()

    # A restart finds the same keys through their aliases, and creates none.
    kms_emulator.calls.clear()
    again = CaServer(parse_config(kms_config(tmp_path, kms_emulator.endpoint, prefix)))
    again.start()
    try:
        counts = kms_emulator.calls.counts()
        assert counts["CreateKey"] == 0 and counts["GetPublicKey"] == 2
        restarted = again.manager.active()
        assert restarted.jwt_kid == keyset.jwt_kid
        assert restarted.ca_certificate.public_key() == keyset.ca_certificate.public_key()
        assert restarted.ca_certificate.serial_number == keyset.ca_certificate.serial_number
    finally:
        again.shutdown()


def test_rotation_creates_new_kms_keys(tmp_path: Path, kms_emulator: KmsEmulator, aws_env: dict[str, str]) -> None:
    prefix = f"test/{uuid.uuid4().hex[:8]}"
    clock = FakeClock()
    config = parse_config(kms_config(tmp_path, kms_emulator.endpoint, prefix))
    manager = KeysetManager(build_source(config), TRUST_DOMAIN, config.ca_ttl, config.refresh_hint, clock)
    manager.start()
    first = manager.active()
    clock.advance(timedelta(hours=12))
    kms_emulator.calls.clear()
    manager.refresh()
    assert [(k.number, s) for k, s in manager.live()] == [(1, "active"), (2, "prepared")]
    counts = kms_emulator.calls.counts()
    # two new keys; keyset 1's X.509 key signs keyset 2's pin, and keyset 2's key its CA certificate
    assert counts["CreateKey"] == 2 and counts["Sign"] == 2
    second = manager.keyset(2)
    assert second is not None and second.not_before == clock()
    clock.advance(timedelta(hours=8))
    assert manager.active().number == 2
    assert manager.keyset(1) is not None and first.number == 1
    # Time passing alone makes no KMS call: activation is decided from the keysets' times.
    kms_emulator.calls.clear()
    manager.live()
    manager.active()
    assert kms_emulator.calls.counts() == {}


def test_two_replicas_create_one_keyset(tmp_path: Path, kms_emulator: KmsEmulator, aws_env: dict[str, str]) -> None:
    prefix = f"test/{uuid.uuid4().hex[:8]}"
    config = parse_config(kms_config(tmp_path, kms_emulator.endpoint, prefix))
    managers = [KeysetManager(build_source(config), TRUST_DOMAIN, config.ca_ttl, config.refresh_hint)
                for _ in range(2)]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []
    keys_before = all_keys(admin(kms_emulator))

    def start(manager: KeysetManager) -> None:
        try:
            barrier.wait(timeout=30)
            manager.start()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(m,)) for m in managers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert managers[0].active().jwt_kid == managers[1].active().jwt_kid
    assert managers[0].active().ca_certificate.public_key() == managers[1].active().ca_certificate.public_key()
    client = admin(kms_emulator)
    aliases = [a for a in all_aliases(client) if a["AliasName"].startswith(f"alias/{prefix}/")]
    assert len(aliases) == 2
    # Any key a losing replica created was scheduled for deletion, not left behind.
    new_keys = all_keys(client) - keys_before
    states = {key: client.describe_key(KeyId=key)["KeyMetadata"]["KeyState"] for key in new_keys}
    targets = {a["TargetKeyId"] for a in aliases}
    assert {key for key, state in states.items() if state == "Enabled"} == targets
    assert all(state == "PendingDeletion" for key, state in states.items() if key not in targets)

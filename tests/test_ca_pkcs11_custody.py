"""Key-manager custody through PKCS#11: the CA keys are generated inside a real SoftHSM2 token, non-extractable,
every SVID signature is one C_Sign, and the SVIDs validate with the PyPI `spiffe` package against the bundle."""

from __future__ import annotations

import json
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from keyseal._internal.backends import pkcs11 as backend
from keyseal._internal.ca.config import parse_config
from keyseal._internal.ca.custody.manager import KeysetManager
from keyseal._internal.ca.custody.pkcs11 import APPLICATION, Pkcs11CaKey
from keyseal._internal.ca.server import CaServer, build_source
from keyseal._internal.providers.pkcs11 import session as pkcs11_session
from keyseal.errors import UnsupportedKeyError, UsageError
from keyseal.signer import HashName
from tests.conftest import run_keyseal
from tests.harness.ca import (
    TOKENS,
    TRUST_DOMAIN,
    Client,
    base_config,
    bundle_authorities,
    new_key,
    openssl_verify,
    verify_jwt_svid,
    verify_x509_svid,
)
from tests.harness.softhsm import USER_PIN, SoftHsm
from tests.test_server_startup import ServerProcess, assert_fails_cleanly, write_config

TOKEN = "keyseal-ca"
A = f"spiffe://{TRUST_DOMAIN}/ns/a/w"


@pytest.fixture(scope="module")
def token(softhsm: SoftHsm) -> str:
    """The CA's token (init_token re-initialises SoftHSM in this process if it was loaded before)."""
    return softhsm.init_token(TOKEN)


@pytest.fixture(autouse=True)
def no_sessions_left() -> Iterator[None]:
    """Servers here do not close their keys; close the shared sessions so later tests start clean."""
    yield
    pkcs11_session.close_all_sessions()


@pytest.fixture
def pin_file(tmp_path: Path) -> Path:
    path = tmp_path / "pkcs11-pin"
    path.write_text(USER_PIN + "\n")
    path.chmod(0o600)
    return path


def pkcs11_config(tmp: Path, softhsm: SoftHsm, pin_file: Path, prefix: str, **extra: Any) -> dict[str, Any]:
    return base_config(tmp, custody="pkcs11",
                       pkcs11={"uri": f"pkcs11:token={TOKEN}", "modulePath": softhsm.module,
                               "pinFile": str(pin_file), "labelPrefix": prefix}, **extra)


def new_prefix() -> str:
    return f"test/{uuid.uuid4().hex[:8]}/"


def token_objects(softhsm: SoftHsm, pin_file: Path, prefix: str) -> list[dict[str, Any]]:
    """What the token holds under the prefix, read through a logged-in session."""
    found = []
    with pkcs11_session.token_session(f"pkcs11:token={TOKEN}?module-path={softhsm.module}&pin-source=file:{pin_file}"
                               ) as access:
        attr, classes = access.pkcs11.Attribute, access.pkcs11.ObjectClass
        for obj in access.session.get_objects({}):
            label = obj[attr.LABEL]
            if not label.startswith(prefix):
                continue
            item: dict[str, Any] = {"label": label, "class": obj[attr.CLASS]}
            if item["class"] == classes.PRIVATE_KEY:
                item.update(sensitive=obj[attr.SENSITIVE], extractable=obj[attr.EXTRACTABLE],
                            never_extractable=obj[attr.NEVER_EXTRACTABLE], token=obj[attr.TOKEN])
                try:
                    obj[attr.VALUE]
                    item["value"] = "readable"
                except access.pkcs11.AttributeSensitive:
                    item["value"] = "sensitive"
                try:
                    obj[attr.PRIVATE_EXPONENT if obj[attr.KEY_TYPE] == access.pkcs11.KeyType.RSA else attr.VALUE]
                    item["secret"] = "readable"
                except access.pkcs11.AttributeSensitive:
                    item["secret"] = "sensitive"
            if item["class"] == classes.DATA:
                item["application"] = obj[attr.APPLICATION]
                item["value"] = json.loads(bytes(obj[attr.VALUE]))
            found.append(item)
    return sorted(found, key=lambda i: (i["label"], int(i["class"])))


class SignCounter:
    """Counts calls into the token's signing path (each is one C_Sign), calling through to the real one."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self._lock = threading.Lock()
        real = backend.Pkcs11Signer.sign_digest

        def counted(signer: backend.Pkcs11Signer, digest: bytes, hash_name: HashName) -> bytes:
            with self._lock:
                self.count += 1
            return real(signer, digest, hash_name)

        monkeypatch.setattr(backend.Pkcs11Signer, "sign_digest", counted)


@pytest.mark.slow
def test_svids_one_c_sign_each_and_restart(token: str, softhsm: SoftHsm, pin_file: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = new_prefix()
    config = parse_config(pkcs11_config(tmp_path, softhsm, pin_file, prefix))
    server = CaServer(config)
    server.start()
    server.start_background()
    try:
        keyset = server.manager.active()
        assert isinstance(keyset.x509_key, Pkcs11CaKey) and isinstance(keyset.jwt_key, Pkcs11CaKey)
        with pytest.raises(UnsupportedKeyError):  # the builder gets a proxy: nothing to export
            keyset.x509_key.builder_key().private_bytes(None, None, None)  # type: ignore[arg-type]
        client = Client(server.port, keyset.ca_pem, token=TOKENS["ns-a"])
        bundle = client.bundle()
        counter = SignCounter(monkeypatch)
        issued = []
        for _ in range(6):
            key = new_key()
            status, body = client.x509_svid(A, key)
            assert status == 200, body
            issued.append((key, body))
        tokens = []
        for _ in range(4):
            status, body = client.jwt_svid(A, ["db"])
            assert status == 200, body
            tokens.append(body["token"])
        assert counter.count == 10  # exactly one signature in the token per SVID
        now = datetime.now(UTC)
        for key, body in issued:
            verify_x509_svid(body, key, bundle, now)
        assert openssl_verify(tmp_path, issued[0][1]["certChain"][0], bundle).returncode == 0
        for jwt in tokens:
            assert str(verify_jwt_svid(jwt, bundle, {"db"}).spiffe_id) == A
        client.close()
    finally:
        server.shutdown()

    objects = token_objects(softhsm, pin_file, prefix)
    classes = pkcs11_session.python_pkcs11().ObjectClass
    assert [(o["label"], o["class"]) for o in objects] == [
        (f"{prefix}keyset-1", classes.DATA),
        (f"{prefix}keyset-1-jwt", classes.PUBLIC_KEY), (f"{prefix}keyset-1-jwt", classes.PRIVATE_KEY),
        (f"{prefix}keyset-1-x509", classes.PUBLIC_KEY), (f"{prefix}keyset-1-x509", classes.PRIVATE_KEY),
    ]
    marker = objects[0]
    assert marker["application"] == APPLICATION
    assert marker["value"]["keyset"] == 1 and marker["value"]["trustDomain"] == TRUST_DOMAIN
    assert marker["value"]["notBefore"] == keyset.not_before.strftime("%Y-%m-%dT%H:%M:%SZ")
    for private in (o for o in objects if o["class"] == classes.PRIVATE_KEY):
        assert private == {**private, "sensitive": True, "extractable": False, "never_extractable": True,
                           "token": True, "value": "sensitive", "secret": "sensitive"}

    # A restart finds the same keys through the marker, creates nothing, and serves the same bundle: the same
    # JWT keys, and CA certificates that differ only in their (randomised ECDSA) signature.
    again = CaServer(parse_config(pkcs11_config(tmp_path, softhsm, pin_file, prefix)))
    again.start()
    again.start_background()
    try:
        restarted = again.manager.active()
        assert restarted.number == 1 and restarted.jwt_kid == keyset.jwt_kid
        assert restarted.ca_certificate.tbs_certificate_bytes == keyset.ca_certificate.tbs_certificate_bytes
        client = Client(again.port, restarted.ca_pem, token=TOKENS["ns-a"])
        bundle_again = client.bundle()
        assert [k for k in bundle_again["keys"] if k["use"] == "jwt-svid"] == \
               [k for k in bundle["keys"] if k["use"] == "jwt-svid"]
        assert [c.tbs_certificate_bytes for c in bundle_authorities(bundle_again)] == \
               [c.tbs_certificate_bytes for c in bundle_authorities(bundle)]
        key = new_key()
        status, body = client.x509_svid(A, key)
        assert status == 200, body
        verify_x509_svid(body, key, bundle, datetime.now(UTC))  # chains to the bundle from before the restart
        client.close()
    finally:
        again.shutdown()
    assert len(token_objects(softhsm, pin_file, prefix)) == 5


@pytest.mark.slow
def test_rsa_ca_bundle_is_byte_stable(token: str, softhsm: SoftHsm, pin_file: Path, tmp_path: Path) -> None:
    """RSA PKCS#1 v1.5 signatures are deterministic: the CA certificate rebuilt at a restart is byte-identical."""
    prefix = new_prefix()
    raw = pkcs11_config(tmp_path, softhsm, pin_file, prefix, ca={"keyType": "rsa-2048"},
                        jwtSVID={"keyType": "ec-p256"})
    first = KeysetManager(build_source(parse_config(raw)), TRUST_DOMAIN, timedelta(days=1), timedelta(minutes=5))
    first.start()
    second = KeysetManager(build_source(parse_config(raw)), TRUST_DOMAIN, timedelta(days=1), timedelta(minutes=5))
    second.start()
    one, two = first.active(), second.active()
    assert one.ca_certificate.public_bytes(serialization.Encoding.DER) == \
           two.ca_certificate.public_bytes(serialization.Encoding.DER)
    assert one.ca_certificate.public_key().key_size == 2048 and one.jwt_kid == two.jwt_kid


# Keyset 2 created later, with its own keys and time, read back by another source from the token alone:
# tests/test_keyset_source_contract.py (over every custody).


def test_leftover_keys_of_an_unfinished_creation_are_replaced(token: str, softhsm: SoftHsm, pin_file: Path,
                                                               tmp_path: Path) -> None:
    """A writer that stopped after generating a key pair but before writing the marker leaves objects with the
    keyset's labels; the next creation destroys them and makes the keyset (the marker is the commit point)."""
    prefix = new_prefix()
    label = urllib.parse.quote(f"{prefix}keyset-1-x509", safe="")
    base = f"pkcs11:token={TOKEN};object={label}?module-path={softhsm.module}&pin-source=file:{pin_file}"
    backend.create_key(base, "p256")
    with backend.open(base, "", None) as leftover:
        stale = leftover.public_key()
    config = parse_config(pkcs11_config(tmp_path, softhsm, pin_file, prefix))
    manager = KeysetManager(build_source(config), TRUST_DOMAIN, config.ca_ttl, config.refresh_hint)
    manager.start()
    assert manager.active().number == 1
    assert manager.active().ca_certificate.public_key() != stale
    labels = [o["label"] for o in token_objects(softhsm, pin_file, prefix)]
    assert labels.count(f"{prefix}keyset-1-x509") == 2  # one pair: the new one


@pytest.mark.parametrize(("change", "needle"), [
    ({"pkcs11": {"uri": None}}, "pkcs11.uri is required when custody is pkcs11"),
    ({"pkcs11": {"uri": "pkcs11:token=ca;object=x"}}, "must name the token only"),
    ({"pkcs11": {"uri": "pkcs11:token=ca?module-path=/x.so"}}, "both set: keep one"),
    ({"pkcs11": {"uri": "pkcs11:token=ca?pin-source=file:/p"}}, "keep pkcs11.pinFile"),
    ({"pkcs11": {"uri": "pkcs11:token=c a"}}, "pkcs11.uri: invalid PKCS#11 URI"),
    ({"pkcs11": {"labelPrefix": "a b"}}, "pkcs11.labelPrefix"),
    ({"pkcs11": {"pinValue": "1234"}}, "unknown configuration key 'pkcs11.pinValue'"),
    ({"aws": {"kmsKeyARN": "arn:aws:kms:us-east-1:123456789012:key/k"}}, "exactly one custody provider"),
    ({"custody": "wrapped"}, "the pkcs11 section is set but custody is wrapped"),
])
def test_config_rules(tmp_path: Path, softhsm: SoftHsm, change: dict[str, Any], needle: str) -> None:
    raw = pkcs11_config(tmp_path, softhsm, tmp_path / "pin", "p/")
    for key, value in change.items():
        if isinstance(value, dict):
            raw[key] = {k: v for k, v in {**raw.get(key, {}), **value}.items() if v is not None}
        else:
            raw[key] = value
    with pytest.raises(UsageError) as caught:
        parse_config(raw)
    assert needle in caught.value.message


def test_default_label_prefix_and_env_pin(tmp_path: Path) -> None:
    config = parse_config(base_config(tmp_path, custody="pkcs11", pkcs11={"uri": "pkcs11:token=ca"}))
    assert config.pkcs11 is not None and config.pkcs11.label_prefix == f"keyseal/{TRUST_DOMAIN}/"
    assert config.pkcs11.pin_file is None and config.pkcs11.module_path is None


@pytest.mark.slow
def test_wrong_pin_at_startup_is_one_line(token: str, softhsm: SoftHsm, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong-pin"
    wrong.write_text("0000-wrong\n")
    prefix = new_prefix()
    config = write_config(tmp_path, pkcs11_config(tmp_path, softhsm, wrong, prefix))
    result = run_keyseal("server", "--config", config, env=softhsm.env())
    assert_fails_cleanly(result, f"wrong PIN for PKCS#11 token '{TOKEN}'")
    assert "0000-wrong" not in result.stderr and USER_PIN not in result.stderr
    unknown = write_config(tmp_path, {**pkcs11_config(tmp_path, softhsm, wrong, prefix),
                                      "pkcs11": {"uri": "pkcs11:token=no-such-token", "modulePath": softhsm.module,
                                                 "pinFile": str(wrong)}})
    missing = run_keyseal("server", "--config", unknown, env=softhsm.env())
    assert_fails_cleanly(missing, "no PKCS#11 token matches token='no-such-token'")


@pytest.mark.slow
def test_server_process_with_pin_from_the_environment(token: str, softhsm: SoftHsm, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`keyseal server` as deployed: no pinFile, the PIN in KEYSEAL_PKCS11_PIN (a Secret as an env var)."""
    raw = pkcs11_config(tmp_path, softhsm, tmp_path / "unused", new_prefix())
    del raw["pkcs11"]["pinFile"]
    monkeypatch.setenv("KEYSEAL_PKCS11_PIN", USER_PIN)
    server = ServerProcess(write_config(tmp_path, raw))
    try:
        port = int(server.wait_for(r"serving trust domain example.org on https://127.0.0.1:(\d+) with keyset 1 "
                                   r"\(pkcs11 custody\)").group(1))
        client = Client(port, None)
        bundle = client.bundle()
        assert [k["use"] for k in bundle["keys"]] == ["x509-svid", "jwt-svid"]
        client.close()
    finally:
        code = server.stop()
    assert code == 0
    assert not any(USER_PIN in line for line in server.seen)

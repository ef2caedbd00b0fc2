"""The `hashivault:` signer and the shared Vault client against a real OpenBao dev server on 127.0.0.1.

Every signature Transit returns is verified here with `cryptography` against the public key read from the
server by the test's own admin call, so neither a wrong key nor a wrong encoding can hide.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from keyseal._internal.audit import unwrap
from keyseal._internal.backends import open_signer
from keyseal._internal.backends.hashivault import HashiVaultSigner, create_transit_key
from keyseal._internal.providers.vault.client import VaultSettings, vault_client
from keyseal._internal.providers.vault.policy import policy_hcl
from keyseal._internal.providers.vault.uri import TransitKeyRef, parse_transit_ref
from keyseal.errors import (
    AccessDeniedError,
    BackendUnavailableError,
    KeyNotFoundError,
    KeysealError,
    KeyURIError,
    UnsupportedKeyError,
    UsageError,
)
from keyseal.signer import HashName, hash_algorithm
from tests.harness.openbao import OpenBao

TYPES = {"p256": "ecdsa-p256", "p384": "ecdsa-p384", "p521": "ecdsa-p521", "rsa2048": "rsa-2048",
         "ed25519": "ed25519"}
HASHES: tuple[HashName, ...] = ("sha256", "sha384", "sha512")


def one_line(exc: pytest.ExceptionInfo[Any]) -> str:
    message = str(exc.value)
    assert message and "\n" not in message, message
    return message


def server_public_key(openbao: OpenBao, name: str, version: int) -> Any:
    """The public key as the server reports it (test's own admin read, not keyseal's)."""
    data = openbao.read_key(name)
    text = data["keys"][str(version)]["public_key"]
    if data["type"] == "ed25519":
        return ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(text))
    return serialization.load_pem_public_key(text.encode())


def verify(public_key: Any, signature: bytes, digest: bytes, hash_name: HashName) -> None:
    """Raises InvalidSignature unless `signature` is the Signer contract's encoding over `digest`."""
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        public_key.verify(signature, digest)  # Ed25519 over the digest as the message (OpenPGP v4 EdDSA)
    elif isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(signature, digest, padding.PKCS1v15(), utils.Prehashed(hash_algorithm(hash_name)))
    else:
        public_key.verify(signature, digest, ec.ECDSA(utils.Prehashed(hash_algorithm(hash_name))))


# -- URIs and policy (no server) -------------------------------------------------------------------------


@pytest.mark.parametrize(("uri", "expected"), [
    ("hashivault://release", TransitKeyRef("transit", "release")),
    ("hashivault://transit/release", TransitKeyRef("transit", "release")),
    ("hashivault://team/ci/transit/release?version=3", TransitKeyRef("team/ci/transit", "release", 3)),
    ("hashivault:" + "//kv.1/my_key-2", TransitKeyRef("kv.1", "my_key-2")),
    # the alias spelling, the same as a KEK's: one key, one meaning
    ("vault:release", TransitKeyRef("transit", "release")),
    ("vault:transit/release", TransitKeyRef("transit", "release")),
    ("vault://team/ci/transit/release?version=3", TransitKeyRef("team/ci/transit", "release", 3)),
])
def test_parse_uri(uri: str, expected: TransitKeyRef) -> None:
    assert parse_transit_ref(uri) == expected
    assert parse_transit_ref(expected.uri) == expected


@pytest.mark.parametrize("uri", [
    "hashivault:release", "hashivault://", "hashivault://transit/", "hashivault://transit//k",
    "hashivault://../k", "hashivault://transit/k?version=0", "hashivault://transit/k?version=x",
    "hashivault://transit/k?version=1&version=2", "hashivault://transit/k?mount=x", "hashivault://a b/k",
    "hashivault://transit/k*", "hashivault://transit/k?",
    "vault:", "vault:transit/", "vault:../k", "vault:transit/k?version=0", "vault:a b/k",
])
def test_parse_uri_refuses(uri: str) -> None:
    with pytest.raises(KeyURIError) as exc:
        open_signer(uri)
    one_line(exc)


def test_policy_hcl() -> None:
    sign = policy_hcl(parse_transit_ref("hashivault://ci/transit/release"), "sign")
    assert 'path "ci/transit/keys/release" {\n  capabilities = ["read"]\n}' in sign
    assert 'path "ci/transit/sign/release" {\n  capabilities = ["update"]\n}' in sign
    assert sign.count("path ") == 2 and "encrypt" not in sign and "decrypt" not in sign
    wrap = policy_hcl(parse_transit_ref("hashivault://kek"), "wrap")
    assert {line for line in wrap.splitlines() if line.startswith("path")} == {
        'path "transit/keys/kek" {', 'path "transit/encrypt/kek" {', 'path "transit/decrypt/kek" {'}
    assert '"create"' not in wrap and "sign" not in wrap.replace("keyseal", "")
    with pytest.raises(UsageError):
        policy_hcl(parse_transit_ref("hashivault://kek"), "admin")


# -- signing ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("key_type", sorted(TYPES))
def test_sign_every_hash(key_type: str, vault_env: dict[str, str], openbao: OpenBao) -> None:
    name = f"backend-{key_type}"
    uri = create_transit_key(f"hashivault://{name}", key_type)
    assert uri == f"hashivault://transit/{name}"
    data = openbao.read_key(name)
    assert data["type"] == TYPES[key_type] and data["exportable"] is False
    expected_key = server_public_key(openbao, name, 1)
    mark = openbao.audit_mark()
    with open_signer(uri) as signer:
        assert isinstance(unwrap(signer), HashiVaultSigner)  # open_signer wraps every backend for the audit log
        public = signer.public_key()
        assert public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == \
            expected_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        assert signer.supported_hashes() == HASHES
        created = signer.created_at()
        assert created is not None and created.tzinfo is not None
        for hash_name in HASHES:
            digest = hashlib.new(hash_name, f"payload {key_type}".encode()).digest()
            signature = signer.sign_digest(digest, hash_name)
            verify(expected_key, signature, digest, hash_name)
            if key_type == "ed25519":
                assert len(signature) == 64
            other = hashlib.new(hash_name, b"other payload").digest()
            with pytest.raises(Exception):  # noqa: B017 - any InvalidSignature
                verify(expected_key, signature, other, hash_name)
        with pytest.raises(UsageError):
            signer.sign_digest(b"\x00" * 20, "sha256")
    calls = openbao.requests_since(mark)
    assert calls.count(("read", f"transit/keys/{name}")) == 1  # public key read once, then cached
    assert calls.count(("update", f"transit/sign/{name}")) == len(HASHES)


def test_signing_key_as_kek_spelling(vault_env: dict[str, str], openbao: OpenBao) -> None:
    """A signing key named as a KEK is (`vault:MOUNT/KEY`) opens the same Transit key as `hashivault://`."""
    name = "backend-kek-spelling"
    create_transit_key(f"vault:transit/{name}", "p256")  # made under the alias spelling too
    expected_key = server_public_key(openbao, name, 1)
    digest = hashlib.sha256(b"either spelling").digest()
    mark = openbao.audit_mark()
    for uri in (f"vault:transit/{name}", f"vault:{name}", f"hashivault://transit/{name}"):
        with open_signer(uri) as signer:
            assert isinstance(unwrap(signer), HashiVaultSigner)
            verify(expected_key, signer.sign_digest(digest, "sha256"), digest, "sha256")
    assert openbao.requests_since(mark).count(("update", f"transit/sign/{name}")) == 3


def test_pinned_version_after_rotation(vault_env: dict[str, str], openbao: OpenBao) -> None:
    uri = create_transit_key("hashivault://transit/rotating", "p256")
    openbao.rotate_key("rotating")
    openbao.rotate_key("rotating")
    v1, v3 = server_public_key(openbao, "rotating", 1), server_public_key(openbao, "rotating", 3)
    digest = hashlib.sha256(b"pinned").digest()
    with open_signer(f"{uri}?version=1") as pinned, open_signer(uri) as latest:
        assert isinstance(unwrap(pinned), HashiVaultSigner) and isinstance(unwrap(latest), HashiVaultSigner)
        assert pinned.version == 1 and latest.version == 3
        assert pinned.public_key().public_numbers() == v1.public_numbers()
        assert latest.public_key().public_numbers() == v3.public_numbers()
        signature = pinned.sign_digest(digest, "sha256")
        verify(v1, signature, digest, "sha256")
        with pytest.raises(Exception):  # noqa: B017 - signed by v1, not v3
            verify(v3, signature, digest, "sha256")
        verify(v3, latest.sign_digest(digest, "sha256"), digest, "sha256")
        # A rotation while a signer is open does not change the key it signs with.
        openbao.rotate_key("rotating")
        verify(v3, latest.sign_digest(digest, "sha256"), digest, "sha256")
    with pytest.raises(KeyNotFoundError) as exc, open_signer(f"{uri}?version=9") as missing:
        missing.public_key()
    assert "no version 9" in one_line(exc) and "latest 4" in str(exc.value)


def test_create_refuses_existing_key(vault_env: dict[str, str], openbao: OpenBao) -> None:
    openbao.create_key("taken", "ecdsa-p384")
    mark = openbao.audit_mark()
    with pytest.raises(UsageError) as exc:
        create_transit_key("hashivault://taken", "rsa2048")
    assert "already exists" in one_line(exc) and "ecdsa-p384" in str(exc.value)
    assert openbao.read_key("taken")["type"] == "ecdsa-p384"
    assert ("update", "transit/keys/taken") not in openbao.requests_since(mark)
    assert ("create", "transit/keys/taken") not in openbao.requests_since(mark)
    with pytest.raises(KeyURIError):
        create_transit_key("hashivault://fresh?version=1", "p256")


def test_errors_are_typed_and_one_line(vault_env: dict[str, str], openbao: OpenBao) -> None:
    digest = hashlib.sha256(b"x").digest()
    openbao.create_key("a-kek", "aes256-gcm96")
    cases: list[tuple[str, type[KeysealError], str]] = [
        ("hashivault://transit/never-created", KeyNotFoundError, "check the key URI"),
        ("hashivault://nomount/k", KeyNotFoundError, "bao secrets enable -path=nomount transit"),
        ("hashivault://transit/a-kek", UnsupportedKeyError, "aes256-gcm96 key, which cannot sign"),
    ]
    for uri, error, text in cases:
        with pytest.raises(error) as exc, open_signer(uri) as signer:
            signer.sign_digest(digest, "sha256")
        assert text in one_line(exc), exc.value


def test_permission_denied_names_capability(vault_env: dict[str, str], openbao: OpenBao,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    create_transit_key("hashivault://transit/guarded", "p256")
    digest = hashlib.sha256(b"x").digest()
    read_only = openbao.token_for_policy("guarded-read", 'path "transit/keys/guarded" { capabilities = ["read"] }')
    monkeypatch.setenv("VAULT_TOKEN", read_only)
    with open_signer("hashivault://guarded") as signer:
        signer.public_key()  # allowed
        with pytest.raises(AccessDeniedError) as exc:
            signer.sign_digest(digest, "sha256")
    message = one_line(exc)
    assert '"update" capability on path "transit/sign/guarded"' in message and read_only not in message
    assert "invalid or expired" not in message  # the token itself is fine: lookup-self told them apart

    monkeypatch.setenv("VAULT_TOKEN", "s.not-a-real-token")
    with pytest.raises(AccessDeniedError) as exc, open_signer("hashivault://guarded") as signer:
        signer.public_key()
    assert "refused the token" in one_line(exc) and "invalid or expired" in str(exc.value)
    assert "s.not-a-real-token" not in str(exc.value)


def closed_port_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_unreachable_and_misconfigured(vault_env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                       tmp_path: Path) -> None:
    address = closed_port_address()
    monkeypatch.setenv("VAULT_ADDR", address)
    monkeypatch.setenv("KEYSEAL_VAULT_MAX_ATTEMPTS", "2")
    with pytest.raises(BackendUnavailableError) as exc, open_signer("hashivault://k") as signer:
        signer.public_key()
    assert f"cannot reach Vault at {address}" in one_line(exc)

    monkeypatch.delenv("VAULT_ADDR")
    with pytest.raises(UsageError) as exc, open_signer("hashivault://k") as signer:
        signer.public_key()
    assert "VAULT_ADDR" in one_line(exc)
    monkeypatch.setenv("VAULT_ADDR", "ftp://vault")
    with pytest.raises(UsageError):
        vault_client()
    monkeypatch.setenv("VAULT_ADDR", address)
    monkeypatch.setenv("VAULT_CACERT", str(tmp_path / "missing-ca.pem"))
    with pytest.raises(UsageError) as exc:
        vault_client()
    assert "VAULT_CACERT" in one_line(exc)
    monkeypatch.delenv("VAULT_CACERT")
    monkeypatch.setenv("KEYSEAL_VAULT_MAX_ATTEMPTS", "lots")
    with pytest.raises(UsageError) as exc:
        vault_client()
    assert "KEYSEAL_VAULT_MAX_ATTEMPTS" in one_line(exc)


# -- token sources --------------------------------------------------------------------------------------------


def test_token_sources(vault_env: dict[str, str], openbao: OpenBao, monkeypatch: pytest.MonkeyPatch,
                       tmp_path: Path) -> None:
    """BAO_* works like VAULT_*; a token file; the CLI's ~/.vault-token; none at all is a clear error."""
    create_transit_key("hashivault://sources", "p256")
    policy = 'path "transit/keys/sources" { capabilities = ["read"] }'
    token = openbao.token_for_policy("sources-read", policy)

    def reads() -> None:
        with open_signer("hashivault://sources") as signer:
            signer.public_key()

    monkeypatch.delenv("VAULT_ADDR")
    monkeypatch.delenv("VAULT_TOKEN")
    monkeypatch.setenv("BAO_ADDR", openbao.address)
    monkeypatch.setenv("BAO_TOKEN", token)
    reads()
    monkeypatch.delenv("BAO_TOKEN")

    with pytest.raises(AccessDeniedError) as exc:
        reads()
    assert "no Vault token is configured" in one_line(exc)

    token_file = tmp_path / "agent-sink"
    token_file.write_text(token + "\n")
    monkeypatch.setenv("KEYSEAL_VAULT_TOKEN_FILE", str(token_file))
    reads()
    token_file.write_text("")
    with pytest.raises(AccessDeniedError) as exc:
        reads()
    assert "is empty" in one_line(exc)
    monkeypatch.delenv("KEYSEAL_VAULT_TOKEN_FILE")

    (Path(os.environ["HOME"]) / ".vault-token").write_text(token)
    reads()
    # Explicit settings win over the environment.
    with HashiVaultSigner("hashivault://sources", parse_transit_ref("hashivault://sources"),
                          VaultSettings(token="s.bogus")) as signer, pytest.raises(AccessDeniedError):
        signer.public_key()


# -- Kubernetes auth: OpenBao's own kubernetes auth method against a TokenReview endpoint on 127.0.0.1 ----------


def fake_service_account_jwt(namespace: str, name: str, uid: str) -> str:
    """A JWT with a service account's claims. OpenBao does not check its signature here (no keys are
    configured): it asks the TokenReview endpoint, which is what a kube-apiserver would answer."""
    def part(obj: dict[str, Any]) -> str:
        import json

        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    claims = {
        "iss": "kubernetes/serviceaccount", "sub": f"system:serviceaccount:{namespace}:{name}",
        "kubernetes.io/serviceaccount/namespace": namespace,
        "kubernetes.io/serviceaccount/service-account.name": name,
        "kubernetes.io/serviceaccount/service-account.uid": uid,
        "kubernetes.io/serviceaccount/secret.name": f"{name}-token",
    }
    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.{base64.urlsafe_b64encode(b'sig').decode()}"


class TokenReviewApi:
    """Answers `POST /apis/authentication.k8s.io/v1/tokenreviews` as a kube-apiserver would, for one token."""

    def __init__(self, token: str, namespace: str, name: str, uid: str) -> None:
        self.reviews = 0
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                import json

                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.reviews += 1
                ok = body.get("spec", {}).get("token") == token
                status: dict[str, Any] = {"authenticated": ok}
                if ok:
                    status["user"] = {"username": f"system:serviceaccount:{namespace}:{name}", "uid": uid,
                                      "groups": ["system:serviceaccounts"]}
                answer = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                     "status": status}).encode()
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> TokenReviewApi:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def unused_ca_pem() -> str:
    """OpenBao insists on a CA certificate for the API server even over plain http, where it is not used."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test kube CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture
def kubernetes_auth(openbao: OpenBao, vault_env: dict[str, str]) -> Iterator[tuple[TokenReviewApi, str]]:
    jwt = fake_service_account_jwt("ci", "release-signer", "0b7c5f4e-0000-4000-8000-000000000001")
    with TokenReviewApi(jwt, "ci", "release-signer", "0b7c5f4e-0000-4000-8000-000000000001") as api:
        mounts = openbao.request("GET", "sys/auth")
        if "k8s/" not in mounts.get("data", mounts):
            openbao.request("POST", "sys/auth/k8s", {"type": "kubernetes"})
        openbao.request("POST", "auth/k8s/config", {"kubernetes_host": api.url, "disable_local_ca_jwt": True,
                                                    "kubernetes_ca_cert": unused_ca_pem(),
                                                    "token_reviewer_jwt": "reviewer"})
        create_transit_key("hashivault://k8s-signing", "p256")
        hcl = policy_hcl(parse_transit_ref("hashivault://k8s-signing"), "sign")
        openbao.request("PUT", "sys/policies/acl/k8s-signing", {"policy": hcl})
        openbao.request("POST", "auth/k8s/role/release-signer", {
            "bound_service_account_names": ["release-signer"], "bound_service_account_namespaces": ["ci"],
            "token_policies": ["k8s-signing"], "token_ttl": "10m"})
        yield api, jwt


@pytest.mark.slow
def test_kubernetes_auth(kubernetes_auth: tuple[TokenReviewApi, str], openbao: OpenBao,
                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    api, jwt = kubernetes_auth
    sa_token = tmp_path / "token"
    sa_token.write_text(jwt)
    monkeypatch.delenv("VAULT_TOKEN")
    monkeypatch.setenv("KEYSEAL_VAULT_K8S_ROLE", "release-signer")
    monkeypatch.setenv("KEYSEAL_VAULT_K8S_MOUNT", "k8s")
    monkeypatch.setenv("KEYSEAL_VAULT_K8S_TOKEN_FILE", str(sa_token))
    key = server_public_key(openbao, "k8s-signing", 1)
    digest = hashlib.sha256(b"in cluster").digest()
    with open_signer("hashivault://k8s-signing") as signer:
        verify(key, signer.sign_digest(digest, "sha256"), digest, "sha256")
    assert api.reviews == 1  # one login, then the Vault token

    monkeypatch.setenv("KEYSEAL_VAULT_K8S_ROLE", "no-such-role")
    with pytest.raises(KeysealError) as exc, open_signer("hashivault://k8s-signing") as signer:
        signer.public_key()
    assert "Kubernetes login" in one_line(exc) and "no-such-role" in str(exc.value)

    monkeypatch.setenv("KEYSEAL_VAULT_K8S_ROLE", "release-signer")
    monkeypatch.setenv("KEYSEAL_VAULT_K8S_TOKEN_FILE", str(tmp_path / "absent"))
    with pytest.raises(AccessDeniedError) as exc, open_signer("hashivault://k8s-signing") as signer:
        signer.public_key()
    assert "service-account token" in one_line(exc)


# -- TLS and namespaces ----------------------------------------------------------------------------------------


@pytest.fixture
def tls_openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """A server of its own with `-dev-tls`: a certificate from a CA that no system store trusts."""
    server = OpenBao(tmp_path_factory.mktemp("openbao-tls"), tls=True).start()
    yield server
    server.stop()


@pytest.mark.slow
def test_tls_is_verified(tls_openbao: OpenBao, vault_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    tls_openbao.create_key("tls-key", "ed25519")
    monkeypatch.setenv("VAULT_ADDR", tls_openbao.address)
    monkeypatch.setenv("KEYSEAL_VAULT_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("VAULT_SKIP_VERIFY", "true")  # not honoured: keyseal always verifies
    with pytest.raises(BackendUnavailableError) as exc, open_signer("hashivault://tls-key") as signer:
        signer.public_key()
    assert "TLS verification" in one_line(exc) and "VAULT_CACERT" in str(exc.value)

    monkeypatch.setenv("BAO_CACERT", str(tls_openbao.ca_file))
    digest = hashlib.sha512(b"over TLS").digest()
    with open_signer("hashivault://tls-key") as signer:
        verify(server_public_key(tls_openbao, "tls-key", 1), signer.sign_digest(digest, "sha512"), digest, "sha512")


def test_namespace(openbao: OpenBao, vault_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """VAULT_NAMESPACE sends every call to that namespace: the same key name outside it is another key."""
    openbao.request("POST", "sys/namespaces/team-a", {})
    openbao.request("POST", "team-a/sys/mounts/transit", {"type": "transit"})
    openbao.request("POST", "team-a/transit/keys/ns-key", {"type": "ecdsa-p256"})
    openbao.create_key("ns-key", "ecdsa-p384")
    with open_signer("hashivault://ns-key") as signer:
        assert isinstance(unwrap(signer), HashiVaultSigner) and signer.key_type == "ecdsa-p384"
    monkeypatch.setenv("VAULT_NAMESPACE", "team-a")
    expected = serialization.load_pem_public_key(
        openbao.request("GET", "team-a/transit/keys/ns-key")["data"]["keys"]["1"]["public_key"].encode())
    digest = hashlib.sha256(b"namespaced").digest()
    with open_signer("hashivault://ns-key") as signer:
        assert isinstance(unwrap(signer), HashiVaultSigner) and signer.key_type == "ecdsa-p256"
        verify(expected, signer.sign_digest(digest, "sha256"), digest, "sha256")


def test_token_file_is_reread_when_the_token_expires(vault_env: dict[str, str], openbao: OpenBao,
                                                     monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A long-running signer whose token file a Vault Agent rewrites: a revoked token is replaced once."""
    create_transit_key("hashivault://renewed", "p256")
    hcl = policy_hcl(parse_transit_ref("hashivault://renewed"), "sign")
    first, second = openbao.token_for_policy("renewed", hcl), openbao.token_for_policy("renewed", hcl)
    token_file = tmp_path / "sink"
    token_file.write_text(first)
    monkeypatch.delenv("VAULT_TOKEN")
    monkeypatch.setenv("KEYSEAL_VAULT_TOKEN_FILE", str(token_file))
    key = server_public_key(openbao, "renewed", 1)
    digest = hashlib.sha256(b"long running").digest()
    with open_signer("hashivault://renewed") as signer:
        verify(key, signer.sign_digest(digest, "sha256"), digest, "sha256")
        openbao.request("POST", "auth/token/revoke", {"token": first})
        token_file.write_text(second)
        verify(key, signer.sign_digest(digest, "sha256"), digest, "sha256")
        openbao.request("POST", "auth/token/revoke", {"token": second})
        with pytest.raises(AccessDeniedError) as exc:  # the file still holds a dead token: a clear error
            signer.sign_digest(digest, "sha256")
    assert "invalid or expired" in one_line(exc)

    # A plain token (VAULT_TOKEN) is never retried: one denied request.
    monkeypatch.delenv("KEYSEAL_VAULT_TOKEN_FILE")
    monkeypatch.setenv("VAULT_TOKEN", openbao.token_for_policy("renewed", hcl))
    with open_signer("hashivault://renewed") as signer:
        signer.public_key()
        openbao.request("POST", "auth/token/revoke", {"token": os.environ["VAULT_TOKEN"]})
        mark = openbao.audit_mark()
        with pytest.raises(AccessDeniedError):
            signer.sign_digest(digest, "sha256")
    assert openbao.count(mark, ["transit/sign/renewed"]) == 1

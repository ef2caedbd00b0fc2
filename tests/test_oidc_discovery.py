"""JWT-SVIDs that third parties verify on their own: the issuer claim, OIDC discovery and the JWKS, served on a
listener of their own with a certificate from files (docs/oidc.md). Checked with real relying parties: a real
OpenBao `auth/jwt` (oidc_discovery_url + oidc_discovery_ca_pem) across two CA rotations, and PyJWT's
PyJWKClient."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from keyseal._internal.ca.config import parse_config
from keyseal._internal.ca.server import CaServer
from keyseal.errors import UsageError
from tests.harness.ca import TOKENS, TRUST_DOMAIN, Client, base_config
from tests.harness.https_server import TlsFiles, make_tls
from tests.harness.openbao import OpenBao, OpenBaoError

WEB = f"spiffe://{TRUST_DOMAIN}/ns/a/web"
DB = f"spiffe://{TRUST_DOMAIN}/ns/a/db"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def oidc_config(tmp: Path, tls: TlsFiles, port: int, **overrides: Any) -> dict[str, Any]:
    issuer = f"https://127.0.0.1:{port}"
    return base_config(tmp, jwtSVID={"issuer": issuer, **overrides.pop("jwtSVID", {})},
                       oidc={"listen": f"127.0.0.1:{port}",
                             "tls": {"certFile": str(tls.cert_pem), "keyFile": str(tls.key_pem)}},
                       **overrides)


def start(config: dict[str, Any]) -> CaServer:
    server = CaServer(parse_config(config), rotation_thread=False)
    server.start()
    server.start_background()
    return server


def get_json(url: str, ca_file: Path) -> Any:
    context = ssl.create_default_context(cafile=str(ca_file))
    with urllib.request.urlopen(url, timeout=10, context=context) as answer:
        assert answer.headers["Content-Type"].startswith("application/json")
        return json.loads(answer.read())


@pytest.fixture
def web_tls(tmp_path: Path) -> TlsFiles:
    return make_tls(tmp_path / "web", ["127.0.0.1"], ca_name="web PKI test CA")


def jwt_svid(server: CaServer, spiffe_id: str, audience: str) -> str:
    client = Client(server.port, None, TOKENS["admin"])
    try:
        status, body = client.jwt_svid(spiffe_id, audience)
    finally:
        client.close()
    assert status == 200, body
    return str(body["token"])


# -- the discovery document, the JWKS and the iss claim, as a standard OIDC client library sees them ----------


def test_pyjwt_verifies_a_jwt_svid_through_discovery(tmp_path: Path, web_tls: TlsFiles) -> None:
    port = free_port()
    server = start(oidc_config(tmp_path, web_tls, port))
    try:
        issuer = f"https://127.0.0.1:{port}"
        discovery = get_json(f"{issuer}/.well-known/openid-configuration", web_tls.ca_pem)
        assert discovery["issuer"] == issuer
        assert discovery["jwks_uri"] == f"{issuer}/keys"
        assert discovery["id_token_signing_alg_values_supported"] == ["ES256"]
        assert discovery["response_types_supported"] == ["id_token"]
        assert discovery["subject_types_supported"] == ["public"]
        jwks = get_json(discovery["jwks_uri"], web_tls.ca_pem)
        assert jwks["keys"] and all({"kid", "alg", "use", "kty"} <= set(k) and k["use"] == "sig"
                                    for k in jwks["keys"])
        token = jwt_svid(server, WEB, "https://api.example.org")
        client = jwt.PyJWKClient(discovery["jwks_uri"], ssl_context=ssl.create_default_context(
            cafile=str(web_tls.ca_pem)))
        key = client.get_signing_key_from_jwt(token)
        claims = jwt.decode(token, key.key, algorithms=discovery["id_token_signing_alg_values_supported"],
                            audience="https://api.example.org", issuer=issuer)
        assert claims["sub"] == WEB and claims["iss"] == issuer
        with pytest.raises(jwt.InvalidIssuerError):
            jwt.decode(token, key.key, algorithms=["ES256"], audience="https://api.example.org",
                       issuer="https://other.example.org")
        with pytest.raises(jwt.InvalidAudienceError):
            jwt.decode(token, key.key, algorithms=["ES256"], audience="https://wrong.example.org", issuer=issuer)
    finally:
        server.shutdown()


def test_without_an_issuer_tokens_carry_no_iss_and_nothing_more_listens(tmp_path: Path) -> None:
    server = start(base_config(tmp_path))
    try:
        claims = jwt.decode(jwt_svid(server, WEB, "a"), options={"verify_signature": False})
        assert "iss" not in claims
        assert server.side_listeners == {}
    finally:
        server.shutdown()


def test_discovery_listener_is_public_and_serves_only_discovery(tmp_path: Path, web_tls: TlsFiles) -> None:
    port = free_port()
    server = start(oidc_config(tmp_path, web_tls, port))
    try:
        # No client certificate is asked for (a CertificateRequest would list acceptable CA names).
        shown = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile",
                                str(web_tls.ca_pem), "-verify_return_error"], input="", capture_output=True,
                               text=True, timeout=30, check=False)
        assert "Verify return code: 0 (ok)" in shown.stdout
        assert "Acceptable client certificate CA names" not in shown.stdout
        context = ssl.create_default_context(cafile=str(web_tls.ca_pem))
        for path, status in (("/v1/bundle", 404), ("/v1/jwt-svid", 404), ("/healthz", 200)):
            request = urllib.request.Request(f"https://127.0.0.1:{port}{path}")
            try:
                with urllib.request.urlopen(request, timeout=10, context=context) as answer:
                    assert answer.status == status
            except urllib.error.HTTPError as exc:
                assert exc.code == status
        post = urllib.request.Request(f"https://127.0.0.1:{port}/keys", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(post, timeout=10, context=context)
        assert refused.value.code == 405
    finally:
        server.shutdown()


@pytest.mark.slow
def test_discovery_certificate_is_reloaded_when_its_files_change(tmp_path: Path, web_tls: TlsFiles) -> None:
    port = free_port()
    server = start(oidc_config(tmp_path, web_tls, port))
    try:
        get_json(f"https://127.0.0.1:{port}/keys", web_tls.ca_pem)
        renewed = make_tls(tmp_path / "renewed", ["127.0.0.1"], ca_name="another web CA")
        # A half-written change (a certificate without its key) keeps the last good certificate.
        shutil.copy(renewed.cert_pem, web_tls.cert_pem)
        time.sleep(1.2)
        get_json(f"https://127.0.0.1:{port}/keys", web_tls.ca_pem)
        shutil.copy(renewed.key_pem, web_tls.key_pem)
        deadline = time.monotonic() + 10
        while True:
            try:
                get_json(f"https://127.0.0.1:{port}/keys", renewed.ca_pem)
                break
            except (urllib.error.URLError, ssl.SSLError):
                assert time.monotonic() < deadline, "the renewed certificate was never served"
                time.sleep(0.3)
        with pytest.raises(urllib.error.URLError):
            get_json(f"https://127.0.0.1:{port}/keys", web_tls.ca_pem)
    finally:
        server.shutdown()


@pytest.mark.parametrize(("settings", "message"), [
    ({"jwtSVID": {"issuer": "http://oidc.example.org"}}, "not an OIDC issuer"),
    ({"jwtSVID": {"issuer": "https://oidc.example.org/"}}, "not an OIDC issuer"),
    ({"jwtSVID": {"issuer": "https://oidc.example.org?x=1"}}, "not an OIDC issuer"),
    ({"oidc": {"listen": "127.0.0.1:8444", "tls": {"certFile": "c", "keyFile": "k"}}}, "jwtSVID.issuer is not"),
    ({"jwtSVID": {"issuer": "https://o.example.org"}, "oidc": {"listen": "127.0.0.1:8444"}},
     "oidc.tls.certFile and oidc.tls.keyFile are required"),
    ({"oidc": {"listne": "127.0.0.1:8444"}}, "unknown configuration key 'oidc.listne'"),
])
def test_oidc_configuration_mistakes_are_refused(tmp_path: Path, settings: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("?", r"\?")):
        parse_config(base_config(tmp_path, **settings))


# -- a real OpenBao auth/jwt, configured by OIDC discovery, across two CA rotations --------------------------


@pytest.fixture
def openbao(tmp_path: Path) -> Iterator[OpenBao]:
    server = OpenBao(tmp_path / "openbao").start()
    try:
        yield server
    finally:
        server.stop()


def login(bao: OpenBao, role: str, token: str) -> dict[str, Any]:
    return bao.request("POST", "auth/jwt/login", {"role": role, "jwt": token})["auth"]


@pytest.mark.slow
def test_openbao_logs_in_with_jwt_svids_through_discovery_across_two_rotations(
        tmp_path: Path, web_tls: TlsFiles, openbao: OpenBao) -> None:
    port = free_port()
    # A short CA lifetime so two rotations happen within the test: keyset n+1 is prepared at half of n's life
    # and active at five sixths of it.
    server = start(oidc_config(tmp_path, web_tls, port, ca={"ttl": "18s"}, x509SVID={"ttl": "3s"},
                               jwtSVID={"ttl": "3s"}, bundle={"refreshHint": "3s"}))
    try:
        issuer = f"https://127.0.0.1:{port}"
        openbao.request("POST", "sys/auth/jwt", {"type": "jwt"})
        openbao.request("POST", "auth/jwt/config", {
            "oidc_discovery_url": issuer, "oidc_discovery_ca_pem": web_tls.ca_pem.read_text(),
            "bound_issuer": issuer})
        openbao.request("POST", "auth/jwt/role/web", {
            "role_type": "jwt", "user_claim": "sub", "bound_subject": WEB, "bound_audiences": ["openbao"],
            "token_policies": ["default"], "token_ttl": 60})
        assert login(openbao, "web", jwt_svid(server, WEB, "openbao"))["metadata"]["role"] == "web"
        with pytest.raises(OpenBaoError, match=r"400.*sub"):  # another workload's token
            login(openbao, "web", jwt_svid(server, DB, "openbao"))
        with pytest.raises(OpenBaoError, match=r"400.*aud"):  # the right workload, a wrong audience
            login(openbao, "web", jwt_svid(server, WEB, "another-service"))

        # A token that names the same issuer and subject but is signed by another CA's key: refused.
        impostor = start(base_config(tmp_path / "impostor", jwtSVID={"issuer": issuer}))
        try:
            with pytest.raises(OpenBaoError, match="400"):
                login(openbao, "web", jwt_svid(impostor, WEB, "openbao"))
        finally:
            impostor.shutdown()

        first = server.manager.active().number
        for rotation in (1, 2):
            deadline = time.monotonic() + 40
            while server.manager.active().number < first + rotation:
                assert time.monotonic() < deadline, f"rotation {rotation} did not happen"
                server.tick()
                time.sleep(0.5)
            token = jwt_svid(server, WEB, "openbao")
            assert jwt.get_unverified_header(token)["kid"] == server.manager.active().jwt_kid
            assert login(openbao, "web", token)["metadata"]["role"] == "web", f"after rotation {rotation}"
        with pytest.raises(OpenBaoError, match=r"400.*aud"):
            login(openbao, "web", jwt_svid(server, WEB, "another-service"))
    finally:
        server.shutdown()

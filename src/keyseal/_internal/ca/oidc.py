"""OIDC discovery for JWT-SVIDs: what AWS IAM, GCP workload identity federation, Azure federated credentials,
Vault/OpenBao `auth/jwt` and OIDC libraries fetch to verify a JWT-SVID on their own (docs/oidc.md).

With `jwtSVID.issuer` set, every JWT-SVID carries that `iss`, and this listener answers
`<issuer>/.well-known/openid-configuration` and the JWKS it names (`<issuer>/keys`): the JWT key of every live
keyset (prepared ones included, so a relying party knows a key before it signs, and old ones until they expire),
each with `kid`, `alg` and `use: sig`. It is a listener of its own (`oidc.listen`), with a certificate from
files that does not follow the CA's rotation (ca.http.tls_files), public: no client certificate, no token.
Only GET and the two documents; everything is answered from memory on the listener's thread.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from typing import Any

from keyseal._internal.ca.custody.keys import jws_algorithm
from keyseal._internal.ca.custody.keyset import Keyset, jwk_of
from keyseal._internal.ca.custody.manager import KeysetManager
from keyseal._internal.ca.http.http1 import error
from keyseal._internal.ca.http.messages import Request, Response

__all__ = ["DISCOVERY_PATH", "JWKS_PATH", "OidcApi", "discovery_document", "jwks_document"]

DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/keys"
JSON = "application/json"


def jwks_document(keysets: list[Keyset]) -> dict[str, Any]:
    """The JWKS of these keysets' JWT keys (RFC 7517), as OIDC relying parties expect them."""
    keys = []
    for keyset in sorted(keysets, key=lambda k: k.number):
        public = keyset.jwt_key.public_key()
        keys.append({**jwk_of(public), "kid": keyset.jwt_kid, "alg": jws_algorithm(public), "use": "sig"})
    return {"keys": keys}


def discovery_document(issuer: str, keysets: list[Keyset]) -> dict[str, Any]:
    """OpenID Connect Discovery 1.0 metadata: what cloud providers require of an identity provider that only
    issues tokens (no authorization endpoint is used: workloads get their tokens from keyseal)."""
    algorithms = sorted({jws_algorithm(k.jwt_key.public_key()) for k in keysets}) or ["ES256"]
    return {
        "issuer": issuer,
        "jwks_uri": issuer + JWKS_PATH,
        "authorization_endpoint": "",  # required by the metadata schema, and there is none (as SPIRE's provider)
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": algorithms,
        "claims_supported": ["sub", "aud", "exp", "iat", "iss"],
    }


class OidcApi:
    """The discovery listener's routes. Answers change only when the live keysets do, so they are cached."""

    def __init__(self, issuer: str, manager: KeysetManager, cache_seconds: int) -> None:
        self.issuer = issuer
        self.manager = manager
        self.cache_seconds = cache_seconds
        prefix = urllib.parse.urlsplit(issuer).path.rstrip("/")
        self._routes = {prefix + DISCOVERY_PATH: "discovery", prefix + JWKS_PATH: "jwks", "/healthz": "health"}
        self._lock = threading.Lock()
        self._cache: tuple[tuple[Keyset, ...], dict[str, bytes]] = ((), {})

    def _documents(self) -> dict[str, bytes]:
        keysets = tuple(k for k, _ in self.manager.live())
        cached, documents = self._cache
        if len(cached) == len(keysets) and all(a is b for a, b in zip(cached, keysets, strict=True)) and documents:
            return documents
        with self._lock:
            documents = {
                "discovery": _encode(discovery_document(self.issuer, list(keysets))),
                "jwks": _encode(jwks_document(list(keysets))),
                "health": _encode({"status": "ok"}),
            }
            self._cache = (keysets, documents)
        return documents

    def handle(self, request: Request) -> Response:
        name = self._routes.get(request.path.split("?", 1)[0])
        if name is None:
            return error(404, "not_found", "this listener serves only OIDC discovery and its JWKS")
        if request.method != "GET":
            response = error(405, "method_not_allowed", "use GET")
            response.headers["Allow"] = "GET"
            return response
        response = Response(200, self._documents()[name], JSON)
        if name != "health":
            response.headers["Cache-Control"] = f"public, max-age={self.cache_seconds}"
        return response


def _encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, indent=2).encode() + b"\n"

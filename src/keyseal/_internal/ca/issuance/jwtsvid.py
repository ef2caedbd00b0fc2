"""JWT-SVID issuance (SPIFFE JWT-SVID standard): a JWS compact token with `kid` naming the keyset's JWT key,
and claims `sub` (the SPIFFE ID), `aud`, `exp` and `iat` (and `iss` when jwtSVID.issuer is set). The expiry
never passes the keyset's own."""

from __future__ import annotations

import base64
import functools
import json
from datetime import datetime, timedelta

from keyseal._internal.ca.custody.keys import jws_algorithm, jws_hash_name, jws_signature
from keyseal._internal.ca.custody.keyset import Keyset
from keyseal._internal.ca.issuance.signing_audit import record_signature
from keyseal._internal.spiffe.ids import SpiffeId
from keyseal.errors import UsageError

__all__ = ["MAX_AUDIENCES", "check_audience", "issue_jwt_svid"]

MAX_AUDIENCES = 16
MAX_AUDIENCE_LENGTH = 512
_COMPACT = json.JSONEncoder(separators=(",", ":"))  # json.dumps would build one per token


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@functools.lru_cache(maxsize=16)
def _encoded_header(alg: str, kid: str) -> str:
    """The JWS protected header, base64url: the same for every token one JWT key signs."""
    return _b64url(_COMPACT.encode({"alg": alg, "kid": kid, "typ": "JWT"}).encode())


def check_audience(value: object) -> list[str]:
    """One audience (a string) or a list of 1..16 distinct, non-empty, printable strings."""
    audience = [value] if isinstance(value, str) else value
    if not isinstance(audience, list) or not audience:
        raise UsageError("audience is missing: give one audience or a list of audiences")
    if len(audience) > MAX_AUDIENCES:
        raise UsageError(f"too many audiences ({len(audience)}): at most {MAX_AUDIENCES}")
    for item in audience:
        if not isinstance(item, str) or not item or len(item) > MAX_AUDIENCE_LENGTH or not item.isprintable():
            raise UsageError(f"each audience must be a non-empty printable string of at most "
                             f"{MAX_AUDIENCE_LENGTH} characters")
    if len(set(audience)) != len(audience):
        raise UsageError("an audience is listed twice")
    return list(audience)


def issue_jwt_svid(keyset: Keyset, spiffe_id: SpiffeId, audience: list[str], now: datetime,
                   ttl: timedelta, issuer: str | None = None) -> tuple[str, datetime]:
    """The token and its expiry (one signature by the JWT key: in KMS custody, one kms:Sign). With `issuer`
    (jwtSVID.issuer) the token carries `iss`, which OIDC relying parties need to find the keys."""
    expires = min(now + ttl, keyset.not_after)
    issued = int(now.timestamp())
    exp = int(expires.timestamp())
    if exp <= issued:
        raise UsageError("the active JWT key expires now: no JWT-SVID can be issued until the next keyset is active")
    key = keyset.jwt_key
    public = key.public_key()
    claims: dict[str, object] = {"sub": spiffe_id.uri, "aud": audience, "exp": exp, "iat": issued}
    if issuer is not None:
        claims = {"iss": issuer, **claims}
    signing_input = (_encoded_header(jws_algorithm(public), keyset.jwt_kid) + "."
                     + _b64url(_COMPACT.encode(claims).encode()))
    signed = signing_input.encode("ascii")
    hash_name = jws_hash_name(public)
    try:
        signature = jws_signature(key, signed)
    except Exception as exc:
        record_signature(key, purpose="jwt-svid", subject=spiffe_id.uri, hash_name=hash_name, signed_bytes=signed,
                         error=exc)
        raise
    record_signature(key, purpose="jwt-svid", subject=spiffe_id.uri, hash_name=hash_name, signed_bytes=signed)
    return f"{signing_input}.{_b64url(signature)}", datetime.fromtimestamp(exp, expires.tzinfo)

"""The trust bundle in the SPIFFE bundle format: a JWKS whose keys carry `use` x509-svid (with the CA
certificate in `x5c`) or jwt-svid (with `kid`), plus `spiffe_sequence` and `spiffe_refresh_hint`.

Every live keyset is published, prepared ones included (before they sign anything) and old ones until they
expire. The sequence is the sum of the oldest and newest published keyset numbers: keysets are numbered in
creation order and leave the bundle oldest first, so the sum grows whenever the bundle changes, and every
replica computes the same value without coordinating.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from keyseal._internal.ca.custody.keyset import Keyset, jwk_of

__all__ = ["bundle_document", "bundle_json", "sequence_of"]


def sequence_of(keysets: Sequence[Keyset]) -> int:
    numbers = [k.number for k in keysets]
    return min(numbers) + max(numbers) if numbers else 0


def bundle_document(keysets: Sequence[Keyset], refresh_hint: timedelta) -> dict[str, Any]:
    keys: list[dict[str, Any]] = []
    for keyset in sorted(keysets, key=lambda k: k.number):
        keys.append({"use": "x509-svid", **jwk_of(keyset.x509_key.public_key()),
                     "x5c": [base64.b64encode(keyset.ca_der).decode("ascii")]})
        keys.append({"use": "jwt-svid", "kid": keyset.jwt_kid, **jwk_of(keyset.jwt_key.public_key())})
    return {
        "keys": keys,
        "spiffe_sequence": sequence_of(keysets),
        "spiffe_refresh_hint": int(refresh_hint.total_seconds()),
    }


def bundle_json(keysets: Sequence[Keyset], refresh_hint: timedelta) -> bytes:
    return json.dumps(bundle_document(keysets, refresh_hint), indent=2, sort_keys=True).encode() + b"\n"

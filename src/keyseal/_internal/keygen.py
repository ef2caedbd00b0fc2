"""Key types keyseal can create locally, by the names the CLI accepts."""

from __future__ import annotations

from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from keyseal.errors import UsageError
from keyseal.signer import PrivateKey

__all__ = ["KEY_TYPES", "generate_private_key"]

_GENERATORS: dict[str, Callable[[], PrivateKey]] = {
    "rsa2048": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "rsa3072": lambda: rsa.generate_private_key(public_exponent=65537, key_size=3072),
    "rsa4096": lambda: rsa.generate_private_key(public_exponent=65537, key_size=4096),
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "p521": lambda: ec.generate_private_key(ec.SECP521R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
}

KEY_TYPES: tuple[str, ...] = tuple(_GENERATORS)


def generate_private_key(key_type: str) -> PrivateKey:
    """A fresh private key of a named type, generated in process memory."""
    try:
        generator = _GENERATORS[key_type]
    except KeyError as exc:
        raise UsageError(f"unknown key type {key_type!r}: use one of {', '.join(KEY_TYPES)}") from exc
    return generator()

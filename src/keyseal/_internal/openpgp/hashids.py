"""OpenPGP hash algorithm IDs: which keyseal accepts (by hashlib name) and which it rejects as too weak.

Kept free of heavy imports so the verifier can start hashing a release before the rest of it has loaded.
"""

from __future__ import annotations

__all__ = ["ACCEPTED", "REJECTED"]

ACCEPTED: dict[int, str] = {8: "sha256", 9: "sha384", 10: "sha512", 11: "sha224"}
REJECTED: dict[int, str] = {1: "MD5", 2: "SHA-1", 3: "RIPEMD-160"}

"""The Signer contract, where backends have always imported it from; it lives in `keyseal.signer`."""

from keyseal.signer import HASH_NAMES, HashName, PrivateKey, PublicKey, Signer, default_hash, hash_algorithm

__all__ = ["HASH_NAMES", "HashName", "PrivateKey", "PublicKey", "Signer", "default_hash", "hash_algorithm"]

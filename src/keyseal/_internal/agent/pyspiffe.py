"""The parts of the PyPI `spiffe` library the agent uses (JWT-SVID validation), imported quietly.

Importing `spiffe` names `cryptography`'s DSA types, which current `cryptography` releases deprecate with a
warning at import. That warning is about the dependency, not about anything keyseal or its user did, so it is
silenced here, for that import only, by category and by the module that triggers it; every other warning is left
as it is.
"""

from __future__ import annotations

import warnings
from typing import Any

from cryptography.utils import CryptographyDeprecationWarning

__all__ = ["jwt_validation"]


def jwt_validation() -> tuple[Any, Any, Any]:
    """`spiffe`'s JwtBundle, JwtSvid and TrustDomain (public API of the library)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning, module=r"spiffe(\.|$)")
        from spiffe import JwtBundle, JwtSvid, TrustDomain
    return JwtBundle, JwtSvid, TrustDomain

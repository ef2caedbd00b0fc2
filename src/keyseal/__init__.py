"""keyseal: signing keys that cannot be stolen.

The Python API (keyseal.api, re-exported here): sign and verify files, mint certificates, wrap keys. Public are
`keyseal`, `keyseal.errors` and `keyseal.signer`; `keyseal._internal` may change in any release.

Importing the package pulls in no cloud or HSM SDK, and not even the API: each name loads on first use (PEP 562),
so `keyseal verify` and other short commands start as fast as before. Each backend imports its own SDK when it is
opened.
"""

from keyseal._version import __version__

# typing.TYPE_CHECKING without importing typing (type checkers read this name as true): `import keyseal` loads
# nothing beyond this file.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from keyseal._internal.openpgp.trust import (
        Combined,
        CrossCheck,
        ReleaseVerification,
        Resolver,
        TrustSet,
        WkdResolver,
    )
    from keyseal.api import (
        CertificateSource,
        DataSignature,
        Format,
        GoodSignature,
        MintedCertificate,
        Verification,
        mint_certificate,
        open_signer,
        open_wrapped_key,
        sign_data,
        sign_file,
        sign_files,
        verify_file,
        verify_release,
        wrap_key,
    )

__all__ = [
    "CertificateSource",
    "Combined",
    "CrossCheck",
    "DataSignature",
    "Format",
    "GoodSignature",
    "MintedCertificate",
    "ReleaseVerification",
    "Resolver",
    "TrustSet",
    "Verification",
    "WkdResolver",
    "__version__",
    "mint_certificate",
    "open_signer",
    "open_wrapped_key",
    "sign_data",
    "sign_file",
    "sign_files",
    "verify_file",
    "verify_release",
    "wrap_key",
]

# Where each lazily loaded name lives: the trust sources verify_release takes, and everything else from keyseal.api.
_TRUST = ("Combined", "CrossCheck", "ReleaseVerification", "Resolver", "TrustSet", "WkdResolver")


def __getattr__(name: str) -> object:
    if name not in __all__ or name == "__version__":
        raise AttributeError(f"module 'keyseal' has no attribute {name!r}")
    from importlib import import_module

    module = import_module("keyseal._internal.openpgp.trust" if name in _TRUST else "keyseal.api")
    value = getattr(module, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__} - {"TYPE_CHECKING"})

"""keyseal's Python API: sign and verify files, mint certificates and wrap keys, as the `keyseal` commands do.

The CLI, keyseal-gpg and this API share one composition for each job, so a file signed here is the file
`keyseal sign` writes, checked the same way. Use it as `import keyseal` (`keyseal.sign_file(...)`); only `keyseal`,
`keyseal.errors` and `keyseal.signer` are public, and every failure is a `keyseal.errors.KeysealError` whose
message is one line that says what to do (option names in it are the CLI's).

Keys are named by URI (`file:PATH`, `awskms:ARN`, `pkcs11:...`, `hashivault://...`) or passed as a `Signer`
that `open_signer` returned, to open a remote key once for many calls. Nothing here imports a cloud or HSM SDK
until a key needs it.
"""

# The implementation lives in keyseal._internal.api, where the command line (a layer of keyseal's internals)
# calls it too; this module is its public name.
from keyseal._internal.api import (
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
    "DataSignature",
    "Format",
    "GoodSignature",
    "MintedCertificate",
    "Verification",
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

"""KEK providers: what wraps a record's DEK, and how a user names one (`local`, `local:PATH`, `awskms:<ARN>`,
`hashivault://[MOUNT/]KEY` or its alias `vault:[MOUNT/]KEY`, or a scheme another package registers).

keyseal never trusts the KEK a record names: the caller configures a KEK, and a record wrapped by another
provider or another KEK is refused before any unwrap is attempted (so no KMS Decrypt is ever made on a key
that someone who can write the store chose).

The contract lives in `wrapping.provider`; the schemes in `keyseal._internal.registry.KEKS`, imported only when
used, so this module imports no provider and no provider imports it.
"""

from __future__ import annotations

import os

from keyseal._internal.registry import KEKS
from keyseal._internal.wrapping.provider import KEK_ENV, KekOptions, KekProvider, invalid_kek, new_dek, zero

__all__ = ["KEK_ENV", "KekProvider", "configured_kek_spec", "new_dek", "parse_kek", "zero"]


def configured_kek_spec(explicit: str | None = None) -> str:
    """The KEK to use: an explicit option, else `$KEYSEAL_KEK`, else the default local KEK file."""
    return explicit or os.environ.get(KEK_ENV) or "local"


def parse_kek(spec: str, *, kms_endpoint: str | None = None, region: str | None = None) -> KekProvider:
    """`local` (the KEK file `$KEYSEAL_HOME/kek`), `local:PATH`, `awskms:<key ARN>`, `hashivault://[MOUNT/]KEY`
    or `vault:[MOUNT/]KEY` (a Vault / OpenBao Transit key; address and token from the environment, see
    providers.vault.client), or `SCHEME:...` of a KEK another package registers (entry points `keyseal.keks`)."""
    scheme, _, rest = spec.partition(":")
    if not scheme or scheme not in KEKS:
        raise invalid_kek(spec)
    provider: KekProvider = KEKS.load(scheme)(spec, rest, KekOptions(kms_endpoint, region))
    return provider

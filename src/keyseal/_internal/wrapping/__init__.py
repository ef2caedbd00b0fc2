"""Envelope encryption of signing keys: each record's key is encrypted under a fresh AES-256-GCM DEK, and the
DEK is wrapped by a KEK provider (`awskms`: a symmetric KMS key that never leaves AWS; `vault`: a Transit key;
`local`: a KEK file).

Modules: `envelope` (seal/open), `provider` (the KEK contract), `kek` (`--kek` parsing through the KEK
registry), `local`, `awskms`, `vault`, `store_ledger` (the seen-versions ledger kept in a store), `keys` (the use
cases the CLI, the facade and the `file:` backend call). The record format and the ledger are in `records`.
Importing this package imports no SDK: boto3 or hvac load only when such a KEK is used.
"""

"""Envelope encryption of signing keys: each record's key is encrypted under a fresh AES-256-GCM DEK, and the
DEK is wrapped by a KEK provider (`awskms`: a symmetric KMS key that never leaves AWS; `local`: a KEK file).

Modules: `record` (format v1), `envelope` (seal/open), `kek` (provider contract and `--kek` parsing), `local`,
`awskms`, `ledger` (rollback protection), `keys` (the use cases the CLI and the `file:` backend call).
`import keyseal._internal.wrapping` imports no SDK: boto3 loads only when an `awskms` KEK is used.
"""

"""One package per outside system keyseal talks to; every layer that talks to one goes through its package.

- `aws`: the boto3 KMS client and its error translation (`client`), the KMS key lifecycle and orphan tags
  (`kms`), the least-privilege IAM policies (`iam`);
- `vault`: Vault / OpenBao settings, client and token renewal (`client`), errors, Transit key references
  (`uri`), policies (`policy`);
- `pkcs11`: PKCS#11 URIs (RFC 7512, `uri`) and the module, token, PIN and shared sessions (`session`);
- `kubernetes`: the API client (`client`), ApiException to keyseal errors (`errors`), the list+watch informer
  (`watch`).

Every SDK is imported inside functions, so importing a provider costs nothing until it is used.
"""

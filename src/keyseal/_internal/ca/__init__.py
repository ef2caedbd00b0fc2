"""The trust-domain server: a SPIFFE certificate authority whose signing keys are wrapped at rest or held in KMS.

Modules, one job each:
- `config`: the YAML configuration (its keys mirror the Helm values); `spiffeid`: SPIFFE ID rules;
- `custody`: CA keys as issuers use them (in memory, or behind a KMS signer);
- `source` (the contract), `wrapped_source` (records in a record store), `kms_source` (KMS keys by alias):
  where keysets are loaded from and created in;
- `keyset`: a keyset and its CA certificate; `schedule`: prepared -> active -> old from timestamps alone;
  `manager`: load, create and rotate keysets;
- `x509svid`, `jwtsvid`, `bundle`: what is issued and published;
- `auth`, `metrics`, `api` (HTTP routes), `httpd` (the TLS listener), `tls` (serving certificates),
  `server` (wiring).

`import keyseal._internal.ca` (and every module here) imports no SDK: boto3 and kubernetes load only when the configured
custody or store needs them.
"""

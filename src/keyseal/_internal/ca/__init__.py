"""The trust-domain server: a SPIFFE certificate authority whose signing keys are wrapped at rest or held in a
key manager (AWS KMS, a PKCS#11 token).

- `custody/`: where the CA keys live and how they rotate: the source contract (`source`) and its custodies
  (`wrapped`, `kms`, `pkcs11`), keysets (`keyset`), the schedule and the manager, pins and alarms;
- `issuance/`: what the CA signs: X.509-SVIDs (`x509svid`, `der`), JWT-SVIDs (`jwtsvid`), the audit of its own
  signatures (`signing_audit`);
- `registry/`: registration entries and node agents: the stores (`entries`, `sqlite`, `kubernetes`, `stores`),
  the index by agent, node attestation with service account tokens (`psat`), identity templates (`templates`);
- `http/`: the HTTPS API: the TLS listener, HTTP/1.1 framing, routes (`api`, `agents`), auth, metrics, the
  serving certificate;
- `bundle`, `bundle_sequence`, `bundle_configmap`, `federation`, `oidc`: what the server publishes;
- `config` (+ `sections`, `k8s_config`): the YAML configuration; `server`: the wiring.

Importing this package (or any module here) imports no SDK: boto3 and kubernetes load only when the configured
custody or store needs them.
"""

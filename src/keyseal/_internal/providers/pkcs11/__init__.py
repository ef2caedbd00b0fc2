"""PKCS#11: URIs (RFC 7512) and the sessions shared by every signer and CA custody on one token."""

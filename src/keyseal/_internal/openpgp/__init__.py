"""OpenPGP v4 writer and verifier (RFC 9580, with RFC 4880 for v4 details).

keyseal writes the packets itself because its private keys are opaque: every signature comes from a Signer
backend (KMS, HSM, wrapped key), and no OpenPGP library signs through such a callback.
"""

"""What the trust-domain server and the node agent both need, so neither imports the other: SPIFFE IDs (`ids`),
registration entries as both see them (`entry`), TLS chain loading and the server check (`tls`), and a node's
first trust bundle pinned by the CA fingerprint (`bootstrap`).
"""

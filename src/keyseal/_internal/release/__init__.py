"""Release engineering on top of OpenPGP signing: keyseal-gpg's signing and git's gpg.program (`gpgsign`,
`gitsign`), key rotation with dual signing (`rotation`), and trust for keyless CI signatures (`ci_trust`).
"""

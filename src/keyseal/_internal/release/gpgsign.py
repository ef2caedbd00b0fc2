"""Signing for `keyseal-gpg` as release tools call gpg: detached, cleartext or one-pass signed, one signature call.

The key is named as gpg names it (`-u`): a key URI, or a fingerprint, key ID or user ID that the keyseal keyring
maps to a URI (see keyseal._internal.release.gitsign.resolve_signing_key). The hash follows `--digest-algo`, then gpg's
`--personal-digest-preferences`, then the certificate's preferences and the key's natural hash
(keyseal._internal.openpgp.sign.choose_hash). Backends are imported only when the key URI needs them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from keyseal._internal import audit
from keyseal._internal.backends import BackendOptions, open_signer
from keyseal._internal.openpgp.armor import KIND_SIGNATURE, armor
from keyseal._internal.openpgp.cleartext import render_cleartext, signed_text, text_mode_canonical
from keyseal._internal.openpgp.keyring import certificate_for_key, keyring_certificates, load_entries
from keyseal._internal.openpgp.keys import algorithm_of
from keyseal._internal.openpgp.sign import (
    KIND_MESSAGE,
    SigningIdentity,
    choose_hash,
    hash_fits_key,
    identity_from_certificate,
    identity_from_signer,
    signature_packet,
    signed_message,
    text_signature_packet,
)
from keyseal._internal.openpgp.signature import HASH_IDS, SIG_BINARY, SIG_TEXT, new_hasher
from keyseal._internal.openpgp.stream import hash_file
from keyseal._internal.release.gitsign import resolve_signing_key
from keyseal.errors import UsageError
from keyseal.signer import HashName, PublicKey, Signer

Kind = Literal["detach", "clear", "normal"]


@dataclass(frozen=True)
class SignRequest:
    """What to sign and how, as gpg's options said it."""

    key: str | None  # -u; None: the one key registered with keyseal
    kind: Kind
    armored: bool
    text_mode: bool = False
    digest: HashName | None = None
    digest_preferences: tuple[HashName, ...] = ()
    filename: str = ""  # the literal data packet's file name (one-pass signed messages)
    subject: str = "stdin"  # what the audit log names


@dataclass(frozen=True)
class GpgSignature:
    """The signed output and what gpg's SIG_CREATED status line reports."""

    data: bytes
    fingerprint: str
    algorithm: int
    hash_id: int
    sig_class: int
    created: int


def default_key() -> str:
    """gpg signs with its default key when no -u is given: here, the one OpenPGP key registered with keyseal."""
    registered = [entry for entry in load_entries() if entry.openpgp]
    if len(registered) != 1:
        raise UsageError("name the signing key with -u KEY (a fingerprint, key ID, user ID or key URI): "
                         f"{len(registered)} OpenPGP keys are registered with keyseal git-setup")
    assert registered[0].openpgp is not None
    return registered[0].openpgp


def sign(request: SignRequest, data: bytes | Path, options: BackendOptions | None = None) -> GpgSignature:
    """Sign `data` (bytes, or a file hashed as it is read for a binary detached signature)."""
    certificates = keyring_certificates()
    uri, cert = resolve_signing_key(request.key or default_key(), certificates)
    with open_signer(uri, options) as signer:
        if cert is None:
            cert = certificate_for_key(signer.public_key(), certificates)
        identity = identity_from_certificate(signer, [cert]) if cert is not None else identity_from_signer(signer)
        hash_name = _hash_for(request, signer.supported_hashes(), identity.public_key)
        hash_name = choose_hash(signer, identity.public_key, hash_name, cert.hash_preferences if cert else ())
        created = int(time.time())
        text = request.text_mode or request.kind == "clear"
        with audit.subject(request.subject):
            if isinstance(data, Path) and not text and request.kind == "detach":
                hasher = hash_file(data, [HASH_IDS[hash_name]])[HASH_IDS[hash_name]]
                output = _render(signature_packet(signer, identity, hasher, hash_name, created), request.armored)
            else:
                content = data.read_bytes() if isinstance(data, Path) else data
                output = _sign_bytes(request, signer, identity, hash_name, content, created)
    return GpgSignature(output, identity.fingerprint_hex, algorithm_of(identity.public_key), HASH_IDS[hash_name],
                        SIG_TEXT if text else SIG_BINARY, created)


def _hash_for(request: SignRequest, supported: tuple[HashName, ...], public_key: PublicKey) -> HashName | None:
    """`--digest-algo`, else the first of `--personal-digest-preferences` the custody signs and the key fits."""
    if request.digest is not None:
        return request.digest
    for name in request.digest_preferences:
        if name in supported and hash_fits_key(public_key, name):
            return name
    return None


def _sign_bytes(request: SignRequest, signer: Signer, identity: SigningIdentity, hash_name: HashName,
                content: bytes, created: int) -> bytes:
    if request.kind == "clear":
        packet = text_signature_packet(signer, identity, hash_name, signed_text(content), created)
        return render_cleartext(content, hash_name, armor(packet, KIND_SIGNATURE))
    if request.kind == "normal":
        message = signed_message(signer, identity, hash_name, content, request.text_mode, request.filename, created)
        return armor(message, KIND_MESSAGE) if request.armored else message
    if request.text_mode:
        packet = text_signature_packet(signer, identity, hash_name, text_mode_canonical(content), created)
    else:
        hasher = new_hasher(HASH_IDS[hash_name])
        hasher.update(content)
        packet = signature_packet(signer, identity, hasher, hash_name, created)
    return _render(packet, request.armored)


def _render(packet: bytes, armored: bool) -> bytes:
    return armor(packet, KIND_SIGNATURE) if armored else packet


__all__ = ["GpgSignature", "SignRequest", "default_key", "sign"]

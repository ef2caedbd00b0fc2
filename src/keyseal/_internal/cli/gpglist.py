"""`keyseal-gpg --list-keys / --list-secret-keys`: keyseal's keyring in gpg's listing formats.

Tools look the signing key up before they sign (`gpg --list-secret-keys --with-colons KEY`), so the keys keyseal
can sign with (a key URI registered in keys.toml for a certificate in the keyring) are listed as secret keys
(`sec`, with `+` in field 15: usable, held elsewhere); every certificate in the keyring is a public key (`pub`).
The colon format is gpg's (doc/DETAILS in GnuPG): fields a tool reads are filled, the others left empty.
"""

from __future__ import annotations

import hashlib
import time

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keyseal._internal.openpgp.cert import Certificate
from keyseal._internal.openpgp.keyring import (
    find_certificates,
    fingerprints_of,
    is_key_uri,
    keyring_certificates,
    load_entries,
    uri_for_openpgp,
)
from keyseal._internal.openpgp.keys import KeyPacket
from keyseal.errors import UsageError

_CURVES = {"secp256r1": "nistp256", "secp384r1": "nistp384", "secp521r1": "nistp521"}


def list_keys(patterns: list[str], secret: bool, colons: bool) -> str:
    """The listing gpg would print; a pattern that names no key is an error, as in gpg."""
    certificates = keyring_certificates()
    if secret:
        certificates = [cert for cert in certificates if uri_for_openpgp(fingerprints_of(cert)) is not None]
    if patterns:
        chosen: list[Certificate] = []
        for pattern in patterns:
            found = _by_uri(pattern, certificates) if is_key_uri(pattern) else find_certificates(pattern, certificates)
            if not found:
                kind = "secret key" if secret else "public key"
                raise UsageError(f"no {kind} in the keyseal keyring matches {pattern[:80]!r}")
            chosen += [cert for cert in found if cert not in chosen]
        certificates = chosen
    lines: list[str] = []
    if colons and certificates:
        lines.append(f"tru::1:{int(time.time())}:0:3:1:5")
    for cert in certificates:
        lines += _colon_lines(cert, secret) if colons else _human_lines(cert, secret)
    return "".join(line + "\n" for line in lines)


def _by_uri(uri: str, certificates: list[Certificate]) -> list[Certificate]:
    registered = {entry.openpgp for entry in load_entries() if entry.uri == uri and entry.openpgp}
    return [cert for cert in certificates if registered & set(fingerprints_of(cert))]


def _validity(cert: Certificate, secret: bool) -> str:
    if cert.revoked:
        return "r"
    if cert.expires is not None and cert.expires <= time.time():
        return "e"
    return "u" if secret or uri_for_openpgp(fingerprints_of(cert)) is not None else "f"


def _size_algo_curve(key: KeyPacket) -> tuple[int, str]:
    public = key.public_key
    if isinstance(public, rsa.RSAPublicKey):
        return public.key_size, ""
    if isinstance(public, ec.EllipticCurvePublicKey):
        return public.curve.key_size, _CURVES.get(public.curve.name, public.curve.name)
    return 255, "ed25519"


def _key_line(kind: str, key: KeyPacket, validity: str, expires: int | None, caps: str, secret: bool) -> str:
    size, curve = _size_algo_curve(key)
    fields = [kind, validity, str(size), str(key.algorithm), key.key_id.hex().upper(), str(key.created),
              str(expires or ""), "", "u" if kind in ("pub", "sec") else "", "", "", caps, "", "",
              "+" if secret else "", "", curve, "", "", ""]
    return ":".join(fields) + ":"


def _colon_lines(cert: Certificate, secret: bool) -> list[str]:
    validity = _validity(cert, secret)
    signing = {entry.key.fingerprint for entry in cert.signing_keys}
    primary_caps = ("s" if cert.primary.fingerprint in signing else "") + "c"
    total = ("S" if signing else "") + "C"
    lines = [_key_line("sec" if secret else "pub", cert.primary, validity, cert.expires, primary_caps + total,
                       secret),
             f"fpr:::::::::{cert.fingerprint}:"]
    for uid in cert.user_ids:
        uid_hash = hashlib.sha1(uid.encode("utf-8"), usedforsecurity=False).hexdigest().upper()
        escaped = "".join(f"\\x{ord(ch):02x}" if ch == ":" or ord(ch) < 0x20 else ch for ch in uid)
        lines.append(f"uid:{validity}::::{cert.primary.created}::{uid_hash}::{escaped}::::::::::0:")
    for entry in cert.signing_keys:
        if entry.key.fingerprint == cert.primary.fingerprint:
            continue
        lines.append(_key_line("ssb" if secret else "sub", entry.key, validity, entry.expires, "s", secret))
        lines.append(f"fpr:::::::::{entry.key.fingerprint_hex}:")
    return lines


def _human_lines(cert: Certificate, secret: bool) -> list[str]:
    label = {"u": "ultimate", "f": "full", "r": "revoked", "e": "expired"}[_validity(cert, secret)]
    caps = "[SC]" if cert.primary.fingerprint in {e.key.fingerprint for e in cert.signing_keys} else "[C]"
    lines = [f"{'sec' if secret else 'pub'}   {_algo_name(cert.primary)} {_date(cert.primary.created)} {caps}",
             f"      {cert.fingerprint}"]
    lines += [f"uid           [{label}] {uid}" for uid in cert.user_ids]
    for entry in cert.signing_keys:
        if entry.key.fingerprint != cert.primary.fingerprint:
            lines.append(f"{'ssb' if secret else 'sub'}   {_algo_name(entry.key)} {_date(entry.key.created)} [S]")
    lines.append("")
    return lines


def _algo_name(key: KeyPacket) -> str:
    size, curve = _size_algo_curve(key)
    return curve or f"rsa{size}"


def _date(seconds: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(seconds))


__all__ = ["list_keys"]

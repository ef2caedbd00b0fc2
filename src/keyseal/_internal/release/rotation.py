"""`keys rotate`: the next version of a signing key in the same custody, minted with the same user ID.

KMS keys are named by alias (alias/NAME-v2, -v3 ...), PKCS#11 keys by object label (NAME-v2, -v3 ... on the
same token). The current key is never changed: release signers dual-sign with both until clients trust the new
one. A new key whose certificate could not be minted is reported, never deleted: a KMS key is also tagged
`keyseal:orphaned=rotation-failed` (with the time and the alias it was made for), so that its owner can find
it by tag and mint it or schedule its deletion, instead of it lingering unnoticed.

IAM for `--kms`: kms:GetPublicKey, kms:DescribeKey, kms:CreateKey, kms:CreateAlias, kms:Sign, and
kms:TagResource for the orphan tag (without it, the failure message says the key is untagged).
"""

from __future__ import annotations

import re
import time
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime

from keyseal._internal.backends import BackendOptions, open_signer
from keyseal._internal.openpgp.cert import Certificate, creation_time, load_certificates, mint_certificate
from keyseal._internal.openpgp.keys import same_public_key
from keyseal.errors import KeysealError, KeyURIError, OutputExistsError, UsageError
from keyseal.signer import PublicKey, Signer

__all__ = ["Rotated", "RotationRequest", "next_label", "rotate_kms", "rotate_pkcs11"]

ORPHAN_VALUE = "rotation-failed"
_VERSION_SUFFIX = re.compile(r"-v\d+$")
_MAX_VERSIONS = 1000
# RFC 7512 pk11-pchar without '%' (the escape) and ';' / '=' kept escaped for readers that split naively.
_LABEL_SAFE = "-._~:[]@!$'()*+,"


@dataclass(frozen=True)
class RotationRequest:
    """What the new certificate says; checked before any key is created."""

    name: str
    email: str
    current_cert: Certificate | None
    key_type: str | None
    created: int | None
    expires_seconds: int | None


@dataclass(frozen=True)
class Rotated:
    certificate: bytes  # binary OpenPGP certificate
    fingerprint: str
    report: tuple[str, ...]  # the lines `keys rotate` prints: new name, URI, fingerprint ...


def next_label(current: str, version: int) -> str:
    """`release` or `release-v2` -> `release-v{version}`: an existing -vN suffix is replaced, not stacked."""
    return f"{_VERSION_SUFFIX.sub('', current)}-v{version}"


def key_type_of(public_key: PublicKey, ed25519_ok: bool) -> str:
    """The keyseal key type name of a public key (`rsa4096`, `p256`, `ed25519` ...)."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(public_key, rsa.RSAPublicKey):
        return f"rsa{public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        curves = {"secp256r1": "p256", "secp384r1": "p384", "secp521r1": "p521"}
        if public_key.curve.name in curves:
            return curves[public_key.curve.name]
    if ed25519_ok and isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    raise UsageError("the current key is not of a type this custody can create: give --type")


def _check_current(signer: Signer, request: RotationRequest, name: str, ed25519_ok: bool) -> str:
    """The current key matches --cert (if given); the new key's type (--type, else the current key's)."""
    public_key = signer.public_key()
    cert = request.current_cert
    if cert is not None and not same_public_key(public_key, cert.primary.public_key):
        raise UsageError(f"the certificate {cert.fingerprint} (--cert) is not the certificate of the current key "
                         f"({name}): give the current key's certificate")
    return request.key_type or key_type_of(public_key, ed25519_ok)


def _mint(signer: Signer, request: RotationRequest, created: int) -> tuple[bytes, str]:
    binary = mint_certificate(signer, name=request.name, email=request.email, created=created,
                              expires_seconds=request.expires_seconds)
    return binary, load_certificates(binary)[0].fingerprint


def _rfc3339(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- AWS KMS --------------------------------------------------------------------------------------------


def rotate_kms(alias: str, request: RotationRequest, endpoint: str | None) -> Rotated:
    """Create alias/NAME-vN (the next free N) with the current key's type, and mint its certificate."""
    from keyseal._internal.providers.aws.kms import KEY_SPECS, alias_exists, create_signing_key, validate_alias

    validate_alias(alias)
    if request.key_type is not None and request.key_type not in KEY_SPECS:
        raise UsageError(f"AWS KMS cannot make {request.key_type} keys: use one of {', '.join(KEY_SPECS)}")
    options = BackendOptions(kms_endpoint=endpoint)
    with open_signer(f"awskms:{alias}", options) as current:
        key_type = _check_current(current, request, alias, ed25519_ok=False)
    for version in range(2, _MAX_VERSIONS):
        new_alias = next_label(alias, version)
        if not alias_exists(new_alias, endpoint):
            break
    else:
        raise UsageError(f"{next_label(alias, _MAX_VERSIONS)} and every version before it exist: rotate from "
                         "a new base alias")
    arn = create_signing_key(new_alias, key_type, endpoint)
    try:
        with open_signer(f"awskms:{arn}", options) as signer:
            binary, fingerprint = _mint(signer, request, creation_time(signer, request.created))
    except Exception as exc:
        tagged = tag_orphaned(arn, new_alias, endpoint)
        if not isinstance(exc, KeysealError):
            raise
        raise type(exc)(f"created {new_alias} ({arn}) but could not mint its certificate: {exc.message}; "
                        f"{tagged}") from exc
    return Rotated(binary, fingerprint, (new_alias, arn, f"awskms:{arn}", fingerprint))


def tag_orphaned(arn: str, alias: str, endpoint: str | None) -> str:
    """Tag a key a failed rotation left behind; returns what to tell the user (tagged or not, what next)."""
    from keyseal._internal.providers.aws.client import kms_client
    from keyseal._internal.providers.aws.kms import ORPHAN_TAG, orphan_tags, tag_key

    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    next_steps = (f"mint it with keyseal keys mint --key awskms:{alias} ..., or schedule its deletion with "
                  f"aws kms schedule-key-deletion --key-id {arn}")
    try:
        client = kms_client(endpoint)
        try:
            tag_key(client, arn, orphan_tags(ORPHAN_VALUE, now, alias=alias))
        finally:
            client.close()
    except KeysealError as exc:
        return f"tagging it {ORPHAN_TAG}={ORPHAN_VALUE} also failed ({exc.message}): {next_steps}"
    return f"it is tagged {ORPHAN_TAG}={ORPHAN_VALUE} (at {now}): {next_steps}"


# -- PKCS#11 --------------------------------------------------------------------------------------------


def _with_object(uri: str, label: str) -> str:
    """The URI with object=LABEL in place of the current object (and no id=: the new pair gets its own)."""
    base, sep, query = uri.partition("?")
    scheme, _, path = base.partition(":")
    items = [item for item in path.split(";")
             if item and item.partition("=")[0].lower() not in ("object", "id")]
    items.append(f"object={urllib.parse.quote(label, safe=_LABEL_SAFE)}")
    return f"{scheme}:{';'.join(items)}{sep}{query}"


def rotate_pkcs11(uri: str, request: RotationRequest) -> Rotated:
    """Create LABEL-vN (the next free N) on the same token with the current key's type, non-extractable as
    `keys create --pkcs11` makes keys, and mint its certificate.

    PKCS#11 records no creation time, but this command makes the key, so it knows it: the certificate's
    creation time is --created if given, else the moment the key was generated (printed, because minting the
    same certificate again later needs it as --created).
    """
    from keyseal._internal.backends.pkcs11 import KEY_TYPES, create_key
    from keyseal._internal.providers.pkcs11 import uri as pkcs11uri

    parsed = pkcs11uri.parse(uri)
    if parsed.object is None:
        raise KeyURIError(f"keys rotate --pkcs11 needs the current key's label in the URI: add object=LABEL to "
                          f"{parsed.redacted()!r}")
    if request.key_type is not None and request.key_type not in KEY_TYPES:
        raise UsageError(f"a PKCS#11 token cannot make {request.key_type} keys: use one of {', '.join(KEY_TYPES)}")
    with open_signer(uri, BackendOptions()) as current:  # held open: one login for the whole rotation
        key_type = _check_current(current, request, f"PKCS#11 object {parsed.object!r}", ed25519_ok=True)
        new_uri = ""
        created = request.created
        for version in range(2, _MAX_VERSIONS):
            new_uri = _with_object(uri, next_label(parsed.object, version))
            generated_at = int(time.time())
            try:
                create_key(new_uri, key_type)  # refuses a label the token already holds
            except OutputExistsError:
                continue
            created = created if created is not None else generated_at
            break
        else:
            raise UsageError(f"{next_label(parsed.object, _MAX_VERSIONS)} and every version before it exist on "
                             "the token: rotate from a new base label")
        assert created is not None
        new_shown = pkcs11uri.without_pin_value(new_uri)
        try:
            with open_signer(new_uri, BackendOptions()) as signer:
                binary, fingerprint = _mint(signer, request, created)
        except KeysealError as exc:
            raise type(exc)(f"created {pkcs11uri.redact(new_uri)} but could not mint its certificate: "
                            f"{exc.message}; run keyseal keys mint --key '{new_shown}' --created "
                            f"{_rfc3339(created)} ...") from exc
    new_label = pkcs11uri.parse(new_uri).object or ""
    return Rotated(binary, fingerprint, (new_label, new_shown, fingerprint, f"created {_rfc3339(created)}"))

"""Cleartext signed messages in process: properties over random texts, and the parser under mutation.

Properties: whatever the text (dashes, spaces, tabs, CR, LF, non-ASCII), the message keyseal writes parses back to
the text the signature covers and verifies; one changed byte of the signed text never verifies; whatever bytes a
message is mutated into, only keyseal's typed errors come out. The independent verifiers (gpg, gpgv, sqv, sq) are in
tests/test_gpg_dropin.py.
"""

from __future__ import annotations

import pytest
from fuzz.corpus import CREATED, MemorySigner, fixed_keys
from fuzz.properties import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from keyseal._internal.openpgp.cert import Certificate, load_certificates, mint_certificate
from keyseal._internal.openpgp.cleartext import parse_cleartext, signed_text
from keyseal._internal.openpgp.sign import SigningIdentity, choose_hash, cleartext_document, identity_from_certificate
from keyseal._internal.openpgp.verify import verify_cleartext
from keyseal.errors import KeysealError, VerificationError

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

FUZZ = fuzz_settings()
NOW = CREATED + 10_000
TEXTS = st.lists(st.sampled_from([b"-", b" ", b"\t", b"\r", b"\n", b"a", b"From ", "\u00e9".encode(), b"- ",
                                  b"-----BEGIN PGP SIGNATURE-----"]), max_size=40).map(b"".join)


@pytest.fixture(scope="module")
def key() -> tuple[MemorySigner, SigningIdentity, list[Certificate]]:
    signer = MemorySigner(fixed_keys()["ed25519"], "ed25519")
    certificates = load_certificates(mint_certificate(signer, name="Clear", email="clear@example.org",
                                                      created=CREATED))
    return signer, identity_from_certificate(signer, certificates), certificates


@FUZZ
@given(text=TEXTS)
def test_written_messages_parse_back_and_verify(key: tuple[MemorySigner, SigningIdentity, list[Certificate]],
                                                text: bytes) -> None:
    signer, identity, certificates = key
    document = cleartext_document(signer, identity, "sha256", text, created=CREATED + 1)
    message = parse_cleartext(document)
    assert message.hash_input == signed_text(text)
    assert message.header_hashes == frozenset({"sha256"})
    result, _ = verify_cleartext(certificates, document, now=NOW)
    assert result.certificate.fingerprint == certificates[0].fingerprint


@FUZZ
@given(text=TEXTS.filter(lambda t: any(c not in b" \t\r\n" for c in t)), position=st.integers(min_value=0))
def test_a_changed_signed_byte_never_verifies(key: tuple[MemorySigner, SigningIdentity, list[Certificate]],
                                              text: bytes, position: int) -> None:
    signer, identity, certificates = key
    document = cleartext_document(signer, identity, "sha256", text, created=CREATED + 1)
    body = document.index(b"\n\n") + 2
    end = document.rindex(b"\n-----BEGIN PGP SIGNATURE-----")
    signed = [i for i in range(body, end) if document[i] not in b" \t\r\n"]
    index = signed[position % len(signed)]
    changed = document[:index] + bytes([document[index] ^ 0x02]) + document[index + 1 :]
    with pytest.raises(KeysealError) as raised:
        verify_cleartext(certificates, changed, now=NOW)
    assert isinstance(raised.value, VerificationError) or "cleartext" in raised.value.message


@FUZZ
@given(prefix=st.integers(min_value=0, max_value=2000), junk=st.binary(max_size=64))
def test_mutated_messages_raise_only_keyseal_errors(key: tuple[MemorySigner, SigningIdentity, list[Certificate]],
                                                    prefix: int, junk: bytes) -> None:
    signer, identity, certificates = key
    document = cleartext_document(signer, identity, "sha256", b"-a\n b \t\nc", created=CREATED + 1)
    cut = prefix % (len(document) + 1)
    for mutated in (document[:cut] + junk + document[cut:], document[:cut] + junk, document[:cut]):
        try:
            verify_cleartext(certificates, mutated, now=NOW)
        except KeysealError as exc:
            assert "\n" not in exc.message


@pytest.mark.parametrize(("label", "preferences", "expected"), [
    ("ed25519", (), "sha256"), ("ed25519", (10, 9, 8), "sha256"), ("ed25519", (10,), "sha512"),
    ("ed25519", (2, 9), "sha384"), ("p256", (), "sha256"), ("p384", (), "sha384"), ("p384", (8,), "sha384"),
    ("rsa2048", (10, 8), "sha256"), ("rsa2048", (10,), "sha512"),
])
def test_digest_follows_the_key_and_the_certificate_preferences(label: str, preferences: tuple[int, ...],
                                                                expected: str) -> None:
    """The key's natural hash (SHA-256 for Ed25519 and P-256) when the certificate allows it, else its first
    preference the key fits; a preference too short for the key (SHA-256 for P-384) is passed over."""
    signer = MemorySigner(fixed_keys()[label], label)
    assert choose_hash(signer, signer.public_key(), None, preferences) == expected
    assert choose_hash(signer, signer.public_key(), "sha512", preferences) == "sha512"  # --digest-algo wins

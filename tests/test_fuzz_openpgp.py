"""Fuzz properties for every OpenPGP parser that reads outside input: ASCII armor, packet framing, subpackets,
key and signature packets, certificates (as files, as a WKD answer, as an embedded trust set) and detached
signatures (parsed and verified).

Property: whatever the bytes, only keyseal's own typed errors (`KeysealError`, one line) come out; never
another exception, and no input runs past the deadline. Inputs are random bytes and structure-aware mutations
of valid inputs made by keyseal and by gpg (fuzz/mutate.py re-frames packets and re-counts subpackets, so the
mutations reach the parsers behind the length checks). Bounded for CI; `python -m fuzz.run` runs the same
targets 1,000,000 times each.
"""

from __future__ import annotations

import random
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fuzz.corpus import CREATED, DATA, NOW, MemorySigner, fixed_keys
from fuzz.properties import fuzz_settings
from fuzz.targets import Target, run_one, shared_corpus, shared_targets
from hypothesis import given
from hypothesis import strategies as st

from keyseal._internal.openpgp.armor import KIND_PUBLIC_KEY, KIND_SIGNATURE, armor, dearmor_all, dearmor_or_binary
from keyseal._internal.openpgp.cert import load_certificates, mint_certificate
from keyseal._internal.openpgp.packets import TAG_PUBLIC_SUBKEY, encode_mpi, encode_packet, iter_packets
from keyseal._internal.openpgp.verify import verify_bytes
from keyseal.errors import KeysealError, OpenPGPError

FUZZ = fuzz_settings()
TARGETS = ["armor", "packets", "subpackets", "key_packet", "signature", "certificate", "detached", "wkd_answer",
           "trust_set"]


def target(name: str) -> Target:
    return shared_targets()[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", TARGETS)
@FUZZ
@given(data=st.binary(max_size=1024))
def test_random_bytes_raise_only_keyseal_errors(name: str, data: bytes) -> None:
    run_one(target(name), data)


@pytest.mark.slow
@pytest.mark.parametrize("name", TARGETS)
@FUZZ
@given(program=st.binary(min_size=1, max_size=96))
def test_mutated_valid_inputs_raise_only_keyseal_errors(name: str, program: bytes) -> None:
    chosen = target(name)
    run_one(chosen, chosen.mutant(program))


@pytest.mark.slow
@FUZZ
@given(body=st.binary(max_size=3000), kind=st.sampled_from([KIND_SIGNATURE, KIND_PUBLIC_KEY]))
def test_armor_round_trips(body: bytes, kind: str) -> None:
    assert dearmor_all(armor(body, kind)) == [(kind, body)]
    assert dearmor_or_binary(armor(body, kind)) == body


@pytest.mark.slow
@FUZZ
@given(tag=st.integers(1, 63), body=st.binary(max_size=9000))
def test_packet_framing_round_trips(tag: int, body: bytes) -> None:
    (packet,) = iter_packets(encode_packet(tag, body))
    assert (packet.tag, packet.body) == (tag, body)


def test_the_corpus_is_valid_and_comes_from_keyseal_and_gpg() -> None:
    """The mutations start from inputs the parsers accept, made by both writers."""
    corpus = shared_corpus()
    assert corpus.sources["keyseal"] >= 20 and corpus.sources["gpg"] >= 8, corpus.sources
    for name in TARGETS:
        chosen = target(name)
        outcomes = [run_one(chosen, seed) for seed in chosen.seeds]
        # The only refused seeds: gpg's SHA-1 signature, gpg's cv25519 subkey (as a lone key packet), and the
        # certificates revoked as compromised (nothing they signed verifies).
        assert outcomes.count("rejected") <= 2, (name, outcomes)
        assert outcomes.count("accepted") >= 3, (name, outcomes)


@pytest.mark.slow
def test_mutations_reach_past_the_framing() -> None:
    """Structure-aware mutations get most inputs past armor and packet framing: at least a third of the mutated
    certificates and signatures are refused (or accepted) only after their packets were parsed."""
    framing = ("armor", "malformed OpenPGP data", "truncated OpenPGP data", "no OpenPGP armor", "base64")
    rng = random.Random(20240)
    for name in ("certificate", "detached", "wkd_answer"):
        chosen = target(name)
        deep = 0
        for _ in range(300):
            try:
                chosen.run(chosen.mutant(rng.randbytes(64)))
                deep += 1
            except KeysealError as exc:
                deep += not any(word in exc.message for word in framing)
        assert deep >= 100, (name, deep)


# -- regressions found by the fuzzer ------------------------------------------------------------------------


def _x25519_subkey_body() -> bytes:
    """A v4 ECDH (algorithm 18) Curve25519 subkey, as gpg's default encryption subkey is written."""
    point = x25519.X25519PrivateKey.from_private_bytes(bytes(range(32))).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)
    oid = bytes.fromhex("2b060104019755010501")
    kdf = bytes([3, 1, 8, 7])  # SHA-256, AES-128
    return struct.pack(">BIB", 4, CREATED, 18) + bytes([len(oid)]) + oid + encode_mpi(
        int.from_bytes(b"\x40" + point, "big")) + kdf


def test_regression_encryption_subkey_does_not_make_the_certificate_unreadable() -> None:
    """Found by the gpg seeds: a certificate with an encryption-only subkey (gpg's default Ed25519 + cv25519)
    was refused whole ("unsupported OpenPGP public-key algorithm 18"), so `keyseal verify` could not use
    most gpg users' keys. Such a subkey cannot sign: it is skipped, the certificate loads and verifies."""
    signer = MemorySigner(fixed_keys()["ed25519"], "ed25519")
    minted = mint_certificate(signer, name="Fuzz", email="fuzz@example.org", created=CREATED)
    with_subkey = minted + encode_packet(TAG_PUBLIC_SUBKEY, _x25519_subkey_body())
    (cert,) = load_certificates(with_subkey)
    assert cert.subkeys == [] and [k.key.fingerprint_hex for k in cert.signing_keys] == [cert.fingerprint]
    good = shared_corpus().good_signature  # by the same fixed Ed25519 key, over DATA
    assert verify_bytes([cert], DATA, good, NOW).fingerprint == cert.fingerprint
    # A malformed subkey of a supported algorithm is still an error, as is a foreign subkey that is truncated.
    broken_rsa = struct.pack(">BIB", 4, CREATED, 1) + b"\x00\x09\x01"
    with pytest.raises(OpenPGPError):
        load_certificates(minted + encode_packet(TAG_PUBLIC_SUBKEY, broken_rsa))
    with pytest.raises(OpenPGPError):
        load_certificates(minted + encode_packet(TAG_PUBLIC_SUBKEY, b"\x04\x00"))


def test_regression_gpg_certificates_with_subkeys_load() -> None:
    """Every gpg-made certificate in the corpus (signing and cv25519 encryption subkeys) loads."""
    corpus = shared_corpus()
    gpg_made = [cert for cert in corpus.certificates if b"example.org" in dearmor_or_binary(cert)
                and any(p.tag == TAG_PUBLIC_SUBKEY for p in iter_packets(dearmor_or_binary(cert)))]
    assert gpg_made
    for cert in gpg_made:
        loaded = load_certificates(cert)
        assert loaded and all(c.signing_keys for c in loaded)

"""Fuzz properties for the other signature formats keyseal verifies: SSH signatures and the trusted-key files
they are checked against (`.pub` and allowed_signers lines), minisign signatures and public key files.

Property: whatever the bytes, only keyseal's own typed errors come out. Inputs are random bytes and mutations
of keyseal-made seeds that decode the base64, change the SSH wire strings (re-counting their lengths) and
encode again, so the mutations reach the parsers behind the armor.
"""

from __future__ import annotations

import base64
import struct

import pytest
from fuzz.formats import shared_format_targets
from fuzz.properties import fuzz_settings
from fuzz.targets import run_one
from hypothesis import given
from hypothesis import strategies as st

from keyseal._internal.formats import ssh
from keyseal.errors import InvalidKeyFileError

FUZZ = fuzz_settings()
TARGETS = ["ssh_signature", "ssh_keys", "minisign_sig", "minisign_keys"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TARGETS)
@FUZZ
@given(data=st.binary(max_size=1024))
def test_random_bytes_raise_only_keyseal_errors(name: str, data: bytes) -> None:
    run_one(shared_format_targets()[name], data)


@pytest.mark.slow
@pytest.mark.parametrize("name", TARGETS)
@FUZZ
@given(program=st.binary(min_size=1, max_size=96))
def test_mutated_valid_inputs_raise_only_keyseal_errors(name: str, program: bytes) -> None:
    target = shared_format_targets()[name]
    run_one(target, target.mutant(program))


def test_seeds_are_accepted() -> None:
    for name in TARGETS:
        target = shared_format_targets()[name]
        assert [run_one(target, seed) for seed in target.seeds] == ["accepted"] * len(target.seeds), name


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


@pytest.mark.parametrize("prefix", [b"\x02", b"\x03"])
def test_regression_compressed_ecdsa_point_in_an_ssh_key(prefix: bytes) -> None:
    """Found by the fuzzer: an ECDSA key whose point is compressed made `load_trusted_keys` raise
    NotImplementedError ("Need uncompressed point") from cryptography, a crash, instead of a typed error."""
    blob = _string(b"ecdsa-sha2-nistp256") + _string(b"nistp256") + _string(prefix + bytes(range(1, 33)))
    line = b"ecdsa-sha2-nistp256 " + base64.b64encode(blob) + b" compressed\n"
    with pytest.raises(InvalidKeyFileError, match="malformed SSH public key"):
        ssh.load_trusted_keys(line, "keys")
    assert run_one(shared_format_targets()["ssh_keys"], line) == "rejected"

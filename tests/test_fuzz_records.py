"""Fuzz properties for the wrapped key record parser and the path that opens a record (format checks, KEK
check, DEK unwrap, AES-GCM), with the local KEK.

Properties: only `KeysealError`s come out, whatever the bytes; and no change to a genuine record opens: a
mutated record that decrypts is byte for byte the record it was made from (the mutation was a no-op).
"""

from __future__ import annotations

import json

import pytest
from fuzz.mutate import Choices, mutate
from fuzz.properties import fuzz_settings
from fuzz.targets import run_one, shared_corpus, shared_targets
from hypothesis import given
from hypothesis import strategies as st

from keyseal._internal.records.record import WrappedRecord
from keyseal.errors import WrappedRecordError

FUZZ = fuzz_settings()


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_raise_only_keyseal_errors(data: bytes) -> None:
    run_one(shared_targets()["record"], data)


@pytest.mark.slow
@FUZZ
@given(data=st.text(max_size=400).map(lambda text: ("{" + text).encode("utf-8", "surrogatepass")))
def test_json_like_text_raises_only_keyseal_errors(data: bytes) -> None:
    run_one(shared_targets()["record"], data)


@pytest.mark.slow
@FUZZ
@given(pick=st.integers(0, 2), program=st.binary(min_size=1, max_size=96))
def test_no_change_to_a_record_opens(pick: int, program: bytes) -> None:
    target = shared_targets()["record"]
    seed = target.seeds[pick]
    mutant = mutate(seed, Choices(program), (), "record")
    if run_one(target, mutant) == "accepted":
        assert mutant == seed


@pytest.mark.parametrize("pick", [0, 2])  # a v1 record, a v2 record (with a scope)
@pytest.mark.parametrize("value", [None, True, 1.0, -1, 0, 2**53, "1", "", [], {}])
def test_any_other_value_in_any_field_is_refused(value: object, pick: int) -> None:
    """Each field set to a value of another type (or another value): refused by the field checks, or, for a
    value that passes them (a name "1"), by the AES-GCM associated data when the record is opened."""
    seed = json.loads(shared_targets()["record"].seeds[pick])
    for field in seed:
        fields = {**seed, field: value}
        canonical = (json.dumps(fields, sort_keys=True, indent=2, ensure_ascii=True) + "\n").encode()
        with pytest.raises(WrappedRecordError):
            unseal_with_corpus_kek(canonical)


def unseal_with_corpus_kek(data: bytes) -> bytes:
    from keyseal._internal.wrapping.envelope import unseal

    kek = shared_corpus().kek
    assert kek is not None
    return unseal(WrappedRecord.from_bytes(data, "fuzzed record"), kek, "fuzzed record")


@pytest.mark.parametrize("depth", [1000, 5000, 100_000])
@pytest.mark.parametrize(("opener", "closer"), [(b"[", b"]"), (b'{"a":', b"}")])
def test_regression_deeply_nested_json(depth: int, opener: bytes, closer: bytes) -> None:
    """Found by the fuzzer (its deep-nesting mutation): JSON nested 1000 deep made the record parser raise
    RecursionError, a crash (`keyseal sign` printed "internal error"), instead of a WrappedRecordError."""
    data = opener * depth + b"0" + closer * depth
    with pytest.raises(WrappedRecordError, match="not valid ASCII JSON"):
        WrappedRecord.from_bytes(data, "nested record")
    assert run_one(shared_targets()["record"], data) == "rejected"

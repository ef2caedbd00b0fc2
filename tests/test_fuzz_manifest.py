"""Fuzz properties for the checksum manifest parser: only `KeysealError`s come out, whatever the bytes, and a
manifest written in the format parses back to the same entries."""

from __future__ import annotations

import pytest
from fuzz.properties import fuzz_settings
from fuzz.targets import run_one, shared_targets
from hypothesis import given
from hypothesis import strategies as st

from keyseal._internal.openpgp.manifest import DIGESTS, check_name, names_directory, parse_manifest, path_key
from keyseal.errors import UsageError, VerificationError

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

FUZZ = fuzz_settings()


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_raise_only_keyseal_errors(data: bytes) -> None:
    run_one(shared_targets()["manifest"], data)


@FUZZ
@given(data=st.text(max_size=600).map(lambda text: text.encode("utf-8", "surrogatepass")))
def test_random_text_raises_only_keyseal_errors(data: bytes) -> None:
    run_one(shared_targets()["manifest"], data)


@FUZZ
@given(program=st.binary(min_size=1, max_size=96))
def test_mutated_manifests_raise_only_keyseal_errors(program: bytes) -> None:
    target = shared_targets()["manifest"]
    run_one(target, target.mutant(program))


def _listable(name: str) -> bool:
    try:
        check_name(name)
    except UsageError:
        return False
    return not name.startswith(("*", " ")) and not name.endswith("\r") and not names_directory(name)


@FUZZ
@given(
    digest=st.sampled_from(sorted(DIGESTS)),
    # Unique as files, not only as strings: `f` and `./f` are one file, and a manifest listing both is refused.
    names=st.lists(st.text(min_size=1, max_size=40).filter(_listable), min_size=1, max_size=8, unique_by=path_key),
    binary_mode=st.booleans(),
    crlf=st.booleans(),
    data=st.data(),
)
def test_written_manifests_parse_back(digest: str, names: list[str], binary_mode: bool, crlf: bool,
                                      data: st.DataObject) -> None:
    size = DIGESTS[digest] // 2
    digests = [data.draw(st.binary(min_size=size, max_size=size)) for _ in names]
    end = "\r\n" if crlf else "\n"
    text = "".join(f"{d.hex()} {'*' if binary_mode else ' '}{n}{end}" for n, d in zip(names, digests, strict=True))
    manifest = parse_manifest(text.encode("utf-8", "surrogatepass"))
    assert manifest.digest_name == digest
    assert [(e.name, e.digest) for e in manifest.entries] == list(zip(names, digests, strict=True))
    for name, digest_bytes in zip(names, digests, strict=True):
        entry = manifest.lookup(name)
        assert entry is not None and entry.digest == digest_bytes


@FUZZ
@given(
    name=st.text(alphabet="ab/.", min_size=1, max_size=12).filter(lambda n: not names_directory(n)),
    other=st.text(alphabet="ab/.", min_size=1, max_size=12).filter(lambda n: not names_directory(n)),
)
def test_one_file_is_never_listed_twice(name: str, other: str) -> None:
    """Two spellings of one path are refused; two paths are accepted, and each name finds its own line."""
    text = f"{'a' * 64}  {name}\n{'b' * 64}  {other}\n".encode()
    if path_key(name) == path_key(other):
        with pytest.raises(VerificationError, match=r"again|the same file as"):
            parse_manifest(text)
        return
    manifest = parse_manifest(text)
    assert manifest.lookup(name) == manifest.entries[0] and manifest.lookup(other) == manifest.entries[1]

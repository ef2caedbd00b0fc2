"""RFC 7512 PKCS#11 URI parsing: no module needed, so every case runs without SoftHSM."""

from __future__ import annotations

import pytest

from keyseal._internal.providers.pkcs11.uri import parse, redact
from keyseal.errors import KeyURIError

PIN = "s3cret-PIN"


def test_token_object_and_query() -> None:
    uri = parse("pkcs11:token=release;object=signing%20key?module-path=/usr/lib/x.so&pin-source=file:/run/pin")
    assert uri.token == "release"
    assert uri.object == "signing key"
    assert uri.id is None
    assert uri.query == {"module-path": "/usr/lib/x.so", "pin-source": "file:/run/pin"}


def test_id_is_bytes_and_names_are_case_insensitive() -> None:
    uri = parse("PKCS11:Token=t;ID=%01%ff%A0z;type=private;slot-id=7;library-version=2.6")
    assert uri.token == "t"
    assert uri.id == b"\x01\xff\xa0z"
    assert uri.path["type"] == "private"
    assert uri.path["slot-id"] == "7"
    assert uri.describe_key() == "id=01ffa07a"


def test_utf8_and_reserved_characters() -> None:
    uri = parse("pkcs11:token=caf%C3%A9;object=a:b@c=(d)+e,f!$'*~._-")
    assert uri.token == "café"
    assert uri.object == "a:b@c=(d)+e,f!$'*~._-"


def test_empty_path_is_valid() -> None:
    assert parse("pkcs11:").path == {}
    assert parse("pkcs11:?module-path=/x.so").query == {"module-path": "/x.so"}


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("file:/x", "must start with 'pkcs11:'"),
        ("pkcs11:token", "expected NAME=VALUE"),
        ("pkcs11:token=a,object=b", None),  # ',' is allowed: one token label "a,object=b"
        ("pkcs11:=x", "expected NAME=VALUE"),
        ("pkcs11:token=a;token=b", "appears twice"),
        ("pkcs11:token=a;colour=blue", "unknown attribute 'colour'"),
        ("pkcs11:token=a?colour=blue", "unknown query attribute 'colour'"),
        ("pkcs11:token=a b", "must be percent-encoded as %20"),
        ("pkcs11:object=a/b", "must be percent-encoded as %2F"),
        ("pkcs11:object=é", "non-ASCII"),
        ("pkcs11:object=50%", "two hex digits"),
        ("pkcs11:object=%zz", "two hex digits"),
        ("pkcs11:object=%ff", "not UTF-8"),
        ("pkcs11:type=secret", "invalid type='secret'"),
        ("pkcs11:slot-id=one", "decimal"),
        ("pkcs11:slot-id=%C2%B2", "decimal"),  # "²": str.isdigit() takes it, int() does not
        ("pkcs11:library-version=two", "M[.N]"),
        ("pkcs11:token=a?module-path=", "empty module-path"),
        ("pkcs11:token=a?module-path=/x.so&module-path=/y.so", "appears twice"),
        ("pkcs11:token=a?pin-source=file:/p&pin-value=1", "both pin-source and pin-value"),
    ],
)
def test_syntax_errors(uri: str, fragment: str | None) -> None:
    if fragment is None:
        assert parse(uri).token == "a,object=b"
        return
    with pytest.raises(KeyURIError) as info:
        parse(uri)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_pin_value_is_parsed_but_never_shown() -> None:
    uri = parse(f"pkcs11:token=t;object=o?pin-value={PIN}")
    assert uri.query["pin-value"] == PIN
    assert PIN not in uri.redacted()
    assert "pin-value=REDACTED" in uri.redacted()


@pytest.mark.parametrize(
    "uri",
    [
        f"pkcs11:token=t;colour=x?pin-value={PIN}",  # error about the path, PIN in the query
        f"pkcs11:token=t;pin-value={PIN}",  # PIN put in the path by mistake
        f"pkcs11:pin-value={PIN}",
        f"pkcs11:token=t?pin-value={PIN}&pin-source=file:/p",
        f"pkcs11:token=t?pin-value={PIN}%zz",
        f"pkcs11:token=t?pin-value{PIN}",
    ],
)
def test_errors_never_echo_the_pin(uri: str) -> None:
    with pytest.raises(KeyURIError) as info:
        parse(uri)
    assert PIN not in str(info.value)


def test_redact_without_parsing() -> None:
    assert redact("pkcs11:token=t?pin-value=1&module-path=/m") == "pkcs11:token=t?pin-value=REDACTED&module-path=/m"
    assert redact("pkcs11:token=t") == "pkcs11:token=t"

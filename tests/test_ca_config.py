"""The server configuration: YAML keys mirror the Helm values; mistakes are one clear line, never a default."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from keyseal._internal.ca.config import load_config, parse_config, parse_duration
from keyseal._internal.spiffe.ids import SpiffeIdError, parse_spiffe_id, path_allowed
from keyseal.errors import InputError, UsageError
from tests.harness.ca import base_config, sha256_hex

ARN = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
CHART_VALUES = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "keyseal" / "values.yaml"


def test_defaults(tmp_path: Path) -> None:
    config = parse_config({"trustDomain": "example.org"})
    assert config.custody == "wrapped"
    assert config.wrapping_provider == "local"
    assert config.ca_key_type == "ec-p256" and config.jwt_key_type == "ec-p256"
    assert config.x509_ttl == timedelta(hours=1)
    assert config.jwt_ttl == timedelta(minutes=5)
    assert config.ca_ttl == timedelta(days=1)
    assert config.record_prefix == "keyseal-example.org"
    assert config.tls.self_issued
    assert config.kek_spec() == "local"


def test_awskms_provider(tmp_path: Path) -> None:
    config = parse_config({"trustDomain": "example.org", "keyWrapping": {"provider": "awskms"},
                           "aws": {"kmsKeyARN": ARN, "endpoints": {"kms": "http://127.0.0.1:1"}}})
    assert config.kek_spec() == f"awskms:{ARN}"
    assert config.kms_endpoint == "http://127.0.0.1:1"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"keyWrapping": {"provider": "awskms"}}, "aws.kmsKeyARN is required when keyWrapping.provider is awskms"),
        ({"keyWrapping": {"provider": "awskms"}, "aws": {"kmsKeyARN": "alias/x"}}, "is not a KMS key ARN"),
        ({"keyWrapping": {"provider": "gcpkms"}}, "keyWrapping.provider='gcpkms' is not one of local, awskms, vault"),
        ({"aws": {"kmsKeyArn": ARN}}, "unknown configuration key 'aws.kmsKeyArn'"),
        ({"trustDomain": "Example.ORG"}, "invalid trust domain"),
        ({"trustDomain": ""}, "trustDomain is missing"),
        ({"ca": {"keyType": "ed25519"}}, "ca.keyType='ed25519' is not one of ec-p256, ec-p384, rsa-2048, rsa-4096"),
        ({"ca": {"ttl": "1 day"}}, "ca.ttl='1 day' is not a duration"),
        ({"ca": {"ttl": "1h"}, "x509SVID": {"ttl": "1h"}}, "must be at most a sixth of ca.ttl"),
        ({"bundle": {"refreshHint": "12h"}}, "bundle.refreshHint"),
        ({"server": {"listen": "8443"}}, "is not HOST:PORT"),
        ({"server": {"tls": {"certFile": "/x"}}}, "certFile and server.tls.keyFile go together"),
        ({"clients": [{"name": "a", "allowedPathPrefixes": ["/a"]}]}, "needs exactly one credential"),
        ({"clients": [{"name": "a", "tokenSHA256": "secret", "allowedPathPrefixes": ["/a"]}]},
         "must be 64 lower-case hex digits"),
        ({"clients": [{"name": "a", "tokenSHA256": sha256_hex("t"), "allowedPathPrefixes": []}]},
         "allowedPathPrefixes is empty"),
        ({"clients": [{"name": "a", "tokenSHA256": sha256_hex("t"), "allowedPathPrefixes": ["/a/../b"]}]},
         "'.' and '..' segments are not allowed"),
        ({"clients": [{"name": "a", "certURI": "spiffe://clients.example/c", "allowedPathPrefixes": ["/"]}]},
         "server.tls.clientCAFile is not set"),
        ({"clients": [{"name": "a", "certURI": "spiffe://example.org/c", "allowedPathPrefixes": ["/"]}],
          "server": {"tls": {"clientCAFile": "/ca.pem"}}}, "name the client by certSHA256"),
        ({"store": {"type": "kubernetes", "kubernetes": {"namespace": "Bad_NS"}}}, "is not a Kubernetes namespace"),
        ({"server": {"listen": "127.0.0.1:\u00b2"}}, "is not HOST:PORT"),  # isdigit() says yes, int() says no
        ({"server": {"connections": {"max": 0}}}, "server.connections.max must be a whole number from 1 to 16384"),
        ({"server": {"connections": {"max": "256"}}}, "server.connections.max must be a whole number"),
        ({"server": {"connections": {"max": 100, "perSource": 101}}},
         "server.connections.perSource must be a whole number from 1 to 100"),
        ({"server": {"connections": {"max": 100, "reserved": 100}}},
         "server.connections.reserved must be a whole number from 0 to 99"),
        ({"server": {"connections": {"perSouce": 8}}}, "unknown configuration key 'server.connections.perSouce'"),
        # https_spiffe needs the server's own SVID, which server.tls.certFile replaces (#18)
        ({"server": {"tls": {"certFile": "/nonexistent/c.pem", "keyFile": "/nonexistent/k.pem"}},
          "federation": {"listen": "127.0.0.1:8445"}}, "federation.listen without federation.tls"),
    ],
)
def test_mistakes_are_one_clear_line(change: dict[str, Any], needle: str) -> None:
    data: dict[str, Any] = {"trustDomain": "example.org", **change}
    with pytest.raises(UsageError) as caught:
        parse_config(data)
    assert needle in caught.value.message
    assert "\n" not in caught.value.message


def test_connection_limits() -> None:
    defaults = parse_config({"trustDomain": "example.org"}).connections
    assert (defaults.max_connections, defaults.per_source, defaults.reserved, defaults.busy_share) == (256, 32, 64, 4)
    small = parse_config({"trustDomain": "example.org", "server": {"connections": {"max": 20}}}).connections
    assert (small.max_connections, small.per_source, small.reserved) == (20, 20, 5)  # the defaults fit in
    given = parse_config({"trustDomain": "example.org",
                          "server": {"connections": {"max": 1000, "perSource": 100, "reserved": 0}}}).connections
    assert (given.max_connections, given.per_source, given.reserved, given.busy_share) == (1000, 100, 0, 12)


def test_token_is_never_in_a_message() -> None:
    with pytest.raises(UsageError) as caught:
        parse_config({"trustDomain": "example.org",
                      "clients": [{"name": "a", "tokenSHA256": "hunter2-plain-token", "allowedPathPrefixes": ["/"]}]})
    assert "hunter2" not in caught.value.message


def test_duplicate_tokens_refused() -> None:
    client = {"tokenSHA256": sha256_hex("same"), "allowedPathPrefixes": ["/"]}
    with pytest.raises(UsageError, match="same tokenSHA256"):
        parse_config({"trustDomain": "example.org",
                      "clients": [{"name": "a", **client}, {"name": "b", **client}]})


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trustDomain: [unclosed\n")
    with pytest.raises(UsageError, match="not valid YAML at line"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base_config(tmp_path)))
    assert load_config(good).listen_port == 0


def test_chart_values_are_a_valid_server_config() -> None:
    """The chart's configmap passes these sections of values.yaml to the server unchanged."""
    values = yaml.safe_load(CHART_VALUES.read_text())
    sections = ("trustDomain", "custody", "keyWrapping", "aws", "store", "ca", "x509SVID", "jwtSVID", "bundle",
                "server", "clients", "logLevel")
    config = parse_config({k: values[k] for k in sections if k in values})
    assert config.store_type == "kubernetes"
    assert config.trust_domain == values["trustDomain"]


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("5m", 300), ("1h30m", 5400), ("7d", 604800), (60, 60)])
def test_durations(text: str | int, seconds: int) -> None:
    assert parse_duration(text, "x") == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0s", "1w", "-5m", "5 m", True])
def test_bad_durations(text: Any) -> None:
    with pytest.raises(UsageError):
        parse_duration(text, "x")


@pytest.mark.parametrize(
    "text",
    ["spiffe://example.org/ns/a", "spiffe://example.org", "spiffe://td_1.example-2/a.b/c_d-e"],
)
def test_spiffe_ids_accepted(text: str) -> None:
    assert str(parse_spiffe_id(text)) == text


@pytest.mark.parametrize(
    "text",
    ["http://example.org/a", "spiffe://Example.org/a", "spiffe://example.org/a/", "spiffe://example.org//a",
     "spiffe://example.org/a/../b", "spiffe://example.org/./a", "spiffe://example.org:443/a",
     "spiffe://user@example.org/a", "spiffe://example.org/a?x=1", "spiffe://example.org/a#f",
     "spiffe://example.org/a%20b", "spiffe:///a", "spiffe://example.org/" + "a" * 2100, ""],
)
def test_spiffe_ids_refused(text: str) -> None:
    with pytest.raises(SpiffeIdError):
        parse_spiffe_id(text)


def test_prefixes_match_whole_segments() -> None:
    assert path_allowed("/ns/a", ("/ns/a",))
    assert path_allowed("/ns/a/w", ("/ns/a",))
    assert not path_allowed("/ns/ab", ("/ns/a",))
    assert not path_allowed("/ns/b", ("/ns/a",))
    assert path_allowed("/anything", ("/",))

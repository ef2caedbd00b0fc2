"""Web Key Directory: hashes equal GnuPG's, the built tree is what the draft describes, and `keyseal wkd fetch`
against a real HTTPS server on 127.0.0.1 (its CA made here) behaves as specified."""

from __future__ import annotations

import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyseal._internal.openpgp.armor import dearmor_or_binary
from keyseal._internal.openpgp.cert import load_certificates
from keyseal._internal.openpgp.wkd import parse_connect_to, validate_domain, wkd_hash, zbase32
from keyseal.errors import UsageError
from tests.conftest import Gpg, assert_one_line_error, run_keyseal
from tests.harness.https_server import HttpsServer, Override, TlsFiles, TrickleProxy, make_tls
from tests.harness.release_keys import ReleaseKey, make_key

WKS_CLIENT = "/usr/lib/gnupg/gpg-wks-client"
ADDRESSES = ["releases@example.org", "Joe.Doe@Example.ORG", "ALICE@example.org", "bob+tag@example.org",
             "o'neil@sub.example.net", "MiXeD.CaSe.123@x.example", "Ünïcode@example.org", "a@b.co"]
HOSTS = ["openpgpkey.example.org", "example.org"]
ADVANCED = "/.well-known/openpgpkey/example.org/hu/"
DIRECT = "/.well-known/openpgpkey/hu/"
STARTUP_ALLOWANCE = 4.0  # seconds for the CLI's interpreter to start and exit on a loaded machine


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ReleaseKey]:
    directory = tmp_path_factory.mktemp("wkd-keys")
    return {
        "v1": make_key(directory, "v1", "p256", extra_emails=("someone@other.net",)),
        "v2": make_key(directory, "v2", "ed25519"),
        "foreign": make_key(directory, "foreign", email="mallory@evil.example"),
        "other": make_key(directory, "other", email="team@example.org"),
    }


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"), HOSTS)


@pytest.fixture
def served(tmp_path: Path, tls: TlsFiles) -> Iterator[HttpsServer]:
    root = tmp_path / "site"
    root.mkdir()
    server = HttpsServer(root, tls).start()
    yield server
    server.stop()


def build(out: Path, *certs: Path, method: str = "advanced", extra: tuple[str, ...] = ()) -> str:
    result = run_keyseal("wkd", "build", *certs, "--domain", "example.org", "--method", method, "-o", out, *extra)
    assert result.returncode == 0, result.stderr
    return result.stdout


def fetch(server: HttpsServer, tls: TlsFiles, *extra: str | Path, email: str = "releases@example.org"):  # type: ignore[no-untyped-def]
    routes = [arg for spec in server.connect_to(*HOSTS) for arg in ("--connect-to", spec)]
    return run_keyseal("wkd", "fetch", email, "--ca-bundle", tls.ca_pem, *routes, *extra)


# -- hashes ----------------------------------------------------------------------------------------------


def test_hashes_equal_gnupg(tmp_path: Path) -> None:
    golden = subprocess.run([WKS_CLIENT, "--print-wkd-hash", *ADDRESSES], capture_output=True, check=True,
                            timeout=30).stdout.decode().splitlines()
    assert len(golden) == len(ADDRESSES)
    for address, line in zip(ADDRESSES, golden, strict=True):
        assert wkd_hash(address.rpartition("@")[0]) == line.split()[0], address
    ours = run_keyseal("wkd", "hash", *ADDRESSES)
    assert ours.returncode == 0, ours.stderr
    assert [line.split()[0] for line in ours.stdout.splitlines()] == [line.split()[0] for line in golden]


def test_hash_is_case_insensitive_in_ascii_only() -> None:
    assert wkd_hash("Joe.Doe") == wkd_hash("joe.doe") == wkd_hash("JOE.DOE")
    assert wkd_hash("Ünïcode") != wkd_hash("ünïcode")  # GnuPG lower-cases ASCII letters only
    assert zbase32(b"") == "" and zbase32(b"\x00") == "yy" and zbase32(b"\xff" * 5) == "9" * 8


def test_urls_equal_gnupg() -> None:
    from keyseal._internal.openpgp.wkd import parse_address, urls_for

    line = subprocess.run([WKS_CLIENT, "--print-wkd-url", "Joe.Doe@Example.ORG"], capture_output=True, check=True,
                          timeout=30).stdout.decode().strip()
    host, path = urls_for(parse_address("Joe.Doe@Example.ORG"))["advanced"]
    assert line.split("?")[0] == f"https://{host}{path}".split("?")[0]


# -- building the tree -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_build_advanced_tree(tmp_path: Path, keys: dict[str, ReleaseKey], gpg: Gpg) -> None:
    out = tmp_path / "public"
    # A restrictive umask must not leak into the published tree.
    built = subprocess.run(["sh", "-c", 'umask 077 && exec "$@"', "sh", sys.executable, "-m", "keyseal", "wkd",
                            "build", keys["v1"].cert, keys["v2"].cert, keys["foreign"].cert, keys["other"].cert,
                            "--domain", "Example.ORG", "-o", out, "--submission-address", "submit@example.org"],
                           capture_output=True, check=False, timeout=60)
    assert built.returncode == 0, built.stderr
    hu = out / ".well-known/openpgpkey/example.org/hu"
    published = hu / wkd_hash("releases")
    assert sorted(p.name for p in hu.iterdir()) == sorted([wkd_hash("releases"), wkd_hash("team")])
    # Rotation: both certificates for the address, concatenated, binary.
    certs = load_certificates(published.read_bytes())
    assert [c.fingerprint for c in certs] == [keys["v1"].fingerprint, keys["v2"].fingerprint]
    assert not published.read_bytes().startswith(b"-----")
    # Only user IDs at the domain are published: v1's other.net user ID is not.
    assert certs[0].user_ids == ["Example Releases <releases@example.org>"]
    assert b"other.net" not in published.read_bytes()
    policy = out / ".well-known/openpgpkey/example.org/policy"
    assert policy.read_text() == "submission-address: submit@example.org\n"
    assert (policy.parent / "submission-address").read_text() == "submit@example.org\n"
    for path in [out / ".well-known", out / ".well-known/openpgpkey", policy.parent, hu]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path
    for path in [published, policy]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    # GnuPG reads the published file.
    imported = gpg.run("--import", published)
    assert imported.returncode == 0, imported.stderr
    assert imported.stderr.decode().count("[GNUPG:] IMPORT_OK") == 2


def test_build_direct_tree_for_chosen_addresses(tmp_path: Path, keys: dict[str, ReleaseKey]) -> None:
    out = tmp_path / "public"
    printed = build(out, keys["v2"].cert, keys["other"].cert, method="direct", extra=("--email", "team@example.org"))
    hu = out / ".well-known/openpgpkey/hu"
    assert [p.name for p in hu.iterdir()] == [wkd_hash("team")]
    assert (out / ".well-known/openpgpkey/policy").read_text() == ""
    assert printed.split() == [str(hu / wkd_hash("team")), "team@example.org", keys["other"].fingerprint]
    # A rebuild that no longer publishes an address leaves its file but says so.
    again = run_keyseal("wkd", "build", keys["v2"].cert, "--domain", "example.org", "--method", "direct", "-o", out)
    assert again.returncode == 0 and f"{hu / wkd_hash('team')} is not part of this build" in again.stderr


@pytest.mark.slow
@pytest.mark.parametrize("domain", ["../evil", "example..org", "exa/mple.org", "", "-bad.example.org", "org",
                                    "ex ample.org", "exämple.org", "a." * 130 + "org"])
def test_build_refuses_bad_domains(domain: str, tmp_path: Path, keys: dict[str, ReleaseKey]) -> None:
    result = run_keyseal("wkd", "build", keys["v1"].cert, "--domain", domain, "-o", tmp_path / "out")
    assert_one_line_error(result)
    assert "invalid domain" in result.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError):
        validate_domain(domain)


@pytest.mark.slow
def test_build_refuses_addresses_it_cannot_publish(tmp_path: Path, keys: dict[str, ReleaseKey]) -> None:
    elsewhere = run_keyseal("wkd", "build", keys["v1"].cert, "--domain", "example.org", "--email",
                            "someone@other.net", "-o", tmp_path)
    assert_one_line_error(elsewhere)
    assert "is not at example.org" in elsewhere.stderr
    unknown = run_keyseal("wkd", "build", keys["v1"].cert, "--domain", "example.org", "--email",
                          "nobody@example.org", "-o", tmp_path)
    assert_one_line_error(unknown)
    nothing = run_keyseal("wkd", "build", keys["foreign"].cert, "--domain", "example.org", "-o", tmp_path)
    assert_one_line_error(nothing)
    assert "nothing to publish" in nothing.stderr
    assert not (tmp_path / ".well-known").exists()


# -- fetching --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fetch_returns_the_published_fingerprints(served: HttpsServer, tls: TlsFiles, keys: dict[str, ReleaseKey],
                                                  tmp_path: Path) -> None:
    build(served.root, keys["v1"].cert, keys["v2"].cert)
    out = tmp_path / "fetched.asc"
    result = fetch(served, tls, "-o", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == sorted([keys["v1"].fingerprint, keys["v2"].fingerprint])
    assert "advanced method" in result.stderr
    assert served.requests == [("openpgpkey.example.org", ADVANCED + wkd_hash("releases"))]
    assert sorted(c.fingerprint for c in load_certificates(out.read_bytes())) == result.stdout.split()


@pytest.mark.slow
def test_fetch_tries_direct_after_a_404(served: HttpsServer, tls: TlsFiles, keys: dict[str, ReleaseKey]) -> None:
    build(served.root, keys["v2"].cert, method="direct")
    result = fetch(served, tls)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [keys["v2"].fingerprint]
    assert served.requests == [("openpgpkey.example.org", ADVANCED + wkd_hash("releases")),
                               ("example.org", DIRECT + wkd_hash("releases"))]


@pytest.mark.slow
def test_fetch_reports_a_404_on_both(served: HttpsServer, tls: TlsFiles) -> None:
    result = fetch(served, tls)
    assert_one_line_error(result)
    assert "no key for releases@example.org" in result.stderr
    assert len(served.requests) == 2


@pytest.mark.slow
def test_a_server_error_is_not_retried_on_direct(served: HttpsServer, tls: TlsFiles,
                                                 keys: dict[str, ReleaseKey]) -> None:
    build(served.root, keys["v2"].cert, method="direct")
    served.overrides[ADVANCED + wkd_hash("releases")] = Override(status=500, body=b"oops")
    result = fetch(served, tls)
    assert_one_line_error(result)
    assert "answered HTTP 500" in result.stderr
    assert [host for host, _ in served.requests] == ["openpgpkey.example.org"]


@pytest.mark.slow
@pytest.mark.parametrize("content_length", [True, False])
def test_an_oversized_response_is_refused(content_length: bool, served: HttpsServer, tls: TlsFiles,
                                          keys: dict[str, ReleaseKey]) -> None:
    cert = dearmor_or_binary(keys["v2"].cert.read_bytes())
    body = cert * (64 * 1024 // len(cert) + 1)  # valid keys, just too many bytes
    assert len(body) > 64 * 1024
    served.overrides[ADVANCED + wkd_hash("releases")] = Override(body=body, content_length=content_length)
    result = fetch(served, tls)
    assert_one_line_error(result)
    assert "64 KiB" in result.stderr


@pytest.mark.slow
def test_a_key_with_a_foreign_user_id_is_dropped(served: HttpsServer, tls: TlsFiles,
                                                 keys: dict[str, ReleaseKey]) -> None:
    body = dearmor_or_binary(keys["v2"].cert.read_bytes()) + dearmor_or_binary(keys["foreign"].cert.read_bytes())
    served.overrides[ADVANCED + wkd_hash("releases")] = Override(body=body)
    result = fetch(served, tls)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [keys["v2"].fingerprint]
    assert f"dropped {keys['foreign'].fingerprint}" in result.stderr
    served.overrides[ADVANCED + wkd_hash("releases")] = Override(body=body[len(body) // 2 + 50:] + b"\x00")
    garbage = fetch(served, tls)
    assert_one_line_error(garbage)


@pytest.mark.slow
def test_only_a_foreign_key_means_no_key(served: HttpsServer, tls: TlsFiles, keys: dict[str, ReleaseKey]) -> None:
    served.overrides[ADVANCED + wkd_hash("releases")] = Override(body=keys["foreign"].cert.read_bytes())
    result = fetch(served, tls)
    assert_one_line_error(result)
    assert "no key with a user ID for releases@example.org" in result.stderr


@pytest.mark.slow
def test_tls_is_always_verified(served: HttpsServer, tls: TlsFiles, keys: dict[str, ReleaseKey],
                                tmp_path: Path) -> None:
    build(served.root, keys["v2"].cert)
    other_ca = make_tls(tmp_path / "other", HOSTS, ca_name="another CA")
    routes = [arg for spec in served.connect_to(*HOSTS) for arg in ("--connect-to", spec)]
    wrong_ca = run_keyseal("wkd", "fetch", "releases@example.org", "--ca-bundle", other_ca.ca_pem, *routes)
    assert_one_line_error(wrong_ca)
    assert "failed verification" in wrong_ca.stderr
    system_store = run_keyseal("wkd", "fetch", "releases@example.org", *routes)  # the test CA is not in it
    assert_one_line_error(system_store)
    assert "failed verification" in system_store.stderr
    # The right CA but a certificate for other names: refused, whatever the route says.
    served.stop()
    misnamed = HttpsServer(served.root, make_tls(tmp_path / "misnamed", ["www.example.com"])).start()
    try:
        routes = [arg for spec in misnamed.connect_to(*HOSTS) for arg in ("--connect-to", spec)]
        result = run_keyseal("wkd", "fetch", "releases@example.org", "--ca-bundle",
                             misnamed.tls.ca_pem, *routes)
        assert_one_line_error(result)
        assert "failed verification" in result.stderr
    finally:
        misnamed.stop()


@pytest.mark.slow
def test_a_slow_server_times_out(served: HttpsServer, tls: TlsFiles, keys: dict[str, ReleaseKey]) -> None:
    served.overrides[ADVANCED + wkd_hash("releases")] = Override(body=keys["v2"].cert.read_bytes(), delay=3)
    result = fetch(served, tls, "--timeout", "0.5")
    assert_one_line_error(result)
    assert "timed out after 0.5 s" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("part", ["headers", "body"])
def test_a_trickling_answer_is_cut_at_the_timeout(part: str, served: HttpsServer, tls: TlsFiles,
                                                  keys: dict[str, ReleaseKey]) -> None:
    """A byte every 0.3 s keeps every single read short: only one deadline for the whole fetch stops it."""
    served.overrides[ADVANCED + wkd_hash("releases")] = Override(body=keys["v2"].cert.read_bytes(),
                                                                 trickle=part, interval=0.3)  # type: ignore[arg-type]
    started = time.monotonic()
    result = fetch(served, tls, "--timeout", "1.5")
    elapsed = time.monotonic() - started
    assert elapsed < 1.5 + STARTUP_ALLOWANCE, elapsed
    assert_one_line_error(result)
    assert "timed out after 1.5 s" in result.stderr
    assert [host for host, _ in served.requests] == ["openpgpkey.example.org"]  # no second try past the deadline


@pytest.mark.slow
def test_a_trickled_tls_handshake_is_cut_at_the_timeout(served: HttpsServer, tls: TlsFiles,
                                                        keys: dict[str, ReleaseKey]) -> None:
    build(served.root, keys["v2"].cert)
    proxy = TrickleProxy(("127.0.0.1", served.port), interval=0.2).start()
    try:
        routes = [arg for spec in proxy.connect_to(*HOSTS) for arg in ("--connect-to", spec)]
        started = time.monotonic()
        result = run_keyseal("wkd", "fetch", "releases@example.org", "--ca-bundle", tls.ca_pem, *routes,
                             "--timeout", "1.5")
        elapsed = time.monotonic() - started
    finally:
        proxy.stop()
    assert elapsed < 1.5 + STARTUP_ALLOWANCE, elapsed
    assert_one_line_error(result)
    assert "timed out after 1.5 s" in result.stderr


def test_fetch_needs_https_material_that_exists(tmp_path: Path) -> None:
    result = run_keyseal("wkd", "fetch", "releases@example.org", "--ca-bundle", tmp_path / "absent.pem")
    assert_one_line_error(result)
    assert "does not exist" in result.stderr
    bad = run_keyseal("wkd", "fetch", "releases@example.org", "--connect-to", "example.org:443")
    assert_one_line_error(bad)
    assert "invalid --connect-to" in bad.stderr
    assert parse_connect_to("example.org:443:[::1]:8443") == (("example.org", 443), ("::1", 8443))
    not_an_address = run_keyseal("wkd", "fetch", "releases")
    assert_one_line_error(not_an_address)

"""DNS names on registration entries: stored by both stores (and kept by a SQLite database an older keyseal wrote,
which gains the column), shown by `keyseal entry`, sent to agents (the incremental sync too), and carried as DNS
SANs after the URI SAN of the entry's X.509-SVIDs, checked with `cryptography` and `openssl`. Bad names are refused
with one line."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from keyseal._internal.ca.config import parse_config
from keyseal._internal.ca.registry.entries import Entry, check_dns_name
from keyseal._internal.ca.registry.index import entries_digest
from keyseal._internal.ca.registry.sqlite import DirectoryEntryStore
from keyseal._internal.ca.registry.stores import entry_store_for, join_tokens_for
from keyseal._internal.ca.server import CaServer
from keyseal.errors import UsageError
from tests.conftest import assert_one_line_error
from tests.harness.agent import agent_call, start_server
from tests.harness.ca import TRUST_DOMAIN, base_config, make_csr, new_key

AGENT = f"spiffe://{TRUST_DOMAIN}/keyseal/agent/node-1"
WEB = f"spiffe://{TRUST_DOMAIN}/ns/shop/web"


@pytest.fixture
def keyseal(entry_cli: Any) -> Any:
    """`keyseal entry ... --config` on either store (conftest's entry_cli)."""
    return entry_cli


def test_the_cli_stores_lists_and_serves_dns_names(keyseal: Any, tmp_path: Path) -> None:
    created = keyseal("create", "--spiffe-id", WEB, "--parent", AGENT, "--selector", "unix:uid:1001",
                      "--dns-name", "Web.Shop.example", "--dns-name", "web", "--dns-name", "web.shop.example",
                      "--json")
    assert created.returncode == 0, created.stderr
    document = json.loads(created.stdout)
    assert document["dns_names"] == ["web.shop.example", "web"]  # lower-cased, each once, in the order given
    listed = keyseal("list")
    assert listed.returncode == 0 and "dnsNames=web.shop.example,web" in listed.stdout, listed
    assert json.loads(keyseal("list", "--json").stdout) == [document]
    plain = keyseal("create", "--spiffe-id", WEB + "2", "--parent", AGENT, "--selector", "unix:uid:1002", "--json")
    assert "dns_names" not in json.loads(plain.stdout)  # absent when none, as entries always looked

    # A round trip through --json-lines keeps them; a bad name in a file is named by its line.
    lines = tmp_path / "entries.jsonl"
    lines.write_text(json.dumps({"spiffe_id": WEB + "3", "parent_id": AGENT, "selectors": ["unix:uid:3"],
                                 "dns_names": ["three.example"]}) + "\n" + json.dumps(
        {"spiffe_id": WEB + "4", "parent_id": AGENT, "selectors": ["unix:uid:4"], "dns_names": ["*.example"]}) + "\n")
    bad = keyseal("create", "--from-file", str(lines))
    assert_one_line_error(bad)
    assert f"{lines} line 2: invalid DNS name '*.example': wildcards are not allowed" in bad.stderr

    # What a server answers agents from (the SQLite database, or the watched Kubernetes objects).
    served = entry_store_for(keyseal.config, keyseal.api_client, serving=True)
    try:
        assert {e.spiffe_id: e.dns_names for e in served.for_agent(AGENT)} == {
            WEB: ("web.shop.example", "web"), WEB + "2": ()}
    finally:
        served.close()


@pytest.mark.parametrize(("name", "message"), [
    ("*.shop.example", "wildcards are not allowed"),
    ("web_1.example", "RFC 1123"),
    ("-web.example", "RFC 1123"),
    ("web..example", "RFC 1123"),
    ("web.example.", "no trailing dot"),
    ("a" * 64 + ".example", "1-63"),
    (".".join(["a" * 63] * 4) + ".x", "at most 253"),
    ("10.0.0.1", "an IP address is not a DNS name"),
    ("0x7f000001", "an IP address is not a DNS name"),  # what a URL parser makes of it: 127.0.0.1
    ("foo.0x10", "an IP address is not a DNS name"),
    ("bücher.example", "xn--"),
    ("", "give a host name"),
])
def test_a_bad_dns_name_is_refused_with_one_line(keyseal: Any, name: str, message: str) -> None:
    result = keyseal("create", "--spiffe-id", WEB, "--parent", AGENT, "--selector", "unix:uid:1", "--dns-name", name)
    assert_one_line_error(result)
    assert message in result.stderr, result.stderr
    assert entry_store_for(keyseal.config, keyseal.api_client).entries() == []


def test_too_many_dns_names_are_refused() -> None:
    store = DirectoryEntryStore(Path("/nonexistent/never-opened.db"), TRUST_DOMAIN)
    with pytest.raises(UsageError, match="at most 32 DNS names"):
        store.check(Entry("", WEB, AGENT, ("unix:uid:1",), dns_names=tuple(f"n{i}.example" for i in range(33))))
    assert check_dns_name("localhost") == "localhost"  # one label is a host name too
    assert check_dns_name("xn--bcher-kva.example") == "xn--bcher-kva.example"


OLD_SCHEMA = """
CREATE TABLE entries (
    entry_id TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, parent_id TEXT NOT NULL, parent_key TEXT NOT NULL,
    selectors TEXT NOT NULL, x509_ttl INTEGER NOT NULL, jwt_ttl INTEGER NOT NULL,
    federates_with TEXT NOT NULL DEFAULT '[]') WITHOUT ROWID;
CREATE INDEX entries_by_parent ON entries (parent_key);
CREATE INDEX entries_by_meaning ON entries (spiffe_id, parent_id, selectors);
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
INSERT INTO meta VALUES ('imported', '1');
"""


def test_a_database_from_before_dns_names_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "keyseal-entries.db"
    with sqlite3.connect(path) as database:  # what the SQLite store wrote before entries had DNS names
        database.executescript(OLD_SCHEMA)
        database.execute("INSERT INTO entries VALUES ('old', ?, ?, ?, '[\"unix:uid:1\"]', 0, 0, '[\"b.example\"]')",
                         (f"spiffe://{TRUST_DOMAIN}/old", AGENT, AGENT))
    database.close()
    store = DirectoryEntryStore(path, TRUST_DOMAIN)
    old = Entry("old", f"spiffe://{TRUST_DOMAIN}/old", AGENT, ("unix:uid:1",), federates_with=("b.example",))
    assert store.entries() == [old]
    new = store.create(f"spiffe://{TRUST_DOMAIN}/new", AGENT, ("unix:uid:2",), dns_names=("new.example",))
    with sqlite3.connect(path) as database:
        columns = [row[1] for row in database.execute("PRAGMA table_info(entries)")]
        # What the older keyseal's statements (which name their columns) still read and write.
        database.execute("INSERT INTO entries (entry_id, spiffe_id, parent_id, parent_key, selectors, x509_ttl, "
                         "jwt_ttl, federates_with) VALUES ('older', ?, ?, ?, '[\"unix:uid:3\"]', 0, 0, '[]')",
                         (f"spiffe://{TRUST_DOMAIN}/older", AGENT, AGENT))
    database.close()
    assert columns[-1] == "dns_names"
    again = DirectoryEntryStore(path, TRUST_DOMAIN)  # another process, after a restart
    assert again.get(new.entry_id) == new and new.dns_names == ("new.example",)
    assert again.get("old") == old and again.get("older") is not None and again.get("older").dns_names == ()
    assert [e.entry_id for e in again.for_agent(AGENT)] == sorted(["old", "older", new.entry_id])


def test_an_entry_with_bad_dns_names_written_by_hand_is_never_served(tmp_path: Path) -> None:
    store = entry_store_for(parse_config(base_config(tmp_path)))
    kept = store.create(WEB, AGENT, ("unix:uid:1",), dns_names=("web.example",))
    (path,) = (tmp_path / "store").glob("*-entries.db")
    with sqlite3.connect(path) as database:  # past `keyseal entry create`
        database.execute("INSERT INTO entries (entry_id, spiffe_id, parent_id, parent_key, selectors, x509_ttl, "
                         "jwt_ttl, dns_names) SELECT 'forged', spiffe_id || 'x', parent_id, parent_key, selectors, "
                         "x509_ttl, jwt_ttl, '[\"*.example\"]' FROM entries")
    database.close()
    assert [e.entry_id for e in store.entries()] == sorted([kept.entry_id, "forged"])
    assert [e.entry_id for e in store.for_agent(AGENT)] == [kept.entry_id]
    assert store.get("forged") is None


def test_entries_that_differ_in_dns_names_only_have_other_revisions() -> None:
    entry = Entry("e1", WEB, AGENT, ("unix:uid:1",))
    assert entries_digest([entry]) != entries_digest([replace(entry, dns_names=("web.example",))])
    assert entry.to_json() == {"entry_id": "e1", "spiffe_id": WEB, "parent_id": AGENT, "selectors": ["unix:uid:1"],
                               "x509_ttl": 0, "jwt_ttl": 0}  # an entry without names digests as it always did


# -- issuance ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CaServer]:
    server = start_server(tmp_path_factory.mktemp("dns"))
    yield server
    server.shutdown()


def join(server: CaServer, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    token, _ = join_tokens_for(server.config).issue(name, timedelta(minutes=5))
    key = new_key()
    status, answer = agent_call(server, None, "/v1/agent/join", {"token": token, "csr": make_csr(key)})
    assert status == 200, answer
    return key, x509.load_pem_x509_certificate(answer["certChain"][0].encode())


def openssl(tmp_path: Path, server: CaServer, leaf_pem: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "ca.pem").write_text("".join(k.ca_pem for k, _ in server.manager.live()))
    (tmp_path / "leaf.pem").write_text(leaf_pem)
    return subprocess.run(["openssl", *args, str(tmp_path / "leaf.pem")], capture_output=True, text=True,
                          timeout=60, check=False)


def test_an_svid_carries_the_entrys_dns_names_after_its_uri(server: CaServer, tmp_path: Path) -> None:
    identity = join(server, "node-dns")
    parent = f"spiffe://{TRUST_DOMAIN}/keyseal/agent/node-dns"
    store = entry_store_for(server.config)
    entry = store.create(WEB, parent, ("unix:uid:1001",), dns_names=("web.shop.example", "web.shop.svc"))
    status, synced = agent_call(server, identity, "/v1/agent/sync", {})
    assert status == 200 and synced["entries"] == [entry.to_json()], synced
    assert synced["entries"][0]["dns_names"] == ["web.shop.example", "web.shop.svc"]

    status, answer = agent_call(server, identity, "/v1/agent/x509-svid",
                                {"entryID": entry.entry_id, "csr": make_csr(new_key())})
    assert status == 200, answer
    leaf = x509.load_pem_x509_certificate(answer["certChain"][0].encode())
    names = list(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    assert names == [x509.UniformResourceIdentifier(WEB), x509.DNSName("web.shop.example"),
                     x509.DNSName("web.shop.svc")]

    text = openssl(tmp_path, server, answer["certChain"][0], "x509", "-noout", "-text", "-in")
    assert text.returncode == 0, text.stderr
    assert f"URI:{WEB}, DNS:web.shop.example, DNS:web.shop.svc" in text.stdout, text.stdout
    verify = ["verify", "-x509_strict", "-purpose", "sslserver", "-CAfile", str(tmp_path / "ca.pem")]
    ok = openssl(tmp_path, server, answer["certChain"][0], *verify, "-verify_hostname", "web.shop.svc")
    assert ok.returncode == 0 and ok.stdout.strip().endswith(": OK"), ok.stdout + ok.stderr
    other = openssl(tmp_path, server, answer["certChain"][0], *verify, "-verify_hostname", "db.shop.svc")
    assert other.returncode != 0 and "hostname mismatch" in other.stdout + other.stderr

    # JWT-SVIDs are unaffected; an entry without names still gets a leaf with the URI SAN alone.
    status, jwt_answer = agent_call(server, identity, "/v1/agent/jwt-svid",
                                    {"entryID": entry.entry_id, "audience": ["db"]})
    assert status == 200 and jwt_answer["spiffeID"] == WEB
    plain = store.create(WEB + "-plain", parent, ("unix:uid:1002",))
    status, answer = agent_call(server, identity, "/v1/agent/x509-svid",
                                {"entryID": plain.entry_id, "csr": make_csr(new_key())})
    leaf = x509.load_pem_x509_certificate(answer["certChain"][0].encode())
    assert list(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == [
        x509.UniformResourceIdentifier(WEB + "-plain")]


def test_the_incremental_sync_and_the_agent_follow_a_change_of_dns_names(server: CaServer) -> None:
    """A change of an entry's names alone (what an IdentityTemplate's reconciler writes) changes the agent's
    revision: its next incremental sync gets the entry, and its cache fetches an SVID with the new names."""
    from keyseal._internal.agent.cache import AgentCache
    from keyseal._internal.agent.client import ServerClient

    key, certificate = join(server, "node-inc")
    parent = f"spiffe://{TRUST_DOMAIN}/keyseal/agent/node-inc"
    entry = entry_store_for(server.config).create(WEB, parent, ("unix:uid:7",), dns_names=("one.example",))
    client = ServerClient("127.0.0.1", server.port, "".join(k.ca_pem for k, _ in server.manager.live()))
    client.set_identity(key, certificate)
    cache = AgentCache(client, TRUST_DOMAIN)
    try:
        cache.sync()
        assert cache.server_reachable and cache.revision is not None
        assert _dns_sans(cache.x509[entry.entry_id].chain_der) == ["one.example"]
        revision = cache.revision
        (path,) = server.config.store_path.glob("*-entries.db")
        with sqlite3.connect(path) as database:  # the entry's names change, nothing else
            database.execute("UPDATE entries SET dns_names = '[\"two.example\"]' WHERE entry_id = ?",
                             (entry.entry_id,))
        database.close()
        cache.sync()
        assert cache.revision != revision
        assert cache.entries[0].dns_names == ("two.example",)
        assert _dns_sans(cache.x509[entry.entry_id].chain_der) == ["two.example"]
    finally:
        client.close()


def _dns_sans(chain_der: bytes) -> list[str]:
    leaf = x509.load_der_x509_certificate(chain_der)  # the chain is the leaf alone
    return list(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                .get_values_for_type(x509.DNSName))


@pytest.mark.parametrize("name", [
    "web", "web.shop.svc", "Web.Example.org", "xn--bcher-kva.example", "a-b.c-d.example", "a" * 63 + ".example",
    "*.shop.example", "web_1.example", "-web.example", "web-.example", "web..example", "web.example.", "a" * 64,
    "bücher.example", "10.0.0.1", "foo.0x10",
])
def test_the_entry_crd_stores_every_dns_name_keyseal_takes(name: str) -> None:
    """The RegistrationEntry CRD's pattern takes every name keyseal takes (the reconciler's writes must be stored)
    and refuses wildcards and malformed names; it is looser only for names whose last label is a number (all
    digits, or 0x and hex: an IPv4 address to a URL parser), which keyseal refuses when it reads the entry (never
    served)."""
    import re

    crd = yaml.safe_load((Path(__file__).parent.parent / "deploy" / "crds" /
                          "registrationentries.keyseal.dev.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "dnsNames"]["items"]
    by_crd = re.search(schema["pattern"], name) is not None and len(name) <= schema["maxLength"]
    try:
        check_dns_name(name)
        by_keyseal = True
    except UsageError:
        by_keyseal = False
    last = name.rsplit(".", 1)[-1]
    assert by_crd == by_keyseal or (by_crd and (last.isdigit() or last.startswith("0x")))


def workload_named_localhost(server: CaServer, node: str, uid: int) -> tuple[str, ec.EllipticCurvePrivateKey, str]:
    """A workload SVID whose entry gives it the server's DNS name (`localhost`): its chain (PEM), its key and the
    agent that holds it."""
    identity = join(server, node)
    parent = f"spiffe://{TRUST_DOMAIN}/keyseal/agent/{node}"
    entry = entry_store_for(server.config).create(f"{WEB}-{node}", parent, (f"unix:uid:{uid}",),
                                                  dns_names=("localhost",))
    key = new_key()
    status, answer = agent_call(server, identity, "/v1/agent/x509-svid",
                                {"entryID": entry.entry_id, "csr": make_csr(key)})
    assert status == 200, answer
    return answer["certChain"][0], key, parent


@contextlib.contextmanager
def impostor(chain: str, key: ec.EllipticCurvePrivateKey, get: bytes = b"", post: bytes = b"") -> Iterator[
        tuple[int, list[bytes]]]:
    """An HTTPS server on 127.0.0.1 presenting a workload's SVID, answering every GET with `get` and every POST
    with `post`; yields its port and the POST bodies it received."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from keyseal._internal.spiffe.tls import load_chain

    received: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def answer(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self.answer(get)

        def do_POST(self) -> None:
            received.append(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            self.answer(post)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    load_chain(context, chain.encode(), key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], received
    finally:
        server.shutdown()
        server.server_close()


def test_a_workload_svid_with_the_servers_dns_name_does_not_pass_for_the_server(server: CaServer) -> None:
    """The server's self-issued certificate is an X.509-SVID of the trust domain's CA naming `localhost` (its
    default), and an agent checks the server by host name against that CA. An entry may now give a workload that
    same name: the agent must not take the workload's SVID for the server's, or the workload, answering for the
    server's address, would be handed the agent's join token (or projected service account token)."""
    from keyseal._internal.agent.client import ServerClient, ServerRefusedError
    from keyseal.errors import BackendUnavailableError

    chain, key, parent = workload_named_localhost(server, "node-rogue", 1003)
    bundle = "".join(k.ca_pem for k, _ in server.manager.live())
    with impostor(chain, key, post=json.dumps({"spiffeID": parent}).encode()) as (port, received):
        client = ServerClient("localhost", port, bundle)
        real = ServerClient("localhost", server.port, bundle)
        try:
            with pytest.raises(BackendUnavailableError, match="not the keyseal server's"):
                client.call("/v1/agent/join", {"token": "a-secret-join-token", "csr": make_csr(new_key())})
            assert received == []  # nothing was sent to it, the token least of all
            # The real server, by the same name, is taken: its answer (a refusal of the unknown token) is heard.
            with pytest.raises(ServerRefusedError) as refused:
                real.call("/v1/agent/join", {"token": "a-secret-join-token", "csr": make_csr(new_key())})
            assert refused.value.status == 401
        finally:
            client.close()
            real.close()


def test_bundle_fetch_takes_the_whole_bundle_only_from_the_server_itself(server: CaServer) -> None:
    """`keyseal bundle fetch` trusts the whole served bundle only when its second, verified fetch reaches the
    server. A workload whose entry gives it the server's name (`localhost`) holds an SVID that passes the host
    name check against the pinned CA: answering for the server, it must not get a CA of its own into the bundle
    (the fetch falls back to the pinned CA alone)."""
    import base64
    from datetime import UTC, datetime

    from cryptography.hazmat.primitives import hashes, serialization

    from keyseal._internal.spiffe.bootstrap import ca_fingerprint, fetch_bundle

    chain, key, _ = workload_named_localhost(server, "node-bundle", 1004)
    real = [x509.load_pem_x509_certificate(k.ca_pem.encode()) for k, _ in server.manager.live()]
    attacker_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "attacker CA")])
    now = datetime.now(UTC)
    attacker = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(attacker_key.public_key())
                .serial_number(7).not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(attacker_key, hashes.SHA256()))
    document = {"keys": [{"use": "x509-svid", "x5c": [base64.b64encode(c.public_bytes(serialization.Encoding.DER))
                                                      .decode()]} for c in (*real, attacker)]}
    with impostor(chain, key, get=json.dumps(document).encode()) as (port, _):
        fetched = fetch_bundle(f"https://localhost:{port}", ca_fingerprint(real[0]))
    from_the_server = fetch_bundle(f"https://localhost:{server.port}", ca_fingerprint(real[0]))
    assert not fetched.whole_bundle and fetched.certificates == (fetched.pinned,)
    assert ca_fingerprint(attacker) not in {ca_fingerprint(c) for c in fetched.certificates}
    assert from_the_server.whole_bundle  # the server itself is still believed for the whole bundle

"""SPIFFE Federation between two keyseal trust domains (docs/federation.md): each server serves its bundle at a
bundle endpoint and fetches the other's over https_spiffe (bootstrapped from a bundle file); an entry that
federates with the other trust domain gets its bundle through the node agent, so workloads of the two trust
domains authenticate each other with mutual TLS (py-spiffe X509Source; python ssl), across CA rotations in
both. And what a federation client must refuse: a bundle for another trust domain, a sequence that goes back,
an endpoint with another SPIFFE ID; the last good bundle is kept when an endpoint fails."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import JwtSvid, TrustDomain, WorkloadApiClient, X509Source

from keyseal._internal.agent.config import parse_agent_config
from keyseal._internal.agent.main import Agent
from keyseal._internal.ca.config import parse_config
from keyseal._internal.ca.registry.stores import entry_store_for, join_tokens_for
from keyseal._internal.ca.server import CaServer
from keyseal._internal.spiffe.tls import load_chain
from tests.harness.agent import socket_dir
from tests.harness.ca import base_config, wait_for

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

ME = f"unix:uid:{os.getuid()}"
A, B = "a.example", "b.example"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Domain:
    name: str
    tmp: Path
    port: int  # its federation bundle endpoint
    server: CaServer | None = None
    agent: Agent | None = None
    socket: Path | None = None

    @property
    def endpoint_id(self) -> str:
        return f"spiffe://{self.name}/keyseal/server"

    @property
    def bundle_file(self) -> Path:
        return self.tmp / "bootstrap-bundle.json"

    def config(self, peers: list[Domain], **overrides: Any) -> dict[str, Any]:
        federation: dict[str, Any] = {"listen": f"127.0.0.1:{self.port}", "trustDomains": [
            {"trustDomain": p.name, "bundleEndpointURL": f"https://127.0.0.1:{p.port}/", "profile": "https_spiffe",
             "endpointSPIFFEID": p.endpoint_id, "bundleFile": str(p.bundle_file)} for p in peers],
            **overrides.pop("federation", {})}
        return base_config(self.tmp, trustDomain=self.name, federation=federation, **overrides)

    def start(self, peers: list[Domain], serve: bool = True, **overrides: Any) -> CaServer:
        self.server = CaServer(parse_config(self.config(peers, **overrides)), rotation_thread=False)
        self.server.start()
        if serve:
            self.server.start_background()
        return self.server

    def write_bundle(self) -> None:
        assert self.server is not None
        self.bundle_file.write_bytes(self.server.api.bundle()[1])

    def start_agent(self) -> Agent:
        assert self.server is not None
        config = self.server.config
        token, _ = join_tokens_for(config).issue("node-1", timedelta(minutes=5))
        (self.tmp / "agent-bundle.pem").write_text("".join(k.ca_pem for k, _ in self.server.manager.live()))
        self.socket = socket_dir() / "agent.sock"
        self.agent = Agent(parse_agent_config({
            "trustDomain": self.name, "serverURL": f"https://127.0.0.1:{self.server.port}",
            "trustBundleFile": str(self.tmp / "agent-bundle.pem"), "joinToken": token,
            "socketPath": str(self.socket), "socketMode": "0600", "syncInterval": 0.2}, environ={}))
        self.agent.start()
        return self.agent

    def entry(self, path: str, federates_with: tuple[str, ...]) -> str:
        assert self.server is not None
        return entry_store_for(self.server.config).create(
            f"spiffe://{self.name}{path}", f"spiffe://{self.name}/keyseal/agent/node-1", (ME,), 0, 0,
            federates_with).spiffe_id

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            assert self.socket is not None
            shutil.rmtree(self.socket.parent, ignore_errors=True)
            self.agent = None
        if self.server is not None:
            self.server.shutdown()
            self.server = None


@pytest.fixture
def domains(tmp_path: Path) -> Iterator[tuple[Domain, Domain]]:
    a, b = Domain(A, tmp_path / "a", free_port()), Domain(B, tmp_path / "b", free_port())
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def bootstrap(a: Domain, b: Domain, **overrides: Any) -> None:
    """Each trust domain's bundle, obtained once out of band (here: from a first start), for the other."""
    for domain in (a, b):
        domain.start([], serve=False, **overrides)
        domain.write_bundle()
        domain.stop()


# -- mutual TLS between workloads of the two trust domains --------------------------------------------------


def _context(source: X509Source, peer_domain: str, server_side: bool) -> ssl.SSLContext:
    """What spiffe-tls builds: present the workload's X.509-SVID, trust only the peer trust domain's bundle as
    the Workload API handed it (federated_bundles), and no host names (SPIFFE IDs are checked instead)."""
    svid = source.get_x509_context().default_svid
    bundle = source.get_bundle_for_trust_domain(TrustDomain(peer_domain))
    assert bundle is not None, f"no bundle for {peer_domain} in the workload's X.509 context"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata="".join(c.public_bytes(serialization.Encoding.PEM).decode()
                                                 for c in bundle.x509_authorities))
    load_chain(context, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.cert_chain),
               svid.private_key)  # type: ignore[arg-type]
    return context


def _peer_id(tls: ssl.SSLSocket) -> str:
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    names = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    uris = names.value.get_values_for_type(x509.UniformResourceIdentifier)
    assert len(uris) == 1
    return str(uris[0])


def mtls(server: X509Source, server_domain: str, server_id: str,
         client: X509Source, client_domain: str, client_id: str) -> None:
    """One mutually authenticated exchange; each side authorizes the other's SPIFFE ID."""
    server_context = _context(server, client_domain, True)
    client_context = _context(client, server_domain, False)
    left, right = socket.socketpair()
    seen: dict[str, Any] = {}

    def serve() -> None:
        try:
            with server_context.wrap_socket(left, server_side=True) as tls:
                seen["client"] = _peer_id(tls)
                if seen["client"] == client_id:
                    tls.sendall(b"hello " + tls.recv(64))
        except Exception as exc:
            seen["error"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_context.wrap_socket(right) as tls:
            assert _peer_id(tls) == server_id
            tls.sendall(b"from " + client_id.encode())
            assert tls.recv(200) == b"hello from " + client_id.encode()
    finally:
        thread.join(10)
        left.close()
        right.close()
    assert "error" not in seen, seen
    assert seen["client"] == client_id


def test_workloads_of_two_federated_trust_domains_connect_across_rotations(domains: tuple[Domain, Domain]) -> None:
    a, b = domains
    # Short CA lifetimes so that each trust domain rotates within the test (keyset n+1 published at 15 s,
    # active at 25 s: twice the bounded federation refresh before it signs anything).
    short = {"ca": {"ttl": "30s"}, "x509SVID": {"ttl": "5s"}, "jwtSVID": {"ttl": "5s"},
             "bundle": {"refreshHint": "5s"}}
    bootstrap(a, b, **short)
    a.start([b], **short)
    b.start([a], **short)
    stop = threading.Event()

    def rotation() -> None:  # both servers' rotation loops, at test speed
        while not stop.wait(0.2):
            for domain in (a, b):
                if domain.server is not None:
                    domain.server.tick()

    ticker = threading.Thread(target=rotation, daemon=True)
    ticker.start()
    sources: list[X509Source] = []
    try:
        assert a.server is not None and b.server is not None
        a.start_agent()
        b.start_agent()
        web = a.entry("/web", (B,))
        api = b.entry("/api", (A,))
        for domain in (a, b):
            assert domain.agent is not None
            domain.agent.cache.sync()
            wait_for(lambda d=domain: bool(d.agent and d.agent.cache.federated), timeout=20)
        source_a = X509Source(socket_path=f"unix:{a.socket}", timeout_in_seconds=10)
        sources.append(source_a)
        source_b = X509Source(socket_path=f"unix:{b.socket}", timeout_in_seconds=10)
        sources.append(source_b)
        assert str(source_a.get_x509_context().default_svid.spiffe_id) == web
        assert str(source_b.get_x509_context().default_svid.spiffe_id) == api
        mtls(source_a, A, web, source_b, B, api)
        mtls(source_b, B, api, source_a, A, web)

        first = {d.name: d.server.manager.active().number for d in (a, b) if d.server is not None}
        deadline = time.monotonic() + 60
        rotated: set[str] = set()
        connections = 0
        while rotated != {A, B}:  # connect over and over while both trust domains rotate
            assert time.monotonic() < deadline, f"rotated only {rotated}"
            mtls(source_a, A, web, source_b, B, api)
            mtls(source_b, B, api, source_a, A, web)
            connections += 2
            for domain in (a, b):
                assert domain.server is not None
                if domain.server.manager.active().number > first[domain.name]:
                    rotated.add(domain.name)
            time.sleep(0.25)
        # once each workload holds an SVID from the new CA, the peer still accepts it
        for domain, source in ((a, source_a), (b, source_b)):
            assert domain.server is not None
            active = domain.server.manager.active()
            wait_for(lambda s=source, k=active: s.get_x509_context().default_svid.leaf.issuer
                     == k.ca_certificate.subject, timeout=15)
        mtls(source_a, A, web, source_b, B, api)
        mtls(source_b, B, api, source_a, A, web)
        assert connections > 20

        # JWT-SVIDs too: a workload of A validates B's token with the JWT bundle the Workload API gave it.
        with WorkloadApiClient(f"unix:{a.socket}", default_timeout=10) as client_a, \
                WorkloadApiClient(f"unix:{b.socket}", default_timeout=10) as client_b:
            token = client_b.fetch_jwt_svid({"a-service"}).token
            jwt_bundles = client_a.fetch_jwt_bundles()
            foreign_keys = jwt_bundles.get_bundle_for_trust_domain(TrustDomain(B))
            assert foreign_keys is not None
            assert str(JwtSvid.parse_and_validate(token, foreign_keys, {"a-service"}).spiffe_id) == api
            # ... and the agent's ValidateJWTSVID checks it with the federated JWT bundle the caller may use
            assert str(client_a.validate_jwt_svid(token, "a-service").spiffe_id) == api
            with pytest.raises(Exception, match=r"(?i)audience"):
                client_a.validate_jwt_svid(token, "another-service")

        # https_spiffe trusts the latest bundle it fetched: B now serves its endpoint under its new CA, which the
        # bootstrap bundle does not hold; A goes on fetching (with B's newer bundle), also after a restart.
        assert a.server is not None and b.server is not None
        rotated_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        wait_for(lambda: (a.server.federation.status()[0]["lastSuccess"] or "") > rotated_at, timeout=15)
        held = a.server.federation.bundle(B)
        assert held is not None and held.sequence > json.loads(b.bundle_file.read_text())["spiffe_sequence"]
        from keyseal._internal.ca.config import ForeignTrustDomain
        from keyseal._internal.ca.federation import FederatedBundles

        only_bootstrap = FederatedBundles((ForeignTrustDomain(B, f"https://127.0.0.1:{b.port}/", "https_spiffe",
                                                              b.endpoint_id, b.bundle_file),))
        assert only_bootstrap.refresh(B) is False
        assert "CERTIFICATE_VERIFY_FAILED" in only_bootstrap.status()[0]["lastError"]
        assert a.agent is not None
        a.agent.stop()
        a.agent = None
        a.server.shutdown()
        restarted = a.start([b], **short)
        again = restarted.federation.bundle(B)
        assert again is not None and again.sequence >= held.sequence  # from the store, not the bootstrap file
        assert restarted.federation.refresh(B) in (True, False) and restarted.federation.status()[0]["lastError"] \
            is None
    finally:
        for source in sources:
            source.close()
        stop.set()
        ticker.join(10)


# -- what the federation client refuses, and what it keeps ----------------------------------------------------


def foreign(name: str, url: str, *, profile: str = "https_spiffe", endpoint: str | None = None,
            bundle_file: Path | None = None, ca_file: Path | None = None) -> Any:
    from keyseal._internal.ca.config import ForeignTrustDomain

    return ForeignTrustDomain(name, url, profile, endpoint, bundle_file, ca_file)  # type: ignore[arg-type]


def test_federation_client_refuses_and_keeps_the_last_good_bundle(domains: tuple[Domain, Domain],
                                                                   tmp_path: Path) -> None:
    from keyseal._internal.ca.custody.pin_store import DirectoryPinStore
    from keyseal._internal.ca.federation import MIN_REFRESH, FederatedBundles
    from keyseal.errors import InputError

    a, b = domains
    bootstrap(a, b, bundle={"refreshHint": "1s"}, ca={"ttl": "24h"})
    server_b = b.start([], bundle={"refreshHint": "1s"}, ca={"ttl": "24h"})
    url = f"https://127.0.0.1:{b.port}/"
    served = json.loads(server_b.api.bundle()[1])

    good = FederatedBundles((foreign(B, url, endpoint=b.endpoint_id, bundle_file=b.bundle_file),),
                            DirectoryPinStore(tmp_path, "federated"))
    assert good.refresh(B) is False  # the same bundle as the bootstrap one: nothing new to take
    row = good.status()[0]
    assert row["lastError"] is None and row["sequence"] == served["spiffe_sequence"] and row["lastSuccess"]
    next_fetch = good._states[B].next_fetch - time.monotonic()
    assert MIN_REFRESH - 1 < next_fetch <= MIN_REFRESH  # a 1 s hint is bounded below

    impostor = FederatedBundles((foreign(B, url, endpoint=f"spiffe://{B}/not-the-endpoint",
                                         bundle_file=b.bundle_file),))
    assert impostor.refresh(B) is False
    assert "presented ['spiffe://b.example/keyseal/server'], not spiffe://b.example/not-the-endpoint" in \
        impostor.status()[0]["lastError"]

    ahead = tmp_path / "ahead.json"
    ahead.write_text(json.dumps({**served, "spiffe_sequence": 10**6}))
    backwards = FederatedBundles((foreign(B, url, endpoint=b.endpoint_id, bundle_file=ahead),))
    assert backwards.refresh(B) is False
    assert "went back from sequence 1000000" in backwards.status()[0]["lastError"]
    assert backwards.bundle(B) is not None and backwards.bundle(B).sequence == 10**6  # type: ignore[union-attr]

    with pytest.raises(InputError, match="wrong trust domain"):  # B's bundle offered as another trust domain's
        FederatedBundles((foreign("c.example", url, endpoint="spiffe://c.example/keyseal/server",
                                  bundle_file=b.bundle_file),))

    # The endpoint goes away: the last good bundle stays, the failure shows in the status and the metrics.
    b.stop()
    assert good.refresh(B) is False
    row = good.status()[0]
    assert row["failures"] == 1 and "cannot fetch the bundle of b.example" in row["lastError"]
    assert good.bundle(B) is not None and good.bundle(B).sequence == served["spiffe_sequence"]  # type: ignore[union-attr]
    lines = "\n".join(good.metrics_lines())
    assert f'keyseal_federated_bundle_refresh_failures{{trust_domain="{B}"}} 1' in lines
    assert f'keyseal_federated_bundle_last_refresh_timestamp_seconds{{trust_domain="{B}"}} 0' not in lines


def test_https_web_profile_and_a_bundle_for_the_wrong_trust_domain(domains: tuple[Domain, Domain],
                                                                    tmp_path: Path) -> None:
    from keyseal._internal.ca.federation import FederatedBundles
    from tests.harness.https_server import make_tls

    a, b = domains
    web = make_tls(tmp_path / "web", ["127.0.0.1"], ca_name="web PKI test CA")
    bootstrap(a, b)
    b.start([], federation={"listen": f"127.0.0.1:{b.port}",
                            "tls": {"certFile": str(web.cert_pem), "keyFile": str(web.key_pem)}})
    url = f"https://127.0.0.1:{b.port}/"
    fetched = FederatedBundles((foreign(B, url, profile="https_web", ca_file=web.ca_pem),))
    assert fetched.bundle(B) is None  # https_web needs no bootstrap bundle
    assert fetched.refresh(B) is True and fetched.bundle(B) is not None
    untrusted = FederatedBundles((foreign(B, url, profile="https_web"),))  # the system's roots do not know it
    assert untrusted.refresh(B) is False and "CERTIFICATE_VERIFY_FAILED" in untrusted.status()[0]["lastError"]
    wrong = FederatedBundles((foreign("c.example", url, profile="https_web", ca_file=web.ca_pem),))
    assert wrong.refresh("c.example") is False
    assert "a bundle for the wrong trust domain" in wrong.status()[0]["lastError"]
    assert wrong.bundle("c.example") is None


def test_server_reports_federation_status_metrics_and_the_cli_shows_it(domains: tuple[Domain, Domain],
                                                                       tmp_path: Path) -> None:
    from click.testing import CliRunner

    from keyseal._internal.cli.federation import federation
    from tests.harness.ca import Client

    a, b = domains
    bootstrap(a, b)
    b.start([])
    server_a = a.start([b])
    wait_for(lambda: server_a.federation.status()[0]["lastSuccess"] is not None, timeout=20)
    a.write_bundle()
    client = Client(server_a.port, "".join(k.ca_pem for k, _ in server_a.manager.live()))
    try:
        status, body, _ = client.request("GET", "/v1/federation")
        assert status == 200 and body["federatedBundles"][0]["trustDomain"] == B
        status, metrics, _ = client.request("GET", "/metrics")
        assert f'keyseal_federated_bundle_sequence{{trust_domain="{B}"}}' in metrics
    finally:
        client.close()
    result = CliRunner().invoke(federation, ["--server", f"https://127.0.0.1:{server_a.port}",
                                             "--ca-file", str(a.bundle_file)])
    assert result.exit_code == 0, result.output
    assert f"{B}  profile=https_spiffe" in result.output and "s ago)" in result.output
    # Its own bundle endpoint serves the bundle at / only, publicly.
    context = ssl.create_default_context(cadata="".join(k.ca_pem for k, _ in server_a.manager.live()))
    import urllib.error
    import urllib.request
    with urllib.request.urlopen(f"https://127.0.0.1:{a.port}/", timeout=10, context=context) as answer:
        assert json.loads(answer.read()) == json.loads(server_a.api.bundle()[1])
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"https://127.0.0.1:{a.port}/v1/x509-svid", timeout=10, context=context)


def test_entries_name_the_trust_domains_they_federate_with(tmp_path: Path) -> None:
    import yaml
    from click.testing import CliRunner

    from keyseal._internal.cli.entry import entry
    from keyseal.errors import UsageError

    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(base_config(tmp_path, trustDomain=A)))
    agent = f"spiffe://{A}/keyseal/agent/node-1"
    result = CliRunner().invoke(entry, ["create", "--config", str(config_file), "--spiffe-id", f"spiffe://{A}/w",
                                        "--parent", agent, "--selector", ME, "--federates-with", B,
                                        "--federates-with", "c.example"])
    assert result.exit_code == 0, result.output
    listed = CliRunner().invoke(entry, ["list", "--config", str(config_file)])
    assert f"federatesWith=c.example,{B}" in listed.output or f"federatesWith={B},c.example" in listed.output
    store = entry_store_for(parse_config(base_config(tmp_path, trustDomain=A)))
    assert store.entries()[0].federates_with == (B, "c.example")
    with pytest.raises(UsageError, match="own trust domain"):
        store.create(f"spiffe://{A}/x", agent, (ME,), 0, 0, (A,))
    with pytest.raises(Exception, match="invalid trust domain"):
        store.create(f"spiffe://{A}/x", agent, (ME,), 0, 0, ("Not A Domain",))


def test_a_federated_bundle_update_reaches_an_agent_holding_the_old_revision(domains: tuple[Domain, Domain]) -> None:
    """An incremental sync's revision covers, in its bundle part, the foreign bundles the agent's entries federate
    with: when the server takes a newer bundle of a federated trust domain, an agent that syncs with the revision
    from before gets it (and not its unchanged entries)."""
    from tests.harness.agent import agent_call
    from tests.harness.ca import make_csr, new_key

    a, b = domains
    bootstrap(a, b)
    server_a = a.start([b])
    b.start([a])
    a.entry("/web", (B,))
    token, _ = join_tokens_for(server_a.config).issue("node-1", timedelta(minutes=5))
    key = new_key()
    status, joined = agent_call(server_a, None, "/v1/agent/join", {"token": token, "csr": make_csr(key)})
    assert status == 200, joined
    identity = (key, x509.load_pem_x509_certificate(joined["certChain"][0].encode()))

    def sync(document: dict[str, Any]) -> dict[str, Any]:
        status, answer = agent_call(server_a, identity, "/v1/agent/sync", document)
        assert status == 200, answer
        assert isinstance(answer, dict)
        return answer

    first = sync({})
    sequence = first["federatedBundles"][B]["spiffe_sequence"]
    revision = first["revision"]
    assert sync({"revision": revision}).keys() == {"agentID", "revision"}

    # B publishes another bundle (a new refresh hint: a new document with a higher sequence) and A fetches it.
    b.stop()
    b.start([a], bundle={"refreshHint": "7s"})
    assert server_a.federation.refresh(B) is True
    answer = sync({"revision": revision})
    assert answer["revision"] != revision and "entries" not in answer
    assert answer["federatedBundles"][B]["spiffe_sequence"] > sequence
    assert answer["federatedBundles"][B]["spiffe_refresh_hint"] == 7
    assert sync({"revision": answer["revision"]}).keys() == {"agentID", "revision"}


@pytest.mark.parametrize(("federation", "message"), [
    ({"trustDomains": [{"trustDomain": B, "bundleEndpointURL": "https://b/", "profile": "https_spiffe"}]},
     "needs endpointSPIFFEID"),
    ({"trustDomains": [{"trustDomain": B, "bundleEndpointURL": "http://b/", "profile": "https_web"}]},
     "must be an https URL"),
    ({"trustDomains": [{"trustDomain": B, "bundleEndpointURL": "https://b/", "profile": "https_spiffe",
                        "endpointSPIFFEID": "spiffe://c.example/s", "bundleFile": "f"}]}, "is not in trust domain"),
    ({"trustDomains": [{"trustDomain": A, "bundleEndpointURL": "https://b/", "profile": "https_web"}]},
     "own trust domain"),
    ({"trustDomains": [{"trustDomain": B, "bundleEndpointURL": "https://b/", "profile": "ftp"}]}, "is not one of"),
    ({"listen": "127.0.0.1:1", "tls": {"certFile": "c"}}, "go together"),
])
def test_federation_configuration_mistakes_are_refused(tmp_path: Path, federation: dict[str, Any],
                                                       message: str) -> None:
    from keyseal.errors import UsageError

    with pytest.raises(UsageError, match=message):
        parse_config(base_config(tmp_path, trustDomain=A, federation=federation))


def test_a_trickling_bundle_endpoint_is_cut_at_one_deadline(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A byte every 0.25 s keeps every single read under the socket timeout: only one deadline for the whole
    fetch stops it, so one slow foreign endpoint cannot hold up the other trust domains (one thread)."""
    import time

    import keyseal._internal.ca.federation as federation_module
    from keyseal._internal.ca.federation import FederatedBundles
    from tests.harness.https_server import HttpsServer, Override, make_tls

    monkeypatch.setattr(federation_module, "TIMEOUT", 1.5)
    web = make_tls(tmp_path / "web", ["127.0.0.1"], ca_name="web PKI test CA")
    (tmp_path / "site").mkdir()
    slow = HttpsServer(tmp_path / "site", web).start()
    try:
        for part in ("headers", "body"):
            slow.overrides["/bundle"] = Override(body=b"{" + b" " * 80 + b"}", trickle=part,  # type: ignore[arg-type]
                                                 interval=0.25)
            fetched = FederatedBundles((foreign(B, f"https://127.0.0.1:{slow.port}/bundle", profile="https_web",
                                                ca_file=web.ca_pem),))
            started = time.monotonic()
            assert fetched.refresh(B) is False
            elapsed = time.monotonic() - started
            assert elapsed < 1.5 + 1.0, (part, elapsed)
            assert "within 1.5 s" in fetched.status()[0]["lastError"], fetched.status()
    finally:
        slow.stop()

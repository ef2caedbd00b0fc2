"""SVIDs per second over HTTPS (keep-alive) from keyseal's trust-domain server, against the in-process rate of
building and signing the same certificate with `cryptography`. Target: ratio >= 0.5.

The server runs as `keyseal server` in a child process on 127.0.0.1 (as deployed: wrapped custody, local KEK,
directory store in a temporary directory, ec-p256 CA key); with --in-process it runs in this process instead
(then client and server share one interpreter lock). Clients are `http.client` connections over TLS that stay
open. Baseline: the same leaf (same extensions, same CA key) built and signed in a loop, nothing else; the
child server's CA key is not reachable from here, so the baseline uses an in-process server's keyset of the same
type. X.509 requests reuse one CSR (the server remembers verified CSRs); the "fresh CSR" row sends a different
CSR each time (a signature check per request). JWT-SVIDs are reported the same way.

Usage: python benchmarks/svid_issuance.py [--svids 2000] [--rounds 3] [--connections 1,4] [--in-process]
Each figure is the best of N rounds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.harness.ca: the test client
sys.path.insert(0, str(ROOT / "src"))

TOKEN = "benchmark-token-0123456789abcdef"
SPIFFE_ID = "spiffe://example.org/ns/bench/workload"


def best(rounds: int, run: Callable[[], float]) -> float:
    return max(run() for _ in range(rounds))


def timed(count: int, connections: int, work: Callable[[int], None]) -> float:
    """Run `work(n)` for n in range(count), split across `connections` threads; SVIDs per second."""
    chunks = [range(i, count, connections) for i in range(connections)]
    errors: list[BaseException] = []

    def loop(chunk: range) -> None:
        try:
            for n in chunk:
                work(n)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(chunk,)) for chunk in chunks]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return count / elapsed


def plain_leaf(keyset: Any, public_key: Any, now: datetime) -> Any:
    """The baseline: the same leaf keyseal issues, built and signed with `cryptography` directly."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keyseal")]))
        .issuer_name(keyset.ca_certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(seconds=10))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SPIFFE_ID)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            keyset.subject_key_identifier), critical=False)
        .sign(keyset.x509_key.builder_key(), hashes.SHA256())
    )


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_child(config: dict[str, object], work: Path) -> tuple[subprocess.Popen[str], int]:
    """`keyseal server --config` in a child process; its port is read from the startup log line."""
    import yaml

    path = work / "server.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, KEYSEAL_HOME=str(work / "home"))
    proc = subprocess.Popen([sys.executable, "-m", "keyseal", "server", "--config", str(path)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    for line in proc.stderr:
        match = re.search(r"serving trust domain \S+ on https://127.0.0.1:(\d+)", line)
        if match:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining its log
            return proc, int(match.group(1))
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("the server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--svids", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", default="1,4", help="comma-separated client connection counts")
    parser.add_argument("--in-process", action="store_true", help="run the server in this process")
    args = parser.parse_args()

    from tests.harness.ca import Client, make_csr, new_key

    from keyseal.ca.config import parse_config
    from keyseal.ca.jwtsvid import issue_jwt_svid
    from keyseal.ca.server import CaServer
    from keyseal.ca.spiffeid import parse_spiffe_id

    work = Path(tempfile.mkdtemp(prefix="keyseal-bench-"))
    os.environ["KEYSEAL_HOME"] = str(work / "home")
    raw_config: dict[str, object] = {
        "trustDomain": "example.org",
        "keyWrapping": {"provider": "local", "local": {"kekFile": str(work / "kek")}},
        "store": {"type": "directory", "directory": {"path": str(work / "store")}},
        "server": {"listen": "127.0.0.1:0"},
        "logLevel": "warning",
        "clients": [{"name": "bench", "tokenSHA256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                     "allowedPathPrefixes": ["/"]}],
    }
    # The in-process server: the baseline's keyset, and the server itself with --in-process.
    local = CaServer(parse_config(raw_config), rotation_thread=False)
    local.start()
    child = None
    if args.in_process:
        local.start_background()
        port = local.port
    else:
        child_config = dict(raw_config, store={"type": "directory", "directory": {"path": str(work / "store2")}},
                            logLevel="info")
        child, port = start_child(child_config, work)

    keyset = local.manager.active()
    spiffe_id = parse_spiffe_id(SPIFFE_ID)
    leaf_key = new_key()
    x509_body = json.dumps({"spiffeID": SPIFFE_ID, "csr": make_csr(leaf_key)}).encode()
    jwt_body = json.dumps({"spiffeID": SPIFFE_ID, "audience": ["bench"]}).encode()
    count = args.svids
    fresh = [json.dumps({"spiffeID": SPIFFE_ID, "csr": make_csr()}).encode() for _ in range(count)]
    now = datetime.now(UTC)

    def in_process_x509() -> float:
        public = leaf_key.public_key()
        return timed(count, 1, lambda n: plain_leaf(keyset, public, now))

    def in_process_jwt() -> float:
        return timed(count, 1, lambda n: issue_jwt_svid(keyset, spiffe_id, ["bench"], now, timedelta(minutes=5)))

    def over_http(path: str, bodies: Callable[[int], bytes], connections: int) -> float:
        clients = [Client(port, None, token=TOKEN) for _ in range(connections)]
        for client in clients:  # open (TLS handshake) outside the timed loop: keep-alive is what is measured
            assert client.request("GET", "/healthz")[0] == 200

        def one(n: int) -> None:
            status, answer, _ = clients[n % connections].request("POST", path, bodies(n))
            if status != 200:
                raise RuntimeError(f"{path} answered {status}: {answer}")

        try:
            return timed(count, connections, one)
        finally:
            for client in clients:
                client.close()

    where = "in this process" if args.in_process else "in a child process (keyseal server)"
    print(f"keyseal {version()} · {os.cpu_count()} CPUs · {count} SVIDs per round, best of {args.rounds}")
    print(f"CA key ec-p256, leaf key P-256, TLS, HTTP/1.1 keep-alive, server {where} on 127.0.0.1\n")
    raw_x509 = best(args.rounds, in_process_x509)
    raw_jwt = best(args.rounds, in_process_jwt)
    print(f"{'':36} {'SVIDs/s':>10} {'ratio':>7}")
    print(f"{'X.509 in process (baseline)':36} {raw_x509:10.0f} {1:7.2f}")
    connection_counts = [int(c) for c in args.connections.split(",")]
    results = []
    for connections in connection_counts:
        rate = best(args.rounds, lambda c=connections: over_http("/v1/x509-svid", lambda n: x509_body, c))
        results.append(rate)
        print(f"{f'X.509 over HTTPS, {connections} conn':36} {rate:10.0f} {rate / raw_x509:7.2f}")
    top = max(connection_counts)
    if child is not None:
        before, started = process_cpu(child.pid), time.process_time()
        over_http("/v1/x509-svid", lambda n: x509_body, top)
        server_cpu = (process_cpu(child.pid) - before) / count
        client_cpu = (time.process_time() - started) / count
        print(f"{'  server CPU per X.509-SVID':36} {server_cpu * 1e6:9.0f}µs {1 / raw_x509 / server_cpu:7.2f}"
              f"  (client CPU {client_cpu * 1e6:.0f}µs; in-process {1e6 / raw_x509:.0f}µs)")
    rate = best(args.rounds, lambda: over_http("/v1/x509-svid", lambda n: fresh[n], top))
    print(f"{f'X.509 over HTTPS, {top} conn, fresh CSR':36} {rate:10.0f} {rate / raw_x509:7.2f}")
    print(f"{'JWT in process (baseline)':36} {raw_jwt:10.0f} {1:7.2f}")
    for connections in connection_counts:
        rate = best(args.rounds, lambda c=connections: over_http("/v1/jwt-svid", lambda n: jwt_body, c))
        print(f"{f'JWT over HTTPS, {connections} conn':36} {rate:10.0f} {rate / raw_jwt:7.2f}")
    ratio = max(results) / raw_x509
    print(f"\nX.509-SVID target ratio >= 0.5: {'met' if ratio >= 0.5 else 'NOT met'} ({ratio:.2f})")
    if child is not None:
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=30)
    local.shutdown()


def version() -> str:
    from keyseal import __version__

    return __version__


if __name__ == "__main__":
    main()

"""SVIDs per second over HTTPS (keep-alive) from keyseal's trust-domain server, against the in-process rate of
building and signing the same certificate with `cryptography`. Target: ratio >= 0.5.

The server runs as `keyseal server` in a child process on 127.0.0.1 (as deployed: wrapped custody, local KEK,
directory store in a temporary directory, ec-p256 CA key, info logs, so each SVID's audit line is written);
with --in-process it runs in this process instead. The load comes from `wrk` (Debian package wrk), a C client,
so that on a small machine the client does not take the CPU the server needs; its Lua script sends the bearer
token and the JSON body. Baseline: the same leaf (same extensions, same CA key type) built and signed with
`cryptography`'s CertificateBuilder in a loop, nothing else; the child server's CA key is not reachable from
here, so the baseline uses an in-process server's keyset of the same type. X.509 requests reuse one CSR (the
server remembers verified CSRs); the "fresh CSR" row cycles through more CSRs than the server remembers (a
signature check per request). JWT-SVIDs are reported the same way. Rounds are interleaved (baseline, then
each HTTPS row), each row's ratio is taken against the baseline of its own round, and the table shows medians
over the rounds: this machine's speed drifts by ±20% within minutes, and a best-of-rounds figure on each side
would compare the baseline's luckiest moment with the server's.

keyseal's home is in the benchmark's temporary directory, never the user's, and no audit file is written (the
audit records go to the server's log, as the Helm chart deploys it).

Usage: python benchmarks/svid_issuance.py [--svids 3000] [--seconds 5] [--rounds 3] [--connections 1,2,4,8]
                                          [--in-process]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from isolation import load_average, private_keyseal

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.harness.ca: the test client
sys.path.insert(0, str(ROOT / "src"))

TOKEN = "benchmark-token-0123456789abcdef"
SPIFFE_ID = "spiffe://example.org/ns/bench/workload"


def timed(count: int, connections: int, work: Callable[[int], object]) -> float:
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
    env = dict(os.environ)  # with keyseal's home in `work` (private_keyseal)
    proc = subprocess.Popen([sys.executable, "-m", "keyseal", "server", "--config", str(path)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    seen: list[str] = []
    for line in proc.stderr:
        match = re.search(r"serving trust domain \S+ on https://127.0.0.1:(\d+)", line)
        if match:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining its log
            return proc, int(match.group(1))
        seen.append(line)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("the server did not start: " + "".join(seen[-5:]))


def wrk_script(path: str, bodies: list[bytes], work: Path) -> Path:
    """A wrk Lua script that POSTs `bodies` in turn with the bearer token (several bodies: a fresh CSR each)."""
    table = ",\n".join(json.dumps(body.decode()) for body in bodies)
    script = work / f"wrk-{hashlib.sha256(path.encode() + bodies[0]).hexdigest()[:12]}-{len(bodies)}.lua"
    script.write_text(
        f'wrk.method = "POST"\nwrk.path = "{path}"\n'
        f'wrk.headers["Content-Type"] = "application/json"\nwrk.headers["Authorization"] = "Bearer {TOKEN}"\n'
        f"local bodies = {{\n{table}\n}}\nlocal n = 0\n"
        "request = function()\n  n = n % #bodies + 1\n  return wrk.format(nil, nil, nil, bodies[n])\nend\n"
    )
    return script


def run_wrk(port: int, script: Path, connections: int, seconds: int) -> int:
    """Requests answered 200 by the server in `seconds` through `connections` keep-alive connections."""
    result = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script),
                             f"https://127.0.0.1:{port}/"], capture_output=True, text=True, check=True)
    if "Non-2xx" in result.stdout or "Socket errors" in result.stdout:
        raise RuntimeError(f"the server refused or dropped requests:\n{result.stdout}")
    match = re.search(r"(\d+) requests in", result.stdout)
    if match is None:
        raise RuntimeError(f"cannot read wrk's output:\n{result.stdout}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--svids", type=int, default=3000, help="SVIDs per in-process round")
    parser.add_argument("--seconds", type=int, default=5, help="length of each HTTPS round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", default="1,2,4,8", help="comma-separated client connection counts")
    parser.add_argument("--in-process", action="store_true", help="run the server in this process")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("svid_issuance: the load generator wrk is not installed (apt-get install wrk)")
    work = Path(tempfile.mkdtemp(prefix="keyseal-bench-"))
    try:
        measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, work: Path) -> None:
    from tests.harness.ca import make_csr, new_key

    from keyseal._internal.ca.config import parse_config
    from keyseal._internal.ca.issuance.jwtsvid import issue_jwt_svid
    from keyseal._internal.ca.server import CaServer
    from keyseal._internal.spiffe.ids import parse_spiffe_id

    private_keyseal(work, audit="off")
    print(f"load average before: {load_average()}")
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
    else:  # as deployed: info logs, so every SVID's audit line is written
        # A store of its own, with its own seen-versions ledger: the ledger knows records by trust domain and name,
        # so two stores of one trust domain must not share one.
        child_config = dict(raw_config, store={"type": "directory", "directory": {
                                "path": str(work / "store2"), "ledgerFile": str(work / "store2-seen-versions.json")}},
                            logLevel="info")
        child, port = start_child(child_config, work)

    keyset = local.manager.active()
    spiffe_id = parse_spiffe_id(SPIFFE_ID)
    leaf_key = new_key()
    x509_script = wrk_script("/v1/x509-svid", [json.dumps({"spiffeID": SPIFFE_ID, "csr": make_csr(leaf_key)})
                                               .encode()], work)
    fresh_script = wrk_script("/v1/x509-svid", [json.dumps({"spiffeID": SPIFFE_ID, "csr": make_csr()}).encode()
                                                for _ in range(2048)], work)  # more than the server's CSR cache
    jwt_script = wrk_script("/v1/jwt-svid", [json.dumps({"spiffeID": SPIFFE_ID, "audience": ["bench"]}).encode()],
                            work)
    count = args.svids
    now = datetime.now(UTC)
    public = leaf_key.public_key()

    def in_process_x509() -> float:
        return timed(count, 1, lambda n: plain_leaf(keyset, public, now))

    def in_process_jwt() -> float:
        return timed(count, 1, lambda n: issue_jwt_svid(keyset, spiffe_id, ["bench"], now, timedelta(minutes=5)))

    def over_https(script: Path, connections: int) -> tuple[float, float]:
        """SVIDs per second, and the server's CPU seconds per SVID (child server only, else 0)."""
        before = process_cpu(child.pid) if child is not None else 0.0
        started = time.perf_counter()
        answered = run_wrk(port, script, connections, args.seconds)
        elapsed = time.perf_counter() - started
        cpu = (process_cpu(child.pid) - before) / answered if child is not None else 0.0
        return answered / elapsed, cpu

    where = "in this process" if args.in_process else "in a child process (keyseal server)"
    print(f"keyseal {version()} · {os.cpu_count()} CPUs · medians of {args.rounds} rounds; in process: {count} "
          f"SVIDs a round, over HTTPS: {args.seconds:g} s a round (wrk, one thread)")
    print(f"CA key ec-p256, leaf key P-256, TLS, HTTP/1.1 keep-alive, server {where} on 127.0.0.1\n")
    connection_counts = [int(c) for c in args.connections.split(",")]
    rows: dict[str, list[tuple[float, float, float]]] = {}  # per round: rate, CPU per SVID, the round's baseline
    baselines: dict[str, list[float]] = {"x509": [], "jwt": []}
    gc.freeze()  # as the server does once started: the baseline's loop does not re-walk this process's start-up
    for _ in range(args.rounds):  # interleaved: each row's ratio is taken against the baseline of its own round
        x509_rate, jwt_rate = in_process_x509(), in_process_jwt()
        baselines["x509"].append(x509_rate)
        baselines["jwt"].append(jwt_rate)
        top = max(connection_counts)
        for name, script, connections, baseline in (
            *((f"X.509 over HTTPS, {c} conn", x509_script, c, x509_rate) for c in connection_counts),
            (f"X.509 over HTTPS, {top} conn, fresh CSR", fresh_script, top, x509_rate),
            *((f"JWT over HTTPS, {c} conn", jwt_script, c, jwt_rate) for c in connection_counts),
        ):
            rate, cpu = over_https(script, connections)
            rows.setdefault(name, []).append((rate, cpu, baseline))
    print(f"{'':40} {'SVIDs/s':>9} {'ratio':>7} {'server CPU/SVID':>16}")
    x509_ratio, x509_rounds = 0.0, ""
    for kind, label in (("x509", "X.509"), ("jwt", "JWT")):
        base = statistics.median(baselines[kind])
        print(f"{label + ' in process (baseline)':40} {base:9.0f} {1:7.2f} {1e6 / base:14.0f}µs")
        for name, results in rows.items():
            if not name.startswith(label + " "):
                continue
            rate = statistics.median(r for r, _, _ in results)
            ratio = statistics.median(r / b for r, _, b in results)
            cpu = statistics.median(c for _, c, _ in results)
            cpu_text = f"{cpu * 1e6:14.0f}µs" if cpu else ""
            print(f"{name:40} {rate:9.0f} {ratio:7.2f} {cpu_text}")
            if kind == "x509" and "fresh" not in name and ratio > x509_ratio:
                x509_ratio = ratio
                x509_rounds = f"{name}; by round: " + " ".join(f"{r / b:.2f}" for r, _, b in results)
    print(f"\nX.509-SVID target ratio >= 0.5: {'met' if x509_ratio >= 0.5 else 'NOT met'} ({x509_ratio:.2f}, "
          f"{x509_rounds})")
    if child is not None:
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=30)
    local.shutdown()
    print(f"load average after: {load_average()}")


def version() -> str:
    from keyseal import __version__

    return __version__


if __name__ == "__main__":
    main()

"""A bounded soak of the trust-domain server: concurrent X.509- and JWT-SVID issuance for a few minutes, in
key-manager custody, with KMS faults injected, across several CA rotations. 127.0.0.1 only.

The server runs as `keyseal server --config` in a child process (as deployed, info logs), its CA keys in the
moto KMS emulator (tests/harness/kms_emulator.py) served from this process. The emulator answers every
`--fault-every`-th kms:Sign with ThrottlingException (400), KMSInternalException (500) or
ServiceUnavailableException (503) in turn, never the same request twice: within the server's retry bound
(KEYSEAL_KMS_MAX_ATTEMPTS), so every request should still succeed. A short CA TTL (`--ca-ttl`, with SVID TTLs
and the refresh hint at a sixth of it) makes the server's own rotation thread create and activate several
keysets during the run.

`--clients` threads each keep one HTTPS connection and ask in turn for an X.509-SVID (a fresh key and CSR each
time) and a JWT-SVID. Every answer is checked here: the X.509 leaf's signature against the CA certificate named
by its authority key identifier, the JWT's ES256 signature against the bundle key named by its `kid`, and that
the signing keyset was the active one when the request was made or answered (the schedule computed from the CA
certificates in the bundle, as the server computes it). A monitor polls the bundle and /metrics every half
second and samples the server's VmRSS (/proc/PID/status) and open file descriptors (/proc/PID/fd).

Bounds (the run fails, exit status 1, if one is broken):
- failed requests: 0 (any non-200 answer, transport error, or SVID that does not verify);
- memory: peak VmRSS after warm-up at most `--rss-bound` MiB above the VmRSS at the end of warm-up;
- open files: at most `--fd-bound` above the count at the end of warm-up, at any later sample;
- rotations: every keyset number from 1 to the last appears in the bundle, none skipped; keysets became active
  in order, one after another; at every poll exactly one keyset was active; no rotation error in /metrics;
  at least the number of activations the schedule guarantees in the run's length.

Usage: python benchmarks/soak.py [--duration 180] [--clients 4] [--ca-ttl 60] [--fault-every 7]
                                 [--rss-bound 16] [--fd-bound 16]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.harness: the KMS emulator and the test client
sys.path.insert(0, str(ROOT / "src"))

TOKEN = "soak-token-0123456789abcdef0123"
TRUST_DOMAIN = "example.org"
SPIFFE_ID = f"spiffe://{TRUST_DOMAIN}/ns/soak/workload"
AUDIENCE = "soak"
SIGN_FAULTS = (("ThrottlingException", 400), ("KMSInternalException", 500), ("ServiceUnavailableException", 503))
TICK_SECONDS = 5.0  # the server's rotation loop (keyseal._internal.ca.server.TICK_SECONDS)
_CN_RE = re.compile(r" CA (\d+)$")


@dataclass(frozen=True)
class SoakOptions:
    duration: float = 180.0
    clients: int = 4
    ca_ttl: int = 60  # seconds
    fault_every: int = 7
    max_attempts: int = 4
    rss_bound_mib: float = 16.0
    fd_bound: int = 16
    warmup: float = 0.0  # seconds; 0: 15% of the run, at least 5 s


@dataclass
class SoakReport:
    options: SoakOptions
    elapsed: float = 0.0
    requests: dict[str, int] = field(default_factory=lambda: {"x509": 0, "jwt": 0})
    failures: list[str] = field(default_factory=list)
    failure_count: int = 0
    faults_injected: int = 0
    sign_calls: int = 0
    rss_kib: list[tuple[float, int]] = field(default_factory=list)
    fds: list[tuple[float, int]] = field(default_factory=list)
    keysets_seen: list[int] = field(default_factory=list)
    active_sequence: list[int] = field(default_factory=list)
    issued_by: dict[int, int] = field(default_factory=dict)
    polls: int = 0
    bad_polls: list[str] = field(default_factory=list)
    server_errors: dict[str, int] = field(default_factory=dict)
    warmup_end: float = 0.0
    violations: list[str] = field(default_factory=list)

    @property
    def rotations(self) -> int:
        return max(len(self.active_sequence) - 1, 0)

    def _at_warmup(self, samples: list[tuple[float, int]]) -> int:
        after = [value for at, value in samples if at >= self.warmup_end]
        return after[0] if after else (samples[-1][1] if samples else 0)

    def check(self) -> None:
        o = self.options
        v = self.violations
        if self.failure_count:
            v.append(f"{self.failure_count} requests failed (bound 0), e.g. {self.failures[:3]}")
        if sum(self.requests.values()) == 0:
            v.append("no request was made")
        if self.rss_kib:
            base = self._at_warmup(self.rss_kib)
            peak = max(value for at, value in self.rss_kib if at >= self.warmup_end)
            if (peak - base) / 1024 > o.rss_bound_mib:
                v.append(f"VmRSS grew {(peak - base) / 1024:.1f} MiB after warm-up (bound {o.rss_bound_mib} MiB)")
        else:
            v.append("no memory sample")
        if self.fds:
            base = self._at_warmup(self.fds)
            peak = max(value for at, value in self.fds if at >= self.warmup_end)
            if peak - base > o.fd_bound:
                v.append(f"open files grew by {peak - base} after warm-up (bound {o.fd_bound})")
        seen = sorted(set(self.keysets_seen))
        if seen != list(range(1, (max(seen) if seen else 0) + 1)) or not seen:
            v.append(f"keyset numbers seen in the bundle are not 1..n without gaps: {seen}")
        sequence = self.active_sequence
        if not sequence or sequence != list(range(sequence[0], sequence[0] + len(sequence))):
            v.append(f"keysets did not become active one after another: {self.active_sequence}")
        if self.bad_polls:
            v.append(f"{len(self.bad_polls)} polls without exactly one active keyset, e.g. {self.bad_polls[:3]}")
        if self.server_errors.get("rotation", 0):
            v.append(f"the server counted {self.server_errors['rotation']} failed rotations")
        if self.rotations < self.expected_rotations():
            v.append(f"{self.rotations} rotations observed, the schedule guarantees {self.expected_rotations()}")
        if self.faults_injected == 0:
            v.append("no KMS fault was injected")

    def expected_rotations(self) -> int:
        """Activations the schedule guarantees: keyset 2 at 5/6 of the CA TTL, then one every half TTL, each
        creation up to one rotation tick late."""
        ttl = self.options.ca_ttl
        first = ttl * 5 / 6 + TICK_SECONDS
        if self.elapsed < first:
            return 0
        return 1 + int((self.elapsed - first) // (ttl / 2 + TICK_SECONDS))

    def render(self) -> str:
        o = self.options
        total = sum(self.requests.values())

        def mib(kib: int) -> str:
            return f"{kib / 1024:.1f} MiB"

        rss = [value for _, value in self.rss_kib] or [0]
        fds = [value for _, value in self.fds] or [0]
        lines = [
            f"soak: {self.elapsed:.0f} s, {o.clients} client threads, CA TTL {o.ca_ttl} s, every "
            f"{o.fault_every}th kms:Sign fails (throttling / 500 / 503, once per request; "
            f"KEYSEAL_KMS_MAX_ATTEMPTS={o.max_attempts})",
            f"requests: {total} ({self.requests['x509']} X.509-SVIDs, {self.requests['jwt']} JWT-SVIDs, "
            f"{total / self.elapsed if self.elapsed else 0:.0f}/s), failures: {self.failure_count} (bound 0)",
            f"kms:Sign calls seen by the emulator: {self.sign_calls}, faults injected: {self.faults_injected}",
            f"VmRSS: start {mib(rss[0])}, at end of warm-up ({self.warmup_end:.0f} s) "
            f"{mib(self._at_warmup(self.rss_kib))}, peak {mib(max(rss))}, end {mib(rss[-1])} "
            f"(bound: +{o.rss_bound_mib:.0f} MiB after warm-up)",
            f"open fds: start {fds[0]}, at end of warm-up {self._at_warmup(self.fds)}, peak {max(fds)}, "
            f"end {fds[-1]} (bound: +{o.fd_bound} after warm-up)",
            "VmRSS MiB / open fds every ~10 s: " + ", ".join(
                f"{at:.0f}s {kib / 1024:.0f}/{fd}" for (at, kib), (_, fd) in _every(self.rss_kib, self.fds, 10.0)),
            f"keysets in the bundle: {sorted(set(self.keysets_seen))}; became active in order: "
            f"{self.active_sequence} ({self.rotations} rotations, {self.expected_rotations()} guaranteed)",
            "SVIDs by signing keyset (each checked against the keyset active then): "
            + ", ".join(f"{n}: {c}" for n, c in sorted(self.issued_by.items())),
            f"monitor polls: {self.polls}, without exactly one active keyset: {len(self.bad_polls)}; "
            f"server error counters: {self.server_errors}",
            "result: " + ("PASS" if not self.violations else "FAIL: " + "; ".join(self.violations)),
        ]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Ca:
    number: int
    not_before: datetime
    not_after: datetime
    certificate: Any


class _Trust:
    """What the clients know of the trust domain: every CA certificate and JWT key seen in the bundle."""

    def __init__(self, refresh_hint: timedelta) -> None:
        self.lock = threading.Lock()
        self.refresh_hint = refresh_hint
        self.by_ski: dict[bytes, _Ca] = {}
        self.jwt_keys: dict[str, tuple[int, Any]] = {}
        self.numbers: set[int] = set()

    def update(self, bundle: dict[str, Any]) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec

        x509_keys = [k for k in bundle["keys"] if k["use"] == "x509-svid"]
        jwt_keys = [k for k in bundle["keys"] if k["use"] == "jwt-svid"]
        found: list[_Ca] = []
        for key in x509_keys:
            cert = x509.load_der_x509_certificate(base64.b64decode(key["x5c"][0]))
            cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
            match = _CN_RE.search(str(cn))
            if match is None:
                raise AssertionError(f"unexpected CA subject {cn!r}")
            found.append(_Ca(int(match.group(1)), cert.not_valid_before_utc, cert.not_valid_after_utc, cert))
        with self.lock:
            for ca, jwk in zip(found, jwt_keys, strict=True):  # the bundle lists a keyset's two keys together
                ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
                self.by_ski[ski.value.digest] = ca
                numbers = ec.EllipticCurvePublicNumbers(_b64int(jwk["x"]), _b64int(jwk["y"]), ec.SECP256R1())
                self.jwt_keys[jwk["kid"]] = (ca.number, numbers.public_key())
                self.numbers.add(ca.number)

    def active_at(self, moment: datetime) -> int | None:
        from keyseal._internal.ca.custody.schedule import plan

        with self.lock:
            cas = sorted(self.by_ski.values(), key=lambda c: c.number)
        return plan(cas, moment, self.refresh_hint).active


def _every(rss: list[tuple[float, int]], fds: list[tuple[float, int]],
           step: float) -> list[tuple[tuple[float, int], tuple[float, int]]]:
    """Samples about `step` seconds apart (and the last one)."""
    picked: list[tuple[tuple[float, int], tuple[float, int]]] = []
    for pair in zip(rss, fds, strict=False):
        if not picked or pair[0][0] - picked[-1][0][0] >= step:
            picked.append(pair)
    if rss and fds and picked[-1][0] != rss[-1]:
        picked.append((rss[-1], fds[-1]))
    return picked


def _b64int(text: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _start_server(config: dict[str, Any], work: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    import yaml

    path = work / "server.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = work / "server.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "keyseal", "server", "--config", str(path)],
                                stdout=subprocess.DEVNULL, stderr=log_file, env=env)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        match = re.search(r"serving trust domain \S+ on https://127.0.0.1:(\d+)", text)
        if match:
            return proc, int(match.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the server did not start:\n{log_path.read_text(errors='replace')[-3000:]}")


def _proc_sample(pid: int) -> tuple[int, int]:
    """(VmRSS in KiB, open file descriptors) of a running process."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return (int(match.group(1)) if match else 0), len(os.listdir(f"/proc/{pid}/fd"))


def _check_x509(body: dict[str, Any], key: Any, trust: _Trust, refresh: Callable[[], None]) -> int:
    """The signing keyset's number, after checking the leaf (SPIFFE ID, key, signature, lifetime)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    leaf = x509.load_pem_x509_certificate(body["certChain"][0].encode())
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    if uris.get_values_for_type(x509.UniformResourceIdentifier) != [SPIFFE_ID]:
        raise AssertionError("the leaf names another SPIFFE ID")
    if leaf.public_key() != key.public_key():
        raise AssertionError("the leaf certifies another key")
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki is not None
    ca = trust.by_ski.get(aki)
    if ca is None:
        refresh()
        ca = trust.by_ski.get(aki)
    if ca is None:
        raise AssertionError("the leaf's issuer is not in the bundle")
    algorithm = leaf.signature_hash_algorithm
    if algorithm is None:
        raise AssertionError("the leaf names no signature hash")
    ca.certificate.public_key().verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(algorithm))
    if leaf.not_valid_after_utc > ca.not_after:
        raise AssertionError("the leaf outlives its CA")
    return ca.number


def _check_jwt(token: str, trust: _Trust, refresh: Callable[[], None]) -> int:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, utils

    header_b64, payload_b64, signature_b64 = token.split(".")
    header, payload = json.loads(_b64(header_b64)), json.loads(_b64(payload_b64))
    if header.get("alg") != "ES256":
        raise AssertionError(f"unexpected alg {header.get('alg')}")
    entry = trust.jwt_keys.get(header["kid"])
    if entry is None:
        refresh()
        entry = trust.jwt_keys.get(header["kid"])
    if entry is None:
        raise AssertionError("the JWT's kid is not in the bundle")
    number, public = entry
    raw = _b64(signature_b64)
    der = utils.encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public.verify(der, f"{header_b64}.{payload_b64}".encode(), ec.ECDSA(hashes.SHA256()))
    audience = payload.get("aud")
    if payload.get("sub") != SPIFFE_ID or AUDIENCE not in (audience if isinstance(audience, list) else [audience]):
        raise AssertionError("the JWT names another subject or audience")
    if payload.get("exp", 0) <= time.time() - 1:
        raise AssertionError("the JWT has expired")
    return int(number)


def _metrics(text: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
    states = [(int(n), s) for n, s in re.findall(r'keyseal_keyset_state\{keyset="(\d+)",state="(\w+)"\} 1', text)]
    errors = {r: int(c) for r, c in re.findall(r'keyseal_errors_total\{reason="(\w+)"\} (\d+)', text)}
    return states, errors


def run_soak(options: SoakOptions, work: Path, say: Callable[[str], None] = print) -> SoakReport:
    """Start the emulator and the server, load it for `options.duration` seconds, and report."""
    import logging

    from tests.harness.ca import Client, make_csr, new_key
    from tests.harness.kms_emulator import KmsEmulator

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the emulator's access log
    report = SoakReport(options)
    ttl = options.ca_ttl
    short = max(ttl // 6, 1)
    emulator = KmsEmulator().start()
    config = {
        "trustDomain": TRUST_DOMAIN,
        "custody": "kms",
        "aws": {"region": "us-east-1", "endpoints": {"kms": emulator.endpoint},
                "keyManager": {"aliasPrefix": f"soak/{uuid.uuid4().hex[:8]}"}},
        "server": {"listen": "127.0.0.1:0"},
        # The store holds the keyset pins: in the work directory, never the default /var/lib/keyseal.
        "store": {"type": "directory", "directory": {"path": str(work / "store")}},
        "logLevel": "info",
        "ca": {"ttl": f"{ttl}s"},
        "x509SVID": {"ttl": f"{short}s"},
        "jwtSVID": {"ttl": f"{short}s"},
        "bundle": {"refreshHint": f"{short}s"},
        "clients": [{"name": "soak", "tokenSHA256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                     "allowedPathPrefixes": ["/"]}],
    }
    env = dict(os.environ, KEYSEAL_HOME=str(work / "home"), AWS_ACCESS_KEY_ID="soak", AWS_SECRET_ACCESS_KEY="soak",
               AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=str(work / "absent"), AWS_SHARED_CREDENTIALS_FILE=str(work / "absent"),
               KEYSEAL_KMS_MAX_ATTEMPTS=str(options.max_attempts))
    env.pop("KEYSEAL_AUDIT_LOG", None)
    emulator.fail_every("Sign", options.fault_every, SIGN_FAULTS, per_request=1)
    proc, port = _start_server(config, work, env)
    trust = _Trust(timedelta(seconds=short))
    stop = threading.Event()
    lock = threading.Lock()
    start = time.monotonic()
    report.warmup_end = options.warmup or max(5.0, options.duration * 0.15)

    def fail(what: str) -> None:
        with lock:
            report.failure_count += 1
            if len(report.failures) < 20:
                report.failures.append(what)

    monitor_client = Client(port, None)
    connection = threading.Lock()  # the monitor's connection, shared with clients that meet a new keyset

    def refresh() -> None:
        with connection:
            status, body, _ = monitor_client.request("GET", "/v1/bundle")
        if status != 200:
            raise AssertionError(f"GET /v1/bundle answered {status}")
        trust.update(body)

    def monitor() -> None:
        while not stop.is_set():
            at = time.monotonic() - start
            try:
                rss, fds = _proc_sample(proc.pid)
                report.rss_kib.append((at, rss))
                report.fds.append((at, fds))
                refresh()
                with connection:
                    _, text, _ = monitor_client.request("GET", "/metrics")
                states, errors = _metrics(str(text))
                report.polls += 1
                report.server_errors = errors
                active = [n for n, s in states if s == "active"]
                if len(active) != 1:
                    report.bad_polls.append(f"{at:.1f}s: {states}")
                elif not report.active_sequence or report.active_sequence[-1] != active[0]:
                    report.active_sequence.append(active[0])
            except Exception as exc:  # the monitor's own failure is a finding, not a crash
                fail(f"monitor at {at:.1f}s: {type(exc).__name__}: {exc}")
            stop.wait(0.5)

    def worker(index: int) -> None:
        client = Client(port, None, token=TOKEN)
        n = index
        while not stop.is_set():
            kind = "x509" if n % 2 == 0 else "jwt"
            n += 1
            before = datetime.now(UTC)
            key = new_key() if kind == "x509" else None
            try:
                if kind == "x509":
                    status, body, _ = client.request("POST", "/v1/x509-svid",
                                                     {"spiffeID": SPIFFE_ID, "csr": make_csr(key)})
                else:
                    status, body, _ = client.request("POST", "/v1/jwt-svid",
                                                     {"spiffeID": SPIFFE_ID, "audience": [AUDIENCE]})
                after = datetime.now(UTC)
                if status != 200:
                    fail(f"{kind}: HTTP {status} {str(body)[:200]}")
                    continue
                number = _check_x509(body, key, trust, refresh) if kind == "x509" else \
                    _check_jwt(body["token"], trust, refresh)
                if number not in (trust.active_at(before), trust.active_at(after)):
                    fail(f"{kind}: signed by keyset {number}, active then: {trust.active_at(before)}/"
                         f"{trust.active_at(after)}")
                    continue
                with lock:
                    report.requests[kind] += 1
                    report.issued_by[number] = report.issued_by.get(number, 0) + 1
            except Exception as exc:
                fail(f"{kind}: {type(exc).__name__}: {str(exc)[:200]}")
                client.close()
                client = Client(port, None, token=TOKEN)
        client.close()

    threads = [threading.Thread(target=monitor, name="soak-monitor", daemon=True)]
    threads += [threading.Thread(target=worker, args=(i,), name=f"soak-client-{i}", daemon=True)
                for i in range(options.clients)]
    try:
        refresh()
        for thread in threads:
            thread.start()
        next_line = 30.0
        while (elapsed := time.monotonic() - start) < options.duration:
            if proc.poll() is not None:
                fail(f"the server exited with status {proc.returncode}")
                break
            if elapsed >= next_line:
                say(f"soak: {elapsed:.0f} s, {sum(report.requests.values())} SVIDs, "
                    f"{report.failure_count} failures, active keyset {report.active_sequence[-1:]}")
                next_line += 30.0
            time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        report.elapsed = time.monotonic() - start
        report.keysets_seen = sorted(trust.numbers)
        report.faults_injected = emulator.faults_injected["Sign"]
        report.sign_calls = emulator.calls.counts()["Sign"]
    finally:
        stop.set()
        monitor_client.close()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        emulator.stop()
    log_text = (work / "server.log").read_text(errors="replace")
    for line in log_text.splitlines():
        if "Traceback" in line or "keyset refresh failed" in line or "cannot sign" in line:
            fail(f"server log: {line[:200]}")
    report.check()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load (default 180)")
    parser.add_argument("--clients", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--ca-ttl", type=int, default=60, help="CA lifetime in seconds (default 60)")
    parser.add_argument("--fault-every", type=int, default=7, help="every Nth kms:Sign fails (default 7)")
    parser.add_argument("--rss-bound", type=float, default=16.0, help="MiB of VmRSS growth after warm-up")
    parser.add_argument("--fd-bound", type=int, default=16, help="open files added after warm-up")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (server log, config)")
    args = parser.parse_args()
    if args.ca_ttl < 12 or args.fault_every < 2 or args.clients < 1:
        sys.exit("soak: --ca-ttl must be at least 12, --fault-every at least 2, --clients at least 1")
    options = SoakOptions(duration=args.duration, clients=args.clients, ca_ttl=args.ca_ttl,
                          fault_every=args.fault_every, rss_bound_mib=args.rss_bound, fd_bound=args.fd_bound)
    work = Path(tempfile.mkdtemp(prefix="keyseal-soak-"))
    print(f"keyseal home: {work / 'home'} (temporary; the user's ~/.config/keyseal is not touched), no audit file "
          f"(the server's audit records go to its log, {work / 'server.log'})", flush=True)
    report = run_soak(options, work)
    print(report.render())
    if args.keep:
        print(f"work directory: {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if report.violations else 0)


if __name__ == "__main__":
    main()

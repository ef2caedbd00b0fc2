"""KMS faults: throttling, 5xx, read timeouts, refused and dropped connections, injected three ways:

- in process, through a botocore `before-send.kms.<Operation>` event hook on the clients keyseal builds (the
  hook answers in place of the network, or raises the error the HTTP layer would raise), so every attempt is
  counted exactly and the emulator proves none got through;
- over HTTP, by the emulator's `fail()` (the server answers with the error; the server counts the attempts),
  by a closed port (connection refused) and by a port that never answers (read timeout);
- through a proxy in front of the emulator that starts failing `Sign` after a number of successes, to show that
  `keyseal sign` over several files leaves no partial or temporary file when a signature fails mid-way.

Each case asserts the number of attempts (KEYSEAL_KMS_MAX_ATTEMPTS, the first try included) and the final
error: its type and one line naming the operation and the endpoint.
(tests/test_awskms.py covers the basic throttling/500 retry over HTTP and the unreachable endpoint message.)
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import botocore.handlers
import pytest
from botocore.awsrequest import AWSResponse, HTTPHeaders
from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.hashes import SHA256

from keyseal._internal.backends import BackendOptions, open_signer
from keyseal._internal.keygen import generate_private_key
from keyseal._internal.records.ledger import VersionLedger
from keyseal._internal.store.directory import DirectoryStore
from keyseal._internal.wrapping.awskms import AwsKmsKek
from keyseal._internal.wrapping.keys import create_record, open_record
from keyseal.errors import BackendUnavailableError, KeysealError
from tests.conftest import REGION, assert_one_line_error, run_keyseal
from tests.harness.kms_emulator import KmsEmulator

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

# -- injection through botocore event hooks ----------------------------------------------------------------


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.data


def _headers(**fields: str) -> HTTPHeaders:
    headers = HTTPHeaders()
    for name, value in fields.items():
        headers[name.replace("_", "-")] = value
    return headers


def _error_response(url: str, status: int, code: str | None) -> AWSResponse:
    """An HTTP error answer as KMS sends it (AWS JSON protocol), or a bare 5xx page from a load balancer."""
    if code is None:
        page = b"<html>503 Service Unavailable</html>"
        return AWSResponse(url, status, _headers(Content_Type="text/html"), _Body(page))
    body = json.dumps({"__type": code, "message": f"{code} (injected by the test)"}).encode()
    headers = _headers(Content_Type="application/x-amz-json-1.1", x_amzn_RequestId="injected")
    return AWSResponse(url, status, headers, _Body(body))


FAULTS: dict[str, Callable[[Any], object]] = {
    "throttling": lambda request: _error_response(request.url, 400, "ThrottlingException"),
    "500": lambda request: _error_response(request.url, 500, "KMSInternalException"),
    "503-html": lambda request: _error_response(request.url, 503, None),
    "read-timeout": lambda request: ReadTimeoutError(endpoint_url=request.url),
    "connection-refused": lambda request: EndpointConnectionError(endpoint_url=request.url),
    "connection-dropped": lambda request: ConnectionClosedError(endpoint_url=request.url),
}
EXPECTED_WORDS = {
    "throttling": ("ThrottlingException", "even after retries", "KEYSEAL_KMS_MAX_ATTEMPTS"),
    "500": ("KMSInternalException", "even after retries", "KEYSEAL_KMS_MAX_ATTEMPTS"),
    "503-html": ("even after retries", "KEYSEAL_KMS_MAX_ATTEMPTS"),
    "read-timeout": ("timed out", "KEYSEAL_KMS_READ_TIMEOUT"),
    "connection-refused": ("cannot reach AWS KMS",),
    "connection-dropped": ("cannot reach AWS KMS",),
}


@dataclass
class Injector:
    """A `before-send` handler: answers (or fails) the next `times` attempts of one operation with `fault`,
    then lets requests through to the emulator. Counts every attempt it sees."""

    fault: str
    times: int
    attempts: int = 0
    urls: list[str] = field(default_factory=list)

    def __call__(self, request: Any, **_: Any) -> object:
        self.attempts += 1
        self.urls.append(request.url)
        if self.attempts > self.times:
            return None  # through to the emulator
        outcome = FAULTS[self.fault](request)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


@pytest.fixture
def inject(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str, int], Injector]:
    """Install an Injector on every botocore session created from now on (keyseal builds its own clients):
    botocore registers `BUILTIN_HANDLERS` on each new session."""

    def install(operation: str, fault: str, times: int = 1000) -> Injector:
        injector = Injector(fault, times)
        handlers = [*botocore.handlers.BUILTIN_HANDLERS, (f"before-send.kms.{operation}", injector)]
        monkeypatch.setattr(botocore.handlers, "BUILTIN_HANDLERS", handlers)
        return injector

    return install


def admin(kms_emulator: KmsEmulator) -> Any:
    return boto3.client("kms", region_name=REGION, endpoint_url=kms_emulator.endpoint,
                        aws_access_key_id="admin", aws_secret_access_key="admin")


@pytest.fixture(scope="module")
def signing_key(kms_emulator: KmsEmulator) -> str:
    return str(admin(kms_emulator).create_key(KeyUsage="SIGN_VERIFY", KeySpec="ECC_NIST_P256")["KeyMetadata"]["Arn"])


@pytest.fixture(scope="module")
def kek_arn(kms_emulator: KmsEmulator) -> str:
    meta = admin(kms_emulator).create_key(KeyUsage="ENCRYPT_DECRYPT", KeySpec="SYMMETRIC_DEFAULT")["KeyMetadata"]
    return str(meta["Arn"])


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYSEAL_KMS_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("KEYSEAL_KMS_READ_TIMEOUT", "1")


def one_line(exc: pytest.ExceptionInfo[KeysealError]) -> str:
    message = str(exc.value)
    assert message and "\n" not in message and "Traceback" not in message
    return message


def digest() -> bytes:
    return hashlib.sha256(b"release").digest()


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("attempts", [1, 3])
def test_sign_fault_is_retried_then_reported(fault: str, attempts: int, signing_key: str, aws_env: dict[str, str],
                                             kms_emulator: KmsEmulator, inject: Callable[..., Injector], fast: None,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    if fault == "throttling" and attempts == 3:
        attempts = 2  # throttling backs off for up to 1 s, then 2 s: keep the test short
    monkeypatch.setenv("KEYSEAL_KMS_MAX_ATTEMPTS", str(attempts))
    injector = inject("Sign", fault)
    signer = open_signer(f"awskms:{signing_key}")
    signer.public_key()
    with pytest.raises(BackendUnavailableError) as exc:
        signer.sign_digest(digest(), "sha256")
    message = one_line(exc)
    assert injector.attempts == attempts
    assert kms_emulator.calls.counts()["Sign"] == 0  # no attempt reached the server
    assert "Sign" in message and signing_key in message and kms_emulator.endpoint in message, message
    for word in EXPECTED_WORDS[fault]:
        assert word in message, message


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_sign_recovers_within_the_attempt_budget(fault: str, signing_key: str, aws_env: dict[str, str],
                                                 kms_emulator: KmsEmulator, inject: Callable[..., Injector],
                                                 fast: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYSEAL_KMS_MAX_ATTEMPTS", "3")
    failures = 1 if fault == "throttling" else 2
    injector = inject("Sign", fault, failures)
    signer = open_signer(f"awskms:{signing_key}")
    signature = signer.sign_digest(digest(), "sha256")
    public = signer.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, digest(), ec.ECDSA(utils.Prehashed(SHA256())))
    assert injector.attempts == failures + 1
    assert kms_emulator.calls.counts()["Sign"] == 1


def test_get_public_key_read_timeout(signing_key: str, aws_env: dict[str, str], kms_emulator: KmsEmulator,
                                     inject: Callable[..., Injector], fast: None,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYSEAL_KMS_MAX_ATTEMPTS", "4")
    injector = inject("GetPublicKey", "read-timeout")
    with pytest.raises(BackendUnavailableError) as exc:
        open_signer(f"awskms:{signing_key}").sign_digest(digest(), "sha256")
    message = one_line(exc)
    assert injector.attempts == 4 and "GetPublicKey" in message and kms_emulator.endpoint in message
    assert kms_emulator.calls.counts()["Sign"] == 0


def test_kek_encrypt_throttled_writes_nothing(tmp_path: Path, kek_arn: str, aws_env: dict[str, str],
                                              kms_emulator: KmsEmulator, inject: Callable[..., Injector],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYSEAL_KMS_MAX_ATTEMPTS", "2")
    injector = inject("Encrypt", "throttling")
    store = DirectoryStore(tmp_path / "records", ledger=VersionLedger())
    with pytest.raises(BackendUnavailableError) as exc:
        create_record(store, "ca", generate_private_key("p256"), AwsKmsKek(kek_arn))
    message = one_line(exc)
    assert injector.attempts == 2 and "Encrypt" in message and kek_arn in message
    assert kms_emulator.endpoint in message
    assert not (tmp_path / "records").exists() or list((tmp_path / "records").iterdir()) == []


@pytest.mark.parametrize("fault", ["500", "connection-dropped"])
def test_kek_decrypt_fault_when_opening(fault: str, tmp_path: Path, kek_arn: str, aws_env: dict[str, str],
                                        kms_emulator: KmsEmulator, inject: Callable[..., Injector], fast: None,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    store = DirectoryStore(tmp_path / "records", ledger=VersionLedger())
    create_record(store, "ca", generate_private_key("p256"), AwsKmsKek(kek_arn))
    monkeypatch.setenv("KEYSEAL_KMS_MAX_ATTEMPTS", "3")
    injector = inject("Decrypt", fault)
    with pytest.raises(BackendUnavailableError) as exc:
        open_record(store, "ca", AwsKmsKek(kek_arn))
    message = one_line(exc)
    assert injector.attempts == 3 and "Decrypt" in message and kms_emulator.endpoint in message
    # Once KMS answers again, the same record opens: a fault is never mistaken for tampering.
    monkeypatch.setattr(botocore.handlers, "BUILTIN_HANDLERS", botocore.handlers.BUILTIN_HANDLERS[:-1])
    assert open_record(store, "ca", AwsKmsKek(kek_arn)).record.name == "ca"


# -- faults over HTTP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "status"), [("ServiceUnavailableException", 503), ("ThrottlingException", 400)])
def test_emulator_faults_counted_by_the_server(code: str, status: int, signing_key: str, aws_env: dict[str, str],
                                               kms_emulator: KmsEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYSEAL_KMS_MAX_ATTEMPTS", "2")
    signer = open_signer(f"awskms:{signing_key}")
    signer.public_key()
    kms_emulator.fail("Sign", times=5, code=code, status=status)
    with pytest.raises(BackendUnavailableError) as exc:
        signer.sign_digest(digest(), "sha256")
    message = one_line(exc)
    assert kms_emulator.calls.counts()["Sign"] == 2
    assert code in message and kms_emulator.endpoint in message and "Sign" in message
    kms_emulator.allow_all()
    signer.sign_digest(digest(), "sha256")  # the same signer works once the server does
    assert kms_emulator.calls.counts()["Sign"] == 3


def test_emulator_decrypt_throttled_then_recovers(tmp_path: Path, kek_arn: str, aws_env: dict[str, str],
                                                  kms_emulator: KmsEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    store = DirectoryStore(tmp_path / "records", ledger=VersionLedger())
    create_record(store, "ca", generate_private_key("ed25519"), AwsKmsKek(kek_arn))
    monkeypatch.setenv("KEYSEAL_KMS_MAX_ATTEMPTS", "3")
    kms_emulator.calls.clear()
    kms_emulator.fail("Decrypt", times=1)
    assert open_record(store, "ca", AwsKmsKek(kek_arn)).record.version == 1
    assert kms_emulator.calls.counts()["Decrypt"] == 2


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """Accepts connections (the kernel's backlog) but never answers: every read times out."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Injector]:
    """A before-send hook that only counts attempts (never injects): for faults made by the network."""

    def install(operation: str) -> Injector:
        injector = Injector("500", times=0)
        handlers = [*botocore.handlers.BUILTIN_HANDLERS, (f"before-send.kms.{operation}", injector)]
        monkeypatch.setattr(botocore.handlers, "BUILTIN_HANDLERS", handlers)
        return injector

    return install


def test_real_connection_refused_is_retried(signing_key: str, aws_env: dict[str, str], fast: None,
                                            counter: Callable[[str], Injector],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("KEYSEAL_KMS_MAX_ATTEMPTS", "3")
    attempts = counter("GetPublicKey")
    with pytest.raises(BackendUnavailableError) as exc:
        open_signer(f"awskms:{signing_key}", BackendOptions(kms_endpoint=endpoint)).public_key()
    message = one_line(exc)
    assert attempts.attempts == 3
    assert f"cannot reach AWS KMS at {endpoint}" in message and "GetPublicKey" in message


def test_real_read_timeout_is_retried_within_the_configured_time(signing_key: str, aws_env: dict[str, str],
                                                                 silent_endpoint: str,
                                                                 counter: Callable[[str], Injector],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYSEAL_KMS_READ_TIMEOUT", "0.4")
    monkeypatch.setenv("KEYSEAL_KMS_MAX_ATTEMPTS", "2")
    attempts = counter("GetPublicKey")
    started = time.monotonic()
    with pytest.raises(BackendUnavailableError) as exc:
        open_signer(f"awskms:{signing_key}", BackendOptions(kms_endpoint=silent_endpoint)).public_key()
    elapsed = time.monotonic() - started
    message = one_line(exc)
    assert attempts.attempts == 2
    assert "timed out" in message and silent_endpoint in message and "GetPublicKey" in message
    assert 0.75 <= elapsed < 5, elapsed  # two reads of 0.4 s and a short backoff, not the 20 s default


# -- the CLI: no partial output when Sign fails mid-way -----------------------------------------------------


class FaultyProxy:
    """A proxy on 127.0.0.1 in front of the emulator: forwards every request, except that after `ok_signs`
    successful Sign calls it answers Sign with HTTP 500 or drops the connection unanswered."""

    def __init__(self, upstream: str, ok_signs: int, mode: str) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.ok_signs = ok_signs
        self.mode = mode
        self.lock = threading.Lock()
        self.sign_attempts = 0
        self.signs_forwarded = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                operation = self.headers.get("X-Amz-Target", "").rpartition(".")[2]
                if operation == "Sign":
                    with proxy.lock:
                        proxy.sign_attempts += 1
                        allowed = proxy.signs_forwarded < proxy.ok_signs
                        proxy.signs_forwarded += allowed
                    if not allowed:
                        if proxy.mode == "drop":
                            self.close_connection = True
                            return
                        data = json.dumps({"__type": "KMSInternalException", "message": "down"}).encode()
                        self._answer(500, [("Content-Type", "application/x-amz-json-1.1")], data)
                        return
                connection = http.client.HTTPConnection(proxy.upstream, timeout=30)
                connection.request("POST", self.path, body, dict(self.headers))
                answer = connection.getresponse()
                data = answer.read()
                headers = [(k, v) for k, v in answer.getheaders()
                           if k.lower() not in ("content-length", "transfer-encoding", "connection")]
                connection.close()
                self._answer(answer.status, headers, data)

            def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.mark.parametrize(("mode", "jobs"), [("500", "1"), ("drop", "4")])
def test_sign_failing_midway_leaves_no_partial_output(mode: str, jobs: str, tmp_path: Path, signing_key: str,
                                                      aws_env: dict[str, str], kms_emulator: KmsEmulator) -> None:
    minted = run_keyseal("keys", "mint", "--key", f"awskms:{signing_key}", "--name", "Faults",
                         "--email", "faults@example.org", "--created", "2024-01-01T00:00:00Z",
                         "-o", tmp_path / "cert.asc")
    assert minted.returncode == 0, minted.stderr
    work = tmp_path / "dist"
    work.mkdir()
    files = [work / f"tool-{i}.tar.gz" for i in range(6)]
    for index, path in enumerate(files):
        path.write_bytes(f"artifact {index}\n".encode() * 1000)
    before = {p.name for p in work.iterdir()}
    with FaultyProxy(kms_emulator.endpoint, ok_signs=2, mode=mode) as proxy:
        result = run_keyseal("sign", "--key", f"awskms:{signing_key}", "--cert", tmp_path / "cert.asc",
                             "--jobs", jobs, *files,
                             env={"AWS_ENDPOINT_URL_KMS": proxy.endpoint, "KEYSEAL_KMS_MAX_ATTEMPTS": "2",
                                  "KEYSEAL_KMS_READ_TIMEOUT": "5"})
    assert_one_line_error(result)
    assert "Sign" in result.stderr and proxy.endpoint in result.stderr, result.stderr
    assert proxy.signs_forwarded == 2
    assert proxy.sign_attempts == 2 + 2 * (len(files) - 2)  # every failed file used its two attempts
    written = sorted(p for p in work.iterdir() if p.name not in before)
    assert all(p.suffix == ".asc" for p in written), written  # no temporary file left behind
    assert len(written) == 2, written
    for signature in written:  # each one written is whole and verifies
        data = signature.with_suffix("")
        check = run_keyseal("verify", "--cert", tmp_path / "cert.asc", data, signature)
        assert check.returncode == 0, check.stderr
    assert not list(work.glob(".*"))

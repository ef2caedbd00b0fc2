"""A real KMS peer for tests: moto's server on 127.0.0.1, reached by boto3 over HTTP.

Two additions, both test-harness only:
- EMULATOR FIX: moto 5.x ignores `MessageType=DIGEST` and hashes the digest again. `_fix_digest_signing`
  makes it sign the digest as given (Prehashed), as AWS KMS does. keyseal is not changed to suit the emulator;
  tests verify every KMS signature with `cryptography` so that an emulator error cannot hide.
- Call counting: a WSGI middleware records each KMS operation (`X-Amz-Target`) so tests can assert how many
  remote calls a command made, even when the command ran in a child process.

A third, a harness feature (moto does not evaluate IAM in server mode):
- IAM-style denial: `emulator.deny(access_key_id, operation)` makes the server answer every KMS `operation`
  (e.g. "Sign") signed with that access key id (read from the SigV4 `Authorization` header) with HTTP 400
  `AccessDeniedException`, worded as AWS words it. Callers, including CLI child processes, see the real
  server error through boto3. Use a test-specific access key id (set AWS_ACCESS_KEY_ID) so other callers are
  unaffected; `"*"` as the operation denies every KMS operation. `emulator.allow_all()` lifts all denials.
- Fault injection: `emulator.fail(operation, times, code="ThrottlingException", status=400)` answers the next
  `times` calls of `operation` with that error (moto never throttles), so retries and the "still failing after
  retries" message are exercised over HTTP. `CallLog.callers` records (operation, access key id) per call.
  `fail(..., after=k)` lets the next k calls through first (e.g. fail the second CreateKey of a keyset).
- Periodic faults: `emulator.fail_every(operation, every, faults, per_request=1)` answers every `every`-th call
  of `operation` with the next (code, status) of `faults` in turn, for as long as it is set, but never fails the
  same request (same body: a retry resends it) more than `per_request` times. Soak tests: a steady rate of
  throttling and 5xx that a bounded retry always rides out. `emulator.faults_injected` counts them.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import io
import json
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils
from moto.kms import responses as kms_responses
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

_DIGEST_HASHES: dict[str, hashes.HashAlgorithm] = {
    "RSASSA_PKCS1_V1_5_SHA_256": hashes.SHA256(),
    "RSASSA_PKCS1_V1_5_SHA_384": hashes.SHA384(),
    "RSASSA_PKCS1_V1_5_SHA_512": hashes.SHA512(),
    "ECDSA_SHA_256": hashes.SHA256(),
    "ECDSA_SHA_384": hashes.SHA384(),
    "ECDSA_SHA_512": hashes.SHA512(),
}

_original_sign = kms_responses.KmsResponse.sign
_fix_lock = threading.Lock()
_fixed = False


def _sign_with_digest_fix(self: Any) -> str:
    """EMULATOR FIX: honour MessageType=DIGEST (sign the given digest, do not hash it again)."""
    if self._get_param("MessageType") != "DIGEST":
        return str(_original_sign(self))
    key_id = self._get_param("KeyId")
    algorithm = self._get_param("SigningAlgorithm")
    message = self._get_param("Message")
    digest = base64.b64decode(message) if isinstance(message, str) else bytes(message)
    self._validate_key_id(key_id)
    key = self.kms_backend.describe_key(key_id)
    # Let moto apply its own checks (key usage, algorithm offered by the key, disabled state) on a dummy sign.
    self.kms_backend.sign(key_id=key_id, message=b"x", signing_algorithm=algorithm)
    hash_alg = _DIGEST_HASHES[algorithm]
    if len(digest) != hash_alg.digest_size:
        from moto.kms.exceptions import ValidationException

        raise ValidationException("Digest is invalid length for algorithm " + algorithm)
    private = key.private_key.private_key
    if algorithm.startswith("RSASSA_PKCS1"):
        signature = private.sign(digest, padding.PKCS1v15(), utils.Prehashed(hash_alg))
    else:
        signature = private.sign(digest, ec.ECDSA(utils.Prehashed(hash_alg)))
    return json.dumps(
        {
            "KeyId": key.arn,
            "Signature": base64.b64encode(signature).decode(),
            "SigningAlgorithm": algorithm,
        }
    )


def _fix_digest_signing() -> None:
    global _fixed  # noqa: PLW0603 - one process-wide patch of the emulator
    with _fix_lock:
        if not _fixed:
            kms_responses.KmsResponse.sign = _sign_with_digest_fix
            _fixed = True


class CallLog:
    """KMS operations seen by the emulator, in order, e.g. ['GetPublicKey', 'Sign']."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: list[str] = []
        self.callers: list[tuple[str, str]] = []

    def record(self, operation: str, access_key_id: str = "") -> None:
        with self._lock:
            self.calls.append(operation)
            self.callers.append((operation, access_key_id))

    def counts(self) -> collections.Counter[str]:
        with self._lock:
            return collections.Counter(self.calls)

    def clear(self) -> None:
        with self._lock:
            self.calls.clear()
            self.callers.clear()


class DenyList:
    """Harness feature: (access key id, KMS operation) pairs the emulator refuses, as IAM would; and
    injected failures (operation -> remaining count, error code, HTTP status)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._denied: set[tuple[str, str]] = set()
        self._faults: dict[str, tuple[int, str, int]] = {}
        self._skips: dict[str, int] = {}
        self._periodic: dict[str, tuple[int, tuple[tuple[str, int], ...], int]] = {}
        self._per_request: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self._seen: collections.Counter[str] = collections.Counter()
        self.injected: collections.Counter[str] = collections.Counter()

    def add_fault(self, operation: str, times: int, code: str, status: int, after: int = 0) -> None:
        with self._lock:
            self._faults[operation] = (times, code, status)
            self._skips[operation] = after

    def add_periodic(self, operation: str, every: int, faults: tuple[tuple[str, int], ...],
                     per_request: int) -> None:
        with self._lock:
            self._periodic[operation] = (every, faults, per_request)
            self._seen[operation] = 0

    def periodic(self, operation: str) -> bool:
        with self._lock:
            return operation in self._periodic

    def take_fault(self, operation: str, request: bytes | None = None) -> tuple[str, int] | None:
        with self._lock:
            periodic = self._periodic.get(operation)
            if periodic is not None:
                every, faults, per_request = periodic
                self._seen[operation] += 1
                failed = self._per_request.get(request, 0) if request is not None else 0
                if self._seen[operation] % every == 0 and failed < per_request:
                    if request is not None:
                        self._per_request[request] = failed + 1
                        self._per_request.move_to_end(request)
                        while len(self._per_request) > 100_000:  # bounded memory over a long soak
                            self._per_request.popitem(last=False)
                    self.injected[operation] += 1
                    return faults[(self._seen[operation] // every - 1) % len(faults)]
            left, code, status = self._faults.get(operation, (0, "", 0))
            if left <= 0:
                return None
            if self._skips.get(operation, 0) > 0:
                self._skips[operation] -= 1
                return None
            self._faults[operation] = (left - 1, code, status)
            self.injected[operation] += 1
            return code, status

    def add(self, access_key_id: str, operation: str) -> None:
        with self._lock:
            self._denied.add((access_key_id, operation))

    def clear(self) -> None:
        with self._lock:
            self._denied.clear()
            self._faults.clear()
            self._skips.clear()
            self._periodic.clear()
            self._seen.clear()
            self._per_request.clear()
            self.injected.clear()

    def denies(self, access_key_id: str, operation: str) -> bool:
        with self._lock:
            return (access_key_id, operation) in self._denied or (access_key_id, "*") in self._denied


_CREDENTIAL_RE = re.compile(r"Credential=([^/,\s]+)/")


def _access_key_id(environ: dict[str, Any]) -> str:
    match = _CREDENTIAL_RE.search(environ.get("HTTP_AUTHORIZATION", ""))
    return match.group(1) if match else ""


class _CountingApp:
    def __init__(self, app: Callable[..., Iterable[bytes]], log: CallLog, denials: DenyList) -> None:
        self.app = app
        self.log = log
        self.denials = denials

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        if target.startswith("TrentService."):
            operation = target.split(".", 1)[1]
            access_key_id = _access_key_id(environ)
            self.log.record(operation, access_key_id)
            if self.denials.denies(access_key_id, operation):
                return _access_denied(start_response, access_key_id, operation)
            request = None
            if self.denials.periodic(operation):  # identify the request by its body, which a retry resends
                body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
                environ["wsgi.input"] = io.BytesIO(body)
                request = hashlib.sha256(body).digest()
            fault = self.denials.take_fault(operation, request)
            if fault is not None:
                code, status = fault
                return _json_error(start_response, status, code, f"{code}: injected by the test harness")
        return self.app(environ, start_response)


def _access_denied(start_response: Callable[..., Any], access_key_id: str, operation: str) -> Iterable[bytes]:
    """HARNESS FEATURE: the AccessDeniedException AWS KMS returns when IAM does not allow the call."""
    message = (
        f"User: arn:aws:sts::123456789012:assumed-role/denied/{access_key_id} is not authorized to "
        f"perform: kms:{operation} on this resource because no identity-based policy allows the "
        f"kms:{operation} action"
    )
    return _json_error(start_response, 400, "AccessDeniedException", message)


def _json_error(start_response: Callable[..., Any], status: int, code: str, message: str) -> Iterable[bytes]:
    """An AWS JSON-protocol error response, as boto3 parses it."""
    body = json.dumps({"__type": code, "message": message}).encode()
    reasons = {400: "Bad Request", 500: "Internal Server Error", 503: "Service Unavailable"}
    reason = reasons.get(status, "Error")
    start_response(
        f"{status} {reason}",
        [
            ("Content-Type", "application/x-amz-json-1.1"),
            ("Content-Length", str(len(body))),
            ("x-amzn-RequestId", "00000000-0000-0000-0000-000000000000"),
        ],
    )
    return [body]


class KmsEmulator:
    """moto's KMS (and STS) on an ephemeral 127.0.0.1 port, in a daemon thread."""

    def __init__(self) -> None:
        _fix_digest_signing()
        self.calls = CallLog()
        self.denials = DenyList()
        app = _CountingApp(DomainDispatcherApplication(create_backend_app), self.calls, self.denials)
        self._server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> KmsEmulator:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=10)

    def deny(self, access_key_id: str, operation: str) -> None:
        """HARNESS FEATURE: answer `operation` ("Sign", or "*" for all) from this access key id with
        AccessDeniedException, as IAM would for a role that lacks kms:<operation>."""
        self.denials.add(access_key_id, operation)

    def fail(self, operation: str, times: int, code: str = "ThrottlingException", status: int = 400,
             after: int = 0) -> None:
        """HARNESS FEATURE: answer the next `times` calls of `operation` with error `code` / HTTP `status`,
        after letting `after` calls through."""
        self.denials.add_fault(operation, times, code, status, after)

    def fail_every(self, operation: str, every: int, faults: Iterable[tuple[str, int]],
                   per_request: int = 1) -> None:
        """HARNESS FEATURE: answer every `every`-th call of `operation` with the next (code, HTTP status) of
        `faults`, in turn, until `allow_all()`; one request (its body) is failed at most `per_request` times,
        so a client that retries more often than that always succeeds."""
        self.denials.add_periodic(operation, every, tuple(faults), per_request)

    @property
    def faults_injected(self) -> collections.Counter[str]:
        """How many calls of each operation were answered with an injected fault."""
        return self.denials.injected

    def allow_all(self) -> None:
        """Lift every denial made with `deny` and every fault set with `fail` or `fail_every` (and reset
        `faults_injected`)."""
        self.denials.clear()

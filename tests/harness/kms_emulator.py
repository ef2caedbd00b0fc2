"""A real KMS peer for tests: moto's server on 127.0.0.1, reached by boto3 over HTTP.

Two additions, both test-harness only:
- EMULATOR FIX: moto 5.x ignores `MessageType=DIGEST` and hashes the digest again. `_fix_digest_signing`
  makes it sign the digest as given (Prehashed), as AWS KMS does. keyseal is not changed to suit the emulator;
  tests verify every KMS signature with `cryptography` so that an emulator error cannot hide.
- Call counting: a WSGI middleware records each KMS operation (`X-Amz-Target`) so tests can assert how many
  remote calls a command made, even when the command ran in a child process.
"""

from __future__ import annotations

import base64
import collections
import json
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

    def record(self, operation: str) -> None:
        with self._lock:
            self.calls.append(operation)

    def counts(self) -> collections.Counter[str]:
        with self._lock:
            return collections.Counter(self.calls)

    def clear(self) -> None:
        with self._lock:
            self.calls.clear()


class _CountingApp:
    def __init__(self, app: Callable[..., Iterable[bytes]], log: CallLog) -> None:
        self.app = app
        self.log = log

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        if target.startswith("TrentService."):
            self.log.record(target.split(".", 1)[1])
        return self.app(environ, start_response)


class KmsEmulator:
    """moto's KMS (and STS) on an ephemeral 127.0.0.1 port, in a daemon thread."""

    def __init__(self) -> None:
        _fix_digest_signing()
        self.calls = CallLog()
        app = _CountingApp(DomainDispatcherApplication(create_backend_app), self.calls)
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

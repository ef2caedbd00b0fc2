"""The pkcs11: backend against a real SoftHSM2 token: keys made in the token, signatures checked by `cryptography`."""

from __future__ import annotations

import hashlib
import logging
import os
import pty
import select
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from keyseal._internal.backends import open_signer
from keyseal._internal.backends import pkcs11 as backend
from keyseal._internal.providers.pkcs11 import session as pkcs11_session
from keyseal.errors import (
    AccessDeniedError,
    BackendUnavailableError,
    InputError,
    KeyNotFoundError,
    KeysealError,
    KeyURIError,
    OutputExistsError,
    UnsupportedKeyError,
    UsageError,
)
from keyseal.signer import HashName, PublicKey, hash_algorithm
from tests.harness.softhsm import USER_PIN, SoftHsm

TOKEN = "keyseal-test"
OTHER_TOKEN = "keyseal-other"  # never logged in to by keyseal before test_wrong_pin
KEY_TYPES = ("rsa2048", "p256", "p384", "p521", "ed25519")


@pytest.fixture(scope="session")
def token(softhsm: SoftHsm) -> str:
    """Both tokens are made before any test loads the module: SoftHSM lists only tokens that existed then."""
    softhsm.init_token(OTHER_TOKEN)
    return softhsm.init_token(TOKEN)


@pytest.fixture
def pin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pkcs11_session.PIN_ENV, USER_PIN)
    monkeypatch.delenv(pkcs11_session.MODULE_ENV, raising=False)


@pytest.fixture(scope="session")
def keys(softhsm: SoftHsm, token: str) -> dict[str, str]:
    """One key of each type, made once in the token: key type -> URI (the PIN comes from the environment)."""
    os.environ[pkcs11_session.PIN_ENV] = USER_PIN
    try:
        uris = {}
        for key_type in KEY_TYPES:
            uri = softhsm.uri(token, f"session-{key_type}")
            backend.create_key(uri, key_type)
            uris[key_type] = uri
    finally:
        del os.environ[pkcs11_session.PIN_ENV]
    return uris


@pytest.fixture(autouse=True)
def no_leaked_sessions() -> Iterator[None]:
    """Every test closes what it opens: afterwards no keyseal session is left on any token."""
    yield
    leaked = list(pkcs11_session._SESSIONS)
    pkcs11_session.close_all_sessions()
    assert not leaked, f"sessions left open: {leaked}"


def verify(public_key: PublicKey, signature: bytes, digest: bytes, hash_name: HashName) -> None:
    """Check a signature the way an OpenPGP verifier does: over the digest, never the data."""
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        public_key.verify(signature, digest)
        assert len(signature) == 64
        return
    prehashed = utils.Prehashed(hash_algorithm(hash_name))
    if isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(signature, digest, padding.PKCS1v15(), prehashed)
    else:
        utils.decode_dss_signature(signature)  # DER, as the Signer contract says
        public_key.verify(signature, digest, ec.ECDSA(prehashed))


# Every key type signing every hash, verified independently: tests/test_signer_contract.py.


def test_public_key_types(keys: dict[str, str], pin_env: None) -> None:
    expected = {"rsa2048": (rsa.RSAPublicKey, 2048), "p256": (ec.EllipticCurvePublicKey, 256),
                "p384": (ec.EllipticCurvePublicKey, 384), "p521": (ec.EllipticCurvePublicKey, 521),
                "ed25519": (ed25519.Ed25519PublicKey, None)}
    for key_type, (cls, size) in expected.items():
        with open_signer(keys[key_type]) as signer:
            public_key = signer.public_key()
            assert isinstance(public_key, cls)
            assert signer.public_key() is public_key  # cached
            if size is not None:
                assert public_key.key_size == size  # type: ignore[union-attr]
            assert signer.created_at() is None


def test_wrong_digest_length_is_a_clear_error(keys: dict[str, str], pin_env: None) -> None:
    with open_signer(keys["p256"]) as signer, pytest.raises(UsageError, match="sha256 digest is 32 bytes, not 20"):
        signer.sign_digest(b"x" * 20, "sha256")


@pytest.mark.slow
@pytest.mark.parametrize("key_type", ["rsa2048", "p384", "ed25519"])
def test_concurrent_signing_on_one_session(keys: dict[str, str], pin_env: None, key_type: str) -> None:
    threads_n, per_thread = 8, 25
    results: dict[int, tuple[bytes, bytes]] = {}
    errors: list[BaseException] = []
    with open_signer(keys[key_type]) as signer:
        public_key = signer.public_key()
        start = threading.Barrier(threads_n)

        def work(worker: int) -> None:
            try:
                start.wait()
                for i in range(per_thread):
                    digest = hashlib.sha256(f"file {worker}-{i}".encode()).digest()
                    results[worker * per_thread + i] = (digest, signer.sign_digest(digest, "sha256"))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(threads_n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(pkcs11_session._SESSIONS) == 1  # one logged-in session served every thread
    assert not errors, errors
    assert len(results) == threads_n * per_thread
    for digest, signature in results.values():
        verify(public_key, signature, digest, "sha256")


def test_signers_share_one_session_until_the_last_closes(keys: dict[str, str], pin_env: None) -> None:
    first = open_signer(keys["p256"])
    second = open_signer(keys["ed25519"])
    assert len(pkcs11_session._SESSIONS) == 1
    shared = next(iter(pkcs11_session._SESSIONS.values()))
    assert shared.refs == 2
    first.close()
    first.close()  # twice is harmless
    digest = hashlib.sha256(b"x").digest()
    verify(second.public_key(), second.sign_digest(digest, "sha256"), digest, "sha256")
    second.close()
    assert shared.closed
    assert not pkcs11_session._SESSIONS
    with pytest.raises(UsageError, match="closed"):
        second.sign_digest(digest, "sha256")


def test_close_all_sessions_closes_open_signers(keys: dict[str, str], pin_env: None) -> None:
    signer = open_signer(keys["p256"])
    pkcs11_session.close_all_sessions()  # what runs at interpreter exit
    assert not pkcs11_session._SESSIONS
    with pytest.raises(UsageError, match="closed"):
        signer.sign_digest(hashlib.sha256(b"x").digest(), "sha256")
    signer.close()


def test_private_key_cannot_be_read(softhsm: SoftHsm, keys: dict[str, str]) -> None:
    """Looked at with python-pkcs11 directly, not through keyseal: the value never leaves the token."""
    import pkcs11

    attribute = pkcs11.Attribute
    lib = pkcs11.lib(softhsm.module)
    with lib.get_token(token_label=TOKEN).open(user_pin=USER_PIN) as session:
        for key_type in KEY_TYPES:
            private = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, label=f"session-{key_type}")
            secret = attribute.PRIVATE_EXPONENT if key_type.startswith("rsa") else attribute.VALUE
            with pytest.raises(pkcs11.AttributeSensitive):
                private[secret]
            if key_type.startswith("rsa"):
                for part in (attribute.PRIME_1, attribute.PRIME_2, attribute.COEFFICIENT):
                    with pytest.raises(pkcs11.AttributeSensitive):
                        private[part]
            assert private[attribute.NEVER_EXTRACTABLE] is True
            assert private[attribute.EXTRACTABLE] is False
            assert private[attribute.SENSITIVE] is True
            assert private[attribute.ALWAYS_SENSITIVE] is True
            assert private[attribute.PRIVATE] is True
            assert private[attribute.TOKEN] is True
            assert private[attribute.DECRYPT] is False
            assert private[attribute.DERIVE] is False
            with pytest.raises(pkcs11.PKCS11Error):  # no wrapping it out either
                private[attribute.EXTRACTABLE] = True
            public = session.get_key(object_class=pkcs11.ObjectClass.PUBLIC_KEY, label=f"session-{key_type}")
            assert public[attribute.ID] == private[attribute.ID] != b""


@pytest.mark.slow
def test_private_key_invisible_without_login(softhsm: SoftHsm, keys: dict[str, str]) -> None:
    import pkcs11

    lib = pkcs11.lib(softhsm.module)
    with lib.get_token(token_label=TOKEN).open() as session:
        found = list(session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY}))
    assert found == []


def test_create_refuses_an_existing_label(softhsm: SoftHsm, keys: dict[str, str], pin_env: None) -> None:
    with pytest.raises(OutputExistsError, match="already holds an object labelled 'session-p256'"):
        backend.create_key(keys["p256"], "p384")
    with open_signer(keys["p256"]) as signer:  # the old key is untouched
        assert isinstance(signer.public_key(), ec.EllipticCurvePublicKey)
        assert signer.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]


def test_create_with_id_and_open_by_id(softhsm: SoftHsm, token: str, pin_env: None) -> None:
    label = f"by-id-{uuid.uuid4().hex[:8]}"
    key_id = os.urandom(8)
    hex_id = "".join(f"%{b:02x}" for b in key_id)
    uri = f"pkcs11:token={token};object={label};id={hex_id}?module-path={softhsm.module}"
    backend.create_key(uri, "p256")
    with pytest.raises(OutputExistsError, match="id"):
        backend.create_key(f"pkcs11:token={token};object=other-{label};id={hex_id}?module-path={softhsm.module}",
                           "p256")
    by_id = f"pkcs11:token={token};id={hex_id}?module-path={softhsm.module}"
    with open_signer(by_id) as signer:
        digest = hashlib.sha256(b"by id").digest()
        verify(signer.public_key(), signer.sign_digest(digest, "sha256"), digest, "sha256")


def test_create_errors(softhsm: SoftHsm, token: str, pin_env: None) -> None:
    with pytest.raises(UsageError, match="unknown key type 'dsa1024'"):
        backend.create_key(softhsm.uri(token, "x"), "dsa1024")
    with pytest.raises(KeyURIError, match="needs object=LABEL"):
        backend.create_key(softhsm.uri(token), "p256")


def test_token_that_cannot_make_ed25519(softhsm: SoftHsm, token: str, tmp_path: Path) -> None:
    """SoftHSM with its EdDSA mechanisms switched off: a real token that lacks them (needs its own process)."""
    conf = softhsm.write_conf(tmp_path / "no-eddsa.conf", ("CKM_EC_EDWARDS_KEY_PAIR_GEN", "CKM_EDDSA"))
    code = (
        "import sys\n"
        "from keyseal._internal.backends.pkcs11 import create_key\n"
        "from keyseal.errors import KeysealError\n"
        "try:\n"
        "    create_key(sys.argv[1], 'ed25519')\n"
        "except KeysealError as exc:\n"
        "    print(type(exc).__name__, exc.message)\n"
    )
    env = {**os.environ, **softhsm.env(conf), pkcs11_session.PIN_ENV: USER_PIN}
    proc = subprocess.run([sys.executable, "-c", code, softhsm.uri(token, "no-ed25519")], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("UnsupportedKeyError "), proc.stdout
    assert "cannot make ed25519 keys" in proc.stdout
    assert "CKM_EDDSA" in proc.stdout or "EDDSA" in proc.stdout


# --- errors: each a typed KeysealError, one line, never the PIN -----------------------------------------------


def assert_clean(exc: KeysealError, *secrets: str) -> None:
    message = str(exc)
    assert message and "\n" not in message
    for secret in (USER_PIN, *secrets):
        assert secret not in message
        assert secret not in repr(exc)


def test_wrong_pin(softhsm: SoftHsm, keys: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                   caplog: pytest.LogCaptureFixture) -> None:
    label = OTHER_TOKEN  # no keyseal session is open on it, so the token itself checks the PIN
    wrong = "not-the-pin-4321"
    monkeypatch.setenv(pkcs11_session.PIN_ENV, wrong)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(AccessDeniedError, match=f"wrong PIN for PKCS#11 token '{label}'") as info:
        open_signer(softhsm.uri(label, "any"))
    assert_clean(info.value, wrong)
    assert wrong not in caplog.text and USER_PIN not in caplog.text


def test_pin_differing_from_the_open_session(softhsm: SoftHsm, keys: dict[str, str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pkcs11_session.PIN_ENV, USER_PIN)
    with open_signer(keys["p256"]):
        monkeypatch.setenv(pkcs11_session.PIN_ENV, "another-pin-0000")
        with pytest.raises(AccessDeniedError, match="wrong PIN") as info:
            open_signer(keys["p384"])
        assert_clean(info.value, "another-pin-0000")


def test_pin_source_file(softhsm: SoftHsm, keys: dict[str, str], tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pkcs11_session.PIN_ENV, raising=False)
    pin_file = tmp_path / "pin"
    pin_file.write_text(USER_PIN + "\n")
    for source in (f"file:{pin_file}", f"file://{pin_file}", str(pin_file)):
        with open_signer(softhsm.uri(TOKEN, "session-p256", pin_source=source)) as signer:
            assert isinstance(signer.public_key(), ec.EllipticCurvePublicKey)
            assert USER_PIN not in signer.uri
    with pytest.raises(InputError, match="does not exist") as info:
        open_signer(softhsm.uri(TOKEN, "session-p256", pin_source=f"file:{tmp_path / 'absent'}"))
    assert_clean(info.value)
    pin_file.write_text("")
    with pytest.raises(InputError, match="is empty"):
        open_signer(softhsm.uri(TOKEN, "session-p256", pin_source=f"file:{pin_file}"))
    with pytest.raises(KeyURIError, match="pin-source must name a file"):
        open_signer(softhsm.uri(TOKEN, "session-p256", pin_source="|/bin/echo"))


def test_pin_value_works_with_a_warning_that_hides_it(softhsm: SoftHsm, keys: dict[str, str],
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(pkcs11_session.PIN_ENV, raising=False)
    caplog.set_level(logging.DEBUG)
    uri = softhsm.uri(TOKEN, "session-ed25519", pin_value=USER_PIN)
    with open_signer(uri) as signer:
        assert USER_PIN not in signer.uri
        assert "pin-value=REDACTED" in signer.uri
    assert "pin-value= in a PKCS#11 URI shows the PIN" in caplog.text
    assert USER_PIN not in caplog.text
    with pytest.raises(KeyNotFoundError) as info:
        open_signer(softhsm.uri(TOKEN, "no-such-key", pin_value=USER_PIN))
    assert_clean(info.value)


def test_no_pin_and_no_terminal(softhsm: SoftHsm, keys: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pkcs11_session.PIN_ENV, raising=False)
    monkeypatch.setattr(sys, "stdin", open(os.devnull))  # noqa: SIM115 - closed by pytest's monkeypatch undo
    with pytest.raises(UsageError, match=f"needs a user PIN: set {pkcs11_session.PIN_ENV}"):
        open_signer(keys["p256"])


def test_pin_prompt_on_a_terminal(softhsm: SoftHsm, keys: dict[str, str]) -> None:
    """A child on a real pseudo-terminal is asked for the PIN; what it prints never holds the PIN."""
    code = (
        "import hashlib, sys\n"
        "from keyseal._internal.backends import open_signer\n"
        "with open_signer(sys.argv[1]) as s:\n"
        "    s.sign_digest(hashlib.sha256(b'x').digest(), 'sha256')\n"
        "    print('SIGNED-OK', flush=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != pkcs11_session.PIN_ENV}
    pid, fd = pty.fork()
    if pid == 0:  # child: the pty is its controlling terminal
        os.execve(sys.executable, [sys.executable, "-c", code, keys["p256"]], env)
    output = b""
    sent = False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
            if not sent and b"User PIN for PKCS#11 token" in output:
                os.write(fd, USER_PIN.encode() + b"\n")
                sent = True
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    text = output.decode(errors="replace")
    assert sent, text
    assert "SIGNED-OK" in text, text
    assert USER_PIN not in text  # the terminal did not echo it
    assert os.waitstatus_to_exitcode(status) == 0


def test_missing_module(softhsm: SoftHsm, keys: dict[str, str], pin_env: None, tmp_path: Path) -> None:
    absent = str(tmp_path / "libabsent.so")
    with pytest.raises(BackendUnavailableError, match="does not exist") as info:
        open_signer(softhsm.uri(TOKEN, "session-p256", module=absent))
    assert_clean(info.value)
    not_a_library = tmp_path / "notes.so"
    not_a_library.write_text("not a shared object\n")
    with pytest.raises(BackendUnavailableError, match="is not a PKCS#11 module") as info:
        open_signer(softhsm.uri(TOKEN, "session-p256", module=str(not_a_library)))
    assert_clean(info.value)
    libz = next(p for p in ("/usr/lib/x86_64-linux-gnu/libz.so.1", "/lib/x86_64-linux-gnu/libz.so.1",
                            "/usr/lib/aarch64-linux-gnu/libz.so.1") if os.path.exists(p))
    with pytest.raises(BackendUnavailableError, match=r"is not a PKCS#11 module.*C_GetFunctionList"):
        open_signer(softhsm.uri(TOKEN, "session-p256", module=libz))


def test_module_from_environment(softhsm: SoftHsm, keys: dict[str, str], pin_env: None,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"pkcs11:token={TOKEN};object=session-p384"
    with pytest.raises(UsageError,
                       match=f"add module-path=/path/to/module.so to the URI or set {pkcs11_session.MODULE_ENV}"):
        open_signer(uri)
    monkeypatch.setenv(pkcs11_session.MODULE_ENV, softhsm.module)
    with open_signer(uri) as signer:
        assert isinstance(signer.public_key(), ec.EllipticCurvePublicKey)
    with pytest.raises(KeyURIError, match="module-name= is not supported"):
        open_signer(uri + "?module-name=softhsm2")


def test_unknown_token_and_object(softhsm: SoftHsm, keys: dict[str, str], pin_env: None) -> None:
    with pytest.raises(KeyNotFoundError, match=f"no PKCS#11 token matches token='nope'.*'{TOKEN}'") as info:
        open_signer(softhsm.uri("nope", "session-p256"))
    assert_clean(info.value)
    with pytest.raises(KeyNotFoundError, match="no private key object='nope' on token") as info:
        open_signer(softhsm.uri(TOKEN, "nope"))
    assert_clean(info.value)
    with pytest.raises(KeyURIError, match="names no key"):
        open_signer(softhsm.uri(TOKEN))
    with pytest.raises(UnsupportedKeyError, match="type='cert'"):
        open_signer(f"pkcs11:token={TOKEN};object=session-p256;type=cert?module-path={softhsm.module}")


def test_several_tokens_need_a_label(softhsm: SoftHsm, keys: dict[str, str], pin_env: None) -> None:
    with pytest.raises(KeyURIError, match=r"PKCS#11 tokens match \(any token\)"):
        open_signer(f"pkcs11:object=session-p256?module-path={softhsm.module}")


def test_token_attributes_select_the_token(softhsm: SoftHsm, keys: dict[str, str], pin_env: None) -> None:
    uri = (f"pkcs11:token={TOKEN};manufacturer=SoftHSM%20project;model=SoftHSM%20v2;"
           f"library-manufacturer=SoftHSM;object=session-p256;type=private?module-path={softhsm.module}")
    with open_signer(uri) as signer:
        assert isinstance(signer.public_key(), ec.EllipticCurvePublicKey)
    with pytest.raises(KeyNotFoundError):
        open_signer(f"pkcs11:token={TOKEN};model=Other;object=session-p256?module-path={softhsm.module}")


def test_uri_syntax_error_hides_the_pin(softhsm: SoftHsm, pin_env: None) -> None:
    with pytest.raises(KeyURIError, match="must be percent-encoded") as info:
        open_signer(f"pkcs11:token=a b;object=x?module-path={softhsm.module}&pin-value={USER_PIN}")
    assert_clean(info.value)


def test_import_keyseal_backends_loads_no_pkcs11() -> None:
    code = ("import sys, keyseal, keyseal._internal.backends, keyseal._internal.providers.pkcs11.uri\n"
            "print('pkcs11' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.strip() == "False"


def test_a_pin_that_is_not_utf8_is_not_shown_by_the_causes(softhsm: SoftHsm, keys: dict[str, str],
                                                           tmp_path: Path) -> None:
    """A PIN in another encoding (`12\\xe934`, Latin-1 `12é34`) is refused; the decoder's own words name the byte
    it stopped at, so `keyseal -v`'s causes must not repeat them."""
    pin_file = tmp_path / "pin"
    pin_file.write_bytes(b"12\xe934\n")
    data = tmp_path / "data"
    data.write_bytes(b"x")
    uris = (softhsm.uri(TOKEN, "session-p256", pin_source=f"file:{pin_file}"),
            softhsm.uri(TOKEN, "session-p256") + "&pin-value=12%E934")
    for uri in uris:
        result = subprocess.run([sys.executable, "-m", "keyseal", "-v", "sign", "--format", "ssh", "--key", uri,
                                 str(data)], capture_output=True, text=True, timeout=120, check=False,
                                env={**os.environ, pkcs11_session.PIN_ENV: ""})
        assert result.returncode != 0 and "keyseal: error: " in result.stderr, result
        assert "caused by: UnicodeDecodeError" in result.stderr, result.stderr
        assert "0xe9" not in result.stderr.lower() and "position 2" not in result.stderr, result.stderr

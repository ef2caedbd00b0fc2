"""Through the CLI, as a user would: a key made inside SoftHSM, its certificate minted, files signed, and the
signatures checked by gpg and sqv (independent OpenPGP implementations)."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Gpg, Result, assert_one_line_error, run_keyseal
from tests.harness.softhsm import USER_PIN, SoftHsm
from tests.openpgp_checks import gpg_accepts, sqv_accepts

TOKEN = "keyseal-e2e"
WRONG_PIN = "wrong-pin-9999"


@dataclass
class Hsm:
    softhsm: SoftHsm
    pin_file: Path
    env: dict[str, str]  # module and PIN from the environment, as a CI job would set them

    def uri(self, label: str) -> str:
        return f"pkcs11:token={TOKEN};object={label}"


@pytest.fixture(scope="module")
def hsm(softhsm: SoftHsm, tmp_path_factory: pytest.TempPathFactory) -> Hsm:
    """A token of its own: the CLI runs in child processes, which see tokens made after this process started."""
    softhsm.init_token(TOKEN)
    pin_file = tmp_path_factory.mktemp("pin") / "user-pin"
    pin_file.write_text(USER_PIN + "\n")
    pin_file.chmod(0o600)
    env = {**softhsm.env(), "KEYSEAL_PKCS11_MODULE": softhsm.module, "KEYSEAL_PKCS11_PIN": USER_PIN}
    return Hsm(softhsm, pin_file, env)


def keyseal(*args: str | os.PathLike[str], env: dict[str, str]) -> Result:
    """The CLI with no terminal on stdin (so it never waits for a PIN prompt)."""
    return run_keyseal(*args, env=env, input=b"")


def assert_no_pin(result: Result, *pins: str) -> None:
    for pin in (USER_PIN, *pins):
        assert pin not in result.stdout
        assert pin not in result.stderr


def create_and_mint(hsm: Hsm, key_type: str, directory: Path) -> tuple[str, Path]:
    label = f"release-{key_type}-{uuid.uuid4().hex[:6]}"
    # create: module and PIN named in the URI (pin-source), as an operator at a console might
    create_uri = (f"pkcs11:token={TOKEN};object={label}"
                  f"?module-path={hsm.softhsm.module}&pin-source=file:{hsm.pin_file}")
    env_without_pin = {k: v for k, v in hsm.env.items() if k != "KEYSEAL_PKCS11_PIN"}
    created = keyseal("keys", "create", "--pkcs11", create_uri, "--type", key_type, env=env_without_pin)
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip() == create_uri
    assert_no_pin(created)
    cert = directory / f"{label}.asc"
    minted = keyseal("keys", "mint", "--key", hsm.uri(label), "--name", "Release Signing",
                     "--email", "release@example.org", "--created", "2025-01-02T03:04:05Z", "-o", cert, env=hsm.env)
    assert minted.returncode == 0, minted.stderr
    assert_no_pin(minted)
    return hsm.uri(label), cert


@pytest.mark.slow
@pytest.mark.parametrize("key_type", ["rsa2048", "p256", "p384", "ed25519"])
def test_create_mint_sign_verify(hsm: Hsm, gpg: Gpg, tmp_path: Path, key_type: str) -> None:
    uri, cert = create_and_mint(hsm, key_type, tmp_path)
    files = []
    for index in range(3):
        data = tmp_path / f"release-{index}.tar.gz"
        data.write_bytes(os.urandom(2048) + key_type.encode())
        files.append(data)
    signed = keyseal("sign", "--key", uri, "--cert", cert, *files, env=hsm.env)
    assert signed.returncode == 0, signed.stderr
    assert_no_pin(signed)
    for data in files:
        signature = data.with_name(data.name + ".asc")
        assert gpg_accepts(gpg, cert, data, signature), key_type
        assert sqv_accepts(cert, data, signature), key_type
        ours = keyseal("verify", "--cert", cert, data, env=hsm.env)
        assert ours.returncode == 0, ours.stderr

    # Tampered data: every verifier refuses it.
    tampered = tmp_path / "tampered.tar.gz"
    content = bytearray(files[0].read_bytes())
    content[100] ^= 0x01
    tampered.write_bytes(bytes(content))
    signature = files[0].with_name(files[0].name + ".asc")
    assert not gpg_accepts(gpg, cert, tampered, signature)
    assert not sqv_accepts(cert, tampered, signature)
    refused = keyseal("verify", "--cert", cert, tampered, signature, env=hsm.env)
    assert_one_line_error(refused)
    assert refused.returncode == 1


@pytest.mark.slow
def test_hundred_files_signed_concurrently_on_one_session(hsm: Hsm, tmp_path: Path) -> None:
    uri, cert = create_and_mint(hsm, "p256", tmp_path)
    files = []
    for index in range(100):
        data = tmp_path / f"artifact-{index:03d}.bin"
        data.write_bytes(f"artifact {index}\n".encode() * (index + 1))
        files.append(data)
    signed = keyseal("-v", "sign", "--jobs", "16", "--key", uri, "--cert", cert, *files, env=hsm.env)
    assert signed.returncode == 0, signed.stderr
    assert_no_pin(signed)
    assert signed.stderr.count("logged in to PKCS#11 token") == 1, signed.stderr  # one login, one session
    assert signed.stderr.count("closed the session on PKCS#11 token") == 1, signed.stderr
    for data in files:
        assert sqv_accepts(cert, data, data.with_name(data.name + ".asc")), data.name


# --- bad input: one line, non-zero exit, no traceback, never the PIN ---------------------------------------------


@pytest.mark.slow
def test_wrong_pin(hsm: Hsm, tmp_path: Path) -> None:
    data = tmp_path / "f"
    data.write_bytes(b"x")
    uri, _ = create_and_mint(hsm, "p256", tmp_path)
    result = keyseal("sign", "--key", uri, data, env={**hsm.env, "KEYSEAL_PKCS11_PIN": WRONG_PIN})
    assert_one_line_error(result)
    assert f"wrong PIN for PKCS#11 token '{TOKEN}'" in result.stderr
    assert_no_pin(result, WRONG_PIN)
    wrong_file = tmp_path / "wrong-pin"
    wrong_file.write_text(WRONG_PIN)
    result = keyseal("keys", "create", "--pkcs11", f"{hsm.uri('never')}?pin-source=file:{wrong_file}",
                     "--type", "p256", env=hsm.env)
    assert_one_line_error(result)
    assert "wrong PIN" in result.stderr
    assert_no_pin(result, WRONG_PIN)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".asc")) == ["f", "wrong-pin"]


def test_no_pin_and_no_terminal(hsm: Hsm, tmp_path: Path) -> None:
    data = tmp_path / "f"
    data.write_bytes(b"x")
    env = {k: v for k, v in hsm.env.items() if k != "KEYSEAL_PKCS11_PIN"}
    result = keyseal("sign", "--key", hsm.uri("anything"), data, env={**env, "KEYSEAL_PKCS11_PIN": ""})
    assert_one_line_error(result)
    assert "needs a user PIN" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("absent module", "does not exist"),
        ("not a module", "is not a PKCS#11 module"),
        ("unknown token", "no PKCS#11 token matches token='no-such-token'"),
        ("unknown object", "no private key object='no-such-key'"),
        ("bad character", "must be percent-encoded as %20"),
        ("bad escape", "two hex digits"),
        ("unknown attribute", "unknown attribute 'colour'"),
        ("no object", "names no key"),
        ("no module", "add module-path=/path/to/module.so to the URI or set KEYSEAL_PKCS11_MODULE"),
    ],
)
def test_bad_key_uri(hsm: Hsm, tmp_path: Path, case: str, expected: str) -> None:
    data = tmp_path / "f"
    data.write_bytes(b"x")
    not_a_module = tmp_path / "libnot.so"
    not_a_module.write_text("text\n")
    env = dict(hsm.env)
    uri = {
        "absent module": f"{hsm.uri('k')}?module-path={tmp_path / 'libabsent.so'}",
        "not a module": f"{hsm.uri('k')}?module-path={not_a_module}",
        "unknown token": "pkcs11:token=no-such-token;object=k",
        "unknown object": hsm.uri("no-such-key"),
        "bad character": f"pkcs11:token={TOKEN};object=two words",
        "bad escape": f"pkcs11:token={TOKEN};object=k%2",
        "unknown attribute": f"pkcs11:token={TOKEN};colour=blue",
        "no object": f"pkcs11:token={TOKEN}",
        "no module": hsm.uri("k"),
    }[case]
    if case == "no module":
        del env["KEYSEAL_PKCS11_MODULE"]
    for command in (["sign", "--key", uri, data],
                    ["keys", "mint", "--key", uri, "--name", "N", "--email", "n@example.org",
                     "--created", "2025-01-01T00:00:00Z"]):
        result = keyseal(*command, env=env)
        assert_one_line_error(result)
        assert expected in result.stderr, result.stderr
        assert_no_pin(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "libnot.so"]


def test_uri_syntax_error_with_pin_value_hides_the_pin(hsm: Hsm, tmp_path: Path) -> None:
    data = tmp_path / "f"
    data.write_bytes(b"x")
    result = keyseal("sign", "--key", f"pkcs11:token={TOKEN};object=a b?pin-value={USER_PIN}", data, env=hsm.env)
    assert_one_line_error(result)
    assert "pin-value=REDACTED" in result.stderr
    assert_no_pin(result)


@pytest.mark.slow
def test_pin_value_is_warned_about_and_never_printed(hsm: Hsm, tmp_path: Path) -> None:
    label = f"pv-{uuid.uuid4().hex[:6]}"
    uri = f"pkcs11:token={TOKEN};object={label}?pin-value={USER_PIN}"
    env = {k: v for k, v in hsm.env.items() if k != "KEYSEAL_PKCS11_PIN"}
    result = keyseal("keys", "create", "--pkcs11", uri, "--type", "p256", env=env)
    assert result.returncode == 0, result.stderr
    assert "pin-value= in a PKCS#11 URI shows the PIN in process listings" in result.stderr
    assert result.stdout.strip() == f"pkcs11:token={TOKEN};object={label}"
    assert_no_pin(result)


@pytest.mark.slow
def test_create_errors(hsm: Hsm, tmp_path: Path) -> None:
    uri, _ = create_and_mint(hsm, "p256", tmp_path)
    exists = keyseal("keys", "create", "--pkcs11", uri, "--type", "p384", env=hsm.env)
    assert_one_line_error(exists)
    assert "already holds an object labelled" in exists.stderr
    mixed = keyseal("keys", "create", "--pkcs11", uri, "--kms", "--type", "p256", env=hsm.env)
    assert_one_line_error(mixed)
    no_label = keyseal("keys", "create", "--pkcs11", f"pkcs11:token={TOKEN}", "--type", "p256", env=hsm.env)
    assert_one_line_error(no_label)
    assert "needs object=LABEL" in no_label.stderr
    for result in (exists, mixed, no_label):
        assert_no_pin(result)


def test_token_that_cannot_make_the_key_type(hsm: Hsm, tmp_path: Path) -> None:
    conf = hsm.softhsm.write_conf(tmp_path / "no-eddsa.conf", ("CKM_EC_EDWARDS_KEY_PAIR_GEN", "CKM_EDDSA"))
    env = {**hsm.env, **hsm.softhsm.env(conf)}
    result = keyseal("keys", "create", "--pkcs11", hsm.uri(f"ed-{uuid.uuid4().hex[:6]}"), "--type", "ed25519",
                     env=env)
    assert_one_line_error(result)
    assert f"PKCS#11 token '{TOKEN}' cannot make ed25519 keys" in result.stderr
    assert_no_pin(result)

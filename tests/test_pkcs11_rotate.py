"""`keyseal keys rotate --pkcs11` on a real SoftHSM2 token, through the CLI: the next label is made in the same
token, non-extractable, its certificate carries the same user ID, and both keys dual-sign a release that gpg and
sqv accept."""

from __future__ import annotations

import os
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from keyseal._internal.openpgp.cert import load_certificates
from keyseal._internal.openpgp.verify import parse_detached
from tests.conftest import Gpg, Result, assert_one_line_error, run_keyseal
from tests.harness.softhsm import USER_PIN, SoftHsm
from tests.openpgp_checks import gpg_accepts, sqv_accepts

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

TOKEN = "keyseal-rotate"


@pytest.fixture(scope="module")
def hsm_env(softhsm: SoftHsm) -> dict[str, str]:
    """A token of its own; the CLI children see it (they load the module after it exists)."""
    softhsm.init_token(TOKEN)
    return {**softhsm.env(), "KEYSEAL_PKCS11_MODULE": softhsm.module, "KEYSEAL_PKCS11_PIN": USER_PIN}


def keyseal(*args: str | os.PathLike[str], env: dict[str, str]) -> Result:
    return run_keyseal(*args, env=env, input=b"")  # no terminal: never waits for a PIN prompt


def uri(label: str) -> str:
    return f"pkcs11:token={TOKEN};object={label}"


def create_and_mint(env: dict[str, str], label: str, key_type: str, cert: Path) -> None:
    created = keyseal("keys", "create", "--pkcs11", uri(label), "--type", key_type, env=env)
    assert created.returncode == 0, created.stderr
    minted = keyseal("keys", "mint", "--key", uri(label), "--name", "Example Releases", "--email",
                     "releases@example.org", "--created", "2025-06-01T00:00:00Z", "-o", cert, env=env)
    assert minted.returncode == 0, minted.stderr


def test_rotate_then_dual_sign(hsm_env: dict[str, str], tmp_path: Path, gpg: Gpg) -> None:
    label = f"release-{uuid.uuid4().hex[:6]}"
    v1_cert, v2_cert = tmp_path / "v1.asc", tmp_path / "v2.asc"
    create_and_mint(hsm_env, label, "p256", v1_cert)

    before = int(time.time())
    rotated = keyseal("keys", "rotate", "--pkcs11", uri(label), "--cert", v1_cert, "-o", v2_cert, env=hsm_env)
    after = int(time.time())
    assert rotated.returncode == 0, rotated.stderr
    assert USER_PIN not in rotated.stdout + rotated.stderr
    new_label, new_uri, fingerprint, created = rotated.stdout.splitlines()
    assert new_label == f"{label}-v2" and new_uri == uri(f"{label}-v2")
    v1, v2 = load_certificates(v1_cert.read_bytes())[0], load_certificates(v2_cert.read_bytes())[0]
    assert v2.fingerprint == fingerprint != v1.fingerprint
    assert v2.user_ids == v1.user_ids == ["Example Releases <releases@example.org>"]
    assert v2.primary.describe() == v1.primary.describe() == "ECDSA-secp256r1"
    # No --created: the moment the key was generated, printed so the certificate can be minted again.
    moment = int(datetime.fromisoformat(created.removeprefix("created ").replace("Z", "+00:00")).timestamp())
    assert before - 1 <= moment <= after and v2.primary.created == moment
    again = keyseal("keys", "mint", "--key", new_uri, "--name", "Example Releases", "--email",
                    "releases@example.org", "--created", created.removeprefix("created "), env=hsm_env)
    assert again.returncode == 0, again.stderr
    assert load_certificates(again.stdout.encode())[0].fingerprint == fingerprint

    # The rotation window: v1 signs, v2 appends; each certificate alone verifies the one .asc.
    data = tmp_path / "tool-2.0.tar.gz"
    data.write_bytes(os.urandom(4096))
    signed = keyseal("sign", "--key", uri(label), "--cert", v1_cert, data, env=hsm_env)
    assert signed.returncode == 0, signed.stderr
    appended = keyseal("sign", "--key", new_uri, "--cert", v2_cert, "--append", data, env=hsm_env)
    assert appended.returncode == 0, appended.stderr
    sig = tmp_path / "tool-2.0.tar.gz.asc"
    issuers = [s.issuer_fingerprint.hex().upper() for s in parse_detached(sig.read_bytes()) if s.issuer_fingerprint]
    assert issuers == [v1.fingerprint, v2.fingerprint]
    assert sqv_accepts(v1_cert, data, sig) and sqv_accepts(v2_cert, data, sig)
    assert gpg.run("--import", v1_cert).returncode == 0
    assert gpg_accepts(gpg, v2_cert, data, sig)  # gpg wants every signer's key: both are imported now
    status = gpg.run("--verify", sig, data).stderr.decode()
    assert status.count("[GNUPG:] GOODSIG") == 2, status
    data.write_bytes(data.read_bytes()[:-1] + b"?")
    assert not sqv_accepts(v1_cert, data, sig) and not sqv_accepts(v2_cert, data, sig)


def test_new_key_is_non_extractable(hsm_env: dict[str, str], softhsm: SoftHsm, tmp_path: Path) -> None:
    """Checked in a child process: this test process may have loaded SoftHSM before the token existed."""
    label = f"sealed-{uuid.uuid4().hex[:6]}"
    create_and_mint(hsm_env, label, "p256", tmp_path / "v1.asc")
    rotated = keyseal("keys", "rotate", "--pkcs11", uri(label), "--cert", tmp_path / "v1.asc", env=hsm_env)
    assert rotated.returncode == 0, rotated.stderr
    script = f"""
import pkcs11
from pkcs11 import Attribute as A, ObjectClass
lib = pkcs11.lib({softhsm.module!r})
with lib.get_token(token_label={TOKEN!r}).open(user_pin={USER_PIN!r}) as session:
    (key,) = session.get_objects({{A.CLASS: ObjectClass.PRIVATE_KEY, A.LABEL: {label + '-v2'!r}}})
    flags = [key[A.SENSITIVE], key[A.EXTRACTABLE], key[A.NEVER_EXTRACTABLE], key[A.ALWAYS_SENSITIVE], key[A.TOKEN]]
    try:
        key[A.VALUE]
        flags.append("readable")
    except pkcs11.AttributeSensitive:
        flags.append("sensitive")
    print(flags)
"""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, **softhsm.env()},
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[True, False, True, True, True, 'sensitive']"


def test_taken_label_gives_the_next_version(hsm_env: dict[str, str], tmp_path: Path) -> None:
    label = f"signing-{uuid.uuid4().hex[:6]}"
    v1_cert = tmp_path / "v1.asc"
    create_and_mint(hsm_env, label, "p256", v1_cert)
    # Someone already made -v2 by hand: rotation skips to -v3 and leaves -v2 alone.
    manual = keyseal("keys", "create", "--pkcs11", uri(f"{label}-v2"), "--type", "p256", env=hsm_env)
    assert manual.returncode == 0, manual.stderr
    rotated = keyseal("keys", "rotate", "--pkcs11", uri(label), "--cert", v1_cert, "--type", "ed25519",
                      "--created", "2026-01-01T00:00:00Z", env=hsm_env)
    assert rotated.returncode == 0, rotated.stderr
    assert rotated.stderr.splitlines()[:2] == [f"{label}-v3", uri(f"{label}-v3")]
    assert rotated.stderr.splitlines()[3] == "created 2026-01-01T00:00:00Z"
    v3 = load_certificates(rotated.stdout.encode())[0]
    assert v3.primary.describe() == "Ed25519" and v3.primary.created == 1767225600
    # From -v3, the -vN suffix is replaced, not stacked; --name/--email without --cert.
    again = keyseal("keys", "rotate", "--pkcs11", uri(f"{label}-v3"), "--name", "Example Releases",
                    "--email", "v4@example.org", "-o", tmp_path / "v4.asc", env=hsm_env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == f"{label}-v4"
    v4 = load_certificates((tmp_path / "v4.asc").read_bytes())[0]
    assert v4.user_ids == ["Example Releases <v4@example.org>"] and v4.primary.describe() == "Ed25519"


def test_bad_input_is_one_clear_line(hsm_env: dict[str, str], tmp_path: Path) -> None:
    label = f"bad-{uuid.uuid4().hex[:6]}"
    cert = tmp_path / "v1.asc"
    create_and_mint(hsm_env, label, "p256", cert)
    wrong_pin = tmp_path / "wrong-pin"
    wrong_pin.write_text("0000\n")
    other = tmp_path / "other.asc"
    create_and_mint(hsm_env, f"{label}-other", "p256", other)
    cases = {
        "invalid PKCS#11 URI": ("--pkcs11", f"pkcs11:token={TOKEN};object", "--cert", cert),
        "unknown attribute": ("--pkcs11", f"pkcs11:token={TOKEN};label={label}", "--cert", cert),
        "needs the current key's label": ("--pkcs11", f"pkcs11:token={TOKEN}", "--cert", cert),
        "no private key": ("--pkcs11", uri(f"{label}-absent"), "--cert", cert),
        "is not the certificate of": ("--pkcs11", uri(label), "--cert", other),
        "takes no --kms or --alias": ("--pkcs11", uri(label), "--kms", "--alias", "alias/x", "--cert", cert),
        "invalid time": ("--pkcs11", uri(label), "--cert", cert, "--created", "yesterday"),
        "wrong PIN": ("--pkcs11", uri(label) + f"?pin-source=file:{wrong_pin}", "--cert", cert),
    }
    for needle, args in cases.items():
        result = keyseal("keys", "rotate", *args, env=hsm_env)
        assert_one_line_error(result)
        assert USER_PIN not in result.stderr and "0000" not in result.stderr
        assert needle in result.stderr, (needle, result.stderr)
    # Nothing was created by any of them: the first rotation still gets -v2.
    rotated = keyseal("keys", "rotate", "--pkcs11", uri(label), "--cert", cert, env=hsm_env)
    assert rotated.returncode == 0, rotated.stderr
    assert rotated.stderr.splitlines()[0] == f"{label}-v2"

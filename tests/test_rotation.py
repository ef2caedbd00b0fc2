"""Rotation: one `.asc` with two signatures (`keyseal sign --append`) that old clients (v1 only) and new clients
(v2) both accept, checked by sqv, gpg and keyseal; and `keyseal keys rotate` on the KMS emulator."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from keyseal._internal.openpgp.cert import load_certificates
from keyseal._internal.openpgp.verify import parse_detached
from tests.conftest import Gpg, assert_one_line_error, run_keyseal
from tests.harness.release_keys import ReleaseKey, make_key, sign_file
from tests.openpgp_checks import gpg_accepts, pgpy_accepts, sqv_accepts

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ReleaseKey]:
    directory = tmp_path_factory.mktemp("rotation-keys")
    return {"v1": make_key(directory, "v1", "p256"), "v2": make_key(directory, "v2", "ed25519"),
            "rsa": make_key(directory, "rsa", "rsa2048")}


def sign(key: ReleaseKey, *args: str | Path) -> None:
    result = run_keyseal("sign", "--key", key.uri, "--cert", key.cert, *args)
    assert result.returncode == 0, result.stderr


def test_dual_signed_file_verifies_for_old_and_new_clients(tmp_path: Path, keys: dict[str, ReleaseKey],
                                                          gpg: Gpg) -> None:
    data = tmp_path / "tool-2.0.tar.gz"
    data.write_bytes(b"new release\n" * 2000)
    sign(keys["v1"], data)
    sign(keys["v2"], "--append", data)
    sig = tmp_path / "tool-2.0.tar.gz.asc"
    text = sig.read_text()
    assert text.count("-----BEGIN PGP SIGNATURE-----") == 1  # one armored block ...
    issuers = [s.issuer_fingerprint.hex().upper() for s in parse_detached(sig.read_bytes()) if s.issuer_fingerprint]
    assert issuers == [keys["v1"].fingerprint, keys["v2"].fingerprint]  # ... holding both signatures

    assert sqv_accepts(keys["v1"].cert, data, sig)  # an old client's keyring: v1 only
    assert sqv_accepts(keys["v2"].cert, data, sig)  # a new client's keyring: v2 only
    for key in ("v1", "v2"):
        verified = run_keyseal("verify", "--cert", keys[key].cert, data)
        assert verified.returncode == 0, verified.stderr
        assert verified.stdout.strip() == keys[key].fingerprint
    assert pgpy_accepts(keys["v1"].cert, data, sig)
    assert gpg.run("--import", keys["v1"].cert).returncode == 0
    assert gpg_accepts(gpg, keys["v2"].cert, data, sig)
    status = gpg.run("--verify", sig, data).stderr.decode()
    assert status.count("[GNUPG:] GOODSIG") == 2, status

    # The dual-signed file is still bound to the data: change one byte and every verifier refuses.
    data.write_bytes(data.read_bytes()[:-1] + b"?")
    assert not sqv_accepts(keys["v1"].cert, data, sig)
    assert not sqv_accepts(keys["v2"].cert, data, sig)
    assert run_keyseal("verify", "--cert", keys["v2"].cert, data).returncode == 1


def test_dual_signed_manifest_verifies_with_either_certificate(tmp_path: Path, keys: dict[str, ReleaseKey]) -> None:
    artifact = tmp_path / "tool.zip"
    artifact.write_bytes(b"zip")
    manifest = tmp_path / "SHA256SUMS"
    assert run_keyseal("checksums", artifact, "-o", manifest).returncode == 0
    sign(keys["rsa"], manifest)
    sign(keys["v2"], "--append", manifest)
    for key in ("rsa", "v2"):
        result = run_keyseal("verify-release", "--manifest", manifest, "--cert", keys[key].cert, artifact)
        assert result.returncode == 0, result.stderr
        assert keys[key].fingerprint in result.stderr


def test_append_without_a_file_signs_and_keeps_the_existing_armor(tmp_path: Path,
                                                                 keys: dict[str, ReleaseKey]) -> None:
    data = tmp_path / "file.bin"
    data.write_bytes(b"x" * 100)
    sign(keys["v1"], "--append", "--binary", data)  # nothing to append to: a plain signature
    sig = tmp_path / "file.bin.sig"
    assert len(parse_detached(sig.read_bytes())) == 1 and not sig.read_bytes().startswith(b"-----")
    sign(keys["v2"], "--append", "--binary", data)
    assert len(parse_detached(sig.read_bytes())) == 2 and not sig.read_bytes().startswith(b"-----")
    assert sqv_accepts(keys["v2"].cert, data, sig) and sqv_accepts(keys["v1"].cert, data, sig)
    # An armored file stays armored even when --binary's default name is not used.
    out = tmp_path / "explicit.asc"
    sign_file(keys["v1"], data, out)
    sign(keys["v2"], "--append", "--binary", "-o", out, data)
    assert out.read_bytes().startswith(b"-----BEGIN PGP SIGNATURE-----")
    assert len(parse_detached(out.read_bytes())) == 2


def test_append_refuses_a_stale_file_a_second_signature_by_the_same_key_and_force(
        tmp_path: Path, keys: dict[str, ReleaseKey]) -> None:
    data = tmp_path / "tool.tar.gz"
    data.write_bytes(b"release 2")
    old = tmp_path / "old.tar.gz"
    old.write_bytes(b"release 1")
    sig = tmp_path / "tool.tar.gz.asc"
    sign_file(keys["v1"], old, sig)  # a signature over another file, left behind
    before = sig.read_bytes()
    stale = run_keyseal("sign", "--key", keys["v2"].uri, "--cert", keys["v2"].cert, "--append", data)
    assert_one_line_error(stale)
    assert "not over" in stale.stderr and sig.read_bytes() == before

    sign_file(keys["v1"], data, sig)
    twice = run_keyseal("sign", "--key", keys["v1"].uri, "--cert", keys["v1"].cert, "--append", data)
    assert_one_line_error(twice)
    assert f"already holds a signature by {keys['v1'].fingerprint}" in twice.stderr
    both = run_keyseal("sign", "--key", keys["v2"].uri, "--append", "--force", data)
    assert_one_line_error(both)
    not_a_signature = tmp_path / "notes.txt.asc"
    (tmp_path / "notes.txt").write_bytes(b"n")
    not_a_signature.write_bytes(b"hello")
    garbage = run_keyseal("sign", "--key", keys["v2"].uri, "--append", tmp_path / "notes.txt")
    assert_one_line_error(garbage)
    assert "cannot append to" in garbage.stderr and not_a_signature.read_bytes() == b"hello"


def revoked_copy(key: ReleaseKey, reason: str, out: Path, created: int | None = None) -> Path:
    """`key`'s certificate with a revocation for `reason`, made by its own key (as `keyseal keys revoke` does)."""
    from keyseal._internal.openpgp.revoke import revoke

    cert = load_certificates(key.cert.read_bytes())[0]
    out.write_bytes(revoke(key.signer(), cert, reason, created=created))
    return out


def test_append_refuses_to_keep_a_signature_by_a_compromised_key(tmp_path: Path,
                                                                 keys: dict[str, ReleaseKey]) -> None:
    """A signature by a key revoked as compromised counts for nothing (keyseal verify, gpg, sqv): kept beside a
    new one it still verifies for every client that has not seen the revocation. Refused unless asked."""
    old = make_key(tmp_path / "keys", "old", "p256")
    data = tmp_path / "tool.tar.gz"
    data.write_bytes(b"release")
    sig = tmp_path / "tool.tar.gz.asc"
    sign_file(old, data, sig, created=int(time.time()) - 3600)
    before = sig.read_bytes()
    revoked = revoked_copy(old, "compromised", tmp_path / "old-revoked.asc")
    args = ["sign", "--key", keys["v2"].uri, "--cert", keys["v2"].cert, "--cert", revoked, "--append", data]
    refused = run_keyseal(*args)
    assert_one_line_error(refused)
    assert f"key {old.fingerprint} is revoked (compromised" in refused.stderr, refused.stderr
    assert "--keep-revoked-signatures" in refused.stderr
    assert sig.read_bytes() == before

    kept = run_keyseal(*args, "--keep-revoked-signatures")
    assert kept.returncode == 0, kept.stderr
    assert f"warning: kept the signature by revoked key {old.fingerprint}" in kept.stderr
    assert len(parse_detached(sig.read_bytes())) == 2

    # The same refusal when the revoked certificate is known from the keyring rather than --cert.
    sig.write_bytes(before)
    home = tmp_path / "home"
    (home / "keyring").mkdir(parents=True)
    (home / "keyring" / f"{old.fingerprint}.asc").write_bytes(revoked.read_bytes())
    from_keyring = run_keyseal("sign", "--key", keys["v2"].uri, "--cert", keys["v2"].cert, "--append", data,
                               env={"KEYSEAL_HOME": str(home)})
    assert_one_line_error(from_keyring)
    assert "compromised" in from_keyring.stderr and sig.read_bytes() == before
    alone = run_keyseal("sign", "--key", keys["v2"].uri, "--keep-revoked-signatures", tmp_path / "tool.tar.gz",
                        "-o", tmp_path / "other.asc")
    assert_one_line_error(alone)
    assert "--append" in alone.stderr


def test_append_keeps_a_superseded_keys_earlier_signature_only(tmp_path: Path, keys: dict[str, ReleaseKey]) -> None:
    """Superseded or retired: signatures made before the revocation still count (keyseal verify accepts them),
    so they are kept; one made at or after it counts for nothing, and is refused like a compromised key's."""
    old = make_key(tmp_path / "keys", "old", "p256")
    now = int(time.time())
    revoked = revoked_copy(old, "superseded", tmp_path / "old-revoked.asc", created=now - 600)
    data = tmp_path / "tool.tar.gz"
    data.write_bytes(b"release")
    sig = tmp_path / "tool.tar.gz.asc"
    sign_file(old, data, sig, created=now - 3600)  # before the revocation
    earlier = run_keyseal("sign", "--key", keys["v2"].uri, "--cert", keys["v2"].cert, "--cert", revoked,
                          "--append", data)
    assert earlier.returncode == 0, earlier.stderr
    for cert in (revoked, keys["v2"].cert):  # both signatures count, the old one with the revoked certificate
        assert run_keyseal("verify", "--cert", cert, data).returncode == 0

    sign_file(old, data, sig, created=now - 60)  # after the revocation
    before = sig.read_bytes()
    later = run_keyseal("sign", "--key", keys["v2"].uri, "--cert", keys["v2"].cert, "--cert", revoked,
                        "--append", data)
    assert_one_line_error(later)
    assert "revoked (superseded or retired) since" in later.stderr and sig.read_bytes() == before
    assert run_keyseal("verify", "--cert", revoked, data).returncode == 1  # verify agrees: it does not count


def test_keys_rotate_creates_the_next_version_with_the_same_user_id(tmp_path: Path, aws_env: dict[str, str]) -> None:
    alias = f"alias/rotate-{uuid.uuid4().hex[:8]}"
    created = run_keyseal("keys", "create", "--kms", "--alias", alias, "--type", "p256")
    assert created.returncode == 0, created.stderr
    v1_cert = tmp_path / "v1.asc"
    minted = run_keyseal("keys", "mint", "--key", f"awskms:{alias}", "--name", "Example Releases",
                         "--email", "releases@example.org", "-o", v1_cert)
    assert minted.returncode == 0, minted.stderr

    v2_cert = tmp_path / "v2.asc"
    rotated = run_keyseal("keys", "rotate", "--kms", "--alias", alias, "--cert", v1_cert, "-o", v2_cert)
    assert rotated.returncode == 0, rotated.stderr
    new_alias, arn, uri, fingerprint = rotated.stdout.split()
    assert new_alias == f"{alias}-v2" and uri == f"awskms:{arn}"
    v1, v2 = load_certificates(v1_cert.read_bytes())[0], load_certificates(v2_cert.read_bytes())[0]
    assert v2.fingerprint == fingerprint != v1.fingerprint
    assert v2.user_ids == v1.user_ids == ["Example Releases <releases@example.org>"]
    assert v2.primary.describe() == v1.primary.describe() == "ECDSA-secp256r1"

    # Rotating from -v2 gives -v3; the runbook's new WKD address goes into the new user ID with --email.
    again = run_keyseal("keys", "rotate", "--kms", "--alias", f"{alias}-v2", "--cert", v2_cert, "--type", "rsa2048",
                        "--email", "releases-v3@example.org")
    assert again.returncode == 0, again.stderr
    assert "BEGIN PGP PUBLIC KEY BLOCK" in again.stdout and f"{alias}-v3" in again.stderr.split()
    v3 = load_certificates(again.stdout.encode())[0]
    assert v3.primary.describe() == "RSA-2048" and v3.user_ids == ["Example Releases <releases-v3@example.org>"]

    # The rotation window end to end on KMS: v1 signs, v2 appends, each certificate alone verifies.
    data = tmp_path / "tool.tar.gz"
    data.write_bytes(b"kms-signed release")
    assert run_keyseal("sign", "--key", f"awskms:{alias}", "--cert", v1_cert, data).returncode == 0
    appended = run_keyseal("sign", "--key", f"awskms:{alias}-v2", "--cert", v2_cert, "--append", data)
    assert appended.returncode == 0, appended.stderr
    sig = tmp_path / "tool.tar.gz.asc"
    assert sqv_accepts(v1_cert, data, sig) and sqv_accepts(v2_cert, data, sig)


def test_keys_rotate_refuses_bad_input_before_creating_anything(tmp_path: Path, aws_env: dict[str, str],
                                                                keys: dict[str, ReleaseKey]) -> None:
    alias = f"alias/rotate-{uuid.uuid4().hex[:8]}"
    not_kms = run_keyseal("keys", "rotate", "--alias", alias, "--name", "A", "--email", "a@example.org")
    assert_one_line_error(not_kms)
    missing = run_keyseal("keys", "rotate", "--kms", "--alias", alias, "--name", "A", "--email", "a@example.org")
    assert_one_line_error(missing)
    assert run_keyseal("keys", "create", "--kms", "--alias", alias, "--type", "p256").returncode == 0
    wrong_cert = run_keyseal("keys", "rotate", "--kms", "--alias", alias, "--cert", keys["v1"].cert)
    assert_one_line_error(wrong_cert)
    assert "is not the certificate of" in wrong_cert.stderr
    no_uid = run_keyseal("keys", "rotate", "--kms", "--alias", alias)
    assert_one_line_error(no_uid)
    bad_email = run_keyseal("keys", "rotate", "--kms", "--alias", alias, "--name", "A", "--email", "nope")
    assert_one_line_error(bad_email)
    import boto3

    client = boto3.client("kms", endpoint_url=aws_env["AWS_ENDPOINT_URL_KMS"])
    names = {a["AliasName"] for a in client.list_aliases()["Aliases"]}
    assert f"{alias}-v2" not in names

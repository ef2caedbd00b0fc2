"""git signs commits and tags through keyseal, in repositories the tests make.

OpenPGP: `keyseal git-setup` points `gpg.program` at keyseal-gpg; `git commit -S` / `git tag -s` sign through the
key's custody, and `git verify-commit` / `git verify-tag` accept them both through keyseal-gpg (the keyseal
keyring) and through real gpg holding the minted certificate. SSH: `gpg.ssh.program` is keyseal-ssh-keygen for
signing, and the real ssh-keygen verifies (named explicitly with `-c gpg.ssh.program=...`, since git would
otherwise run the configured program for verification too). A tampered object fails everywhere.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from keyseal._internal.openpgp.cert import load_certificates
from tests.conftest import Gpg, Result, assert_one_line_error, run_keyseal
from tests.formats_peers import Custody, kms_key, local_key, ok, pkcs11_key, script, tool
from tests.harness.kms_emulator import KmsEmulator
from tests.harness.softhsm import SoftHsm

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

NAME, EMAIL = "Release Signing", "release@example.org"
GIT_ENV = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_TERMINAL_PROMPT": "0"}


@pytest.fixture(autouse=True)
def own_keyseal_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A keyring and key map per test, so lookups by email see only this test's keys."""
    home = tmp_path / "keyseal-home"
    monkeypatch.setenv("KEYSEAL_HOME", str(home))
    return home


def git(repo: Path, *args: str, env: dict[str, str] | None = None, input: str | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([tool("git", "git"), "-C", str(repo), *args], env={**os.environ, **GIT_ENV, **(env or {})},
                          input=input, capture_output=True, text=True, timeout=120, check=False)
    if check:
        assert proc.returncode == 0, f"git {' '.join(args)}: {proc.stderr}"
    return proc


def new_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.name", NAME)
    git(repo, "config", "user.email", EMAIL)
    return repo


def commit(repo: Path, name: str, env: dict[str, str] | None = None) -> str:
    (repo / name).write_text(f"{name}\n")
    git(repo, "add", name, env=env)
    git(repo, "commit", "-q", "-S", "-m", f"add {name}", env=env)
    return git(repo, "rev-parse", "HEAD").stdout.strip()


def tamper(repo: Path, obj: str, kind: str, old: str, new: str) -> str:
    """A copy of a signed object with its message changed and its signature kept: a forged object."""
    raw = git(repo, "cat-file", kind, obj).stdout
    assert old in raw
    return git(repo, "hash-object", "-t", kind, "-w", "--stdin", input=raw.replace(old, new)).stdout.strip()


def setup_openpgp(custody: Custody, repo: Path, tmp_path: Path) -> tuple[Path, str]:
    cert = tmp_path / "release.asc"
    minted = ok(custody.keyseal("keys", "mint", "--key", custody.uri, "--name", NAME, "--email", EMAIL,
                                "--created", "2025-01-02T03:04:05Z", "-o", cert))
    fingerprint = minted.stdout.strip()
    result = run_keyseal("git-setup", "--key", custody.uri, "--cert", cert, "--apply", cwd=repo, env=custody.env)
    ok(result)
    assert git(repo, "config", "user.signingkey").stdout.strip() == fingerprint
    assert git(repo, "config", "gpg.program").stdout.strip().endswith("keyseal-gpg")
    return cert, fingerprint


def gpg_env(gpg: Gpg) -> dict[str, str]:
    return {"GNUPGHOME": str(gpg.home)}


def test_openpgp_commit_and_tag_with_kms_key(aws_env: dict[str, str], kms_emulator: KmsEmulator, gpg: Gpg,
                                            tmp_path: Path) -> None:
    custody = kms_key("p256")
    repo = new_repo(tmp_path)
    cert, fingerprint = setup_openpgp(custody, repo, tmp_path)

    kms_emulator.calls.clear()
    head = commit(repo, "README")
    assert kms_emulator.calls.counts()["Sign"] == 1
    git(repo, "tag", "-s", "v1.0", "-m", "release 1.0")
    assert kms_emulator.calls.counts()["Sign"] == 2
    assert "-----BEGIN PGP SIGNATURE-----" in git(repo, "cat-file", "commit", head).stdout

    # keyseal-gpg verifies with the keyseal keyring.
    kms_emulator.calls.clear()
    verified = git(repo, "verify-commit", "--raw", head)
    assert "[GNUPG:] GOODSIG" in verified.stderr and f"[GNUPG:] VALIDSIG {fingerprint}" in verified.stderr
    assert "[GNUPG:] GOODSIG" in git(repo, "verify-tag", "--raw", "v1.0").stderr
    shown = git(repo, "log", "--show-signature", "-1").stdout
    assert f'Good signature from "{NAME} <{EMAIL}>"' in shown
    assert git(repo, "log", "-1", "--format=%G? %GF").stdout.strip() == f"G {fingerprint}"
    assert kms_emulator.calls.calls == []  # verification never calls KMS

    # Real gpg with the minted certificate verifies the same objects.
    assert gpg.run("--import", cert).returncode == 0
    real = {"GNUPGHOME": str(gpg.home)}
    by_gpg = git(repo, "-c", "gpg.program=gpg", "verify-commit", "--raw", head, env=real)
    assert f"[GNUPG:] VALIDSIG {fingerprint}" in by_gpg.stderr
    assert "[GNUPG:] GOODSIG" in git(repo, "-c", "gpg.program=gpg", "verify-tag", "--raw", "v1.0", env=real).stderr

    # A forged commit and a forged tag (message changed, signature kept) fail with both verifiers.
    forged_commit = tamper(repo, head, "commit", "add README", "add README and a backdoor")
    tag = git(repo, "rev-parse", "v1.0").stdout.strip()
    forged_tag = tamper(repo, tag, "tag", "release 1.0", "release 6.6.6")
    for verb, obj in (("verify-commit", forged_commit), ("verify-tag", forged_tag)):
        ours = git(repo, verb, "--raw", obj, check=False)
        assert ours.returncode != 0 and "[GNUPG:] BADSIG" in ours.stderr, ours.stderr
        theirs = git(repo, "-c", "gpg.program=gpg", verb, "--raw", obj, env=real, check=False)
        assert theirs.returncode != 0 and "[GNUPG:] BADSIG" in theirs.stderr, theirs.stderr


@pytest.mark.parametrize("custody_kind", ["pkcs11-ed25519", "wrapped-p384"])
def test_openpgp_other_custodies(custody_kind: str, softhsm: SoftHsm, gpg: Gpg, tmp_path: Path) -> None:
    custody = pkcs11_key(softhsm, "ed25519") if custody_kind == "pkcs11-ed25519" else local_key(tmp_path, "p384")
    repo = new_repo(tmp_path)
    cert, fingerprint = setup_openpgp(custody, repo, tmp_path)
    head = commit(repo, "README", env=custody.env)
    assert f"VALIDSIG {fingerprint}" in git(repo, "verify-commit", "--raw", head).stderr
    assert gpg.run("--import", cert).returncode == 0
    by_gpg = git(repo, "-c", "gpg.program=gpg", "verify-commit", "--raw", head, env=gpg_env(gpg))
    assert f"[GNUPG:] VALIDSIG {fingerprint}" in by_gpg.stderr

    # Without user.signingkey git names the committer ("Name <email>"): the keyring finds the key by email.
    git(repo, "config", "--unset", "user.signingkey")
    second = commit(repo, "NEWS", env=custody.env)
    assert f"VALIDSIG {fingerprint}" in git(repo, "verify-commit", "--raw", second).stderr
    forged = tamper(repo, second, "commit", "add NEWS", "add NEWS!")
    assert "[GNUPG:] BADSIG" in git(repo, "verify-commit", "--raw", forged, check=False).stderr


def setup_ssh(custody: Custody, repo: Path, tmp_path: Path) -> Path:
    """git-setup for SSH, and an allowed_signers file written from `keys export` (not git-setup's own)."""
    ok(run_keyseal("git-setup", "--format", "ssh", "--key", custody.uri, "--principal", EMAIL, "--apply",
                   cwd=repo, env=custody.env))
    assert git(repo, "config", "gpg.format").stdout.strip() == "ssh"
    assert git(repo, "config", "gpg.ssh.program").stdout.strip().endswith("keyseal-ssh-keygen")
    allowed = tmp_path / "allowed_signers"
    ok(custody.keyseal("keys", "export", "--key", custody.uri, "--format", "ssh", "--principal", EMAIL,
                       "-o", allowed))
    return allowed


def check_ssh_verification(repo: Path, obj: str, allowed: Path, verb: str = "verify-commit") -> None:
    real = tool("ssh-keygen", "openssh-client")
    verified = git(repo, "-c", f"gpg.ssh.program={real}", "-c", f"gpg.ssh.allowedSignersFile={allowed}", verb,
                   obj)
    assert f'Good "git" signature for {EMAIL}' in verified.stderr


@pytest.mark.parametrize("custody_kind", ["kms-p256", "pkcs11-ed25519", "wrapped-rsa2048"])
def test_ssh_format_commits(custody_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if custody_kind == "kms-p256":
        request.getfixturevalue("aws_env")
        custody = kms_key("p256")
    elif custody_kind == "pkcs11-ed25519":
        custody = pkcs11_key(request.getfixturevalue("softhsm"), "ed25519")
    else:
        custody = local_key(tmp_path, "rsa2048")
    repo = new_repo(tmp_path)
    allowed = setup_ssh(custody, repo, tmp_path)
    head = commit(repo, "README", env=custody.env)
    assert "-----BEGIN SSH SIGNATURE-----" in git(repo, "cat-file", "commit", head).stdout

    # The real ssh-keygen verifies, with an allowed_signers file made by `keys export`.
    check_ssh_verification(repo, head, allowed)
    forged = tamper(repo, head, "commit", "add README", "add README!")
    real = tool("ssh-keygen", "openssh-client")
    refused = git(repo, "-c", f"gpg.ssh.program={real}", "-c", f"gpg.ssh.allowedSignersFile={allowed}",
                  "verify-commit", forged, check=False)
    assert refused.returncode != 0 and "Good" not in refused.stderr

    # With the configured keyseal-ssh-keygen (and git-setup's allowed_signers) verification is handed to
    # ssh-keygen; pointed at a program that refuses everything, it fails: keyseal-ssh-keygen never verifies.
    assert f'Good "git" signature for {EMAIL}' in git(repo, "verify-commit", head, env=custody.env).stderr
    failing = git(repo, "verify-commit", head, env={**custody.env, "KEYSEAL_SSH_KEYGEN": "/bin/false"},
                  check=False)
    assert failing.returncode != 0


def test_ssh_tag_and_key_uri_as_signing_key(aws_env: dict[str, str], tmp_path: Path) -> None:
    """`user.signingkey` may be the key URI itself: no key map needed for signing."""
    custody = kms_key("p384")
    repo = new_repo(tmp_path)
    allowed = tmp_path / "allowed_signers"
    ok(run_keyseal("keys", "export", "--key", custody.uri, "--format", "ssh", "--principal", EMAIL, "-o", allowed))
    git(repo, "config", "gpg.format", "ssh")
    git(repo, "config", "gpg.ssh.program", script("keyseal-ssh-keygen"))
    git(repo, "config", "user.signingkey", custody.uri)
    head = commit(repo, "README")
    git(repo, "tag", "-s", "v2.0", "-m", "release 2.0")
    check_ssh_verification(repo, head, allowed)
    check_ssh_verification(repo, "v2.0", allowed, "verify-tag")
    tag = git(repo, "rev-parse", "v2.0").stdout.strip()
    forged = tamper(repo, tag, "tag", "release 2.0", "release 2.1")
    real = tool("ssh-keygen", "openssh-client")
    refused = git(repo, "-c", f"gpg.ssh.program={real}", "-c", f"gpg.ssh.allowedSignersFile={allowed}",
                  "verify-tag", forged, check=False)
    assert refused.returncode != 0


# -- the compatibility programs on their own: status lines, errors --------------------------------------------


def run_program(name: str, *args: str | os.PathLike[str], input: bytes = b"", cwd: Path | None = None,
                env: dict[str, str] | None = None) -> Result:
    proc = subprocess.run([script(name), *map(str, args)], input=input, cwd=cwd,
                          env={**os.environ, **(env or {})}, capture_output=True, timeout=120, check=False)
    return Result(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))


def test_keyseal_gpg_status_and_errors(tmp_path: Path) -> None:
    custody = local_key(tmp_path, "ed25519")
    cert = tmp_path / "cert.asc"
    fingerprint = ok(run_keyseal("keys", "mint", "--key", custody.uri, "--name", NAME, "--email", EMAIL,
                                 "-o", cert)).stdout.strip()
    payload = b"tree 0000\n\nmessage\n"

    # Signing by URI works before any setup; verifying needs the certificate in the keyring.
    signed = run_program("keyseal-gpg", "--status-fd=2", "-bsau", custody.uri, input=payload)
    assert signed.returncode == 0, signed.stderr
    assert signed.stdout.startswith("-----BEGIN PGP SIGNATURE-----")
    assert "[GNUPG:] SIG_CREATED D 22 8 00 " in signed.stderr and signed.stderr.rstrip().endswith(fingerprint)
    sig = tmp_path / "payload.asc"
    sig.write_text(signed.stdout)
    unknown = run_program("keyseal-gpg", "--keyid-format=long", "--status-fd=1", "--verify", sig, "-", input=payload)
    assert unknown.returncode == 2
    assert f"[GNUPG:] NO_PUBKEY {fingerprint[-16:]}" in unknown.stdout and "[GNUPG:] ERRSIG" in unknown.stdout

    not_yet = run_keyseal("keys", "export", "--key", custody.uri, "--format", "openpgp")
    assert_one_line_error(not_yet)
    assert "give --name and --email" in not_yet.stderr
    ok(run_keyseal("git-setup", "--key", custody.uri, "--cert", cert, cwd=tmp_path))  # print mode: registers
    exported = ok(run_keyseal("keys", "export", "--key", custody.uri, "--format", "openpgp")).stdout
    assert load_certificates(exported.encode())[0].fingerprint == fingerprint
    minted = ok(run_keyseal("keys", "export", "--key", custody.uri, "--format", "openpgp", "--name", "Other",
                            "--email", "other@example.org")).stdout
    assert load_certificates(minted.encode())[0].user_ids == ["Other <other@example.org>"]
    good = run_program("keyseal-gpg", "--keyid-format=long", "--status-fd=1", "--verify", sig, "-", input=payload)
    assert good.returncode == 0, good.stderr
    assert f"[GNUPG:] GOODSIG {fingerprint[-16:]} {NAME} <{EMAIL}>" in good.stdout
    assert "[GNUPG:] TRUST_FULLY" in good.stdout
    bad = run_program("keyseal-gpg", "--status-fd=1", "--verify", sig, "-", input=payload + b"!")
    assert bad.returncode == 1 and "[GNUPG:] BADSIG" in bad.stdout

    # Sign by fingerprint (the key map) and by email (the keyring's user IDs).
    for spec in (fingerprint, f"0x{fingerprint[-16:]}", EMAIL, f"{NAME} <{EMAIL}>"):
        again = run_program("keyseal-gpg", "--status-fd=2", "-bsau", spec, input=payload)
        assert again.returncode == 0, (spec, again.stderr)

    for args, expected in (
        (["--status-fd=2", "-bsau", "nobody@example.org"], "no certificate in the keyseal keyring"),
        (["--encrypt", "-u", fingerprint], "does not support --encrypt"),
        (["-bsae"], "does not support -e"),
        (["--verify"], "standard input is not a cleartext signed message"),
    ):
        result = run_program("keyseal-gpg", *args, input=payload)
        assert_one_line_error(result)
        assert expected in result.stderr, result.stderr


def test_git_setup_print_mode_and_refusals(tmp_path: Path) -> None:
    custody = local_key(tmp_path, "p256")
    repo = new_repo(tmp_path)
    printed = ok(run_keyseal("git-setup", "--format", "ssh", "--key", custody.uri, cwd=repo))
    lines = printed.stdout.splitlines()
    assert lines[0] == "git config --local gpg.format ssh"
    assert any(line.startswith("git config --local gpg.ssh.program ") and line.endswith("keyseal-ssh-keygen")
               for line in lines)
    assert "git config --local commit.gpgSign true" in lines
    assert git(repo, "config", "gpg.format", check=False).returncode != 0  # nothing applied

    with_pin = "pkcs11:token=release;object=signing?pin-value=1234"  # refused before any token is opened
    refused = run_keyseal("git-setup", "--format", "ssh", "--key", with_pin, cwd=repo)
    assert_one_line_error(refused)
    assert "never writes PINs to files" in refused.stderr and "1234" not in refused.stderr
    no_cert = run_keyseal("git-setup", "--key", custody.uri, cwd=repo)
    assert_one_line_error(no_cert)
    assert "give --cert" in no_cert.stderr

    private = tmp_path / "id_ed25519"
    subprocess.run([tool("ssh-keygen", "openssh-client"), "-q", "-t", "ed25519", "-N", "", "-f", str(private)],
                   check=True)
    data = tmp_path / "buffer"
    data.write_bytes(b"commit\n")
    for key_file, expected in ((private, "is a private key file"), (Path(f"{private}.pub"), "no key URI is registered"),
                               (tmp_path / "absent", "neither a public key file nor a key URI")):
        result = run_program("keyseal-ssh-keygen", "-Y", "sign", "-n", "git", "-f", key_file, data)
        assert_one_line_error(result)
        assert expected in result.stderr, result.stderr
    assert not data.with_name("buffer.sig").exists()
    # A signature that cannot be written is named as such (not as a failure to run ssh-keygen).
    data.with_name("buffer.sig").mkdir()
    result = run_program("keyseal-ssh-keygen", "-q", "-Y", "sign", "-n", "git", "-f", custody.uri, data)
    assert_one_line_error(result)  # -q: without the "Signing file" progress line ssh-keygen writes too
    assert f"cannot write {data}.sig: Is a directory" in result.stderr, result.stderr

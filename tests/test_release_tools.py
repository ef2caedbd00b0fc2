"""Release tools sign through keyseal-gpg as they would through gpg, and their own verifiers accept the result.

rpm: rpmsign --addsign with %__gpg = keyseal-gpg (rpm's own %__gpg_sign_cmd, no adapter script), rpmkeys --checksig
reads `OK` and `BAD` (it exits 0 on an unsigned package, so the line is what counts). APT: a repository whose
InRelease comes from `keyseal-gpg --clearsign` and Release.gpg from `-abs`; apt-get update against private state
directories. Debian: debsign -p keyseal-gpg on a .dsc/.changes pair, dscverify --keyring. GoReleaser and Maven:
their gpg command lines, literally. Every tool runs with HOME, GNUPGHOME and its own state under tmp_path.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import sqv_verify
from tests.formats_peers import script, tool
from tests.gpg_peers import Registered, kill_agent, register

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

SPEC = """Name: keyseal-tiny
Version: 1.0
Release: 1
Summary: tiny
License: MIT
BuildArch: noarch
%description
A package for the signing tests.
%install
mkdir -p %{buildroot}/usr/share/keyseal-tiny
echo hello > %{buildroot}/usr/share/keyseal-tiny/hello
%files
/usr/share/keyseal-tiny/hello
"""


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registered]:
    keys = register(tmp_path_factory.mktemp("release-tools"),
                    {"ed": ("ed25519", "releases@example.org"), "rsa": ("rsa2048", "rsa-releases@example.org")})
    yield keys
    kill_agent(keys)


def flip_at(path: Path, marker: bytes, out: Path, offset: int = 0) -> Path:
    data = bytearray(path.read_bytes())
    index = data.index(marker) + offset
    data[index] ^= 0x01
    out.write_bytes(bytes(data))
    return out


# -- rpm ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unsigned_rpm(registered: Registered) -> Path:
    top = registered.root / "rpmbuild"
    spec = registered.root / "tiny.spec"
    spec.write_text(SPEC)
    built = registered.run(tool("rpmbuild", "rpm"), "--define", f"_topdir {top}", "--define",
                           f"_tmppath {top}/tmp", "--define", f"_dbpath {top}/db", "-bb", spec)
    assert built.returncode == 0, built.stderr
    return top / "RPMS" / "noarch" / "keyseal-tiny-1.0-1.noarch.rpm"


def rpm_defines(registered: Registered, label: str) -> list[str]:
    root = registered.root / "rpmbuild"
    return ["--define", f"_gpg_name {registered.keys[label].fingerprint}", "--define",
            f"__gpg {script('keyseal-gpg')}", "--define", f"_tmppath {root}/tmp", "--define", f"_dbpath {root}/db"]


def checksig(registered: Registered, package: Path) -> str:
    result = registered.run(tool("rpmkeys", "rpm"), "--define", f"_dbpath {registered.root}/rpmdb", "--checksig",
                            "-v", package)
    return result.stdout


@pytest.mark.parametrize(("label", "algorithm"), [("ed", "EdDSA/SHA256"), ("rsa", "RSA/SHA256")])
def test_rpmsign_through_keyseal_gpg(registered: Registered, unsigned_rpm: Path, label: str,
                                     algorithm: str) -> None:
    package = registered.root / f"{label}.rpm"
    shutil.copy(unsigned_rpm, package)
    signed = registered.run(tool("rpmsign", "rpm"), *rpm_defines(registered, label), "--addsign", package)
    assert signed.returncode == 0, signed.stderr
    imported = registered.run(tool("rpmkeys", "rpm"), "--define", f"_dbpath {registered.root}/rpmdb",
                              "--import", registered.keys[label].cert)
    assert imported.returncode == 0, imported.stderr
    key_id = registered.keys[label].fingerprint[-8:].lower()
    assert re.search(rf"Header V4 {algorithm} Signature, key ID {key_id}: OK", checksig(registered, package))

    # One byte of the signed header changed (the License tag's value): the signature line says BAD.
    tampered = flip_at(package, b"MIT\x00", registered.root / f"{label}-tampered.rpm", 2)
    assert re.search(rf"Header V4 {algorithm} Signature, key ID {key_id}: BAD", checksig(registered, tampered))
    # rpmkeys exits 0 on an unsigned package: only the absent signature line tells.
    assert "Signature" not in checksig(registered, unsigned_rpm)


# -- APT ------------------------------------------------------------------------------------------------------


def make_repository(registered: Registered, directory: Path) -> Path:
    package = directory / "pkg"
    (package / "DEBIAN").mkdir(parents=True)
    (package / "DEBIAN" / "control").write_text(
        "Package: keyseal-tiny\nVersion: 1.0\nArchitecture: all\nMaintainer: Example <releases@example.org>\n"
        "Description: tiny\n")
    repo = directory / "repo"
    repo.mkdir()
    built = registered.run(tool("dpkg-deb", "dpkg"), "-b", package, repo / "keyseal-tiny_1.0_all.deb")
    assert built.returncode == 0, built.stderr
    ftparchive = tool("apt-ftparchive", "apt-utils")
    packages = registered.run(ftparchive, "packages", ".", cwd=repo)
    (repo / "Packages").write_text(packages.stdout)
    release = registered.run(ftparchive, "-o", "APT::FTPArchive::Release::Suite=stable", "-o",
                             "APT::FTPArchive::Release::Codename=stable", "release", ".", cwd=repo)
    (repo / "Release").write_text(release.stdout)
    key = registered.keys["ed"].fingerprint
    clear = registered.gpg("--batch", "--yes", "-u", key, "--clearsign", "-o", repo / "InRelease", repo / "Release")
    assert clear.returncode == 0, clear.stderr
    detached = registered.gpg("--batch", "--yes", "-u", key, "-abs", "-o", repo / "Release.gpg", repo / "Release")
    assert detached.returncode == 0, detached.stderr
    return repo


def apt_update(registered: Registered, directory: Path, repo: Path) -> tuple[int, str]:
    """apt-get update with every state and cache directory private to the test."""
    state = directory / f"state-{len(list(directory.glob('state-*')))}"
    (state / "lists" / "partial").mkdir(parents=True)
    (state / "cache" / "archives" / "partial").mkdir(parents=True)
    (state / "status").touch()
    sources = state / "sources.list"
    sources.write_text(f"deb [signed-by={registered.keys['ed'].cert}] file:{repo} ./\n")
    result = registered.run(
        tool("apt-get", "apt"), "update", "-o", f"Dir::Etc::SourceList={sources}", "-o",
        "Dir::Etc::SourceParts=/dev/null", "-o", f"Dir::State::Lists={state / 'lists'}", "-o",
        f"Dir::Cache={state / 'cache'}", "-o", f"Dir::State::status={state / 'status'}", "-o",
        "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root", timeout=180)
    return result.returncode, result.stdout + result.stderr


def test_apt_repository_signed_by_keyseal_gpg(registered: Registered, tmp_path: Path) -> None:
    repo = make_repository(registered, tmp_path)
    code, output = apt_update(registered, tmp_path, repo)
    assert code == 0, output
    assert re.search(r"Get:\d+ file:\S+ \./ InRelease", output), output
    assert "Ign" not in output and "Release.gpg" not in output and "W:" not in output, output

    # Release.gpg (the detached, armored -abs signature) carries the repository alone when there is no InRelease.
    in_release = (repo / "InRelease").read_bytes()
    (repo / "InRelease").unlink()
    code, output = apt_update(registered, tmp_path, repo)
    assert code == 0 and "W:" not in output, output
    assert re.search(r"Get:\d+ file:\S+ \./ Release\.gpg", output), output

    # One byte of the signed text changed: apt refuses the repository.
    (repo / "InRelease").write_bytes(in_release.replace(b"Codename: stable", b"Codename: stablf"))
    code, output = apt_update(registered, tmp_path, repo)
    assert code != 0, output
    assert "BADSIG" in output and "is not signed" in output, output


# -- debsign / dscverify --------------------------------------------------------------------------------------


def source_tree(tmp_path: Path) -> Path:
    source = tmp_path / "keyseal-tiny-1.0"
    (source / "debian" / "source").mkdir(parents=True)
    (source / "debian" / "source" / "format").write_text("3.0 (native)\n")
    (source / "debian" / "control").write_text(
        "Source: keyseal-tiny\nMaintainer: Example Releases <releases@example.org>\nSection: misc\n"
        "Priority: optional\nStandards-Version: 4.6.2\n\nPackage: keyseal-tiny\nArchitecture: all\n"
        "Description: tiny\n tiny\n")
    (source / "debian" / "changelog").write_text(
        "keyseal-tiny (1.0) unstable; urgency=medium\n\n  * Initial release.\n\n"
        " -- Example Releases <releases@example.org>  Thu, 01 Jan 2026 00:00:00 +0000\n")
    (source / "README").write_text("hello\n")
    rules = source / "debian" / "rules"
    rules.write_text("#!/usr/bin/make -f\nclean:\n\ttrue\n")
    rules.chmod(0o755)
    return source


def test_debsign_and_dscverify(registered: Registered, tmp_path: Path) -> None:
    source = source_tree(tmp_path)
    built = registered.run(tool("dpkg-source", "dpkg-dev"), "-b", source.name, cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    changes = registered.run(tool("dpkg-genchanges", "dpkg-dev"), "-S", cwd=source)
    assert changes.returncode == 0, changes.stderr
    changes_file = tmp_path / "keyseal-tiny_1.0_source.changes"
    changes_file.write_text(changes.stdout)

    signed = registered.run(tool("debsign", "devscripts"), "-p", "keyseal-gpg", "-k",
                            registered.keys["ed"].fingerprint, "--no-re-sign", changes_file, cwd=tmp_path)
    assert signed.returncode == 0, signed.stdout + signed.stderr
    dsc = tmp_path / "keyseal-tiny_1.0.dsc"
    for path in (dsc, changes_file):
        assert path.read_bytes().startswith(b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n")

    dscverify = tool("dscverify", "devscripts")
    keyring = registered.keyring("ed")
    accepted = registered.run(dscverify, "--keyring", keyring, changes_file, cwd=tmp_path)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert accepted.stdout.count("Good signature found") == 2, accepted.stdout  # .changes, then the .dsc in it

    flip_at(dsc, b"Source: keyseal-tiny", dsc, len("Source: keyseal-tin"))
    refused = registered.run(dscverify, "--keyring", keyring, dsc, cwd=tmp_path)
    assert refused.returncode != 0 and "BAD signature" in refused.stdout + refused.stderr


# -- GoReleaser and Maven command lines -----------------------------------------------------------------------


def test_goreleaser_and_maven_command_lines(registered: Registered, tmp_path: Path) -> None:
    artifact = tmp_path / "tool_1.0_linux_amd64.tar.gz"
    artifact.write_bytes(b"\x1f\x8b release bytes " * 1000)
    key = registered.keys["ed"]

    # GoReleaser's documented signs: entry, args ["--batch", "-u", KEY, "--output", "${signature}",
    # "--detach-sign", "${artifact}"].
    signature = tmp_path / f"{artifact.name}.sig"
    goreleaser = registered.gpg("--batch", "-u", key.fingerprint, "--output", signature, "--detach-sign", artifact)
    assert goreleaser.returncode == 0, goreleaser.stderr
    assert signature.read_bytes()[:1] != b"-"  # binary, as gpg writes without --armor
    # Its default args (no -u): the one registered key signs... here two are registered, so -u is needed.
    default = registered.gpg("--output", tmp_path / "default.sig", "--detach-sign", artifact)
    assert default.returncode == 2 and "name the signing key with -u" in default.stderr

    # maven-gpg-plugin: --version must match its pattern; then it signs each artifact with the passphrase on
    # stdin (useless to keyseal, ignored).
    version = registered.gpg("--version")
    assert re.match(r"gpg \([^)]+\) .+", version.stdout.splitlines()[0]), version.stdout
    assert version.stdout.splitlines()[0].split(" ")[2] == "2.2.40"  # debsign's `cut -d' ' -f3`
    asc = tmp_path / f"{artifact.name}.asc"
    maven = registered.gpg("--batch", "--no-tty", "--pinentry-mode", "error", "--local-user", key.fingerprint,
                           "--passphrase-fd", "0", "--armor", "--detach-sign", "--output", asc, artifact,
                           input=b"not-a-passphrase\n")
    assert maven.returncode == 0, maven.stderr
    assert asc.read_bytes().startswith(b"-----BEGIN PGP SIGNATURE-----")

    gpg_home = Path(registered.env["GNUPGHOME"])
    for sig in (signature, asc):
        checked = registered.run("gpg", "--homedir", gpg_home, "--batch", "--no-default-keyring", "--keyring",
                                 registered.keyring("ed"), "--status-fd", "1", "--verify", sig, artifact)
        assert "[GNUPG:] GOODSIG" in checked.stdout and f"VALIDSIG {key.fingerprint}" in checked.stdout, checked
        assert sqv_verify(key.cert, sig, artifact).returncode == 0


def test_dpkg_buildpackage_sign_command(registered: Registered, tmp_path: Path) -> None:
    source = source_tree(tmp_path)
    built = registered.run(tool("dpkg-buildpackage", "dpkg-dev"), "-S", "-d", "-nc", "--sign-backend=gpg",
                           "--sign-command=keyseal-gpg", f"--sign-key={registered.keys['ed'].fingerprint}",
                           cwd=source)
    assert built.returncode == 0, built.stdout + built.stderr
    changes = tmp_path / "keyseal-tiny_1.0_source.changes"
    for path in (tmp_path / "keyseal-tiny_1.0.dsc", tmp_path / "keyseal-tiny_1.0_source.buildinfo", changes):
        # dpkg asks for --personal-digest-preferences 'SHA512 SHA384 SHA256 SHA224'.
        assert path.read_bytes().startswith(b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\n"), path
    accepted = registered.run(tool("dscverify", "devscripts"), "--keyring", registered.keyring("ed"), changes,
                              cwd=tmp_path)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr

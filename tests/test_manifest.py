"""Checksum manifests: `keyseal checksums` writes what coreutils reads; `keyseal verify-release` checks the
manifest's signature first, parses it strictly, then every artifact, and says which step failed."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from keyseal._internal.openpgp.manifest import entry_for, parse_manifest
from keyseal.errors import VerificationError
from tests.conftest import Result, assert_one_line_error, run_keyseal
from tests.harness.release_keys import ReleaseKey, make_key, sign_file

A_HEX = "a" * 64
B_HEX = "b" * 64


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ReleaseKey]:
    directory = tmp_path_factory.mktemp("manifest-keys")
    return {"release": make_key(directory, "release", "p256"), "stranger": make_key(directory, "stranger")}


@pytest.fixture
def release(tmp_path: Path) -> list[Path]:
    files = []
    for name, content in (("tool-1.0.tar.gz", b"tarball\n" * 500), ("tool-1.0.zip", b"zip\x00" * 300)):
        path = tmp_path / name
        path.write_bytes(content)
        files.append(path)
    return files


def checksums(tmp_path: Path, files: list[Path]) -> Path:
    manifest = tmp_path / "SHA256SUMS"
    result = run_keyseal("checksums", *files, "-o", manifest)
    assert result.returncode == 0, result.stderr
    return manifest


def verify_release(manifest: Path, cert: Path, *artifacts: Path, sig: Path | None = None) -> Result:
    extra = ["--sig", str(sig)] if sig is not None else []
    return run_keyseal("verify-release", "--manifest", manifest, *extra, "--cert", cert, *artifacts)


@pytest.mark.slow
def test_checksums_are_read_by_coreutils(tmp_path: Path, release: list[Path]) -> None:
    manifest = checksums(tmp_path, release)
    lines = manifest.read_text().splitlines()
    assert [line.split("  ")[1] for line in lines] == ["tool-1.0.tar.gz", "tool-1.0.zip"]
    assert all(len(line.split("  ")[0]) == 64 for line in lines)
    check = subprocess.run(["sha256sum", "--check", "--strict", manifest.name], cwd=tmp_path,
                           capture_output=True, check=False)
    assert check.returncode == 0, check.stderr
    (tmp_path / "tool-1.0.zip").write_bytes(b"changed")
    assert subprocess.run(["sha256sum", "--check", manifest.name], cwd=tmp_path, capture_output=True,
                          check=False).returncode == 1
    printed = run_keyseal("checksums", "--digest", "sha512", *release)
    assert printed.returncode == 0 and len(printed.stdout.split()[0]) == 128


@pytest.mark.slow
def test_checksums_refuse_two_files_with_one_name(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for sub in ("a", "b"):
        (tmp_path / sub / "tool.tar.gz").write_bytes(sub.encode())
    result = run_keyseal("checksums", tmp_path / "a" / "tool.tar.gz", tmp_path / "b" / "tool.tar.gz",
                         "-o", tmp_path / "SUMS")
    assert_one_line_error(result)
    assert "same name" in result.stderr
    assert not (tmp_path / "SUMS").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"{A_HEX} tool\n", "line 1 is malformed"),  # one space and no mode marker
        (f"{A_HEX}  tool\n\n", "line 2 is malformed"),  # a blank line
        (f"{A_HEX[:-1]}  tool\n", "63-digit digest"),
        (f"{A_HEX}  tool\n{'c' * 128}  other\n", "mixes SHA-512"),
        (f"{A_HEX}  tool\n{B_HEX}  tool\n", "lists 'tool' again (first on line 1)"),
        (f"\\{A_HEX}  to\\nol\n", "line 1 is malformed"),  # coreutils' escaped names are not accepted
        (f"{A_HEX}  tool\rx\n", "line 1 is malformed"),
        (f"# comment\n{A_HEX}  tool\n", "line 1 is malformed"),
        ("", "lists no files"),
        (f"{A_HEX}  tool\n{B_HEX}  ./tool\n", "lists './tool', the same file as 'tool' on line 1"),
        (f"{A_HEX}  dist/tool\n{A_HEX}  dist//tool\n", "lists 'dist//tool', the same file as 'dist/tool'"),
        (f"{A_HEX}  tool/\n", "names a directory"),
        (f"{A_HEX}  .\n", "names a directory"),
        (f"{A_HEX}  dist/..\n", "names a directory"),
        (f"{'g' * 64}  tool\n", "line 1 is malformed"),
    ],
)
def test_manifest_parser_is_strict(text: str, message: str) -> None:
    with pytest.raises(VerificationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_manifest(text.encode(), "SHA256SUMS")


# Two names and whether they are one file in the tree `test_duplicates_are_what_coreutils_reads_as_one_file` makes
# (files f, F, 'f ', a/b, dist/f and ../f, each with its own content; `{work}` is that tree's absolute path).
NAME_PAIRS = [
    ("f", "./f", True),
    ("f", ".//f", True),
    ("a/b", "a//b", True),
    ("a/b", "a/./b", True),
    ("a/b", "./a/b", True),
    ("f", "a/../f", True),
    ("f", "a/./../f", True),
    ("{work}/f", "/{work}/f", True),
    ("{work}/f", "{work}/a/../f", True),
    ("f", "F", False),
    ("f", "f ", False),
    ("f", " f", False),
    ("f", "dist/f", False),
    ("f", "../f", False),
    ("./dist/f", "dist/f/f", False),
]


@pytest.mark.parametrize(("first", "second", "same"), NAME_PAIRS)
def test_duplicates_are_what_coreutils_reads_as_one_file(first: str, second: str, same: bool,
                                                         tmp_path: Path) -> None:
    """Both names listed with the first one's digest: `sha256sum -c` passes only if they are one file, and
    exactly then keyseal refuses the manifest (listing one file twice lets two readers pick different lines)."""
    work = tmp_path / "work"
    for name, content in (("f", b"f"), ("F", b"F"), ("f ", b"f space"), (" f", b"space f"), ("a/b", b"ab"),
                          ("dist/f", b"dist f"), ("../f", b"parent f")):
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    first, second = (name.replace("{work}", str(work)) for name in (first, second))  # "/{work}": "//tmp/..."
    digest = hashlib.sha256((work / first).read_bytes()).hexdigest()
    manifest = f"{digest}  {first}\n{digest}  {second}\n".encode()
    (work / "SUMS").write_bytes(manifest)
    coreutils = subprocess.run(["sha256sum", "--check", "SUMS"], cwd=work, capture_output=True, check=False)
    assert (coreutils.returncode == 0) is same, coreutils.stdout
    if same:
        with pytest.raises(VerificationError, match="the same file as"):
            parse_manifest(manifest, "SUMS")
    else:
        assert len(parse_manifest(manifest, "SUMS").entries) == 2


def test_an_artifact_matches_its_line_however_the_name_is_spelled(tmp_path: Path) -> None:
    """`./dist/tool` (as `sha256sum ./dist/*` writes it) is the line for the artifact dist/tool."""
    (tmp_path / "dist").mkdir()
    artifact = tmp_path / "dist" / "tool"
    artifact.write_bytes(b"tool")
    digest = hashlib.sha256(b"tool").hexdigest()
    manifest = parse_manifest(f"{digest}  ./dist//tool\n{'0' * 64}  tool\n".encode())
    assert entry_for(manifest, Path("dist") / "tool", "SUMS").name == "./dist//tool"
    assert entry_for(manifest, Path("./dist/./tool"), "SUMS").name == "./dist//tool"
    assert entry_for(manifest, Path("elsewhere") / "tool", "SUMS").name == "tool"  # by base name, as before


def test_manifest_parser_accepts_crlf_binary_marker_and_upper_case() -> None:
    parsed = parse_manifest(f"{A_HEX.upper()}  tool.tar.gz\r\n{B_HEX} *tool.zip\r\n".encode())
    assert parsed.digest_name == "sha256"
    assert [(e.name, e.digest.hex()) for e in parsed.entries] == [("tool.tar.gz", A_HEX), ("tool.zip", B_HEX)]
    with pytest.raises(VerificationError, match="not UTF-8"):
        parse_manifest(A_HEX.encode() + b"  \xff\xfe\n")


@pytest.mark.slow
def test_verify_release_accepts_a_signed_release(tmp_path: Path, release: list[Path],
                                                 keys: dict[str, ReleaseKey]) -> None:
    manifest = checksums(tmp_path, release)
    signed = run_keyseal("sign", "--key", keys["release"].uri, "--cert", keys["release"].cert, manifest)
    assert signed.returncode == 0, signed.stderr
    result = verify_release(manifest, keys["release"].cert, *release)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{path}: OK" for path in release]
    assert keys["release"].fingerprint in result.stderr
    # One artifact alone is fine too; a path as listed (base name) resolves from another directory.
    assert verify_release(manifest, keys["release"].cert, release[1]).returncode == 0


@pytest.mark.slow
def test_verify_release_rejects_a_changed_artifact(tmp_path: Path, release: list[Path],
                                                   keys: dict[str, ReleaseKey]) -> None:
    manifest = checksums(tmp_path, release)
    sign_file(keys["release"], manifest)
    release[1].write_bytes(release[1].read_bytes() + b"!")
    result = verify_release(manifest, keys["release"].cert, *release)
    assert_one_line_error(result)
    assert result.returncode == 1
    assert f"{release[1]}: SHA-256 differs from the one {manifest} lists for 'tool-1.0.zip'" in result.stderr
    assert result.stdout == ""  # nothing is reported OK unless every artifact is


@pytest.mark.slow
def test_verify_release_rejects_a_changed_manifest_line(tmp_path: Path, release: list[Path],
                                                        keys: dict[str, ReleaseKey]) -> None:
    manifest = checksums(tmp_path, release)
    sign_file(keys["release"], manifest)
    # An attacker swaps in the digest of their own file: the manifest no longer matches its signature.
    evil = tmp_path / "evil.tar.gz"
    evil.write_bytes(b"malware")
    evil_line = run_keyseal("checksums", evil).stdout.split()[0]
    lines = manifest.read_text().splitlines()
    lines[0] = f"{evil_line}  tool-1.0.tar.gz"
    manifest.write_text("\n".join(lines) + "\n")
    evil.replace(release[0])
    result = verify_release(manifest, keys["release"].cert, *release)
    assert_one_line_error(result)
    assert result.returncode == 1
    assert f"{manifest} is not validly signed" in result.stderr and "BAD signature" in result.stderr


@pytest.mark.slow
def test_verify_release_rejects_a_duplicated_name(tmp_path: Path, release: list[Path],
                                                  keys: dict[str, ReleaseKey]) -> None:
    manifest = checksums(tmp_path, release)
    first = manifest.read_text().splitlines()[0]
    manifest.write_text(manifest.read_text() + first.replace(first[:64], "0" * 64) + "\n")
    sign_file(keys["release"], manifest)  # signed as it is: the duplicate is caught by the parser
    result = verify_release(manifest, keys["release"].cert, *release)
    assert_one_line_error(result)
    assert "line 3 lists 'tool-1.0.tar.gz' again" in result.stderr and "duplicate" in result.stderr


@pytest.mark.slow
def test_verify_release_rejects_a_manifest_signed_by_an_unknown_key(tmp_path: Path, release: list[Path],
                                                                    keys: dict[str, ReleaseKey]) -> None:
    manifest = checksums(tmp_path, release)
    sig = sign_file(keys["stranger"], manifest)
    result = verify_release(manifest, keys["release"].cert, *release, sig=sig)
    assert_one_line_error(result)
    assert result.returncode == 1
    assert "is not validly signed" in result.stderr
    assert f"no given certificate has the signing key {keys['stranger'].fingerprint[-16:]}" in result.stderr


@pytest.mark.slow
def test_verify_release_rejects_an_unlisted_artifact_and_a_missing_signature(
        tmp_path: Path, release: list[Path], keys: dict[str, ReleaseKey]) -> None:
    manifest = checksums(tmp_path, release[:1])
    unsigned = verify_release(manifest, keys["release"].cert, release[0])
    assert_one_line_error(unsigned)
    assert "neither SHA256SUMS.asc nor SHA256SUMS.sig exists" in unsigned.stderr
    sign_file(keys["release"], manifest)
    result = verify_release(manifest, keys["release"].cert, *release)
    assert_one_line_error(result)
    assert f"{release[1]} is not listed in {manifest}" in result.stderr

"""Bad input: one line on stderr, a non-zero exit, no traceback, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, run_keyseal

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop


@pytest.fixture(scope="module")
def local_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("errkeys")
    key, cert = directory / "k.pem", directory / "k.asc"
    assert run_keyseal("keys", "create", "--out", key, "--type", "ed25519").returncode == 0
    assert run_keyseal("keys", "mint", "--key", f"file:{key}", "--name", "E", "--email", "e@example.org",
                       "-o", cert).returncode == 0
    return key, cert


def listing(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def test_unknown_uri_scheme(tmp_path: Path) -> None:
    data = tmp_path / "f"
    data.write_bytes(b"x")
    result = run_keyseal("sign", "--key", "gcpkms:projects/p/keys/k", data)
    assert_one_line_error(result)
    assert "unknown key URI scheme 'gcpkms'" in result.stderr
    assert listing(tmp_path) == {"f"}


def test_missing_input_file(local_key: tuple[Path, Path], tmp_path: Path) -> None:
    key, cert = local_key
    result = run_keyseal("sign", "--key", f"file:{key}", "--cert", cert, tmp_path / "absent.tar.gz")
    assert_one_line_error(result)
    assert "absent.tar.gz does not exist" in result.stderr
    assert listing(tmp_path) == set()


def test_output_in_a_missing_directory(local_key: tuple[Path, Path], tmp_path: Path) -> None:
    key, cert = local_key
    data = tmp_path / "f"
    data.write_bytes(b"x")
    result = run_keyseal("sign", "--key", f"file:{key}", "--cert", cert, "-o", tmp_path / "absent" / "f.asc", data)
    assert_one_line_error(result)
    assert f"cannot write {tmp_path / 'absent' / 'f.asc'}: No such file or directory" in result.stderr
    assert listing(tmp_path) == {"f"}


def test_missing_key_file(tmp_path: Path) -> None:
    data = tmp_path / "f"
    data.write_bytes(b"x")
    result = run_keyseal("sign", "--key", f"file:{tmp_path / 'nokey.pem'}", data)
    assert_one_line_error(result)
    assert listing(tmp_path) == {"f"}


def test_unreadable_certificate(local_key: tuple[Path, Path], tmp_path: Path) -> None:
    key, _ = local_key
    data = tmp_path / "f"
    data.write_bytes(b"x")
    junk = tmp_path / "junk.asc"
    junk.write_bytes(b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nbm90IGEga2V5\n-----END PGP PUBLIC KEY BLOCK-----\n")
    for command in (["sign", "--key", f"file:{key}", "--cert", junk, data], ["verify", "--cert", junk, data]):
        result = run_keyseal(*command)
        assert_one_line_error(result)
    assert listing(tmp_path) == {"f", "junk.asc"}
    result = run_keyseal("verify", "--cert", tmp_path / "missing.asc", data)
    assert_one_line_error(result)


def test_garbage_signature(local_key: tuple[Path, Path], tmp_path: Path) -> None:
    _, cert = local_key
    data = tmp_path / "f"
    data.write_bytes(b"x")
    for index, garbage in enumerate([b"", b"\x00\x01garbage", b"\x88\xff\xff", b"-----BEGIN PGP SIGNATURE-----\n"]):
        sig = tmp_path / f"g{index}.sig"
        sig.write_bytes(garbage)
        result = run_keyseal("verify", "--cert", cert, data, sig)
        assert_one_line_error(result)
        assert result.returncode == 1


def test_armor_checksum_mismatch_is_rejected(local_key: tuple[Path, Path], tmp_path: Path) -> None:
    key, cert = local_key
    data = tmp_path / "f"
    data.write_bytes(b"x")
    assert run_keyseal("sign", "--key", f"file:{key}", "--cert", cert, data).returncode == 0
    sig = tmp_path / "f.asc"
    lines = sig.read_text().splitlines()
    crc_index = next(i for i, line in enumerate(lines) if line.startswith("="))
    lines[crc_index] = "=AAAA"
    sig.write_text("\n".join(lines) + "\n")
    result = run_keyseal("verify", "--cert", cert, data)
    assert_one_line_error(result)
    assert "checksum" in result.stderr


def test_bad_options(local_key: tuple[Path, Path], tmp_path: Path) -> None:
    key, _ = local_key
    for args in (
        ["keys", "mint", "--key", f"file:{key}", "--name", "A", "--email", "not-an-email"],
        ["keys", "mint", "--key", f"file:{key}", "--name", "A", "--email", "a@example.org", "--created", "yesterday"],
        ["keys", "mint", "--key", f"file:{key}", "--name", "A", "--email", "a@example.org", "--expires", "-1d"],
        ["keys", "create", "--type", "dsa1024", "--out", tmp_path / "x"],
        ["sign", "--key", "file:", tmp_path / "x"],
        ["sign"],
    ):
        assert_one_line_error(run_keyseal(*args))
    assert listing(tmp_path) == set()


def test_verify_with_no_signature_file(local_key: tuple[Path, Path], tmp_path: Path) -> None:
    _, cert = local_key
    data = tmp_path / "f"
    data.write_bytes(b"x")
    result = run_keyseal("verify", "--cert", cert, data)
    assert_one_line_error(result)
    assert "f.asc" in result.stderr


def test_import_keyseal_and_verify_without_boto3(local_key: tuple[Path, Path], tmp_path: Path) -> None:
    """`import keyseal` and `keyseal verify` load no cloud SDK."""
    import subprocess
    import sys

    key, cert = local_key
    data = tmp_path / "f"
    data.write_bytes(b"x")
    assert run_keyseal("sign", "--key", f"file:{key}", "--cert", cert, data).returncode == 0
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('boto3', 'botocore', 'pkcs11', 'kubernetes', 'hvac'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import keyseal, keyseal._internal.backends\n"
        "from keyseal._internal.cli.main import main\n"
        f"sys.argv = ['keyseal', 'verify', '--cert', {str(cert)!r}, {str(data)!r}]\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr.decode()

"""Errors keep their cause (`raise ... from exc`); the CLI prints one line, and with KEYSEAL_DEBUG=1 or
`keyseal -v` the chain of causes below it. The same rule in every entry point (keyseal's fast path, the click
commands, keyseal-gpg), from keyseal._internal.cli.guard."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from keyseal._internal.backends.hashivault import create_transit_key
from keyseal._internal.cli.guard import cause_lines
from keyseal.errors import InputError, KeysealError
from tests.conftest import assert_one_line_error, run_keyseal

KEYSEAL_GPG = str(Path(sys.executable).with_name("keyseal-gpg"))


def test_cause_lines_follow_the_chain_innermost_last() -> None:
    try:
        try:
            try:
                raise OSError(21, "Is a directory")
            except OSError as exc:
                raise ValueError("bad\nvalue") from exc
        except ValueError as exc:
            raise InputError("certificate x is a directory") from exc
    except InputError as error:
        lines = cause_lines(error)
    assert lines == ["  caused by: ValueError: bad value", "  caused by: IsADirectoryError: [Errno 21] Is a directory"]


def test_a_suppressed_context_is_not_a_cause() -> None:
    try:
        try:
            raise KeyError("k")
        except KeyError:
            raise KeysealError("shown alone") from None
    except KeysealError as error:
        assert cause_lines(error) == []


def test_the_fast_path_shows_the_cause_only_when_asked(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"x")
    (tmp_path / "data.asc").write_bytes(b"x")
    directory = tmp_path / "certs"
    directory.mkdir()
    plain = run_keyseal("verify", "--cert", directory, data)
    assert_one_line_error(plain)
    assert "is a directory" in plain.stderr
    debug = run_keyseal("verify", "--cert", directory, data, env={"KEYSEAL_DEBUG": "1"})
    lines = debug.stderr.splitlines()
    assert debug.returncode == plain.returncode and lines[0] == plain.stderr.strip()
    assert lines[1:] == [f"  caused by: IsADirectoryError: [Errno 21] Is a directory: '{directory}'"], lines
    assert "Traceback" not in debug.stderr


@pytest.mark.parametrize("ask", [["-v"], []])
def test_a_click_command_shows_the_cause_with_verbose(tmp_path: Path, ask: list[str]) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"x")
    key_directory = tmp_path / "key"
    key_directory.mkdir()
    result = run_keyseal(*ask, "sign", "--key", f"file:{key_directory}", data)
    lines = [line for line in result.stderr.splitlines() if line.startswith(("keyseal: error:", "  caused by:"))]
    assert result.returncode != 0 and lines and lines[0].startswith("keyseal: error: ")
    assert any(line.startswith("  caused by: IsADirectoryError") for line in lines) == bool(ask), result.stderr
    assert "Traceback" not in result.stderr


def test_keyseal_gpg_shows_the_cause_with_keyseal_debug(tmp_path: Path) -> None:
    directory = tmp_path / "sig"
    directory.mkdir()
    args = [KEYSEAL_GPG, "--status-fd=1", "--verify", str(directory), "-"]
    plain = subprocess.run(args, input=b"data", capture_output=True, timeout=60, check=False)
    debug = subprocess.run(args, input=b"data", capture_output=True, timeout=60, check=False,
                           env={**__import__("os").environ, "KEYSEAL_DEBUG": "1"})
    assert plain.returncode == debug.returncode == 2
    plain_lines, debug_lines = plain.stderr.decode().splitlines(), debug.stderr.decode().splitlines()
    assert len(plain_lines) == 1 and plain_lines[0].startswith("keyseal: error: "), plain_lines
    assert debug_lines[0] == plain_lines[0] and debug_lines[1].startswith("  caused by: IsADirectoryError"), \
        debug_lines


def test_a_malformed_vault_token_is_not_shown_by_the_causes(vault_env: dict[str, str], tmp_path: Path) -> None:
    """A token file holding two lines (two tokens, or a token and a note) is a token no request can carry; the
    HTTP library's refusal quotes the header value, so neither the line nor `-v`'s causes may show it."""
    create_transit_key("hashivault://causes", "p256")
    token_file = tmp_path / "sink"
    token_file.write_text("hvs.FIRSTSECRETTOKEN\nhvs.SECONDSECRETTOKEN\n")
    token_file.chmod(0o600)
    data = tmp_path / "data"
    data.write_bytes(b"x")
    env = {name: "" for name in ("VAULT_TOKEN", "BAO_TOKEN")} | {"KEYSEAL_VAULT_TOKEN_FILE": str(token_file)}
    for ask in ([], ["-v"]):
        result = run_keyseal(*ask, "sign", "--format", "ssh", "--key", "hashivault://causes", data, env=env)
        assert result.returncode != 0 and "keyseal: error: " in result.stderr, result
        assert "SECRETTOKEN" not in result.stderr, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
    assert f"the Vault token file {token_file} does not hold one Vault token" in result.stderr, result.stderr


def test_a_malformed_aws_session_token_is_not_shown_by_the_causes(aws_env: dict[str, str], kms_client: Any,
                                                                  tmp_path: Path) -> None:
    """boto3 reads its credentials itself; an HTTP header cannot carry a session token with a line break in it,
    and the refusal underneath (botocore's, and http.client's below it) quotes the header value."""
    arn = kms_client.create_key(KeyUsage="SIGN_VERIFY", KeySpec="ECC_NIST_P256")["KeyMetadata"]["Arn"]
    data = tmp_path / "data"
    data.write_bytes(b"x")
    result = run_keyseal("-v", "sign", "--format", "ssh", "--key", f"awskms:{arn}", data,
                         env={"AWS_SESSION_TOKEN": "FIRSTSESSIONSECRET\nSECONDSESSIONSECRET"})
    assert result.returncode != 0 and "keyseal: error: " in result.stderr, result
    assert "caused by: ValueError: Invalid header value" in result.stderr, result.stderr
    assert "SESSIONSECRET" not in result.stderr, result.stderr

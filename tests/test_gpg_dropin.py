"""keyseal-gpg as a drop-in gpg, and cleartext signatures (RFC 9580 section 7), checked by independent verifiers.

Cleartext: gpg, gpgv, sqv (the signature over the text as the RFC canonicalises it, computed here independently)
and `sq verify` accept keyseal's cleartext messages for awkward texts (lines starting with "-", trailing spaces and
tabs, CRLF, no final newline, non-ASCII); gpg's own cleartext messages verify with `keyseal verify`, and one changed
byte is refused everywhere. keyseal-gpg: every sign mode, armored and binary, files and stdin, output rules, digest
choice, key lookup by fingerprint / key ID / user ID / URI, key listings in gpg's colon format, status lines, the
ignored and refused options, and no heavy imports on its sign and verify paths.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Result, assert_one_line_error, run_keyseal, sqv_verify
from tests.formats_peers import tool
from tests.gpg_peers import Registered, kill_agent, register

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop

TEXTS: dict[str, bytes] = {
    "dashes": b"-leading dash\n--double\n-----BEGIN PGP SIGNATURE-----\n- already spaced\nplain\n",
    "trailing-whitespace": b"spaces   \ntabs\t\t\nmixed \t \n\t\n   \nend\n",
    "crlf": b"windows\r\nline endings\r\n-dash too\r\n\r\nend\r\n",
    "no-final-newline": b"first\nlast line without newline",
    "non-ascii": "Gr\u00fc\u00dfe, \u65e5\u672c\u8a9e, \u00e9t\u00e9 \u2014 \U0001f512\nFrom the start\n".encode(),
    "empty-lines": b"\n\nmiddle\n\n\n",
    "mixed": b"- x \r\nFrom here\n \t-\n",
    "lone-cr": b"a lone\rcarriage return\n",
}
# gpg reads only LF as a line end (a lone CR stays in the line); Sequoia also breaks lines at a lone CR, so sq and
# sqv refuse gpg's (and keyseal's) cleartext signatures over such text. keyseal follows gpg.
SEQUOIA_DIFFERS = {"lone-cr"}


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registered]:
    keys = register(tmp_path_factory.mktemp("gpg-dropin"),
                    {"ed": ("ed25519", "releases@example.org"), "p384": ("p384", "p384@example.org")})
    yield keys
    kill_agent(keys)


def canonical(text: bytes) -> bytes:
    """RFC 9580 section 7.2, written out again here so the test does not trust keyseal's own code."""
    lines = text.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"\r\n".join(line.rstrip(b" \t\r") for line in lines)


def gpg(registered: Registered, *args: str | Path, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return registered.run("gpg", "--batch", "--no-tty", "--status-fd", "1", *args,
                          input=input)


def gpg_verifies(registered: Registered, label: str, document: Path) -> bool:
    result = gpg(registered, "--no-default-keyring", "--keyring", registered.keyring(label), "--verify", document)
    return result.returncode == 0 and "[GNUPG:] GOODSIG" in result.stdout


def signature_block(document: bytes) -> bytes:
    return document[document.index(b"\n-----BEGIN PGP SIGNATURE-----") + 1 :]


def check_everywhere(registered: Registered, label: str, document: Path, text: bytes, tmp: Path,
                     sequoia: bool = True) -> None:
    """gpg, gpgv, sqv and sq accept the cleartext message, and keyseal's verify recovers the signed text."""
    assert gpg_verifies(registered, label, document), document.read_bytes()
    gpgv = registered.run(tool("gpgv", "gpgv"), "--keyring", registered.keyring(label), document)
    assert gpgv.returncode == 0, gpgv.stderr
    if sequoia:
        detached, signed = tmp / f"{document.name}.sig", tmp / f"{document.name}.canonical"
        detached.write_bytes(signature_block(document.read_bytes()))
        signed.write_bytes(canonical(text))
        assert sqv_verify(registered.keys[label].cert, detached, signed).returncode == 0
        sq = registered.run(tool("sq", "sq"), "verify", "--signer-cert", registered.keys[label].cert, document)
        assert sq.returncode == 0, sq.stderr
    out = tmp / f"{document.name}.out"
    verified = run_keyseal("verify", "--cert", registered.keys[label].cert, "--output", out, document)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.strip() == registered.keys[label].fingerprint
    expected = b"".join(line.rstrip(b" \t\r") + b"\n" for line in canonical(text).split(b"\r\n")) if text else b""
    assert out.read_bytes() == expected


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_keyseal_cleartext_accepted_by_gpg_gpgv_sqv_sq(registered: Registered, tmp_path: Path, name: str) -> None:
    text = TEXTS[name]
    source = tmp_path / f"{name}.txt"
    source.write_bytes(text)
    if name == "crlf":  # through keyseal-gpg, as APT and debsign call it
        made = registered.gpg("-u", "releases@example.org", "--clearsign", "-o", tmp_path / "doc.asc", source)
        assert made.returncode == 0, made.stderr
        document = tmp_path / "doc.asc"
    else:  # through keyseal sign --clear: FILE.asc
        made_cli = run_keyseal("sign", "--key", registered.keys["ed"].uri, "--cert", registered.keys["ed"].cert,
                               "--clear", source)
        assert made_cli.returncode == 0, made_cli.stderr
        document = source.with_name(source.name + ".asc")
        assert made_cli.stdout.strip() == str(document)
    data = document.read_bytes()
    assert data.startswith(b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n")
    check_everywhere(registered, "ed", document, text, tmp_path, sequoia=name not in SEQUOIA_DIFFERS)

    # One changed byte of the text: refused by gpg and keyseal.
    body_start = data.index(b"\n\n") + 2
    index = next(i for i in range(body_start, len(data)) if data[i:i + 1].isalnum())
    tampered = tmp_path / "tampered.asc"
    tampered.write_bytes(data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :])
    assert not gpg_verifies(registered, "ed", tampered)
    refused = run_keyseal("verify", "--cert", registered.keys["ed"].cert, tampered)
    assert refused.returncode == 1 and "BAD signature" in refused.stderr, refused.stderr


def test_gpg_made_cleartext_verifies_with_keyseal(registered: Registered, tmp_path: Path) -> None:
    home = tmp_path / "gpg-home"
    home.mkdir(mode=0o700)
    made = registered.run("gpg", "--homedir", home, "--batch", "--passphrase", "", "--quick-gen-key",
                          "Gpg Maker <maker@example.org>", "ed25519", "sign", "never")
    assert made.returncode == 0, made.stderr
    cert = tmp_path / "maker.asc"
    cert.write_text(registered.run("gpg", "--homedir", home, "--armor", "--export", "maker@example.org").stdout)
    try:
        for name, text in TEXTS.items():
            source = tmp_path / f"{name}.txt"
            source.write_bytes(text)
            document = tmp_path / f"{name}.txt.asc"
            signed = registered.run("gpg", "--homedir", home, "--batch", "--digest-algo", "SHA512", "--clearsign",
                                    "-o", document, source)
            assert signed.returncode == 0, signed.stderr
            out = tmp_path / f"{name}.out"
            verified = run_keyseal("verify", "--cert", cert, "-o", out, document)
            assert verified.returncode == 0, (name, verified.stderr)
            assert out.read_bytes().replace(b"\n", b"\r\n").rstrip(b"\r\n") == canonical(text).rstrip(b"\r\n")
            data = document.read_bytes()
            changed = tmp_path / f"{name}.changed.asc"
            changed.write_bytes(data.replace(b"\n\n", b"\n\nX", 1))  # one more byte at the start of the text
            assert run_keyseal("verify", "--cert", cert, changed).returncode == 1
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True, check=False)


def test_cleartext_refusals(registered: Registered, tmp_path: Path) -> None:
    source = tmp_path / "text"
    source.write_bytes(b"-a\nb\n")
    document = tmp_path / "text.asc"
    assert registered.gpg("-u", "releases@example.org", "--clearsign", "-o", document, source).returncode == 0
    good = document.read_bytes()
    cert = registered.keys["ed"].cert
    cases = {
        "unescaped dash": good.replace(b"- -a\n", b"-a\n"),
        "other header": good.replace(b"Hash: SHA256\n", b"Hash: SHA256\nComment: hi\n"),
        "wrong Hash header": good.replace(b"Hash: SHA256", b"Hash: SHA512"),
        "text after the signature": good + b"appended\n",
        "no signature": good[: good.index(b"-----BEGIN PGP SIGNATURE")],
    }
    for name, data in cases.items():
        path = tmp_path / "case.asc"
        path.write_bytes(data)
        result = run_keyseal("verify", "--cert", cert, path)
        assert result.returncode != 0, name
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, (name, result)
    # keyseal sign --clear -o names the output; --binary and --append make no sense for a cleartext message.
    named = tmp_path / "named.asc"
    key = registered.keys["ed"]
    made = run_keyseal("sign", "--key", key.uri, "--cert", cert, "--clear", "-o", named, source)
    assert made.returncode == 0 and gpg_verifies(registered, "ed", named), made.stderr
    for extra in ("--binary", "--append"):
        assert_one_line_error(run_keyseal("sign", "--key", key.uri, "--clear", extra, "-o", named, source))
    # --output belongs to cleartext messages only.
    assert_one_line_error(run_keyseal("verify", "--cert", cert, "-o", tmp_path / "x", source, document))


# -- keyseal-gpg ---------------------------------------------------------------------------------------------


def status_of(result: Result) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("[GNUPG:] ")]


def test_sign_modes_inputs_and_outputs(registered: Registered, tmp_path: Path) -> None:
    key = registered.keys["ed"]
    data = tmp_path / "artifact.bin"
    data.write_bytes(bytes(range(256)) * 64)

    # Default output names, as gpg's: FILE.sig (detached binary), FILE.asc (armored, or cleartext), FILE.gpg.
    for args, name, armored in ((["-b"], "artifact.bin.sig", False), (["-ab"], "artifact.bin.asc", True),
                                (["-s"], "artifact.bin.gpg", False)):
        made = registered.gpg("-u", key.fingerprint, *args, data)
        assert made.returncode == 0, made.stderr
        out = tmp_path / name
        assert out.read_bytes().startswith(b"-----BEGIN PGP") == armored
        again = registered.gpg("-u", key.fingerprint, *args, data)
        assert_one_line_error(again)
        assert "pass --yes" in again.stderr
        assert registered.gpg("--yes", "-u", key.fingerprint, *args, data).returncode == 0
    for sig in ("artifact.bin.sig", "artifact.bin.asc"):
        assert gpg(registered, "--no-default-keyring", "--keyring", registered.keyring("ed"), "--verify",
                   tmp_path / sig, data).returncode == 0
        assert sqv_verify(key.cert, tmp_path / sig, data).returncode == 0
    # A one-pass signed message: gpg verifies it and gives back the data.
    decoded = tmp_path / "decoded"
    opened = gpg(registered, "--no-default-keyring", "--keyring", registered.keyring("ed"), "-o", decoded,
                 "--decrypt", tmp_path / "artifact.bin.gpg")
    assert "[GNUPG:] GOODSIG" in opened.stdout, opened
    assert decoded.read_bytes() == data.read_bytes()
    armored_message = registered.gpg("-u", key.fingerprint, "--sign", "--armor", "-o", "-", input=b"inline\n")
    assert armored_message.stdout.startswith("-----BEGIN PGP MESSAGE-----")
    sq = registered.run(tool("sq", "sq"), "verify", "--signer-cert", key.cert, input=armored_message.stdout.encode())
    assert sq.returncode == 0 and sq.stdout == "inline\n", sq.stderr

    # rpm's command line: stdin after `--`, binary output to a named file (rpm made it already: no --yes).
    rpm_sig = tmp_path / "rpm.sig"
    rpm_sig.touch()
    by_rpm = registered.gpg("--no-verbose", "--no-armor", "--no-secmem-warning", "-u", key.fingerprint, "-sbo",
                            rpm_sig, "--", "-", input=data.read_bytes())
    assert_one_line_error(by_rpm)  # gpg, too, refuses to overwrite in batch mode without --yes
    rpm_sig.unlink()
    by_rpm = registered.gpg("--no-verbose", "--no-armor", "--no-secmem-warning", "-u", key.fingerprint, "-sbo",
                            rpm_sig, "--", "-", input=data.read_bytes())
    assert by_rpm.returncode == 0, by_rpm.stderr
    assert sqv_verify(key.cert, rpm_sig, data).returncode == 0

    # Text mode (-t): a 0x01 signature over the text with CR LF line endings; gpg and sqv accept it.
    text = tmp_path / "notes.txt"
    text.write_bytes(b"line one\nline two\r\nlast\n")
    made = registered.gpg("-u", key.fingerprint, "--status-fd", "2", "-abst", "-o", tmp_path / "notes.asc", text)
    assert "[GNUPG:] SIG_CREATED D 22 8 01 " in made.stderr, made.stderr
    assert gpg(registered, "--no-default-keyring", "--keyring", registered.keyring("ed"), "--verify",
               tmp_path / "notes.asc", text).returncode == 0
    assert sqv_verify(key.cert, tmp_path / "notes.asc", text).returncode == 0
    checked = registered.gpg("--status-fd", "1", "--verify", tmp_path / "notes.asc", text)
    assert checked.returncode == 0 and "[GNUPG:] GOODSIG" in checked.stdout, checked
    by_cli = run_keyseal("verify", "--cert", key.cert, text, tmp_path / "notes.asc")
    assert by_cli.returncode == 0 and by_cli.stdout.strip() == key.fingerprint, by_cli.stderr
    text.write_bytes(b"line one\nline two\r\nlast!\n")
    assert run_keyseal("verify", "--cert", key.cert, text, tmp_path / "notes.asc").returncode == 1


def test_key_names_digests_and_status(registered: Registered, tmp_path: Path) -> None:
    key = registered.keys["ed"]
    payload = b"payload\n"
    names = [("-u", key.fingerprint), ("--local-user", key.fingerprint[-16:]),
             ("--default-key", f"0x{key.fingerprint[-16:]}"), ("-u", "releases@example.org"),
             ("--local-user=Example Releases <releases@example.org>", None), ("-u", key.uri)]
    for option, spec in names:
        made = registered.gpg("--status-fd=2", *([option] if spec is None else [option, spec]), "-bsa",
                              input=payload)
        assert made.returncode == 0, (spec, option, made.stderr)
        assert "SIG_CREATED D 22 8 00 " in made.stderr and made.stderr.rstrip().endswith(key.fingerprint)
    cases = [([], "ed", 8), (["--digest-algo", "SHA512"], "ed", 10), (["--digest-algo=sha384"], "ed", 9),
             ([], "p384", 9), (["--personal-digest-preferences", "SHA512 SHA384 SHA256 SHA224"], "ed", 10),
             (["--personal-digest-preferences", "SHA256"], "p384", 9)]
    for args, label, hash_id in cases:
        made = registered.gpg("--status-fd", "2", *args, "-u", registered.keys[label].fingerprint, "-abs",
                              input=payload)
        assert made.returncode == 0, made.stderr
        lines = status_of(made)
        fingerprint = registered.keys[label].fingerprint
        assert lines[0] == f"[GNUPG:] KEY_CONSIDERED {fingerprint} 0"
        assert lines[1] == f"[GNUPG:] BEGIN_SIGNING H{hash_id}"
        assert lines[2].startswith(f"[GNUPG:] SIG_CREATED D {19 if label == 'p384' else 22} {hash_id} 00 ")
        assert lines[2].endswith(f" {fingerprint}")
        sig = tmp_path / f"{label}-{hash_id}.asc"
        sig.write_text(made.stdout)
        data = tmp_path / "payload"
        data.write_bytes(payload)
        verified = gpg(registered, "--no-default-keyring", "--keyring", registered.keyring(label), "--verify", sig,
                       data)
        assert f" {hash_id} 00 {fingerprint}" in verified.stdout, verified.stdout  # VALIDSIG's hash field
    clear = registered.gpg("--status-fd", "2", "-u", key.fingerprint, "--clearsign", input=b"text\n")
    assert status_of(clear)[2].startswith("[GNUPG:] SIG_CREATED C 22 8 01 ")
    verified = registered.gpg("--status-fd", "2", "--verify", "-o", "-", input=clear.stdout.encode())
    assert "[GNUPG:] GOODSIG" in verified.stderr and verified.stdout == "text\n", verified


def test_list_keys_in_gpg_colon_format(registered: Registered) -> None:
    key = registered.keys["ed"]
    listing = registered.gpg("--list-secret-keys", "--with-colons", "--fixed-list-mode", "releases@example.org")
    assert listing.returncode == 0, listing.stderr
    rows = [line.split(":") for line in listing.stdout.splitlines()]
    assert [row[0] for row in rows] == ["tru", "sec", "fpr", "uid"]
    sec = rows[1]
    assert sec[4] == key.fingerprint[-16:] and sec[3] == "22" and sec[2] == "255" and "s" in sec[11]
    assert sec[14] == "+" and sec[16] == "ed25519"
    assert rows[2][9] == key.fingerprint
    assert rows[3][9] == "Example Releases <releases@example.org>"
    # gpg itself reads this listing's shape: its own for the same certificate has the same fields there.
    everything = registered.gpg("-k", "--with-colons")
    assert everything.stdout.count("\npub:") == 2
    human = registered.gpg("--list-secret-keys")
    assert key.fingerprint in human.stdout and "[ultimate] Example Releases <releases@example.org>" in human.stdout
    by_uri = registered.gpg("--list-secret-keys", "--with-colons", key.uri)
    assert f"fpr:::::::::{key.fingerprint}:" in by_uri.stdout and by_uri.stdout.count("\nsec:") == 1
    missing = registered.gpg("--list-secret-keys", "--with-colons", "nobody@example.org")
    assert_one_line_error(missing)


def test_ignored_and_refused_options(registered: Registered) -> None:
    key = registered.keys["ed"].fingerprint
    ignored = ["--batch", "--no-tty", "--no-secmem-warning", "--use-agent", "--lock-never", "--no-default-keyring",
               "--keyring", "pubring.kbx", "--secret-keyring", "secring.gpg", "--trust-model", "always",
               "--weak-digest", "SHA1", "--utf8-strings", "--no-armor", "--passphrase", "x", "--passphrase-file",
               "/nonexistent", "--pinentry-mode", "loopback", "--homedir", "/nonexistent", "--openpgp",
               "--list-options", "no-show-policy-urls", "--no-show-policy-url", "--keyid-format", "long", "-q"]
    made = registered.gpg(*ignored, "-u", key, "-bs", input=b"x")
    assert made.returncode == 0, made.stderr
    for args, named in ((["--encrypt"], "--encrypt"), (["-e"], "-e"), (["--symmetric"], "--symmetric"),
                        (["--export-secret-keys"], "--export-secret-keys"), (["-bsu", key, "--recipient", "x"],
                                                                             "--recipient"),
                        (["--digest-algo", "SHA1", "-bs"], "SHA1"), (["-bs", "--clearsign"], "choose one"),
                        (["--passphrase-fd", "0", "-u", key, "-bs"], "--passphrase-fd 0"),
                        (["-u", key, "-bs", "one", "two"], "one file per call"), ([], "give one of them"),
                        (["--no-default-keyring", "--keyring", "other.gpg", "--verify", "x.asc"],
                         "trusts the keyseal keyring only")):
        result = registered.gpg(*args, input=b"x")
        assert result.returncode == 2, (args, result)
        assert_one_line_error(result)
        assert named in result.stderr, (args, result.stderr)


def test_sign_and_verify_paths_import_no_heavy_packages(registered: Registered, tmp_path: Path) -> None:
    """Start-up time: keyseal-gpg loads neither click nor a cloud or HSM SDK to sign with a file key or to verify."""
    data = tmp_path / "data"
    data.write_bytes(b"data\n")
    probe = (
        "import sys, json\n"
        "from keyseal._internal.cli import gpgcompat\n"
        "try:\n"
        "    gpgcompat.main(sys.argv[1:])\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "heavy = ('click', 'boto3', 'botocore', 'pkcs11', 'hvac', 'kubernetes', 'grpc')\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "sys.stderr.write(json.dumps([code, loaded]) + '\\n')\n"
    )
    key = registered.keys["ed"]
    runs = {
        "sign": ["-u", key.fingerprint, "-abs", "-o", str(tmp_path / "data.asc"), str(data)],
        "clearsign": ["-u", key.uri, "--clearsign", "-o", str(tmp_path / "data.txt.asc"), str(data)],
        "verify": ["--verify", str(tmp_path / "data.asc"), str(data)],
        "verify-cleartext": ["--verify", str(tmp_path / "data.txt.asc")],
        "list": ["--list-secret-keys", "--with-colons"],
    }
    for name, args in runs.items():
        result = registered.run(sys.executable, "-c", probe, *args)
        code, loaded = json.loads(result.stderr.strip().splitlines()[-1])
        assert code == 0, (name, result.stderr)
        assert loaded == [], (name, loaded)

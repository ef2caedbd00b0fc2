"""Independent verifiers of what keyseal writes: gpg, sqv, and a second library (PGPy)."""

from __future__ import annotations

import warnings
from pathlib import Path

from tests.conftest import Gpg, run_keyseal, sqv_verify


def gpg_accepts(gpg: Gpg, cert: Path, data: Path, signature: Path) -> bool:
    imported = gpg.run("--import", cert)
    assert imported.returncode == 0, imported.stderr.decode()
    result = gpg.run("--verify", signature, data)
    status = result.stderr.decode()
    return result.returncode == 0 and "[GNUPG:] GOODSIG" in status and "[GNUPG:] VALIDSIG" in status


def sqv_accepts(cert: Path, data: Path, signature: Path) -> bool:
    return sqv_verify(cert, signature, data).returncode == 0


def pgpy_accepts(cert: Path, data: Path, signature: Path) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgpy

        key, _ = pgpy.PGPKey.from_file(str(cert))
        sig = pgpy.PGPSignature.from_blob(signature.read_bytes())
        return bool(key.verify(data.read_bytes(), sig))


def flip_byte(path: Path, index: int, out: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[index] ^= 0x01
    out.write_bytes(bytes(data))
    return out


def assert_accepted_everywhere(gpg: Gpg, cert: Path, data: Path, signature: Path, fingerprint: str) -> None:
    """gpg, sqv and `keyseal verify` all accept the signature, and keyseal names the expected signer."""
    assert gpg_accepts(gpg, cert, data, signature), data
    assert sqv_accepts(cert, data, signature), data
    verified = run_keyseal("verify", "--cert", cert, data, signature)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.strip() == fingerprint

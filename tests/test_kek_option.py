"""`--kek` on mint and sign opens a KMS-wrapped key without $KEYSEAL_KEK; the wrong KEK is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, run_keyseal
from tests.openpgp_checks import sqv_accepts

pytestmark = pytest.mark.slow  # real peers, seconds per test: left out of the fast loop


def test_kek_option_on_mint_and_sign(aws_env: dict[str, str], kms_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    arn = kms_client.create_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["Arn"]
    key, cert, data = tmp_path / "k.rec", tmp_path / "k.asc", tmp_path / "data"
    data.write_bytes(b"wrapped by KMS")
    created = run_keyseal("keys", "create", "--out", key, "--type", "p256", "--kek", f"awskms:{arn}")
    assert created.returncode == 0, created.stderr
    assert b"PRIVATE KEY" not in key.read_bytes()

    # Without --kek the local KEK is configured, which is not the record's provider: refused.
    refused = run_keyseal("keys", "mint", "--key", f"file:{key}", "--name", "W", "--email", "w@example.org")
    assert_one_line_error(refused)

    minted = run_keyseal("keys", "mint", "--key", f"file:{key}", "--kek", f"awskms:{arn}", "--name", "W",
                         "--email", "w@example.org", "-o", cert)
    assert minted.returncode == 0, minted.stderr
    signed = run_keyseal("sign", "--key", f"file:{key}", "--kek", f"awskms:{arn}", "--cert", cert, data)
    assert signed.returncode == 0, signed.stderr
    assert sqv_accepts(cert, data, tmp_path / "data.asc")
